#!/usr/bin/env bash
# blockd-img convert against qemu-img convert on the same files in one run: a 1 GiB raw image
# (half random data in 1 MiB stripes, half holes) to raw, to qcow2 and back, with the page
# cache (default) and with O_DIRECT (-t none -T none). Each row is the best of RUNS runs;
# ratio = qemu time / blockd time (> 1: blockd is faster). Outputs are checked to be identical
# (qemu-img compare). A last row times `check` of the qcow2 image made from it (outputs
# compared). Benchmarks are not tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p blockd-img
T="${CARGO_TARGET_DIR:-$PWD/target}"
B="$T/release/blockd-img"
Q="$(command -v qemu-img || true)"
[ -n "$Q" ] || { echo "qemu-img not installed: nothing to compare" >&2; exit 1; }
RUNS="${RUNS:-3}"
DIR="${BENCH_DIR:-$(mktemp -d /var/tmp/bench-convert.XXXXXX)}"
mkdir -p "$DIR"
trap 'rm -rf "$DIR"' EXIT
SRC="$DIR/src.raw"
python3 - "$SRC" <<'PY'
import os, sys
with open(sys.argv[1], "wb") as f:
    f.truncate(1 << 30)
    stripe = os.urandom(1 << 20)
    for i in range(0, 1024, 2):
        f.seek(i << 20)
        f.write(stripe)
PY
"$Q" convert -f raw -O qcow2 "$SRC" "$DIR/src.qcow2"

best() { # command... -> best wall time in seconds over RUNS runs
    local best="" t0 t1 t
    for _ in $(seq "$RUNS"); do
        rm -f "$DIR/out"
        t0=$(date +%s.%N)
        "$@" >/dev/null
        t1=$(date +%s.%N)
        t=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
        if [ -z "$best" ] || awk -v t="$t" -v b="$best" 'BEGIN { exit !(t < b) }'; then best=$t; fi
    done
    echo "$best"
}

row() { # label, convert args (the output file is $DIR/out)
    local label="$1"; shift
    local q b
    q=$(best "$Q" convert "$@" "$DIR/out")
    cp --sparse=always "$DIR/out" "$DIR/out.qemu"
    b=$(best "$B" convert "$@" "$DIR/out")
    "$Q" compare -q "$DIR/out.qemu" "$DIR/out" || { echo "$label: outputs differ" >&2; exit 1; }
    awk -v l="$label" -v q="$q" -v b="$b" 'BEGIN {
        r = (b > 0) ? q / b : 0
        printf "%-36s qemu-img %7.3f s   blockd-img %7.3f s   ratio %5.2f\n", l, q, b, r }'
}

row "raw -> raw"                 -f raw -O raw "$SRC"
row "raw -> qcow2"               -f raw -O qcow2 "$SRC"
row "qcow2 -> raw"               -f qcow2 -O raw "$DIR/src.qcow2"
row "raw -> raw (-t none -T none)"   -t none -T none -f raw -O raw "$SRC"
row "raw -> qcow2 (-t none -T none)" -t none -T none -f raw -O qcow2 "$SRC"
row "qcow2 -> raw (-t none -T none)" -t none -T none -f qcow2 -O raw "$DIR/src.qcow2"
row "raw -> raw -W -m 16"        -W -m 16 -f raw -O raw "$SRC"

# check of the qcow2 image (half data, half holes): same report from both.
qc=$(best "$Q" check "$DIR/src.qcow2")
bc=$(best "$B" check "$DIR/src.qcow2")
diff <("$Q" check "$DIR/src.qcow2") <("$B" check "$DIR/src.qcow2") >/dev/null \
    || { echo "check: reports differ" >&2; exit 1; }
awk -v q="$qc" -v b="$bc" 'BEGIN {
    r = (b > 0) ? q / b : 0
    printf "%-36s qemu-img %7.3f s   blockd-img %7.3f s   ratio %5.2f\n", "check (qcow2 of it)", q, b, r }'
