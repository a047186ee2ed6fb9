#!/usr/bin/env bash
# Everything that needs a GPU, in one call of a few minutes: the CUDA paths against the CPU
# (scripts/cuda_check.py), then the CUDA throughput tables and a profile of one training run
# (benchmarks/throughput.py). Needs python3 with torch, numpy, pandas, scipy, pyyaml, tqdm,
# jinja2, onnx, onnxscript and onnxruntime; the CPU kernel (ml.fastpath._tanh_mlp) is not needed.
# Logs go to $OUT (or .local/device-check); each stage runs even if an earlier one failed,
# and the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.local/device-check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
status=0

stage() {  # stage NAME COMMAND...: run it, keep its log, remember a failure
    local name=$1; shift
    echo "== $name: $*"
    local start=$SECONDS
    local rc=0
    "$@" > "$out/$name.log" 2>&1 || rc=$?
    [ "$rc" -eq 0 ] || { status=1; echo "!! $name failed (exit $rc), see $name.log"; }
    grep -vE "ppo updates|Warning|warn\(|^W[0-9]{4}" "$out/$name.log" | tail -n "${TAIL:-60}"
    echo "== $name took $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || status=1
"$python" -c 'import sys, importlib
print("python", sys.version.split()[0], *(f"{m} {importlib.import_module(m).__version__}" for m in
      ("torch", "numpy", "pandas", "scipy", "onnx", "onnxscript", "onnxruntime")))' || status=1
stage cuda_check "$python" scripts/cuda_check.py --device cuda
stage throughput "$python" benchmarks/throughput.py --device cuda --envs 1024 4096 16384 65536 --portfolio \
    --profile 16384
exit $status
