#!/usr/bin/env bash
# The one command to run on a lent GPU machine (no Ray, no network there), from the repository root:
#   device run, carry [".whl"]:  COMMIT=<sha> bash bench/device_check.sh
# .whl/ holds what that machine lacks, downloaded here for its Python 3.12 (README.md, "On a GPU"): pydantic
# and its parts, transformers (this project needs >= 5.20; that image has 5.17) and bitsandbytes (int8 / int4).
# Writes device-check.{json,md} and the log to $OUT (the device tool brings them back), else to bench/results.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site .
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
out="${OUT:-bench/results}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device-check-gpu.txt" || true
python3 -m bench.device_check --commit "${COMMIT:-unknown}" --out "$out" "$@" 2>&1 | tee "$out/device-check.log"
