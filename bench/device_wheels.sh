#!/usr/bin/env bash
# Wheels that bench/train.py needs on a device machine (GPU, no network), which has torch and
# transformers but not DeepSpeed. Writes them to .whl/ (git-ignored); carry that folder:
#   bash bench/device_wheels.sh
#   device run, carry [".whl"]:
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#       && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/train.py --model-size 1b --zero-stage 2
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
# DeepSpeed ships only an sdist; built here without its ops it is a pure-Python wheel.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
ls -l .whl
echo "wheels_mb=$(du -sm .whl | cut -f1)"
