//! `ublk-mirror start`: the daemon. It serves /dev/ublkbN over the local volume, mirrors every
//! write to the target through the replicator and answers the control socket.
//!
//! Configuration: a TOML file (`--config`) whose keys are the flags' names in snake_case; flags
//! override the file; relative paths in the file are relative to its directory.
//!
//! Order of start-up, so that a failure leaves nothing behind: validate; lock the local volume;
//! private mount namespace and blocked termination signals (before any thread exists); the
//! replicator on its own tokio runtime, which must complete a handshake with the target within
//! `--connect-timeout-secs`; the control socket; the ublk device. On SIGTERM/SIGINT/SIGHUP or a
//! `stop` request: STOP_DEV (the kernel drains the requests in flight), wait (bounded by
//! `--stop-drain-secs`) until the target holds every operation, stop the replicator, delete the
//! device, remove the socket.
//!
//! Without `--foreground`, `start` runs the daemon as a child process in its own process group
//! (output to `--log-file`), waits until its device is live and returns; if the child fails, its
//! error line is reported.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use mirror_core::source::{LockStyle, Mode, SourceConfig};
use mirror_core::{parse_size, Generation, NodeId, Seq, Size, VolumeId};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::{client, Request, Response, StatusReport, LINE_BYTES_MAX};
use crate::device::{self, Device, DeviceConfig, Started, TermSignals};
use crate::replicator::{self, Handle, ReplError, ReplicatorConfig};

/// Control connections served at once.
const CONTROL_CONNECTIONS_MAX: usize = 32;

/// Flags of `ublk-mirror start`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StartArgs {
    /// TOML file with the settings below (keys in snake_case; flags override it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The local volume: a file or a block device (must exist).
    #[arg(long, value_name = "PATH")]
    pub volume: Option<PathBuf>,
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
    log_file: Option<PathBuf>,
    node_id: Option<u64>,
    no_mirror: Option<bool>,
}

/// Where and how the daemon mirrors.
#[derive(Debug, Clone)]
struct MirrorSettings {
    peer: String,
    volume_id: VolumeId,
    secret_file: PathBuf,
    mode: Mode,
}

/// Validated settings of a daemon.
#[derive(Debug, Clone)]
pub struct Settings {
    name: String,
    volume: PathBuf,
    /// `None`: passthrough (`--no-mirror`).
    mirror: Option<MirrorSettings>,
    flush_replicates: bool,
    block_bytes: u32,
    queues: u16,
    depth: u16,
    log_bytes: u64,
    log_entries: usize,
    control_socket: PathBuf,
    dev_id: Option<u32>,
    connect_timeout: Duration,
    stop_drain: Duration,
    log_file: PathBuf,
    node_id: u64,
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
        let log_file =
            path_of(&args.log_file, file.log_file).unwrap_or_else(|| super::log_path(&name));
        Ok(Settings {
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
            log_file,
        })
    }

    /// Checks what can be checked without side effects: the volume and secret exist, the socket
    /// is not taken by a running daemon.
    fn preflight(&self) -> anyhow::Result<()> {
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
        if let Some(id) = self.dev_id {
            if Path::new(&format!("/dev/ublkc{id}")).exists() {
                bail!("device id {id} is already in use (/dev/ublkc{id} exists)");
            }
        }
        Ok(())
    }
}

fn read_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read secret file {}", path.display()))?;
    let secret = bytes.trim_ascii();
    if secret.is_empty() {
        bail!("secret file {} is empty", path.display());
    }
    Ok(secret.to_vec())
}

/// `ublk-mirror start`.
pub fn start(args: &StartArgs) -> anyhow::Result<()> {
    let settings = Settings::resolve(args)?;
    settings.preflight()?;
    if args.foreground {
        run_foreground(&settings)
    } else {
        spawn_background(&settings)
    }
}

