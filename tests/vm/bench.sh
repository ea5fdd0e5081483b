#!/bin/bash
# tests/vm/bench.sh — the side-by-side benchmark (issue 4). Runs INSIDE the VM (scripts/bench boots
# it), as root, with the binaries already built on the host.
#
# usage: tests/vm/bench.sh OUTDIR
#
# For each configuration and, in turn, each emulated round-trip time (netem on lo), runs fio
# workloads and writes OUTDIR/bench.md (markdown table), OUTDIR/bench.json (every run and the
# medians) and logs.
# Configurations: loop (raw loop device on a file, not network dependent: measured once, at the
# first RTT, and again as loop-end after the matrix, a control of the VM's speed), passthrough (the
# ublk daemon with --no-mirror over the same kind of file, also once, at the first RTT),
# ublk-mirror async/received/sync/lock-then-write (volumes are files in /tmp, the
# target-server on 127.0.0.1), drbd-A / drbd-C (DRBD 8.4 kernel module, two resources in this one
# kernel connected over 127.0.0.1:7789 <-> 127.0.0.1:7790, each on its own loop device), and
# drbd-C-crc32c (protocol C with data-integrity-alg crc32c: DRBD checksums every data packet, as
# ublk-mirror always does; DRBD's default is no checksum).
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
#   BENCH_CONFIGS (default "loop passthrough async received sync lock-then-write drbd-A drbd-C
#   drbd-C-crc32c"),
#   BENCH_WORKLOADS (default "rand4k-qd1 rand4k-qd16 seq1m-qd4"),
#   BENCH_RATE (default none: a netem bandwidth cap such as 100mbit for the whole matrix; lo carries
#   both directions, so the cap is on their sum),
#   BENCH_SAMPLE (default 0; 1 samples per-thread CPU and the daemon's status once a second during
#   every fio run: OUTDIR/samples/, .sample in each run of bench.json, a table in bench.md),
#   BENCH_VS_BIN_DIR (default none: an A/B of two builds; every ublk-mirror cell then runs both,
#   one run at a time, in the order AB BA AB ...; the second build's results are named CONFIG@vs).
# Exit status: 0 if every cell produced a number; 1 otherwise (the table shows `-` for those).
set -u

OUT=${1:?usage: bench.sh OUTDIR}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${UBLK_MIRROR_BIN_DIR:-$REPO/target/release}
UM=$BIN/ublk-mirror
TS=$BIN/target-server
VS_BIN=${BENCH_VS_BIN_DIR:-}
RTTS=${BENCH_RTTS:-"0 2 10"}
RUNS=${BENCH_RUNS:-3}
SECS=${BENCH_SECS:-5}
# Every configuration and workload, in report order (the defaults).
CONFIG_NAMES="loop passthrough async received sync lock-then-write drbd-A drbd-C drbd-C-crc32c"
WORKLOAD_NAMES="rand4k-qd1 rand4k-qd16 seq1m-qd4"
CONFIGS=${BENCH_CONFIGS:-$CONFIG_NAMES}
WORKLOADS=${BENCH_WORKLOADS:-$WORKLOAD_NAMES}
RATE=${BENCH_RATE:-}             # bandwidth cap of the matrix's link (netem rate; empty: none)
SAMPLE=${BENCH_SAMPLE:-0}        # sample per-thread CPU and status once a second during fio (1: on)
STATUS_NAME=""                   # the ublk-mirror daemon under test (sampled with status), if any
LAG=${BENCH_LAG:-1}              # run the replication-lag benchmark (0: skip)
LAG_RTT=${BENCH_LAG_RTT:-10}     # its round trip (ms)
LAG_RATE=${BENCH_LAG_RATE:-40mbit} # its bandwidth cap (netem rate, both directions)
LAG_MB=${BENCH_LAG_MB:-32}       # MiB written per lag run (4 KiB random writes, QD16, hot spot)
LAG_RESULTS=$OUT/lag.jsonl
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
    declare -F drbd_down >/dev/null && drbd_down # not yet defined when an early check fails
    losetup -D 2>/dev/null
}

echo "bench: kernel $(uname -r), $(nproc) cpus, binaries from $BIN"
echo "bench: rtts='$RTTS' rate='${RATE:-none}' sample=$SAMPLE runs=$RUNS secs=$SECS configs='$CONFIGS' workloads='$WORKLOADS'"
# Unknown names are refused before anything runs, not when the matrix reaches them.
for c in $CONFIGS; do [[ " $CONFIG_NAMES " == *" $c "* ]] || die "unknown configuration $c (known: $CONFIG_NAMES)"; done
for w in $WORKLOADS; do [[ " $WORKLOAD_NAMES " == *" $w "* ]] || die "unknown workload $w (known: $WORKLOAD_NAMES)"; done
for t in fio jq tc losetup python3; do command -v "$t" >/dev/null || die "missing tool $t (run scripts/vm/setup)"; done
for b in "$UM" "$TS" ${VS_BIN:+"$VS_BIN/ublk-mirror" "$VS_BIN/target-server"}; do
    [ -x "$b" ] || die "missing binary $b (run cargo build --release --workspace)"
