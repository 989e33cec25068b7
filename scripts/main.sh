#!/usr/bin/env bash
# The main job: builds Shoal and runs `shoal demo`, a real shoal-server
# taking writes and reads through the client, a SIGKILL and a replay.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --bins
"$CARGO_TARGET_DIR/debug/shoal" demo "$@"
