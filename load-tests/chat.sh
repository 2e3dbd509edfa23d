#!/usr/bin/env bash
# What Chorus adds on top of the provider it calls, on loopback:
#
#   load-tests/chat.sh [RATE] [SECONDS] [STREAMS]        (defaults: 1000 15 2000)
#
# 1. Starts the mock upstream (zero delay) and Chorus pointed at it as an OpenAI provider.
# 2. Non-streaming POST /v1/chat/completions at a fixed RATE: the mock directly, then through
#    Chorus (API-key auth) — p50/p99; the difference is Chorus's added latency.
# 3. Saturation: 64 connections, no rate limit, on both — max req/s.
# 4. Streaming time to first byte (sequential requests, 300 each): direct vs through Chorus.
# 5. STREAMS concurrent open SSE chat streams (native API, a slow mock model) held at once:
#    the server's RSS before and while holding them, per stream.
# Prints the figures; bounded in time; stops what it started.
#
# Needs: cargo build --release -p chorus -p chorus-mock-upstream; oha (OHA=/path if not on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
# A captured backtrace per error would be measured too.
unset RUST_BACKTRACE

RATE=${1:-1000}
SECS=${2:-15}
STREAMS=${3:-2000}
BIN=${CHORUS_BIN:-target/release/chorus}
MOCK=${MOCK_BIN:-target/release/mock-upstream}
OHA=${OHA:-oha}
command -v "$OHA" >/dev/null || { [ -x /tmp/oha/bin/oha ] && OHA=/tmp/oha/bin/oha; }
for b in "$BIN" "$MOCK"; do
  [ -x "$b" ] || { echo "missing $b: cargo build --release -p chorus -p chorus-mock-upstream" >&2; exit 1; }
done
command -v "$OHA" >/dev/null || { echo "missing oha: cargo install oha --locked" >&2; exit 1; }

WORK=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$MOCK" --bind 127.0.0.1:0 > "$WORK/mock.out" 2>&1 &
MOCK_PID=$!
for _ in $(seq 1 100); do grep -q listening "$WORK/mock.out" 2>/dev/null && break; sleep 0.05; done
UP=$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$WORK/mock.out" | head -1)

cat > "$WORK/models.toml" <<TOML
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
capabilities = ["chat", "stream"]
tiers = ["free"]
max_output_tokens = 256
[[models]]
id = "slow"
name = "slow mock for held streams"
provider = "mock"
upstream = "lorem;words=100000;delay_ms=1000"
context_length = 8192
input_per_mtok = 0.0
output_per_mtok = 0.0
capabilities = ["chat", "stream"]
tiers = ["free"]
max_output_tokens = 100000
TOML

