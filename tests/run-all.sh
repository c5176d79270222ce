#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: installs what the tests need, then
# formatting, lints, unit, integration and end-to-end tests (real Prometheus and Alertmanager
# among them), the Prometheus rules under promtool, and checks that the benchmarks build.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v prometheus-alertmanager >/dev/null || need_apt+=(prometheus-alertmanager)
command -v kubectl >/dev/null || need_apt+=(kubernetes-client)
if ((${#need_apt[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked

promtool check rules rules/*.yaml
(cd rules/tests && promtool test rules ./*.test.yaml)

cargo bench --workspace --locked --no-run
