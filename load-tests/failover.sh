#!/usr/bin/env bash
# What a failing deployment costs the users of a pool, on loopback:
#
#   load-tests/failover.sh [SECONDS] [CONCURRENCY] [THREADS]     (defaults: 20 16 1000)
#
# 1. Starts the mock upstream (zero delay) and Chorus with two models on it (OpenAI wire format):
#      healthy — two deployments, both fine;
#      flaky   — the same two at priority 1 behind a third at priority 0 (preferred) that fails
#                every other call with a 500 (mock `fail_every=2;error=500`). Priority, because
#                among equals the least-latency choice (P2C on a latency EWMA that only successes
#                update) leaves a deployment with no successes at its 500 ms initial estimate and
#                sends it almost nothing next to millisecond-fast peers — see README.
# 2. Drives non-streaming POST /api/v1/threads/{id}/messages ({"stream": false}: the whole turn,
#    failover included, as the client sees it) at a fixed CONCURRENCY for SECONDS per model,
#    spread over THREADS threads (oha --urls-from-file), after a 3 s warm-up.
# 3. Twice: with the default circuit breaker ([routing] in config/chorus.toml: opens at a 50%
#    error rate over >= 10 calls, 30 s cool-down), then with the breaker off, so that every
#    failed call is retried on another deployment within the turn.
# Prints, per run: success rate (HTTP 200 of all answers), p50/p99/max latency, req/s, and the
# upstream calls Chorus saw fail (its `provider call failed before output` warnings).
# Bounded in time; stops what it started.
#
# Needs: cargo build --release -p chorus -p chorus-mock-upstream; oha (OHA=/path if not on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${1:-20}
CONC=${2:-16}
THREADS=${3:-1000}
BIN=${CHORUS_BIN:-target/release/chorus}
MOCK=${MOCK_BIN:-target/release/mock-upstream}
OHA=${OHA:-oha}
for b in "$BIN" "$MOCK"; do
  [ -x "$b" ] || { echo "missing $b: cargo build --release -p chorus -p chorus-mock-upstream" >&2; exit 1; }
done
command -v "$OHA" >/dev/null || { echo "missing oha: cargo install oha --locked" >&2; exit 1; }

