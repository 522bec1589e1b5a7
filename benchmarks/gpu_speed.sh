#!/usr/bin/env bash
# Issue 15's device checks (GPU speed), prepared on CPU to run in one call on a lent GPU:
#
#   bash benchmarks/gpu_speed.sh [OUT_DIR]        # OUT_DIR: logs and JSON (default $OUT or /tmp)
#
# Every step has its own time limit, so that one slow compile cannot spend the device budget
# (at most 580 s in all); each prints its table, and the logs stay in OUT_DIR. The steps:
#   1. the compiled kernels against the oracle (Triton today; `-k compiled`), the cuDNN path
#      and the padded statistics on the device;
#   2. attention + statistics: the Pallas kernels vs cuDNN's fused kernel alone (dpa_cudnn) vs
#      our "cudnn" path with the statistics ToMe / EViT need, N = 197 / 1025 / 4096;
#   3. ViT-B/16 inference, batch 256, bf16: unreduced and ToMe r=16, each unpadded and with token
#      counts rounded to multiples of 8, with the Pallas kernels and with the cuDNN path (the
#      speed-ups, the padding's speed-up and the compile seconds, side by side per run);
#   4. train.py's step on the unreduced ViT-B/16, batch 256, bf16: images/s and MFU.
# Not here: the PyTorch side (timm eager / torch.compile, the official ToMe) needs torch and
# timm installed on the measuring machine, and the device has no network to install them.
set -u
OUT=${1:-${OUT:-/tmp}}
mkdir -p "$OUT"
PY=${PYTHON:-python}
BATCH=${BATCH:-256}        # a smaller BATCH smoke-tests the script on CPU
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {   # step NAME LIMIT_SECONDS COMMAND...: run, print its tail and how long it took
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v -i "warning\|deprecat" "$OUT/$name.log" | tail -30
  echo "--- $name: exit $rc after $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY - <<'EOF' || { echo "the project's dependencies are missing on this machine"; exit 1; }
import jax, flax, jax_tokens
print("jax", jax.__version__, "flax", flax.__version__, "devices", jax.devices())
EOF

step kernels 100 $PY -m pytest -q -x -p no:cacheprovider tests/test_attention.py \
  tests/test_attention_fused.py tests/test_token_padding.py -k "compiled or statistic"
step attention 100 $PY benchmarks/attention.py --impl pallas,dpa_cudnn,cudnn \
  --stats lse,cls_probs,mean_key --n 197,1025,4096 --runs 10 --no-isolate
for impl in pallas_gpu cudnn; do
  step "vit_b_$impl" 140 $PY benchmarks/throughput.py --models vit_b --batch "$BATCH" \
    --dtype bfloat16 --runs 10 --reducers none,tome16 --token-multiples 1,8 \
    --attn-impl "$impl" --json "$OUT/vit_b_$impl.json"
done
step train_step 100 $PY benchmarks/train_step.py --model vit_b --batch "$BATCH" \
  --dtype bfloat16 --runs 10 --reducers none --attn-impl pallas_gpu
