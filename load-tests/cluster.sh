#!/usr/bin/env bash
# Cluster figures (issue 5), on loopback: three `chorus` nodes sharing one SQLite data dir and one
# redis-server, as scripts/dev-cluster starts them, with heartbeats at the defaults
# (interval 500 ms, timeout 3000 ms).
#
# 1. Streaming turns of one user through its home node (local) and through another node (remote,
#    events relayed across the cluster): time to first `delta` p50/p99, and per-event cost
#    (first delta → `done`, divided by the deltas) p50/p99. Model: mock, 200 words, no delay.
# 2. SIGKILL of a node, KILL_RUNS times (restarted in between): time until a survivor drops it
#    from its members (polled every 20 ms), until a user homed there is re-homed, and until that
#    user's `GET /api/v1/me/usage` through a survivor succeeds again (a probe every 20 ms).
# 3. Throughput of non-streaming `POST /v1/chat/completions` (model mock-echo, answered in process)
#    at CONC connections for SECS s, six users: all on one node (a cluster of one), then spread
#    over the three nodes; req/s, p50/p99 and the CPU the machine had left.
# 4. RSS per idle cached session: a fresh single node, MEM_USERS users (rows inserted into SQLite,
#    HS256 access tokens minted with the configured secret) each doing one `GET /api/v1/me/usage`.
# 5. A per-user limit across hand-offs: a user on the `limited` tier (120 requests a minute), homed
#    on node-3, sends /v1 requests through all three nodes (4 clients, as fast as answered) for
#    HANDOFF_SECS s while node-3 leaves (SIGTERM) and joins again, then while it is SIGKILLed and
#    restarted; admitted requests vs the most the bucket allows (full + refill over the run).
# Prints the figures; bounded in time; stops what it started (also on failure).
#
#   load-tests/cluster.sh [TURNS] [SECS] [CONC] [MEM_USERS] [KILL_RUNS] [HANDOFF_SECS]
#
# Needs: cargo build --release -p chorus; redis-server; oha (OHA=/path if not on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE

TURNS=${1:-100}
SECS=${2:-10}
CONC=${3:-32}
MEM_USERS=${4:-1000}
KILL_RUNS=${5:-3}
HANDOFF_SECS=${6:-15}
BIN=${CHORUS_BIN:-target/release/chorus}
OHA=${OHA:-oha}
[ -x "$BIN" ] || { echo "missing $BIN: cargo build --release -p chorus" >&2; exit 1; }
command -v "$OHA" >/dev/null || { [ -x /tmp/oha/bin/oha ] && OHA=/tmp/oha/bin/oha; }
command -v "$OHA" >/dev/null || { echo "missing oha: cargo install oha --locked" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "missing redis-server" >&2; exit 1; }
HELPER="python3 load-tests/cluster_bench.py"

WORK=$(mktemp -d)
DATA="$WORK/data"
mkdir -p "$DATA" "$WORK/logs"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SECRET="cluster-bench-jwt-secret-0123456789abcdef"
COOKIE="cluster-bench-cookie-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
REDIS_PORT=$(free_port)
declare -a HTTP CPORT PID
for i in 1 2 3; do HTTP[$i]=$(free_port); CPORT[$i]=$(free_port); PID[$i]=""; done
URL() { echo "http://127.0.0.1:${HTTP[$1]}"; }
REDIS_PID=""
OHA_PIDS=()

