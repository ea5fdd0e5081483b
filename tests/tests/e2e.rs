//! End-to-end: `ublk-mirror loadgen` mirroring to a real `target-server` on loopback, through the
//! fault-injecting proxy.
//!
//! Needs the workspace binaries built first in the same profile:
//! `cargo build --workspace --bins && cargo test --workspace` (or set `UBLK_MIRROR_BIN` and
//! `TARGET_SERVER_BIN`). Every random test prints its seed; `E2E_SEED=<seed>` replays it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mirror_tests::procs::{
    self, missing_acks, read_ack_log, Finished, TargetServer, TargetServerOpts,
};
use mirror_tests::proxy::{FaultProxy, Faults};
use tempfile::TempDir;
use tokio::time::Instant;

const VOLUME_ID: &str = "0123456789abcdef0123456789abcdef";
const OTHER_VOLUME_ID: &str = "fedcba9876543210fedcba9876543210";
const LOADGEN_TIMEOUT: Duration = Duration::from_secs(120);

/// Files of one scenario in a temporary directory (kept when the scenario fails).
#[derive(Clone)]
struct Rig {
    dir: PathBuf,
    secret: PathBuf,
}

impl Rig {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn server_opts(&self, volume: &str, size: u64, block_bytes: u32) -> TargetServerOpts {
        TargetServerOpts {
            volume: self.path(volume),
            create_size: Some(size),
            volume_id: VOLUME_ID.to_string(),
            secret_file: self.secret.clone(),
            block_bytes,
            stderr: self.path(&format!("{volume}.server.log")),
            log: "info".to_string(),
            status_socket: self.path(&format!("{volume}.status.sock")),
            before_resync: None,
        }
    }

