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
