#!/usr/bin/env bash
# The CUDA path on a GPU machine, in one go: the CUDA tests, gptoss vs transformers on the GPU (same weights:
# greedy tokens and logits in fp32, decode speed in bf16), and the 20b-shaped checkpoint's decode/prefill.
#   bash benchmarks/run_cuda.sh [results-dir]        # results: env.txt, pytest.txt, transformers.txt, decode20b.json
# Runs from a source tree (PYTHONPATH=src), so that a GPU image's own torch is used as it is.
set -uo pipefail
OUT=${1:-${OUT:-cuda-results}}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  lscpu | grep -E "^Model name|^CPU\(s\)"; } 2>&1 | tee "$OUT/env.txt"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest.txt"
timeout 180 python3 benchmarks/bench_transformers.py --device cuda --layers 4 --tokens 32 --prompt 128 \
    2>&1 | grep -v -i warn | tee "$OUT/transformers.txt"
timeout 200 python3 benchmarks/make_checkpoint.py --preset gpt-oss-20b /tmp/gptoss-20b 2>&1 | tail -2
for experts in dense mxfp4; do  # the default on a GPU with room, and what smaller GPUs run
  timeout 150 python3 benchmarks/bench_decode.py /tmp/gptoss-20b --device cuda --experts $experts --contexts 128 4096 \
      --steps 32 --prefill 128 2048 --json "$OUT/decode20b-$experts.json" 2>&1 | grep -E '^\{"(context|length)'
done
