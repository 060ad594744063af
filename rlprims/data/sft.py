"""SFT rows in verl's SFT parquet layout, and their tokenization with a loss mask over the response.

Two row forms (verl's SFTDataset / MultiTurnSFTDataset):
  single turn  {"prompt": str or chat messages, "response": str, ...}   (verl: prompt_key / response_key)
  multi turn   {"messages": [{"role", "content"}, ...], ...}            (verl: multiturn.messages_key)
Other columns (data_source, extra_info) are kept and ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from rlprims.data.verl_parquet import check_messages, check_text, read_parquet_rows, write_parquet_rows


class SFTTokens(NamedTuple):
    """Token ids of one conversation and a same-length mask, True on the tokens the loss trains on.

    The mask is over `input_ids` themselves (not shifted): position t is True when token t belongs to
    a response, so the loss on predicting input_ids[t] from input_ids[:t] counts. The first token is
    never a response token, so a trainer shifts with `input_ids[1:]` and `loss_mask[1:]`.
    """

    input_ids: list[int]
    loss_mask: list[bool]


def validate_sft_rows(rows: list[dict[str, Any]], *, source: str = "rows") -> list[dict[str, Any]]:
    """Checks every row is one SFT form; ValueError names `source`, the row and the column.

    Single turn: prompt is a non-empty str or chat messages, response a non-empty str. Multi turn:
    messages is a list of chat messages holding at least one "assistant" message, not the first.
    """
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: row {i} must be a dict, got {type(row).__name__}")
        if row.get("messages") is not None:
            check_messages(row["messages"], source=source, row=i, column="messages")
            roles = [m["role"] for m in row["messages"]]
            if "assistant" not in roles[1:]:
                raise ValueError(f"{source}: row {i} messages needs an assistant message after the first "
                                 f"message (the turns trained on), got roles {roles}")
            continue
        for column in ("prompt", "response"):
            if row.get(column) is None:
                raise ValueError(f"{source}: row {i} lacks column {column!r} (or a 'messages' column); "
                                 f"has {sorted(row)}")
        if isinstance(row["prompt"], list):
            check_messages(row["prompt"], source=source, row=i, column="prompt")
        else:
            check_text(row["prompt"], source=source, row=i, column="prompt")
        check_text(row["response"], source=source, row=i, column="response")
    return rows


def read_sft_parquet(path: str | Path) -> list[dict[str, Any]]:
    """SFT rows of a parquet file, validated: a `messages` column, else `prompt` and `response`."""
    rows = read_parquet_rows(path, columns=())
    names = sorted(rows[0])
    if "messages" not in names:
        missing = [c for c in ("prompt", "response") if c not in names]
        if missing:
            raise ValueError(f"{path}: every row lacks column(s) {missing} (and there is no 'messages' "
                             f"column); the file has {names}")
    return validate_sft_rows(rows, source=str(path))


def write_sft_parquet(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Validates and writes SFT rows (atomically)."""
    return write_parquet_rows(validate_sft_rows(rows), path)


def _template(tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def sft_tokens(tokenizer: Any, row: dict[str, Any]) -> SFTTokens:
    """Tokenizes one SFT row with the tokenizer's chat template; the loss mask covers the responses.

    Single turn (verl's SFTDataset): ids(template(prompt, add_generation_prompt=True)) followed by
    ids(response + eos_token); a str prompt is one user message. Mask: False on the prompt, True on
    the response and its eos.
    Multi turn: the conversation is rendered turn by turn; for each assistant message the text between
    template(messages[:k], add_generation_prompt=True) and template(messages[:k+1]) (its content and the
    template's end-of-turn tokens) is masked True, everything else (system, user, the assistant header)
    False. Needs a template that renders each conversation as a prefix of its continuation; one that
    rewrites earlier turns raises ValueError. Each piece is tokenized on its own (as verl does), so ids
    can differ from tokenizing the whole text at a piece boundary.
    Rows longer than the model's context are kept: filter on len(input_ids), as `chat_prompt_ids` does.
    """
    validate_sft_rows([row])
    if row.get("messages") is None:
        eos = getattr(tokenizer, "eos_token", None)
        if not eos:
            raise ValueError("tokenizer has no eos_token: the response needs one to end on")
        prompt = row["prompt"]
        if not isinstance(prompt, list):
            prompt = [{"role": "user", "content": prompt}]
        prompt_ids = _ids(tokenizer, _template(tokenizer, prompt, add_generation_prompt=True))
        response_ids = _ids(tokenizer, row["response"] + eos)
        return SFTTokens(prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids))
    messages = row["messages"]
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            header = _template(tokenizer, messages[:k], add_generation_prompt=True)
            _check_prefix(done, header, k)
            pieces.append((header[len(done):], False))
            done = header
        full = _template(tokenizer, messages[: k + 1], add_generation_prompt=False)
        _check_prefix(done, full, k)
        pieces.append((full[len(done):], message["role"] == "assistant"))
        done = full
    input_ids: list[int] = []
    loss_mask: list[bool] = []
    for text, trained in pieces:
        ids = _ids(tokenizer, text)
        input_ids += ids
        loss_mask += [trained] * len(ids)
    return SFTTokens(input_ids, loss_mask)


def _check_prefix(prefix: str, text: str, k: int) -> None:
    if not text.startswith(prefix):
        raise ValueError(f"the chat template renders messages[:{k + 1}] without the earlier turns as a "
                         "prefix "
                         "(it rewrites earlier turns); loss masks need prefix-stable rendering: use "
                         "prompt/response rows for this template")