done
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
set_rtt() { # set_rtt MS [RATE]: netem delay MS/2 (and a rate cap) on lo (no qdisc for 0 and no rate)
    tc qdisc del dev lo root 2>/dev/null
    [ "$1" = 0 ] && [ -z "${2:-}" ] && return 0
    local half rate=()
    half=$(awk -v r="$1" 'BEGIN { printf "%gms", r / 2 }')
    [ -n "${2:-}" ] && rate=(rate "$2")
    tc qdisc add dev lo root netem delay "$half" "${rate[@]}" limit 100000 || die "tc netem failed"
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

# --- sampling (BENCH_SAMPLE=1) ----------------------------------------------------------------------
# While each fio run lasts, about once a second: the VM's cpu line of /proc/stat, the writes the
# device under test has completed (/proc/diskstats), the CPU ticks (user + system) of the daemon, the
# target-server, fio and the kernel threads ksoftirqd and drbd_* (those alive when the run starts;
# not the ~50 kworkers, which would cost more to read than all the rest), as processes and per
# thread, named PROCESS/THREAD with numbers stripped (ublk-mirror/ublk-mirror-net,
# target-server/target-io, ksoftirqd/ksoftirqd, ...); and for ublk-mirror
# configurations `status --json --watch 1` (log bytes and entries against their limits, lag, seq
# numbers). Raw samples go to OUTDIR/samples/RUN.jsonl and RUN.status.jsonl; each run's results line
# gets a summary of its steady part (.sample), and bench.md a table of it. The sampler is a bash loop
# that starts no process (a fork or exec costs ~50-90 ms of a vCPU under TCG) and reads /proc with
# builtins; its CPU and the status watcher's are reported as sampler/*: about 12 % of one vCPU
# (6 % of the VM) under TCG, so sampled runs are a little slower than unsampled ones.

# proc_ticks FILE: sets COMM (numbers and /... stripped) and TICKS (utime + stime, and with a
# second argument also cutime + cstime) from a /proc stat file; non-zero if it has gone
proc_ticks() {
    local line all=${2:-}
    read -r line 2>/dev/null <"$1" || return 1
    COMM=${line#*(}
    COMM=${COMM%)*}
    COMM=${COMM%%[/:]*}
    case "$COMM" in *-[0-9]*) [[ "$COMM" =~ ^(.*)-[0-9]+$ ]] && COMM=${BASH_REMATCH[1]} ;; esac
    COMM=${COMM//[\"\\]/_}
    set -- ${line##*) } # $1 is field 3 (state): utime, stime, cutime, cstime are fields 14 to 17
    TICKS=$((${12} + ${13}))
    [ -z "$all" ] || TICKS=$((TICKS + ${14} + ${15}))
}

# thread_ticks SELF WATCHER KTHREADS PID...: sets THREADS to a JSON list of [ID, "NAME", TICKS]:
# "sampler/*" for SELF (with the processes it has waited for) plus WATCHER (a pid or ""), then for
# each PID its process ("PROCESS/*": its threads that have exited included) and each of its
# threads ("PROCESS/THREAD"); the first KTHREADS pids are kernel threads (one thread each).
thread_ticks() {
    local self=$1 watcher=$2 nk=$3 p t pname total
    shift 3
    proc_ticks "/proc/$self/stat" all || return 1
    total=$TICKS
    [ -n "$watcher" ] && proc_ticks "/proc/$watcher/stat" all && total=$((total + TICKS))
    THREADS="[$self,\"sampler/*\",$total]"
    for p in "$@"; do
        proc_ticks "/proc/$p/stat" || continue
        THREADS+=",[$p,\"$COMM/*\",$TICKS]"
        if [ "$nk" -gt 0 ]; then # a kernel thread: one thread, no task directory to read
            THREADS+=",[$p,\"$COMM/$COMM\",$TICKS]"
            nk=$((nk - 1))
            continue
        fi
        pname=$COMM
        for t in /proc/"$p"/task/[0-9]*; do
            proc_ticks "$t/stat" && THREADS+=",[${t##*/},\"$pname/$COMM\",$TICKS]"
        done
    done
}

# read -t on a FIFO that nobody writes: a sleep that starts no process
if [ "$SAMPLE" = 1 ]; then
    mkfifo "$W/sleep.fifo" && exec {SLEEP_FD}<>"$W/sleep.fifo" || die "cannot make $W/sleep.fifo"
fi
sampler() { # sampler FILE DEVICE PID [WATCHER-PID [DAEMON-PID]]: a JSON line about once a second
    # into FILE until killed; PID is fio's (or its parent's: its children and theirs are sampled too)
    local file=$1 dev=${2##*/} fio=$3 watcher=${4:-} daemon=${5:-} user nice sys idle iowait irq softirq
    local f c kthreads=() n disk w kids more k self=$BASHPID
    for f in /proc/[0-9]*/comm; do
        read -r c 2>/dev/null <"$f" || continue
        case "$c" in ksoftirqd* | drbd*) ;; *) continue ;; esac # not the ~50 kworkers: the rest column
        f=${f#/proc/}
        kthreads+=("${f%/comm}")
    done
    while :; do
        read -r _ user nice sys idle iowait irq softirq _ </proc/stat
        disk=0
        while read -r _ _ n _ _ _ _ w _; do [ "$n" = "$dev" ] && disk=$w; done </proc/diskstats
        kids=""
        read -r kids 2>/dev/null <"/proc/$fio/task/$fio/children"
        for k in $kids; do
            more=""
            read -r more 2>/dev/null <"/proc/$k/task/$k/children"
            kids+=" $more"
        done
        THREADS=""
        thread_ticks "$self" "$watcher" "${#kthreads[@]}" "${kthreads[@]}" $daemon ${TPID:-} "$fio" $kids
        printf '{"t":%s,"stat":[%s,%s,%s,%s,%s,%s,%s],"dev_writes":%s,"threads":[%s]}\n' \
            "$EPOCHREALTIME" "$user" "$nice" "$sys" "$idle" "$iowait" "$irq" "$softirq" "$disk" "$THREADS"
        read -r -t 1 -u "$SLEEP_FD" _
    done >"$file"
}

# sample_summary SAMPLES STATUS: one JSON object from a run's samples, over its steady part: the
# intervals between samples in which the device completed writes, less the first and the last of
# them (fio's ramp and its end) when there are 3 or more. CPU in % of one vCPU (200 = both vCPUs
# busy): per process ("NAME/*") and per thread name (threads present at both ends of an interval;
# short-lived ones such as io_uring workers show only in their process), the VM's user / system /
# irq / softirq / iowait / idle; dev_writes_per_s checks the window against fio's IOPS. From the
# status reports taken within the window (STATUS, JSON lines; may be empty): the largest log fill
# (% of whichever of bytes and entries is nearer its limit), the largest lag, and the rates at which
# seq numbers were written locally and received by the target.
HZ=$(getconf CLK_TCK)
sample_summary() {
    jq -s -c --argjson hz "$HZ" --slurpfile status "$2" '
        def pct($d; $dt): $d / $hz / $dt * 100 | . * 10 | round / 10;
        def rate($d; $dt): if $dt > 0 then $d / $dt | round else null end;
        . as $all
        | [range(1; length) | select($all[.].dev_writes > $all[. - 1].dev_writes)] as $act
        | (if ($act | length) >= 3 then $act[1:-1] else $act end) as $win
        | if ($win | length) == 0 then {samples: length, intervals: 0} else
        ($win | map($all[.].t - $all[. - 1].t) | add) as $dt
        | ($all[$win[0] - 1].t) as $from | ($all[$win[-1]].t) as $to
        | [$status[] | select(.unix_time >= $from and .unix_time <= $to and .log.bytes_max > 0 and .log.entries_max > 0)] as $s
        | {samples: length, intervals: ($win | length), seconds: ($dt * 10 | round / 10),
           dev_writes_per_s: rate($win | map($all[.].dev_writes - $all[. - 1].dev_writes) | add; $dt),
           cpu: ([$win[] as $i | $all[$i - 1] as $a | $all[$i]
                  | ($a.threads | map({key: "\(.[0]) \(.[1])", value: .[2]}) | from_entries) as $prev
                  | .threads[] | select($prev["\(.[0]) \(.[1])"] != null)
                  | {name: .[1], d: (.[2] - $prev["\(.[0]) \(.[1])"])}]
                 | group_by(.name) | map({key: .[0].name, value: pct(map(.d) | add; $dt)})
                 | map(select(.value >= 0.5)) | sort_by(-.value) | from_entries),
           vm: ([$win[] as $i | [$all[$i].stat, $all[$i - 1].stat] | transpose | map(.[0] - .[1])]
                | transpose | map(add)
                | {user: pct(.[0] + .[1]; $dt), system: pct(.[2]; $dt), idle: pct(.[3]; $dt),
                   iowait: pct(.[4]; $dt), irq: pct(.[5]; $dt), softirq: pct(.[6]; $dt)})}
        + if ($s | length) == 0 then {} else
          {status_reports: ($s | length),
           log_fill_max_pct: ($s | map([.log.bytes / .log.bytes_max, .log.entries / .log.entries_max] | max)
                               | max * 1000 | round / 10),
           lag_max_s: ($s | map(.lag.seconds) | max * 1000 | round / 1000),
           lag_max_entries: ($s | map(.lag.entries) | max)}
          + if ($s | length) < 2 then {} else
            (($s[-1].unix_time - $s[0].unix_time)) as $sdt
            | {written_per_s: rate($s[-1].seq.last_local - $s[0].seq.last_local; $sdt),
               received_per_s: rate($s[-1].seq.received - $s[0].seq.received; $sdt)} end
          end end' "$1"
}

# --- fio -----------------------------------------------------------------------------------------
# run_fio CONFIG RTT WORKLOAD RUN DEV: one fio run, appends a JSON line to $RESULTS
run_fio() {
    local cfg=$1 rtt=$2 wl=$3 run=$4 dev=$5 args json
    case "$wl" in
        rand4k-qd1) args=(--rw=randwrite --bs=4k --iodepth=1 --size=128M) ;;
        rand4k-qd16) args=(--rw=randwrite --bs=4k --iodepth=16 --size=128M) ;;
        seq1m-qd4) args=(--rw=write --bs=1M --iodepth=4 --size=128M) ;;
    esac
    json=$OUT/fio/$cfg-rtt$rtt-$wl-$run.json
    mkdir -p "$OUT/fio"
    local samples=$OUT/samples/$cfg-rtt$rtt-$wl-$run summary=null sampler_pid="" watcher_pid=""
    local rc=0 fio_pid
    timeout $((SECS + 120)) fio --name="$cfg-$wl" --filename="$dev" "${args[@]}" --ioengine=libaio --direct=1 \
        --time_based --runtime="$SECS" --ramp_time=1 --output-format=json --output="$json" \
        >"$json.err" 2>&1 &
    fio_pid=$!
    if [ "$SAMPLE" = 1 ]; then
        mkdir -p "$OUT/samples"
        : >"$samples.status.jsonl"
        if [ -n "$STATUS_NAME" ]; then
            "$UM" status --name "$STATUS_NAME" --json --watch 1 >"$samples.status.jsonl" 2>"$samples.status.err" &
            watcher_pid=$!
        fi
        sampler "$samples.jsonl" "$(readlink -f "$dev")" "$fio_pid" "$watcher_pid" "${STATUS_NAME:+$MPID}" &
        sampler_pid=$!
    fi
    wait "$fio_pid" || rc=1
    if [ -n "$sampler_pid" ]; then
        kill "$sampler_pid" $watcher_pid 2>/dev/null
        wait "$sampler_pid" $watcher_pid 2>/dev/null
        summary=$(sample_summary "$samples.jsonl" "$samples.status.jsonl") && [ -n "$summary" ] ||
            { note "sample summary failed: $samples.jsonl"; summary=null; }
    fi
    if [ "$rc" != 0 ]; then
        note "fio failed: $cfg rtt=$rtt $wl run $run: $(tail -n 2 "$json.err" | tr '\n' ' ')"
        return 1
    fi
    jq -c --arg cfg "$cfg" --argjson rtt "$rtt" --arg wl "$wl" --argjson run "$run" --argjson sample "$summary" \
        '.jobs[0].write | {config: $cfg, rtt_ms: $rtt, workload: $wl, run: $run,
          iops: .iops, mib_s: (.bw_bytes / 1048576), lat_mean_us: (.lat_ns.mean / 1000),
          lat_p99_us: ((.clat_ns.percentile["99.000000"] // 0) / 1000)}
          + (if $sample == null then {} else {sample: $sample} end)' "$json" >>"$RESULTS"
}

# run_cell CONFIG RTT DEV [FIRST-RUN]: every workload, BENCH_RUNS times (numbered from FIRST-RUN)
run_cell() {
    local cfg=$1 rtt=$2 dev=$3 first=${4:-1} wl r
    for wl in $WORKLOADS; do
        for r in $(seq "$first" $((first + RUNS - 1))); do
            run_fio "$cfg" "$rtt" "$wl" "$r" "$dev" || FAILED=1
        done
        note "  $cfg rtt=$rtt $wl: $(jq -r --arg c "$cfg" --argjson t "$rtt" --arg w "$wl" \
            'select(.config == $c and .rtt_ms == $t and .workload == $w) | "\(.iops|floor)"' "$RESULTS" | tr '\n' ' ')IOPS"
    done
}

# --- configurations ------------------------------------------------------------------------------
bench_loop() { # bench_loop RTT [NAME]: NAME (default loop) is what the results call it
    local dev
    truncate -s "$SIZE" "$W/loop.img"
    dev=$(losetup -f --show "$W/loop.img") || { note "losetup failed"; FAILED=1; return; }
    run_cell "${2:-loop}" "$1" "$dev"
    losetup -d "$dev"
    rm -f "$W/loop.img"
}

PORT=7700
MDEV=""
MPID="" # the daemon's pid (mirror_up)
# mirror_up MODE TAG: target-server + daemon NAME=b-MODE on fresh volumes; sets MDEV. MODE
# "passthrough" starts the daemon with --no-mirror (no target).
mirror_up() {
    local mode=$1 tag=$2 st
    MDEV=""
    PORT=$((PORT + 1))
    rm -f "$W"/m-src.img "$W"/m-tgt.img*
    truncate -s "$SIZE" "$W/m-src.img"
    local args=(--no-mirror)
    if [ "$mode" != passthrough ]; then
        "$TS" --listen "127.0.0.1:$PORT" --volume "$W/m-tgt.img" --create-size "$SIZE" --volume-id "$VID" \
            --secret-file "$W/secret" >"$OUT/target-$tag.log" 2>&1 &
        TPID=$!
        for _ in $(seq 100); do grep -q "listening on" "$OUT/target-$tag.log" && break; sleep 0.1; done
        args=(--peer "127.0.0.1:$PORT" --volume-id "$VID" --secret-file "$W/secret" --mode "$mode")
    fi
    if ! "$UM" start --name "b-$mode" --volume "$W/m-src.img" "${args[@]}" --log-file "$OUT/daemon-$tag.log" \
        >"$OUT/start-$tag.out" 2>&1; then
        note "ublk-mirror start failed ($tag): $(cat "$OUT/start-$tag.out")"
        return 1
    fi
    st=$("$UM" status --name "b-$mode" --json)
    MDEV=$(jq -r .device <<<"$st")
    MPID=$(jq -r .pid <<<"$st")
    [ -b "$MDEV" ] || { note "no block device for $tag: $st"; return 1; }
}

mirror_down() { # mirror_down MODE TAG
    local mode=$1 tag=$2
    if [ -S "/run/ublk-mirror/b-$mode.sock" ]; then
        timeout 120 "$UM" stop --name "b-$mode" >"$OUT/stop-$tag.out" 2>&1 \
            || { note "stop failed: $(cat "$OUT/stop-$tag.out")"; timeout 30 "$UM" delete --name "b-$mode" >/dev/null 2>&1; }
    fi
    if [ -n "$TPID" ]; then
        kill -TERM "$TPID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$TPID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$TPID" 2>/dev/null
        wait "$TPID" 2>/dev/null
        TPID=""
    fi
    rm -f "$W"/m-src.img "$W"/m-tgt.img*
}

bench_mirror() { # bench_mirror MODE RTT [NAME [FIRST-RUN]]: NAME (default MODE) names the results
    local mode=$1 rtt=$2 name=${3:-$1}
    if mirror_up "$mode" "$name-rtt$rtt"; then
        STATUS_NAME=b-$mode
        run_cell "$name" "$rtt" "$MDEV" "${4:-1}"
        STATUS_NAME=""
    else
        FAILED=1
    fi
    mirror_down "$mode" "$name-rtt$rtt"
}

# bench_mirror_vs MODE RTT: the A/B (BENCH_VS_BIN_DIR): one run of each build at a time, AB BA AB
# ..., each on fresh volumes and daemons, so that the VM's drift within a boot falls on both alike.
bench_mirror_vs() {
    local mode=$1 rtt=$2 runs=$RUNS r side
    RUNS=1
    for r in $(seq "$runs"); do
        for side in $( ((r % 2)) && echo "a vs" || echo "vs a"); do
            if [ "$side" = vs ]; then
                UM=$VS_BIN/ublk-mirror TS=$VS_BIN/target-server bench_mirror "$mode" "$rtt" "$mode@vs" "$r"
            else
                bench_mirror "$mode" "$rtt" "$mode" "$r"
            fi
        done
    done
    RUNS=$runs
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

drbd_up() { # drbd_up PROTOCOL LOG [CONNECT-OPTION...]: non-zero when r0 is not Connected/UpToDate primary
    local proto=$1 log=$2 l0 l1
    shift 2
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
        "$DRBDSETUP" connect r0 ipv4:127.0.0.1:7789 ipv4:127.0.0.1:7790 --protocol="$proto" "$@" || return 1
        "$DRBDSETUP" connect r1 ipv4:127.0.0.1:7790 ipv4:127.0.0.1:7789 --protocol="$proto" "$@" || return 1
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

bench_drbd() { # bench_drbd CONFIG RTT: CONFIG is drbd-A, drbd-C or drbd-C-crc32c
    local cfg=$1 rtt=$2 log=$OUT/$1-rtt$2.log proto opts=()
    proto=${cfg:5:1}
    [[ "$cfg" == *-crc32c ]] && opts=(--data-integrity-alg=crc32c)
    : >"$log"
    if drbd_up "$proto" "$log" "${opts[@]}"; then
        run_cell "$cfg" "$rtt" /dev/drbd0
        cat /proc/drbd >>"$log"
    else
        set +x
        note "DRBD $cfg setup failed (rtt=$rtt): $(tail -n 4 "$log" | tr '\n' ' ')"
        FAILED=1
    fi
    declare -F drbd_down >/dev/null && drbd_down # not yet defined when an early check fails
}

# --- the matrix ----------------------------------------------------------------------------------
# Configuration by configuration, each at every RTT in turn: the VM's speed drifts within a boot
# (seen: the CPU each write costs rose 10-25 % over a run, whichever RTT came later), so one
# configuration's RTT columns are measured minutes apart, not a whole matrix apart. loop and
# passthrough (no network) are measured once, at the first RTT.
RTT_MEASURED="{}"
MIRROR_BENCH=bench_mirror
[ -z "$VS_BIN" ] || MIRROR_BENCH=bench_mirror_vs
for cfg in $CONFIGS; do
    for rtt in $RTTS; do
        set_rtt "$rtt" "$RATE"
        if [ "$(jq --arg k "$rtt" 'has($k)' <<<"$RTT_MEASURED")" = false ]; then
            m=$(measure_rtt) || m=null
            RTT_MEASURED=$(jq -c --arg k "$rtt" --argjson v "${m:-null}" '. + {($k): $v}' <<<"$RTT_MEASURED")
            note "RTT $rtt ms: netem '$(tc qdisc show dev lo | head -n1)', measured TCP round trip ${m} ms"
        fi
        case "$cfg" in
            loop) bench_loop "$rtt"; break ;;
            passthrough) "$MIRROR_BENCH" passthrough "$rtt"; break ;;
            async | received | sync | lock-then-write) "$MIRROR_BENCH" "$cfg" "$rtt" ;;
            drbd-A | drbd-C | drbd-C-crc32c) bench_drbd "$cfg" "$rtt" ;;
        esac
    done
