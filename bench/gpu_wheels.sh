#!/usr/bin/env bash
# Fetch, here, the wheels that bench/gpu_check.py needs on the device machine: its image has
# Python 3.12 with torch and an older transformers, no pydantic, and no internet. The versions
# are the ones in this checkout's .venv. Then, with the device tool (carry [".whl"]):
#   bash bench/gpu_check_device.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NAMES=(transformers huggingface_hub httpx2 httpcore2 h2 hpack hyperframe sniffio truststore
  pydantic pydantic_core annotated-types typing-inspection typing_extensions regex dill
  diffusers importlib_metadata zipp)  # diffusers: the images part of the GPU check
SPECS=()
for name in "${NAMES[@]}"; do
  SPECS+=("$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${SPECS[@]}"
ls -1 .whl && du -sh .whl
