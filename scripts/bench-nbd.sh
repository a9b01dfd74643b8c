#!/usr/bin/env bash
# blockd-nbd against qemu-nbd and qemu-storage-daemon exporting the same image over a unix
# socket, measured with the same clients in one run: `qemu-img bench` over NBD (4k reads at
# depth 1 and 32, 4k writes at depth 32) and nbdcopy of a 1 GiB image in both directions.
# Prints each server's figure and blockd's ratio against each (> 1 means blockd is faster).
# Benchmarks are not tests.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -q -p blockd-nbd-tool
B="$TARGET/release/blockd-nbd"
for t in qemu-nbd qemu-img; do
    command -v "$t" >/dev/null || { echo "$t not installed: nothing to compare" >&2; exit 1; }
done
QSD="$(command -v qemu-storage-daemon || true)"
NBDCOPY="$(command -v nbdcopy || true)"
DIR="${BENCH_DIR:-$(mktemp -d /var/tmp/bench-nbd.XXXXXX)}"
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

start() { # name
    sync # write-back of the previous round must not land in this one
    rm -f "$SOCK"
    case "$1" in
    blockd) "$B" -f raw -t -e 0 -x disk --cache=none --aio=io_uring -k "$SOCK" "$IMG" & ;;
    qemu-nbd) qemu-nbd -f raw -t -e 0 -x disk --cache=none --aio=io_uring -k "$SOCK" "$IMG" & ;;
    qsd) "$QSD" --blockdev "driver=file,node-name=f,filename=$IMG,cache.direct=on,aio=io_uring" \
            --blockdev driver=raw,node-name=disk,file=f \
            --nbd-server "addr.type=unix,addr.path=$SOCK" \
            --export type=nbd,id=e,node-name=disk,name=disk,writable=on & ;;
    esac
    PID=$!
    for _ in $(seq 200); do [ -S "$SOCK" ] && break; sleep 0.05; done
    sleep 0.2
}
stop() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=""; }

bench() { # flags... -> IOPS
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

SERVERS="blockd qemu-nbd"
[ -n "$QSD" ] && SERVERS="$SERVERS qsd"
declare -A R
for s in $SERVERS; do
    start "$s"
    R[$s,rd1]=$(bench 100000 -d 1)
    R[$s,rd32]=$(bench 300000 -d 32)
    R[$s,wr32]=$(bench 300000 -d 32 -w)
    if [ -n "$NBDCOPY" ]; then
        R[$s,in]=$(copy "$SRC" "$URI")
        R[$s,out]=$(copy "$URI" "$OUT")
        cmp "$SRC" "$OUT" || { echo "copy through $s differs" >&2; exit 1; }
        rm -f "$OUT"
    fi
    stop
done

printf "%-36s %12s %12s %12s %10s %10s\n" test blockd-nbd qemu-nbd qsd "vs nbd" "vs qsd"
row() { # key label unit
    local b="${R[blockd,$1]:-0}" q="${R[qemu-nbd,$1]:-0}" d="${R[qsd,$1]:-0}"
    awk -v l="$2 ($3)" -v b="$b" -v q="$q" -v d="$d" 'BEGIN {
        printf "%-36s %12s %12s %12s %10.2f %10.2f\n", l, b, q, (d ? d : "-"), (q ? b / q : 0), (d ? b / d : 0) }'
}
row rd1 "qemu-img bench read 4k depth 1" IOPS
row rd32 "qemu-img bench read 4k depth 32" IOPS
row wr32 "qemu-img bench write 4k depth 32" IOPS
if [ -n "$NBDCOPY" ]; then
    row in "nbdcopy -C 4 file -> export $SIZE" MiB/s
    row out "nbdcopy -C 4 export -> file $SIZE" MiB/s
else
    echo "nbdcopy not installed: no copy rows"
fi