PORT=$(free_port)
B="http://127.0.0.1:$PORT"
OPENAI_API_KEY=bench CHORUS__MODELS_FILE="$WORK/models.toml" CHORUS__TIERS_FILE="$PWD/load-tests/bench-tiers.toml" \
CHORUS__DATA_DIR="$WORK/data" \
CHORUS__SERVER__BIND="127.0.0.1:$PORT" CHORUS__LOG__LEVEL=warn \
CHORUS__AUTH__JWT_SECRET="bench-secret-bench-secret-bench-secret" "$BIN" serve 2>"$WORK/chorus.log" &
PID=$!
cleanup() {
  kill -TERM "$PID" "$MOCK_PID" 2>/dev/null || true
  wait "$PID" "$MOCK_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 1 100); do curl -sf "$B/healthz" >/dev/null && break; sleep 0.1; done
rss() { awk -v k="$1:" '$1==k {print $2}' "/proc/$PID/status"; }

TOKEN=$(curl -sf -X POST "$B/api/v1/auth/register" -H 'content-type: application/json' \
  -d '{"email":"bench@example.com","password":"bench-password"}' \
  | python3 -c 'import sys,json; print(json.load(sys.stdin)["access_token"])')
KEY=$(curl -sf -X POST "$B/api/v1/me/api-keys" -H "authorization: Bearer $TOKEN" \
  -H 'content-type: application/json' -d '{"name":"bench"}' \
  | python3 -c 'import sys,json; print(json.load(sys.stdin)["key"])')
BODY='{"model":"bench","messages":[{"role":"user","content":"hello there, how are you today"}]}'

summarise() {
  python3 - "$@" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
r = json.load(open(path))
s, p = r["summary"], r["latencyPercentiles"]
codes = r.get("statusCodeDistribution", {})
print("%-34s p50 %7.3f ms  p99 %7.3f ms  %8.0f req/s  ok %.2f%%  %s" % (
    name, p["p50"] * 1000, p["p99"] * 1000, s["requestsPerSec"], s["successRate"] * 100, codes))
PY
}

run_oha() { # name url auth extra...
  local name=$1 url=$2 auth=$3; shift 3
  "$OHA" --no-tui --output-format json -m POST -T application/json -d "$BODY" \
    -H "authorization: Bearer $auth" "$@" "$url" > "$WORK/oha.json"
  summarise "$name" "$WORK/oha.json"
}

echo "== non-streaming /v1/chat/completions at ${RATE}/s for ${SECS}s (warm-up 3 s each)"
"$OHA" --no-tui -z 3s -q "$RATE" -m POST -T application/json -d "$BODY" -H "authorization: Bearer x" "$UP/v1/chat/completions" >/dev/null
run_oha "mock upstream directly" "$UP/v1/chat/completions" x -z "${SECS}s" -q "$RATE" -c 32
"$OHA" --no-tui -z 3s -q "$RATE" -m POST -T application/json -d "$BODY" -H "authorization: Bearer $KEY" "$B/v1/chat/completions" >/dev/null
run_oha "through chorus" "$B/v1/chat/completions" "$KEY" -z "${SECS}s" -q "$RATE" -c 32

echo "== saturation: 64 connections, 10 s"
run_oha "mock upstream directly (max)" "$UP/v1/chat/completions" x -z 10s -c 64
run_oha "through chorus (max)" "$B/v1/chat/completions" "$KEY" -z 10s -c 64
echo "chorus RSS after load: $(rss VmRSS) kB, peak $(rss VmHWM) kB"

echo "== streaming time to first byte (300 sequential requests each)"
python3 - "$UP/v1/chat/completions" x "$B/v1/chat/completions" "$KEY" <<'PY'
import http.client, json, sys, time, urllib.parse
def ttfb(url, key, n=300):
    u = urllib.parse.urlparse(url)
    body = json.dumps({"model": "bench", "stream": True,
                       "messages": [{"role": "user", "content": "hello there, how are you today"}]})
    conn = http.client.HTTPConnection(u.hostname, u.port)
    out = []
    for _ in range(n + 20):
        t = time.perf_counter()
        conn.request("POST", u.path, body, {"content-type": "application/json",
                                            "authorization": "Bearer " + key})
        r = conn.getresponse()
        r.read1(1)          # first byte of the body: the first SSE frame
        out.append(time.perf_counter() - t)
        r.read()
    out = sorted(out[20:])
    return out[len(out) // 2] * 1000, out[int(len(out) * 0.99)] * 1000
d = ttfb(sys.argv[1], sys.argv[2]); c = ttfb(sys.argv[3], sys.argv[4])
print("direct  TTFB p50 %.3f ms  p99 %.3f ms" % d)
print("chorus  TTFB p50 %.3f ms  p99 %.3f ms" % c)
print("added   TTFB p50 %.3f ms  p99 %.3f ms" % (c[0] - d[0], c[1] - d[1]))
PY

echo "== ${STREAMS} concurrent SSE chat streams (native API, slow mock model)"
THREAD=$(curl -sf -X POST "$B/api/v1/threads" -H "authorization: Bearer $TOKEN" \
  -H 'content-type: application/json' -d '{"model":"slow"}' \
  | python3 -c 'import sys,json; print(json.load(sys.stdin)["thread"]["id"])')
BEFORE=$(rss VmRSS)
python3 - "$PORT" "$TOKEN" "$THREAD" "$STREAMS" "$PID" "$BEFORE" <<'PY'
import asyncio, json, sys
from collections import Counter
port, token, thread, n, pid, before = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
body = json.dumps({"content": "hold this stream open"}).encode()
req = (f"POST /api/v1/threads/{thread}/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
       f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
       f"Content-Length: {len(body)}\r\n\r\n").encode() + body
def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
async def one(streaming, sem):
    async with sem:
        r, w = await asyncio.open_connection("127.0.0.1", int(port))
        w.write(req); await w.drain()
        buf = b""
        while b"event:delta" not in buf:
            chunk = await r.read(4096)
            if not chunk:  # closed: report the answer's status line and error message, if any
                if not buf:
                    return None
                head, _, rest = buf.partition(b"\r\n\r\n")
                try:
                    rest = json.loads(rest)["error"]["message"].encode()
                except (ValueError, KeyError, TypeError):
                    rest = rest[:160]
                return (head.split(b"\r\n", 1)[0] + b": " + rest).decode(errors="replace")
            buf += chunk
    streaming.append(1)
    return (r, w)
async def main():
    streaming, sem = [], asyncio.Semaphore(200)
    conns = await asyncio.gather(*[one(streaming, sem) for _ in range(n)], return_exceptions=True)
    held = [c for c in conns if isinstance(c, tuple)]
    await asyncio.sleep(3)
    during = rss()
    print(f"streams open and delivering deltas: {len(held)} of {n}")
    def why(c):
        if c is None:
            return "closed before an answer"
        if isinstance(c, str):
            return "closed before a delta, after " + c
        return type(c).__name__ + ": " + str(c)[:80]
    for reason, count in Counter(why(c) for c in conns if not isinstance(c, tuple)).most_common():
        print(f"  not delivering: {count} x {reason}")
    print(f"RSS before {before} kB, while holding {during} kB: {(during - before) / max(len(held), 1):.1f} kB per stream")
    for r, w in held:
        w.close()
asyncio.run(main())
PY
