#!/usr/bin/env bash
# Install the system packages secretfs needs (Debian/Ubuntu): FUSE 3, its headers for pyfuse3, a C
# compiler and patch (pyfuse3 builds from source with one change, scripts/build-pyfuse3.sh; the
# benchmark compiles a tiny client).
set -euo pipefail
need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
pkg-config --exists fuse3 2>/dev/null || need+=(libfuse3-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v cc >/dev/null || need+=(gcc)
command -v patch >/dev/null || need+=(patch)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
echo "installing system packages: ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
