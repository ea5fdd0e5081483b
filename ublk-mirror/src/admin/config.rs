//! `ublk-mirror start`'s settings: the flags and a TOML file (`--config`) resolved by one set of
//! rules. The file's keys are the flags' names in snake_case; flags override the file; relative
//! paths in the file are relative to its directory. Every value is checked here, once.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use mirror_core::node::{OverflowRule, SyncPeerGone, KEEP_BYTES_DEFAULT};
use mirror_core::source::Mode;
use mirror_core::{parse_size, Size, VolumeId};
use serde::Deserialize;

use super::client;
use crate::device;

/// Flags of `ublk-mirror start`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StartArgs {
    /// TOML file with the settings below (keys in snake_case; flags override it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The local volume: a file or a block device (must exist). Its metadata record lives at its
    /// end: a file without one keeps its size as the data and grows by the metadata area.
    #[arg(long, value_name = "PATH")]
    pub volume: Option<PathBuf>,
    /// Trust nothing of the volume's record and start the sequence at 1 against a new target:
    /// the way out after an unclean stop until resync exists (docs/operations.md).
    #[arg(long)]
    pub new_sequence: bool,
    /// Data size of a volume without metadata (suffixes K, M, G): needed for a block device,
    /// whose metadata area then follows that many bytes of data.
    #[arg(long, value_name = "BYTES")]
    pub create_size: Option<String>,
    /// Target server address, host:port.
    #[arg(long, value_name = "ADDR")]
    pub peer: Option<String>,
    /// Volume id shared with the target: 32 hex digits (dashes allowed).
    #[arg(long, value_name = "HEX32")]
    pub volume_id: Option<String>,
    /// File holding the shared secret (surrounding whitespace ignored).
    #[arg(long, value_name = "PATH")]
    pub secret_file: Option<PathBuf>,
    /// Acknowledgement mode: async, received, sync or lock-then-write [default: async].
    #[arg(long, value_name = "MODE")]
    pub mode: Option<String>,
    /// Host flushes (and FUA writes) also wait until the target has everything before them.
    #[arg(long)]
    pub flush_replicates: bool,
    /// Logical block size: 4096 or 512 [default: 4096].
    #[arg(long, value_name = "BYTES")]
    pub block_bytes: Option<u32>,
    /// Hardware queues, one thread each [default: 2].
    #[arg(long, value_name = "N")]
    pub queues: Option<u16>,
    /// Requests in flight per queue [default: 64].
    #[arg(long, value_name = "N")]
    pub depth: Option<u16>,
    /// Bound on the rollback log's payload bytes (suffixes K, M, G) [default: 64M].
    #[arg(long, value_name = "BYTES")]
    pub log_bytes: Option<String>,
    /// Bound on the rollback log's entries [default: 65536].
    #[arg(long, value_name = "N")]
    pub log_entries: Option<usize>,
    /// Daemon name (socket, log and device files are named after it) [default: mirror].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Control socket [default: /run/ublk-mirror/NAME.sock].
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Device number N of /dev/ublkbN [default: the first free one].
    #[arg(long, value_name = "N")]
    pub dev_id: Option<u32>,
    /// Refuse to start unless a handshake with the peer succeeds within this time [default: 10].
    #[arg(long, value_name = "SECS")]
    pub connect_timeout_secs: Option<u64>,
    /// On stop, wait at most this long for the target to catch up [default: 60].
    #[arg(long, value_name = "SECS")]
    pub stop_drain_secs: Option<u64>,
    /// In async and received, record writes out of sync (resynced later) instead of queueing
    /// them once the peer has been unreachable this long; a full rollback log overflows at
    /// once. 0: never overflow (a full log holds writes back) [default: 30].
    #[arg(long, value_name = "SECS")]
    pub overflow_after_secs: Option<u64>,
    /// What sync does once the peer has been unreachable that long: suspend (writes wait) or
    /// degrade (writes complete locally, the peer is outdated until resynced) [default: suspend].
    #[arg(long, value_name = "POLICY")]
    pub sync_peer_gone: Option<String>,
    /// An overflow's resync copies at most this many bytes per second (suffixes K, M, G); 0: no
    /// bound but the host's writes, which come first [default: 0].
    #[arg(long, value_name = "SIZE")]
    pub resync_rate: Option<String>,
    /// The stored write intent keeps this much of clean chunks (rewriting them costs no store;
    /// a crash resyncs them all), as DRBD's activity log (suffixes K, M, G) [default: 1G].
    #[arg(long, value_name = "SIZE")]
    pub intent_keep: Option<String>,
    /// While an overflow's resync does not converge (no fewer chunks out of sync for 30 s),
    /// host writes wait for room in the log instead of overflowing: the host slows to the link.
    #[arg(long)]
    pub resync_throttle: bool,
    /// Log file of a background daemon [default: /run/ublk-mirror/NAME.log].
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// Node id announced to the target [default: 1].
    #[arg(long, value_name = "N")]
    pub node_id: Option<u64>,
    /// Stay in the foreground (log to stderr) instead of starting a background daemon.
    #[arg(long)]
    pub foreground: bool,
    /// Passthrough: serve the local volume with the mirror switched off (no peer, no log; the
    /// mirror settings are ignored). For measuring what the mirror costs against plain ublk.
    #[arg(long)]
    pub no_mirror: bool,
}