done
tc qdisc del dev lo root 2>/dev/null
# The control: the VM's speed can drift within one boot (between boots it differs up to 2x), so
# loop (no network) is measured again after the matrix as `loop-end` (at the first RTT, where
# loop was). loop-end / loop near 1 means the VM kept its speed through the run.
if [[ " $CONFIGS " == *" loop "* ]]; then
    note "control: loop again after the matrix"
    read -r rtt _ <<<"$RTTS"
    set_rtt "$rtt" "$RATE"
    bench_loop "$rtt" loop-end
    tc qdisc del dev lo root 2>/dev/null
fi

# --- replication lag on a bandwidth-capped link -----------------------------------------------------
# A hot-spot workload (fio zoned distribution: 90 % of the writes go to 1 % of the device) writes
# LAG_MB MiB of 4 KiB random writes at QD16 as fast as the host can, on a link of LAG_RTT ms and
# LAG_RATE. Measured: the host's write rate, the catch-up time after fio ends (until the secondary
# holds everything), the largest lag seen while sampling once a second, and the bytes sent.
#   ublk-mirror async: lag = status lag.bytes / lag.seconds; catch-up = `wait-replicated`;
#     shipped = status shipped.bytes (frame headers + payloads, resends included).
#   DRBD protocol A: lag = KiB sent by the primary and not yet written by the secondary
#     (/proc/drbd ns of r0 - dw of r1); catch-up = until r1's dw reaches r0's ns and r0 has no
#     pending requests; shipped = ns of r0 (payload KiB; DRBD's headers are not counted).
drbd_field() { # drbd_field MINOR NAME: a counter of /proc/drbd
    awk -v m="$1:" -v k="$2" '$1 == m { found = 1; next } found && /ns:/ {
        for (i = 1; i <= NF; i++) { split($i, kv, ":"); if (kv[1] == k) print kv[2] }; exit }' /proc/drbd
}

