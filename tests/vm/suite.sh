#!/bin/bash
# tests/vm/suite.sh — the real-device test suite. Runs INSIDE the VM (scripts/vm/suite boots it),
# as root, with the binaries already built on the host.
#
# usage: tests/vm/suite.sh OUTDIR [CASE...]      (no CASE: all; cases: errors ext4 xfs fio
#                                                overlap blockdev512 target-blockdev passthrough
#                                                restart degraded overflow recover
#                                                resync-interrupted kill9 sigterm delete perf)
#
# Each case prints `PASS name` or `FAIL name: reason`; the last line is `N passed, M failed`.
# Exit status: 0 only if every case passed; 1 otherwise, also when ublk_drv cannot be loaded.
# Logs (daemon, target, fio) go to OUTDIR; OUTDIR/fio-table.md holds the performance table.
#
# environment: UBLK_MIRROR_BIN_DIR (default: <repo>/target/release), UBLK_MIRROR_PERF_SECS (default 10),
#              UBLK_MIRROR_OVERLAP_SECS (default 15)
set -u

OUT=${1:?usage: suite.sh OUTDIR [CASE...]}
shift
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${UBLK_MIRROR_BIN_DIR:-$REPO/target/release}
UM=$BIN/ublk-mirror
TS=$BIN/target-server
PERF_SECS=${UBLK_MIRROR_PERF_SECS:-10}
export UBLK_MIRROR_RUN_DIR=/run/ublk-mirror
W=/tmp/vmsuite
MNT=/tmp/vmsuite-mnt
RO=/tmp/vmsuite-ro
VID=5eed0000aaaa4bbbcccc0123456789ab
SIZE=$((320 << 20)) # mkfs.xfs needs at least 300 MB

NP=0
NF=0
pass() { echo "PASS $1"; NP=$((NP + 1)); }
fail() { echo "FAIL $1: $2"; NF=$((NF + 1)); }
note() { echo "  [$(date +%T)] $*"; }
finish() {
    cleanup_all
    echo "$NP passed, $NF failed"
    [ "$NF" -eq 0 ] && [ "$NP" -gt 0 ]
    exit $?
}

T0=$(date +%s)
echo "vm-suite: kernel $(uname -r), $(nproc) cpus, binaries from $BIN"
for b in "$UM" "$TS"; do
    [ -x "$b" ] || { fail setup "missing binary $b (run cargo build --release --workspace)"; finish; }
done
for t in fio jq mkfs.ext4 e2fsck mkfs.xfs xfs_repair losetup cmp; do
    command -v "$t" >/dev/null || { fail setup "missing tool $t (run scripts/vm/setup)"; finish; }
done
if ! modprobe ublk_drv; then
    fail setup "modprobe ublk_drv failed: this kernel cannot run the device"
    finish
fi
[ -e /dev/ublk-control ] || { fail setup "/dev/ublk-control missing after modprobe"; finish; }
modprobe loop || { fail setup "modprobe loop failed"; finish; }
mkdir -p "$W" "$MNT" "$RO" || exit 1
echo "vm-suite-secret-$RANDOM$RANDOM" > "$W/secret"
echo "a-different-secret" > "$W/secret2"

# --- helpers -------------------------------------------------------------------------------
TPIDS=()   # target-server pids we started
PORT=7800

# new_volumes TAG: fresh sparse source and target volumes ($W/TAG-src.img, $W/TAG-tgt.img)
new_volumes() {
    rm -f "$W/$1-src.img" "$W/$1-tgt.img" "$W/$1-tgt.img".*
    truncate -s "$SIZE" "$W/$1-src.img"
}

# start_target TAG [SECRET]: target-server for TAG's target volume on a new port (sets TPORT, TPID)
start_target() {
    local tag=$1 secret=${2:-$W/secret} log
    PORT=$((PORT + 1))
    TPORT=$PORT
    log=$OUT/target-$tag.log
    : >"$log"
    restart_target "$tag" "$secret"
}

# restart_target TAG [SECRET]: (re)start on $TPORT
restart_target() {
    local tag=$1 secret=${2:-$W/secret} log=$OUT/target-$1.log i
    "$TS" --listen "127.0.0.1:$TPORT" --volume "$W/$tag-tgt.img" --create-size "$SIZE" \
        --volume-id "$VID" --secret-file "$secret" >>"$log" 2>&1 &
    TPID=$!
    TPIDS+=("$TPID")
    for i in $(seq 100); do
        grep -q "listening on" "$log" 2>/dev/null && [ "$(grep -c 'listening on' "$log")" -ge "${TARGET_STARTS:-1}" ] && return 0
        kill -0 "$TPID" 2>/dev/null || { echo "target-server exited: $(tail -n 3 "$log")"; return 1; }
        sleep 0.1
    done
    echo "target-server not listening after 10 s"
    return 1
}

stop_target() {
    [ -n "${TPID:-}" ] || return 0
    kill -TERM "$TPID" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$TPID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$TPID" 2>/dev/null
    wait "$TPID" 2>/dev/null
    TPID=""
}

# start_daemon NAME TAG MODE [EXTRA...]: background daemon on TAG's source volume (sets DEV, DPID)
start_daemon() {
    local name=$1 tag=$2 mode=$3 st
    DEV=""
    DPID=""
    shift 3
    if ! "$UM" start --name "$name" --volume "$W/$tag-src.img" --peer "127.0.0.1:$TPORT" \
        --volume-id "$VID" --secret-file "$W/secret" --mode "$mode" --log-file "$OUT/daemon-$name.log" \
        "$@" >"$OUT/start-$name.out" 2>&1; then
        echo "start failed: $(cat "$OUT/start-$name.out")"
        return 1
    fi
    st=$("$UM" status --name "$name" --json) || return 1
    DEV=$(jq -r .device <<<"$st")
    DPID=$(jq -r .pid <<<"$st")
    [ -b "$DEV" ] || { echo "no block device $DEV"; return 1; }
}

stop_daemon() {
    "$UM" stop --name "$1" >"$OUT/stop-$1.out" 2>&1 || { echo "stop failed: $(cat "$OUT/stop-$1.out")"; return 1; }
}

# same_volumes TAG: the source's and the target's data areas ($SIZE bytes) byte-identical (each
# file is followed by its own metadata area)
same_volumes() {
    local out
    out=$(cmp -n "$SIZE" "$W/$1-src.img" "$W/$1-tgt.img" 2>&1) && return 0
    echo "volumes differ: $out"
    return 1
}

