"""Preference rows (prompt, chosen, rejected) for Bradley-Terry reward-model training (verl's RMDataset)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from rlprims.data.sft import SFTTokens, sft_tokens
from rlprims.data.verl_parquet import check_messages, check_text, read_parquet_rows, write_parquet_rows

COLUMNS = ("prompt", "chosen", "rejected")


class PreferenceTokens(NamedTuple):
    """The tokenized prompt + chosen and prompt + rejected conversations (see `sft_tokens`)."""

    chosen: SFTTokens
    rejected: SFTTokens


def validate_preference_rows(rows: list[dict[str, Any]], *, source: str = "rows") -> list[dict[str, Any]]:
    """Checks prompt (non-empty str or chat messages), chosen and rejected (non-empty str) in every row;
    ValueError names `source`, the row and the column.
    """
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: row {i} must be a dict, got {type(row).__name__}")
        missing = [c for c in COLUMNS if row.get(c) is None]
        if missing:
            raise ValueError(f"{source}: row {i} lacks column(s) {missing}; has {sorted(row)}")
        if isinstance(row["prompt"], list):
            check_messages(row["prompt"], source=source, row=i, column="prompt")
        else:
            check_text(row["prompt"], source=source, row=i, column="prompt")
        check_text(row["chosen"], source=source, row=i, column="chosen")
        check_text(row["rejected"], source=source, row=i, column="rejected")
    return rows


def read_preference_parquet(path: str | Path) -> list[dict[str, Any]]:
    """Preference rows of a parquet file (columns prompt, chosen, rejected), validated."""
    return validate_preference_rows(read_parquet_rows(path, columns=COLUMNS), source=str(path))


def write_preference_parquet(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Validates and writes preference rows (atomically)."""
    return write_parquet_rows(validate_preference_rows(rows), path)


def preference_tokens(tokenizer: Any, row: dict[str, Any]) -> PreferenceTokens:
    """`sft_tokens` of (prompt, chosen) and of (prompt, rejected): the prompt through the chat template,
    each response followed by eos. A reward model scores the last token of each (its eos).
    Differs from verl's RMDataset, which tokenizes the raw prompt string without a chat template.
    """
    validate_preference_rows([row])
    return PreferenceTokens(
        chosen=sft_tokens(tokenizer, {"prompt": row["prompt"], "response": row["chosen"]}),
        rejected=sft_tokens(tokenizer, {"prompt": row["prompt"], "response": row["rejected"]}),
    )
