#!/usr/bin/env bash
# Training speed of the authors' CIFAR-10 NIN (nin_cifar) on one GPU, and our MFU.
#
#   bash benchmarks/gpu.sh            # about 3-5 minutes on one H100
#   STEPS=50 PEAK_BF16=989 PEAK_TF32=494 bash benchmarks/gpu.sh
#   INPUTS=none bash benchmarks/gpu.sh                                        # the model alone
#   MODEL=nin_small BATCHES=8 STEPS=1 PYTHON=python bash benchmarks/gpu.sh   # a smoke test
#
# Needs only JAX (with its CUDA plugin), Flax, optax, Orbax and absl: no TensorFlow, no PIL, no
# ml_collections. Runs `python -m nin_jax.benchmark train` at batch 128 and 1024, in float32 and
# bfloat16, each step's batch drawn through the host input pipeline and through the
# device-resident one (--input host|device, 10,000 random CIFAR-sized images, standardize +
# translate_flip), and prints train images/s and MFU = model FLOPs per second / the GPU's dense
# peak. Model FLOPs: 2 × 222M multiply-accumulates × 3 (forward, both halves of the backward
# pass) = 1.33 GFLOP per image.
# Peaks (H100 SXM, dense, TFLOP/s): bfloat16 989; float32 runs its convolutions and matmuls as
# TF32 on the tensor cores by default in XLA, so its MFU is against the TF32 peak, 494. Override
# both for another GPU (an H200 has the same peaks; an H100 PCIe 756 and 378).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
STEPS="${STEPS:-30}"
BATCHES="${BATCHES:-128 1024}"
MODEL="${MODEL:-nin_cifar}"
INPUTS="${INPUTS:-host device}"
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
PEAK_BF16="${PEAK_BF16:-989}"
PEAK_TF32="${PEAK_TF32:-494}"

"$PYTHON" -c 'import jax; print("devices:", jax.devices(), "jax", jax.__version__)'
printf '%-6s %-9s %-7s %12s %10s %10s %9s %12s\n' batch dtype input images/s step_ms TFLOP/s MFU \
  compile_s
for batch in $BATCHES; do
  for dtype in float32 bfloat16; do
   for input in $INPUTS; do
    if ! "$PYTHON" -m nin_jax.benchmark train --model "$MODEL" --batch_size "$batch" \
         --dtype "$dtype" --steps "$STEPS" --input "$input" >"$LOG" 2>&1; then
      tail -n 20 "$LOG"; exit 1
    fi
    line="$(tail -n 1 "$LOG")"
    peak="$PEAK_TF32"
    if [ "$dtype" = bfloat16 ]; then peak="$PEAK_BF16"; fi
    "$PYTHON" - "$line" "$peak" <<'EOF'
import json, sys
r, peak = json.loads(sys.argv[1]), float(sys.argv[2])
tflops = r['gflops_per_sec'] / 1e3
print(f"{r['batch_size']:<6} {r['dtype']:<9} {r['input']:<7} {r['images_per_sec']:12.0f} "
      f"{r['step_ms']:10.2f} "
      f"{tflops:10.1f} {100 * tflops / peak:8.1f}% {r['compile_seconds']:12.1f}   "
      f"(peak {peak:g}, {r['backend']} x{r['device_count']}, conv {r['conv_impl']})")
EOF
   done
  done
done
