#!/bin/bash
# tests/vm/bench.sh — the side-by-side benchmark (issue 4). Runs INSIDE the VM (scripts/bench boots
# it), as root, with the binaries already built on the host.
#
# usage: tests/vm/bench.sh OUTDIR
#
# For each emulated round-trip time (netem on lo) and each configuration, runs fio workloads and
# writes OUTDIR/bench.md (markdown table), OUTDIR/bench.json (every run and the medians) and logs.
# Configurations: loop (raw loop device on a file, not network dependent: measured once, at the
# first RTT), ublk-mirror async/received/sync/lock-then-write (volumes are files in /tmp, the
# target-server on 127.0.0.1), drbd-A / drbd-C (DRBD 8.4 kernel module, two resources in this one
# kernel connected over 127.0.0.1:7789 <-> 127.0.0.1:7790, each on its own loop device).
# Workloads: rand4k-qd1, rand4k-qd16 (4 KiB random writes), seq1m-qd4 (1 MiB sequential writes,
# iodepth 4); libaio, O_DIRECT, 1 s ramp then BENCH_SECS measured. Each cell is the median of
# BENCH_RUNS runs (median taken per metric).
#
# RTT emulation: `tc qdisc add dev lo root netem delay Dms` delays every packet leaving lo by D;
# a request and its answer each leave lo once, so the round trip is 2*D. The script sets D = RTT/2
# and MEASURES the TCP round trip on 127.0.0.1 (python echo, median of 50) into the output.
#
# environment: UBLK_MIRROR_BIN_DIR (default <repo>/target/release), BENCH_RTTS (default "0 2 10",
#   in ms), BENCH_RUNS (default 3), BENCH_SECS (default 5),
#   BENCH_CONFIGS (default "loop async received sync lock-then-write drbd-A drbd-C"),
#   BENCH_WORKLOADS (default "rand4k-qd1 rand4k-qd16 seq1m-qd4").
# Exit status: 0 if every cell produced a number; 1 otherwise (the table shows `-` for those).
set -u

OUT=${1:?usage: bench.sh OUTDIR}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${UBLK_MIRROR_BIN_DIR:-$REPO/target/release}
UM=$BIN/ublk-mirror
TS=$BIN/target-server
RTTS=${BENCH_RTTS:-"0 2 10"}
RUNS=${BENCH_RUNS:-3}
SECS=${BENCH_SECS:-5}
CONFIGS=${BENCH_CONFIGS:-"loop async received sync lock-then-write drbd-A drbd-C"}
WORKLOADS=${BENCH_WORKLOADS:-"rand4k-qd1 rand4k-qd16 seq1m-qd4"}
export UBLK_MIRROR_RUN_DIR=/run/ublk-mirror
W=/tmp/bench
VID=be4c0000aaaa4bbbcccc0123456789ab
SIZE=$((256 << 20))
DRBDSETUP=/lib/drbd/drbdsetup-84
RESULTS=$OUT/results.jsonl # one JSON object per fio run
FAILED=0
T0=$(date +%s)

note() { echo "[$(date +%T) +$(($(date +%s) - T0))s] $*"; }
die() { echo "bench: ERROR: $*" >&2; cleanup; exit 1; }

