#!/usr/bin/env bash
# The disk store holding a large retained history, on this machine: one topic `cold`
# filled with GB gigabytes of SIZE-byte messages (plus a small topic `warm`), then
#   1. fill:      `herald bench publish` (16 WebSocket publishers, --fsync never); its
#                 rate, the wall time, and the data directory's size (du);
#   2. start-up:  the server stopped (SIGTERM, waited for), then started RUNS times;
#                 per start, the ms from exec until `GET /readyz` answers 200 and until
#                 `GET /v1/topics/cold` shows every message (`"last":N+500`: bench
#                 publish adds 500 warm-up messages), and the server's VmRSS (and VmHWM,
#                 its peak so far) at that moment; then the medians;
#   3. history:   on the last server started, the whole of `cold` read from offset 1 as
#                 a catching-up consumer would: READER=ws (default) is
#                 `herald sub --from 1 -n <all> cold` (a WebSocket JSON subscription:
#                 the paced replay, then live), the fastest of the three client paths
#                 (205 300 x 1 KiB, 2026-12-02: ws 1.4 s, grpc 2.4 s, rest 5.6 s);
#                 READER=grpc is the same over gRPC (`herald sub --grpc` flushes
#                 stdout per message); READER=rest pages
#                 `GET /v1/topics/cold/messages?from=&limit=1000` with curl, following
#                 `next` (a process per page). Messages/s, MB/s (10^6 bytes of payload,
#                 SIZE per message) and the server's VmRSS (sampled every 100 ms: peak
#                 and before);
#   4. fan-out:   `herald bench fanout --subscribers 100 --messages 20000 --size 128` (a
#                 fresh topic each run) alone, then while a second, identical history
#                 read runs (deliveries/s; the tool reports throughput, not latency); and
#                 beside them, for percentiles, `herald bench publish --publishers 1
#                 --messages 2000 --size 128` (acked publish latency) alone and during
#                 the same read. The read's own rate under that load is printed too.
# Every figure is one line of text. Restarts (steps 2-4) use --fsync $FSYNC (default
# always, the server's default); the fill uses never. Page cache: warm (the data was
# just written) unless DROP_CACHES=1, which drops it before each start (needs root).
#
# Usage (from the repository root, after `cargo build --release -p herald`):
#   tools/cold-bench.sh                       # 10 GiB of 1024-byte messages, 3 starts
#   MB=200 RUNS=3 tools/cold-bench.sh         # a quick run (MB overrides GB)
#   GB=2 SIZE=1024 WORK=/mnt/big KEEP=1 tools/cold-bench.sh
#
# Environment:
#   GB=10        retained history in `cold`, GiB (decimals allowed: GB=0.5)
#   MB=          the same in MiB; overrides GB when set
#   SIZE=1024    payload bytes per message (a JSON string, quotes included)
#   RUNS=3       starts timed in step 2
#   HERALD=target/release/herald   the server and client binary
#   WORK=/tmp    where the scratch directory (data dir, logs) is made (mktemp)
#   KEEP=0       1: keep the scratch directory (its path is printed) instead of removing it
#   READER=ws    ws, grpc or rest: the client path of the history reads
#   FSYNC=always --fsync of the restarted servers
#   PORT=7186    the server listens on 127.0.0.1:PORT
#   DROP_CACHES=0  1: `sync; echo 3 >/proc/sys/vm/drop_caches` before each start
#   STARTUP_TIMEOUT=900  seconds a start may take before the script gives up
#   READER_NICE=  a niceness (e.g. 19) for the ws/grpc reading client: on this 2-core
#                machine the reader competes with the server for the CPU; niced, it
#                takes what the server and the publisher leave, as a reader on another
#                machine would
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

GB=${GB:-10}
MB=${MB:-}
SIZE=${SIZE:-1024}
RUNS=${RUNS:-3}
HERALD=${HERALD:-target/release/herald}
KEEP=${KEEP:-0}
READER=${READER:-ws}
FSYNC=${FSYNC:-always}
PORT=${PORT:-7186}
DROP_CACHES=${DROP_CACHES:-0}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-900}
READER_NICE=${READER_NICE:-}
reader_nice=(env)
[ -n "$READER_NICE" ] && reader_nice=(nice -n "$READER_NICE")
URL=http://127.0.0.1:$PORT
TOPIC=cold
SIDE_TOPIC=warm
SIDE_MESSAGES=10000 # of 128 bytes, in SIDE_TOPIC (+500 warm-up)
RETAIN=1000000000000 # --retention-max-messages: never reached

