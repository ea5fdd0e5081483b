//! The before-resync hook (DRBD's `before-resync-target` handler): a command the target runs
//! when a resync's begin mark is applied, after everything before it is synced and before any of
//! the resync's copies reach the volume, so that an operator can snapshot the last consistent
//! copy. The server waits for it; a hook that fails stops the server before the resync changes
//! anything (the primary keeps retrying; fix the hook and start the server again).

use std::path::PathBuf;
use std::process::Command;

use mirror_core::{Seq, VolumeId};

use crate::error::IoFailure;

/// The command and what it is told.
#[derive(Debug, Clone)]
pub(crate) struct BeforeResync {
    pub(crate) command: String,
    pub(crate) volume: PathBuf,
    pub(crate) volume_id: VolumeId,
}

impl BeforeResync {
    /// Runs the hook through `sh -c` for the resync beginning at `seq` (`full`: every chunk is
    /// copied) and waits for it.
    pub(crate) fn run(&self, seq: Seq, full: bool) -> Result<(), IoFailure> {
        let failed = |why: String| IoFailure::Hook {
            command: self.command.clone(),
            why,
        };
        tracing::info!(command = %self.command, %seq, full, "running the before-resync hook");
        let status = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .env("UBLK_MIRROR_VOLUME", &self.volume)
            .env("UBLK_MIRROR_VOLUME_ID", self.volume_id.to_string())
            .env("UBLK_MIRROR_RESYNC", if full { "full" } else { "partial" })
            .env("UBLK_MIRROR_SEQ", seq.0.to_string())
            .status()
            .map_err(|e| failed(format!("cannot run it: {e}")))?;
        if status.success() {
            Ok(())
        } else {
            Err(failed(status.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(command: &str) -> BeforeResync {
        BeforeResync {
            command: command.into(),
            volume: "/srv/v.img".into(),
            volume_id: VolumeId::parse("00112233445566778899aabbccddeeff").unwrap(),
        }
    }

    #[test]
    fn the_hook_is_told_the_resync_and_its_failure_is_one_line() {
        let told = "test \"$UBLK_MIRROR_RESYNC $UBLK_MIRROR_SEQ $UBLK_MIRROR_VOLUME\" = \
                    'partial 7 /srv/v.img' && test -n \"$UBLK_MIRROR_VOLUME_ID\"";
        hook(told).run(Seq(7), false).unwrap();
        let e = hook(told).run(Seq(7), true).unwrap_err().to_string();
        assert!(
            e.contains("failed (exit status: 1): the resync does not start"),
            "{e}"
        );
    }
}
