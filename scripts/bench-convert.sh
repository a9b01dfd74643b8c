#!/usr/bin/env bash
# blockd-img convert against qemu-img convert on the same files in one run: a 1 GiB raw image
# (half random data in 1 MiB stripes, half holes) to raw, to qcow2 and back, with the page
# cache (default) and with O_DIRECT (-t none -T none). A last row times `check` of the qcow2
# image made from it. Outputs are checked to be identical (qemu-img compare; the check
# reports with diff). Benchmarks are not tests.
#
# Fairness: the page cache cannot be dropped here, so both tools run with a warm cache (one
# untimed run of each first). Every timed run starts from a flushed file system (`sync`,
# untimed: no writeback of an earlier run's output competes with it), the two tools alternate
# which goes first, and each row reports the median of RUNS runs per tool; ratio = qemu time /
# blockd time (> 1: blockd is faster). `check` takes milliseconds, so each of its samples times
# CHECK_BATCH runs in a row (per-run figures are printed). Timing uses bash's EPOCHREALTIME
# (no helper process inside the timed span). The load average is printed before and after:
# figures from a loaded machine are noisy.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p blockd-img
T="${CARGO_TARGET_DIR:-$PWD/target}"
B="$T/release/blockd-img"
Q="$(command -v qemu-img || true)"
[ -n "$Q" ] || { echo "qemu-img not installed: nothing to compare" >&2; exit 1; }
RUNS="${RUNS:-5}"
CHECK_BATCH="${CHECK_BATCH:-20}"
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
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

now_us() { local t=${EPOCHREALTIME/./}; echo "$((10#$t))"; }

timed() { # reps, command... -> microseconds for reps runs (output file $DIR/out removed first)
    local reps="$1" t0 t1 i
    shift
    rm -f "$DIR/out"
    sync
    t0=$(now_us)
    for ((i = 0; i < reps; i++)); do "$@" >/dev/null; done
    t1=$(now_us)
    rm -f "$DIR/out"
    echo $((t1 - t0))
}

median() { tr ' ' '\n' | grep . | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

# versus label reps qemu-command... -- blockd-command...: medians of both (microseconds/rep)
versus() {
    local label="$1" reps="$2" qs="" bs="" r
    shift 2
    local -a qc=() bc=()
    while [ "$1" != "--" ]; do qc+=("$1"); shift; done
    shift
    bc=("$@")
    timed 1 "${qc[@]}" >/dev/null # warm-up: page cache of the source, binaries, allocator
    timed 1 "${bc[@]}" >/dev/null
    for ((r = 0; r < RUNS; r++)); do
        if ((r % 2 == 0)); then
            qs+=" $(timed "$reps" "${qc[@]}")"
            bs+=" $(timed "$reps" "${bc[@]}")"
        else
            bs+=" $(timed "$reps" "${bc[@]}")"
            qs+=" $(timed "$reps" "${qc[@]}")"
        fi
    done
    local q b
    q=$(echo "$qs" | median)
    b=$(echo "$bs" | median)
    awk -v l="$label" -v q="$q" -v b="$b" -v n="$reps" 'BEGIN {
        q /= n * 1e6; b /= n * 1e6; r = (b > 0) ? q / b : 0
        printf "%-36s qemu-img %8.4f s   blockd-img %8.4f s   ratio %5.2f\n", l, q, b, r }'
}

row() { # label, convert args (the output file is $DIR/out)
    local label="$1"
    shift
    "$Q" convert "$@" "$DIR/out.qemu"
    "$B" convert "$@" "$DIR/out"
    "$Q" compare -q "$DIR/out.qemu" "$DIR/out" || { echo "$label: outputs differ" >&2; exit 1; }
    rm -f "$DIR/out.qemu" "$DIR/out"
    versus "$label" 1 "$Q" convert "$@" "$DIR/out" -- "$B" convert "$@" "$DIR/out"
}

row "raw -> raw"                 -f raw -O raw "$SRC"
row "raw -> qcow2"               -f raw -O qcow2 "$SRC"
row "qcow2 -> raw"               -f qcow2 -O raw "$DIR/src.qcow2"
row "raw -> raw (-t none -T none)"   -t none -T none -f raw -O raw "$SRC"
row "raw -> qcow2 (-t none -T none)" -t none -T none -f raw -O qcow2 "$SRC"
row "qcow2 -> raw (-t none -T none)" -t none -T none -f qcow2 -O raw "$DIR/src.qcow2"
row "raw -> raw -W -m 16"        -W -m 16 -f raw -O raw "$SRC"

# check of the qcow2 image (half data, half holes): same report from both.
diff <("$Q" check "$DIR/src.qcow2") <("$B" check "$DIR/src.qcow2") >/dev/null \
    || { echo "check: reports differ" >&2; exit 1; }
versus "check (qcow2 of it)" "$CHECK_BATCH" "$Q" check "$DIR/src.qcow2" -- "$B" check "$DIR/src.qcow2"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