fn spawn_background(s: &Settings) -> anyhow::Result<()> {
    if let Some(dir) = s.log_file.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    let log = File::create(&s.log_file)
        .with_context(|| format!("cannot create log file {}", s.log_file.display()))?;
    let log2 = log.try_clone().context("cannot duplicate the log file")?;
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let mut child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .arg("--foreground")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .context("cannot start the daemon process")?;
    let deadline = Instant::now() + s.connect_timeout + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().context("waiting for the daemon")? {
            let text = std::fs::read_to_string(&s.log_file).unwrap_or_default();
            let line = text
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("ublk-mirror: error: "))
                .map(str::to_string)
                .unwrap_or_else(|| {
                    format!(
                        "the daemon exited ({status}) before its device was ready; see {}",
                        s.log_file.display()
                    )
                });
            bail!("{line}");
        }
        if let Ok(resp) =
            client::request(&s.control_socket, &Request::Status, Duration::from_secs(2))
        {
            if let Some(st) = resp.status.filter(|st| st.device.is_some()) {
                println!(
                    "ublk-mirror: started '{}': {} (pid {}, peer {}, mode {}, log {})",
                    s.name,
                    st.device.unwrap_or_default(),
                    st.pid,
                    st.peer,
                    st.mode,
                    s.log_file.display()
                );
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the daemon did not become ready in time; see {}",
                s.log_file.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Opens the local volume for reading and writing, exclusively (O_EXCL for a block device, an
/// advisory lock for a file), and returns it with its usable size.
fn open_volume(s: &Settings) -> anyhow::Result<(File, u64)> {
    let meta = std::fs::metadata(&s.volume)
        .with_context(|| format!("cannot use volume {}", s.volume.display()))?;
    let is_block = meta.file_type().is_block_device();
    let mut opts = OpenOptions::new();
    opts.read(true).write(true);
    if is_block {
        opts.custom_flags(libc::O_EXCL);
    }
    let mut file = opts.open(&s.volume).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            anyhow!("volume {} is already in use (busy)", s.volume.display())
        } else {
            anyhow!("cannot open volume {}: {e}", s.volume.display())
        }
    })?;
    if !is_block && file.try_lock().is_err() {
        bail!(
            "volume {} is already in use (locked by another process)",
            s.volume.display()
        );
    }
    let size = file
        .seek(SeekFrom::End(0))
        .with_context(|| format!("cannot size volume {}", s.volume.display()))?;
    let block = u64::from(s.block_bytes);
    let usable = size - size % block;
    if usable == 0 {
        bail!(
            "volume {} ({size} bytes) is smaller than one {block}-byte block",
            s.volume.display()
        );
    }
    if usable != size {
        eprintln!(
            "ublk-mirror: warning: volume size {size} is not a multiple of {block}; using {usable} bytes"
        );
    }
    Ok((file, usable))
}

/// Shared between the socket server and the main thread.
struct DaemonState {
    s: Settings,
    volume_bytes: u64,
    /// `None`: passthrough (`--no-mirror`).
    repl: Option<Handle>,
    /// When the replicator started (its clock's origin, for the lag in seconds).
    epoch: tokio::time::Instant,
    device: Mutex<Option<Started>>,
    stopping: AtomicBool,
}

impl DaemonState {
    /// The mirror's handle, or the error every mirror request gets in passthrough.
    fn repl(&self) -> Result<&Handle, String> {
        self.repl
            .as_ref()
            .ok_or_else(|| "mirroring is off (the daemon was started with --no-mirror)".into())
    }

    /// What every status shares, mirror or not.
    fn base_status(&self) -> StatusReport {
        let device = self
            .device
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let phase = if self.stopping.load(Ordering::Relaxed) {
            "stopping"
        } else if device.is_some() {
            "running"
        } else {
            "starting"
        };
        StatusReport {
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            name: self.s.name.clone(),
            pid: std::process::id(),
            role: "primary".into(),
            phase: phase.into(),
            device: device.as_ref().map(|d| d.path.clone()),
            dev_id: device.as_ref().map(|d| d.dev_id),
            volume: self.s.volume.display().to_string(),
            volume_bytes: self.volume_bytes,
            block_bytes: self.s.block_bytes,
            flush_replicates: self.s.flush_replicates,
            ..StatusReport::default()
        }
    }

