#!/bin/bash
# Sparse dictionaries on SmolLM2's layer 15 (of 30), trained here from one activation cache, and SAELens's own
# trainer on the same activations beside ours (BENCHMARKS.md, "Sparse dictionaries").
#
#   benchmarks/sae_smollm2.sh WORKDIR            # all steps; a finished step is skipped when run again
#
# Needs the project's venv (make test) and, for the SAELens side, the peer venv:
#   python3 -m venv /work/venv-peers-sae && /work/venv-peers-sae/bin/pip install torch==2.13.0 sae-lens==6.54.12
# and Debian's python3.11-doc (the Python documentation: the corpus beyond WikiText-2 validation).
# Run it on a quiet machine: the two trainers' speeds are compared as a ratio within this run.
set -euo pipefail
W=${1:?usage: benchmarks/sae_smollm2.sh WORKDIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
S="$ROOT/.venv/bin/sparsen"
PEER=${PEER_PYTHON:-/work/venv-peers-sae/bin/python}
L=15
K=32
WIDTH=4608        # 8 x 576
BATCH=4096
STEPS=489         # 2,002,944 tokens
LR=5e-4
DECAY=98          # linear decay to 0 over the last 20% of the steps (sparsen's default lr_schedule)
mkdir -p "$W"

# 1. one cache, three hooks (resumes if interrupted)
[ -f "$W/cache/manifest.json" ] && grep -q '"complete": true' "$W/cache/manifest.json" || \
  "$S" cache --model smollm2 --hook blocks.$L.hook_resid_post --hook blocks.$L.hook_mlp_in --hook blocks.$L.hook_mlp_out \
    --tokens 2100000 --text wikitext2-valid --text /usr/share/doc/python3.11/html --ctx 1024 --out "$W/cache"

train() {  # name, then sparsen sae train arguments
  local name=$1; shift
  [ -f "$W/$name/train.json" ] || "$S" sae train --cache "$W/cache" --width $WIDTH --batch $BATCH \
    --tokens $((STEPS * BATCH)) --lr $LR --out "$W/$name" "$@"
}
evaluate() {  # name, then more sparsen sae eval arguments
  local name=$1; shift
  [ -f "$W/$name/eval.json" ] || "$S" sae eval --model smollm2 --sae "$W/$name" --tokens 65536 --ce-windows 8 \
    --out "$W/$name/eval.json" "$@"
}

# 2. TopK SAE on the residual stream: sparsen, then SAELens's trainer on the same cache, k, width, steps, batch, lr
train topk_resid --arch topk --k $K --hook blocks.$L.hook_resid_post
[ -f "$W/saelens_topk_resid/cfg.json" ] || "$PEER" "$ROOT/scripts/saelens_train_from_cache.py" --cache "$W/cache" \
  --key blocks.$L.hook_resid_post --k $K --width $WIDTH --batch $BATCH --steps $STEPS --lr $LR --lr-decay $DECAY \
  --shuffle --seed 0 --out "$W/saelens_topk_resid" | tee "$W/saelens_topk_resid.json"
evaluate topk_resid
evaluate saelens_topk_resid --hook blocks.$L.hook_resid_post   # its cfg.json names no hook (trained model-free)

# 3. the middle MLP: a TopK transcoder (mlp_in -> mlp_out), a skip-transcoder, and a TopK SAE on mlp_out
train transcoder_mlp --arch topk --k $K --hook blocks.$L.hook_mlp_in --hook-out blocks.$L.hook_mlp_out
train skip_transcoder_mlp --arch topk --k $K --hook blocks.$L.hook_mlp_in --hook-out blocks.$L.hook_mlp_out --skip
train topk_mlp_out --arch topk --k $K --hook blocks.$L.hook_mlp_out
for n in transcoder_mlp skip_transcoder_mlp topk_mlp_out; do evaluate $n; done
echo "done: $W"
