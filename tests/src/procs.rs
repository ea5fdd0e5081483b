//! Running the real binaries: `target-server` and `ublk-mirror loadgen`, and checking files.
//!
//! The binaries are looked up, not built: the e2e tests assume the workspace binaries were built
//! first (`cargo build --release --workspace` or `cargo build --workspace --bins`, then
//! `cargo test --workspace`; building from inside a test would fight the outer cargo for the build
//! lock). The newest up-to-date binary of the test's profile and of `release` is used;
//! `TARGET_SERVER_BIN` and `UBLK_MIRROR_BIN` override the paths. A missing or stale binary (older
//! than its package's sources or mirror-core's) fails the test with a message that says how to
//! build it.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// The path of a workspace binary: `$env_var` if set; else the newest up-to-date one of
/// `<target-dir>/<profile>/<name>` (the running test's profile) and `<target-dir>/release/<name>`.
/// A binary older than its package's sources (or mirror-core's) counts as missing.
pub fn binary(name: &str, env_var: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("{env_var}={} is not a file", path.display());
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    // <target-dir>/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test executable path {}", exe.display()))?;
    let mut candidates = vec![profile_dir.join(name)];
    if let Some(target_dir) = profile_dir.parent() {
        let release = target_dir.join("release").join(name);
        if release != candidates[0] {
            candidates.push(release);
        }
    }
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    let mut problems = Vec::new();
    for path in candidates {
        let Ok(modified) = std::fs::metadata(&path).and_then(|m| m.modified()) else {
            problems.push(format!("{} is missing", path.display()));
            continue;
        };
        if let Some(stale) = newer_source(&path, &[name, "mirror-core"]) {
            problems.push(format!(
                "{} is older than {}",
                path.display(),
                stale.display()
            ));
            continue;
        }
        if best.as_ref().is_none_or(|(t, _)| modified > *t) {
            best = Some((modified, path));
        }
    }
    match best {
        Some((_, path)) => Ok(path),
        None => bail!(
            "no up-to-date {name} binary ({}): the e2e tests need the workspace binaries built \
             first (`cargo build --workspace --bins` or `cargo build --release --workspace`, \
             then `cargo test --workspace`), or set {env_var}",
            problems.join("; ")
        ),
    }
}

/// A source file of the workspace packages `packages` newer than `binary`, if any (the binary is
/// stale). Looks only under `<package>/src`; missing directories are skipped, and so are unit
/// test modules (`tests.rs`: no binary is built from them).
fn newer_source(binary: &Path, packages: &[&str]) -> Option<PathBuf> {
    let built = std::fs::metadata(binary).and_then(|m| m.modified()).ok()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let mut stack: Vec<PathBuf> = packages.iter().map(|p| root.join(p).join("src")).collect();
    let mut visited = 0;
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            visited += 1;
            if visited > 10_000 {
                return None;
            }
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs")
                && path.file_name().is_some_and(|n| n != "tests.rs")
            {
                let modified = entry.metadata().and_then(|m| m.modified()).ok()?;
                if modified > built {
                    return Some(path);
                }
            }
        }
    }
    None
}

/// The `target-server` binary.
pub fn target_server_bin() -> anyhow::Result<PathBuf> {
    binary("target-server", "TARGET_SERVER_BIN")
}