stop_pid() { # pid: SIGTERM, up to 15 s, then SIGKILL
  local p=$1
  [ -n "$p" ] || return 0
  kill -TERM "$p" 2>/dev/null || return 0
  for _ in $(seq 1 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for p in "${OHA_PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  for i in 1 2 3; do kill -TERM "${PID[$i]}" 2>/dev/null || true; done
  for i in 1 2 3; do stop_pid "${PID[$i]}"; done
  stop_pid "$REDIS_PID"
  if [ "$rc" != 0 ]; then
    echo "failed (exit $rc); last node log lines:" >&2
    for f in "$WORK"/logs/node-*.log; do echo "--- $f" >&2; tail -5 "$f" >&2; done
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT INT TERM

cat > "$WORK/models.toml" <<'TOML'
[providers.mock]
kind = "mock"
[[models]]
id = "mock-echo"
name = "Mock Echo"
provider = "mock"
upstream = "echo"
context_length = 8192
input_per_mtok = 0.0
output_per_mtok = 0.0
capabilities = ["chat", "stream"]
tiers = ["free", "limited"]
max_output_tokens = 1024
[[models]]
id = "bench-lorem"
name = "Mock Lorem, 200 words, no delay"
provider = "mock"
upstream = "lorem;words=200;delay_ms=0"
context_length = 8192
input_per_mtok = 0.0
output_per_mtok = 0.0
capabilities = ["chat", "stream"]
tiers = ["free"]
max_output_tokens = 4096
TOML

write_config() { # i seeds
  cat > "$WORK/node-$1.toml" <<EOF
data_dir = "$DATA"
models_file = "$WORK/models.toml"
tiers_file = "$PWD/load-tests/bench-tiers.toml"

[server]
bind = "127.0.0.1:${HTTP[$1]}"
shutdown_grace_secs = 5

[auth]
jwt_secret = "$SECRET"
access_token_ttl_secs = 7200

[redis]
url = "redis://127.0.0.1:$REDIS_PORT"

[log]
level = "warn,chorus_cluster=info"

[cluster]
node_name = "node-$1"
listen = "127.0.0.1:${CPORT[$1]}"
cookie = "$COOKIE"
seeds = [$2]
heartbeat_interval_ms = 500
heartbeat_timeout_ms = 3000
leave_drain_ms = 200
leave_deadline_secs = 5
EOF
}
ALL_SEEDS="\"127.0.0.1:${CPORT[1]}\",\"127.0.0.1:${CPORT[2]}\",\"127.0.0.1:${CPORT[3]}\""
start_node() { # i
  "$BIN" serve --config "$WORK/node-$1.toml" >> "$WORK/logs/node-$1.log" 2>&1 &
  PID[$1]=$!
  for _ in $(seq 1 100); do curl -sf "$(URL "$1")/healthz" >/dev/null && return 0; sleep 0.1; done
  echo "node-$1 did not start" >&2; return 1
}
cpu_ticks() { # pids... → utime+stime in clock ticks
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$t"
}
children_cpu() { # user+sys seconds of this shell's reaped children (the oha runs); no subshell
  times > "$WORK/times"
  tail -1 "$WORK/times" | awk '{ for (i = 1; i <= 2; i++) { split($i, p, "m"); t += p[1] * 60 + p[2] } } END { print t }'
}
machine_busy() { awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" \
  > "$WORK/logs/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

echo "== machine: $(nproc) cores ($(awk -F: '/model name/{print $2; exit}' /proc/cpuinfo | sed 's/^ //')),"\
  "$(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), load average $(cut -d' ' -f1-3 /proc/loadavg);"\
  "nodes, redis, oha and the Python client all share them"
# Node 1 first (it creates the SQLite schema), then the others.
for i in 1 2 3; do write_config "$i" "$ALL_SEEDS"; done
start_node 1; start_node 2; start_node 3
timeout 60 $HELPER wait-cluster 3 "$(URL 1)" "$(URL 2)" "$(URL 3)"
timeout 120 $HELPER setup "$WORK" "$DATA" "$(URL 1)" "$(URL 2)" "$(URL 3)"
export STATE="$WORK/state.json"
timeout 30 $HELPER wait-cluster 3 "$(URL 1)" "$(URL 2)" "$(URL 3)"

echo
echo "== 1. streaming turn, home local vs remote (3 nodes) [load average $(cut -d" " -f1-3 /proc/loadavg)]"
timeout 300 $HELPER ttfb "$STATE" "$(URL 1)" "$(URL 2)" "$TURNS"

run_load() { # label url-per-user-function
  local label=$1; shift
  local -a urls=("$@") tokens
  mapfile -t tokens < <($HELPER tokens "$STATE" 6)
  [ "${#tokens[@]}" = 6 ] || { echo "need 6 users, have ${#tokens[@]}" >&2; return 1; }
  local body='{"model":"mock-echo","messages":[{"role":"user","content":"hello there, how are you today"}]}'
  local k c per=$((CONC / 6)) extra=$((CONC % 6))
  # Warm-up: 2 s, all users, not counted.
  OHA_PIDS=()
  for k in 0 1 2 3 4 5; do
    "$OHA" --no-tui --output-format quiet -z 2s -c 2 -m POST -T application/json -d "$body" \
      -H "authorization: Bearer ${tokens[$k]}" "${urls[$((k % ${#urls[@]}))]}/v1/chat/completions" &
    OHA_PIDS+=($!)
  done
  wait "${OHA_PIDS[@]}" || true
  local nodes_before busy_before redis_before kids_before
  nodes_before=$(cpu_ticks "${NODE_PIDS[@]}")
  redis_before=$(cpu_ticks "$REDIS_PID")
  children_cpu > "$WORK/kids"; kids_before=$(cat "$WORK/kids")
  busy_before=$(machine_busy)
  OHA_PIDS=()
  for k in 0 1 2 3 4 5; do
    c=$per; [ "$k" -lt "$extra" ] && c=$((c + 1))
    "$OHA" --no-tui --output-format csv -z "${SECS}s" -c "$c" -m POST -T application/json -d "$body" \
      -H "authorization: Bearer ${tokens[$k]}" "${urls[$((k % ${#urls[@]}))]}/v1/chat/completions" \
      > "$WORK/oha-$k.csv" &
    OHA_PIDS+=($!)
  done
  wait "${OHA_PIDS[@]}" || true
  OHA_PIDS=()
  local nodes_after busy_after redis_after kids_after
  busy_after=$(machine_busy)
  nodes_after=$(cpu_ticks "${NODE_PIDS[@]}")
  redis_after=$(cpu_ticks "$REDIS_PID")
  children_cpu > "$WORK/kids"; kids_after=$(cat "$WORK/kids")
  $HELPER oha-merge "$label" "$SECS" "$WORK/reqs" "$WORK"/oha-?.csv
  python3 - "$busy_before" "$busy_after" "$nodes_before" "$nodes_after" "$redis_before" "$redis_after" \
    "$kids_before" "$kids_after" "$SECS" "$(getconf CLK_TCK)" "$(nproc)" "$WORK/reqs" <<'PY'
import sys
a = sys.argv
b0, t0 = map(int, a[1].split()); b1, t1 = map(int, a[2].split())
n0, n1, r0, r1 = int(a[3]), int(a[4]), int(a[5]), int(a[6])
k0, k1, secs, hz, cores = float(a[7]), float(a[8]), float(a[9]), int(a[10]), int(a[11])
wall = (t1 - t0) / cores / hz            # seconds the window lasted, from /proc/stat
busy = (b1 - b0) / hz / wall             # cores busy, whole machine
nodes, redis, oha = (n1 - n0) / hz / wall, (r1 - r0) / hz / wall, (k1 - k0) / wall
reqs = int(open(a[12]).read())
print(f"{'':28s} CPU over the run ({wall:.1f} s): machine {busy:.2f} of {cores} cores busy = chorus nodes "
      f"{nodes:.2f} + oha {oha:.2f} + redis {redis:.2f} + other processes/kernel {busy - nodes - oha - redis:.2f}")
print(f"{'':28s} chorus CPU per request {(n1 - n0) / hz / max(reqs, 1) * 1e6:.0f} µs")
PY
}

echo
echo "== 3. throughput, non-streaming /v1/chat/completions (mock-echo), $CONC connections, ${SECS} s, 6 users [load average $(cut -d" " -f1-3 /proc/loadavg)]"
NODE_PIDS=("${PID[1]}" "${PID[2]}" "${PID[3]}")
run_load "3 nodes (users spread)" "$(URL 1)" "$(URL 2)" "$(URL 3)"

echo
echo "== 2. SIGKILL a node: detection by a survivor and serving its users again (${KILL_RUNS} runs) [load average $(cut -d" " -f1-3 /proc/loadavg)]"
for run in $(seq 1 "$KILL_RUNS"); do
  timeout 60 $HELPER kill "$STATE" "$(URL 1)" node-3 "${PID[3]}" "$run"
  wait "${PID[3]}" 2>/dev/null || true
  PID[3]=""
  start_node 3
  timeout 60 $HELPER wait-cluster 3 "$(URL 1)" "$(URL 2)" "$(URL 3)"
  sleep 1
done
$HELPER kill-summary "$STATE"

echo
echo "== 5. a per-user limit across hand-offs (120/min, 4 clients through all nodes) [load average $(cut -d" " -f1-3 /proc/loadavg)]"
handoff_run() { # label signal
  local fifo="$WORK/handoff.fifo"
  rm -f "$fifo"; mkfifo "$fifo"
  timeout 120 $HELPER handoff "$STATE" limited 120 "$HANDOFF_SECS" "$1" "$(URL 1)" "$(URL 2)" "$(URL 3)" > "$fifo" &
  local hp=$! line
  exec 9< "$fifo"
  read -r line <&9   # READY: the user exists and is on the tier; the clients start now
  sleep 3
  if [ "$2" = TERM ]; then stop_pid "${PID[3]}"; else kill -KILL "${PID[3]}"; wait "${PID[3]}" 2>/dev/null || true; fi
  PID[3]=""
  sleep 3
  start_node 3
  cat <&9
  exec 9<&-
  wait "$hp"
  timeout 60 $HELPER wait-cluster 3 "$(URL 1)" "$(URL 2)" "$(URL 3)"
}
handoff_run "leave (SIGTERM) at 3 s, join at ~6 s" TERM
handoff_run "crash (SIGKILL) at 3 s, back at ~6 s" KILL

echo
echo "== 3b. the same load on one node (a cluster of one: nodes 2 and 3 stopped, node 1 restarted alone) [load average $(cut -d" " -f1-3 /proc/loadavg)]"
for i in 1 2 3; do kill -TERM "${PID[$i]}" 2>/dev/null || true; done
for i in 1 2 3; do stop_pid "${PID[$i]}"; PID[$i]=""; done
write_config 1 "\"127.0.0.1:${CPORT[1]}\""
start_node 1
timeout 30 $HELPER wait-cluster 1 "$(URL 1)"
NODE_PIDS=("${PID[1]}")
run_load "1 node" "$(URL 1)"

echo
echo "== 4. memory per idle cached session (a fresh single node) [load average $(cut -d" " -f1-3 /proc/loadavg)]"
stop_pid "${PID[1]}"; PID[1]=""
start_node 1
timeout 30 $HELPER wait-cluster 1 "$(URL 1)"
timeout 300 $HELPER mem "$STATE" "$DATA" "$(URL 1)" "${PID[1]}" "$MEM_USERS" "$SECRET"

echo
echo "node log lines at WARN/ERROR, by message (the 8 most frequent):"
cat "$WORK"/logs/node-*.log | python3 -c '
import collections, json, sys
c = collections.Counter()
for line in sys.stdin:
    try: r = json.loads(line)
    except ValueError: continue
    if r.get("level") in ("WARN", "ERROR"): c[(r["level"], r.get("message", "")[:110])] += 1
for (lvl, msg), n in c.most_common(8): print(f"  {n:6d} {lvl:5s} {msg}")
'
