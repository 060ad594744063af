"""The prompts of an RL run: training and validation sets, from verl parquet or the embedded task."""

from __future__ import annotations

from typing import Any, NamedTuple

from rlprims.data.arithmetic import arithmetic_rows
from rlprims.data.chat import chat_prompt_ids
from rlprims.data.verl_parquet import read_verl_parquet

__all__ = ["PromptSets", "rl_prompt_sets"]

Prompts = list[tuple[list[int], dict[str, Any]]]


class PromptSets(NamedTuple):
    """(token ids, verl row) pairs that fit the prompt length, and how many rows were read."""

    train: Prompts
    val: Prompts
    train_rows: int
    val_rows: int

    def summary(self, max_prompt_len: int) -> str:
        """One console line: how many prompts of each set fit (verl's filter_overlong_prompts)."""
        return (f"{len(self.train)} of {self.train_rows} training and {len(self.val)} of {self.val_rows} "
                f"validation prompts fit {max_prompt_len} tokens")


def rl_prompt_sets(
    tokenizer: Any,
    *,
    train_files: str,
    val_files: str,
    val_prompts: int,
    max_prompt_len: int,
    max_operand: int,
    train_size: int = 4096,
) -> PromptSets:
    """The training and validation prompts every RL recipe starts from, chat-templated and length-filtered.

    train_files / val_files: verl-schema parquet (comma-separated for several files); empty = the
    embedded arithmetic task (`arithmetic_rows`: `train_size` rows with seed 0, `val_prompts` test rows
    with seed 1, operands in [0, max_operand]). Validation keeps the first `val_prompts` rows (0 = none).
    Prompts longer than `max_prompt_len` tokens are dropped (`chat_prompt_ids`).
    Raises ValueError naming the files when no training prompt fits, before any step runs.
    """
    rows = _read(train_files) if train_files else arithmetic_rows(train_size, seed=0, max_operand=max_operand)
    val_rows = (_read(val_files) if val_files
                else arithmetic_rows(val_prompts, seed=1, max_operand=max_operand, split="test"))
    val_rows = val_rows[:val_prompts]
    train = chat_prompt_ids(tokenizer, rows, max_len=max_prompt_len)
    val = chat_prompt_ids(tokenizer, val_rows, max_len=max_prompt_len)
    if not train:
        source = train_files or "the embedded arithmetic task"
        raise ValueError(f"none of the {len(rows)} training prompts of {source} fits max_prompt_len="
                         f"{max_prompt_len} tokens (after the chat template); raise --max-prompt-len")
    return PromptSets(train, val, len(rows), len(val_rows))


def _read(files: str) -> list[dict[str, Any]]:
    return [row for f in files.split(",") if f.strip() for row in read_verl_parquet(f.strip())]