lag_fio() { # lag_fio DEV JSON: the hot-spot write burst
    timeout 600 fio --name=lag --filename="$1" --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio \
        --direct=1 --io_size="${LAG_MB}M" --size="$SIZE" --random_distribution=zoned:90/1:10/99 \
        --randseed=42 --output-format=json --output="$2" >"$2.err" 2>&1
}

lag_mirror() { # lag_mirror RUN
    local run=$1 tag=lag-async-$1 json st0 st1 t0 t1 t2 maxb=0 maxs=0 sampler s b
    mirror_up async "$tag" || { FAILED=1; mirror_down async "$tag"; return; }
    json=$OUT/fio/$tag.json
    st0=$("$UM" status --name b-async --json)
    (
        while :; do
            "$UM" status --name b-async --json 2>/dev/null | jq -c '[.lag.bytes, .lag.seconds]'
            sleep 1
        done
    ) >"$OUT/$tag.samples" &
    sampler=$!
    t0=$(date +%s.%N)
    lag_fio "$MDEV" "$json" || { note "lag fio failed: $(tail -n 2 "$json.err")"; FAILED=1; }
    t1=$(date +%s.%N)
    timeout 600 "$UM" wait-replicated last --name b-async --timeout-secs 590 >/dev/null || { note "wait-replicated failed"; FAILED=1; }
    t2=$(date +%s.%N)
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
    st1=$("$UM" status --name b-async --json)
    while read -r b s; do
        maxb=$(awk -v a="$maxb" -v b="$b" 'BEGIN { print (b > a) ? b : a }')
        maxs=$(awk -v a="$maxs" -v b="$s" 'BEGIN { print (b > a) ? b : a }')
    done < <(jq -r '"\(.[0]) \(.[1])"' "$OUT/$tag.samples")
    jq -c -n --arg cfg async --argjson run "$run" --slurpfile f "$json" --argjson a "$st0" --argjson b "$st1" \
        --argjson t0 "$t0" --argjson t1 "$t1" --argjson t2 "$t2" --argjson maxb "$maxb" --argjson maxs "$maxs" \
        '{config: $cfg, run: $run, written_bytes: $f[0].jobs[0].write.io_bytes,
          host_mib_s: ($f[0].jobs[0].write.bw_bytes / 1048576), host_s: ($t1 - $t0), catchup_s: ($t2 - $t1),
          max_lag_bytes: $maxb, max_lag_s: $maxs, shipped_bytes: ($b.shipped.bytes - $a.shipped.bytes)}' >>"$LAG_RESULTS"
    mirror_down async "$tag"
}

