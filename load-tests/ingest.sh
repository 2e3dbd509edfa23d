#!/usr/bin/env bash
# Document ingestion through the real server on loopback: throughput and peak memory.
#
#   load-tests/ingest.sh [MB] [EMBED_KB]        (defaults: 50 512)
#
# Each case starts its own server (temporary data dir, free port, the benchmark tier with an
# upload limit above the document), uploads one generated plain-text document (English words
# in sentences and paragraphs, seeded) with POST /api/v1/documents, polls it to `ready`,
# and prints the upload time, the ingestion time (202 → ready), MB/s of text ingested, chunks
# and chunks/s, and the server's memory from /proc: VmHWM (peak RSS) before the upload and after
# ingestion, and VmRSS after.
#
# 1. Lexical only (embeddings.kind = "none"): MB/10 and MB megabytes — extraction, chunking
#    (cl100k token counts) and storage; the two peaks show whether memory follows the size.
# 2. Local embedder (all-MiniLM-L6-v2 on the CPU): EMBED_KB kilobytes — chunks embedded per
#    second through the whole pipeline.
#
# Bounded in time (each case gives up after 15 minutes); stops the servers it started and
# deletes its temporary files (the generated documents included).
#
# Needs the release binary, from the build it shares with retrieval.sh:
#   cargo build --release --locked -p chorus -p chorus-actors --bin chorus --example retrieval_bench
# and the model for case 2 (scripts/fetch-minilm; it runs it when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

MB=${1:-50}
EMBED_KB=${2:-512}
BIN=${CHORUS_BIN:-target/release/chorus}
MODEL=${CHORUS_MINILM_DIR:-$PWD/data/models/all-MiniLM-L6-v2}
[ -x "$BIN" ] || {
  echo "missing $BIN: cargo build --release --locked -p chorus -p chorus-actors --bin chorus --example retrieval_bench" >&2
  exit 1
}
[ -f "$MODEL/model.safetensors" ] || scripts/fetch-minilm >/dev/null

WORK=$(mktemp -d)
PID=
cleanup() {
  if [ -n "$PID" ]; then kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The benchmark tier, with room for the largest document.
LIMIT=$(( (MB + 1) * 1024 * 1024 ))
sed "s/^upload_max_bytes = .*/upload_max_bytes = $LIMIT/" load-tests/bench-tiers.toml > "$WORK/tiers.toml"

# generate FILE BYTES: plain text, paragraphs of 3–8 sentences of 6–18 English words drawn
# (Zipf-like, seeded) from the words of the retrieval corpus (tests/fixtures/retrieval), so
# tokens per byte are those of prose (about 4.5 bytes a cl100k token).
generate() {
  python3 - "$1" "$2" <<'PY'
import json, random, re, sys
path, size = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
vocabulary = sorted({w.lower() for line in open("tests/fixtures/retrieval/passages.jsonl")
                     for w in re.findall(r"[A-Za-z]+", json.loads(line)["text"])})
rng.shuffle(vocabulary)
weights = [1.0 / (rank + 1) for rank in range(len(vocabulary))]
written = 0
with open(path, "w", encoding="utf-8") as out:
    while written < size:
        sentences = []
        for _ in range(rng.randint(3, 8)):
            words = rng.choices(vocabulary, weights, k=rng.randint(6, 18))
            sentences.append(" ".join(words).capitalize() + ".")
        paragraph = " ".join(sentences) + "\n\n"
        out.write(paragraph)
        written += len(paragraph)
PY
}

# run_case NAME EMBEDDINGS_KIND FILE
run_case() {
  local name=$1 kind=$2 file=$3
  local port data
  port=$(free_port)
  data=$(mktemp -d -p "$WORK")
  CHORUS__TIERS_FILE="$WORK/tiers.toml" CHORUS__DATA_DIR="$data" \
  CHORUS__SERVER__BIND="127.0.0.1:$port" CHORUS__LOG__LEVEL=warn \
  CHORUS__AUTH__JWT_SECRET="bench-secret-bench-secret-bench-secret" \
  CHORUS__EMBEDDINGS__KIND="$kind" CHORUS__EMBEDDINGS__LOCAL_MODEL_DIR="$MODEL" \
  CHORUS__DOCUMENTS__MAX_TEXT_BYTES=$(( LIMIT * 2 )) \
    "$BIN" serve 2>"$WORK/chorus.log" &
  PID=$!
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
  python3 - "$name" "http://127.0.0.1:$port" "$PID" "$file" <<'PY'
import json, os, subprocess, sys, time, urllib.request
name, base, pid, path = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]

def call(method, url, token=None, body=None):
    req = urllib.request.Request(base + url, method=method,
                                 data=None if body is None else json.dumps(body).encode())
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", "Bearer " + token)
    with urllib.request.urlopen(req) as r:
        return json.load(r)

def mem(key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # MiB
    return float("nan")

token = call("POST", "/api/v1/auth/register", body={"email": "bench@example.com", "password": "bench-password"})["access_token"]
peak_before, rss_before = mem("VmHWM"), mem("VmRSS")
size = os.path.getsize(path)
t0 = time.perf_counter()
answer = subprocess.run(["curl", "-sf", "-X", "POST", base + "/api/v1/documents",
                         "-H", "authorization: Bearer " + token, "-F", f"file=@{path};filename=bench.txt"],
                        check=True, capture_output=True).stdout
t1 = time.perf_counter()
doc_id = json.loads(answer)["document"]["id"]
deadline = t1 + 900
while True:
    doc = call("GET", f"/api/v1/documents/{doc_id}", token)["document"]
    if doc["status"] in ("ready", "failed") or time.perf_counter() > deadline:
        break
    time.sleep(0.1)
t2 = time.perf_counter()
if doc["status"] != "ready":
    print(f"{name}: ended {doc['status']} ({doc.get('error')}) after {t2 - t1:.1f} s", flush=True)
    sys.exit(1)
mb = size / 1e6
ingest = t2 - t1
print(f"| {name} | {mb:.1f} MB | {t1 - t0:.2f} s | {ingest:.2f} s | {mb / ingest:.3f} MB/s | "
      f"{doc['chunks']} | {doc['chunks'] / ingest:.1f} | {peak_before:.0f} MiB | {mem('VmHWM'):.0f} MiB | "
      f"{mem('VmRSS'):.0f} MiB |", flush=True)
PY
  kill -TERM "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
  PID=
  rm -rf "$data"
}

SMALL_MB=$(( MB / 10 > 0 ? MB / 10 : 1 ))
generate "$WORK/small.txt" $(( SMALL_MB * 1000 * 1000 ))
generate "$WORK/large.txt" $(( MB * 1000 * 1000 ))
generate "$WORK/embed.txt" $(( EMBED_KB * 1000 ))

echo "# Ingestion ($(nproc) cores, $("$BIN" --version 2>/dev/null || echo chorus), chunks of 400 cl100k tokens, overlap 60)"
echo "| case | text | upload | ingestion (202 → ready) | throughput | chunks | chunks/s | peak RSS before | peak RSS after | RSS after |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
run_case "lexical only (no embedder)" none "$WORK/small.txt"
run_case "lexical only (no embedder)" none "$WORK/large.txt"
run_case "local embedder (all-MiniLM-L6-v2)" local "$WORK/embed.txt"
