#!/usr/bin/env bash
# The GPU session of issue 9, as one command (for the lent H100/H200 machine, or any CUDA box
# with slimdiff importable). Writes OUT/{gpu.txt,e2e.json,profile_dydit.json,log} and OUT/speed_xl, OUT/speed_small.
#   OUT=runs/gpu bash scripts/gpu_run.sh
set -u
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, diffusers, torch_pruning; print(torch.__version__, diffusers.__version__, torch.cuda.get_device_name())"
# 1. the speed bench of the issue: DiT-XL/2, batch 32, bf16
$PY -m slimdiff.cli bench-speed --models DiT-XL/2 --batch 32 --device cuda --dtype bfloat16 --repeats 7 \
    -o "$OUT/speed_xl" || echo "speed_xl FAILED"
# 2. DyDiT's sampling profiled: teacher, tokens by nonzero (a sync per block), sync-free capacity
$PY scripts/profile_dydit.py --model DiT-XL/2 --batch 32 --device cuda --dtype bfloat16 --out "$OUT" \
    || echo "profile_dydit FAILED"
# 3. every method end to end on CUDA, CPU vs CUDA samples
$PY scripts/gpu_check.py --out "$OUT" || echo "gpu_check FAILED"
# 4. the CPU bench's models on the GPU (small models: launch overhead shows)
$PY -m slimdiff.cli bench-speed --batch 32 --device cuda --dtype bfloat16 --repeats 7 \
    -o "$OUT/speed_small" || echo "speed_small FAILED"
