"""rlprims.data: datasets in verl's parquet schemas, the embedded synthetic task, and the sampler.

A prompt row: {"data_source": str, "prompt": [{"role", "content"}, ...], "ability": str,
"reward_model": {"style": str, "ground_truth": str}, "extra_info": {"split": str, "index": int, ...}}.
Rows that offer tools name them in extra_info["tools"] (or verl's extra_info["tools_kwargs"]).
SFT rows: {"prompt", "response"} or {"messages"}; preference rows: {"prompt", "chosen", "rejected"}.
See docs/data.md.
"""

from rlprims.data.arithmetic import (
    arithmetic_preference_rows,
    arithmetic_problems,
    arithmetic_rows,
    arithmetic_sft_rows,
    worked_answer,
)
from rlprims.data.chat import chat_prompt_ids
from rlprims.data.gsm8k import convert_gsm8k, gsm8k_rows
from rlprims.data.prompts import PromptSets, rl_prompt_sets
from rlprims.data.preference import (
    PreferenceTokens,
    preference_tokens,
    read_preference_parquet,
    validate_preference_rows,
    write_preference_parquet,
)
from rlprims.data.sampler import SamplerState, epoch_permutation, next_indices, sampler_init
from rlprims.data.sft import SFTTokens, read_sft_parquet, sft_tokens, validate_sft_rows, write_sft_parquet
from rlprims.data.tool_tasks import calculator_demo, multiplication_rows, row_tool_names, tool_prompt_ids
from rlprims.data.verl_parquet import read_verl_parquet, validate_rows, write_verl_parquet

__all__ = [
    "PromptSets",
    "rl_prompt_sets",
    "PreferenceTokens",
    "SFTTokens",
    "SamplerState",
    "arithmetic_preference_rows",
    "arithmetic_problems",
    "arithmetic_rows",
    "arithmetic_sft_rows",
    "calculator_demo",
    "chat_prompt_ids",
    "convert_gsm8k",
    "epoch_permutation",
    "gsm8k_rows",
    "multiplication_rows",
    "next_indices",
    "preference_tokens",
    "read_preference_parquet",
    "read_sft_parquet",
    "read_verl_parquet",
    "row_tool_names",
    "sampler_init",
    "sft_tokens",
    "tool_prompt_ids",
    "validate_preference_rows",
    "validate_rows",
    "validate_sft_rows",
    "worked_answer",
    "write_preference_parquet",
    "write_sft_parquet",
    "write_verl_parquet",
]
