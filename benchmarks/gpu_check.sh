#!/usr/bin/env bash
# The prepared GPU run (one device call, ~8 minutes on an H200): CUDA correctness of the fused Triton path, then the
# harness with bf16 autocast (eager and torch.compile). Results land in $OUT (or ./gpu-out), one folder per run.
#
# Set-up on the calling machine (the device box has an older timm and no internet):
#   pip download timm==1.0.31 --no-deps -d .whl          # .whl/ is git-ignored; carry it
# Device call:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560)
set -uo pipefail
out="${OUT:-gpu-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -m pip install --quiet --no-deps .whl/timm-1.0.31-py3-none-any.whl 2>&1 | tail -2
python -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | tail -2 || true
python -c 'import timm_convnn' 2>/dev/null || export PYTHONPATH="$PWD"  # no setuptools there: run from the tree
python -c "import torch, timm, triton, timm_convnn; print(torch.__version__, timm.__version__, triton.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"

# 1. the fused kernels against the PyTorch path on the GPU (fp32 and bf16), and the interpreter test as on CPU
timeout 120 python -m pytest -q tests/test_triton.py 2>&1 | tee "$out/test_triton.log" | tail -5

# 2. operator level (n up to 16385, bf16) and model level (eager), then models with torch.compile
timeout 240 python benchmarks/bench.py --ops --models --device cuda --amp --tokens 197 785 3137 16385 \
    --memory-cap-mib 60000 --out "$out/amp" 2>&1 | tail -60
timeout 150 python benchmarks/bench.py --models --device cuda --amp --compile --out "$out/amp-compile" 2>&1 | tail -12
ls -R "$out"