/// The TOML file: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    volume: Option<PathBuf>,
    create_size: Option<Size>,
    peer: Option<String>,
    volume_id: Option<String>,
    secret_file: Option<PathBuf>,
    mode: Option<String>,
    flush_replicates: Option<bool>,
    block_bytes: Option<u32>,
    queues: Option<u16>,
    depth: Option<u16>,
    log_bytes: Option<Size>,
    log_entries: Option<usize>,
    name: Option<String>,
    control_socket: Option<PathBuf>,
    dev_id: Option<u32>,
    connect_timeout_secs: Option<u64>,
    stop_drain_secs: Option<u64>,
    overflow_after_secs: Option<u64>,
    sync_peer_gone: Option<String>,
    resync_rate: Option<Size>,
    intent_keep: Option<Size>,
    resync_throttle: Option<bool>,
    log_file: Option<PathBuf>,
    node_id: Option<u64>,
    no_mirror: Option<bool>,
}

/// Where and how the daemon mirrors.
#[derive(Debug, Clone)]
pub(super) struct MirrorSettings {
    pub(super) peer: String,
    pub(super) volume_id: VolumeId,
    pub(super) secret_file: PathBuf,
    pub(super) mode: Mode,
}

/// Validated settings of a daemon.
#[derive(Debug, Clone)]
pub struct Settings {
    pub(super) name: String,
    pub(super) volume: PathBuf,
    /// The data size of a volume without metadata (`--create-size`).
    pub(super) create_bytes: Option<u64>,
    /// `--new-sequence`.
    pub(super) new_sequence: bool,
    /// `None`: passthrough (`--no-mirror`).
    pub(super) mirror: Option<MirrorSettings>,
    pub(super) flush_replicates: bool,
    pub(super) block_bytes: u32,
    pub(super) queues: u16,
    pub(super) depth: u16,
    pub(super) log_bytes: u64,
    pub(super) log_entries: usize,
    pub(super) control_socket: PathBuf,
    pub(super) dev_id: Option<u32>,
    pub(super) connect_timeout: Duration,
    pub(super) stop_drain: Duration,
    /// When writes overflow to the write intent.
    pub(super) overflow: OverflowRule,
    /// `--resync-rate` (none: unbounded).
    pub(super) resync_rate_bytes_per_s: Option<u64>,
    /// `--intent-keep`.
    pub(super) intent_keep_bytes: u64,
    /// `--resync-throttle`.
    pub(super) resync_throttle: bool,
    pub(super) log_file: PathBuf,
    pub(super) node_id: u64,
}