cleanup_all() {
    mountpoint -q "$MNT" && umount -l "$MNT"
    mountpoint -q "$RO" && umount -l "$RO"
    for s in /run/ublk-mirror/*.sock; do
        [ -e "$s" ] || continue
        n=$(basename "$s" .sock)
        timeout 60 "$UM" stop --name "$n" >/dev/null 2>&1 || timeout 30 "$UM" delete --name "$n" >/dev/null 2>&1
    done
    for p in "${TPIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
    TPIDS=()
}

# expect_error NAME SUBSTRING CMD...: CMD fails with exactly one `ublk-mirror: error:` line
expect_error() {
    local name=$1 want=$2 err rc lines
    shift 2
    err=$("$@" 2>&1 >/dev/null)
    rc=$?
    lines=$(printf '%s\n' "$err" | grep -c .)
    if [ "$rc" -eq 0 ]; then
        fail "$name" "succeeded (expected an error mentioning '$want')"
    elif [ "$lines" -ne 1 ] || [[ "$err" != "ublk-mirror: error: "* ]] || [[ "$err" != *"$want"* ]]; then
        fail "$name" "exit $rc, stderr: $err"
    else
        pass "$name"
        echo "    $err"
    fi
}

# write_files DIR N: N files of random sizes (4-96 KiB) in 3 directories, each fsynced on close
# (one fio process per directory: process start-up is slow under software emulation)
write_files() {
    local dir=$1 n=$2 d
    for d in a b c; do
        mkdir -p "$dir/$d" || return 1
        fio --name="files-$d" --directory="$dir/$d" --nrfiles=$((n / 3)) --filesize=4k-96k --bs=4k \
            --rw=write --ioengine=psync --fsync_on_close=1 --file_service_type=sequential --openfiles=1 \
            --randseed=$RANDOM --refill_buffers --output="$OUT/write-files.txt" >/dev/null 2>&1 || return 1
    done
    sync -f "$dir"
}

# --- cases ---------------------------------------------------------------------------------
case_errors() {
    new_volumes err
    start_target err || { fail errors-setup "target"; return; }
    local common=(--peer "127.0.0.1:$TPORT" --volume-id "$VID" --secret-file "$W/secret")
    expect_error error-bad-mode "mode" "$UM" start --name e1 --volume "$W/err-src.img" "${common[@]}" --mode fast
    expect_error error-bad-block-size "block" "$UM" start --name e1 --volume "$W/err-src.img" "${common[@]}" --block-bytes 1000
    expect_error error-bad-volume-id "volume-id" "$UM" start --name e1 --volume "$W/err-src.img" --peer "127.0.0.1:$TPORT" --volume-id xyz --secret-file "$W/secret"
    expect_error error-missing-volume "/nonexistent/vol.img" "$UM" start --name e1 --volume /nonexistent/vol.img "${common[@]}"
    expect_error error-missing-secret "secret" "$UM" start --name e1 --volume "$W/err-src.img" --peer "127.0.0.1:$TPORT" --volume-id "$VID" --secret-file /nonexistent/secret
    expect_error error-unreachable-peer "cannot reach peer" "$UM" start --name e1 --volume "$W/err-src.img" --peer 127.0.0.1:1 --volume-id "$VID" --secret-file "$W/secret" --connect-timeout-secs 2
    expect_error error-wrong-secret "secret" "$UM" start --name e1 --volume "$W/err-src.img" --peer "127.0.0.1:$TPORT" --volume-id "$VID" --secret-file "$W/secret2"
    expect_error error-not-running "no daemon is running" "$UM" status --name nosuch
    expect_error error-bad-set-mode "mode" "$UM" set-mode fast --name nosuch
    [ -e /dev/ublkb0 ] || [ -z "$(ls /dev/ublkb* 2>/dev/null)" ] || true
    if start_daemon e1 err async; then
        expect_error error-name-in-use "already in use" "$UM" start --name e1 --volume "$W/err-src.img" "${common[@]}"
        expect_error error-volume-in-use "already in use" "$UM" start --name e2 --volume "$W/err-src.img" "${common[@]}"
        local id=${DEV#/dev/ublkb}
        truncate -s "$SIZE" "$W/err2-src.img"
        expect_error error-device-in-use "already in use" "$UM" start --name e3 --volume "$W/err2-src.img" "${common[@]}" --dev-id "$id"
        stop_daemon e1 || fail error-stop "stop failed"
    else
        fail errors-daemon "could not start"
    fi
    ls /dev/ublkb* >/dev/null 2>&1 && fail error-no-leftover "devices left: $(ls /dev/ublkb*)" || pass error-no-leftover-device
    stop_target
}

# case_fs FS MODE
case_fs() {
    local fs=$1 mode=$2 tag=$1 why
    new_volumes "$tag"
    start_target "$tag" || { fail "$fs" "target did not start"; return; }
    start_daemon "m-$fs" "$tag" "$mode" >"$W/why" 2>&1 || { why=$(cat "$W/why"); fail "$fs" "$why"; stop_target; return; }
    note "$fs on $DEV (mode $mode)"
    if [ "$fs" = ext4 ]; then mkfs.ext4 -q -F "$DEV"; else mkfs.xfs -q -f "$DEV"; fi >"$OUT/mkfs-$fs.log" 2>&1 \
        || { fail "$fs" "mkfs failed: $(tail -n 2 "$OUT/mkfs-$fs.log")"; cleanup_all; return; }
    mount "$DEV" "$MNT" || { fail "$fs" "mount failed"; cleanup_all; return; }
    write_files "$MNT" 300 || { fail "$fs" "writing files failed"; cleanup_all; return; }
    rm -rf "$W/ref-$fs" && cp -a "$MNT" "$W/ref-$fs"
    "$UM" status --name "m-$fs" >"$OUT/status-$fs.txt" 2>&1
    umount "$MNT" || { fail "$fs" "umount failed"; cleanup_all; return; }
    stop_daemon "m-$fs" || { fail "$fs" "daemon stop failed"; cleanup_all; return; }
    [ -e "$DEV" ] && { fail "$fs" "$DEV still exists after stop"; cleanup_all; return; }
    stop_target
    # mkfs zeroes ranges (WRITE_ZEROES with NOUNMAP): on the VM's tmpfs they fell back to holes,
    # not failed requests (their zeroes went to the target all the same).
    why=$(grep -m1 "request failed" "$OUT/daemon-m-$fs.log") && { fail "$fs" "the device failed a request: $why"; return; }
    why=$(same_volumes "$tag") || { fail "$fs" "$why"; return; }
    if [ "$fs" = ext4 ]; then
        e2fsck -fn "$W/$tag-tgt.img" >"$OUT/fsck-$fs.log" 2>&1 || { fail "$fs" "e2fsck of the target image failed"; return; }
    else
        xfs_repair -n -f "$W/$tag-tgt.img" >"$OUT/fsck-$fs.log" 2>&1 || { fail "$fs" "xfs_repair -n of the target image failed"; return; }
    fi
    mount -o loop,ro,sizelimit="$SIZE" "$W/$tag-tgt.img" "$RO" || { fail "$fs" "mounting the target image failed"; return; }
    why=$(diff -r "$W/ref-$fs" "$RO" 2>&1 | head -n 3)
    local nfiles
    nfiles=$(find "$RO" -type f | wc -l)
    umount "$RO"
    [ -z "$why" ] || { fail "$fs" "target tree differs: $why"; return; }
    [ "$nfiles" -ge 300 ] || { fail "$fs" "only $nfiles files on the target"; return; }
    pass "$fs"
    echo "    $nfiles files; volumes identical; target fsck clean; tree identical"
    rm -f "$W/$tag-src.img" "$W/$tag-tgt.img" && rm -rf "$W/ref-$fs"
}

# case_fio MODE
case_fio() {
    local mode=$1 tag=fio-$1 why
    new_volumes "$tag"
    start_target "$tag" || { fail "fio-$mode" "target did not start"; return; }
    start_daemon "m-$tag" "$tag" "$mode" >"$W/why" 2>&1 || { why=$(cat "$W/why"); fail "fio-$mode" "$why"; stop_target; return; }
    if ! fio --name="v-$mode" --filename="$DEV" --rw=randwrite --bsrange=4k-64k --size=48M --ioengine=libaio \
        --iodepth=16 --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
        --output="$OUT/fio-$mode.txt" >/dev/null 2>&1; then
        fail "fio-$mode" "fio verify failed: $(grep -m1 -iE 'verify|error' "$OUT/fio-$mode.txt")"
        cleanup_all
        return
    fi
    why=$("$UM" wait-replicated last --name "m-$tag" --timeout-secs 120 2>&1) || { fail "fio-$mode" "$why"; cleanup_all; return; }
    "$UM" status --name "m-$tag" >"$OUT/status-$tag.txt" 2>&1
    stop_daemon "m-$tag" || { fail "fio-$mode" "daemon stop failed"; cleanup_all; return; }
    stop_target
    why=$(same_volumes "$tag") || { fail "fio-$mode" "$why"; return; }
    pass "fio-$mode"
    echo "    $(grep -m1 -E 'write: IOPS' "$OUT/fio-$mode.txt" | sed 's/^ *//'); $why"
    rm -f "$W/$tag-src.img" "$W/$tag-tgt.img"
}