case $READER in ws | grpc | rest) ;; *) echo "READER must be ws, grpc or rest" >&2; exit 2 ;; esac
[ -x "$HERALD" ] || { echo "no $HERALD: cargo build --release -p herald (or set HERALD)" >&2; exit 2; }
if [ -n "$MB" ]; then
    bytes=$(awk -v mb="$MB" 'BEGIN { printf "%.0f", mb * 1048576 }')
else
    bytes=$(awk -v gb="$GB" 'BEGIN { printf "%.0f", gb * 1073741824 }')
fi
N=$((bytes / SIZE))
((N >= 1)) || { echo "GB/MB too small for SIZE=$SIZE" >&2; exit 2; }
EXPECTED=$((N + 500)) # bench publish's 500 untimed warm-up messages land in the topic too
avail_kib=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo)
if ((bytes * 2 / 1024 > avail_kib)); then
    echo "warning: $((bytes >> 20)) MiB of history, $((avail_kib >> 10)) MiB of memory available: a store that holds the history in memory (the disk store's index did, up to 2x the data while starting) may not fit" >&2
fi

dir=$(mktemp -d "${WORK:-/tmp}/herald-cold.XXXXXX")
pid=
reader=
cleanup() {
    # The background read runs in a process group of its own (its `herald sub` would
    # otherwise outlive the script, reconnecting to a stopped server).
    if [ -n "$reader" ]; then kill -- -"$reader" 2>/dev/null || true; fi
    stop_nodes # the server, an RSS sampler
    if [ "$KEEP" = 1 ]; then echo "kept $dir (data in $dir/data, server log $dir/herald.log)" >&2; else rm -rf "$dir"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now_ms() { echo $(($(date +%s%N) / 1000000)); }
# rss_mib PID FIELD: VmRSS or VmHWM of PID, in MiB.
rss_mib() { awk -v k="$2" '$1 == k":" { printf "%.0f\n", $2 / 1024 }' "/proc/$1/status"; }
# ratio A B: A / B with one decimal; rate COUNT MS: COUNT per second.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a / b }'; }
rate() { awk -v n="$1" -v ms="$2" 'BEGIN { printf "%.0f", n * 1000 / ms }'; }
mb_per_s() { awk -v n="$1" -v size="$SIZE" -v ms="$2" 'BEGIN { printf "%.1f", n * size / ms / 1000 }'; }
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# field NAME: a number from the one-line JSON object on stdin.
field() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p"; }

# wait_until TIMEOUT_S CMD...: runs CMD every 5 ms until it succeeds; fails if the
# server exits meanwhile or TIMEOUT_S pass.
wait_until() {
    local deadline=$(($(now_ms) + $1 * 1000))
    shift
    until "$@" >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "the server exited; its log ends:" >&2
            tail -5 "$dir/herald.log" >&2
            return 1
        fi
        if (($(now_ms) > deadline)); then echo "timed out waiting for: $*" >&2; return 1; fi
        sleep 0.005
    done
}
ready() { curl -sf -o /dev/null "$URL/readyz"; }
holds_all() { curl -sf "$URL/v1/topics/$TOPIC" | grep -Eq "\"last\":${EXPECTED}[,}]"; }

# start_server FLAGS...: sets $pid.
start_server() {
    "$HERALD" serve --store disk --listen "127.0.0.1:$PORT" --data-dir "$dir/data" \
        --retention-max-messages "$RETAIN" --retention-max-age 30d "$@" >>"$dir/herald.log" 2>&1 &
    pid=$!
}
stop_server() {
    kill -TERM "$pid"
    wait "$pid" || echo "the server exited with status $? (see $dir/herald.log)" >&2
}
drop_caches() {
    if [ "$DROP_CACHES" = 1 ]; then sync && echo 3 >/proc/sys/vm/drop_caches; fi
}

# read_history: reads all of $TOPIC from offset 1 with $READER; prints the messages read.
read_history() {
    case $READER in
        ws) "${reader_nice[@]}" "$HERALD" sub --url "$URL" --from 1 -n "$EXPECTED" "$TOPIC" | wc -l ;;
        grpc) "${reader_nice[@]}" "$HERALD" sub --url "$URL" --grpc --from 1 -n "$EXPECTED" "$TOPIC" | wc -l ;;
        rest)
            local from=1 next count=0 page=$dir/page.json
            while ((from <= EXPECTED)); do
                curl -sf -o "$page" "$URL/v1/topics/$TOPIC/messages?from=$from&limit=1000"
                next=$(tail -c 40 "$page" | sed -n 's/.*"next":\([0-9]*\)}$/\1/p')
                ((next > from)) || { echo "no progress at offset $from" >&2; return 1; }
                count=$((count + next - from)) # offsets are contiguous: nothing trimmed
                from=$next
            done
            echo "$count"
            ;;
    esac
}
# sample_rss FILE: appends the server's VmRSS (MiB) to FILE every 100 ms until killed.
sample_rss() {
    while kill -0 "$pid" 2>/dev/null; do
        rss_mib "$pid" VmRSS >>"$1" || true
        sleep 0.1
    done
}
peak() { sort -n "$1" | tail -1; }

