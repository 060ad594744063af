"""Prompt rows (verl schema) to token ids through the model's chat template."""

from __future__ import annotations

from typing import Any


def chat_prompt_ids(
    tokenizer: Any, rows: list[dict[str, Any]], *, max_len: int
) -> list[tuple[list[int], dict[str, Any]]]:
    """(prompt token ids, row) for each row whose chat-templated prompt fits in `max_len` tokens.

    The prompt is `tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)`, tokenized
    without extra special tokens (the template already holds them). Longer prompts are dropped, as
    verl's `filter_overlong_prompts` does: compare the lengths to count them. Order is kept.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    kept = []
    for row in rows:
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_len:
            kept.append((list(ids), row))
    return kept
