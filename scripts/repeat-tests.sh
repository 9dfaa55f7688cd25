#!/usr/bin/env bash
# Run the whole suite N times in a row (default 20) and report every run's result: a flaky test
# is a bug. Not part of CI (one run is ~5 min on 2 cores with the two workers `make test` uses).
# Usage: scripts/repeat-tests.sh [N]; TEST_WORKERS=1 for one worker.
set -uo pipefail
cd "$(dirname "$0")/.."
n=${1:-20}
# As `make test` runs it: the fresh-venv install test takes pyfuse3 from secretfs's build.
export SECRETFS_WHEELHOUSE=${SECRETFS_WHEELHOUSE:-$PWD/build/pyfuse3}
failed=0
for i in $(seq "$n"); do
  start=$(date +%s)
  out=$(.venv/bin/pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-2}" 2>&1)
  rc=$?
  summary=$(printf '%s\n' "$out" | tail -n 1)
  printf 'run %d/%d (%ds): %s\n' "$i" "$n" "$(( $(date +%s) - start ))" "$summary"
  if [ "$rc" -ne 0 ]; then
    failed=$((failed + 1))
    printf '%s\n' "$out" | grep -E '^(FAILED|ERROR)' | sed 's/^/    /'
    # The whole output of a failed run, to find the race (build/ is not tracked).
    mkdir -p build/repeat
    printf '%s\n' "$out" > "build/repeat/run-$i.log"
    echo "    full output: build/repeat/run-$i.log"
  fi
done
echo "$failed of $n runs failed"
[ "$failed" -eq 0 ]
