#!/usr/bin/env bash
# Site-packages of a fresh venv per extra (what `pip install 'secretfs-csi[EXTRA]'` brings), less
# pip and setuptools. Needs network access to the package index; takes a few minutes (pyfuse3
# compiles once, then comes from pip's cache). Prints a Markdown table.
#   bash bench/install_footprint.sh [EXTRA ...]     (default: the core and every extra; "" is the core)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
size() {  # KiB of site-packages without pip, setuptools, pkg_resources
  local sp="$1/lib/python3.11/site-packages" total tools
  total=$(du -sk "$sp" | cut -f1)
  tools=$(du -sk "$sp"/pip "$sp"/setuptools "$sp"/pkg_resources 2>/dev/null | awk '{s+=$1} END {print s+0}')
  echo $(( (total - tools) / 1024 ))
}
echo "| install | site-packages (MiB) |"
echo "|---|---|"
extras=("$@")
[ ${#extras[@]} -gt 0 ] || extras=("" aws vault azure gcp plugin csi all)
for extra in "${extras[@]}"; do
  venv="$work/v${extra:-core}"
  python3 -m venv "$venv"
  spec="$root"; [ -n "$extra" ] && spec="$root[$extra]"
  "$venv/bin/pip" install -q --disable-pip-version-check "$spec" >/dev/null
  echo "| secretfs-csi${extra:+[$extra]} | $(size "$venv") |"
done
