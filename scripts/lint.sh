#!/usr/bin/env bash
# `make lint`: rustfmt (both crates), clippy with warnings as errors for both crates (the
# extension's Cargo.toml denies undocumented unsafe blocks), and the one-way dependencies between
# the subsystems of src/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy
echo "lint: rustfmt"
cargo fmt --check
(cd pgrx-tests && cargo fmt --check)
echo "lint: clippy"
cargo clippy --all-targets -- -D warnings
(cd pgrx-tests && cargo clippy --all-targets -- -D warnings)
echo "lint: layers"
bash scripts/check-layers.sh
echo "lint: ok"
