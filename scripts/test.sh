#!/usr/bin/env bash
# The whole test suite (README's second command; .ci/run calls this too).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --all-targets
cargo test --workspace
