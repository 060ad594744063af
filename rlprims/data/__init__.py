"""rlprims.data: prompt datasets in verl's parquet schema, and the embedded synthetic task.

A row: {"data_source": str, "prompt": [{"role", "content"}, ...], "ability": str,
"reward_model": {"style": str, "ground_truth": str}, "extra_info": {"split": str, "index": int, ...}}.
"""

from rlprims.data.arithmetic import arithmetic_rows
from rlprims.data.chat import chat_prompt_ids
from rlprims.data.verl_parquet import read_verl_parquet, validate_rows, write_verl_parquet

__all__ = ["arithmetic_rows", "chat_prompt_ids", "read_verl_parquet", "validate_rows", "write_verl_parquet"]