    /// The last lines of every log in the directory.
    fn dump_logs(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!("---- {} (last {} lines)", path.display(), tail.len());
                for line in tail {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// Runs a scenario in a fresh directory; on failure prints the logs, keeps the directory and
/// panics with the error and the seed.
async fn scenario<F, Fut>(name: &str, f: F)
where
    F: FnOnce(Rig, u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let seed = mirror_tests::seed();
    println!("{name}: seed {seed} (replay with E2E_SEED={seed})");
    let tmp = TempDir::new().expect("tempdir");
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "e2e shared secret\n").expect("secret");
    let rig = Rig {
        dir: tmp.path().to_owned(),
        secret,
    };
    let started = Instant::now();
    let result = f(rig.clone(), seed).await;
    println!("{name}: {:.1} s", started.elapsed().as_secs_f64());
    if let Err(e) = result {
        rig.dump_logs();
        let kept = tmp.keep();
        panic!(
            "{name} failed (seed {seed}, files kept in {}): {e:#}",
            kept.display()
        );
    }
}

/// Stops a target server gracefully; it must exit with success.
async fn stop(server: &mut TargetServer) -> anyhow::Result<()> {
    let status = server.terminate(Duration::from_secs(20)).await?;
    anyhow::ensure!(status.success(), "target-server exited with {status}");
    Ok(())
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_string()).collect()
}

/// The loadgen arguments every scenario passes (its volume, the peer, the pair's identity and
/// the mode), then `rest`.
fn loadgen_args(
    rig: &Rig,
    source: &Path,
    volume_bytes: u64,
    (peer, mode): (&str, &str),
    rest: &[&str],
) -> Vec<String> {
    let mut list = args(&[
        "--volume",
        source.to_str().unwrap_or_default(),
        "--volume-bytes",
        &volume_bytes.to_string(),
        "--peer",
        peer,
        "--volume-id",
        VOLUME_ID,
        "--secret-file",
        rig.secret.to_str().unwrap_or_default(),
        "--mode",
        mode,
    ]);
    list.extend(args(rest));
    list
}

fn summary(run: &Finished) -> anyhow::Result<serde_json::Value> {
    let line = run
        .stdout
        .lines()
        .last()
        .ok_or_else(|| anyhow::anyhow!("loadgen printed nothing"))?;
    Ok(serde_json::from_str(line)?)
}

fn check_success(run: &Finished, rig: &Rig, name: &str) -> anyhow::Result<serde_json::Value> {
    std::fs::write(rig.path(&format!("{name}.loadgen.log")), &run.stderr)?;
    if !run.status.success() {
        anyhow::bail!(
            "loadgen {name} failed ({}): {}",
            run.status,
            run.stderr.lines().last().unwrap_or("")
        );
    }
    let s = summary(run)?;
    anyhow::ensure!(s["replicated"] == true, "loadgen did not wait: {s}");
    Ok(s)
}

/// The source's data area equals the target's; both files are their data and its metadata area.
fn identical(source: &Path, target: &Path, data_bytes: u64) -> anyhow::Result<()> {
    let whole = data_bytes + mirror_core::meta::meta_area_bytes(data_bytes);
    let data = usize::try_from(data_bytes)?;
    let mut images = Vec::new();
    for path in [source, target] {
        let bytes = std::fs::read(path)?;
        anyhow::ensure!(
            bytes.len() as u64 == whole,
            "{} has {} bytes, not {data_bytes} data bytes and their metadata area",
            path.display(),
            bytes.len()
        );
        images.push(bytes);
    }
    if let Some(at) = images[0][..data]
        .iter()
        .zip(&images[1][..data])
        .position(|(x, y)| x != y)
    {
        anyhow::bail!(
            "{} and {} differ first at byte {at}",
            source.display(),
            target.display()
        );
    }
    Ok(())
}

/// (a) Thousands of random overlapping writes of mixed sizes, in each mode, through delay, a
/// bandwidth cap, random cuts and corruption: the files end byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_random_writes_under_faults_converge_in_every_mode() {
    scenario("random writes under faults", |rig, seed| async move {
        let modes = ["async", "received", "sync", "lock-then-write"];
        for (i, mode) in modes.iter().enumerate() {
            let seed = seed.wrapping_add(i as u64);
            let volume_bytes: u64 = 4 << 20;
            let name = format!("faults-{mode}");
            let mut server = TargetServer::start(&rig.server_opts(
                &format!("{name}.target"),
                volume_bytes,
                512,
            ))
            .await?;
            let faults = Faults {
                corrupt_prob: 0.005,
                cut_every: Some(Duration::from_millis(400)),
                ..Faults::none()
            }
            .with_delay(Duration::from_millis(1))
            .with_bandwidth(16 << 20);
            let proxy = FaultProxy::start("127.0.0.1:0", server.addr, faults, seed).await?;
            let source = rig.path(&format!("{name}.source"));
            let started = Instant::now();
            let run = procs::run_loadgen(
                &loadgen_args(
&rig,
&source,
volume_bytes,
(proxy.addr().to_string().as_str(), mode),
&[
                    "--block-bytes",
                    "512",
                    "--max-blocks",
                    "16",
                    "--ops",
                    "3000",
                    "--qd",
                    "8",
                    "--flush-every",
                    "250",
                    "--seed",
                    &seed.to_string(),
                    "--log-bytes-max",
                    "1M",
                    "--json",
                ]),
                LOADGEN_TIMEOUT,
            )
            .await?;
            let s = check_success(&run, &rig, &name)?;
            let stats = proxy.stats();
            println!(
                "mode {mode}: seed {seed}, {:.1} s, {} writes, {} flushes, connects {}, proxy {stats:?}",
                started.elapsed().as_secs_f64(),
                s["writes"],
                s["flushes"],
                s["connects"]
            );
            anyhow::ensure!(s["writes"] == 3000, "summary {s}");
            drop(proxy);
            stop(&mut server).await?;
            identical(&source, &rig.path(&format!("{name}.target")), volume_bytes)?;
        }
        Ok(())
    })
    .await;
}

