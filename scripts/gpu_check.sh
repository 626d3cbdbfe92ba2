#!/usr/bin/env bash
# Everything the GPU targets need, measured in one go on one GPU (at most 8 minutes; each part
# has its own time limit, so one that hangs costs only its share):
#   bash scripts/gpu_check.sh            # writes into $OUT (default: gpu-check/)
# 1. the CUDA tests: gradients, bf16 + channels_last, the same B as on the CPU for every rule, no
#    host synchronization in a step (sync debug mode "error"), resume after SIGTERM on the GPU;
# 2. probe.json (scripts/gpu_probe.py): lane means of the CUDA draws, wm's angle to a fixed W,
#    synchronizations and kernel launches per training step per rule;
# 3. the step-time benchmark, fp32 and bf16: ratio to plain backprop per rule, images/s;
# 4. ResNet-20 end to end through the train CLI (one epoch of CIFAR-10-sized synthetic data):
#    images/s; then 2 torchrun processes on the one GPU against 1, eager and compiled;
# 5. summary.md: the numbers above in one file.
# Runs from the source tree (PYTHONPATH=src) with whatever torch the machine has.
set -uo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1

timeout 140 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/test_cuda.txt" 2>&1
tail -3 "$OUT/test_cuda.txt"
timeout 60 $PY scripts/gpu_probe.py "$OUT" > "$OUT/probe.txt" 2>&1
timeout 90 $PY -m feedback_alignment.bench --device cuda --dtype fp32 bf16 --rounds 10 \
    --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1

train() {  # train OUT_NAME SECONDS EXTRA_FLAGS LAUNCHER...: one epoch of ResNet-20, synthetic data
  local name=$1 seconds=$2 extra=$3; shift 3
  timeout "$seconds" "$@" -m feedback_alignment train --dataset cifar10 --data "$OUT/synthetic_cifar10.pt" \
      --out "$OUT/train_$name" --arch resnet20 --rule brsf --scale match --epochs 1 --batch-size 128 \
      --device cuda --seed 0 $extra > "$OUT/train_$name.txt" 2>&1
}
TORCHRUN2="$PY -m torch.distributed.run --standalone --nproc-per-node 2"
train one 50 "" $PY
train two 50 "--dist-backend gloo" $TORCHRUN2
train two_compiled 80 "--dist-backend gloo --compile" $TORCHRUN2  # compiled around DDP

$PY - "$OUT" > "$OUT/summary.md" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError) as error:
        return {"missing": str(error)}
print("# GPU check\n")
print((out / "gpu.txt").read_text() if (out / "gpu.txt").exists() else "no gpu.txt")
tests = (out / "test_cuda.txt").read_text().strip().splitlines() if (out / "test_cuda.txt").exists() else ["none"]
print("## CUDA tests\n\n" + tests[-1] + "\n")
probe = load("probe.json")
print("## Probe\n\n```\n" + json.dumps(probe, indent=1) + "\n```\n")
print("## Step time against plain backprop\n")
rows = load("bench.json").get("rows")
if rows:
    print("| model | dtype | variant | ratio | images/s |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.get('model')} | {row.get('dtype')} | {row.get('variant')} | {row.get('ratio', float('nan')):.3f} "
              f"| {row.get('images_per_s', float('nan')):.0f} |")
else:
    print(load("bench.json"))
print("\n## ResNet-20 through the train CLI (brsf, match, bf16, batch 128, one epoch)\n")
for name in ("one", "two", "two_compiled"):
    result = load(f"train_{name}/result.json")
    history = (out / f"train_{name}/history.csv")
    speed = history.read_text().strip().splitlines()[-1] if history.exists() else "no history"
    print(f"- {name} process(es): status {result.get('status')}; last history row: {speed}")
EOF
cat "$OUT/summary.md"
