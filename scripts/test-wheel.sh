#!/usr/bin/env bash
# The test suite against the released artefacts, not the checkout (issue 14): build the sdist, and
# the wheel from that sdist; install the wheel with its test extra into a fresh venv of PYTHON
# (with secretfs's pyfuse3 build); unpack the sdist and delete its three source packages, so every
# import, the tests' own and their subprocesses', can only find the installed wheel; run the suite
# there. CI runs it on Python 3.13 (the checkout's suite runs on 3.11). Everything lives under
# build/wheel-<python version>/.
#   Usage: scripts/test-wheel.sh PYTHON [pytest arguments...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${1:?usage: test-wheel.sh PYTHON [pytest arguments...]}
shift
ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
work="$root/build/wheel-$ver"
rm -rf "$work"
mkdir -p "$work"
"$py" -m venv "$work/venv"
vpy="$work/venv/bin/python"
"$vpy" -m pip install -q --upgrade pip build
bash "$root/scripts/build-pyfuse3.sh" "$work/venv/bin/pip" "$work/pyfuse3"
"$vpy" -m pip install -q "$work"/pyfuse3/pyfuse3-*.whl
"$vpy" -m build -q --outdir "$work/dist" "$root" >/dev/null
sdist=$(ls "$work"/dist/*.tar.gz)
wheel=$(ls "$work"/dist/*.whl)
"$vpy" -m pip install -q "$wheel[test]"
tar xzf "$sdist" -C "$work"
src="$work/$(basename "$sdist" .tar.gz)"
rm -rf "$src/secretfs" "$src/csi" "$src/providers"
echo "test-wheel: Python $ver, $(basename "$wheel"), tests from $(basename "$sdist")"
cd "$src"
exec "$vpy" -m pytest -q -p no:cacheprovider "$@"