/// Waits until loadgen's `--ack-log` holds `count` acknowledged writes (60 s at most).
async fn wait_acked(ack_log: &Path, count: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let acked = read_ack_log(ack_log).map(|a| a.len()).unwrap_or(0);
        if acked >= count {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {acked} of {count} writes acknowledged after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts loadgen in the background with `--distinct --ack-log` through a proxy to `server`, kills
/// the server with `kill -9` after each number of acknowledged writes in `kill_after`, checks
/// (for `sync`) that the killed server's image holds every acknowledged write, restarts it on the
/// same volume, and checks that the files end identical.
async fn kill_scenario(
    rig: Rig,
    seed: u64,
    mode: &str,
    kill_after: &[usize],
    faults: Faults,
    check_acks: bool,
) -> anyhow::Result<()> {
    let block: u64 = 512;
    let volume_bytes: u64 = 16 << 20;
    let opts = rig.server_opts("kill.target", volume_bytes, 512);
    let mut server = TargetServer::start(&opts).await?;
    let proxy = FaultProxy::start("127.0.0.1:0", server.addr, faults, seed).await?;
    let source = rig.path("kill.source");
    let ack_log = rig.path("acks.txt");
    let child = procs::loadgen(
        &loadgen_args(
            &rig,
            &source,
            volume_bytes,
            (proxy.addr().to_string().as_str(), mode),
            &[
                "--block-bytes",
                "512",
                "--max-blocks",
                "8",
                "--ops",
                "3000",
                "--qd",
                "8",
                "--distinct",
                "--ack-log",
                ack_log.to_str().unwrap_or_default(),
                "--seed",
                &seed.to_string(),
                "--json",
            ],
        ),
        Some(&rig.path("kill.loadgen.log")),
    )?
    .env("RUST_LOG", "info")
    .spawn()?;
    for (round, &after) in kill_after.iter().enumerate() {
        wait_acked(&ack_log, after)
            .await
            .map_err(|e| e.context(format!("round {round}")))?;
        server.kill9().await?;
        let acks = read_ack_log(&ack_log)?;
        if check_acks {
            let missing = missing_acks(&opts.volume, &acks, block)?;
            println!(
                "kill {round}: {} writes acknowledged, {} missing on the killed target",
                acks.len(),
                missing.len()
            );
            if !missing.is_empty() {
                anyhow::bail!(
                    "{} acknowledged writes are not on the target after kill -9, first {:?}",
                    missing.len(),
                    missing[0]
                );
            }
        } else {
            println!("kill {round}: {} writes acknowledged", acks.len());
        }
        // Let the source notice and retry against a dead upstream for a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        server = TargetServer::start(&opts).await?;
        proxy.set_upstream(server.addr);
    }
    let run = procs::finish(child, LOADGEN_TIMEOUT).await?;
    anyhow::ensure!(
        run.status.success(),
        "loadgen failed ({}), see kill.loadgen.log",
        run.status
    );
    let s = summary(&run)?;
    anyhow::ensure!(s["replicated"] == true, "loadgen did not wait: {s}");
    println!("loadgen: {s}");
    anyhow::ensure!(s["writes"] == 3000, "summary {s}");
    let acks = read_ack_log(&ack_log)?;
    anyhow::ensure!(acks.len() == 3000, "{} acks logged", acks.len());
    let missing = missing_acks(&opts.volume, &acks, block)?;
    anyhow::ensure!(
        missing.is_empty(),
        "{} writes missing at the end",
        missing.len()
    );
    drop(proxy);
    stop(&mut server).await?;
    identical(&source, &opts.volume, volume_bytes)
}

/// (b) `sync`: kill -9 of the target mid-run loses no acknowledged write; after a restart on the
/// same volume the run finishes and the files are identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_sync_kill9_of_the_target_loses_no_acknowledged_write() {
    scenario("sync kill -9", |rig, seed| async move {
        let faults = Faults::none().with_delay(Duration::from_millis(1));
        kill_scenario(rig, seed, "sync", &[500, 1800], faults, true).await
    })
    .await;
}

/// (c) `async`: kill -9 of the target while it lags behind; after a restart the files converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_async_kill9_of_the_target_converges() {
    scenario("async kill -9", |rig, seed| async move {
        // A rate cap keeps the target behind the acknowledged writes when it is killed.
        let faults = Faults::none()
            .with_delay(Duration::from_millis(1))
            .with_bandwidth(4 << 20);
        kill_scenario(rig, seed, "async", &[1000, 2500], faults, false).await
    })
    .await;
}

