#!/usr/bin/env bash
# blockd against QEMU exporting the same image over NBD on a unix socket, measured with the same
# clients in one run: `qemu-img bench` over NBD (4k reads at depth 1 and 32, 4k writes at depth
# 32) and nbdcopy (-C 4, multi-conn) of a whole image in both directions.
#
# Like is compared with like. Each pair below runs both servers with the same command line
# except the program name: same image, cache mode (cache.direct, O_DIRECT by default), aio
# (io_uring), socket type (unix) and thread placement:
#   main      blockd-storage-daemon vs qemu-storage-daemon, export served from the main loop
#             (no busy polling in either)
#   iothread  the same with `--object iothread,id=io0` and `iothread=io0` on the export (default
#             poll-max-ns=32768; QEMU does not poll while it watches the client sockets, blockd
#             polls only while storage I/O is in flight)
#   nbd       blockd-nbd vs qemu-nbd (`-f raw -t -e 0 --cache=none --aio=io_uring`)
#
# The machine may be shared and noisy, so the servers run interleaved: every round runs every
# server once (the order rotates each round) and a round's ratio compares figures taken minutes
# apart at most. The table shows, per test and pair, blockd's ratio (> 1: blockd is faster) as
# the median over the rounds, with the lowest and highest round in brackets.
#
# Environment: BENCH_ROUNDS (3), BENCH_PAIRS ("main iothread nbd"), BENCH_SIZE (1G),
# BENCH_CACHE_DIRECT (on; off = page cache for both), BENCH_D1_COUNT (50000 requests at depth 1),
# BENCH_D32_COUNT (300000 at depth 32), BENCH_DIR (where the images live: /dev/shm takes the
# disk out of the measurement). Besides the copy to a file, `null` copies the export to
# nbdcopy's null: destination, which measures the server's read path without a file to write.
# The load average before and after is printed: other work on the machine skews the figures.
# Benchmarks are not tests.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -q -p blockd-nbd-tool -p blockd-storage-daemon
BNBD="$TARGET/release/blockd-nbd"
BSD="$TARGET/release/blockd-storage-daemon"
for t in qemu-nbd qemu-img qemu-io qemu-storage-daemon; do
    command -v "$t" >/dev/null || { echo "$t not installed: nothing to compare" >&2; exit 1; }
done
NBDCOPY="$(command -v nbdcopy || true)"
ROUNDS="${BENCH_ROUNDS:-3}"
PAIRS="${BENCH_PAIRS:-main iothread nbd}"
D1_COUNT="${BENCH_D1_COUNT:-50000}"
D32_COUNT="${BENCH_D32_COUNT:-300000}"
DIRECT="${BENCH_CACHE_DIRECT:-on}"
NBD_CACHE=none
[ "$DIRECT" = on ] || NBD_CACHE=writeback
# A directory of our own (removed at the end) inside BENCH_DIR.
DIR="$(mktemp -d "${BENCH_DIR:-/var/tmp}/bench-nbd.XXXXXX")"
SIZE="${BENCH_SIZE:-1G}"
IMG="$DIR/bench.img"
SRC="$DIR/src.img"
OUT="$DIR/out.img"
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
qemu-img create -q -f raw -o preallocation=full "$IMG" "$SIZE"
qemu-img create -q -f raw -o preallocation=full "$SRC" "$SIZE"
# Data everywhere in the source, so copies move real bytes.
qemu-io -f raw -c "write -P 0x5a 0 $SIZE" "$SRC" >/dev/null
sync

SOCK="$DIR/nbd.sock"
URI="nbd+unix:///disk?socket=$SOCK"

daemon() { # program iothread(0|1)
    local io=() eio=""
    if [ "$2" = 1 ]; then io=(--object iothread,id=io0); eio=",iothread=io0"; fi
    "$1" "${io[@]}" \
        --blockdev "driver=file,node-name=f,filename=$IMG,cache.direct=$DIRECT,aio=io_uring" \
        --blockdev driver=raw,node-name=disk,file=f \
        --nbd-server "addr.type=unix,addr.path=$SOCK" \
        --export "type=nbd,id=e,node-name=disk,name=disk,writable=on$eio" &
}
start() { # server
    sync # write-back of the previous server must not land in this one
    rm -f "$SOCK"
    case "$1" in
    blockd-main) daemon "$BSD" 0 ;;
    qsd-main) daemon qemu-storage-daemon 0 ;;
    blockd-iothread) daemon "$BSD" 1 ;;
    qsd-iothread) daemon qemu-storage-daemon 1 ;;
    blockd-nbd) "$BNBD" -f raw -t -e 0 -x disk --cache=$NBD_CACHE --aio=io_uring -k "$SOCK" "$IMG" & ;;
    qemu-nbd) qemu-nbd -f raw -t -e 0 -x disk --cache=$NBD_CACHE --aio=io_uring -k "$SOCK" "$IMG" & ;;
    esac
    PID=$!
    for _ in $(seq 200); do [ -S "$SOCK" ] && break; sleep 0.05; done
    sleep 0.2
}
stop() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=""; }

