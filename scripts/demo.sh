#!/usr/bin/env bash
# README's first command: the main job.
#
# The daemon (blockd-storage-daemon serving an image over NBD with a QMP socket) lands with the
# block layer, daemon and NBD issues. Until then this runs what exists: the event loop's
# benchmark, which starts iothreads, crosses threads and drives io_uring through the executor.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench -p blockd-aio --bench aio_bench -- "$@"