    async fn status(&self) -> Result<StatusReport, ReplError> {
        let (Some(repl), Some(m)) = (&self.repl, &self.s.mirror) else {
            return Ok(StatusReport {
                role: "passthrough".into(),
                peer: "-".into(),
                connection: "off".into(),
                mode: "off".into(),
                ..self.base_status()
            });
        };
        let st = repl.status().await?;
        let src = &st.source;
        let now_ns = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let lag_seconds = src
            .oldest_unconfirmed_ns
            .map_or(0.0, |t| now_ns.saturating_sub(t) as f64 / 1e9);
        Ok(StatusReport {
            peer: m.peer.clone(),
            connection: if st.fatal.is_some() {
                "failed".into()
            } else {
                src.conn.to_string()
            },
            mode: src.mode.to_string(),
            seq: super::SeqReport {
                last_local: src.last_local.0,
                sent: src.last_sent.0,
                received: src.received.0,
                durable: src.durable.0,
            },
            log: super::LogReport {
                entries: src.log_entries as u64,
                bytes: src.log_bytes as u64,
                bytes_max: src.log_bytes_max as u64,
                entries_max: self.s.log_entries as u64,
            },
            lag: super::LagReport {
                entries: src.last_local.0.saturating_sub(src.durable.0),
                bytes: src.log_bytes as u64,
                seconds: lag_seconds,
            },
            shipped: super::ShippedReport {
                frames: st.sent_frames,
                bytes: st.sent_bytes,
            },
            connects: st.connects,
            disconnects: st.disconnects,
            last_error: st.last_error.clone(),
            fatal: st.fatal.clone(),
            halted_at: src.halted_at.map(|s| s.0),
            ..self.base_status()
        })
    }

    async fn handle(&self, req: Request) -> Response {
        match req {
            Request::Status => match self.status().await {
                Ok(st) => Response {
                    ok: true,
                    status: Some(st),
                    ..Response::default()
                },
                Err(e) => Response::err(e.to_string()),
            },
            Request::SetMode { mode } => match (self.repl(), mode.parse::<Mode>()) {
                (Err(e), _) | (_, Err(e)) => Response::err(e),
                (Ok(repl), Ok(m)) => match repl.set_mode(m).await {
                    Ok(()) => {
                        eprintln!("ublk-mirror: mode set to {m}");
                        Response::ok()
                    }
                    Err(e) => Response::err(e.to_string()),
                },
            },
            Request::WaitReplicated { seq, timeout_secs } => {
                let repl = match self.repl() {
                    Ok(r) => r,
                    Err(e) => return Response::err(e),
                };
                let secs = timeout_secs.unwrap_or(60.0);
                if !(secs.is_finite() && (0.0..=86_400.0).contains(&secs)) {
                    return Response::err(format!("timeout {secs} s: must be 0 to 86400"));
                }
                let seq = match seq {
                    Some(n) => Seq(n),
                    None => match repl.status().await {
                        Ok(st) => st.source.last_local,
                        Err(e) => return Response::err(e.to_string()),
                    },
                };
                let wait = repl.wait_replicated(seq);
                match tokio::time::timeout(Duration::from_secs_f64(secs), wait).await {
                    Ok(Ok(())) => Response {
                        ok: true,
                        seq: Some(seq.0),
                        ..Response::default()
                    },
                    Ok(Err(e)) => Response::err(e.to_string()),
                    Err(_) => {
                        Response::err(format!("seq {} not replicated within {secs} s", seq.0))
                    }
                }
            }
            Request::Stop => {
                if !self.stopping.swap(true, Ordering::SeqCst) {
                    eprintln!("ublk-mirror: stop requested over the control socket");
                    TermSignals::raise_term();
                }
                Response::ok()
            }
        }
    }
}

