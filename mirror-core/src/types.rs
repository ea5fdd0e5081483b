//! Newtypes that keep sequence numbers, sector addresses and identities from being mixed up.

use std::fmt;

/// Size of the unit that [`Lba`] counts, in bytes (the Linux sector).
pub const SECTOR_BYTES: u64 = 512;

/// A logical block size other than 512 or 4096, the two a mirrored volume may have (every side,
/// every driver: [`block_shift`] is the one check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("block size {0} is not supported (512 or 4096)")]
pub struct BadBlockSize(pub u32);

/// Checks a logical block size; returns its log2 (what ublk's parameters take).
pub fn block_shift(block_bytes: u32) -> Result<u8, BadBlockSize> {
    match block_bytes {
        512 => Ok(9),
        4096 => Ok(12),
        other => Err(BadBlockSize(other)),
    }
}

/// Sequence number of one mirrored operation. `Seq(0)` means "none yet"; real operations start at 1
/// and only grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Seq(pub u64);

impl Seq {
    /// No operation yet.
    pub const NONE: Seq = Seq(0);

    /// The sequence number after this one.
    #[must_use]
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Logical block address in 512-byte sectors, whatever the volume's block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lba(pub u64);

impl Lba {
    /// Builds an address from a byte offset (which must be sector aligned to round-trip).
    #[must_use]
    pub fn from_bytes(offset_bytes: u64) -> Lba {
        Lba(offset_bytes / SECTOR_BYTES)
    }

    /// The byte offset of this address, or `None` on overflow.
    #[must_use]
    pub fn bytes(self) -> Option<u64> {
        self.0.checked_mul(SECTOR_BYTES)
    }
}

/// Generation identifier of a volume's data history ([`crate::genid`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Generation(pub u64);

impl Generation {
    /// No history: a volume whose data the pair does not count on (just created, replaced, or
    /// not yet filled by a full resync).
    pub const NONE: Generation = Generation(0);

    /// A new history's id from `random` (the driver's randomness), never [`Self::NONE`].
    #[must_use]
    pub fn fresh(random: u64) -> Generation {
        Generation(random.max(1))
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Generation::NONE {
            f.write_str("none")
        } else {
            write!(f, "{:016x}", self.0)
        }
    }
}

/// Identity of a mirrored volume: both sides of one mirror carry the same id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VolumeId(pub [u8; 16]);

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl VolumeId {
    /// Parses 32 hex digits (dashes allowed, as in a UUID).
    pub fn parse(text: &str) -> Option<VolumeId> {
        let hex: Vec<u8> = text.bytes().filter(|b| *b != b'-').collect();
        if hex.len() != 32 {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, pair) in hex.chunks(2).enumerate() {
            let s = std::str::from_utf8(pair).ok()?;
            id[i] = u8::from_str_radix(s, 16).ok()?;
        }
        Some(VolumeId(id))
    }
}

/// Identity of one node (one daemon) of a mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NodeId(pub u64);

/// Why an extent is not valid for a volume ([`Range::checked`], the one rule both engines apply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ExtentError {
    /// Empty, or not on block boundaries.
    #[error("extent {offset_bytes}+{len_bytes} not aligned to the {block_bytes}-byte block")]
    Unaligned {
        /// Its start.
        offset_bytes: u64,
        /// Its length.
        len_bytes: u64,
        /// The volume's block.
        block_bytes: u64,
    },
    /// Past the end of the volume.
    #[error("extent {offset_bytes}+{len_bytes} beyond the volume of {volume_bytes} bytes")]
    BeyondVolume {
        /// Its start.
        offset_bytes: u64,
        /// Its length.
        len_bytes: u64,
        /// The volume's size.
        volume_bytes: u64,
    },
}

/// A byte range on the volume: `[offset_bytes, offset_bytes + len_bytes)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Range {
    /// First byte.
    pub offset_bytes: u64,
    /// Length in bytes (never zero for a lockable range).
    pub len_bytes: u64,
}

impl Range {
    /// A new range.
    #[must_use]
    pub fn new(offset_bytes: u64, len_bytes: u64) -> Range {
        Range {
            offset_bytes,
            len_bytes,
        }
    }

    /// One past the last byte (saturating).
    #[must_use]
    pub fn end_bytes(&self) -> u64 {
        self.offset_bytes.saturating_add(self.len_bytes)
    }

