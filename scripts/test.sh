#!/usr/bin/env bash
# The whole test suite: unit, property, store conformance, fault injection
# and multi-process tests on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# The multi-process tests run the `shoal-server` and `shoal` binaries, and
# the client's example programs.
cargo build --workspace --bins --examples --features shoal-server/failpoints
cargo test --workspace --features shoal-server/failpoints "$@"
# Once more with every extent of 4 KiB or more written with O_DIRECT (the
# default threshold is 1 MiB): the store's conformance, crash and cluster
# tests on the direct path. Same build, no recompilation.
if [ $# -eq 0 ]; then
    SHOAL_DIRECT_MIN=4096 cargo test --workspace --features shoal-server/failpoints --lib
    SHOAL_DIRECT_MIN=4096 cargo test --workspace --features shoal-server/failpoints --test crash --test cluster --test writeback
fi