lag_drbd() { # lag_drbd RUN
    local run=$1 tag=lag-drbd-A-$1 json ns0 t0 t1 t2 maxb=0 sampler ns dw pe
    : >"$OUT/$tag.log"
    drbd_up A "$OUT/$tag.log" || { set +x; note "DRBD setup failed (lag)"; FAILED=1; drbd_down; return; }
    json=$OUT/fio/$tag.json
    ns0=$(drbd_field 0 ns)
    (
        while :; do
            echo "$(drbd_field 0 ns) $(drbd_field 1 dw)"
            sleep 1
        done
    ) >"$OUT/$tag.samples" &
    sampler=$!
    t0=$(date +%s.%N)
    lag_fio /dev/drbd0 "$json" || { note "lag fio failed: $(tail -n 2 "$json.err")"; FAILED=1; }
    t1=$(date +%s.%N)
    for _ in $(seq 6000); do
        ns=$(drbd_field 0 ns); dw=$(drbd_field 1 dw); pe=$(drbd_field 0 pe)
        [ "$dw" -ge "$ns" ] && [ "$pe" = 0 ] && break
        sleep 0.1
    done
    t2=$(date +%s.%N)
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
    while read -r ns dw; do
        maxb=$(awk -v a="$maxb" -v n="$ns" -v d="$dw" 'BEGIN { l = (n - d) * 1024; print (l > a) ? l : a }')
    done <"$OUT/$tag.samples"
    cat /proc/drbd >>"$OUT/$tag.log"
    jq -c -n --arg cfg drbd-A --argjson run "$run" --slurpfile f "$json" --argjson t0 "$t0" --argjson t1 "$t1" \
        --argjson t2 "$t2" --argjson maxb "$maxb" --argjson shipped "$((($(drbd_field 0 ns) - ns0) * 1024))" \
        '{config: $cfg, run: $run, written_bytes: $f[0].jobs[0].write.io_bytes,
          host_mib_s: ($f[0].jobs[0].write.bw_bytes / 1048576), host_s: ($t1 - $t0), catchup_s: ($t2 - $t1),
          max_lag_bytes: $maxb, max_lag_s: null, shipped_bytes: $shipped}' >>"$LAG_RESULTS"
    declare -F drbd_down >/dev/null && drbd_down # not yet defined when an early check fails
}

