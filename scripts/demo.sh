#!/usr/bin/env bash
# README's first command: the main job.
#
# The daemon (blockd-storage-daemon serving an image over NBD with a QMP socket) lands with the
# daemon and NBD issues. Until then this runs what exists on an image: `blockd-img info` and
# `blockd-img bench` (reads, then writes, through the block layer and the event loop).
#
#   scripts/demo.sh [IMAGE]     IMAGE defaults to a demo raw image created under target/
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p blockd-img
BIN="${CARGO_TARGET_DIR:-target}/release"
IMG="${1:-target/demo.img}"
if [ ! -e "$IMG" ]; then
    mkdir -p "$(dirname "$IMG")"
    echo "creating demo image $IMG"
    "$BIN/blockd-img" create -f raw "$IMG" 256M
fi
"$BIN/blockd-img" info -f raw "$IMG"
echo
"$BIN/blockd-img" bench -f raw -t none -c 100000 -d 32 "$IMG"
"$BIN/blockd-img" bench -f raw -t none -w -c 100000 -d 32 --pattern 0x5a "$IMG"
