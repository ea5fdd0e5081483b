//! The admin subcommands of `ublk-mirror` (flattened into the binary's command enum).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use super::client::{self, ClientError};
use super::config::StartArgs;
use super::{Request, Response, StatusReport};

/// Which daemon a command talks to.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Target {
    /// Daemon name [default: mirror].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Control socket [default: /run/ublk-mirror/NAME.sock].
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
}

impl Target {
    fn name(&self) -> anyhow::Result<String> {
        let name = self.name.clone().unwrap_or_else(|| "mirror".into());
        super::check_name(&name).map_err(|e| anyhow!("--name: {e}"))?;
        Ok(name)
    }

    fn socket(&self) -> anyhow::Result<PathBuf> {
        match &self.control_socket {
            Some(p) => Ok(p.clone()),
            None => Ok(super::socket_path(&self.name()?)),
        }
    }
}

/// `ublk-mirror status` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    target: Target,
    /// Print the status as one JSON object.
    #[arg(long)]
    json: bool,
    /// Print it again every SECS seconds (decimals allowed, at least 0.01) until interrupted or
    /// the daemon goes away; with --json, one compact JSON object per line.
    #[arg(long, value_name = "SECS", value_parser = parse_interval)]
    watch: Option<Duration>,
    /// With --watch: stop after N reports.
    #[arg(long, value_name = "N", requires = "watch",
          value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
}

/// `--watch SECS`: a positive, finite number of seconds, from 0.01 to one day.
fn parse_interval(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(secs) if (0.01..=86_400.0).contains(&secs) => Ok(Duration::from_secs_f64(secs)),
        _ => Err(format!(
            "'{s}' is not a number of seconds from 0.01 to 86400"
        )),
    }
}

/// `ublk-mirror set-mode` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SetModeArgs {
    /// async, received, sync or lock-then-write.
    mode: String,
    #[command(flatten)]
    target: Target,
}

/// `ublk-mirror wait-replicated` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// Sequence number, or `last` for the last operation submitted so far.
    seq: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    timeout_secs: f64,
    #[command(flatten)]
    target: Target,
}

/// `ublk-mirror stop` / `delete` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct StopArgs {
    #[command(flatten)]
    target: Target,
    /// Wait at most this long for the daemon to exit.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

/// `ublk-mirror list` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// Print one JSON object per daemon.
    #[arg(long)]
    json: bool,
}

/// The admin subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AdminCommand {
    /// Starts the daemon: /dev/ublkbN over the local volume, mirrored to the peer.
    Start(Box<StartArgs>),
    /// Shows a daemon's role, peer, connection, mode, sequence numbers, log fill and lag.
    Status(StatusArgs),
    /// Changes the acknowledgement mode of a running daemon.
    SetMode(SetModeArgs),
    /// Waits until the target holds an operation (applied and durable).
    WaitReplicated(WaitArgs),
    /// Stops a daemon: its device is drained and deleted, the daemon exits.
    Stop(StopArgs),
    /// Lists the daemons whose control sockets exist in /run/ublk-mirror.
    List(ListArgs),
    /// Stops a daemon and removes its device, also one left behind by a daemon that died.
    Delete(StopArgs),
}

impl AdminCommand {
    /// Runs the command.
    pub fn run(&self) -> anyhow::Result<()> {
        match self {
            AdminCommand::Start(a) => super::start(a),
            AdminCommand::Status(a) => status(a),
            AdminCommand::SetMode(a) => set_mode(a),
            AdminCommand::WaitReplicated(a) => wait_replicated(a),
            AdminCommand::Stop(a) => stop(a).map(|_| ()),
            AdminCommand::List(a) => list(a),
            AdminCommand::Delete(a) => delete(a),
        }
    }
}

fn ask(socket: &Path, req: &Request, timeout: Duration) -> anyhow::Result<Response> {
    let resp = client::request(socket, req, timeout)?;
    if !resp.ok {
        bail!(
            "{}",
            resp.error.unwrap_or_else(|| "the daemon refused".into())
        );
    }
    Ok(resp)
}

fn fetch_status(socket: &Path) -> anyhow::Result<StatusReport> {
    ask(socket, &Request::Status, Duration::from_secs(10))?
        .status
        .ok_or_else(|| anyhow!("the daemon sent no status"))
}