bench() { # count flags... -> IOPS
    local c="$1"; shift
    qemu-img bench -f raw -c "$c" "$@" "$URI" | awk -v c="$c" '/Run completed/ { printf "%.0f", c / $4 }'
}
copy() { # from to -> MiB/s
    local s e
    s=$(date +%s.%N)
    nbdcopy -C 4 "$1" "$2"
    e=$(date +%s.%N)
    awk -v s="$s" -v e="$e" -v b="$(stat -c %s "$IMG")" 'BEGIN { printf "%.0f", b / 1048576 / (e - s) }'
}

SERVERS=()
for p in $PAIRS; do
    case "$p" in
    main | iothread) SERVERS+=("blockd-$p" "qsd-$p") ;;
    nbd) SERVERS+=(blockd-nbd qemu-nbd) ;;
    *) echo "unknown pair $p (main, iothread, nbd)" >&2; exit 1 ;;
    esac
done
TESTS="rd1 rd32 wr32"
[ -n "$NBDCOPY" ] && TESTS="$TESTS in out null"
declare -A R
n=${#SERVERS[@]}
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
for ((r = 0; r < ROUNDS; r++)); do
    for ((i = 0; i < n; i++)); do
        s="${SERVERS[$(((i + r) % n))]}"
        start "$s"
        R[$s,rd1,$r]=$(bench "$D1_COUNT" -d 1)
        R[$s,rd32,$r]=$(bench "$D32_COUNT" -d 32)
        R[$s,wr32,$r]=$(bench "$D32_COUNT" -d 32 -w)
        if [ -n "$NBDCOPY" ]; then
            R[$s,in,$r]=$(copy "$SRC" "$URI")
            R[$s,out,$r]=$(copy "$URI" "$OUT")
            cmp "$SRC" "$OUT" || { echo "copy through $s differs" >&2; exit 1; }
            rm -f "$OUT"
            R[$s,null,$r]=$(copy "$URI" null:)
        fi
        stop
        echo "round $((r + 1))/$ROUNDS $s: $(for t in $TESTS; do printf '%s=%s ' "$t" "${R[$s,$t,$r]}"; done)" >&2
    done
done

label() {
    case "$1" in
    rd1) echo "bench read 4k depth 1 (IOPS)" ;;
    rd32) echo "bench read 4k depth 32 (IOPS)" ;;
    wr32) echo "bench write 4k depth 32 (IOPS)" ;;
    in) echo "nbdcopy -C 4 file -> export (MiB/s)" ;;
    out) echo "nbdcopy -C 4 export -> file (MiB/s)" ;;
    null) echo "nbdcopy -C 4 export -> null: (MiB/s)" ;;
    esac
}
median() { sort -g | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%s %s %s\n", m, v[1], v[NR] }'; }
echo "cache.direct=$DIRECT, $ROUNDS rounds, image $SIZE in $DIR; load average before: $LOAD0, after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "figures are medians; ratio = blockd / qemu (median [min, max] over rounds)"
printf "%-38s %-9s %10s %10s   %s\n" test pair blockd qemu ratio
for t in $TESTS; do
    for p in $PAIRS; do
        case "$p" in
        nbd) b=blockd-nbd q=qemu-nbd ;;
        *) b="blockd-$p" q="qsd-$p" ;;
        esac
        bm=$(for ((r = 0; r < ROUNDS; r++)); do echo "${R[$b,$t,$r]:-0}"; done | median | cut -d' ' -f1)
        qm=$(for ((r = 0; r < ROUNDS; r++)); do echo "${R[$q,$t,$r]:-0}"; done | median | cut -d' ' -f1)
        read -r rm rlo rhi < <(for ((r = 0; r < ROUNDS; r++)); do
            awk -v b="${R[$b,$t,$r]:-0}" -v q="${R[$q,$t,$r]:-0}" 'BEGIN { printf "%.3f\n", q ? b / q : 0 }'
        done | median)
        printf "%-38s %-9s %10s %10s   %.2f [%.2f, %.2f]\n" "$(label "$t")" "$p" "$bm" "$qm" "$rm" "$rlo" "$rhi"
    done
done
