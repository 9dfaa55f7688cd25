#!/usr/bin/env bash
# Build pyfuse3 with secretfs's one change (deploy/pyfuse3/read-inode.patch: read() gets the
# inode when the kernel sends file handle 0, which no-open reads need; docs/pyfuse3-read-inode.md)
# into a wheel. The sdist is the version and hash deploy/requirements.lock pins; Cython regenerates
# the C source from the patched .pyx/.pxi (build isolation fetches it). Used by `make setup` and
# the image; a stock pyfuse3 still works (secretfs falls back to the OPEN read path).
#   Usage: scripts/build-pyfuse3.sh PIP OUTDIR   (PIP: the pip of the Python to build for)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
pip=${1:?usage: build-pyfuse3.sh PIP OUTDIR}
out=${2:?usage: build-pyfuse3.sh PIP OUTDIR}
version=$(sed -n 's/^pyfuse3==\([^ ]*\) .*/\1/p' "$root/deploy/requirements.lock")
sha=$(sed -n '/^pyfuse3==/{n;s/.*--hash=sha256:\([0-9a-f]*\).*/\1/p;}' "$root/deploy/requirements.lock")
if [ -z "$version" ] || [ -z "$sha" ]; then
  echo "build-pyfuse3: no pyfuse3 pin with a hash in deploy/requirements.lock" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$pip" download -q --no-deps --no-binary :all: "pyfuse3==$version" -d "$work"
echo "$sha  $work/pyfuse3-$version.tar.gz" | sha256sum -c --quiet
tar xzf "$work/pyfuse3-$version.tar.gz" -C "$work"
src="$work/pyfuse3-$version"
patch -s -d "$src" -p1 < "$root/deploy/pyfuse3/read-inode.patch"
rm -f "$src/src/pyfuse3/__init__.c"  # generated from the unpatched source: Cython must redo it
mkdir -p "$out"
rm -f "$out"/pyfuse3-*.whl
"$pip" wheel -q --no-deps -w "$out" "$src"
ls "$out"/pyfuse3-*.whl
