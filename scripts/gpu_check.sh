#!/usr/bin/env bash
# Everything the GPU targets need, measured in one go (about 6 minutes on one H200):
#   bash scripts/gpu_check.sh            # writes into $OUT (default: gpu-check/)
# 1. the CUDA tests (gradients on the GPU, bf16 + channels_last, the train CLI's GPU defaults);
# 2. the step-time benchmark, fp32 and bf16: ratio to plain backprop per rule, images/s;
# 3. ResNet-20 throughput at the paper's batch (128) and a larger one, eager and compiled.
# Runs from the source tree (PYTHONPATH=src) with whatever torch the machine has.
set -uo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt" | tail -3
timeout 200 $PY -m feedback_alignment.bench --device cuda --dtype fp32 bf16 --rounds 40 \
    --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
for batch in 128 512; do
  timeout 100 $PY -m feedback_alignment.bench --device cuda --dtype bf16 --models resnet20 \
      --rounds 30 --batch-size $batch --json "$OUT/throughput_b$batch.json" 2>&1 | tee -a "$OUT/throughput.txt"
done
timeout 150 $PY -m feedback_alignment.bench --device cuda --dtype bf16 --models resnet20 --rounds 30 \
    --rules bp usf brsf --compile --json "$OUT/throughput_compiled.json" 2>&1 | tee -a "$OUT/throughput.txt"