: >"$LAG_RESULTS"
if [ "$LAG" = 1 ]; then
    set_rtt "$LAG_RTT" "$LAG_RATE"
    note "lag: netem '$(tc qdisc show dev lo | head -n1)', ${LAG_MB} MiB hot-spot writes, $RUNS run(s) each"
    mkdir -p "$OUT/fio"
    for r in $(seq "$RUNS"); do
        [[ " $CONFIGS " == *" async "* ]] && lag_mirror "$r"
        [[ " $CONFIGS " == *" drbd-A "* ]] && lag_drbd "$r"
    done
    tc qdisc del dev lo root 2>/dev/null
fi

# --- report --------------------------------------------------------------------------------------
ORDER=$(jq -cn --arg c "$CONFIG_NAMES" '$c | split(" ") | .[:1] + ["loop-end"] + .[1:]') # row order
median='def med: sort | if length == 0 then null elif length % 2 == 1 then .[length / 2 | floor]
    else (.[length / 2 - 1] + .[length / 2]) / 2 end;'
jq -s "$median"' group_by([.config, .rtt_ms, .workload]) | map({config: .[0].config, rtt_ms: .[0].rtt_ms,
    workload: .[0].workload, runs: length, iops: (map(.iops) | med), mib_s: (map(.mib_s) | med),
    lat_mean_us: (map(.lat_mean_us) | med), lat_p99_us: (map(.lat_p99_us) | med)})' "$RESULTS" >"$OUT/medians.json"
