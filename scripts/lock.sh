#!/usr/bin/env bash
# Pin the image's dependencies (pyproject.toml's core and [all]) with hashes into
# deploy/requirements.lock, for every platform the index has files for. Needs pip-tools and
# network access; a few minutes.   bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools" && "$tools/bin/pip" install -q pip-tools
"$tools/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras --extra all \
  --no-emit-index-url --no-emit-find-links --no-header --output-file - pyproject.toml \
  | awk '/^secretfs-csi @/ {skip=1; next} skip && /^    #/ {next} {skip=0} !/^# (WARNING: pip install will require|Consider using a hashable URL)/' \
  > deploy/requirements.lock.new
{ sed -n '1,4p' deploy/requirements.lock; cat deploy/requirements.lock.new; } > deploy/requirements.lock.tmp
mv deploy/requirements.lock.tmp deploy/requirements.lock && rm deploy/requirements.lock.new