    /// The range `[offset_bytes, offset_bytes + len_bytes)` if it is a valid extent of a volume
    /// of `volume_bytes` with `block_bytes` blocks: not empty, on block boundaries, inside.
    pub fn checked(
        offset_bytes: u64,
        len_bytes: u64,
        block_bytes: u64,
        volume_bytes: u64,
    ) -> Result<Range, ExtentError> {
        if len_bytes == 0
            || !offset_bytes.is_multiple_of(block_bytes)
            || !len_bytes.is_multiple_of(block_bytes)
        {
            return Err(ExtentError::Unaligned {
                offset_bytes,
                len_bytes,
                block_bytes,
            });
        }
        if offset_bytes
            .checked_add(len_bytes)
            .is_none_or(|end| end > volume_bytes)
        {
            return Err(ExtentError::BeyondVolume {
                offset_bytes,
                len_bytes,
                volume_bytes,
            });
        }
        Ok(Range::new(offset_bytes, len_bytes))
    }

    /// Whether two ranges share at least one byte.
    #[must_use]
    pub fn overlaps(&self, other: &Range) -> bool {
        self.len_bytes > 0
            && other.len_bytes > 0
            && self.offset_bytes < other.end_bytes()
            && other.offset_bytes < self.end_bytes()
    }
}

/// A byte count as operators write it: digits with an optional `K`, `M`, `G` or `T` suffix
/// (powers of 1024, either case): `4096`, `64M`, `2g`. Flags parse it from text
/// ([`parse_size`]); configuration files take either such a string or a plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(pub u64);

/// Folds a command-line parser's error message (clap prints several lines: the error, an
/// indented list such as the missing arguments, then usage) into one line: its first paragraph,
/// lines trimmed and joined with spaces, without the leading `error: `.
#[must_use]
pub fn one_line_error(text: &str) -> String {
    let joined = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let line = joined.strip_prefix("error: ").unwrap_or(&joined);
    if line.is_empty() {
        "invalid arguments".into()
    } else {
        line.to_string()
    }
}

/// Parses a [`Size`] from text; the error is one line that quotes the input.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        Some((i, 'T' | 't')) => (&t[..i], 1 << 40),
        _ => (t, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a size in bytes (e.g. 4096, 64M)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{text}' is too large"))
}

impl std::str::FromStr for Size {
    type Err = String;

    fn from_str(text: &str) -> Result<Size, String> {
        parse_size(text).map(Size)
    }
}

impl<'de> serde::Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Size;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size in bytes: an integer or a string such as \"64M\"")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("size {v} must not be negative")))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_errors_fold_into_their_first_paragraph() {
        let text = "error: the following required arguments were not provided:\n  --watch <SECS>\n\nUsage: ublk-mirror status --watch <SECS> --count <N>\n";
        assert_eq!(
            one_line_error(text),
            "the following required arguments were not provided: --watch <SECS>"
        );
        assert_eq!(one_line_error("error: bad flag\n"), "bad flag");
        assert_eq!(one_line_error(""), "invalid arguments");
    }

    #[test]
    fn volume_id_parses_uuid_form() {
        let id = VolumeId::parse("00112233-4455-6677-8899-aabbccddeeff").unwrap();
        assert_eq!(id.to_string(), "00112233445566778899aabbccddeeff");
        assert!(VolumeId::parse("xyz").is_none());
        assert!(VolumeId::parse("0011223344556677889900aabbccddeeffzz").is_none());
    }

    #[test]
    fn ranges_overlap_only_when_sharing_a_byte() {
        let a = Range::new(0, 4096);
        assert!(a.overlaps(&Range::new(4095, 1)));
        assert!(!a.overlaps(&Range::new(4096, 10)));
        assert!(!Range::new(10, 0).overlaps(&a));
    }

    #[test]
    fn sizes_take_suffixes_and_refuse_garbage() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 64M "), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!("1T".parse::<Size>(), Ok(Size(1 << 40)));
        for bad in ["12Q", "", "M", "-1", "1.5G", "99999999999T"] {
            let err = parse_size(bad).unwrap_err();
            assert!(
                err.contains(bad.trim()) && !err.contains('\n'),
                "{bad}: {err}"
            );
        }
    }
}
