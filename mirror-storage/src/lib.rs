//! The real storage behind mirror-core's seams, shared by both daemons: a regular file or block
//! device ([`Backing`]) whose data area is a [`FileVolume`] ([`mirror_core::storage::Volume`]) and
//! whose metadata area at the end holds the record ([`AreaMeta`],
//! [`mirror_core::storage::MetaStore`]) and a primary's write intent ([`AreaIntent`],
//! [`mirror_core::storage::IntentStore`]); the layout and its size rule are
//! [`mirror_core::meta`]'s.
//!
//! [`open`] finds or makes that layout and reports how ([`Opening`]); what the record is trusted
//! for is not decided here but by [`mirror_core::target::recover`]. Binding the record to its
//! volume is the point: a replaced volume carries no record (it is never trusted as consistent),
//! and a backing that grew or shrank no longer ends in its record (an error). A record in a
//! separate legacy `<volume>.meta` file is upgraded once, for a regular file.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backing;
mod intent;
mod layout;
mod volume;

pub use backing::{Backing, StorageError};
pub use intent::{AreaIntent, IntentAreaError};
pub use layout::{legacy_meta_path, open, upgraded_path, Opened, Opening, VolumeSpec};
pub use volume::{AreaMeta, FileVolume};
