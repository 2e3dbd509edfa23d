#!/usr/bin/env bash
# Chorus's own CPU time per request at saturation, by path — where a request's cost lies:
#   GET /healthz (the edge alone), /v1/chat/completions answered in-process (mock model), and
#   the same through the mock upstream (adds the outbound HTTP call).
# CPU is utime+stime from /proc/PID/stat over an 8 s oha run with 64 connections.
#
#   load-tests/cpu_per_request.sh          (BIN=path/to/chorus to test another build)
#   RATE=1000 load-tests/cpu_per_request.sh  the same at a fixed rate (32 connections) instead
#                                          of saturation: the cost behind the latency figures
#   PERF_STAT=1 load-tests/cpu_per_request.sh  counts context switches, migrations and page
#                                          faults of Chorus during the last run (perf stat)
#   PERF=1 load-tests/cpu_per_request.sh   also profiles Chorus during the last run
#                                          (perf record -F 999 -g) and prints the top symbols
#
# Needs: cargo build --release -p chorus -p chorus-mock-upstream; oha (OHA=/path if not on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
# A captured backtrace per error would be measured too.
unset RUST_BACKTRACE
OHA=${OHA:-oha}
command -v "$OHA" >/dev/null || { [ -x /tmp/oha/bin/oha ] && OHA=/tmp/oha/bin/oha; }
W=$(mktemp -d)
target/release/mock-upstream --bind 127.0.0.1:0 > $W/mock.out 2>&1 &
MOCK_PID=$!
for _ in $(seq 1 100); do grep -q listening $W/mock.out 2>/dev/null && break; sleep 0.05; done
UP=$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' $W/mock.out)
cat > $W/models.toml <<TOML
[providers.mock]
kind = "mock"
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
capabilities = ["chat"]
tiers = ["free"]
max_output_tokens = 256
[[models]]
id = "local"
name = "local"
provider = "mock"
upstream = "echo"
context_length = 8192
input_per_mtok = 0.0
output_per_mtok = 0.0
capabilities = ["chat"]
tiers = ["free"]
max_output_tokens = 256
TOML
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
OPENAI_API_KEY=bench CHORUS__MODELS_FILE=$W/models.toml CHORUS__TIERS_FILE="$PWD/load-tests/bench-tiers.toml" CHORUS__DATA_DIR=$W/data CHORUS__SERVER__BIND=127.0.0.1:$PORT CHORUS__LOG__LEVEL=warn CHORUS__AUTH__JWT_SECRET=bench-secret-bench-secret-bench-secret ${BIN:-target/release/chorus} serve 2>$W/chorus.log &
PID=$!
trap 'kill -TERM $PID $MOCK_PID 2>/dev/null || true; rm -rf $W' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
 B=http://127.0.0.1:$PORT
TOKEN=$(curl -sf -X POST "$B/api/v1/auth/register" -H 'content-type: application/json' -d '{"email":"p@example.com","password":"bench-password"}' | python3 -c 'import sys,json; print(json.load(sys.stdin)["access_token"])')
KEY=$(curl -sf -X POST "$B/api/v1/me/api-keys" -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' -d '{"name":"b"}' | python3 -c 'import sys,json; print(json.load(sys.stdin)["key"])')
cpu() { awk '{print $14+$15}' /proc/$PID/stat; }
sys_cpu() { awk '{print $15}' /proc/$PID/stat; }
run() {
  local name=$1; shift
  local c0=$(cpu) s0=$(sys_cpu)
  if [ -n "${RATE:-}" ]; then
    "$OHA" --no-tui -z 8s -c 32 -q "$RATE" "$@" > $W/o.txt 2>&1
  else
    "$OHA" --no-tui -z 8s -c 64 "$@" > $W/o.txt 2>&1
  fi
  local c1=$(cpu) s1=$(sys_cpu)
  local rps=$(grep -E "Requests/sec" $W/o.txt | awk '{print $2}')
  python3 -c "import sys; r=float('$rps'); t=($c1-$c0)/100; print('%-28s %8.0f req/s   chorus CPU %.1f s -> %.1f us/request (%.0f%% in the kernel)' % ('$name', r, t, t*1e6/(r*8), 100*($s1-$s0)/max($c1-$c0,1)))"
}
run "GET /healthz" $B/healthz
run "/v1 mock in-process" -m POST -T application/json -d '{"model":"local","messages":[{"role":"user","content":"hello there, how are you today"}]}' -H "authorization: Bearer $KEY" $B/v1/chat/completions
if [ -n "${PERF:-}" ]; then
  perf record -F ${PERF_FREQ:-999} --call-graph ${PERF_CALLGRAPH:-fp} -p $PID -o $W/perf.data -- sleep 8 > /dev/null 2>&1 &
  PERF_PID=$!
elif [ -n "${PERF_STAT:-}" ]; then
  perf stat -e task-clock,context-switches,cpu-migrations,page-faults,cycles,instructions,cycles:u,instructions:u -p $PID -o $W/perf.stat -- sleep 8 > /dev/null 2>&1 &
  PERF_PID=$!
fi
run "/v1 via upstream" -m POST -T application/json -d '{"model":"bench","messages":[{"role":"user","content":"hello there, how are you today"}]}' -H "authorization: Bearer $KEY" $B/v1/chat/completions
if [ -n "${PERF:-}" ]; then
  wait $PERF_PID || true
  [ -n "${PERF_KEEP:-}" ] && cp $W/perf.data "$PERF_KEEP"
  echo "-- where Chorus's CPU went during the last run (self time, top 40 symbols):"
  perf report -i $W/perf.data --no-children --sort symbol --stdio 2>/dev/null \
    | grep -E '^ +[0-9]' | sed -E 's/[ -]+$//' | cut -c1-150 | head -40
  echo "-- by DSO:"
  perf report -i $W/perf.data --no-children --sort dso --stdio 2>/dev/null | grep -E '^ +[0-9]' | sed -E 's/[ -]+$//' | head -8
elif [ -n "${PERF_STAT:-}" ]; then
  wait $PERF_PID || true
  echo "-- Chorus during the last run (perf stat):"
  grep -E '^ +[0-9]' $W/perf.stat
fi