fn relative_to(base: Option<&Path>, p: PathBuf) -> PathBuf {
    match base {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p,
    }
}

impl Settings {
    /// Merges the file (if any) and the flags, and checks every value.
    pub fn resolve(args: &StartArgs) -> anyhow::Result<Settings> {
        let (file, base) = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                let file: FileConfig = toml::from_str(&text).map_err(|e| {
                    let msg = e.message().to_string();
                    anyhow!("config file {}: {}", path.display(), msg.trim())
                })?;
                let base = path.parent().map(Path::to_path_buf);
                (file, base)
            }
            None => (FileConfig::default(), None),
        };
        let base = base.as_deref();
        let path_of = |flag: &Option<PathBuf>, file: Option<PathBuf>| {
            flag.clone().or_else(|| file.map(|p| relative_to(base, p)))
        };

        let name = args
            .name
            .clone()
            .or(file.name)
            .unwrap_or_else(|| "mirror".into());
        super::check_name(&name).map_err(|e| anyhow!("--name: {e}"))?;
        let volume = path_of(&args.volume, file.volume)
            .ok_or_else(|| anyhow!("--volume is required (flag or config file)"))?;
        let mirror = if args.no_mirror || file.no_mirror.unwrap_or(false) {
            None
        } else {
            let peer = args
                .peer
                .clone()
                .or(file.peer)
                .ok_or_else(|| anyhow!("--peer is required (flag or config file)"))?;
            if !peer.contains(':') {
                bail!("--peer '{peer}' must be host:port");
            }
            let id_text = args
                .volume_id
                .clone()
                .or(file.volume_id)
                .ok_or_else(|| anyhow!("--volume-id is required (flag or config file)"))?;
            let volume_id = VolumeId::parse(&id_text)
                .ok_or_else(|| anyhow!("--volume-id '{id_text}' is not 32 hex digits"))?;
            let secret_file = path_of(&args.secret_file, file.secret_file)
                .ok_or_else(|| anyhow!("--secret-file is required (flag or config file)"))?;
            let mode_text = args
                .mode
                .clone()
                .or(file.mode)
                .unwrap_or_else(|| "async".into());
            let mode: Mode = mode_text
                .parse()
                .map_err(|e: String| anyhow!("--mode: {e}"))?;
            Some(MirrorSettings {
                peer,
                volume_id,
                secret_file,
                mode,
            })
        };
        let flush_replicates = args.flush_replicates || file.flush_replicates.unwrap_or(false);
        let block_bytes = args.block_bytes.or(file.block_bytes).unwrap_or(4096);
        mirror_core::block_shift(block_bytes).map_err(|e| anyhow!("--block-bytes: {e}"))?;
        let queues = args.queues.or(file.queues).unwrap_or(2);
        if !(1..=64).contains(&queues) {
            bail!("--queues {queues}: must be between 1 and 64");
        }
        let depth = args.depth.or(file.depth).unwrap_or(64);
        if !(1..=1024).contains(&depth) {
            bail!("--depth {depth}: must be between 1 and 1024");
        }
        let log_bytes = match (&args.log_bytes, file.log_bytes) {
            (Some(text), _) => parse_size(text).map_err(|e| anyhow!("--log-bytes: {e}"))?,
            (None, Some(Size(n))) => n,
            (None, None) => 64 << 20,
        };
        if log_bytes < u64::from(device::IO_BUF_BYTES) {
            bail!(
                "--log-bytes {log_bytes} is smaller than the largest request ({} bytes)",
                device::IO_BUF_BYTES
            );
        }
        let log_entries = args.log_entries.or(file.log_entries).unwrap_or(65536);
        if log_entries == 0 {
            bail!("--log-entries must be at least 1");
        }
        let control_socket = path_of(&args.control_socket, file.control_socket)
            .unwrap_or_else(|| super::socket_path(&name));
        let connect_timeout = Duration::from_secs(
            args.connect_timeout_secs
                .or(file.connect_timeout_secs)
                .unwrap_or(10),
        );
        if connect_timeout.is_zero() || connect_timeout > Duration::from_secs(3600) {
            bail!("--connect-timeout-secs must be between 1 and 3600");
        }
        let stop_drain = Duration::from_secs(
            args.stop_drain_secs
                .or(file.stop_drain_secs)
                .unwrap_or(60)
                .min(86_400),
        );
        let overflow_after_secs = args
            .overflow_after_secs
            .or(file.overflow_after_secs)
            .unwrap_or(30);
        if overflow_after_secs > 86_400 {
            bail!("--overflow-after-secs must be at most 86400");
        }
        let sync_peer_gone = match args
            .sync_peer_gone
            .as_ref()
            .or(file.sync_peer_gone.as_ref())
        {
            Some(text) => text
                .parse::<SyncPeerGone>()
                .map_err(|e| anyhow!("--sync-peer-gone: {e}"))?,
            None => SyncPeerGone::Suspend,
        };
        if overflow_after_secs == 0 && sync_peer_gone == SyncPeerGone::Degrade {
            bail!("--sync-peer-gone degrade needs --overflow-after-secs above 0 (when to degrade)");
        }
        let overflow = OverflowRule {
            enabled: overflow_after_secs > 0,
            after_down_ns: overflow_after_secs.saturating_mul(1_000_000_000),
            sync_peer_gone,
        };
        let resync_rate_bytes_per_s = match (&args.resync_rate, file.resync_rate) {
            (Some(text), _) => parse_size(text).map_err(|e| anyhow!("--resync-rate: {e}"))?,
            (None, Some(Size(n))) => n,
            (None, None) => 0,
        };
        if (1..u64::from(device::IO_BUF_BYTES)).contains(&resync_rate_bytes_per_s) {
            bail!(
                "--resync-rate {resync_rate_bytes_per_s}: below one request ({} bytes) per second",
                device::IO_BUF_BYTES
            );
        }
        let resync_rate_bytes_per_s =
            (resync_rate_bytes_per_s > 0).then_some(resync_rate_bytes_per_s);
        let intent_keep_bytes = match (&args.intent_keep, file.intent_keep) {
            (Some(text), _) => parse_size(text).map_err(|e| anyhow!("--intent-keep: {e}"))?,
            (None, Some(Size(n))) => n,
            (None, None) => KEEP_BYTES_DEFAULT,
        };
        let log_file =
            path_of(&args.log_file, file.log_file).unwrap_or_else(|| super::log_path(&name));
        let create_bytes = match (&args.create_size, file.create_size) {
            (Some(text), _) => Some(parse_size(text).map_err(|e| anyhow!("--create-size: {e}"))?),
            (None, Some(Size(n))) => Some(n),
            (None, None) => None,
        };
        if let Some(bytes) = create_bytes {
            if bytes == 0 || !bytes.is_multiple_of(u64::from(block_bytes)) {
                bail!("--create-size {bytes}: must be a non-zero multiple of the {block_bytes}-byte block");
            }
        }
        Ok(Settings {
            create_bytes,
            new_sequence: args.new_sequence,
            dev_id: args.dev_id.or(file.dev_id),
            node_id: args.node_id.or(file.node_id).unwrap_or(1),
            name,
            volume,
            mirror,
            flush_replicates,
            block_bytes,
            queues,
            depth,
            log_bytes,
            log_entries,
            control_socket,
            connect_timeout,
            stop_drain,
            overflow,
            resync_rate_bytes_per_s,
            intent_keep_bytes,
            resync_throttle: args.resync_throttle || file.resync_throttle.unwrap_or(false),
            log_file,
        })
    }

    /// Checks what can be checked without side effects: the volume and secret exist, the socket
    /// is not taken by a running daemon.
    pub(super) fn preflight(&self) -> anyhow::Result<()> {
        let meta = std::fs::metadata(&self.volume).map_err(|e| {
            anyhow!(
                "cannot use volume {}: {e} (the backing file or device must exist)",
                self.volume.display()
            )
        })?;
        if !(meta.is_file() || meta.file_type().is_block_device()) {
            bail!(
                "volume {} is neither a regular file nor a block device",
                self.volume.display()
            );
        }
        if let Some(m) = &self.mirror {
            read_secret(&m.secret_file)?;
        }
        if !Path::new("/dev/ublk-control").exists() {
            return Err(device::DeviceError::NoDriver.into());
        }
        if client::is_live(&self.control_socket) {
            bail!(
                "control socket {} is already in use by a running daemon (name '{}'; \
                 `ublk-mirror stop --name {}` first)",
                self.control_socket.display(),
                self.name,
                self.name
            );
        }
        // The device this name's last daemon left is this start's to take over (or refuse).
        let ours = super::DevRecord::read(&self.name).map(|r| r.id);
        if let Some(id) = self.dev_id.filter(|id| ours != Some(*id)) {
            if Path::new(&format!("/dev/ublkc{id}")).exists() {
                bail!("device id {id} is already in use (/dev/ublkc{id} exists)");
            }
        }
        Ok(())
    }
}