/// Issue 14's failure 4: kill -9 of the primary in `async` while the target lags behind (a rate
/// cap) lost the acknowledged writes the target lacked. The write intent stored before each
/// write reaches the local volume names their chunks: the restart resyncs them, and every write
/// acknowledged before the kill is on the target, the volumes identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_async_kill9_of_the_primary_loses_no_acknowledged_write() {
    scenario("primary kill -9", |rig, seed| async move {
        let block: u64 = 512;
        let volume_bytes: u64 = 16 << 20;
        let opts = rig.server_opts("pkill.target", volume_bytes, 512);
        let mut server = TargetServer::start(&opts).await?;
        let faults = Faults::none()
            .with_delay(Duration::from_millis(1))
            .with_bandwidth(2 << 20);
        let proxy = FaultProxy::start("127.0.0.1:0", server.addr, faults, seed).await?;
        let source = rig.path("pkill.source");
        let ack_log = rig.path("pkill.acks.txt");
        let run = |ops: &str, extra: &[&str]| {
            let mut list = loadgen_args(
                &rig,
                &source,
                volume_bytes,
                (proxy.addr().to_string().as_str(), "async"),
                &[
                    "--block-bytes",
                    "512",
                    "--max-blocks",
                    "8",
                    "--ops",
                    ops,
                    "--qd",
                    "16",
                    "--seed",
                    &seed.to_string(),
                    "--json",
                ],
            );
            list.extend(args(extra));
            list
        };
        let mut child = procs::loadgen(
            &run(
                "20000",
                &[
                    "--distinct",
                    "--ack-log",
                    ack_log.to_str().unwrap_or_default(),
                ],
            ),
            Some(&rig.path("pkill.loadgen.log")),
        )?
        .env("RUST_LOG", "info")
        .spawn()?;
        wait_acked(&ack_log, 2000).await?;
        child.kill().await?;
        let acks = read_ack_log(&ack_log)?;
        let lacked = missing_acks(&opts.volume, &acks, block)?;
        println!(
            "kill -9 of the primary: {} writes acknowledged, {} not on the target yet",
            acks.len(),
            lacked.len()
        );
        let restart = procs::run_loadgen(&run("0", &[]), LOADGEN_TIMEOUT).await?;
        let s = check_success(&restart, &rig, "restart after kill -9")?;
        anyhow::ensure!(s["replicated"] == true, "the restart did not drain: {s}");
        let missing = missing_acks(&opts.volume, &acks, block)?;
        anyhow::ensure!(
            missing.is_empty(),
            "{} of {} acknowledged writes are not on the target after the resync, first {:?}",
            missing.len(),
            acks.len(),
            missing[0]
        );
        drop(proxy);
        stop(&mut server).await?;
        identical(&source, &opts.volume, volume_bytes)
    })
    .await;
}

/// `list` with the value after `flag` replaced.
fn replace(mut list: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    if let Some(i) = list.iter().position(|a| a == flag) {
        list[i + 1] = value.to_string();
    }
    list
}

fn one_error_line(run: &Finished, expect: &str) -> anyhow::Result<()> {
    anyhow::ensure!(!run.status.success(), "loadgen succeeded: {}", run.stdout);
    let lines: Vec<&str> = run.stderr.lines().collect();
    anyhow::ensure!(
        lines.len() == 1,
        "expected one error line, got {}: {:?}",
        lines.len(),
        run.stderr
    );
    anyhow::ensure!(
        lines[0].starts_with("ublk-mirror: error: ") && lines[0].contains(expect),
        "error line {:?} does not mention {expect:?}",
        lines[0]
    );
    println!("{}", lines[0]);
    Ok(())
}