# case_overlap: many writers with deep queues hammer a SMALL region, so overlapping writes are in
# flight at once (also on different queues); the mirror must apply them in the order the local
# volume did (the device's range gate), which a byte compare after convergence checks.
case_overlap() {
    local tag=overlap why st
    new_volumes "$tag"
    start_target "$tag" || { fail overlap "target did not start"; return; }
    start_daemon m-overlap "$tag" async --queues 2 >"$W/why" 2>&1 || { why=$(cat "$W/why"); fail overlap "$why"; stop_target; return; }
    if ! fio --name=ov --filename="$DEV" --rw=randwrite --bsrange=4k-16k --size=1M --ioengine=libaio \
        --numjobs=4 --iodepth=16 --direct=1 --time_based --runtime="${UBLK_MIRROR_OVERLAP_SECS:-15}" \
        --randrepeat=0 --refill_buffers --group_reporting --output="$OUT/fio-overlap.txt" >/dev/null 2>&1; then
        fail overlap "fio failed: $(grep -m1 -iE 'error' "$OUT/fio-overlap.txt")"
        cleanup_all
        return
    fi
    why=$("$UM" wait-replicated last --name m-overlap --timeout-secs 180 2>&1) || {
        "$UM" status --name m-overlap --json >"$OUT/status-overlap-unconverged.json" 2>&1
        fail overlap "not converged: $why (status: $OUT/status-overlap-unconverged.json)"
        cleanup_all
        # Kept apart: a later case of the same name would overwrite them.
        cp "$OUT/daemon-m-overlap.log" "$OUT/daemon-m-overlap-unconverged.log"
        cp "$OUT/target-$tag.log" "$OUT/target-overlap-unconverged.log"
        return
    }
    st=$("$UM" status --name m-overlap --json)
    echo "$st" >"$OUT/status-overlap.json"
    stop_daemon m-overlap || { fail overlap "daemon stop failed"; cleanup_all; return; }
    stop_target
    why=$(same_volumes "$tag") || { fail overlap "$why ($(cmp -l -n "$SIZE" "$W/$tag-src.img" "$W/$tag-tgt.img" | wc -l) bytes differ)"; return; }
    pass overlap
    echo "    $(grep -m1 -E 'write: IOPS' "$OUT/fio-overlap.txt" | sed 's/^ *//'); $(jq -c .seq <<<"$st"); volumes identical"
    rm -f "$W/$tag-src.img" "$W/$tag-tgt.img"
}

case_kill9() {
    local tag=kill9 why st disc
    new_volumes "$tag"
    start_target "$tag" || { fail kill9 "target did not start"; return; }
    start_daemon m-kill9 "$tag" async >"$W/why" 2>&1 || { why=$(cat "$W/why"); fail kill9 "$why"; stop_target; return; }
    fio --name=k9 --filename="$DEV" --rw=randwrite --bs=4k --size=64M --ioengine=libaio --iodepth=16 \
        --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
        --output="$OUT/fio-kill9.txt" >/dev/null 2>&1 &
    local fpid=$! i seq=0
    # kill the target once writes are flowing (and fio is far from done)
    for i in $(seq 300); do
        seq=$("$UM" status --name m-kill9 --json | jq -r .seq.last_local)
        [ "${seq:-0}" -ge 3000 ] && break
        kill -0 "$fpid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$fpid" 2>/dev/null || { fail kill9 "fio finished before the kill (seq $seq)"; cleanup_all; return; }
    [ "${seq:-0}" -ge 3000 ] || { fail kill9 "writes did not flow (seq $seq after 30 s)"; kill "$fpid"; cleanup_all; return; }
    kill -9 "$TPID"
    wait "$TPID" 2>/dev/null
    note "target-server killed with -9 (seq now $("$UM" status --name m-kill9 --json | jq -c .seq))"
    sleep 2
    TARGET_STARTS=2 restart_target "$tag" || { fail kill9 "target restart failed"; kill "$fpid"; cleanup_all; return; }
    note "target-server restarted"
    wait "$fpid" || { fail kill9 "fio failed: $(grep -m1 -iE 'verify|error' "$OUT/fio-kill9.txt")"; cleanup_all; return; }
    why=$("$UM" wait-replicated last --name m-kill9 --timeout-secs 180 2>&1) || { fail kill9 "not converged: $why"; cleanup_all; return; }
    st=$("$UM" status --name m-kill9 --json)
    echo "$st" >"$OUT/status-kill9.json"
    disc=$(jq -r .disconnects <<<"$st")
    stop_daemon m-kill9 || { fail kill9 "daemon stop failed"; cleanup_all; return; }
    stop_target
    [ "$disc" -ge 1 ] || { fail kill9 "the daemon never saw the target go away (disconnects $disc)"; return; }
    why=$(same_volumes "$tag") || { fail kill9 "$why"; return; }
    pass kill9
    echo "    disconnects $disc, connects $(jq -r .connects <<<"$st"), $(jq -c .seq <<<"$st")"
    rm -f "$W/$tag-src.img" "$W/$tag-tgt.img"
}

case_sigterm() {
    local tag=sigterm why i
    new_volumes "$tag"
    start_target "$tag" || { fail sigterm "target did not start"; return; }
    start_daemon m-sigterm "$tag" sync >"$W/why" 2>&1 || { why=$(cat "$W/why"); fail sigterm "$why"; stop_target; return; }
    dd if=/dev/urandom of="$DEV" bs=1M count=16 oflag=direct status=none || { fail sigterm "dd failed"; cleanup_all; return; }
    kill -TERM "$DPID"
    for i in $(seq 300); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$DPID" 2>/dev/null; then fail sigterm "daemon alive 30 s after SIGTERM"; cleanup_all; return; fi
    [ -e "$DEV" ] && { fail sigterm "$DEV still exists"; cleanup_all; return; }
    [ -e /run/ublk-mirror/m-sigterm.sock ] && { fail sigterm "socket left behind"; cleanup_all; return; }
    stop_target
    why=$(same_volumes "$tag") || { fail sigterm "$why"; return; }
    pass sigterm
    rm -f "$W/$tag-src.img" "$W/$tag-tgt.img"
}

