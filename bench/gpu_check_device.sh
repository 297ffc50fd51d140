#!/usr/bin/env bash
# On the device machine (see bench/gpu_wheels.sh): install the carried wheels beside the
# image's torch, then run the GPU check, writing $OUT/gpu_check.json. Extra arguments go to
# bench/gpu_check.py (e.g. `--parts images --image-shape sd15`). Its `images` part (issue 17)
# needs the diffusers wheel (with importlib_metadata and zipp) among the carried ones; without
# it that part reports the missing wheel and the other parts still run. Its `batched` part
# (issue 17) times validate_records with batch_items 1, 8, 16, 32 on 32 items of the
# BLIP-2-OPT-2.7B shape (about a minute); `--parts batched` runs it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 570 python3 bench/gpu_check.py --json "${OUT:-/tmp}/gpu_check.json" "$@"
