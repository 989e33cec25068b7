#!/usr/bin/env bash
# Installs what building Shoal needs on Debian 12 (as root) and sets the
# shared cargo target directory. Sourced by main.sh and test.sh; idempotent.
set -euo pipefail

need=()
# fuse3 (fusermount3), rsync, attr (setfattr) and python3 for the POSIX mount and its tests;
# fio for the raw disk's figures in `shoal bench matrix`, and a font for its charts;
# libisal-dev: ISA-L, the erasure-code encoder.
for p in clang libclang-dev build-essential pkg-config ca-certificates curl fuse3 rsync attr python3 fio fonts-dejavu-core libisal-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if ((${#need[@]})); then
  echo "setup: installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] || {
    echo "setup: installing the Rust toolchain with rustup" >&2
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  }
  export PATH="$HOME/.cargo/bin:$PATH"
fi

# RocksDB takes ~16 minutes to build on two cores: keep one target
# directory outside the checkout so every clone and CI run reuses it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/shoal/target}"
mkdir -p "$CARGO_TARGET_DIR"