/// (e) Issue 14, failure 1: a primary restarted after a clean stop continues the sequence against
/// the target that holds it (before, the second run was refused: "target is ahead"); after a stop
/// that left writes the target may lack (here `--no-wait`: no drain), the restart is refused with
/// one line, and the target is never told a sequence that skips them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_a_primary_resumes_after_a_clean_stop_and_resyncs_after_an_unclean_one() {
    scenario("primary restart", |rig, seed| async move {
        let volume_bytes: u64 = 2 << 20;
        let mut server =
            TargetServer::start(&rig.server_opts("restart.target", volume_bytes, 4096)).await?;
        let source = rig.path("restart.source");
        let peer = server.addr.to_string();
        let run = |ops: &str, seed: u64, extra: &[&str]| {
            let mut list = loadgen_args(
                &rig,
                &source,
                volume_bytes,
                (peer.as_str(), "async"),
                &["--ops", ops, "--seed", &seed.to_string(), "--json"],
            );
            list.extend(args(extra));
            list
        };
        let t = Duration::from_secs(60);
        let first = procs::run_loadgen(&run("300", seed, &[]), t).await?;
        let s = check_success(&first, &rig, "first")?;
        // The new target holds none of the new volume's history: a full resync (a mark, 32
        // chunks, a mark) comes before the host's writes.
        anyhow::ensure!(s["last_seq"] == 300 + 34, "{s}");
        let second = procs::run_loadgen(&run("200", seed + 1, &[]), t).await?;
        let s = check_success(&second, &rig, "second")?;
        anyhow::ensure!(s["last_seq"] == 534, "the sequence continues: {s}");
        // Every write of both runs is on the target, none twice in another order.
        identical(&source, &rig.path("restart.target"), volume_bytes)?;

        // Exits without waiting for the target (an unclean stop): the restart resyncs the chunks
        // of its stored write intent before its own writes, and the volumes converge.
        let unclean = procs::run_loadgen(&run("50", seed + 2, &["--no-wait"]), t).await?;
        anyhow::ensure!(unclean.status.success(), "{}", unclean.stderr);
        let resynced = procs::run_loadgen(&run("10", seed + 3, &[]), t).await?;
        let s = check_success(&resynced, &rig, "after an unclean stop")?;
        // The target took between 534 (the clean stop) and 584 of the unclean run; the
        // sequence continues after that, with a bracket of at least one copy before the 10
        // writes. That the copies carried what the target lacked, `identical` proves.
        anyhow::ensure!(
            s["last_seq"].as_u64().is_some_and(|n| n >= 534 + 3 + 10),
            "the resync's writes come before the run's own: {s}"
        );
        identical(&source, &rig.path("restart.target"), volume_bytes)?;
        // A new sequence is a new history: a target holding the old one is refused, only a new
        // target takes it (copied in full).
        let ahead = procs::run_loadgen(&run("10", seed + 4, &["--new-sequence"]), t).await?;
        one_error_line(&ahead, "another history of this volume id")?;
        stop(&mut server).await?;
        let mut fresh =
            TargetServer::start(&rig.server_opts("restart2.target", volume_bytes, 4096)).await?;
        let list = replace(
            run("100", seed + 5, &["--new-sequence"]),
            "--peer",
            &fresh.addr.to_string(),
        );
        let again = procs::run_loadgen(&list, t).await?;
        let s = check_success(&again, &rig, "new-sequence")?;
        anyhow::ensure!(s["last_seq"] == 100 + 34, "{s}");
        stop(&mut fresh).await?;
        identical(&source, &rig.path("restart2.target"), volume_bytes)?;
        Ok(())
    })
    .await;
}

/// (f) Issue 14, failure 3: a primary volume full of data paired with a new target. Before, the
/// pair reported "in sync" while most bytes differed; now the first handshake finds the target
/// without the volume's history and the whole volume is copied before the host's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_a_new_target_gets_the_whole_volume_before_the_pair_counts_as_in_sync() {
    scenario("initial sync", |rig, seed| async move {
        let volume_bytes: u64 = 8 << 20;
        let source = rig.path("initial.source");
        let mut data = vec![0u8; usize::try_from(volume_bytes)?];
        let mut rng = fastrand::Rng::with_seed(seed);
        rng.fill(&mut data);
        std::fs::write(&source, &data)?;
        // The before-resync hook snapshots the target's data area before the copy reaches it.
        let (hook_log, snapshot) = (rig.path("hook.log"), rig.path("snapshot.img"));
        let opts = TargetServerOpts {
            before_resync: Some(format!(
                "printf '%s %s\\n' \"$UBLK_MIRROR_RESYNC\" \"$UBLK_MIRROR_SEQ\" >> '{}' && \
                 head -c {volume_bytes} \"$UBLK_MIRROR_VOLUME\" > '{}'",
                hook_log.display(),
                snapshot.display()
            )),
            ..rig.server_opts("initial.target", volume_bytes, 4096)
        };
        let mut server = TargetServer::start(&opts).await?;
        // The secondary's own status says what it holds, before and after.
        let st = procs::secondary_status(&opts.status_socket).await?;
        anyhow::ensure!(
            st["role"] == "secondary"
                && st["data"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("no source's history yet")),
            "a new target's status: {st}"
        );
        let list = loadgen_args(
            &rig,
            &source,
            volume_bytes,
            (&server.addr.to_string(), "sync"),
            &["--ops", "20", "--seed", &seed.to_string(), "--json"],
        );
        let run = procs::run_loadgen(&list, Duration::from_secs(60)).await?;
        let s = check_success(&run, &rig, "initial")?;
        anyhow::ensure!(s["last_seq"] == 20 + 2 + 128, "a full resync first: {s}");
        let st = procs::secondary_status(&opts.status_socket).await?;
        anyhow::ensure!(
            st["consistent"] == true
                && st["durable"] == 150
                && st["resync"].is_null()
                && st["generation"][0] != "none",
            "the synced target's status: {st}"
        );
        let hook_runs = std::fs::read_to_string(&hook_log)?;
        anyhow::ensure!(hook_runs == "full 1\n", "hook runs: {hook_runs:?}");
        let snap = std::fs::read(&snapshot)?;
        anyhow::ensure!(
            snap.len() as u64 == volume_bytes && snap.iter().all(|b| *b == 0),
            "the snapshot is not the empty target as it was before the copy"
        );
        stop(&mut server).await?;
        identical(&source, &rig.path("initial.target"), volume_bytes)
    })
    .await;
}

