//! The daemon's start and stop, in the foreground or as a background child.
//!
//! Order of start-up, so that a failure leaves nothing behind: validate; lock the local volume;
//! private mount namespace and blocked termination signals (before any thread exists); the
//! replicator on its own tokio runtime, which must complete a handshake with the target within
//! `--connect-timeout-secs` (the replicator's link stops replication when that passes); the
//! control socket; the ublk device. On SIGTERM/SIGINT/SIGHUP or a `stop` request: STOP_DEV (the
//! kernel drains the requests in flight), the link's drain (until the target holds every
//! operation, bounded by `--stop-drain-secs`), stop the replicator, delete the device, remove the
//! socket. How long to wait is this file's setting; when a wait is over is mirror-core's
//! [`PeerLink`](mirror_core::node::PeerLink)'s decision.
//!
//! Without `--foreground`, `start` runs the daemon as a child process in its own process group
//! (output to `--log-file`), waits until its device is live and returns; if the child fails, its
//! error line is reported.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mirror_core::meta::MetaRecord;
use mirror_core::node::PrimaryStart;
use mirror_core::source::{LockStyle, SourceConfig, SourceError};
use mirror_core::NodeId;
use mirror_core::Seq;
use tokio::net::UnixListener;

use super::config::{read_secret, MirrorSettings, Settings, StartArgs};
use super::control::{bind_socket, serve, DaemonState};
use super::{client, DevRecord, Request};
use crate::device::{self, Device, DeviceConfig, TermSignals};
use crate::replicator::{self, Handle, ReplError, ReplicatorConfig, Started};
use crate::volume::{open_passthrough, open_volume, LocalVolume, PrimaryStartup};

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

/// Starts the replicator and waits (bounded) for the first handshake.
fn start_mirror(
    runtime: &tokio::runtime::Runtime,
    s: &Settings,
    m: &MirrorSettings,
    volume: &LocalVolume,
    start: PrimaryStartup,
) -> anyhow::Result<(Handle, tokio::task::JoinHandle<()>)> {
    let PrimaryStartup {
        restored,
        running,
        intent,
    } = start;
    let secret = read_secret(&m.secret_file)?;
    let volume_bytes = volume.bytes;
    match restored.kind {
        PrimaryStart::Resumed if restored.confirmed > Seq::NONE => eprintln!(
            "ublk-mirror: resuming after a clean stop: the target held everything through seq {}",
            restored.confirmed.0
        ),
        PrimaryStart::Crashed => eprintln!(
            "ublk-mirror: the last run did not stop cleanly: resyncing the {} chunks its write \
             intent recorded before taking host I/O",
            intent.as_ref().map_or(0, |i| i.stored.dirty_chunks())
        ),
        _ => {}
    }
    let source = SourceConfig {
        volume_id: m.volume_id,
        node_id: NodeId(s.node_id),
        gen_ids: running.gen_ids,
        volume_bytes,
        block_bytes: s.block_bytes,
        secret,
        mode: m.mode,
        flush_replicates: s.flush_replicates,
        lock_style: LockStyle::Implied,
        log_bytes_max: usize::try_from(s.log_bytes).unwrap_or(usize::MAX),
        log_entries_max: s.log_entries,
    };
    let cfg = ReplicatorConfig {
        connect_deadline: Some(s.connect_timeout),
        meta: running,
        overflow: s.overflow,
        resync_rate_bytes_per_s: s.resync_rate_bytes_per_s,
        intent_keep_bytes: Some(s.intent_keep_bytes),
        resync_throttle: s.resync_throttle,
        host_ops_max: usize::from(s.queues) * usize::from(s.depth),
        ..ReplicatorConfig::new(m.peer.clone(), source)
    };
    let intent = volume.intent_setup(&s.volume, intent, restored)?;
    let (repl, repl_task) = {
        let _guard = runtime.enter();
        replicator::spawn_primary(cfg, intent)
    };
    eprintln!(
        "ublk-mirror: connecting to {} (up to {} s)",
        m.peer,
        s.connect_timeout.as_secs()
    );
    match runtime.block_on(repl.wait_connected()) {
        Ok(Started::Connected) => eprintln!("ublk-mirror: connected to {}", m.peer),
        Ok(Started::Degraded { secs }) => eprintln!(
            "ublk-mirror: no handshake with {} within {secs} s: starting DEGRADED (the last run \
             stopped cleanly, so the target held this volume's data then); writes are logged \
             and shipped once it answers ({} mode: {})",
            m.peer,
            m.mode,
            if m.mode == mirror_core::source::Mode::Async {
                "they complete locally; a full rollback log makes them wait"
            } else {
                "they wait for the target"
            }
        ),
        Err(ReplError::Fatal(SourceError::Unreachable { secs })) => bail!(
            "cannot reach peer {} within {secs} s: {}",
            m.peer,
            repl.last_error()
                .unwrap_or_else(|| "no handshake completed".into())
        ),
        Err(e) => bail!("cannot mirror to {}: {e}", m.peer),
    }
    // The engine stored the running record (not clean) at the handshake or the degraded start:
    // from here on the host may write, and a crash is never taken for a clean stop.
    if let Ok(Some(resync)) = runtime.block_on(repl.status()).map(|s| s.resync) {
        if resync.full {
            eprintln!(
                "ublk-mirror: the target holds none of this volume's data (a new or replaced \
                 volume): copying all {} bytes to it; host I/O waits until the copy is in the log",
                resync.total_bytes
            );
        }
    }
    Ok((repl, repl_task))
}

