#!/usr/bin/env bash
# Seed corpus for the `image` fuzz target: small images made by qemu-img/qemu-io covering the
# format's features (v2/v3, cluster sizes, refcount widths, extended L2, zero, compressed
# deflate/zstd clusters, snapshots, bitmaps, a backing name, lazy refcounts left dirty, unknown
# extensions kept by QEMU). Each seed stays small (tiny virtual sizes, 512 B-4 KiB clusters
# where possible) so that libFuzzer's mutations hit metadata. Writes corpus/image/ (not
# committed; run again to regenerate).
set -euo pipefail
cd "$(dirname "$0")"
OUT=corpus/image
mkdir -p "$OUT"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
Q=qemu-img
IO=qemu-io
n=0
seed() { # name, create options, size, qemu-io commands...
    local name="$1" opts="$2" size="$3"; shift 3
    local f="$TMP/$name.qcow2"
    "$Q" create -q -f qcow2 -o "$opts" "$f" "$size"
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    if [ ${#args[@]} -gt 0 ]; then "$IO" -f qcow2 "${args[@]}" "$f" >/dev/null; fi
    cp "$f" "$OUT/$name"
    n=$((n + 1))
}
data=("write -P 1 0 3k" "write -z 4k 4k" "write -P 2 12k 1k" "discard 16k 4k")
seed v3-512 cluster_size=512 64k "${data[@]}"
seed v2-512 cluster_size=512,compat=0.10 64k "${data[@]}"
seed v3-4k cluster_size=4k 256k "${data[@]}"
seed v2-4k cluster_size=4k,compat=0.10 256k "${data[@]}"
for bits in 1 2 4 8 32 64; do
    seed "rc$bits" "cluster_size=512,refcount_bits=$bits" 64k "${data[@]}"
done
seed extl2 cluster_size=16k,extended_l2=on 256k "write -P 3 0 2k" "write -z 8k 2k" "write -P 4 20k 1k"
seed comp-zlib cluster_size=4k 64k "write -c -P 5 0 4k" "write -c -P 6 8k 4k"
seed comp-zstd cluster_size=4k,compression_type=zstd 64k "write -c -P 7 0 4k"
seed lazy cluster_size=512,lazy_refcounts=on 64k "write -P 8 0 2k"
seed prealloc cluster_size=512,preallocation=metadata 16k
"$Q" create -q -f raw "$TMP/base.raw" 64k
seed backing cluster_size=512,backing_file=base.raw,backing_fmt=raw 64k "write -P 13 0 1k"
# Snapshots (one of another size).
f="$TMP/snap.qcow2"
"$Q" create -q -f qcow2 -o cluster_size=512 "$f" 32k
"$IO" -c "write -P 9 0 4k" "$f" >/dev/null
"$Q" snapshot -c one "$f"
"$IO" -c "write -P 10 1k 2k" "$f" >/dev/null
"$Q" resize -q "$f" 48k
"$Q" snapshot -c two "$f"
cp "$f" "$OUT/snapshots"; n=$((n + 1))
# A persistent bitmap.
f="$TMP/bitmap.qcow2"
"$Q" create -q -f qcow2 -o cluster_size=4k "$f" 64k
"$Q" bitmap --add "$f" b0
"$IO" -c "write -P 11 0 4k" "$f" >/dev/null
cp "$f" "$OUT/bitmap"; n=$((n + 1))
# Dirty: lazy refcounts and a writer that never closed (the header bit set by hand).
f="$TMP/dirty.qcow2"
"$Q" create -q -f qcow2 -o cluster_size=512,lazy_refcounts=on "$f" 64k
"$IO" -c "write -P 12 0 2k" "$f" >/dev/null
printf '\x01' | dd of="$f" bs=1 seek=79 conv=notrunc status=none
cp "$f" "$OUT/dirty"; n=$((n + 1))
echo "$n seeds in $OUT ($(du -sh "$OUT" | cut -f1))"
