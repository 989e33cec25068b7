#!/usr/bin/env bash
# The whole test suite: unit, property, store conformance, fault injection
# and multi-process tests on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo test --workspace --features shoal-server/failpoints "$@"
