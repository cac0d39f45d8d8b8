#!/usr/bin/env bash
# The one command to run on a lent GPU machine (no Ray, no network there), from the repository root:
#   device run, carry [".whl"]:  COMMIT=<sha> bash bench/device_check.sh
# .whl/ holds what that machine lacks, downloaded here for its Python 3.12 (README.md, "On a GPU"): pydantic
# and its parts, transformers (this project needs >= 5.20; that image has 5.17) with the huggingface_hub it needs
# (and that one's httpx2, httpcore2, truststore, tomlkit, hf_xet, click, regex), bitsandbytes (int8 / int4; its
# wheel less the CUDA 11/12, ROCm and XPU libraries, to fit the 64 MiB a call carries) and this project's wheel.
# Writes device-check.{json,md} and the log to $OUT (the device tool brings them back), else to bench/results.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# this tree as a package: from a wheel built here (pip wheel --no-deps -w .whl .) where one was carried, else built
# there (which needs that machine's setuptools to be >= 77)
if ! ls .whl/blip2_serve-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site .
fi
# run from elsewhere, the installed package first: from the checkout's root, its blip2_serve/ (the SDK's __init__
# alone; pyproject maps the subpackages) would be found first and hide the installed package's subpackages
repo="$PWD"
out="$(realpath "${OUT:-bench/results}")"
export PYTHONPATH="/tmp/site:$repo" PYTHONUNBUFFERED=1
# transformers kernelizes layers from the Hub by default (use_kernels): no network there, no remote code here
export USE_HUB_KERNELS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device-check-gpu.txt" || true
cd /tmp
# LOG names the log where one call runs this more than once (another --dtype, --compile)
python3 -m bench.device_check --commit "${COMMIT:-unknown}" --out "$out" "$@" 2>&1 | tee "$out/${LOG:-device-check}.log"