fn status(a: &StatusArgs) -> anyhow::Result<()> {
    let socket = a.target.socket()?;
    if let Some(every) = a.watch {
        return watch_status(
            &socket,
            a.json,
            every,
            a.count,
            &mut std::io::stdout().lock(),
        );
    }
    let st = fetch_status(&socket)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", format_status(&st));
    }
    Ok(())
}

/// `status --watch`: a report every `every` (on a fixed schedule: a slow answer shortens the next
/// wait, and one later than a whole interval starts the schedule again rather than bursting),
/// `count` of them or until the daemon cannot be asked. JSON reports are one line each; tables are
/// separated by a blank line.
fn watch_status(
    socket: &Path,
    json: bool,
    every: Duration,
    count: Option<u64>,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let mut next = Instant::now();
    let mut printed = 0u64;
    loop {
        let st = fetch_status(socket)?;
        if json {
            writeln!(out, "{}", serde_json::to_string(&st)?)?;
        } else {
            if printed > 0 {
                writeln!(out)?;
            }
            write!(out, "{}", format_status(&st))?;
        }
        out.flush()?;
        printed += 1;
        if count.is_some_and(|n| printed >= n) {
            return Ok(());
        }
        next += every;
        let now = Instant::now();
        match next.checked_duration_since(now) {
            Some(wait) => std::thread::sleep(wait),
            None => next = now,
        }
    }
}

/// The overflow rule, then what is out of sync now.
fn overflow_row(o: &crate::admin::OverflowReport) -> String {
    let rule = if o.enabled {
        let rate = o
            .resync_rate_bytes_per_s
            .map_or(String::new(), |r| format!("; resync at most {r} B/s"));
        format!(
            "on (a full log, or {} s without the peer; sync: {}{rate})",
            o.after_secs, o.sync_peer_gone
        )
    } else {
        "off (a full log holds writes back)".to_string()
    };
    let pace = match o.converging {
        Some(true) => "; resyncing",
        Some(false) if o.throttle => {
            "; NOT CONVERGING: no fewer chunks out of sync for 30 s: host writes are throttled"
        }
        Some(false) => {
            "; NOT CONVERGING: no fewer chunks out of sync for 30 s (the host dirties them as \
             fast as the link copies them; --resync-throttle slows the host instead)"
        }
        None => "",
    };
    match &o.cause {
        Some(cause) => format!(
            "{rule}; OVERFLOWING ({cause}): {} chunks out of sync, {} writes since the start{pace}",
            o.out_of_sync_chunks, o.out_of_sync_writes
        ),
        None => format!(
            "{rule}; {} writes out of sync since the start",
            o.out_of_sync_writes
        ),
    }
}

/// `[#####-----]  50%`: how much of `total` is `done`.
fn progress_bar(done: u64, total: u64) -> String {
    const WIDTH: u64 = 20;
    let filled = if total == 0 {
        WIDTH
    } else {
        u64::try_from(u128::from(done.min(total)) * u128::from(WIDTH) / u128::from(total))
            .unwrap_or(WIDTH)
    };
    let pct = if total == 0 {
        100
    } else {
        u128::from(done.min(total)) * 100 / u128::from(total)
    };
    let bar: String = (0..WIDTH)
        .map(|i| if i < filled { '#' } else { '-' })
        .collect();
    format!("[{bar}] {pct:>3}%")
}

fn opt(s: Option<&String>) -> &str {
    s.map_or("-", String::as_str)
}