# case_recover (issue 14, crash recovery): the primary daemon is killed with -9 ten times at random
# points under fio with verify; each time the kernel holds the device's I/O (ublk user recovery)
# and `start` takes the same /dev/ublkbN over, resyncing its write intent; fio finishes clean and
# the volumes converge.
case_recover() {
    local tag=recover why fpid id i kills=0 rc
    new_volumes "$tag"
    start_target "$tag" || { fail recover "target did not start"; return; }
    # A small activity log: each restart resyncs at most 8 MiB of chunks, not the 1 GiB default
    # (the whole volume here), so that a kill comes every few seconds.
    start_daemon m-rec "$tag" async --intent-keep 8M >"$W/why" 2>&1 || { why=$(cat "$W/why"); fail recover "$why"; stop_target; return; }
    id=${DEV#/dev/ublkb}
    # fio runs again whenever it finishes before the tenth kill; every run must verify clean.
    local runs=0
    rec_start_fio() {
        runs=$((runs + 1))
        fio --name=rec --filename="$DEV" --rw=randwrite --bs=4k --size=96M --ioengine=libaio --iodepth=16 \
            --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
            --output="$OUT/fio-recover-$runs.txt" >/dev/null 2>&1 &
        fpid=$!
    }
    rec_fio_done() {
        wait "$fpid"
        rc=$?
        [ "$rc" -eq 0 ] && return 0
        why="fio run $runs failed (exit $rc) after $kills kills: $(grep -m1 -iE 'error|verify' "$OUT/fio-recover-$runs.txt")"
        return 1
    }
    rec_start_fio
    for i in $(seq 10); do
        sleep "$((RANDOM % 2)).$((RANDOM % 10))"
        if ! kill -0 "$fpid" 2>/dev/null; then
            rec_fio_done || { fail recover "$why"; cleanup_all; return; }
            [ "$runs" -lt 4 ] || { fail recover "fio ran $runs times for $kills kills"; cleanup_all; return; }
            rec_start_fio
            sleep 1
        fi
        kill -9 "$DPID"
        for _ in $(seq 50); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.1; done
        [ -e "/sys/class/ublk-char/ublkc$id" ] || { fail recover "kill $i: the device went with the daemon"; cleanup_all; return; }
        start_daemon m-rec "$tag" async --intent-keep 8M >"$W/why" 2>&1 || { why=$(cat "$W/why"); fail recover "restart $i: $why"; kill -9 "$fpid"; cleanup_all; return; }
        [ "$DEV" = "/dev/ublkb$id" ] || { fail recover "restart $i made $DEV, not /dev/ublkb$id"; kill -9 "$fpid"; cleanup_all; return; }
        grep -q "taking over /dev/ublkb$id" "$OUT/daemon-m-rec.log" \
            || { fail recover "restart $i did not take the device over"; kill -9 "$fpid"; cleanup_all; return; }
        kills=$i
    done
    rec_fio_done || { fail recover "$why"; cleanup_all; return; }
    why=$("$UM" wait-replicated last --name m-rec --timeout-secs 120 2>&1) || { fail recover "not converged: $why"; cleanup_all; return; }
    stop_daemon m-rec || { fail recover "daemon stop failed"; cleanup_all; return; }
    stop_target
    why=$(same_volumes "$tag") || { fail recover "$why"; return; }
    pass recover
    echo "    10 kills -9 under fio ($runs runs), /dev/ublkb$id taken over each time; $(grep -m1 -E 'write: IOPS' "$OUT/fio-recover-1.txt" | sed 's/^ *//'); fio verify clean; volumes identical"
    rm -f "$W/$tag-src.img" "$W/$tag-tgt.img"
}

# wait_resync NAME BYTES: until NAME's status shows a resync with more than BYTES durable on the
# target and some left (60 s at most)
wait_resync() {
    local st
    for _ in $(seq 600); do
        st=$("$UM" status --name "$1" --json 2>/dev/null) \
            && jq -e --argjson n "$2" '.resync != null and .resync.durable_bytes > $n
                and .resync.durable_bytes < .resync.total_bytes' <<<"$st" >/dev/null && return 0
        sleep 0.1
    done
    echo "no resync under way past $2 bytes: $st"
    return 1
}

# case_resync_interrupted (issue 14, DRBD's interrupted resync): the initial sync of 96 MiB of data
# is interrupted twice, first by kill -9 of the primary daemon (the restart copies everything
# again: the target holds none of its history until a full copy's end), then by kill -9 of the
# target (restarted, it takes the copy up where its durable seq stands); the pair converges, the
# target consistent and the volumes identical.
case_resync_interrupted() {
    local tag=resint name=m-ri why spid st rc
    new_volumes "$tag"
    dd if=/dev/urandom of="$W/$tag-src.img" bs=1M count=96 conv=notrunc status=none
    start_target "$tag" || { fail resync-interrupted "target did not start"; return; }
    local args=(start --name "$name" --volume "$W/$tag-src.img" --peer "127.0.0.1:$TPORT"
        --volume-id "$VID" --secret-file "$W/secret" --mode async --log-file "$OUT/daemon-$name.log")
    "$UM" "${args[@]}" >"$OUT/start-$name-1.out" 2>&1 &
    spid=$!
    why=$(wait_resync "$name" $((8 << 20))) || { fail resync-interrupted "first start: $why"; cleanup_all; return; }
    kill -9 "$("$UM" status --name "$name" --json | jq -r .pid)"
    # The start may have returned already (its device is ready once the copy is in the log).
    wait "$spid"
    "$UM" "${args[@]}" >"$OUT/start-$name-2.out" 2>&1 &
    spid=$!
    why=$(wait_resync "$name" $((8 << 20))) || { fail resync-interrupted "second start: $why"; cleanup_all; return; }
    grep -q "copying all" "$OUT/daemon-$name.log" \
        || { fail resync-interrupted "the restart did not copy in full again"; cleanup_all; return; }
    kill -9 "$TPID"
    sleep 1
    TARGET_STARTS=2 restart_target "$tag" || { fail resync-interrupted "target restart failed"; cleanup_all; return; }
    wait "$spid"
    rc=$?
    [ "$rc" -eq 0 ] || { fail resync-interrupted "start across the target's restart failed: $(cat "$OUT/start-$name-2.out")"; cleanup_all; return; }
    why=$("$UM" wait-replicated last --name "$name" --timeout-secs 180 2>&1) || { fail resync-interrupted "not converged: $why"; cleanup_all; return; }
    st=$("$UM" status --name "$name" --json)
    jq -e '.resync == null and .peer_data == "up to date"' <<<"$st" >/dev/null \
        || { fail resync-interrupted "status after the resync: $(jq -c '{resync, peer_data}' <<<"$st")"; cleanup_all; return; }
    stop_daemon "$name" || { fail resync-interrupted "daemon stop failed"; cleanup_all; return; }
    stop_target
    why=$(same_volumes "$tag") || { fail resync-interrupted "$why"; return; }
    pass resync-interrupted
    echo "    primary killed, then target killed during the initial sync of 96 MiB of data; $(jq -c .seq <<<"$st"); volumes identical"
    rm -f "$W/$tag-src.img" "$W/$tag-tgt.img"
}

case_delete() {
    local tag=del why out id
    new_volumes "$tag"
    start_target "$tag" || { fail list-delete "target did not start"; return; }
    start_daemon m-del "$tag" async >"$W/why" 2>&1 || { why=$(cat "$W/why"); fail list-delete "$why"; stop_target; return; }
    out=$("$UM" list 2>&1)
    echo "$out" >"$OUT/list.txt"
    grep -q "m-del.*$DEV" <<<"$out" && pass list || fail list "m-del not listed: $out"
    "$UM" delete --name m-del >"$OUT/delete.out" 2>&1 && [ ! -e "$DEV" ] && pass delete \
        || fail delete "$(cat "$OUT/delete.out")"
    # a daemon killed with -9 leaves its device behind: delete removes it
    start_daemon m-del "$tag" async >"$W/why" 2>&1 || { why=$(cat "$W/why"); fail delete-stale "$why"; stop_target; return; }
    id=${DEV#/dev/ublkb}
    kill -9 "$DPID"
    sleep 0.5
    [ -e "/sys/class/ublk-char/ublkc$id" ] || note "note: no stale device after SIGKILL"
    if "$UM" delete --name m-del >"$OUT/delete-stale.out" 2>&1 && [ ! -e "/sys/class/ublk-char/ublkc$id" ]; then
        pass delete-stale
    else
        fail delete-stale "$(cat "$OUT/delete-stale.out")"
    fi
    stop_target
    rm -f "$W/$tag-src.img" "$W/$tag-tgt.img"
}

# fio_perf NAME DEVICE QD: one 4 KiB random-write run; prints "IOPS MEAN_LAT_US"
fio_perf() {
    fio --name="$1" --filename="$2" --rw=randwrite --bs=4k --size=128M --ioengine=libaio --iodepth="$3" \
        --direct=1 --time_based --runtime="$PERF_SECS" --ramp_time=1 --output-format=json \
        --output="$OUT/perf-$1.json" >/dev/null 2>&1 || { echo "- -"; return; }
    jq -r '.jobs[0].write | "\(.iops|floor) \(.lat_ns.mean/1000|floor)"' "$OUT/perf-$1.json"
}

case_perf() {
    local table=$OUT/fio-table.md loopdev mode r1 r16 why
    {
        echo "fio 4 KiB random writes, libaio, direct, ${PERF_SECS} s per run, $(uname -r) VM ($(nproc) vCPU, software emulation)"
        echo ""
        echo "| device | QD1 IOPS | QD1 mean lat (us) | QD16 IOPS | QD16 mean lat (us) |"
        echo "|---|---:|---:|---:|---:|"
    } >"$table"
    truncate -s 256M "$W/loop.img"
    loopdev=$(losetup -f --show "$W/loop.img") || { fail perf "losetup failed"; return; }
    r1=$(fio_perf loop-qd1 "$loopdev" 1)
    r16=$(fio_perf loop-qd16 "$loopdev" 16)
    echo "| raw loop device | ${r1% *} | ${r1#* } | ${r16% *} | ${r16#* } |" >>"$table"
    losetup -d "$loopdev"
    rm -f "$W/loop.img"
    for mode in async sync lock-then-write; do
        new_volumes perf
        start_target perf || { fail perf "target did not start"; return; }
        start_daemon m-perf perf "$mode" >"$W/why" 2>&1 || { why=$(cat "$W/why"); fail perf "$why"; stop_target; return; }
        r1=$(fio_perf "$mode-qd1" "$DEV" 1)
        r16=$(fio_perf "$mode-qd16" "$DEV" 16)
        echo "| ublk-mirror $mode | ${r1% *} | ${r1#* } | ${r16% *} | ${r16#* } |" >>"$table"
        stop_daemon m-perf || fail perf "stop failed"
        stop_target
        rm -f "$W/perf-src.img" "$W/perf-tgt.img"*
    done
    cat "$table"
    grep -q '| - ' "$table" && { fail perf "some fio runs failed"; return; }
    pass perf-table
}

# case_blockdev512: the local volume is a block device (a loop device), with 512-byte logical
# blocks and one queue; fio verify on the mirrored device, then a byte comparison.
case_blockdev512() {
    local tag=bd512 why loopdev
    new_volumes "$tag"
    # A block device holds its metadata area behind the data: --create-size says where it starts.
    truncate -s $((SIZE + (1 << 20))) "$W/$tag-src.img"
    loopdev=$(losetup --find --show "$W/$tag-src.img") || { fail blockdev512 "losetup failed"; return; }
    PORT=$((PORT + 1))
    TPORT=$PORT
    "$TS" --listen "127.0.0.1:$TPORT" --volume "$W/$tag-tgt.img" --create-size "$SIZE" --block-bytes 512 \
        --volume-id "$VID" --secret-file "$W/secret" >"$OUT/target-$tag.log" 2>&1 &
    TPID=$!
    for _ in $(seq 100); do grep -q "listening on" "$OUT/target-$tag.log" && break; sleep 0.1; done
    if ! "$UM" start --name m-bd512 --volume "$loopdev" --create-size "$SIZE" --peer "127.0.0.1:$TPORT" \
        --volume-id "$VID" --secret-file "$W/secret" --mode received --block-bytes 512 --queues 1 \
        --log-file "$OUT/daemon-m-bd512.log" >"$OUT/start-m-bd512.out" 2>&1; then
        fail blockdev512 "start failed: $(cat "$OUT/start-m-bd512.out")"
        stop_target; losetup -d "$loopdev"; return
    fi
    DEV=$("$UM" status --name m-bd512 --json | jq -r .device)
    if [ "$(blockdev --getss "$DEV")" != 512 ]; then
        fail blockdev512 "$DEV has $(blockdev --getss "$DEV")-byte logical blocks, expected 512"
        cleanup_all; losetup -d "$loopdev"; return
    fi
    if ! fio --name=bd512 --filename="$DEV" --rw=randwrite --bsrange=512-16k --size=8M --ioengine=libaio \
        --iodepth=8 --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
        --output="$OUT/fio-bd512.txt" >/dev/null 2>&1; then
        fail blockdev512 "fio verify failed: $(grep -m1 -iE 'verify|error' "$OUT/fio-bd512.txt")"
        cleanup_all; losetup -d "$loopdev"; return
    fi
    why=$("$UM" wait-replicated last --name m-bd512 --timeout-secs 120 2>&1) || { fail blockdev512 "$why"; cleanup_all; losetup -d "$loopdev"; return; }
    stop_daemon m-bd512 || { fail blockdev512 "daemon stop failed"; cleanup_all; losetup -d "$loopdev"; return; }
    stop_target
    losetup -d "$loopdev"
    why=$(same_volumes "$tag") || { fail blockdev512 "$why"; return; }
    pass blockdev512
    echo "    $(grep -m1 -E 'write: IOPS' "$OUT/fio-bd512.txt" | sed 's/^ *//'); $why"
    rm -f "$W/$tag-src.img" "$W/$tag-tgt.img"
}

# case_target_blockdev: the target's volume is a block device (a loop device with room for the
# metadata area). Without a record it is initialised as NOT consistent (nothing vouches for what a
# device already holds); the primary finds it without its history and copies the whole volume
# (issue 14, failure 3: the initial sync), then fio writes; a restart resumes from the record at
# the end of the device (its durable seq), consistent since the copy ended.
case_target_blockdev() {
    local tag=tbd why loopdev log=$OUT/target-tbd.log
    new_volumes "$tag"
    truncate -s $((SIZE + (1 << 20))) "$W/$tag-tgt.img"
    loopdev=$(losetup --find --show "$W/$tag-tgt.img") || { fail target-blockdev "losetup failed"; return; }
    tbd_target() {
        "$TS" --listen "127.0.0.1:$TPORT" --volume "$loopdev" --create-size "$SIZE" --volume-id "$VID" \
            --secret-file "$W/secret" "$@" >>"$log" 2>&1 &
        TPID=$!
        TPIDS+=("$TPID")
    }
    PORT=$((PORT + 1))
    TPORT=$PORT
    : >"$log"
    tbd_target
    for _ in $(seq 100); do grep -q "listening on" "$log" && break; sleep 0.1; done
    if ! grep -q "initialised at durable seq 0 as NOT consistent" "$log"; then
        fail target-blockdev "a device without metadata was not initialised as not consistent: $(tail -n 3 "$log")"
        cleanup_all; losetup -d "$loopdev"; return
    fi
    if ! "$UM" start --name m-tbd --volume "$W/$tag-src.img" --peer "127.0.0.1:$TPORT" --volume-id "$VID" \
        --secret-file "$W/secret" --mode sync --log-file "$OUT/daemon-m-tbd.log" >"$OUT/start-m-tbd.out" 2>&1; then
        fail target-blockdev "start failed: $(cat "$OUT/start-m-tbd.out")"
        cleanup_all; losetup -d "$loopdev"; return
    fi
    DEV=$("$UM" status --name m-tbd --json | jq -r .device)
    if ! fio --name=tbd --filename="$DEV" --rw=randwrite --bs=4k --size=8M --ioengine=libaio --iodepth=8 \
        --direct=1 --output="$OUT/fio-tbd.txt" >/dev/null 2>&1; then
        fail target-blockdev "fio failed: $(grep -m1 -iE 'error' "$OUT/fio-tbd.txt")"
        cleanup_all; losetup -d "$loopdev"; return
    fi
    stop_daemon m-tbd || { fail target-blockdev "daemon stop failed"; cleanup_all; losetup -d "$loopdev"; return; }
    stop_target
    if ! why=$(cmp -n "$SIZE" "$W/$tag-src.img" "$loopdev" 2>&1); then
        fail target-blockdev "data area differs: $why"; cleanup_all; losetup -d "$loopdev"; return
    fi
    : >"$log"
    tbd_target
    for _ in $(seq 100); do grep -q "listening on" "$log" && break; sleep 0.1; done
    if ! grep -q "copying all $SIZE bytes" "$OUT/start-m-tbd.out" "$OUT/daemon-m-tbd.log"; then
        fail target-blockdev "the start did not copy the volume: $(cat "$OUT/start-m-tbd.out")"
        cleanup_all; losetup -d "$loopdev"; return
    fi
    if ! grep -qE "volume opened.*durable=[1-9][0-9]*.*consistent=true" "$log"; then
        fail target-blockdev "the restart did not resume from the device's record as consistent: $(grep -m2 -E 'volume opened|NOT' "$log")"
        cleanup_all; losetup -d "$loopdev"; return
    fi
    stop_target
    losetup -d "$loopdev"
    pass target-blockdev
    echo "    $(grep -m1 -E 'write: IOPS' "$OUT/fio-tbd.txt" | sed 's/^ *//'); initial sync of $SIZE bytes; data area identical"
    rm -f "$W/$tag-src.img" "$W/$tag-tgt.img"
}

# case_restart (issue 14, failures 1 and 4): a primary stopped cleanly restarts on the same volume
# and target and continues the sequence, a mounted filesystem's files intact; after kill -9 of
# the daemon while ext4 is mounted and the target lags behind (async), the restart takes the
# device over (the mount goes on), resyncs the chunks of its stored write intent, the files are
# intact and the volumes converge.
case_restart() {
    local tag=restart why st seq1 seq2
    new_volumes "$tag"
    start_target "$tag" || { fail restart "target did not start"; return; }
    start_daemon m-rs "$tag" async >"$W/why" 2>&1 || { why=$(cat "$W/why"); fail restart "$why"; stop_target; return; }
    mkfs.ext4 -q -F "$DEV" >"$OUT/mkfs-restart.out" 2>&1 || { fail restart "mkfs failed"; cleanup_all; return; }
    mount "$DEV" "$MNT" || { fail restart "mount failed"; cleanup_all; return; }
    write_files "$MNT" 30 || { fail restart "writing files failed"; cleanup_all; return; }
    rm -rf "$W/ref-restart" && cp -a "$MNT" "$W/ref-restart"
    umount "$MNT"
    seq1=$("$UM" status --name m-rs --json | jq -r .seq.last_local)
    stop_daemon m-rs || { fail restart "stop failed"; cleanup_all; return; }
    grep -q "recorded a clean stop at seq $seq1" "$OUT/daemon-m-rs.log" \
        || { fail restart "no clean stop at seq $seq1 in the daemon's log"; cleanup_all; return; }
    start_daemon m-rs "$tag" async >"$W/why" 2>&1 || { why=$(cat "$W/why"); fail restart "restart refused: $why"; stop_target; return; }
    grep -q "resuming after a clean stop" "$OUT/daemon-m-rs.log" \
        || { fail restart "the restart did not resume"; cleanup_all; return; }
    mount "$DEV" "$MNT" || { fail restart "mount after the restart failed"; cleanup_all; return; }
    why=$(diff -r "$W/ref-restart" "$MNT" 2>&1 | head -n 3)
    [ -z "$why" ] || { fail restart "files changed across the restart: $why"; cleanup_all; return; }
    dd if=/dev/urandom of="$MNT/more" bs=1M count=4 status=none && sync
    umount "$MNT"
    seq2=$("$UM" status --name m-rs --json | jq -r .seq.last_local)
    [ "$seq2" -gt "$seq1" ] || { fail restart "the sequence did not continue: $seq1 then $seq2"; cleanup_all; return; }
    why=$("$UM" wait-replicated last --name m-rs --timeout-secs 120 2>&1) || { fail restart "$why"; cleanup_all; return; }
    why=$(same_volumes "$tag") || { fail restart "after the resumed run: $why"; cleanup_all; return; }
    mount "$DEV" "$MNT" || { fail restart "mount before the kill failed"; cleanup_all; return; }
    dd if=/dev/urandom of="$MNT/unsynced" bs=1M count=16 status=none && sync
    rm -rf "$W/ref-restart" && cp -a "$MNT" "$W/ref-restart"
    # Killed while the filesystem is mounted: the device stays (quiesced) and the next start
    # takes it over; the mount goes on without an error.
    kill -9 "$DPID"
    for _ in $(seq 50); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.1; done
    start_daemon m-rs "$tag" async >"$W/why" 2>&1 || { why=$(cat "$W/why"); fail restart "restart after kill -9 refused: $why"; cleanup_all; return; }
    grep -q "did not stop cleanly: resyncing" "$OUT/daemon-m-rs.log" \
        || { fail restart "the restart after kill -9 did not resync"; cleanup_all; return; }
    grep -q "taking over $DEV" "$OUT/daemon-m-rs.log" \
        || { fail restart "the restart after kill -9 did not take the mounted device over"; cleanup_all; return; }
    st=$("$UM" status --name m-rs --json)
    jq -e '.intent.stored_chunks > 0' <<<"$st" >/dev/null \
        || { fail restart "status shows no stored write intent: $st"; cleanup_all; return; }
    why=$(diff -r "$W/ref-restart" "$MNT" 2>&1 | head -n 3)
    [ -z "$why" ] || { fail restart "files changed across kill -9: $why"; cleanup_all; return; }
    dd if=/dev/urandom of="$MNT/after-kill" bs=1M count=4 status=none && sync \
        || { fail restart "the mount does not take writes after the takeover"; cleanup_all; return; }
    umount "$MNT" || { fail restart "umount after the takeover failed"; cleanup_all; return; }
    mount "$DEV" "$MNT" && why=$(diff -r "$W/ref-restart" "$MNT" 2>&1 | grep -v "Only in $MNT: after-kill" | head -n 3)
    umount "$MNT"
    [ -z "$why" ] || { fail restart "files changed across the takeover: $why"; cleanup_all; return; }
    why=$("$UM" wait-replicated last --name m-rs --timeout-secs 120 2>&1) || { fail restart "$why"; cleanup_all; return; }
    why=$(same_volumes "$tag") || { fail restart "after the resync: $why"; cleanup_all; return; }
    stop_daemon m-rs || { fail restart "stop after the resync failed"; cleanup_all; return; }
    stop_target
    pass restart
    echo "    clean stop at seq $seq1, resumed through seq $seq2; kill -9 with ext4 mounted, device taken over, resync: volumes identical"
    rm -f "$W/$tag-src.img" "$W/$tag-tgt.img" && rm -rf "$W/ref-restart"
}

# case_degraded (issue 14, failure 2): a primary stopped cleanly restarts while its target is
# down: after --connect-timeout-secs it starts degraded and serves ext4; once the target is back
# the logged writes reach it, the files are intact and the volumes converge.
case_degraded() {
    local tag=degraded why st
    new_volumes "$tag"
    start_target "$tag" || { fail degraded "target did not start"; return; }
    start_daemon m-dg "$tag" async >"$W/why" 2>&1 || { why=$(cat "$W/why"); fail degraded "$why"; stop_target; return; }
    mkfs.ext4 -q -F "$DEV" >"$OUT/mkfs-degraded.out" 2>&1 || { fail degraded "mkfs failed"; cleanup_all; return; }
    why=$("$UM" wait-replicated last --name m-dg --timeout-secs 120 2>&1) || { fail degraded "$why"; cleanup_all; return; }
    stop_daemon m-dg || { fail degraded "stop failed"; cleanup_all; return; }
    stop_target
    start_daemon m-dg "$tag" async --connect-timeout-secs 2 >"$W/why" 2>&1 \
        || { why=$(cat "$W/why"); fail degraded "the start without the target failed: $why"; cleanup_all; return; }
    grep -q "starting DEGRADED" "$OUT/start-m-dg.out" "$OUT/daemon-m-dg.log" \
        || { fail degraded "the start does not say it is degraded"; cleanup_all; return; }
    mount "$DEV" "$MNT" || { fail degraded "mount failed"; cleanup_all; return; }
    write_files "$MNT" 20 || { fail degraded "writing files failed"; cleanup_all; return; }
    rm -rf "$W/ref-degraded" && cp -a "$MNT" "$W/ref-degraded"
    umount "$MNT"
    st=$("$UM" status --name m-dg --json)
    jq -e '.connection != "connected" and .lag.entries > 0 and (.peer_data | startswith("unknown"))' <<<"$st" >/dev/null \
        || { fail degraded "status does not show the missing target and the lag: $st"; cleanup_all; return; }
    TARGET_STARTS=2 restart_target "$tag" || { fail degraded "target did not restart"; cleanup_all; return; }
    why=$("$UM" wait-replicated last --name m-dg --timeout-secs 120 2>&1) || { fail degraded "$why"; cleanup_all; return; }
    jq -e '.peer_data == "up to date"' <<<"$("$UM" status --name m-dg --json)" >/dev/null \
        || { fail degraded "status does not call the caught-up target up to date: $("$UM" status --name m-dg --json | jq -c .peer_data)"; cleanup_all; return; }
    why=$(same_volumes "$tag") || { fail degraded "after the target returned: $why"; cleanup_all; return; }
    mount "$DEV" "$MNT" || { fail degraded "mount after the catch-up failed"; cleanup_all; return; }
    why=$(diff -r "$W/ref-degraded" "$MNT" 2>&1 | head -n 3)
    [ -z "$why" ] || { fail degraded "files changed: $why"; cleanup_all; return; }
    umount "$MNT"
    stop_daemon m-dg || { fail degraded "stop after the catch-up failed"; cleanup_all; return; }
    stop_target
    pass degraded
    echo "    started without the target, $(jq -r .lag.entries <<<"$st") writes logged, shipped once it returned: volumes identical"
    rm -f "$W/$tag-src.img" "$W/$tag-tgt.img" && rm -rf "$W/ref-degraded"
}

# case_overflow (issue 14, failure 6): the target goes away for longer than
# --overflow-after-secs under a mounted ext4: writes go on at local speed, recorded out of sync
# in the write intent (status says OVERFLOWING and calls the peer outdated); once the target is
# back, a resync copies those chunks while more files are written, status calls the peer up to
# date, and the volumes are identical.
case_overflow() {
    local tag=overflow why st
    new_volumes "$tag"
    start_target "$tag" || { fail overflow "target did not start"; return; }
    start_daemon m-ov "$tag" async --overflow-after-secs 2 >"$W/why" 2>&1 || { why=$(cat "$W/why"); fail overflow "$why"; stop_target; return; }
    mkfs.ext4 -q -F "$DEV" >"$OUT/mkfs-overflow.out" 2>&1 || { fail overflow "mkfs failed"; cleanup_all; return; }
    mount "$DEV" "$MNT" || { fail overflow "mount failed"; cleanup_all; return; }
    write_files "$MNT/before" 12 || { fail overflow "writing files failed"; cleanup_all; return; }
    why=$("$UM" wait-replicated last --name m-ov --timeout-secs 120 2>&1) || { fail overflow "$why"; cleanup_all; return; }
    stop_target
    sleep 3
    write_files "$MNT/cut" 30 || { fail overflow "writing files while the target was gone failed"; cleanup_all; return; }
    st=$("$UM" status --name m-ov --json)
    jq -e '.overflow.cause != null and .overflow.out_of_sync_chunks > 0 and (.peer_data | startswith("outdated"))' <<<"$st" >/dev/null \
        || { fail overflow "status does not show the overflow: $(jq -c '{peer_data, overflow}' <<<"$st")"; cleanup_all; return; }
    "$UM" status --name m-ov | grep -q '^overflow .*OVERFLOWING' || { fail overflow "the status table lacks the overflow"; cleanup_all; return; }
    TARGET_STARTS=2 restart_target "$tag" || { fail overflow "target did not restart"; cleanup_all; return; }
    write_files "$MNT/resync" 12 || { fail overflow "writing files during the resync failed"; cleanup_all; return; }
    why=$("$UM" wait-replicated last --name m-ov --timeout-secs 120 2>&1) || { fail overflow "$why"; cleanup_all; return; }
    st=$("$UM" status --name m-ov --json)
    jq -e '.peer_data == "up to date" and .overflow.cause == null and .overflow.out_of_sync_writes > 0' <<<"$st" >/dev/null \
        || { fail overflow "status after the resync: $(jq -c '{peer_data, overflow}' <<<"$st")"; cleanup_all; return; }
    umount "$MNT"
    why=$(same_volumes "$tag") || { fail overflow "after the resync: $why"; cleanup_all; return; }
    stop_daemon m-ov || { fail overflow "stop failed"; cleanup_all; return; }
    stop_target
    pass overflow
    echo "    $(jq -r .overflow.out_of_sync_writes <<<"$st") writes out of sync while the target was gone, resynced: volumes identical"
}

# case_target_lost (issue 14, failure 5): the target's volume is lost while the primary runs with
# ext4 mounted (kill -9 of the target, a new empty volume in its place, restarted): the primary
# has it continue after its own seq and copies the whole volume while files are written; the
# mount goes on, status comes back to up to date, the volumes are identical.
case_target_lost() {
    local tag=tlost why st
    new_volumes "$tag"
    start_target "$tag" || { fail target-lost "target did not start"; return; }
    start_daemon m-tl "$tag" async >"$W/why" 2>&1 || { why=$(cat "$W/why"); fail target-lost "$why"; stop_target; return; }
    mkfs.ext4 -q -F "$DEV" >"$OUT/mkfs-tlost.out" 2>&1 || { fail target-lost "mkfs failed"; cleanup_all; return; }
    mount "$DEV" "$MNT" || { fail target-lost "mount failed"; cleanup_all; return; }
    write_files "$MNT/before" 12 || { fail target-lost "writing files failed"; cleanup_all; return; }
    why=$("$UM" wait-replicated last --name m-tl --timeout-secs 120 2>&1) || { fail target-lost "$why"; cleanup_all; return; }
    kill -9 "$TPID"; wait "$TPID" 2>/dev/null
    rm -f "$W/$tag-tgt.img"
    TARGET_STARTS=2 restart_target "$tag" || { fail target-lost "target did not restart"; cleanup_all; return; }
    write_files "$MNT/during" 24 || { fail target-lost "writing files during the full copy failed"; cleanup_all; return; }
    why=$("$UM" wait-replicated last --name m-tl --timeout-secs 180 2>&1) || { fail target-lost "$why"; cleanup_all; return; }
    grep -q "holds none of this volume's data any more" "$OUT/daemon-m-tl.log" \
        || { fail target-lost "the daemon's log does not report the loss"; cleanup_all; return; }
    grep -q "the source copies this volume in full" "$OUT/target-$tag.log" \
        || { fail target-lost "the target's log does not report the full copy"; cleanup_all; return; }
    st=$("$UM" status --name m-tl --json)
    jq -e '.peer_data == "up to date" and .fatal == null and .overflow.cause == null
        and (.last_error | contains("holds none of this volume'"'"'s data any more"))' <<<"$st" >/dev/null \
        || { fail target-lost "status after the copy: $(jq -c '{peer_data, fatal, last_error, overflow}' <<<"$st")"; cleanup_all; return; }
    umount "$MNT"
    why=$(same_volumes "$tag") || { fail target-lost "after the copy: $why"; cleanup_all; return; }
    stop_daemon m-tl || { fail target-lost "stop failed"; cleanup_all; return; }
    stop_target
    pass target-lost
    echo "    the target's volume replaced under a mounted ext4: copied in full while 24 files were written, volumes identical"
}

# case_passthrough: the device with the mirror off (--no-mirror): no peer needed, fio verifies,
# status says so, mirror requests are refused with one clear line.
case_passthrough() {
    local tag=pt st
    truncate -s "$SIZE" "$W/$tag-src.img"
    if ! "$UM" start --name m-pt --volume "$W/$tag-src.img" --no-mirror --log-file "$OUT/daemon-m-pt.log" \
        >"$OUT/start-m-pt.out" 2>&1; then
        fail passthrough "start failed: $(cat "$OUT/start-m-pt.out")"
        return
    fi
    st=$("$UM" status --name m-pt --json)
    DEV=$(jq -r .device <<<"$st")
    [ "$(jq -r '.role + " " + .connection + " " + .mode' <<<"$st")" = "passthrough off off" ] \
        || { fail passthrough "status does not say passthrough: $st"; cleanup_all; return; }
    "$UM" status --name m-pt | grep -q '^mirror *off' || { fail passthrough "status table lacks 'mirror off'"; cleanup_all; return; }
    if ! fio --name=v-pt --filename="$DEV" --rw=randwrite --bsrange=4k-64k --size=32M --ioengine=libaio \
        --iodepth=16 --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
        --output="$OUT/fio-pt.txt" >/dev/null 2>&1; then
        fail passthrough "fio verify failed: $(grep -m1 -iE 'verify|error' "$OUT/fio-pt.txt")"
        cleanup_all
        return
    fi
    expect_error passthrough-set-mode "--no-mirror" "$UM" set-mode sync --name m-pt
    expect_error passthrough-wait-replicated "--no-mirror" "$UM" wait-replicated last --name m-pt
    stop_daemon m-pt || { fail passthrough "stop failed"; cleanup_all; return; }
    [ -e "$DEV" ] && { fail passthrough "$DEV still exists after stop"; return; }
    pass passthrough
    echo "    $(grep -m1 -E 'write: IOPS' "$OUT/fio-pt.txt" | sed 's/^ *//')"
    rm -f "$W/$tag-src.img"
}

cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(errors ext4 xfs fio overlap blockdev512 target-blockdev passthrough restart degraded overflow target-lost recover resync-interrupted kill9 sigterm delete perf)
for c in "${cases[@]}"; do
    note "case $c"
    case "$c" in
        errors) case_errors ;;
        ext4) case_fs ext4 async ;;
        xfs) case_fs xfs received ;;
        fio) for m in async received sync lock-then-write; do case_fio "$m"; done ;;
        fio-*) case_fio "${c#fio-}" ;;
        overlap) case_overlap ;;
        kill9) case_kill9 ;;
        sigterm) case_sigterm ;;
        delete) case_delete ;;
        blockdev512) case_blockdev512 ;;
        target-blockdev) case_target_blockdev ;;
        passthrough) case_passthrough ;;
        restart) case_restart ;;
        degraded) case_degraded ;;
        overflow) case_overflow ;;
        target-lost) case_target_lost ;;
        recover) case_recover ;;
        resync-interrupted) case_resync_interrupted ;;
        perf) case_perf ;;
        *) fail "$c" "unknown case" ;;
    esac
    cleanup_all
    # A failed case leaves its volumes; the VM's /tmp is memory.
    rm -f "$W"/*.img
done
echo "vm-suite: $(($(date +%s) - T0)) s inside the VM"
finish
