#!/usr/bin/env bash
# Added latency of two Chorus builds, measured side by side so the machine's noise hits both:
#
#   load-tests/compare.sh OLD_BINARY NEW_BINARY [ROUNDS] [SECONDS] [RATE]   (defaults: 6 5 1000)
#
# One mock upstream (zero delay) and both builds run at once, each pointed at the mock as an
# OpenAI provider. Each round runs non-streaming POST /v1/chat/completions at RATE for SECONDS
# against the mock directly, then each build (in turn order rotating per round), and prints
# p50/p99 and what each build adds over the direct run of that round. At the end: the median
# over the rounds of each build's added p50 and p99. A single run's p99 moves by 0.1 ms or more
# on a shared VM; the medians of paired rounds are what to compare.
#
# Needs: both binaries, target/release/mock-upstream, oha (OHA=/path if not on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE
[ $# -ge 2 ] || { sed -n 2,12p "$0"; exit 2; }
A=$1
B=$2
ROUNDS=${3:-6}
SECS=${4:-5}
RATE=${5:-1000}
MOCK=${MOCK_BIN:-target/release/mock-upstream}
OHA=${OHA:-oha}
command -v "$OHA" >/dev/null || { [ -x /tmp/oha/bin/oha ] && OHA=/tmp/oha/bin/oha; }
for b in "$A" "$B" "$MOCK"; do [ -x "$b" ] || { echo "missing $b" >&2; exit 1; }; done
command -v "$OHA" >/dev/null || { echo "missing oha: cargo install oha --locked" >&2; exit 1; }

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  kill -TERM "${PIDS[@]}" 2>/dev/null || true
  wait "${PIDS[@]}" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$MOCK" --bind 127.0.0.1:0 > "$WORK/mock.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do grep -q listening "$WORK/mock.out" 2>/dev/null && break; sleep 0.05; done
UP=$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$WORK/mock.out" | head -1)
cat > "$WORK/models.toml" <<TOML
[providers.openai]
kind = "openai"
base_url = "$UP/v1"
api_key_env = "OPENAI_API_KEY"
[[models]]
id = "bench"
name = "bench"
provider = "openai"
upstream = "bench"
context_length = 8192
input_per_mtok = 1.0
output_per_mtok = 2.0
capabilities = ["chat", "stream"]
tiers = ["free"]
max_output_tokens = 256
TOML

# start NAME BINARY: runs a build on a free port; sets URL_<NAME> and KEY_<NAME>.
start() {
  local name=$1 bin=$2 port
  port=$(free_port)
  OPENAI_API_KEY=bench CHORUS__MODELS_FILE="$WORK/models.toml" \
  CHORUS__TIERS_FILE="$PWD/load-tests/bench-tiers.toml" CHORUS__DATA_DIR="$WORK/data-$name" \
  CHORUS__SERVER__BIND="127.0.0.1:$port" CHORUS__LOG__LEVEL=warn \
  CHORUS__AUTH__JWT_SECRET="bench-secret-bench-secret-bench-secret" "$bin" serve 2>"$WORK/$name.log" &
  PIDS+=($!)
  local base="http://127.0.0.1:$port"
  for _ in $(seq 1 100); do curl -sf "$base/healthz" >/dev/null && break; sleep 0.1; done
  local token key
  token=$(curl -sf -X POST "$base/api/v1/auth/register" -H 'content-type: application/json' \
    -d '{"email":"bench@example.com","password":"bench-password"}' \
    | python3 -c 'import sys,json; print(json.load(sys.stdin)["access_token"])')
  key=$(curl -sf -X POST "$base/api/v1/me/api-keys" -H "authorization: Bearer $token" \
    -H 'content-type: application/json' -d '{"name":"bench"}' \
    | python3 -c 'import sys,json; print(json.load(sys.stdin)["key"])')
  printf -v "URL_$name" '%s' "$base/v1/chat/completions"
  printf -v "KEY_$name" '%s' "$key"
}
start old "$A"
start new "$B"
URL_direct="$UP/v1/chat/completions"
KEY_direct=x
BODY='{"model":"bench","messages":[{"role":"user","content":"hello there, how are you today"}]}'

# run NAME ROUND: one fixed-rate run; appends "name round p50 p99" (ms) to the results.
run() {
  local name=$1 round=$2 url key
  url="URL_$name"; key="KEY_$name"
  "$OHA" --no-tui --output-format json -z "${SECS}s" -q "$RATE" -c 32 -m POST \
    -T application/json -d "$BODY" -H "authorization: Bearer ${!key}" "${!url}" > "$WORK/oha.json"
  python3 - "$name" "$round" "$WORK/oha.json" >> "$WORK/results" <<'PY'
import json, sys
name, rnd, path = sys.argv[1:4]
r = json.load(open(path))
p = r["latencyPercentiles"]
ok = r["summary"]["successRate"]
if ok < 1.0:
    sys.exit(f"{name}: only {ok:.2%} of requests succeeded")
print(name, rnd, p["p50"] * 1000, p["p99"] * 1000)
PY
}

echo "warming up"
for name in direct old new; do
  url="URL_$name"; key="KEY_$name"
  "$OHA" --no-tui -z 2s -q "$RATE" -m POST -T application/json -d "$BODY" \
    -H "authorization: Bearer ${!key}" "${!url}" >/dev/null
done
: > "$WORK/results"
for round in $(seq 1 "$ROUNDS"); do
  run direct "$round"
  if [ $((round % 2)) -eq 1 ]; then run old "$round"; run new "$round"; else run new "$round"; run old "$round"; fi
done

python3 - "$WORK/results" "$A" "$B" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
by = {}
for name, rnd, p50, p99 in rows:
    by.setdefault(int(rnd), {})[name] = (float(p50), float(p99))
added = {"old": [], "new": []}
print("%-6s %-22s %-22s %-22s" % ("round", "direct p50/p99 ms", "old p50/p99 (added)", "new p50/p99 (added)"))
for rnd in sorted(by):
    d = by[rnd]["direct"]
    cells = []
    for name in ("old", "new"):
        v = by[rnd][name]
        a = (v[0] - d[0], v[1] - d[1])
        added[name].append(a)
        cells.append("%.3f/%.3f (%.3f/%.3f)" % (v[0], v[1], a[0], a[1]))
    print("%-6d %-22s %-22s %-22s" % (rnd, "%.3f/%.3f" % d, cells[0], cells[1]))
for name, path in (("old", sys.argv[2]), ("new", sys.argv[3])):
    a = added[name]
    print("%s (%s): median added p50 %.3f ms, p99 %.3f ms" % (
        name, path, statistics.median(x[0] for x in a), statistics.median(x[1] for x in a)))
PY
