//! The `target-server` binary: bad input gives one error line and a non-zero exit; a good run
//! prints its address, serves, and stops cleanly on SIGTERM.

// Test sizes are small constants: casts between them cannot truncate.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mirror_core::source::{Mode, Source};
use mirror_core::Seq;
use target_server::ServerConfig;

const BIN: &str = env!("CARGO_BIN_EXE_target-server");
const ID: &str = "11111111111111111111111111111111";

/// Kills the child if a test fails before it exits.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn bad_input_gives_one_error_line_and_a_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let secret = d.join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let empty = d.join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let vol = d.join("vol");
    std::fs::write(&vol, vec![0u8; 8192]).unwrap();
    let odd = d.join("odd");
    std::fs::write(&odd, vec![0u8; 5000]).unwrap();
    let bad_toml = d.join("bad.toml");
    std::fs::write(&bad_toml, "volume = \"vol\"\nvolume_sise = 3\n").unwrap();
    let corrupt_meta = d.join("corrupt.meta");
    std::fs::write(&corrupt_meta, b"UBMRMETA but not really").unwrap();
    let good = [
        "--volume",
        s(&vol),
        "--volume-id",
        ID,
        "--secret-file",
        s(&secret),
    ];
    let with = |extra: &[&'static str]| -> Vec<String> {
        good.iter()
            .map(|a| a.to_string())
            .chain(extra.iter().map(|a| a.to_string()))
            .collect()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (with(&["--frobnicate"]), "unexpected argument"),
        (
            vec![
                "--volume".into(),
                s(&vol).into(),
                "--volume-id".into(),
                "xyz".into(),
                "--secret-file".into(),
                s(&secret).into(),
            ],
            "bad volume id",
        ),
        (
            vec![
                "--volume".into(),
                s(&d.join("missing")).into(),
                "--volume-id".into(),
                ID.into(),
                "--secret-file".into(),
                s(&secret).into(),
            ],
            "No such file",
        ),
        (
            vec![
                "--volume".into(),
                s(&odd).into(),
                "--create-size".into(),
                "5000".into(),
                "--volume-id".into(),
                ID.into(),
                "--secret-file".into(),
                s(&secret).into(),
            ],
            "not a positive multiple",
        ),
        (with(&[]), "has no metadata at its end"),
        (with(&["--create-size", "4096"]), "grown or shrunk"),
        (
            with(&["--block-bytes", "1024"]),
            "block size 1024 is not supported",
        ),
        (with(&["--listen", "nowhere"]), "invalid value"),
        (with(&["--conflict-policy", "maybe"]), "invalid value"),
        (
            vec![
                "--volume".into(),
                s(&vol).into(),
                "--volume-id".into(),
                ID.into(),
                "--secret-file".into(),
                s(&d.join("nosecret")).into(),
            ],
            "cannot read secret file",
        ),
        (
            vec![
                "--volume".into(),
                s(&vol).into(),
                "--volume-id".into(),
                ID.into(),
                "--secret-file".into(),
                s(&empty).into(),
            ],
            "is empty",
        ),
        (
            vec![
                "--volume".into(),
                s(&vol).into(),
                "--secret-file".into(),
                s(&secret).into(),
            ],
            "missing --volume-id",
        ),
        (vec!["--config".into(), s(&bad_toml).into()], "volume_sise"),
        (
            vec!["--config".into(), s(&d.join("nope.toml")).into()],
            "cannot read config file",
        ),
        (
            vec![
                "--volume".into(),
                s(&vol).into(),
                "--volume-id".into(),
                ID.into(),
                "--secret-file".into(),
                s(&secret).into(),
                "--meta".into(),
                s(&corrupt_meta).into(),
            ],
            "corrupt",
        ),
    ];
    for (args, want) in cases {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stderr) = run(&argv);
        assert!(
            code == 1 || code == 2,
            "{argv:?}: exit {code}, stderr {stderr:?}"
        );
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{argv:?}: {stderr:?}");
        assert!(lines[0].starts_with("target-server: error: "), "{stderr:?}");
        assert!(
            lines[0].contains(want),
            "{argv:?}: {stderr:?} lacks {want:?}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // The volume was never touched by the failed starts.
    assert_eq!(std::fs::read(&vol).unwrap(), vec![0u8; 8192]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_from_a_config_file_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("secret"), SECRET).unwrap();
    let volume_bytes: u64 = 1 << 20;
    let conf = d.join("target.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = \"127.0.0.1:7\"\nvolume = \"target.img\"\ncreate_size = {volume_bytes}\n\
             volume_id = \"{}\"\nsecret_file = \"secret\"\nconflict_policy = \"wait\"\n",
            VOLUME_ID
        ),
    )
    .unwrap();
    let child = Command::new(BIN)
        .args(["--config", s(&conf), "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Guard(child);
    let stdout = guard.0.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("target-server: listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    assert_ne!(addr.port(), 0);
    let src = Source::new(source_config(volume_bytes, Mode::Sync));
    let mut c = Client::connect_ready(addr, src, 31).await;
    c.write(8192, vec![0x77; 4096]);
    c.sync().await;
    drop(c);
    let status = Command::new("kill")
        .args(["-TERM", &guard.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(st) = guard.0.try_wait().unwrap() {
            break st.code();
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, Some(0));
    let cfg = ServerConfig::new(d.join("target.img"), VOLUME_ID, SECRET.to_vec());
    let meta = volume_record(&cfg).unwrap();
    assert!(meta.clean);
    assert_eq!(meta.durable, Seq(1));
    let content = data_area(&cfg.volume_path, volume_bytes);
    assert_eq!(&content[8192..12288], &[0x77u8; 4096][..]);
}