echo "== cold-bench: disk store, topic $TOPIC: $N messages of $SIZE bytes ($((bytes >> 20)) MiB of payload) + 500 warm-up; topic $SIDE_TOPIC: $SIDE_MESSAGES + 500 of 128 bytes"
echo "   scratch: $dir; reader: $READER${READER_NICE:+ (nice $READER_NICE)}; restarts with --fsync $FSYNC; page cache $([ "$DROP_CACHES" = 1 ] && echo dropped before each start || echo warm)"
echo "   machine: $(nproc) cores, $(awk '/^MemTotal:/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo) GiB RAM, load average $(cut -d' ' -f1-3 /proc/loadavg) at the start"

# 1. Fill.
start_server --fsync never
wait_until 60 ready
t0=$(now_ms)
fill=$("$HERALD" bench publish --url "$URL" --publishers 16 --messages "$N" --size "$SIZE" --topic "$TOPIC" --keep --json)
fill_ms=$(($(now_ms) - t0))
"$HERALD" bench publish --url "$URL" --publishers 16 --messages "$SIDE_MESSAGES" --size 128 --topic "$SIDE_TOPIC" --keep >/dev/null
wait_until 10 holds_all
fill_rss=$(rss_mib "$pid" VmRSS)
per_second=$(field per_second <<<"$fill")
echo "fill: $N messages of $SIZE B in $(field seconds <<<"$fill") s = $per_second msg/s = $(awk -v r="$per_second" -v s="$SIZE" 'BEGIN { printf "%.1f", r * s / 1e6 }') MB/s (16 publishers, fsync never; p50 $(field p50_us <<<"$fill") us, p99 $(field p99_us <<<"$fill") us); wall time with warm-up and connections $(ratio "$fill_ms" 1000) s"
echo "server VmRSS after the fill: $fill_rss MiB"
t0=$(now_ms)
stop_server
echo "shutdown after the fill: $(($(now_ms) - t0)) ms"
disk_kib=$(du -sk "$dir/data" | cut -f1)
largest_kib=$(find "$dir/data" -name '*.log' -exec du -k {} + | sort -n | tail -1 | cut -f1)
echo "on disk: $((disk_kib / 1024)) MiB = $(awk -v d="$disk_kib" -v p="$((EXPECTED * SIZE))" 'BEGIN { printf "%.2f", d * 1024 / p }')x the payload of $TOPIC; $(find "$dir/data" -name '*.log' | wc -l) segment files, the largest $((largest_kib / 1024)) MiB"

# 2. Start-up.
ready_ms=() all_ms=() rss=()
for run in $(seq 1 "$RUNS"); do
    drop_caches
    t0=$(now_ms)
    start_server --fsync "$FSYNC"
    wait_until "$STARTUP_TIMEOUT" ready
    ready_ms+=("$(($(now_ms) - t0))")
    wait_until "$STARTUP_TIMEOUT" holds_all
    all_ms+=("$(($(now_ms) - t0))")
    rss+=("$(rss_mib "$pid" VmRSS)")
    echo "start-up run $run: /readyz 200 after ${ready_ms[-1]} ms, all $EXPECTED messages visible after ${all_ms[-1]} ms; VmRSS ${rss[-1]} MiB (VmHWM $(rss_mib "$pid" VmHWM) MiB)"
    ((run == RUNS)) || stop_server
