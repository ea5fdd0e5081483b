//! The command line's failure modes: one `ublk-mirror: error: ...` line and a non-zero exit.
//! (Runs against this package's own binary; the end-to-end runs live in the `mirror-tests`
//! package.)

use std::process::{Command, Output};

fn ublk_mirror(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ublk-mirror"))
        .args(args)
        .output()
        .expect("run ublk-mirror")
}

fn assert_one_error_line(out: &Output, expect: &str) {
    assert!(!out.status.success(), "succeeded: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr: {stderr:?}");
    assert!(
        lines[0].starts_with("ublk-mirror: error: ") && lines[0].contains(expect),
        "{:?} does not mention {expect:?}",
        lines[0]
    );
}

#[test]
fn unknown_subcommand_and_missing_flags_are_one_line() {
    assert_one_error_line(&ublk_mirror(&["frobnicate"]), "frobnicate");
    assert_one_error_line(&ublk_mirror(&["loadgen"]), "required");
}

#[test]
fn loadgen_validates_before_touching_the_network() {
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = dir.path().join("vol");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s\n").expect("secret");
    let base = |extra: &[&str]| {
        let mut a = vec![
            "loadgen",
            "--volume",
            volume.to_str().unwrap(),
            "--volume-bytes",
            "1M",
            "--peer",
            "127.0.0.1:9",
            "--volume-id",
            "00112233445566778899aabbccddeeff",
            "--secret-file",
            secret.to_str().unwrap(),
            "--mode",
            "sync",
        ];
        a.extend_from_slice(extra);
        ublk_mirror(&a)
    };
    assert_one_error_line(&base(&["--max-blocks", "1000"]), "frame limit");
    assert_one_error_line(
        &base(&["--block-bytes", "1000"]),
        "block size 1000 is not supported",
    );
    // A power of two the device path cannot serve: loadgen takes the device's rule.
    assert_one_error_line(&base(&["--block-bytes", "1024"]), "(512 or 4096)");
    assert_one_error_line(&base(&["--ops", "5", "--seconds", "1"]), "--seconds");
    assert_one_error_line(&base(&["--log-bytes-max", "12x"]), "12x");
    let missing = dir.path().join("nope");
    let out = ublk_mirror(&[
        "loadgen",
        "--volume",
        volume.to_str().unwrap(),
        "--volume-bytes",
        "1M",
        "--peer",
        "127.0.0.1:9",
        "--volume-id",
        "00112233445566778899aabbccddeeff",
        "--secret-file",
        missing.to_str().unwrap(),
        "--mode",
        "sync",
    ]);
    assert_one_error_line(&out, "secret file");
}

#[test]
fn help_lists_loadgen() {
    let out = ublk_mirror(&["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("loadgen"));
}

/// The systemd units are valid for systemd (`systemd-analyze verify`, with the binary's path
/// where the units install it) and tie the bound on held I/O together: the primary's unit fails
/// after its start limit and then runs the unit that deletes the device.
#[test]
fn the_systemd_units_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_ublk-mirror");
    for (name, text) in [
        (
            "ublk-mirror@vol0.service",
            include_str!("../../scripts/systemd/ublk-mirror@.service"),
        ),
        (
            "ublk-mirror-fail@vol0.service",
            include_str!("../../scripts/systemd/ublk-mirror-fail@.service"),
        ),
    ] {
        assert!(text.contains("/usr/local/bin/ublk-mirror "), "{name}");
        let text = text
            .replace("/usr/local/bin/ublk-mirror ", &format!("{bin} "))
            .replace("/sbin/modprobe", "/bin/true");
        std::fs::write(dir.path().join(name), text).expect("write the unit");
    }
    let primary = include_str!("../../scripts/systemd/ublk-mirror@.service");
    assert!(primary.contains("OnFailure=ublk-mirror-fail@%i.service"));
    assert!(primary.contains("StartLimitBurst="));
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("ublk-mirror@vol0.service"))
        .arg(dir.path().join("ublk-mirror-fail@vol0.service"))
        .current_dir(dir.path())
        .output()
        .expect("systemd-analyze (Debian's systemd package; scripts/test installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

/// The systemd unit's ExecStart is a command line this binary takes: with the unit's instance
/// name and a missing configuration file it fails on that file, not on its flags.
#[test]
fn the_systemd_units_command_line_parses() {
    let unit = include_str!("../../scripts/systemd/ublk-mirror@.service");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart line");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("vol0.toml");
    let line = exec
        .replace("%i", "vol0")
        .replace("/etc/ublk-mirror/vol0.toml", &config.display().to_string());
    let mut words = line.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/ublk-mirror"));
    let args: Vec<&str> = words.collect();
    assert_one_error_line(&ublk_mirror(&args), "vol0.toml");
}