/// What `target-server status --json` says of the server answering on `socket`.
pub async fn secondary_status(socket: &Path) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(target_server_bin()?)
        .arg("status")
        .arg("--status-socket")
        .arg(socket)
        .arg("--json")
        .output()
        .await
        .context("running target-server status")?;
    anyhow::ensure!(
        out.status.success(),
        "target-server status failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The `ublk-mirror` binary.
pub fn ublk_mirror_bin() -> anyhow::Result<PathBuf> {
    binary("ublk-mirror", "UBLK_MIRROR_BIN")
}

/// How to start a target server.
#[derive(Debug, Clone)]
pub struct TargetServerOpts {
    /// Target volume file.
    pub volume: PathBuf,
    /// Create (or extend) the volume to this size.
    pub create_size: Option<u64>,
    /// 32 hex digits.
    pub volume_id: String,
    /// Shared secret file.
    pub secret_file: PathBuf,
    /// Logical block size.
    pub block_bytes: u32,
    /// Where the server's stderr goes (appended, so restarts keep earlier logs).
    pub stderr: PathBuf,
    /// `RUST_LOG` for the server.
    pub log: String,
    /// Its status socket (`--status-socket`).
    pub status_socket: PathBuf,
    /// Its `--before-resync` hook, if any.
    pub before_resync: Option<String>,
}

/// A running `target-server` process (killed when dropped).
#[derive(Debug)]
pub struct TargetServer {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Child,
    _stdout: BufReader<ChildStdout>,
}

impl TargetServer {
    /// Starts the server on a free loopback port and waits (at most 20 s) for its
    /// `target-server: listening on <addr>` line.
    pub async fn start(opts: &TargetServerOpts) -> anyhow::Result<TargetServer> {
        let bin = target_server_bin()?;
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&opts.stderr)
            .with_context(|| format!("opening {}", opts.stderr.display()))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--volume")
            .arg(&opts.volume)
            .arg("--volume-id")
            .arg(&opts.volume_id)
            .arg("--secret-file")
            .arg(&opts.secret_file)
            .arg("--block-bytes")
            .arg(opts.block_bytes.to_string());
        if let Some(size) = opts.create_size {
            cmd.arg("--create-size").arg(size.to_string());
        }
        cmd.arg("--status-socket").arg(&opts.status_socket);
        if let Some(hook) = &opts.before_resync {
            cmd.arg("--before-resync").arg(hook);
        }
        cmd.env("RUST_LOG", &opts.log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout from target-server"))?;
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(20), stdout.read_line(&mut line)).await;
        let addr = match read {
            Ok(Ok(n)) if n > 0 => line
                .trim()
                .strip_prefix("target-server: listening on ")
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .ok_or_else(|| anyhow!("unexpected first line from target-server: {line:?}"))?,
            _ => {
                let _ = child.start_kill();
                let log = std::fs::read_to_string(&opts.stderr).unwrap_or_default();
                bail!("target-server did not report its address; stderr:\n{log}");
            }
        };
        Ok(TargetServer {
            addr,
            child,
            _stdout: stdout,
        })
    }

    /// The process id.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// `kill -9` and wait for the process to be gone.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.start_kill().context("kill -9 target-server")?;
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .context("target-server did not die")??;
        Ok(())
    }

    /// SIGTERM (a graceful stop) and wait at most `timeout`; then `kill -9`.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                self.kill9().await?;
                bail!("target-server ignored SIGTERM for {timeout:?}")
            }
        }
    }
}

/// Output of a finished command.
#[derive(Debug)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

/// A `ublk-mirror loadgen` command line with `args`: stdout is captured, stderr too or (for a
/// run left alone in the background, whose pipe nobody drains) appended to `stderr_file`. The
/// process is killed if dropped.
pub fn loadgen(args: &[String], stderr_file: Option<&Path>) -> anyhow::Result<Command> {
    let bin = ublk_mirror_bin()?;
    let mut cmd = Command::new(bin);
    let stderr = match stderr_file {
        Some(path) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?,
        ),
        None => Stdio::piped(),
    };
    cmd.arg("loadgen")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true);
    Ok(cmd)
}

/// Waits for a spawned command at most `timeout` (then kills it and fails).
pub async fn finish(child: Child, timeout: Duration) -> anyhow::Result<Finished> {
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => {
            let out = out.context("waiting for the command")?;
            Ok(Finished {
                status: out.status,
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
        // Dropping the future dropped the child, which kill_on_drop kills.
        Err(_) => bail!("command did not finish within {timeout:?}"),
    }
}

/// Runs `ublk-mirror loadgen args` to completion within `timeout`.
pub async fn run_loadgen(args: &[String], timeout: Duration) -> anyhow::Result<Finished> {
    let child = loadgen(args, None)?
        .spawn()
        .context("starting ublk-mirror")?;
    finish(child, timeout).await
}

/// One line of a loadgen `--ack-log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Sequence number.
    pub seq: u64,
    /// First block.
    pub first_block: u64,
    /// Blocks.
    pub blocks: u64,
    /// CRC32C of the data.
    pub crc: u32,
}

/// Parses an ack log; an unterminated last line (a write in progress) is ignored.
pub fn read_ack_log(path: &Path) -> anyhow::Result<Vec<Ack>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [seq, first, n, crc] = f.as_slice() else {
                bail!("bad ack log line {line:?}");
            };
            Ok(Ack {
                seq: seq.parse()?,
                first_block: first.parse()?,
                blocks: n.parse()?,
                crc: u32::from_str_radix(crc, 16)?,
            })
        })
        .collect()
}

/// Checks that `image` holds every acknowledged write (by CRC32C); returns the missing ones.
pub fn missing_acks(image: &Path, acks: &[Ack], block_bytes: u64) -> anyhow::Result<Vec<Ack>> {
    use std::os::unix::fs::FileExt;
    let f = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let mut missing = Vec::new();
    for ack in acks {
        let len = usize::try_from(ack.blocks * block_bytes)?;
        let mut buf = vec![0u8; len];
        let ok = f
            .read_exact_at(&mut buf, ack.first_block * block_bytes)
            .is_ok()
            && crc32c::crc32c(&buf) == ack.crc;
        if !ok {
            missing.push(*ack);
        }
    }
    Ok(missing)
}