jq -s "$median"' group_by(.config) | map(. as $g | {config: .[0].config, runs: length}
    + ([ "written_bytes", "host_mib_s", "host_s", "catchup_s", "max_lag_bytes", "max_lag_s", "shipped_bytes"]
       | map({key: ., value: (. as $k | $g | map(.[$k]) | map(select(. != null)) | med)}) | from_entries))' \
    "$LAG_RESULTS" >"$OUT/lag-medians.json"
jq -n --slurpfile runs "$RESULTS" --slurpfile med "$OUT/medians.json" --slurpfile lagruns "$LAG_RESULTS" \
    --slurpfile lagmed "$OUT/lag-medians.json" --argjson lag_rtt "$LAG_RTT" --arg lag_rate "$LAG_RATE" --argjson lag_mb "$LAG_MB" --argjson rtt "$RTT_MEASURED" \
    --arg kernel "$(uname -r)" --argjson cpus "$(nproc)" --argjson secs "$SECS" --argjson nruns "$RUNS" \
    --arg drbd "$(head -n1 /proc/drbd 2>/dev/null)" --arg rate "$RATE" \
    '{kernel: $kernel, vcpus: $cpus, seconds_per_run: $secs, runs_per_cell: $nruns, drbd: $drbd,
      rate: (if $rate == "" then null else $rate end), measured_tcp_rtt_ms: $rtt, medians: $med[0], runs: $runs,
      lag: {rtt_ms: $lag_rtt, rate: $lag_rate, mib: $lag_mb, medians: $lagmed[0], runs: $lagruns}}' >"$OUT/bench.json"