TPID=""
cleanup() {
    tc qdisc del dev lo root 2>/dev/null
    for s in /run/ublk-mirror/*.sock; do
        [ -e "$s" ] || continue
        timeout 60 "$UM" stop --name "$(basename "$s" .sock)" >/dev/null 2>&1 \
            || timeout 30 "$UM" delete --name "$(basename "$s" .sock)" >/dev/null 2>&1
    done
    [ -n "$TPID" ] && kill -9 "$TPID" 2>/dev/null
    drbd_down
    losetup -D 2>/dev/null
}

echo "bench: kernel $(uname -r), $(nproc) cpus, binaries from $BIN"
echo "bench: rtts='$RTTS' runs=$RUNS secs=$SECS configs='$CONFIGS' workloads='$WORKLOADS'"
for t in fio jq tc losetup python3; do command -v "$t" >/dev/null || die "missing tool $t (run scripts/vm/setup)"; done
for b in "$UM" "$TS"; do [ -x "$b" ] || die "missing binary $b (run cargo build --release --workspace)"; done
modprobe ublk_drv || die "modprobe ublk_drv failed"
modprobe loop || die "modprobe loop failed"
modprobe sch_netem || die "modprobe sch_netem failed"
if [[ " $CONFIGS " == *" drbd-"* ]]; then
    modprobe drbd || die "modprobe drbd failed"
    [ -x "$DRBDSETUP" ] || die "$DRBDSETUP missing (drbd-utils)"
    command -v drbdmeta >/dev/null || die "drbdmeta missing (drbd-utils)"
    echo "bench: $(head -n1 /proc/drbd)"
fi
ip link set lo up 2>/dev/null
rm -rf "$W" && mkdir -p "$W" || exit 1
echo "bench-secret-$RANDOM$RANDOM$RANDOM" >"$W/secret"
: >"$RESULTS"

# --- link emulation ------------------------------------------------------------------------------
set_rtt() { # set_rtt MS: netem delay MS/2 on lo (no qdisc for 0)
    tc qdisc del dev lo root 2>/dev/null
    [ "$1" = 0 ] && return 0
    local half
    half=$(awk -v r="$1" 'BEGIN { printf "%gms", r / 2 }')
    tc qdisc add dev lo root netem delay "$half" limit 100000 || die "tc netem failed"
}

measure_rtt() { # prints the median TCP echo round trip on 127.0.0.1 in ms
    timeout 60 python3 - <<'EOF'
import socket, statistics, threading, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(1)
def echo():
    c, _ = srv.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        b = c.recv(1)
        if not b: return
        c.sendall(b)
threading.Thread(target=echo, daemon=True).start()
s = socket.create_connection(srv.getsockname()); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(50):
    t = time.perf_counter(); s.sendall(b"x"); s.recv(1); rtts.append((time.perf_counter() - t) * 1000)
print("%.2f" % statistics.median(rtts))
EOF
}

# --- fio -----------------------------------------------------------------------------------------
# run_fio CONFIG RTT WORKLOAD RUN DEV: one fio run, appends a JSON line to $RESULTS
run_fio() {
    local cfg=$1 rtt=$2 wl=$3 run=$4 dev=$5 args json
    case "$wl" in
        rand4k-qd1) args=(--rw=randwrite --bs=4k --iodepth=1 --size=128M) ;;
        rand4k-qd16) args=(--rw=randwrite --bs=4k --iodepth=16 --size=128M) ;;
        seq1m-qd4) args=(--rw=write --bs=1M --iodepth=4 --size=128M) ;;
        *) die "unknown workload $wl" ;;
    esac
    json=$OUT/fio/$cfg-rtt$rtt-$wl-$run.json
    mkdir -p "$OUT/fio"
    if ! timeout $((SECS + 120)) fio --name="$cfg-$wl" --filename="$dev" "${args[@]}" --ioengine=libaio --direct=1 \
        --time_based --runtime="$SECS" --ramp_time=1 --output-format=json --output="$json" \
        >"$json.err" 2>&1; then
        note "fio failed: $cfg rtt=$rtt $wl run $run: $(tail -n 2 "$json.err" | tr '\n' ' ')"
        return 1
    fi
    jq -c --arg cfg "$cfg" --argjson rtt "$rtt" --arg wl "$wl" --argjson run "$run" \
        '.jobs[0].write | {config: $cfg, rtt_ms: $rtt, workload: $wl, run: $run,
          iops: .iops, mib_s: (.bw_bytes / 1048576), lat_mean_us: (.lat_ns.mean / 1000),
          lat_p99_us: ((.clat_ns.percentile["99.000000"] // 0) / 1000)}' "$json" >>"$RESULTS"
}

# run_cell CONFIG RTT DEV: every workload, BENCH_RUNS times
run_cell() {
    local cfg=$1 rtt=$2 dev=$3 wl r
    for wl in $WORKLOADS; do
        for r in $(seq "$RUNS"); do
            run_fio "$cfg" "$rtt" "$wl" "$r" "$dev" || FAILED=1
        done
        note "  $cfg rtt=$rtt $wl: $(jq -r --arg c "$cfg" --argjson t "$rtt" --arg w "$wl" \
            'select(.config == $c and .rtt_ms == $t and .workload == $w) | "\(.iops|floor)"' "$RESULTS" | tr '\n' ' ')IOPS"
    done
}

# --- configurations ------------------------------------------------------------------------------
bench_loop() {
    local dev
    truncate -s "$SIZE" "$W/loop.img"
    dev=$(losetup -f --show "$W/loop.img") || { note "losetup failed"; FAILED=1; return; }
    run_cell loop "$1" "$dev"
    losetup -d "$dev"
    rm -f "$W/loop.img"
}

PORT=7700
bench_mirror() { # bench_mirror MODE RTT
    local mode=$1 rtt=$2 name=b-$1 log dev st
    PORT=$((PORT + 1))
    rm -f "$W"/m-src.img "$W"/m-tgt.img*
    truncate -s "$SIZE" "$W/m-src.img"
    log=$OUT/target-$mode-rtt$rtt.log
    "$TS" --listen "127.0.0.1:$PORT" --volume "$W/m-tgt.img" --create-size "$SIZE" --volume-id "$VID" \
        --secret-file "$W/secret" >"$log" 2>&1 &
    TPID=$!
    for _ in $(seq 100); do grep -q "listening on" "$log" && break; sleep 0.1; done
    if ! "$UM" start --name "$name" --volume "$W/m-src.img" --peer "127.0.0.1:$PORT" --volume-id "$VID" \
        --secret-file "$W/secret" --mode "$mode" --log-file "$OUT/daemon-$mode-rtt$rtt.log" \
        >"$OUT/start-$mode-rtt$rtt.out" 2>&1; then
        note "ublk-mirror start failed ($mode rtt=$rtt): $(cat "$OUT/start-$mode-rtt$rtt.out")"
        FAILED=1
    else
        st=$("$UM" status --name "$name" --json)
        dev=$(jq -r .device <<<"$st")
        if [ -b "$dev" ]; then
            run_cell "$mode" "$rtt" "$dev"
        else
            note "no block device for $mode: $st"
            FAILED=1
        fi
        timeout 120 "$UM" stop --name "$name" >"$OUT/stop-$mode-rtt$rtt.out" 2>&1 \
            || { note "stop failed: $(cat "$OUT/stop-$mode-rtt$rtt.out")"; timeout 30 "$UM" delete --name "$name" >/dev/null 2>&1; }
    fi
    kill -TERM "$TPID" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$TPID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$TPID" 2>/dev/null
    wait "$TPID" 2>/dev/null
    TPID=""
    rm -f "$W"/m-src.img "$W"/m-tgt.img*
}

# DRBD 8.4 with both ends in this kernel: drbdadm would need two `on HOST` sections, one of them
# local, so the resources are built with drbdsetup-84 directly. r0 (minor 0, primary) on loop A
# listens/connects 127.0.0.1:7789 -> 127.0.0.1:7790; r1 (minor 1, secondary) on loop B the
# other way round. Fresh metadata on both, then new-current-uuid --clear-bitmap skips the initial
# full sync (both sides are all zeros).
DRBD_LOOPS=()
drbd_down() {
    [ -x "$DRBDSETUP" ] || return 0
    [ -e /proc/drbd ] || return 0
    "$DRBDSETUP" down r0 >/dev/null 2>&1
    "$DRBDSETUP" down r1 >/dev/null 2>&1
    local l
    for l in "${DRBD_LOOPS[@]}"; do losetup -d "$l" 2>/dev/null; done
    DRBD_LOOPS=()
    rm -f "$W"/drbd-*.img
}

drbd_up() { # drbd_up PROTOCOL LOG: returns non-zero when r0 is not Connected/UpToDate primary
    local proto=$1 log=$2 l0 l1
    {
        truncate -s "$SIZE" "$W/drbd-0.img" "$W/drbd-1.img"
        l0=$(losetup -f --show "$W/drbd-0.img") || return 1
        DRBD_LOOPS+=("$l0")
        l1=$(losetup -f --show "$W/drbd-1.img") || return 1
        DRBD_LOOPS+=("$l1")
        echo "+ loops $l0 $l1"
        set -x
        drbdmeta --force 0 v08 "$l0" internal create-md || return 1
        drbdmeta --force 1 v08 "$l1" internal create-md || return 1
        "$DRBDSETUP" new-resource r0 || return 1
        "$DRBDSETUP" new-minor r0 0 0 || return 1
        "$DRBDSETUP" new-resource r1 || return 1
        "$DRBDSETUP" new-minor r1 1 0 || return 1
        "$DRBDSETUP" attach 0 "$l0" "$l0" internal || return 1
        "$DRBDSETUP" attach 1 "$l1" "$l1" internal || return 1
        "$DRBDSETUP" connect r0 ipv4:127.0.0.1:7789 ipv4:127.0.0.1:7790 --protocol="$proto" || return 1
        "$DRBDSETUP" connect r1 ipv4:127.0.0.1:7790 ipv4:127.0.0.1:7789 --protocol="$proto" || return 1
        set +x
        for _ in $(seq 300); do
            "$DRBDSETUP" cstate 0 2>/dev/null | grep -q '^Connected' && break
            sleep 0.1
        done
        cat /proc/drbd
        "$DRBDSETUP" new-current-uuid 0 --clear-bitmap=yes || return 1
        for _ in $(seq 300); do
            "$DRBDSETUP" dstate 0 2>/dev/null | grep -q '^UpToDate/UpToDate' && break
            sleep 0.1
        done
        "$DRBDSETUP" primary 0 || return 1
        sleep 0.5
        cat /proc/drbd
        "$DRBDSETUP" cstate 0 | grep -q '^Connected' && "$DRBDSETUP" dstate 0 | grep -q '^UpToDate/UpToDate' \
            && [ -b /dev/drbd0 ]
    } >>"$log" 2>&1
}

bench_drbd() { # bench_drbd PROTOCOL RTT
    local proto=$1 rtt=$2 log=$OUT/drbd-$1-rtt$2.log
    : >"$log"
    if drbd_up "$proto" "$log"; then
        run_cell "drbd-$proto" "$rtt" /dev/drbd0
        cat /proc/drbd >>"$log"
    else
        set +x
        note "DRBD protocol $proto setup failed (rtt=$rtt): $(tail -n 4 "$log" | tr '\n' ' ')"
        FAILED=1
    fi
    drbd_down
}

# --- the matrix ----------------------------------------------------------------------------------
RTT_MEASURED="{}"
first=1
for rtt in $RTTS; do
    set_rtt "$rtt"
    m=$(measure_rtt) || m=null
    RTT_MEASURED=$(jq -c --arg k "$rtt" --argjson v "${m:-null}" '. + {($k): $v}' <<<"$RTT_MEASURED")
    note "RTT $rtt ms: netem '$(tc qdisc show dev lo | head -n1)', measured TCP round trip ${m} ms"
    for cfg in $CONFIGS; do
        case "$cfg" in
            loop) [ "$first" = 1 ] && bench_loop "$rtt" ;;
            async | received | sync | lock-then-write) bench_mirror "$cfg" "$rtt" ;;
            drbd-A | drbd-C) bench_drbd "${cfg#drbd-}" "$rtt" ;;
            *) die "unknown configuration $cfg" ;;
        esac
    done
    first=0
done
tc qdisc del dev lo root 2>/dev/null

# --- report --------------------------------------------------------------------------------------
median='def med: sort | if length == 0 then null elif length % 2 == 1 then .[length / 2 | floor]
    else (.[length / 2 - 1] + .[length / 2]) / 2 end;'
jq -s "$median"' group_by([.config, .rtt_ms, .workload]) | map({config: .[0].config, rtt_ms: .[0].rtt_ms,
    workload: .[0].workload, runs: length, iops: (map(.iops) | med), mib_s: (map(.mib_s) | med),
    lat_mean_us: (map(.lat_mean_us) | med), lat_p99_us: (map(.lat_p99_us) | med)})' "$RESULTS" >"$OUT/medians.json"
jq -n --slurpfile runs "$RESULTS" --slurpfile med "$OUT/medians.json" --argjson rtt "$RTT_MEASURED" \
    --arg kernel "$(uname -r)" --argjson cpus "$(nproc)" --argjson secs "$SECS" --argjson nruns "$RUNS" \
    --arg drbd "$(head -n1 /proc/drbd 2>/dev/null)" \
    '{kernel: $kernel, vcpus: $cpus, seconds_per_run: $secs, runs_per_cell: $nruns, drbd: $drbd,
      measured_tcp_rtt_ms: $rtt, medians: $med[0], runs: $runs}' >"$OUT/bench.json"

{
    echo "fio, libaio, O_DIRECT, 1 s ramp + ${SECS} s, median of ${RUNS} run(s) per cell; kernel $(uname -r), $(nproc) vCPU"
    echo "measured TCP round trip on 127.0.0.1 per emulated RTT (ms): $RTT_MEASURED"
    echo ""
    echo "| config | RTT ms | 4k QD1 IOPS | QD1 mean us | QD1 p99 us | 4k QD16 IOPS | QD16 mean us | QD16 p99 us | 1M seq MiB/s | seq mean us | seq p99 us |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    jq -r --argjson order '["loop","async","received","sync","lock-then-write","drbd-A","drbd-C"]' '
        def f: if . == null then "-" else (. | floor | tostring) end;
        def c($w; $k): (map(select(.workload == $w)) | .[0][$k]) | f;
        group_by([.config, .rtt_ms]) | sort_by([.[0].rtt_ms, (.[0].config as $c | $order | index($c))])
        | .[] | "| \(.[0].config) | \(if .[0].config == "loop" then "-" else .[0].rtt_ms end) | "
          + ([c("rand4k-qd1"; "iops"), c("rand4k-qd1"; "lat_mean_us"), c("rand4k-qd1"; "lat_p99_us"),
              c("rand4k-qd16"; "iops"), c("rand4k-qd16"; "lat_mean_us"), c("rand4k-qd16"; "lat_p99_us"),
              c("seq1m-qd4"; "mib_s"), c("seq1m-qd4"; "lat_mean_us"), c("seq1m-qd4"; "lat_p99_us")] | join(" | ")) + " |"
    ' "$OUT/medians.json"
} >"$OUT/bench.md"
cat "$OUT/bench.md"
note "done in $(($(date +%s) - T0)) s inside the VM; results in $OUT"
cleanup
exit "$FAILED"