/// (g) Issue 14, failure 5: the target's volume is lost (a new, empty one in its place). Before,
/// the restarted primary stopped with a fatal error or the pair went on at seq 0 with different
/// data; now the primary sees the target holds none of its history and copies it in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_a_target_that_lost_its_data_is_copied_in_full_at_the_next_start() {
    scenario("target data loss", |rig, seed| async move {
        let volume_bytes: u64 = 2 << 20;
        let source = rig.path("loss.source");
        let target = rig.path("loss.target");
        let opts = rig.server_opts("loss.target", volume_bytes, 4096);
        let t = Duration::from_secs(60);
        let mut server = TargetServer::start(&opts).await?;
        let peer = server.addr.to_string();
        let run = |seed: u64, peer: &str| {
            loadgen_args(
                &rig,
                &source,
                volume_bytes,
                (peer, "async"),
                &["--ops", "300", "--seed", &seed.to_string(), "--json"],
            )
        };
        check_success(
            &procs::run_loadgen(&run(seed, &peer), t).await?,
            &rig,
            "first",
        )?;
        stop(&mut server).await?;
        std::fs::remove_file(&target)?;
        let mut server = TargetServer::start(&opts).await?;
        let peer = server.addr.to_string();
        let second = procs::run_loadgen(&run(seed + 1, &peer), t).await?;
        let s = check_success(&second, &rig, "after the loss")?;
        // Rebased on the new volume's seq 0: a mark, 32 chunks, a mark, then the host's writes.
        anyhow::ensure!(s["last_seq"] == 300 + 34, "{s}");
        stop(&mut server).await?;
        identical(&source, &target, volume_bytes)
    })
    .await;
}

/// (g') Issue 14, failure 5, mid-run: the target's volume is lost while the primary writes
/// (kill -9 of the target, a new empty volume in its place, restarted). Before, the primary
/// stopped with a fatal error and host I/O failed; now it has the target continue after its
/// own seq, resends its log and copies every chunk while the host's writes go on (4 s of them,
/// the loss after the first 1,500): the run finishes, every write acknowledged, the volumes
/// identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_a_target_that_loses_its_data_mid_run_is_copied_in_full_while_the_host_writes() {
    scenario("target data loss mid-run", |rig, seed| async move {
        let volume_bytes: u64 = 8 << 20;
        let opts = rig.server_opts("midloss.target", volume_bytes, 512);
        let mut server = TargetServer::start(&opts).await?;
        let faults = Faults::none()
            .with_delay(Duration::from_millis(1))
            .with_bandwidth(8 << 20);
        let proxy = FaultProxy::start("127.0.0.1:0", server.addr, faults, seed).await?;
        let source = rig.path("midloss.source");
        let ack_log = rig.path("midloss.acks.txt");
        let child = procs::loadgen(
            &loadgen_args(
                &rig,
                &source,
                volume_bytes,
                (proxy.addr().to_string().as_str(), "async"),
                &[
                    "--block-bytes",
                    "512",
                    "--max-blocks",
                    "16",
                    "--seconds",
                    "4",
                    "--qd",
                    "4",
                    "--ack-log",
                    ack_log.to_str().unwrap_or_default(),
                    "--seed",
                    &seed.to_string(),
                    "--json",
                ],
            ),
            Some(&rig.path("midloss.loadgen.log")),
        )?
        .env("RUST_LOG", "info")
        .spawn()?;
        wait_acked(&ack_log, 1500).await?;
        server.kill9().await?;
        std::fs::remove_file(&opts.volume)?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        server = TargetServer::start(&opts).await?;
        proxy.set_upstream(server.addr);
        let run = procs::finish(child, LOADGEN_TIMEOUT).await?;
        anyhow::ensure!(
            run.status.success(),
            "loadgen failed ({}), see midloss.loadgen.log: {}",
            run.status,
            run.stderr.lines().last().unwrap_or("")
        );
        let s = summary(&run)?;
        println!("loadgen: {s}");
        // The loss and the copy came while the host still wrote (for 4 s).
        let acks = read_ack_log(&ack_log)?;
        anyhow::ensure!(
            s["replicated"] == true && s["writes"] == acks.len() && acks.len() > 1500,
            "{s}, {} acks logged",
            acks.len()
        );
        let log = std::fs::read_to_string(rig.path("midloss.loadgen.log"))?;
        anyhow::ensure!(
            log.contains("holds none of this volume's data any more"),
            "the loss was not reported: see midloss.loadgen.log"
        );
        drop(proxy);
        stop(&mut server).await?;
        identical(&source, &opts.volume, volume_bytes)
    })
    .await;
}