/// The human-readable status table.
#[must_use]
pub fn format_status(st: &StatusReport) -> String {
    let pct = if st.log.bytes_max > 0 {
        st.log.bytes as f64 * 100.0 / st.log.bytes_max as f64
    } else {
        0.0
    };
    let rows = [
        (
            "device",
            format!(
                "{} (name {}, pid {}, {})",
                st.device.as_deref().unwrap_or("-"),
                st.name,
                st.pid,
                st.phase
            ),
        ),
        ("role", st.role.clone()),
        (
            "volume",
            format!(
                "{} ({} bytes, {}-byte blocks)",
                st.volume, st.volume_bytes, st.block_bytes
            ),
        ),
        (
            "peer",
            format!(
                "{} ({}; {} connects, {} disconnects)",
                st.peer, st.connection, st.connects, st.disconnects
            ),
        ),
        (
            "peer data",
            opt(Some(&st.peer_data).filter(|s| !s.is_empty())).to_string(),
        ),
        (
            "mode",
            format!(
                "{} (flushes replicate: {})",
                st.mode,
                if st.flush_replicates { "yes" } else { "no" }
            ),
        ),
        (
            "seq",
            format!(
                "last_local {}  sent {}  received {}  durable {}",
                st.seq.last_local, st.seq.sent, st.seq.received, st.seq.durable
            ),
        ),
        (
            "log",
            format!(
                "{} entries (max {}), {} bytes (max {}, {pct:.1} %)",
                st.log.entries, st.log.entries_max, st.log.bytes, st.log.bytes_max
            ),
        ),
        (
            "lag",
            format!(
                "{} entries, {} bytes, {:.3} s",
                st.lag.entries, st.lag.bytes, st.lag.seconds
            ),
        ),
        (
            "shipped",
            format!("{} frames, {} bytes", st.shipped.frames, st.shipped.bytes),
        ),
        (
            "generation",
            st.generation.as_ref().map_or_else(
                || "-".to_string(),
                |g| {
                    format!(
                        "{} (bitmap {}, history {})",
                        g.current,
                        g.bitmap,
                        g.history.join(" ")
                    )
                },
            ),
        ),
        (
            "intent",
            st.intent.as_ref().map_or_else(
                || "-".to_string(),
                |i| {
                    format!(
                        "{} chunks of {} KiB dirty, {} stored",
                        i.dirty_chunks,
                        i.chunk_bytes >> 10,
                        i.stored_chunks
                    )
                },
            ),
        ),
        (
            "resync",
            st.resync.as_ref().map_or_else(
                || "none".to_string(),
                |r| {
                    let pace = match (r.rate_bytes_per_s, r.eta_secs) {
                        (Some(rate), Some(eta)) => format!(", {rate} B/s, ETA {eta} s"),
                        _ => String::new(),
                    };
                    format!(
                        "{}{} {} of {} bytes durable on the target{pace}, {} sent (the target \
                         is not consistent until it ends)",
                        if r.full { "full: " } else { "" },
                        progress_bar(r.durable_bytes, r.total_bytes),
                        r.durable_bytes,
                        r.total_bytes,
                        r.submitted_bytes
                    )
                },
            ),
        ),
        (
            "overflow",
            st.overflow
                .as_ref()
                .map_or_else(|| "-".to_string(), overflow_row),
        ),
        ("last error", opt(st.last_error.as_ref()).to_string()),
        ("fatal", opt(st.fatal.as_ref()).to_string()),
    ];
    // Passthrough (--no-mirror): the mirror rows would only show zeroes.
    let shown = if st.connection == "off" {
        3
    } else {
        rows.len()
    };
    let mut out = String::new();
    for (k, v) in &rows[..shown] {
        out.push_str(&format!("{k:<11} {v}\n"));
    }
    if shown < rows.len() {
        out.push_str("mirror      off (started with --no-mirror)\n");
    }
    out
}

fn set_mode(a: &SetModeArgs) -> anyhow::Result<()> {
    // Check locally first for a clear message even without a daemon.
    a.mode
        .parse::<mirror_core::source::Mode>()
        .map_err(|e| anyhow!("{e}"))?;
    ask(
        &a.target.socket()?,
        &Request::SetMode {
            mode: a.mode.clone(),
        },
        Duration::from_secs(10),
    )?;
    println!("mode set to {}", a.mode);
    Ok(())
}

fn wait_replicated(a: &WaitArgs) -> anyhow::Result<()> {
    let seq = match a.seq.as_str() {
        "last" => None,
        text => Some(
            text.parse::<u64>()
                .map_err(|_| anyhow!("'{text}' is not a sequence number (or `last`)"))?,
        ),
    };
    if !(a.timeout_secs.is_finite() && (0.0..=86_400.0).contains(&a.timeout_secs)) {
        bail!("--timeout-secs {}: must be 0 to 86400", a.timeout_secs);
    }
    let resp = ask(
        &a.target.socket()?,
        &Request::WaitReplicated {
            seq,
            timeout_secs: Some(a.timeout_secs),
        },
        Duration::from_secs_f64(a.timeout_secs + 10.0),
    )?;
    println!("replicated through seq {}", resp.seq.unwrap_or_default());
    Ok(())
}

