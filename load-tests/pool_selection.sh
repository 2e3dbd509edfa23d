#!/usr/bin/env bash
# What choosing a deployment costs per model call: selection among three deployments of one
# model (availability, priority, power of two choices, metrics), recording the outcome and
# releasing the lease. In process, no network: the provider call itself is not included.
#   load-tests/pool_selection.sh [calls per run, default 200000]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release --quiet -p chorus-actors --example pool_selection -- "${1:-200000}"