/// (d) Bad input gives one clear error line and a non-zero exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_loadgen_errors_are_one_clear_line() {
    scenario("loadgen errors", |rig, _seed| async move {
        let volume_bytes: u64 = 1 << 20;
        let mut server =
            TargetServer::start(&rig.server_opts("errors.target", volume_bytes, 4096)).await?;
        let peer = server.addr.to_string();
        let source = rig.path("errors.source");
        let secret = rig.secret.to_str().unwrap_or_default().to_string();
        let base = |peer: &str, volume_id: &str, secret: &str| {
            args(&[
                "--volume",
                source.to_str().unwrap_or_default(),
                "--volume-bytes",
                &volume_bytes.to_string(),
                "--peer",
                peer,
                "--volume-id",
                volume_id,
                "--secret-file",
                secret,
                "--mode",
                "sync",
                "--ops",
                "10",
                "--connect-timeout-secs",
                "2",
            ])
        };
        let t = Duration::from_secs(30);

        // The happy path first, so that the failures below are the flags' fault.
        let ok = procs::run_loadgen(&base(&peer, VOLUME_ID, &secret), t).await?;
        anyhow::ensure!(ok.status.success(), "baseline run failed: {}", ok.stderr);

        let missing = rig.path("no-such-secret");
        let run = procs::run_loadgen(
            &base(&peer, VOLUME_ID, missing.to_str().unwrap_or_default()),
            t,
        )
        .await?;
        one_error_line(&run, "secret file")?;

        // A first start needs its target (a resumed one, as `source` is now, starts degraded:
        // e2e_a_resumed_primary_starts_degraded_and_catches_up_when_the_target_returns).
        let free = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let started = Instant::now();
        let first = replace(
            base(&free.to_string(), VOLUME_ID, &secret),
            "--volume",
            rig.path("errors.first").to_str().unwrap_or_default(),
        );
        let run = procs::run_loadgen(&first, t).await?;
        one_error_line(&run, "cannot reach the target")?;
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(15),
            "unreachable peer took {:?}",
            started.elapsed()
        );

        let wrong = rig.path("wrong-secret");
        std::fs::write(&wrong, "not the secret")?;
        let run = procs::run_loadgen(
            &base(&peer, VOLUME_ID, wrong.to_str().unwrap_or_default()),
            t,
        )
        .await?;
        one_error_line(&run, "authentication")?;

        // The source volume's own record names the volume it mirrors; a fresh source of another
        // volume gets as far as the target, which refuses it.
        let run = procs::run_loadgen(&base(&peer, OTHER_VOLUME_ID, &secret), t).await?;
        one_error_line(&run, "it belongs to volume")?;
        let fresh = rig.path("other.source");
        let other = replace(
            base(&peer, OTHER_VOLUME_ID, &secret),
            "--volume",
            fresh.to_str().unwrap_or_default(),
        );
        let run = procs::run_loadgen(&other, t).await?;
        one_error_line(&run, "refused")?;

        let bad = replace(base(&peer, VOLUME_ID, &secret), "--mode", "bogus");
        let run = procs::run_loadgen(&bad, t).await?;
        one_error_line(&run, "bogus")?;

        let mut bad = base(&peer, VOLUME_ID, &secret);
        bad.extend(args(&["--qd", "0"]));
        let run = procs::run_loadgen(&bad, t).await?;
        one_error_line(&run, "--qd")?;

        let bad = replace(base(&peer, VOLUME_ID, &secret), "--volume-bytes", "1000");
        let run = procs::run_loadgen(&bad, t).await?;
        one_error_line(&run, "--volume-bytes")?;

        let mut bad = base(&peer, VOLUME_ID, &secret);
        bad.extend(args(&["--no-such-flag"]));
        let run = procs::run_loadgen(&bad, t).await?;
        one_error_line(&run, "--no-such-flag")?;

        let run = procs::run_loadgen(&base(&peer, "xyz", &secret), t).await?;
        one_error_line(&run, "32 hex digits")?;

        stop(&mut server).await?;
        Ok(())
    })
    .await;
}