done
echo "start-up, median of $RUNS: /readyz $(median "${ready_ms[@]}") ms, all visible $(median "${all_ms[@]}") ms ($(awk -v k="$disk_kib" -v ms="$(median "${all_ms[@]}")" 'BEGIN { printf "%.0f", k * 1.024 / ms }') MB/s of the data directory), VmRSS $(median "${rss[@]}") MiB ($(ratio "$(median "${rss[@]}")" "$((disk_kib / 1024))")x the data directory)"

# 3. History read, alone.
rss_before=$(rss_mib "$pid" VmRSS)
sample_rss "$dir/rss-read" &
sampler=$!
t0=$(now_ms)
count=$(read_history)
read_ms=$(($(now_ms) - t0))
kill "$sampler"
wait "$sampler" 2>/dev/null || true
[ "$count" = "$EXPECTED" ] || echo "warning: the history read returned $count messages, not $EXPECTED" >&2
echo "history read ($READER, offset 1 to $EXPECTED): $count messages in $(ratio "$read_ms" 1000) s = $(rate "$count" "$read_ms") msg/s = $(mb_per_s "$count" "$read_ms") MB/s; server VmRSS $rss_before MiB before, peak $(peak "$dir/rss-read") MiB during"

# 4. Live fan-out and publish latency, alone and beside a second history read.
fanout() { "$HERALD" bench fanout --url "$URL" --subscribers 100 --messages 20000 --size 128 --json; }
publish() { "$HERALD" bench publish --url "$URL" --publishers 1 --messages 2000 --size 128 --json; }
describe_fanout() { echo "$(field deliveries_per_second <<<"$1") deliveries/s ($(field seconds <<<"$1") s, published at $(field publish_per_second <<<"$1")/s)"; }
describe_publish() { echo "p50 $(field p50_us <<<"$1") us, p99 $(field p99_us <<<"$1") us, max $(field max_us <<<"$1") us ($(field per_second <<<"$1")/s)"; }
fanout_alone=$(fanout)
publish_alone=$(publish)

sample_rss "$dir/rss-read2" &
sampler=$!
t0=$(now_ms)
set -m # the read gets a process group of its own, for cleanup
(
    read_history >"$dir/read2-count"
    now_ms >"$dir/read2-end"
) &
reader=$!
set +m
fanout_beside=$(fanout)
fanout_overlap=yes
kill -0 "$reader" 2>/dev/null || fanout_overlap="no: the read ended first"
publish_beside=$(publish)
publish_overlap=yes
kill -0 "$reader" 2>/dev/null || publish_overlap="no: the read ended first"
wait "$reader"
reader=
kill "$sampler"
wait "$sampler" 2>/dev/null || true
read2_ms=$(($(cat "$dir/read2-end") - t0))
count2=$(cat "$dir/read2-count")

echo "fan-out 100 subscribers x 20000 x 128 B, alone:             $(describe_fanout "$fanout_alone")"
echo "fan-out 100 subscribers x 20000 x 128 B, beside the read:   $(describe_fanout "$fanout_beside") (read running throughout: $fanout_overlap)"
echo "acked publish latency, 1 publisher x 2000 x 128 B, alone:           $(describe_publish "$publish_alone")"
echo "acked publish latency, 1 publisher x 2000 x 128 B, beside the read: $(describe_publish "$publish_beside") (read running throughout: $publish_overlap)"
echo "history read beside fan-out and publishes ($READER): $count2 messages in $(ratio "$read2_ms" 1000) s = $(rate "$count2" "$read2_ms") msg/s = $(mb_per_s "$count2" "$read2_ms") MB/s; server VmRSS peak $(peak "$dir/rss-read2") MiB during"
echo "server VmHWM at the end: $(rss_mib "$pid" VmHWM) MiB; load average $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews every figure)"
