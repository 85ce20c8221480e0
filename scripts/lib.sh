# shellcheck shell=bash
# Shared helpers for the scripts in this folder; sourced, not run.

step() { printf '==> %s\n' "$*" >&2; }

# Puts cargo on PATH and keeps build output outside the clone, so CI's fresh clones reuse it.
use_cargo() {
  if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo is not installed; install the Rust toolchain (rustup) and re-run" >&2
    exit 1
  fi
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/rigger-target}"
  export PATH
}