/// (h) Issue 14, failure 2: a primary restarted after a clean stop while its target is down.
/// Before, the start failed ("cannot reach the target"); now it goes on without the target after
/// `--connect-timeout-secs`, its writes are logged, and they reach the target once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_a_resumed_primary_starts_degraded_and_catches_up_when_the_target_returns() {
    scenario("degraded start", |rig, seed| async move {
        let volume_bytes: u64 = 2 << 20;
        let source = rig.path("degraded.source");
        let opts = rig.server_opts("degraded.target", volume_bytes, 4096);
        let t = Duration::from_secs(60);
        let mut server = TargetServer::start(&opts).await?;
        let proxy = FaultProxy::start("127.0.0.1:0", server.addr, Faults::none(), seed).await?;
        let peer = proxy.addr().to_string();
        let run = |seed: u64, extra: &[&str]| {
            let mut list = loadgen_args(
                &rig,
                &source,
                volume_bytes,
                (peer.as_str(), "async"),
                &["--ops", "200", "--seed", &seed.to_string(), "--json"],
            );
            list.extend(args(extra));
            list
        };
        check_success(
            &procs::run_loadgen(&run(seed, &[]), t).await?,
            &rig,
            "first",
        )?;
        stop(&mut server).await?;
        let list = run(seed + 1, &["--connect-timeout-secs", "1"]);
        let degraded = tokio::spawn(async move { procs::run_loadgen(&list, t).await });
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut server = TargetServer::start(&opts).await?;
        proxy.set_upstream(server.addr);
        let run = degraded.await??;
        let s = check_success(&run, &rig, "degraded")?;
        anyhow::ensure!(
            run.stderr.contains("running without the target"),
            "the start says it is degraded: {}",
            run.stderr
        );
        // The first run: a full copy (34 seqs) and 200 writes; this one continues after it.
        anyhow::ensure!(s["last_seq"] == 434, "{s}");
        stop(&mut server).await?;
        identical(&source, &rig.path("degraded.target"), volume_bytes)
    })
    .await;
}

/// (i) Issue 14, failure 6: a full rollback log held the host back until the target caught up
/// (`LogFull` back-pressure: a slow link set the host's pace). Now, in `async`, a write that finds
/// the log full completes once local with its chunk marked out of sync in the stored write
/// intent; once the target has taken the log, a resync copies those chunks while writes go on,
/// and the volumes end identical. Here the link is throttled to 64 KiB/s for the first 6 s: the
/// 2,000 writes (at least 8 MiB) would need more than two minutes of it; they finish in a few.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_a_full_log_overflows_to_the_write_intent_and_never_holds_the_host_back() {
    scenario("overflow", |rig, seed| async move {
        let volume_bytes: u64 = 4 << 20;
        let source = rig.path("overflow.source");
        let opts = rig.server_opts("overflow.target", volume_bytes, 4096);
        let mut server = TargetServer::start(&opts).await?;
        let slow = Faults::none().with_bandwidth(64 << 10);
        let proxy = FaultProxy::start("127.0.0.1:0", server.addr, slow, seed).await?;
        let list = loadgen_args(
            &rig,
            &source,
            volume_bytes,
            (proxy.addr().to_string().as_str(), "async"),
            &[
                "--ops",
                "2000",
                "--qd",
                "8",
                "--log-bytes-max",
                "256K",
                "--seed",
                &seed.to_string(),
                "--json",
            ],
        );
        let t = Duration::from_secs(120);
        let run = tokio::spawn(async move { procs::run_loadgen(&list, t).await });
        tokio::time::sleep(Duration::from_secs(6)).await;
        proxy.set_faults(Faults::none());
        let run = run.await??;
        let s = check_success(&run, &rig, "overflow")?;
        println!("loadgen: {s}");
        let out_of_sync = s["out_of_sync_writes"].as_u64().unwrap_or(0);
        anyhow::ensure!(out_of_sync > 0, "no write overflowed: {s}");
        let elapsed = s["elapsed_s"].as_f64().unwrap_or(f64::MAX);
        anyhow::ensure!(
            elapsed < 5.0,
            "the writes took {elapsed:.1} s: the host waited for the throttled link ({s})"
        );
        stop(&mut server).await?;
        identical(&source, &opts.volume, volume_bytes)
    })
    .await;
}
