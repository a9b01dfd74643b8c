#!/usr/bin/env bash
# blockd-img bench against qemu-img bench: same flags, same files, one run; prints both times
# and the ratio (qemu time / blockd time: > 1 means blockd is faster). fio on the same file is
# the device limit when fio is installed. Benchmarks are not tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p blockd-img
B="$PWD/target/release/blockd-img"
Q="$(command -v qemu-img || true)"
[ -n "$Q" ] || { echo "qemu-img not installed: nothing to compare" >&2; exit 1; }
DIR="${BENCH_DIR:-$(mktemp -d /var/tmp/bench-img.XXXXXX)}"
trap 'rm -rf "$DIR"' EXIT
IMG="$DIR/bench.img"
"$Q" create -q -f raw -o preallocation=full "$IMG" 1G

secs() { "$@" | sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p'; }

row() { # label, flags...
    local label="$1"; shift
    local q b
    q=$(secs "$Q" bench "$@")
    b=$(secs "$B" bench "$@")
    awk -v l="$label" -v q="$q" -v b="$b" 'BEGIN {
        r = (b > 0) ? q / b : 0
        printf "%-44s qemu-img %8.3f s   blockd-img %8.3f s   ratio %6.2f\n", l, q, b, r }'
}

NULL="driver=null-co,size=1G"
row "null-co read  depth 1  (1M x 4k)"   -c 1000000 -d 1  --image-opts "$NULL"
row "null-co read  depth 64 (1M x 4k)"   -c 1000000 -d 64 --image-opts "$NULL"
row "null-co write depth 1  (1M x 4k)"   -w -c 1000000 -d 1  --image-opts "$NULL"
row "null-co write depth 64 (1M x 4k)"   -w -c 1000000 -d 64 --image-opts "$NULL"
row "raw -t none -i io_uring read depth 1"  -f raw -t none -i io_uring -c 100000 -d 1  "$IMG"
row "raw -t none -i io_uring read depth 32" -f raw -t none -i io_uring -c 300000 -d 32 "$IMG"
row "raw -t none -i io_uring write depth 32" -f raw -t none -i io_uring -w -c 300000 -d 32 "$IMG"
row "raw -t writeback read depth 32"     -f raw -t writeback -c 300000 -d 32 "$IMG"
row "raw -t writeback write depth 32"    -f raw -t writeback -w -c 300000 -d 32 "$IMG"

if command -v fio >/dev/null; then
    for d in 1 32; do
        out=$(fio --name=lim --filename="$IMG" --rw=read --bs=4k --direct=1 --ioengine=io_uring \
            --iodepth=$d --size=1G --io_size=$((d == 1 ? 100000 * 4096 : 300000 * 4096)) \
            --output-format=terse --terse-version=3 2>/dev/null)
        awk -F';' -v d=$d '{ printf "fio io_uring O_DIRECT 4k read depth %-2d (limit) %8.3f s   %9.0f IOPS\n", d, $9/1000, $8 }' <<<"$out"
    done
else
    echo "fio not installed: no device-limit line"
fi
