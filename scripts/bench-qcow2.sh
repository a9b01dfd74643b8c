#!/usr/bin/env bash
# qcow2 benchmarks: blockd-img bench against qemu-img bench with the same flags on the same
# kind of image, in one run; prints both times and the ratio (qemu time / blockd time: > 1
# means blockd is faster). Benchmarks are not tests.
#   - 4 KiB reads at depth 32 on a fully allocated 1 GiB image, cache=none, io_uring
#   - allocating 4 KiB writes at depth 32 into an empty image (one new cluster per write)
#   - sequential 4 KiB writes into an empty image, and rewrites of the allocated one
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p blockd-img
B="${CARGO_TARGET_DIR:-$PWD/target}/release/blockd-img"
Q="$(command -v qemu-img || true)"
[ -n "$Q" ] || { echo "qemu-img not installed: nothing to compare" >&2; exit 1; }
DIR="${BENCH_DIR:-$(mktemp -d /var/tmp/bench-qcow2.XXXXXX)}"
trap 'rm -rf "$DIR"' EXIT
FULL="$DIR/full.qcow2"
"$Q" create -q -f qcow2 -o preallocation=full "$FULL" 1G

secs() { "$@" | sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p'; }

ratio() { # label, qemu seconds, blockd seconds
    awk -v l="$1" -v q="$2" -v b="$3" 'BEGIN {
        r = (b > 0) ? q / b : 0
        printf "%-52s qemu-img %8.3f s   blockd-img %8.3f s   ratio %6.2f\n", l, q, b, r }'
}

read_row() { # label, flags...
    local label="$1"; shift
    ratio "$label" "$(secs "$Q" bench "$@" "$FULL")" "$(secs "$B" bench "$@" "$FULL")"
}

write_row() { # label, flags... (each tool writes into its own fresh empty image)
    local label="$1"; shift
    "$Q" create -q -f qcow2 "$DIR/q.qcow2" 1G
    "$Q" create -q -f qcow2 "$DIR/b.qcow2" 1G
    local q b
    q=$(secs "$Q" bench "$@" "$DIR/q.qcow2")
    b=$(secs "$B" bench "$@" "$DIR/b.qcow2")
    "$Q" check -q "$DIR/b.qcow2" || echo "WARNING: qemu-img check found problems in blockd's image"
    ratio "$label" "$q" "$b"
}

read_row  "qcow2 4k read depth 32, cache=none, io_uring" -f qcow2 -t none -i io_uring -c 300000 -d 32
read_row  "qcow2 4k read depth 1, cache=none, io_uring"  -f qcow2 -t none -i io_uring -c 50000 -d 1
write_row "qcow2 4k allocating write depth 32, cache=none" -f qcow2 -t none -i io_uring -w -c 16384 -d 32 -S 65536
write_row "qcow2 4k allocating write depth 32, writeback"  -f qcow2 -t writeback -w -c 16384 -d 32 -S 65536
write_row "qcow2 4k sequential write depth 32, fresh, cache=none" -f qcow2 -t none -i io_uring -w -c 100000 -d 32
read_row  "qcow2 4k rewrite depth 32, allocated, cache=none" -f qcow2 -t none -i io_uring -w -c 300000 -d 32