fn run_foreground(s: &Settings) -> anyhow::Result<()> {
    if let Some(m) = &s.mirror {
        read_secret(&m.secret_file)?;
    }
    // What this start trusts is decided right after the open: a file the open grew gets its
    // record before anything else can fail.
    let (local, restored) = match &s.mirror {
        Some(m) => {
            let local = open_volume(&s.volume, s.block_bytes, s.create_bytes)?;
            let restored =
                local.restore_primary(&s.volume, m.volume_id, NodeId(s.node_id), s.new_sequence)?;
            (local, Some(restored))
        }
        None => {
            let local = open_passthrough(&s.volume, s.block_bytes)?;
            local.start_passthrough(&s.volume)?;
            (local, None)
        }
    };
    let volume_bytes = local.bytes;
    // Both must happen while this is the only thread.
    device::private_mount_namespace()?;
    let signals = TermSignals::block()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ublk-mirror-net")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;

    let epoch = tokio::time::Instant::now();
    let mirror = match &s.mirror {
        Some(m) => {
            let restored = restored.context("a mirrored start restores its record")?;
            Some(start_mirror(&runtime, s, m, &local, restored)?)
        }
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
    let state = Arc::new(DaemonState::new(
        s.clone(),
        volume_bytes,
        repl.clone(),
        epoch,
    ));
    {
        let _guard = runtime.enter();
        let listener =
            UnixListener::from_std(listener).context("cannot serve the control socket")?;
        runtime.spawn(serve(listener, state.clone()));
    }

    let dev_cfg = DeviceConfig {
        dev_id: s.dev_id,
        name: s.name.clone(),
        queues: s.queues,
        depth: s.depth,
        block_bytes: s.block_bytes,
        volume_bytes,
        flush_replicates: s.flush_replicates,
    };
    let dev = match left_behind(s)? {
        Some(id) => {
            eprintln!(
                "ublk-mirror: taking over /dev/ublkb{id}, left quiesced by a daemon that died \
                 (the I/O it held goes on)"
            );
            Device::recover(id, dev_cfg)?
        }
        None => Device::create(dev_cfg)?,
    };
    let stopper = dev.stopper();
    let stop_state = state.clone();
    std::thread::Builder::new()
        .name("ublk-mirror-sig".into())
        .spawn(move || {
            let sig = signals.wait();
            stop_state.set_stopping();
            eprintln!("ublk-mirror: signal {sig}: stopping the device");
            if let Err(e) = stopper.stop() {
                eprintln!("ublk-mirror: {e}");
            }
        })
        .context("cannot start the signal thread")?;

    let started_state = state.clone();
    let dev_file = super::dev_file_path(&s.name);
    let volume_path = absolute(&s.volume);
    let record = move |id| DevRecord {
        id,
        volume: Some(volume_path.clone()),
    };
    let run = dev.run(&local.file, repl.clone(), move |started| {
        let _ = std::fs::write(&dev_file, record(started.dev_id).to_text());
        eprintln!(
            "ublk-mirror: device {} ready ({volume_bytes} bytes)",
            started.path
        );
        started_state.set_started(started);
    });
    state.set_stopping();
    if let Err(e) = &run {
        eprintln!("ublk-mirror: {e}");
    }
    let drained = match mirror {
        Some((repl, repl_task)) => {
            let drained = runtime
                .block_on(drain(&repl, s.stop_drain))
                .and_then(|clean| {
                    local.store(&s.volume, &clean)?;
                    eprintln!(
                        "ublk-mirror: recorded a clean stop at seq {}",
                        clean.durable.0
                    );
                    Ok(())
                });
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
    drop(local);
    run?;
    deleted?;
    if let Err(e) = drained {
        bail!("stopped, but not every write reached the target: {e:#}");
    }
    Ok(())
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The device the last daemon of this name left behind, if it waits quiesced for this one
/// (ublk user recovery after a crash). One it left serving another volume, or one no longer
/// quiesced, is refused rather than taken: the operator deletes it.
fn left_behind(s: &Settings) -> anyhow::Result<Option<u32>> {
    let Some(left) = DevRecord::read(&s.name) else {
        return Ok(None);
    };
    let id = left.id;
    if !Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists() {
        let _ = std::fs::remove_file(super::dev_file_path(&s.name));
        return Ok(None);
    }
    let volume = absolute(&s.volume);
    if left.volume.as_deref() != Some(volume.as_path()) {
        bail!(
            "/dev/ublkb{id}, left by the last daemon named '{}', served {}, not {}: \
             `ublk-mirror delete --name {}` removes it (the I/O it holds fails)",
            s.name,
            left.volume.as_ref().map_or_else(
                || "an unrecorded volume".to_string(),
                |v| v.display().to_string()
            ),
            volume.display(),
            s.name
        );
    }
    if !device::is_quiesced(id) {
        bail!(
            "/dev/ublkb{id}, left by the last daemon named '{}', is not waiting for a new \
             daemon: `ublk-mirror delete --name {}` removes it",
            s.name,
            s.name
        );
    }
    Ok(Some(id))
}

/// After the device stopped, everything the host wrote is in the log: gives the target a bounded
/// time to get it all.
async fn drain(repl: &Handle, limit: Duration) -> anyhow::Result<MetaRecord> {
    eprintln!("ublk-mirror: device stopped; waiting for the target to catch up");
    let drained = repl.drain(limit).await;
    match &drained {
        Ok(clean) => eprintln!(
            "ublk-mirror: target holds everything through seq {}",
            clean.durable.0
        ),
        Err(e) => eprintln!(
            "ublk-mirror: warning: unreplicated writes are lost: {e}; the next start refuses \
             this volume until it is resynced"
        ),
    }
    drained.map_err(anyhow::Error::from)
}