/// Reads the shared secret: the file's bytes without surrounding whitespace (the target server's
/// rule), never empty.
pub fn read_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read secret file {}", path.display()))?;
    match mirror_core::auth::secret_from_file(&bytes) {
        Some(secret) => Ok(secret.to_vec()),
        None => bail!("secret file {} is empty", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(dir: &Path) -> StartArgs {
        StartArgs {
            volume: Some(dir.join("vol.img")),
            peer: Some("127.0.0.1:7700".into()),
            volume_id: Some("0123456789abcdef0123456789abcdef".into()),
            secret_file: Some(dir.join("secret")),
            ..StartArgs::default()
        }
    }

    fn err(args: &StartArgs) -> String {
        format!("{:#}", Settings::resolve(args).unwrap_err())
    }

    #[test]
    fn flags_resolve_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let s = Settings::resolve(&base(dir.path())).unwrap();
        assert_eq!(s.name, "mirror");
        assert_eq!(s.mirror.map(|m| m.mode), Some(Mode::Async));
        assert_eq!(s.block_bytes, 4096);
        assert_eq!(s.queues, 2);
        assert_eq!(s.log_bytes, 64 << 20);
        assert_eq!(s.connect_timeout, Duration::from_secs(10));
        assert!(s.control_socket.ends_with("mirror.sock"));
        assert!(s.overflow.enabled);
        assert_eq!(s.overflow.after_down_ns, 30_000_000_000);
        assert_eq!(s.overflow.sync_peer_gone, SyncPeerGone::Suspend);
    }

    #[test]
    fn the_overflow_rule_is_resolved_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = base(dir.path());
        a.overflow_after_secs = Some(0);
        assert!(!Settings::resolve(&a).unwrap().overflow.enabled);
        a.sync_peer_gone = Some("degrade".into());
        assert!(err(&a).contains("--sync-peer-gone degrade needs --overflow-after-secs"));
        a.overflow_after_secs = Some(5);
        let s = Settings::resolve(&a).unwrap();
        assert_eq!(s.overflow.sync_peer_gone, SyncPeerGone::Degrade);
        assert_eq!(s.overflow.after_down_ns, 5_000_000_000);
        a.sync_peer_gone = Some("panic".into());
        assert!(err(&a).contains("--sync-peer-gone: unknown policy \"panic\""));
        a.sync_peer_gone = None;
        a.overflow_after_secs = Some(100_000);
        assert!(err(&a).contains("--overflow-after-secs"));
    }

    #[test]
    fn the_resync_rate_is_a_size_per_second() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = base(dir.path());
        assert_eq!(Settings::resolve(&a).unwrap().resync_rate_bytes_per_s, None);
        a.resync_rate = Some("8M".into());
        assert_eq!(
            Settings::resolve(&a).unwrap().resync_rate_bytes_per_s,
            Some(8 << 20)
        );
        a.resync_rate = Some("0".into());
        assert_eq!(Settings::resolve(&a).unwrap().resync_rate_bytes_per_s, None);
        a.resync_rate = Some("100".into());
        assert!(err(&a).contains("--resync-rate 100: below one request"));
        a.resync_rate = Some("fast".into());
        assert!(err(&a).contains("--resync-rate"));
        let mut a = base(dir.path());
        assert_eq!(Settings::resolve(&a).unwrap().intent_keep_bytes, 1 << 30);
        a.intent_keep = Some("16M".into());
        assert_eq!(Settings::resolve(&a).unwrap().intent_keep_bytes, 16 << 20);
        a.intent_keep = Some("lots".into());
        assert!(err(&a).contains("--intent-keep"));
        let mut a = base(dir.path());
        assert!(!Settings::resolve(&a).unwrap().resync_throttle);
        a.resync_throttle = true;
        assert!(Settings::resolve(&a).unwrap().resync_throttle);
    }

    #[test]
    fn bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = base(dir.path());
        a.mode = Some("fast".into());
        assert!(err(&a).contains("--mode"));
        let mut a = base(dir.path());
        a.block_bytes = Some(1024);
        assert!(err(&a).contains("--block-bytes"));
        let mut a = base(dir.path());
        a.volume_id = Some("12".into());
        assert!(err(&a).contains("--volume-id"));
        let mut a = base(dir.path());
        a.peer = Some("localhost".into());
        assert!(err(&a).contains("host:port"));
        let mut a = base(dir.path());
        a.log_bytes = Some("4K".into());
        assert!(err(&a).contains("--log-bytes"));
        let mut a = base(dir.path());
        a.volume = None;
        assert!(err(&a).contains("--volume is required"));
        let mut a = base(dir.path());
        a.name = Some("../x".into());
        assert!(err(&a).contains("--name"));
    }

    #[test]
    fn no_mirror_needs_no_peer_and_ignores_mirror_settings() {
        let dir = tempfile::tempdir().unwrap();
        let args = StartArgs {
            volume: Some(dir.path().join("vol.img")),
            no_mirror: true,
            ..StartArgs::default()
        };
        let s = Settings::resolve(&args).unwrap();
        assert!(s.mirror.is_none());
        // Without --no-mirror the same flags are incomplete.
        let args = StartArgs {
            no_mirror: false,
            ..args
        };
        assert!(err(&args).contains("--peer is required"));
        // A config file can switch the mirror off too.
        let cfg = dir.path().join("m.toml");
        std::fs::write(
            &cfg,
            "volume = \"v.img\"\nno_mirror = true\nmode = \"sync\"\n",
        )
        .unwrap();
        let s = Settings::resolve(&StartArgs {
            config: Some(cfg),
            ..StartArgs::default()
        })
        .unwrap();
        assert!(s.mirror.is_none());
    }

    #[test]
    fn config_file_is_read_and_flags_override_it() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("m.toml");
        std::fs::write(
            &cfg,
            "volume = \"v.img\"\npeer = \"10.0.0.1:7700\"\nvolume_id = \"0123456789abcdef0123456789abcdef\"\n\
             secret_file = \"/etc/secret\"\nmode = \"sync\"\nlog_bytes = \"8M\"\nqueues = 4\n",
        )
        .unwrap();
        let args = StartArgs {
            config: Some(cfg.clone()),
            mode: Some("received".into()),
            ..StartArgs::default()
        };
        let s = Settings::resolve(&args).unwrap();
        assert_eq!(s.volume, dir.path().join("v.img"));
        let m = s.mirror.clone().unwrap();
        assert_eq!(m.secret_file, PathBuf::from("/etc/secret"));
        assert_eq!(m.mode, Mode::Received);
        assert_eq!(s.log_bytes, 8 << 20);
        assert_eq!(s.queues, 4);
        std::fs::write(&cfg, "volume = \"v.img\"\ncolour = \"blue\"\n").unwrap();
        assert!(err(&args).contains("colour"));
    }
}
