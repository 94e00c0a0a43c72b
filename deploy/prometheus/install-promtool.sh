#!/usr/bin/env bash
# Puts promtool (the rule and config checker of Prometheus) at DEST (default .venv/bin/promtool),
# taken from Debian's `prometheus` package without installing the package: installing it would
# also set up and start a Prometheus server. promtool is a static Go binary (it needs libc only).
# Used by tests/integration/test_deploy.py; Debian's build leaves out Kubernetes service
# discovery, so it checks deploy/prometheus/prometheus.yml but not prometheus-kubernetes.yml.
set -euo pipefail
DEST=${1:-.venv/bin/promtool}
[ -x "$DEST" ] && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
if ! apt-get download prometheus >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  apt-get download prometheus >/dev/null
fi
dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool
cd - >/dev/null
mkdir -p "$(dirname "$DEST")"
install -m 0755 "$tmp/usr/bin/promtool" "$DEST"
echo "promtool installed at $DEST"
