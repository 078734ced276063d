#!/usr/bin/env bash
# The prepared GPU run: CUDA correctness of the fused Triton kernels, the harness with bf16 autocast (PyTorch path and
# fused kernels side by side, operator and model level), and the opt-in launches that might reach the issue's targets,
# timed at model level against timm in the same run. Results land in $OUT (or ./gpu-out). The harness writes its
# JSON / markdown after every measured row, so a stage cut short keeps what it measured.
#
# Stages run in the order GPU_CHECK_STAGES names them (default: all, most decision-relevant first), within one time
# budget, GPU_CHECK_BUDGET_S seconds since the script started (default 590: one device command runs at most 600 s).
# Each command runs under `timeout` of its own limit or of what is left of the budget (less 20 s for packing),
# whichever is smaller, and is skipped, named in skipped.txt, when fewer than 15 s would be left.
# GPU_CHECK_DRY=1 prints the commands with their limits instead of running them, as if each took its whole limit
# (bash's SECONDS advances): the worst case of a budget, on any machine.
#
# Set-up on the calling machine (the device box has an older timm and no internet):
#   pip download timm==1.0.31 --no-deps -d .whl          # .whl/ is git-ignored; carry it
#   mkdir -p .timm_scripts; for f in train validate benchmark inference; do   # stage scripts; git-ignored; carry it
#     git --git-dir=D show HEAD:$f.py > .timm_scripts/$f.py; done   # D: fetch github:huggingface/pytorch-image-models
# Results: under the device tool ($OUT set), which returns at most 8 files from $OUT, the stages write to a scratch
# directory that is packed into $OUT/gpu-check.tgz after every stage (a call cut short by its time limit keeps what
# its finished stages wrote), with the CUDA test logs beside it; without $OUT, into ./gpu-out. The script ends with
# benchmarks/gpu_summary.py's reading of them (summary.md, also printed): tests, ratios against the targets, sweeps.
# Device calls (15 minutes of device time in all, the machine's start included; it goes back after 30 s idle, so make
# the second call right after the first):
#   run(command='GPU_CHECK_STAGES="tests models row listed sweep optin" GPU_CHECK_BUDGET_S=440 '
#               'bash benchmarks/gpu_check.sh', carry=[".whl", ".timm_scripts"], timeout_s=450)
#   run(command='GPU_CHECK_STAGES="<stages skipped.txt names, optin last> scripts ops threshold optin compile '
#               'profile select fp32" GPU_CHECK_BUDGET_S=<budget_left_s - 20> bash benchmarks/gpu_check.sh',
#       carry=[".whl", ".timm_scripts"], timeout_s=<budget_left_s - 10>)
# (the first call's stages are the decisions: the built-in launches' correctness and model level, then the opt-in
# launches that might reach the issue's targets, at model level against timm and in the sweep; its limits add up to
# more than 440 s, and skipped.txt names the stages it did not reach (rerun whole). The second call's order: the
# timing stages skipped, what users run and no GPU has run yet (timm's scripts on the fused kernels: stage scripts,
# about 100 s), the operator table of the README and the threshold passes for the `all` target, then the opt-in
# launches' CUDA tests (300 s at most: only needed for a launch worth building in), torch.compile, the diagnostics.)
# (2026-11-30: tests, ops, models and select took 241 s of wall time, 20 CUDA tests 99 s of it, and the machine's
# start about 30 s.)
set -uo pipefail
stages="${GPU_CHECK_STAGES:-tests models row listed sweep optin profile ops threshold select fp32 scripts compile}"
budget="${GPU_CHECK_BUDGET_S:-590}"
budget="${budget%.*}"  # (whole seconds: bash arithmetic stops at a decimal point, and with it every stage)
[[ "$budget" =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: GPU_CHECK_BUDGET_S must be seconds, got '$budget'" >&2; exit 2; }
dry="${GPU_CHECK_DRY:-0}"
if [ -n "${OUT:-}" ]; then
  out="$(mktemp -d)"
  pack() {
    tar -czf "$OUT/gpu-check.tgz" -C "$out" . && for log in test{,-optin,-scripts,-compile}.log; do
      [ ! -f "$out/$log" ] || cp "$out/$log" "$OUT/"
    done
  }
else
  out="gpu-out"
  pack() { :; }
fi
mkdir -p "$out"
exec 3>&1  # the script's stdout, for the dry run's lines from inside redirected commands
export PYTHONUNBUFFERED=1
export PYTEST_ADDOPTS="${PYTEST_ADDOPTS:-} --durations=15"  # the CUDA tests' slowest, for trimming the stages
tests="cuda and not compile"  # (the torch.compile tests: stage compile)

# limited SECONDS COMMAND...: COMMAND under `timeout` of SECONDS or what is left of the budget less 20 s, the smaller
limited() {
  local limit=$1 left=$(( budget - SECONDS - 20 ))
  shift
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then  # (the stage named: a second call reruns it whole)
    echo "skipped (stage ${stage:-?}), ${left} s of the budget left: $*" | tee -a "$out/skipped.txt" >&3
    return 0
  fi
  if [ "$dry" = 1 ]; then
    echo "[${SECONDS} s] timeout $limit $(printf '%q ' "$@")" >&3
    SECONDS=$(( SECONDS + limit ))
    return 0
  fi
  timeout -k 10 "$limit" "$@"  # (-k: a child that outlives SIGTERM, stuck in a driver call, is killed 10 s later)
}

# 1. the fused kernels against the PyTorch path on the GPU, the launches they choose themselves (fp32 / bf16 / fp16,
#    row and streaming kernels, sampled candidates, the selection kernel, model train steps, the two fp32 product
#    precisions, NaN keys, torch.func per-sample gradients, attention dropout; 29 tests: 20 of them took 99 s on
#    2026-11-30, each kernel variant compiled on first use; fp16, train.py's --amp default, added on 2026-12-02, and
#    the 3 torch.func and 3 dropout ones, added on 2026-12-03, have never run on a GPU). The 25 tests
#    of opt-in launches (pytest marker optin) have a stage of their own. -v: a stage cut short by its limit still logs
#    which tests passed
stage_tests() {
  limited 260 python -m pytest -v -rs -k "$tests" -m "not optin" tests/test_triton.py > "$out/test.log" 2>&1
  tail -8 "$out/test.log"
}
# 2. model level (eager, batch 256), both backends
stage_models() {
  limited 100 python benchmarks/bench.py --models --device cuda --amp --backends torch triton --warmup 2 --iters 5 \
      --out "$out/models" 2>&1
}
# 3. ViT-B inference (0.70x of timm's on 2026-11-30, target 0.8x) with other row-kernel launches, against timm's ViT-B
#    in the same run (the built-in: stage 2): the bitonic selection on 64 queries and 8 warps, the fastest launch at
#    batch 256 on 2026-11-30 (0.94 ms against 1.21 for the built-in 16 queries on 4 warps, whose rounds have since
#    lost their marking of taken keys: 3,336 -> 2,904 instructions and 130 -> 110 registers compiled by triton 3.6);
#    and the built-in launch with rounds two keys at a time (fwd_select=pairs, untimed: 80 registers, 30 barriers
#    against 54, 3,064 instructions under triton 3.6)
stage_row() {
  limited 90 python benchmarks/bench.py --models --device cuda --amp --backends triton --warmup 2 --iters 5 \
      --pairs vit_base_convnn_all_k16:vit_base_patch16_224 \
      --kernel-config fwd_block_m=64 fwd_warps=8 fwd_select=topk --out "$out/variant-topk64" 2>&1
  limited 75 python benchmarks/bench.py --models --device cuda --amp --backends triton --warmup 2 --iters 5 \
      --pairs vit_base_convnn_all_k16:vit_base_patch16_224 \
      --kernel-config fwd_select=pairs --out "$out/variant-pairs" 2>&1
}
# 4. sampled candidates (r 128 at n 16385: 1.9x faster than SDPA on 2026-11-30, target 4x) ranked as one score row
#    (CONFIG fwd_listed='row') instead of streamed, with the backward's dense per-token sums (bwd_listed='dense'): the
#    attention core at n 197 / 16385 and vit_tiny_convnn_random (the streamed list took 0.85 ms forward at n 16385,
#    K 16, and the backward ~1.0 ms), and the backward alone, per-pair atomics vs dense sums over 64 and 16 list
#    positions at a time
stage_listed() {
  limited 120 python benchmarks/bench.py --ops --models --device cuda --amp --backends triton \
      --tokens 197 16385 --modes random spatial --op-batches 197:64 16385:1 --warmup 2 --iters 5 \
      --pairs vit_tiny_convnn_random:vit_tiny_patch16_224 --kernel-config fwd_listed=row bwd_listed=dense \
      --out "$out/variant-listed" 2>&1
  limited 40 python benchmarks/kernel_sweep.py --shapes --contention 1x6x16385 64x3x197 --neighbors 16 \
      --out "$out/contention.json" 2>&1
}
# 5. launch configurations of the kernels (K 16; row kernel at n 197 and batch 256, where it is GPU-bound: at batch 64
#    the same launch timed 0.30 and 0.36 ms in two runs; the launches that competed lately (--short): rounds one or
#    two keys at a time / bitonic selection, 16 / 32 / 64 queries on 1 / 2 / 4 / 8 warps; backward incl. 8 queries on
#    one warp; streaming at n 3137: the merge loop and the threshold passes)
stage_sweep() {
  limited 150 python benchmarks/kernel_sweep.py --short --shapes 256x12x197 4x6x3137 --neighbors 16 \
      --out "$out/sweep.json" 2>&1
}
# 6. the tests of the opt-in launches (CONFIG settings: the row kernel's other selections, keys and launches, the
#    threshold passes, the candidate lists' row ranking and dense backward, dk / dv copies)
stage_optin() {
  limited 300 python -m pytest -v -rs -k "$tests" -m optin tests/test_triton.py > "$out/test-optin.log" 2>&1
  tail -8 "$out/test-optin.log"
}
# 7. where the sampled core's time goes at n 16385, B 1 (kernels vs glue, and wall time against summed kernel time:
#    whether the host is what the GPU waits on), built in and with the two opt-ins of stage 4; printed
stage_profile() {
  limited 60 python benchmarks/profile_gpu.py --op random:16385:1 --backends triton --rows 8 \
      > "$out/profile-random.txt" 2>&1
  limited 60 python benchmarks/profile_gpu.py --op random:16385:1 --backends triton --rows 8 \
      --kernel-config fwd_listed=row bwd_listed=dense > "$out/profile-random-listed.txt" 2>&1
  grep -hv "^USDT\|^ERROR\|^WARNING" "$out"/profile-random*.txt
}
# 8. operator level (n up to 16385, bf16), PyTorch path and fused kernels
stage_ops() {
  limited 120 python benchmarks/bench.py --ops --device cuda --amp --tokens 197 16385 785 3137 \
      --backends torch triton --op-batches 197:64 785:16 3137:4 16385:1 \
      --warmup 2 --iters 5 --memory-cap-mib 60000 --out "$out/ops" > "$out/ops.log" 2>&1
  grep -v "skipped: over" "$out/ops.log"
}
# 9. CONFIG fwd_stream='threshold' (untimed): the streamed forward over all tokens as a threshold pass and a pass
#    collecting the keys above it, no merge rounds (the built-in merge loop took 3.69 ms forward at n 16385, B 1,
#    K 16 on 2026-11-30 (3d2dbfa), against 1.08 for SDPA's; `all` K 16 there: 1.24x SDPA's forward + backward, target
#    1x). The attention core at n 3137 / 16385 against SDPA in the same run; its launches against the merge loop
#    (64 / 32 queries, 4 / 8 warps; the selection's in the select stage); and ResNet-50 whose stage-1 selections
#    stream (its 3 x 3 convs as ConvNN2d) against timm's resnet50
stage_threshold() {
  limited 90 python benchmarks/bench.py --ops --device cuda --amp --backends triton --tokens 3137 16385 \
      --modes all --op-batches 3137:4 16385:1 --warmup 2 --iters 5 --kernel-config fwd_stream=threshold \
      --out "$out/variant-threshold" 2>&1
  limited 90 python benchmarks/kernel_sweep.py --short --shapes 1x6x16385 --neighbors 16 9 \
      --out "$out/sweep-threshold.json" 2>&1
  limited 75 python benchmarks/bench.py --models --device cuda --amp --backends triton --warmup 2 \
      --iters 5 --pairs resnet50_convnn_branch:resnet50 --kernel-config fwd_stream=threshold \
      --out "$out/variant-threshold-resnet" 2>&1
}
# 10. the selection kernel alone (ConvNN2d on CUDA) against the PyTorch selection, a ResNet-50 stage-1 layer at batch
#     64, on bf16 features and on fp32 ones, what a cosine ConvNN2d hands over under autocast (F.normalize returns
#     fp32): 3xTF32 vs ieee
stage_select() {
  limited 45 python benchmarks/kernel_sweep.py --shapes --select 64x3136x3364x64 --neighbors 9 \
      --out "$out/select.json" 2>&1
  limited 45 python benchmarks/kernel_sweep.py --shapes --select 64x3136x3364x64 --neighbors 9 --fp32 \
      --out "$out/select-fp32.json" 2>&1
}
# 11. fp32 inputs (timm's validate.py / benchmark.py without AMP): the row kernel on 4 warps (spills) vs 8 (does not)
stage_fp32() {
  limited 40 python benchmarks/kernel_sweep.py --shapes 64x12x197 --neighbors 16 --fp32 \
      --out "$out/sweep-fp32.json" 2>&1
}
# 12. timm's own train.py / validate.py / benchmark.py on the GPU, the fused kernels under them (never run on a GPU
#     before 2026-12-02; the CPU runs them in tests/test_scripts.py): a ViT trained with train.py's default float16
#     --amp (loss scaler) until it learns, validate.py reproducing its top-1, a ConvNN ResNet's selection kernel under
#     bf16, benchmark.py. timm's scripts are not in its wheel: TIMM_SCRIPTS_DIR, by default .timm_scripts/ (git-ignored;
#     copy train.py, validate.py, benchmark.py and inference.py from timm's repository there and carry it)
stage_scripts() {
  local dir="${TIMM_SCRIPTS_DIR:-.timm_scripts}"
  if [ ! -f "$dir/train.py" ]; then
    echo "skipped, no timm scripts in $dir (carry .timm_scripts): the scripts stage" | tee -a "$out/skipped.txt"
    return 0
  fi
  limited 150 env TIMM_SCRIPTS_DIR="$(cd "$dir" && pwd)" python -m pytest -v -rs -k cuda tests/test_scripts.py \
      > "$out/test-scripts.log" 2>&1
  tail -8 "$out/test-scripts.log"
}
# 13. torch.compile (Inductor) with the fused kernels as custom ops (never run on a GPU before 2026-12-02; on the CPU
#     the ops pass torch.library.opcheck and trace under aot_eager): the CUDA test (an eval forward equal to eager, a
#     training step's gradients, no graph break), then ViT-B against timm's, both compiled
stage_compile() {
  limited 150 python -m pytest -v -rs -k "cuda and compile" tests/test_triton.py > "$out/test-compile.log" 2>&1
  tail -8 "$out/test-compile.log"
  limited 150 python benchmarks/bench.py --models --device cuda --amp --compile --warmup 3 --iters 10 \
      --pairs vit_base_convnn_all_k16:vit_base_patch16_224 --out "$out/compile" 2>&1
}

for stage in $stages; do
  declare -F "stage_$stage" > /dev/null || { echo "gpu_check.sh: unknown stage '$stage'" >&2; exit 2; }
done
if [ "$dry" != 1 ]; then
  pip_offline=(--quiet --no-deps --no-index --disable-pip-version-check)  # (no network there: no waits on it)
  python -m pip install "${pip_offline[@]}" .whl/timm-1.0.31-py3-none-any.whl 2>&1 | tail -2
  python -m pip install "${pip_offline[@]}" --no-build-isolation -e . 2>&1 | tail -2 || true
  # the tree on the path whatever the editable install did (too old a setuptools refuses it; `python -c` would
  # import the package from the working directory anyway, benchmarks/*.py would not)
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  python -c "import torch, timm, triton, timm_convnn
print(torch.__version__, timm.__version__, triton.__version__, torch.cuda.get_device_name())"
  # an older timm (the machine's own, when .whl was not carried) fails the tests: stop before spending the budget
  python -c "import re, sys, timm
sys.exit(tuple(map(int, re.findall(r'\d+', timm.__version__)[:3])) < (1, 0, 31))" || {
    echo "gpu_check.sh: timm >= 1.0.31 is needed (carry .whl: see the header)" >&2; exit 2; }
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
fi
for stage in $stages; do
  echo "== $stage (${SECONDS} s)"
  "stage_$stage"
  pack
done
if [ "$dry" != 1 ]; then
  # what the results say about the issue's targets (benchmarks/gpu_summary.py), last: the device tool returns the
  # output's tail
  python benchmarks/gpu_summary.py "$out" > "$out/summary.md" 2>&1
  pack
  ls -R "$out"
  cat "$out/summary.md"
fi