async fn serve(listener: UnixListener, state: Arc<DaemonState>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONTROL_CONNECTIONS_MAX));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream); // too many clients: refuse by closing
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            serve_conn(stream, &state).await;
            drop(permit);
        });
    }
}

async fn serve_conn(stream: UnixStream, state: &DaemonState) {
    let (rd, mut wr) = stream.into_split();
    let limit = u64::try_from(LINE_BYTES_MAX).unwrap_or(u64::MAX);
    let mut rd = BufReader::new(rd.take(limit));
    let mut line = String::new();
    loop {
        line.clear();
        match rd.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let resp = if line.ends_with('\n') {
            match serde_json::from_str::<Request>(&line) {
                Ok(req) => state.handle(req).await,
                Err(e) => Response::err(format!("bad request: {e}")),
            }
        } else {
            Response::err(format!("request longer than {LINE_BYTES_MAX} bytes"))
        };
        let Ok(mut text) = serde_json::to_string(&resp) else {
            return;
        };
        text.push('\n');
        if wr.write_all(text.as_bytes()).await.is_err() {
            return;
        }
        if !line.ends_with('\n') {
            return;
        }
        // `take` bounds the whole connection: allow another full line.
        rd.get_mut().set_limit(limit);
    }
}

/// Removes the socket and device files on the way out.
struct Cleanup {
    socket: PathBuf,
    dev_file: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.dev_file);
    }
}

fn bind_socket(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    if client::is_live(path) {
        bail!(
            "control socket {} is already in use by a running daemon",
            path.display()
        );
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("cannot remove stale socket {}: {e}", path.display()),
    }
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("cannot bind control socket {}", path.display()))?;
    l.set_nonblocking(true)
        .context("cannot make the control socket non-blocking")?;
    Ok(l)
}

/// Starts the replicator and waits (bounded) for the first handshake.
fn start_mirror(
    runtime: &tokio::runtime::Runtime,
    s: &Settings,
    m: &MirrorSettings,
    volume_bytes: u64,
) -> anyhow::Result<(Handle, tokio::task::JoinHandle<()>)> {
    let secret = read_secret(&m.secret_file)?;
    let source = SourceConfig {
        volume_id: m.volume_id,
        node_id: NodeId(s.node_id),
        generation: Generation(1),
        volume_bytes,
        block_bytes: s.block_bytes,
        secret,
        mode: m.mode,
        flush_replicates: s.flush_replicates,
        lock_style: LockStyle::Implied,
        log_bytes_max: usize::try_from(s.log_bytes).unwrap_or(usize::MAX),
        log_entries_max: s.log_entries,
    };
    let cfg = ReplicatorConfig::new(m.peer.clone(), source);
    let (repl, repl_task) = {
        let _guard = runtime.enter();
        replicator::spawn(cfg)
    };
    eprintln!(
        "ublk-mirror: connecting to {} (up to {} s)",
        m.peer,
        s.connect_timeout.as_secs()
    );
    let connected = runtime
        .block_on(async { tokio::time::timeout(s.connect_timeout, repl.wait_connected()).await });
    match connected {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("cannot mirror to {}: {e}", m.peer),
        Err(_) => bail!(
            "cannot reach peer {} within {} s: {}",
            m.peer,
            s.connect_timeout.as_secs(),
            repl.last_error()
                .unwrap_or_else(|| "no handshake completed".into())
        ),
    }
    eprintln!("ublk-mirror: connected to {}", m.peer);
    Ok((repl, repl_task))
}

