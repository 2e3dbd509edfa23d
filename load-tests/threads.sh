#!/usr/bin/env bash
# Fixed-rate latency of the threads API on loopback, and the server's memory.
#
#   load-tests/threads.sh [RATE_GET] [RATE_POST] [SECONDS]      (defaults: 1000 500 20)
#
# Starts the release binary on a free port with a temporary data dir, registers one user, seeds
# 200 threads, then drives GET /api/v1/threads and POST /api/v1/threads at fixed request rates
# with `oha` (open loop: latency includes queueing, no coordinated omission), and prints
# p50/p99/max, the achieved throughput, error counts, and the server's RSS before, after and at
# peak (VmHWM). Bounded in time and count; stops the server it started.
#
# Needs: target/release/chorus (cargo build --release) and oha (cargo install oha --locked;
# set OHA=/path/to/oha if it is not on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

RATE_GET=${1:-1000}
RATE_POST=${2:-500}
SECONDS_EACH=${3:-20}
BIN=${CHORUS_BIN:-target/release/chorus}
OHA=${OHA:-oha}

[ -x "$BIN" ] || { echo "missing $BIN: run cargo build --release" >&2; exit 1; }
command -v "$OHA" >/dev/null || { echo "missing oha: cargo install oha --locked" >&2; exit 1; }

DATA=$(mktemp -d)
LOG="$DATA/server.log"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
B="http://127.0.0.1:$PORT"

CHORUS__DATA_DIR="$DATA" CHORUS__SERVER__BIND="127.0.0.1:$PORT" \
CHORUS__AUTH__JWT_SECRET="load-test-secret-load-test-secret-0123" \
CHORUS__LOG__LEVEL=warn "$BIN" serve 2>"$LOG" &
PID=$!
cleanup() { kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$DATA"; }
trap cleanup EXIT

for _ in $(seq 1 100); do curl -sf "$B/healthz" >/dev/null && break; sleep 0.1; done

rss() { awk -v k="$1:" '$1==k {print $2" kB"}' "/proc/$PID/status"; }

TOKEN=$(curl -sf -X POST "$B/api/v1/auth/register" -H 'content-type: application/json' \
  -d '{"email":"load@example.com","password":"load-test-password"}' \
  | python3 -c 'import sys,json; print(json.load(sys.stdin)["access_token"])')
for i in $(seq 1 200); do
  curl -sf -o /dev/null -X POST "$B/api/v1/threads" -H "authorization: Bearer $TOKEN" \
    -H 'content-type: application/json' -d "{\"title\":\"seed thread $i\"}"
done
echo "server pid $PID on $B; RSS after seeding: $(rss VmRSS)"

summarise() {
  python3 -c '
import json, sys
name = sys.argv[1]
r = json.load(open(sys.argv[2]))
s, p, codes = r["summary"], r["latencyPercentiles"], r.get("statusCodeDistribution", {})
ms = lambda v: "%.2f ms" % (v * 1000)
print("%-22s p50 %-10s p99 %-10s max %-10s throughput %.0f req/s  success %.2f%%  status %s" % (
    name, ms(p["p50"]), ms(p["p99"]), ms(s["slowest"]), s["requestsPerSec"],
    s["successRate"] * 100, codes))
' "$@"
}

"$OHA" -z "${SECONDS_EACH}s" -q "$RATE_GET" -c 50 --no-tui --output-format json \
  -H "authorization: Bearer $TOKEN" "$B/api/v1/threads?limit=20" > "$DATA/get.json"
summarise "GET  /threads @${RATE_GET}/s" "$DATA/get.json"

"$OHA" -z "${SECONDS_EACH}s" -q "$RATE_POST" -c 50 --no-tui --output-format json -m POST \
  -H "authorization: Bearer $TOKEN" -T application/json -d '{"title":"load"}' \
  "$B/api/v1/threads" > "$DATA/post.json"
summarise "POST /threads @${RATE_POST}/s" "$DATA/post.json"

echo "server RSS now: $(rss VmRSS); peak (VmHWM): $(rss VmHWM)"
