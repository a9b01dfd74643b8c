#!/usr/bin/env bash
# README's first command: the main job. blockd-storage-daemon serves an image over NBD, with a
# QMP monitor on a unix socket, until Ctrl-C (SIGINT shuts it down cleanly).
#
#   scripts/demo.sh [IMAGE]     IMAGE defaults to a demo qcow2 image created under target/
#
# Environment: NBD_PORT (default 10809), QMP_SOCKET (default target/demo-qmp.sock),
# DEMO_SECONDS (stop after that many seconds instead of waiting for Ctrl-C).
#
# While it runs, from another shell:
#   qemu-img info nbd://127.0.0.1:10809/disk0
#   qemu-io -f raw -c 'write -P 0x5a 0 1M' -c 'read -P 0x5a 0 1M' nbd://127.0.0.1:10809/disk0
#   nbdinfo --map nbd://127.0.0.1:10809/disk0
#   python3 -m qemu.qmp.qmp_shell target/demo-qmp.sock   (then: query-block-exports)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p blockd-img -p blockd-storage-daemon
BIN="${CARGO_TARGET_DIR:-target}/release"
IMG="${1:-target/demo.qcow2}"
PORT="${NBD_PORT:-10809}"
QMP="${QMP_SOCKET:-target/demo-qmp.sock}"
if [ ! -e "$IMG" ]; then
    mkdir -p "$(dirname "$IMG")"
    echo "creating demo image $IMG"
    "$BIN/blockd-img" create -f qcow2 "$IMG" 1G
fi
"$BIN/blockd-img" info "$IMG"
FMT="$("$BIN/blockd-img" info "$IMG" | sed -n 's/^file format: //p')"
mkdir -p "$(dirname "$QMP")"
rm -f "$QMP"
echo
echo "serving $IMG ($FMT) as nbd://127.0.0.1:$PORT/disk0; QMP on $QMP; Ctrl-C stops"
args=(
    --object iothread,id=io0
    --blockdev "driver=file,node-name=file0,filename=$IMG"
    --blockdev "driver=$FMT,node-name=disk0,file=file0"
    --nbd-server "addr.type=inet,addr.host=127.0.0.1,addr.port=$PORT"
    --export "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on,iothread=io0"
    --chardev "socket,id=qmp0,path=$QMP,server=on,wait=off"
    --monitor chardev=qmp0
)
if [ -n "${DEMO_SECONDS:-}" ]; then
    "$BIN/blockd-storage-daemon" "${args[@]}" &
    pid=$!
    sleep "$DEMO_SECONDS"
    kill -INT "$pid"
    wait "$pid"
else
    exec "$BIN/blockd-storage-daemon" "${args[@]}"
fi
