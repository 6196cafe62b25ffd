#!/bin/bash
# The Lazy Neuron and top-k experiments (issue "Trainable top-k modules"), full settings, one after the other on a
# quiet machine: `benchmarks/lazy_neuron.sh OUT`. Needs Debian's python3.11-doc (the Makefile installs it): the
# training corpus, 10.3M bytes of the Python documentation as text, the last 5% held out. Runs are cached in
# OUT/runs, so an interrupted script resumes, and width / topk reuse emergence's d_ff 512 runs.
set -e
OUT=${1:-experiments}
start=$(date +%s)
for e in emergence width topk random distill stat-topk; do
  echo "=== $e $(date)"
  /usr/bin/time -f "%e s wall" sparsen experiment "$e" --full --out "$OUT" --quiet
done
echo "=== all six: $(( $(date +%s) - start )) s wall"
