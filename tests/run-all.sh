#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: installs what the tests need, then
# formatting, lints, unit, integration and end-to-end tests, and checks the benchmarks build.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# (Later suites add Debian packages here, e.g. prometheus for promtool.)
if ((${#need_apt[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
cargo bench --workspace --locked --no-run
