#!/bin/bash
# Top-k mixtures of experts on the small transformer and the top-K gating theory (issue "Top-k mixtures of experts"),
# full settings: `benchmarks/moe_routing.sh OUT`. Runs are cached in OUT/runs and shared across the routing
# experiments (the base MoE appears in each).
set -e
OUT=${1:-experiments}
for e in gating-theory moe-vs-dense balance capacity experts-per-token gates; do
  echo "=== $e $(date)"
  /usr/bin/time -f "%e s wall" sparsen experiment "$e" --full --out "$OUT" --quiet
done
