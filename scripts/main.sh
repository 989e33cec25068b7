#!/usr/bin/env bash
# The main job: builds Shoal and runs `shoal demo`: six real shoal-server
# processes take KV pairs and an EC array, lose a server, and read it all back.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --bins
"$CARGO_TARGET_DIR/debug/shoal" demo "$@"
