#!/usr/bin/env bash
# Latency of one token-bucket take: Redis (one Lua script round trip on loopback) vs in-process.
#
#   load-tests/redis_bucket.sh [ITERATIONS] [CONCURRENCY]       (defaults: 20000 16; max 200000)
#
# Starts redis-server on a free loopback port (no persistence), runs the `bucket_latency`
# example of chorus-actors against it and against LocalBuckets, prints p50/p99/max and ops/s for
# one caller and for CONCURRENCY callers, then stops the Redis it started.
#
# Needs: redis-server (apt-get install -y redis-server). Builds the example in release
# (PROFILE=dev for a quick, unoptimised run).
set -euo pipefail
cd "$(dirname "$0")/.."

N=${1:-20000}
CALLERS=${2:-16}
PROFILE=${PROFILE:-release}
command -v redis-server >/dev/null || { echo "missing redis-server: apt-get install -y redis-server" >&2; exit 1; }

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
DIR=$(mktemp -d)
redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR" >"$DIR/redis.log" 2>&1 &
PID=$!
cleanup() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
for _ in $(seq 1 100); do (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done

echo "redis-server $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/') on 127.0.0.1:$PORT, $N takes, profile $PROFILE"
cargo run --quiet --profile "$PROFILE" -p chorus-actors --example bucket_latency -- \
  "redis://127.0.0.1:$PORT" "$N" "$CALLERS"