{
    echo "fio, libaio, O_DIRECT, 1 s ramp + ${SECS} s, median of ${RUNS} run(s) per cell; kernel $(uname -r), $(nproc) vCPU"
    echo "link bandwidth cap: ${RATE:-none}; measured TCP round trip on 127.0.0.1 per emulated RTT (ms): $RTT_MEASURED"
    echo ""
    echo "| config | RTT ms | 4k QD1 IOPS | QD1 mean us | QD1 p99 us | 4k QD16 IOPS | QD16 mean us | QD16 p99 us | 1M seq MiB/s | seq mean us | seq p99 us |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    jq -r --argjson order "$ORDER" '
        def f: if . == null then "-" else (. | floor | tostring) end;
        def c($w; $k): (map(select(.workload == $w)) | .[0][$k]) | f;
        group_by([.config, .rtt_ms]) | sort_by([.[0].rtt_ms, (.[0].config as $c | $order | index($c))])
        | .[] | "| \(.[0].config) | \(if .[0].config | IN("loop", "loop-end", "passthrough") then "-" else .[0].rtt_ms end) | "
          + ([c("rand4k-qd1"; "iops"), c("rand4k-qd1"; "lat_mean_us"), c("rand4k-qd1"; "lat_p99_us"),
              c("rand4k-qd16"; "iops"), c("rand4k-qd16"; "lat_mean_us"), c("rand4k-qd16"; "lat_p99_us"),
              c("seq1m-qd4"; "mib_s"), c("seq1m-qd4"; "lat_mean_us"), c("seq1m-qd4"; "lat_p99_us")] | join(" | ")) + " |"
    ' "$OUT/medians.json"
    if [ "$SAMPLE" = 1 ]; then
        echo ""
        echo "Where the CPU went (BENCH_SAMPLE=1), the median-IOPS run of each cell; CPU in % of one vCPU"
        echo "(200 = both busy), threads named PROCESS/THREAD; log fill, lag and seq rates from \`status\`."
        echo ""
        echo "(kernel threads: ksoftirqd and drbd_*; rest: VM busy less all processes named here, i.e."
        echo "kworkers, softirq and interrupt work not charged to a thread, other processes.)"
        echo ""
        echo "| config | RTT ms | workload | IOPS | VM busy % | softirq % | ublk-mirror % | target-server % | fio % | kernel threads % | sampler % | rest % | busiest threads (% of a vCPU) | log fill max % | lag max s | written/s | received/s |"
        echo "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"
        jq -r -s --argjson order "$ORDER" '
            def f: if . == null then "-" else tostring end;
            map(select(.sample.vm != null)) | group_by([.config, .rtt_ms, .workload])
            | sort_by([.[0].rtt_ms, (.[0].config as $c | $order | index($c)), .[0].workload])
            | .[] | sort_by(.iops) | .[(length - 1) / 2 | floor] as $r | $r.sample as $s
            | ($s.cpu | to_entries) as $c
            | "| \($r.config) | \($r.rtt_ms) | \($r.workload) | \($r.iops | floor) | "
              + "\($s.vm | .user + .system + .irq + .softirq | . * 10 | round / 10) | \($s.vm.softirq) | "
              + "\($s.cpu["ublk-mirror/*"] // 0) | \($s.cpu["target-server/*"] // 0) | \($s.cpu["fio/*"] // 0) | "
              + "\([$c[] | select(.key | test("^(ksoftirqd|drbd)[^/]*/[*]$")) | .value] | add // 0 | . * 10 | round / 10) | "
              + "\($s.cpu["sampler/*"] // 0) | "
              + "\(($s.vm | .user + .system + .irq + .softirq) - ([$c[] | select(.key | endswith("/*")) | .value] | add // 0)
                   | . * 10 | round / 10) | "
              + ([$c[] | select(.key | endswith("/*") | not)][:5] | map("\(.key) \(.value)") | join(", ")) + " | "
              + "\($s.log_fill_max_pct | f) | \($s.lag_max_s | f) | \($s.written_per_s | f) | \($s.received_per_s | f) |"
        ' "$RESULTS"
    fi
    if [ -n "$VS_BIN" ]; then
        echo ""
        echo "A/B: this build ($BIN) against $VS_BIN (CONFIG@vs), one run of each at a time, AB BA AB ...;"
        echo "medians of the IOPS (MiB/s for seq1m-qd4); spread = (max - min) / median of each side's runs."
        echo ""
        echo "| config | RTT ms | workload | runs | IOPS | @vs IOPS | @vs / this | spread | @vs spread |"
        echo "|---|---:|---|---:|---:|---:|---:|---:|---:|"
        jq -r -s "$median"'
            def v: if .workload == "seq1m-qd4" then .mib_s else .iops end;
            def stat: (map(v) | sort) as $x | {n: ($x | length), med: ($x | med),
                spread: (if ($x | med) > 0 then (($x[-1] - $x[0]) / ($x | med) * 100 | round) else null end)};
            def f: if . == null then "-" else (. | floor | tostring) end;
            (map(select(.config | endswith("@vs") | not))) as $a
            | map(select(.config | endswith("@vs"))) | group_by([.config, .rtt_ms, .workload])
            | .[] | (.[0].config | rtrimstr("@vs")) as $c | .[0].rtt_ms as $t | .[0].workload as $w
            | (stat) as $b | ([$a[] | select(.config == $c and .rtt_ms == $t and .workload == $w)] | stat) as $m
            | "| \($c) | \($t) | \($w) | \($m.n) | \($m.med | f) | \($b.med | f) | "
              + "\(if $m.med > 0 then ($b.med / $m.med * 1000 | round / 1000 | tostring) else "-" end) | "
              + "\($m.spread | f) % | \($b.spread | f) % |"
        ' "$RESULTS"
    fi
    if [ -s "$LAG_RESULTS" ]; then
        echo ""
        echo "Replication lag: ${LAG_MB} MiB of 4 KiB random writes at QD16, 90 % of them to 1 % of the device;"
        echo "link RTT ${LAG_RTT} ms, rate ${LAG_RATE}; median of ${RUNS} run(s)."
        echo ""
        echo "| config | host MiB/s | host s | catch-up s | max lag MiB | max lag s | shipped MiB | shipped / written |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|"
        jq -r 'def f(d): if . == null then "-" else (. * d | round / d | tostring) end;
            .[] | "| \(.config) | \(.host_mib_s | f(10)) | \(.host_s | f(10)) | \(.catchup_s | f(10)) | \(if .max_lag_bytes == null then null else .max_lag_bytes / 1048576 end | f(10)) | \(.max_lag_s | f(10)) | \(.shipped_bytes / 1048576 | f(10)) | \(.shipped_bytes / .written_bytes | f(100)) |"' "$OUT/lag-medians.json"
    fi
} >"$OUT/bench.md"
cat "$OUT/bench.md"
note "done in $(($(date +%s) - T0)) s inside the VM; results in $OUT"
cleanup
exit "$FAILED"
