#!/usr/bin/env bash
# The per-user retrieval index and the local embedder, in process (no server, no network):
# search p50/p99/max over 10k and 100k synthetic chunks of one user (lexical, vector, hybrid,
# hybrid with a document filter), the index's build time and size; recall@1/@5 and MRR of
# BM25-only, vector-only and hybrid on the shipped corpus (tests/fixtures/retrieval) with the
# real all-MiniLM-L6-v2; local embedding throughput.
#
#   load-tests/retrieval.sh [QUERIES] [SIZES]        (defaults: 300 10000,100000)
#
# Needs the model: scripts/fetch-minilm (installs it when missing; CHORUS_MINILM_DIR overrides
# where it lives). Builds in release what ingest.sh also needs (the server and this example, in
# one build, so the two scripts share it instead of compiling the dependencies twice with
# different features).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-minilm >/dev/null
cargo build --release --locked --quiet -p chorus -p chorus-actors --bin chorus --example retrieval_bench
target/release/examples/retrieval_bench "${1:-300}" "${2:-10000,100000}"
