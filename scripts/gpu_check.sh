#!/usr/bin/env bash
# The checks that need a CUDA device (CI has none), for a machine with torch and transformers installed and no
# network. Run from the repository root: scripts/gpu_check.sh STEP, where STEP is one of
#   tests  the CUDA tests (tests/test_cuda.py) and the parity and generation tests on this machine's torch
#   560m   decode speed of the bloom-560m shape, batch 1 and batch 16, ours compiled vs transformers
#   7b1    decode speed of the bloom-7b1 shape, ours bf16 and int8 compiled vs transformers (~15 GB of disk)
# Each step is meant to fit in one 10-minute device call (one fresh process per implementation: GPU timings are steadier
# than the CPU's); the benchmark tables are what the README's GPU table is to be made of.
set -euo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
bench() { python3 -m bloom bench --device cuda --compile --runs 1 --reps 3 "$@"; }
case "${1:-}" in
  tests) python3 -m pytest -q -rs tests/test_cuda.py tests/test_parity.py tests/test_generate.py ;;
  560m) bench --shape bloom-560m && bench --shape bloom-560m --batch-size 16 ;;
  7b1) bench --shape bloom-7b1 --quantize int8 ;;
  *) echo "usage: scripts/gpu_check.sh tests|560m|7b1" >&2; exit 2 ;;
esac
