#!/usr/bin/env bash
# The main job, end to end on one machine: a local AWS (moto) holds the secret, secretfs mounts the
# upstream-style SecretProviderClass examples/aws-seed.yaml, serves it, and follows a rotation
# after the TTL without remounting. Leaves nothing mounted or running.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MNT=${DEMO_MNT:-/tmp/secretfs-demo}
TTL=${DEMO_TTL:-3}
PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

export AWS_ENDPOINT_URL="http://127.0.0.1:$PORT" AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo
MOTO_PID=""
cleanup() {
  if grep -qs " $MNT fuse" /proc/mounts; then fusermount3 -u -z "$MNT" || true; fi
  if [ -n "$MOTO_PID" ]; then kill "$MOTO_PID" 2>/dev/null || true; wait "$MOTO_PID" 2>/dev/null || true; fi
  rmdir "$MNT" 2>/dev/null || true
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
aws_put() {  # aws_put NAME VALUE [create]
  $PY - "$@" <<'PYEOF'
import sys, boto3
name, value = sys.argv[1], sys.argv[2]
sm = boto3.client("secretsmanager")
if len(sys.argv) > 3:
    sm.create_secret(Name=name, SecretString=value)
else:
    sm.put_secret_value(SecretId=name, SecretString=value)
PYEOF
}

say "starting a local AWS Secrets Manager (moto) on 127.0.0.1:$PORT"
$PY -m moto.server -H 127.0.0.1 -p "$PORT" >/dev/null 2>&1 &
MOTO_PID=$!
for _ in $(seq 100); do
  $PY -c "import urllib.request as u; u.urlopen('$AWS_ENDPOINT_URL/moto-api/data.json', timeout=1)" 2>/dev/null && break
  sleep 0.1
done
aws_put MyDatabasePassword "correct-horse-battery-staple" create
echo "created secret MyDatabasePassword"

say "secretfs check examples/aws-seed.yaml"
$PY -m secretfs check examples/aws-seed.yaml

say "secretfs mount examples/aws-seed.yaml $MNT --ttl $TTL"
mkdir -p "$MNT"
$PY -m secretfs mount examples/aws-seed.yaml "$MNT" --ttl "$TTL" --log-level WARNING
grep " $MNT " /proc/mounts

say "ls -l $MNT"
ls -l "$MNT"
say "cat $MNT/MyDatabasePassword"
cat "$MNT/MyDatabasePassword"; echo

say "echo x > $MNT/MyDatabasePassword   (read-only)"
(echo x > "$MNT/MyDatabasePassword") 2>&1 || true

say "rotating the secret in the backend"
aws_put MyDatabasePassword "rotated-$(date +%s)"
echo "read at once: $(cat "$MNT/MyDatabasePassword")   (cached, still fresh)"
sleep "$TTL"
echo "read after the TTL: $(cat "$MNT/MyDatabasePassword")   (stale value served while one refresh runs)"
for _ in $(seq 50); do
  v=$(cat "$MNT/MyDatabasePassword")
  case "$v" in rotated-*) break;; esac
  sleep 0.1
done
echo "next read: $v   (the new version, same mount, no restart)"
ls -l "$MNT"

say "secretfs umount $MNT"
$PY -m secretfs umount "$MNT"
for _ in $(seq 50); do pgrep -f "secretfs mount examples/aws-seed.yaml $MNT" >/dev/null || break; sleep 0.1; done
if grep -qs " $MNT fuse" /proc/mounts; then echo "still mounted!"; exit 1; fi
echo "unmounted; the daemon has exited and the values are gone with it"