fn run_foreground(s: &Settings) -> anyhow::Result<()> {
    if let Some(m) = &s.mirror {
        read_secret(&m.secret_file)?;
    }
    let (volume, volume_bytes) = open_volume(s)?;
    // Both must happen while this is the only thread.
    device::private_mount_namespace()?;
    let signals = TermSignals::block();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ublk-mirror-net")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;

    let epoch = tokio::time::Instant::now();
    let mirror = match &s.mirror {
        Some(m) => Some(start_mirror(&runtime, s, m, volume_bytes)?),
        None => {
            eprintln!("ublk-mirror: mirroring is off (--no-mirror): passthrough to the volume");
            None
        }
    };
    let repl = mirror.as_ref().map(|(h, _)| h.clone());

    let listener = bind_socket(&s.control_socket)?;
    let _cleanup = Cleanup {
        socket: s.control_socket.clone(),
        dev_file: super::dev_file_path(&s.name),
    };
    let state = Arc::new(DaemonState {
        s: s.clone(),
        volume_bytes,
        repl: repl.clone(),
        epoch,
        device: Mutex::new(None),
        stopping: AtomicBool::new(false),
    });
    {
        let _guard = runtime.enter();
        let listener =
            UnixListener::from_std(listener).context("cannot serve the control socket")?;
        runtime.spawn(serve(listener, state.clone()));
    }

    let dev = Device::create(DeviceConfig {
        dev_id: s.dev_id,
        name: s.name.clone(),
        queues: s.queues,
        depth: s.depth,
        block_bytes: s.block_bytes,
        volume_bytes,
        flush_replicates: s.flush_replicates,
    })?;
    let stopper = dev.stopper();
    let stop_state = state.clone();
    std::thread::Builder::new()
        .name("ublk-mirror-sig".into())
        .spawn(move || {
            let sig = signals.wait();
            stop_state.stopping.store(true, Ordering::SeqCst);
            eprintln!("ublk-mirror: signal {sig}: stopping the device");
            if let Err(e) = stopper.stop() {
                eprintln!("ublk-mirror: {e}");
            }
        })
        .context("cannot start the signal thread")?;

    let started_state = state.clone();
    let dev_file = super::dev_file_path(&s.name);
    let run = dev.run(&volume, repl.clone(), move |started| {
        let _ = std::fs::write(&dev_file, format!("{}\n", started.dev_id));
        eprintln!(
            "ublk-mirror: device {} ready ({volume_bytes} bytes)",
            started.path
        );
        *started_state
            .device
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(started);
    });
    state.stopping.store(true, Ordering::SeqCst);
    if let Err(e) = &run {
        eprintln!("ublk-mirror: {e}");
    }
    let drained = match mirror {
        Some((repl, repl_task)) => {
            let drained = runtime.block_on(drain(&repl, s.stop_drain));
            let _ = runtime.block_on(repl.shutdown());
            let _ = runtime.block_on(repl_task);
            drained
        }
        None => {
            eprintln!("ublk-mirror: device stopped");
            Ok(())
        }
    };
    let deleted = dev.delete();
    match &deleted {
        Ok(()) => eprintln!("ublk-mirror: device deleted"),
        Err(e) => eprintln!("ublk-mirror: {e}"),
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    drop(volume);
    run?;
    deleted?;
    if let Err(e) = drained {
        bail!("stopped, but not every write reached the target: {e}");
    }
    Ok(())
}

/// After the device stopped, everything the host wrote is in the log: gives the target a bounded
/// time to get it all.
async fn drain(repl: &Handle, limit: Duration) -> anyhow::Result<()> {
    eprintln!("ublk-mirror: device stopped; waiting for the target to catch up");
    let last = repl.status().await.map(|st| st.source.last_local)?;
    let drained = match tokio::time::timeout(limit, repl.wait_replicated(last)).await {
        Ok(r) => r.map_err(anyhow::Error::from),
        Err(_) => Err(anyhow::anyhow!(
            "target did not catch up within {} s",
            limit.as_secs()
        )),
    };
    match &drained {
        Ok(()) => eprintln!(
            "ublk-mirror: target holds everything through seq {}",
            last.0
        ),
        Err(e) => eprintln!("ublk-mirror: warning: unreplicated writes are lost: {e}"),
    }
    drained
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