/// Asks the daemon to stop and waits until it is gone. Returns whether a daemon was running.
fn stop(a: &StopArgs) -> anyhow::Result<bool> {
    let socket = a.target.socket()?;
    match client::request(&socket, &Request::Stop, Duration::from_secs(10)) {
        Ok(resp) if resp.ok => {}
        Ok(resp) => bail!("{}", resp.error.unwrap_or_else(|| "stop refused".into())),
        Err(e @ ClientError::NotRunning { .. }) => return Err(e.into()),
        Err(e) => return Err(e).context("stop"),
    }
    let deadline = Instant::now() + Duration::from_secs(a.timeout_secs);
    while client::is_live(&socket) {
        if Instant::now() > deadline {
            bail!(
                "the daemon on {} did not exit within {} s",
                socket.display(),
                a.timeout_secs
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The daemon removes its socket right after it stops listening.
    let grace = Instant::now() + Duration::from_secs(5);
    while socket.exists() && Instant::now() < grace {
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("stopped");
    Ok(true)
}

fn delete(a: &StopArgs) -> anyhow::Result<()> {
    let name = a.target.name()?;
    let socket = a.target.socket()?;
    let mut did = false;
    if client::is_live(&socket) {
        stop(a)?;
        did = true;
    } else if socket.exists() {
        let _ = std::fs::remove_file(&socket);
    }
    let dev_file = super::dev_file_path(&name);
    if dev_file.exists() {
        if let Some(super::DevRecord { id, .. }) = super::DevRecord::read(&name) {
            if Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists() {
                crate::device::delete_stale(id)
                    .with_context(|| format!("cannot delete stale device /dev/ublkb{id}"))?;
                println!("deleted stale device /dev/ublkb{id}");
                did = true;
            }
        }
        let _ = std::fs::remove_file(&dev_file);
    }
    if !did {
        bail!(
            "no daemon or device named '{name}' (nothing on {})",
            socket.display()
        );
    }
    Ok(())
}

fn list(a: &ListArgs) -> anyhow::Result<()> {
    let dir = super::run_dir();
    let mut socks: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sock"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => bail!("cannot read {}: {e}", dir.display()),
    };
    socks.sort();
    if !a.json {
        println!(
            "{:<16} {:<14} {:<9} {:<13} {:<16} {:>8} {:>10}",
            "NAME", "DEVICE", "PHASE", "CONNECTION", "MODE", "PID", "LAG"
        );
    }
    for sock in socks {
        let name = sock
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        match fetch_status(&sock) {
            Ok(st) if a.json => println!("{}", serde_json::to_string(&st)?),
            Ok(st) => println!(
                "{:<16} {:<14} {:<9} {:<13} {:<16} {:>8} {:>10}",
                st.name,
                st.device.as_deref().unwrap_or("-"),
                st.phase,
                st.connection,
                st.mode,
                st.pid,
                st.lag.entries
            ),
            Err(_) if a.json => println!(
                "{}",
                serde_json::json!({ "name": name, "phase": "not running" })
            ),
            Err(_) => println!(
                "{name:<16} {:<14} {:<9} (stale socket {})",
                "-",
                "dead",
                sock.display()
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    /// A control socket that answers `answers` status requests (one per connection, the report's
    /// `connects` counting them) and then closes.
    fn fake_daemon(dir: &Path, answers: u64) -> (PathBuf, std::thread::JoinHandle<()>) {
        let path = dir.join("fake.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            for n in 1..=answers {
                let (stream, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                assert_eq!(
                    serde_json::from_str::<Request>(&line).unwrap(),
                    Request::Status
                );
                let report = StatusReport {
                    name: "fake".into(),
                    connects: n,
                    ..StatusReport::default()
                };
                let resp = Response {
                    status: Some(report),
                    ..Response::ok()
                };
                let mut w = &stream;
                writeln!(w, "{}", serde_json::to_string(&resp).unwrap()).unwrap();
            }
        });
        (path, server)
    }

    /// The table says what a crash now would resync, and how far a resync under way got.
    #[test]
    fn the_status_table_shows_the_intent_and_a_resync() {
        let mut st = StatusReport {
            connection: "connected".into(),
            intent: Some(crate::admin::IntentReport {
                chunk_bytes: 64 << 10,
                dirty_chunks: 3,
                stored_chunks: 64,
            }),
            ..StatusReport::default()
        };
        let table = format_status(&st);
        assert!(
            table.contains("intent      3 chunks of 64 KiB dirty, 64 stored"),
            "{table}"
        );
        assert!(table.contains("resync      none"), "{table}");
        assert!(table.contains("peer data   -"), "{table}");
        st.peer_data = mirror_core::node::PeerData::Behind { ops: 3 }.to_string();
        assert!(
            format_status(&st).contains("peer data   behind by 3 operations"),
            "{}",
            format_status(&st)
        );
        st.generation = Some(
            mirror_core::genid::GenIds {
                current: mirror_core::Generation(0xab),
                ..mirror_core::genid::GenIds::NONE
            }
            .into(),
        );
        assert!(
            format_status(&st)
                .contains("generation  00000000000000ab (bitmap none, history none none)"),
            "{}",
            format_status(&st)
        );
        st.resync = Some(crate::admin::ResyncReport {
            full: false,
            total_bytes: 1 << 20,
            submitted_bytes: 1 << 19,
            durable_bytes: 1 << 18,
            rate_bytes_per_s: None,
            eta_secs: None,
        });
        let table = format_status(&st);
        assert!(
            table.contains(
                "resync      [#####---------------]  25% 262144 of 1048576 bytes durable on the \
                 target, 524288 sent"
            ),
            "{table}"
        );
        st.resync = st.resync.map(|r| crate::admin::ResyncReport {
            full: true,
            rate_bytes_per_s: Some(65536),
            eta_secs: Some(12),
            ..r
        });
        let table = format_status(&st);
        assert!(
            table.contains(
                "resync      full: [#####---------------]  25% 262144 of 1048576 bytes durable \
                 on the target, 65536 B/s, ETA 12 s"
            ),
            "{table}"
        );
        st.overflow = Some(crate::admin::OverflowReport {
            enabled: true,
            after_secs: 30,
            sync_peer_gone: "suspend".into(),
            resync_rate_bytes_per_s: None,
            cause: Some("the rollback log was full".into()),
            converging: None,
            out_of_sync_chunks: 7,
            out_of_sync_writes: 12,
            throttle: false,
            throttled_writes: 0,
        });
        let table = format_status(&st);
        assert!(
            table.contains(
                "overflow    on (a full log, or 30 s without the peer; sync: suspend); \
                 OVERFLOWING (the rollback log was full): 7 chunks out of sync, 12 writes"
            ),
            "{table}"
        );
        if let Some(o) = &mut st.overflow {
            o.resync_rate_bytes_per_s = Some(1 << 20);
            o.converging = Some(false);
        }
        let table = format_status(&st);
        assert!(
            table.contains("sync: suspend; resync at most 1048576 B/s); OVERFLOWING"),
            "{table}"
        );
        assert!(
            table.contains("12 writes since the start; NOT CONVERGING: no fewer chunks"),
            "{table}"
        );
    }

    #[test]
    fn status_watch_prints_count_json_lines_on_schedule() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, server) = fake_daemon(dir.path(), 3);
        let every = Duration::from_millis(50);
        let mut out = Vec::new();
        let t0 = Instant::now();
        watch_status(&socket, true, every, Some(3), &mut out).unwrap();
        let took = t0.elapsed();
        server.join().unwrap();
        let text = String::from_utf8(out).unwrap();
        let reports: Vec<StatusReport> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            reports.iter().map(|r| r.connects).collect::<Vec<_>>(),
            [1, 2, 3],
            "{text}"
        );
        assert!(took >= 2 * every, "3 reports 50 ms apart took {took:?}");
    }

    #[test]
    fn status_watch_fails_when_the_daemon_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, server) = fake_daemon(dir.path(), 2);
        let mut out = Vec::new();
        let err = watch_status(&socket, false, Duration::from_millis(10), None, &mut out)
            .unwrap_err()
            .to_string();
        server.join().unwrap();
        assert!(
            err.contains("talking to the daemon") || err.contains("no daemon"),
            "{err}"
        );
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text.matches("fake").count(),
            2,
            "two tables before the error: {text}"
        );
    }

    #[test]
    fn watch_intervals_are_checked() {
        assert_eq!(parse_interval("0.5"), Ok(Duration::from_millis(500)));
        for bad in ["0", "-1", "nan", "inf", "1e9", "x", ""] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}