WORK=$(mktemp -d)
PID=""
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$MOCK" --bind 127.0.0.1:0 > "$WORK/mock.out" 2>&1 &
MOCK_PID=$!
stop_chorus() {
  if [ -n "$PID" ]; then
    kill -TERM "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=""
  fi
}
cleanup() {
  stop_chorus
  kill -TERM "$MOCK_PID" 2>/dev/null || true
  wait "$MOCK_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 1 100); do grep -q listening "$WORK/mock.out" 2>/dev/null && break; sleep 0.05; done
UP=$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$WORK/mock.out" | head -1)
[ -n "$UP" ] || { echo "the mock upstream did not start" >&2; cat "$WORK/mock.out" >&2; exit 1; }

model() { # id, then "deployment-id upstream priority" triples
  local id=$1; shift
  cat <<TOML
[[models]]
id = "$id"
name = "$id"
provider = "openai"
upstream = "up-a"
context_length = 128000
input_per_mtok = 1.0
output_per_mtok = 2.0
capabilities = ["chat", "stream"]
tiers = ["free"]
max_output_tokens = 256
TOML
  while [ $# -gt 0 ]; do
    printf '[[models.deployments]]\nid = "%s"\nprovider = "openai"\nupstream = "%s"\npriority = %s\n' "$1" "$2" "$3"
    shift 3
  done
}
{
  printf '[providers.mock]\nkind = "mock"\n[providers.openai]\nkind = "openai"\nbase_url = "%s/v1"\napi_key_env = "OPENAI_API_KEY"\n' "$UP"
  model healthy healthy-a up-a 0 healthy-b up-b 0
  model flaky flaky-c 'up-c;fail_every=2;error=500' 0 flaky-a up-a 1 flaky-b up-b 1
} > "$WORK/models.toml"


start_chorus() { # extra env assignments
  local port
  port=$(free_port)
  B="http://127.0.0.1:$port"
  env OPENAI_API_KEY=bench CHORUS__MODELS_FILE="$WORK/models.toml" \
    CHORUS__TIERS_FILE="$PWD/load-tests/bench-tiers.toml" CHORUS__DATA_DIR="$WORK/data-$port" \
    CHORUS__SERVER__BIND="127.0.0.1:$port" CHORUS__LOG__LEVEL=warn \
    CHORUS__AUTH__JWT_SECRET="bench-secret-bench-secret-bench-secret" "$@" \
    "$BIN" serve 2>"$WORK/chorus.log" &
  PID=$!
  for _ in $(seq 1 100); do curl -sf "$B/healthz" >/dev/null && break; sleep 0.1; done
  curl -sf "$B/healthz" >/dev/null || { echo "chorus did not start" >&2; cat "$WORK/chorus.log" >&2; exit 1; }
  TOKEN=$(curl -sf -X POST "$B/api/v1/auth/register" -H 'content-type: application/json' \
    -d '{"email":"bench@example.com","password":"bench-password"}' \
    | python3 -c 'import sys,json; print(json.load(sys.stdin)["access_token"])')
  # Titled threads (no title-generation call), one URL per thread.
  python3 - "$B" "$TOKEN" "$THREADS" > "$WORK/urls.txt" <<'PY'
import http.client, json, sys, urllib.parse
base, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
u = urllib.parse.urlparse(base)
conn = http.client.HTTPConnection(u.hostname, u.port)
for _ in range(n):
    conn.request("POST", "/api/v1/threads", json.dumps({"title": "bench"}),
                 {"content-type": "application/json", "authorization": "Bearer " + token})
    r = conn.getresponse()
    thread = json.loads(r.read())["thread"]["id"]
    print(f"{base}/api/v1/threads/{thread}/messages")
PY
}

failed_calls() { grep -c 'provider call failed before output' "$WORK/chorus.log" || true; }

run() { # label model
  local label=$1 model=$2 before after
  local body="{\"content\":\"hello there, how are you today\",\"model\":\"$model\",\"stream\":false}"
  "$OHA" --no-tui -z 3s -c "$CONC" -m POST -T application/json -d "$body" \
    -H "authorization: Bearer $TOKEN" --urls-from-file "$WORK/urls.txt" >/dev/null
  before=$(failed_calls)
  "$OHA" --no-tui --output-format json -w -z "${SECS}s" -c "$CONC" -m POST -T application/json \
    -d "$body" -H "authorization: Bearer $TOKEN" --urls-from-file "$WORK/urls.txt" > "$WORK/oha.json"
  after=$(failed_calls)
  python3 - "$label" "$WORK/oha.json" "$((after - before))" <<'PY'
import json, sys
label, path, failed = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = json.load(open(path))
s, p = r["summary"], r["latencyPercentiles"]
codes = {int(k): v for k, v in r.get("statusCodeDistribution", {}).items()}
errors = sum(r.get("errorDistribution", {}).values())
total = sum(codes.values()) + errors
ok = codes.get(200, 0)
print("%-44s ok %6.2f%% (%d/%d)  p50 %6.2f ms  p99 %6.2f ms  max %7.2f ms  %6.0f req/s  failed upstream calls %d" % (
    label, 100.0 * ok / max(total, 1), ok, total, p["p50"] * 1000, p["p99"] * 1000,
    s["slowest"] * 1000, s["requestsPerSec"], failed))
others = {k: v for k, v in codes.items() if k != 200}
if others or errors:
    print("    other statuses %s, connection errors %s" % (others, r.get("errorDistribution")))
PY
}

echo "== non-streaming turns (POST /api/v1/threads/{id}/messages, stream:false), ${CONC} concurrent, ${SECS}s each, ${THREADS} threads"
echo "-- default breaker"
start_chorus
run "healthy (2 deployments)" healthy
run "flaky (3 deployments, one fails 50%)" flaky
echo "   breaker openings: $(grep -c 'breaker opened' "$WORK/chorus.log" || true)"
stop_chorus

echo "-- breaker off: every failed call is retried inside its turn"
start_chorus CHORUS__ROUTING__BREAKER_CONSECUTIVE_FAILURES=1000000000 \
  CHORUS__ROUTING__BREAKER_MIN_REQUESTS=1000000000
run "healthy (2 deployments)" healthy
run "flaky (3 deployments, one fails 50%)" flaky
echo "   breaker openings: $(grep -c 'breaker opened' "$WORK/chorus.log" || true)"
stop_chorus
