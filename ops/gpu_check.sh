#!/usr/bin/env bash
# The GPU checks, as one script for a lent device machine (see the README's "GPU checks"):
#   bash ops/gpu_check.sh            results (logs, JUnit XML, bench tables) under $OUT (default ./gpu-out)
# It runs `pytest -m gpu` (CUDA kernels, the sglang engine and the dialects on SGLang, the fsdp
# and megatron backends' gradient equivalence on NCCL), the serving benches on CUDA and the tree
# packing bench at the issue's full shape. The device machine reaches no network: vLLM and SGLang
# must already be in venvs there (ARBORL_VLLM_PYTHON, ARBORL_SGLANG_PYTHON); whatever is missing
# is skipped and said in $OUT/summary.txt. Each step is bounded (300 + 120 + 150 s), so the script ends inside one
# device command (600 s).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
summary="$OUT/summary.txt"
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }

say "device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$summary"
for engine in VLLM SGLANG; do
    var="ARBORL_${engine}_PYTHON"
    say "$var=${!var:-unset} $([ -x "${!var:-/nonexistent}" ] && echo present || echo 'absent: its tests skip')"
done

timeout 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" tests \
    > "$OUT/gpu-tests.log" 2>&1
say "pytest -m gpu: exit $? ($(tail -1 "$OUT/gpu-tests.log"))"

if [ -x "${ARBORL_VLLM_PYTHON:-/nonexistent}" ]; then
    timeout 120 "$PY" tests/bench/bench_vllm_engine.py --dtype auto --rounds 2 > "$OUT/bench_vllm_engine.txt" 2>&1
    say "bench_vllm_engine: exit $?"
fi
timeout 150 "$PY" tests/bench/bench_tree_packing.py --scale 1 --budget 16384 --device cuda \
    > "$OUT/bench_tree_packing.txt" 2>&1
say "bench_tree_packing (full shape, cuda): exit $?"
say "done; files in $OUT"
