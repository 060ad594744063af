"""The rollout result shared by every generator, and the checks on its input.

Layout (the one `rlprims.ops` expects): prompt i's `n` samples are the contiguous rows
`i*n, ..., i*n + n - 1`. Prompts are left-padded and responses right-padded, so that
`torch.cat([prompt_ids, response_ids], 1)` puts every row's last prompt token in column `P - 1` and its
first response token in column `P` (the logits at `[:, P-1:-1]` score the response). The masks are the
only source of truth: the pad id is arbitrary and values under a False mask mean nothing.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "RolloutBatch",
    "FINISH_STOP",
    "FINISH_LENGTH",
    "check_prompts",
    "check_sampling",
    "check_token_ids",
    "pack_rollout",
    "empty_rollout",
    "RolloutSequences",
    "rollout_sequences",
    "decode_responses",
    "decode_prompts",
]

# finish_reasons codes. STOP: the last response token is EOS or one of `stop_token_ids` (that token is
# part of the response, mask True). LENGTH: `max_tokens` was reached, or the sequence reached the
# engine's `max_model_len` (prompt + response); the response was cut, not finished.
FINISH_STOP = 0
FINISH_LENGTH = 1


class RolloutBatch(NamedTuple):
    """Padded rollout tensors, B = num_prompts * n rows (prompt i's samples are rows i*n .. i*n+n-1).

    Shapes: prompt_ids, prompt_mask [B, P]; response_ids, response_mask, rollout_logprobs [B, R];
    finish_reasons, prompt_lengths, response_lengths [B]. P is the longest prompt, R the longest
    response (both 0 when B = 0).
    """

    prompt_ids: Tensor  # [B, P] int64, left-padded with pad_token_id
    prompt_mask: Tensor  # [B, P] bool, True on prompt tokens
    response_ids: Tensor  # [B, R] int64, right-padded with pad_token_id
    response_mask: Tensor  # [B, R] bool, True on generated tokens (EOS / stop token included)
    rollout_logprobs: Tensor  # [B, R] float32, log-prob of each sampled token under the engine; 0 on padding
    finish_reasons: Tensor  # [B] int64, FINISH_STOP or FINISH_LENGTH
    prompt_lengths: Tensor  # [B] int64
    response_lengths: Tensor  # [B] int64, = response_mask.sum(1)

    def to(self, device: torch.device | str) -> RolloutBatch:
        """The same batch with every tensor on `device` (`generate` returns it on the CPU)."""
        return type(self)(*(t.to(device) for t in self))


def check_prompts(prompt_ids: object, *, vocab_size: int, max_model_len: int) -> list[list[int]]:
    """Validates prompt token ids and returns them as lists of Python ints.

    Accepts a sequence of token-id sequences (lists of ints, 1-D integer tensors or numpy arrays).
    Every prompt must be non-empty, hold ids in [0, vocab_size), and be shorter than max_model_len (at
    least one response token must fit). Errors name the offending prompt indices; nothing is truncated.
    """
    if isinstance(prompt_ids, (Tensor, str, bytes)) or not isinstance(prompt_ids, Sequence):
        raise ValueError(
            "prompt_ids must be a sequence of prompts, each a list of token ids or a 1-D integer tensor, "
            f"got {type(prompt_ids).__name__}"
            + (f" of shape {tuple(prompt_ids.shape)}" if isinstance(prompt_ids, Tensor) else "")
            + "; for a padded [B, T] tensor pass [row[mask] for row, mask in zip(ids, attention_mask)]"
        )
    prompts: list[list[int]] = []
    too_long: list[str] = []
    for i, p in enumerate(prompt_ids):
        if isinstance(p, Tensor):
            if p.dim() != 1 or p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
                raise ValueError(
                    f"prompt_ids[{i}] must be a 1-D integer tensor, "
                    f"got shape {tuple(p.shape)}, dtype {p.dtype}"
                )
            ids = [int(x) for x in p.tolist()]
        elif (isinstance(p, Sequence) and not isinstance(p, (str, bytes))) or _is_1d_array(p):
            ids = []
            for x in p.tolist() if _is_1d_array(p) else p:
                try:
                    if isinstance(x, bool):
                        raise TypeError
                    ids.append(operator.index(x))
                except TypeError:
                    raise ValueError(f"prompt_ids[{i}] must hold integer token ids, found {x!r}") from None
        else:
            raise ValueError(
                f"prompt_ids[{i}] must be a list of token ids or a 1-D tensor, got {type(p).__name__}"
            )
        if not ids:
            raise ValueError(f"prompt_ids[{i}] is empty; every prompt needs at least one token")
        bad = [x for x in ids if not 0 <= x < vocab_size]
        if bad:
            raise ValueError(f"prompt_ids[{i}] has token ids outside [0, {vocab_size}): {bad[:5]}")
        if len(ids) >= max_model_len:
            too_long.append(f"prompt_ids[{i}] has {len(ids)} tokens")
        prompts.append(ids)
    if too_long:
        shown = "; ".join(too_long[:10]) + (f"; ... ({len(too_long)} in all)" if len(too_long) > 10 else "")
        raise ValueError(
            f"{shown}: a prompt must be shorter than max_model_len={max_model_len} so that at least one "
            "response token fits; truncate or filter these prompts, or raise max_model_len"
        )
    return prompts


def _is_1d_array(p: object) -> bool:
    # numpy (or array-like) rows: 1-D, with tolist()
    return not isinstance(p, Tensor) and getattr(p, "ndim", None) == 1 and hasattr(p, "tolist")


def empty_rollout() -> RolloutBatch:
    """The result for an empty prompt list: B = 0, P = R = 0."""
    ids = torch.zeros(0, 0, dtype=torch.long)
    mask = torch.zeros(0, 0, dtype=torch.bool)
    vec = torch.zeros(0, dtype=torch.long)
    return RolloutBatch(
        ids, mask, ids.clone(), mask.clone(), torch.zeros(0, 0), vec, vec.clone(), vec.clone()
    )


def pack_rollout(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[float]],
    finish_reasons: Sequence[int],
    *,
    n: int,
    pad_token_id: int,
) -> RolloutBatch:
    """Pads per-row Python lists into a RolloutBatch. Row r belongs to prompt r // n."""
    b = len(responses)
    if b != len(prompts) * n or len(logprobs) != b or len(finish_reasons) != b:
        raise ValueError(
            f"pack_rollout: {len(prompts)} prompts x n={n} needs {len(prompts) * n} rows, got "
            f"{b} responses, {len(logprobs)} logprob rows, {len(finish_reasons)} finish reasons"
        )
    if b == 0:
        return empty_rollout()
    p_len = torch.tensor([len(prompts[r // n]) for r in range(b)], dtype=torch.long)
    r_len = torch.tensor([len(x) for x in responses], dtype=torch.long)
    p_max, r_max = int(p_len.max()), int(r_len.max())
    prompt_ids = torch.full((b, p_max), pad_token_id, dtype=torch.long)
    response_ids = torch.full((b, r_max), pad_token_id, dtype=torch.long)
    rollout_logprobs = torch.zeros(b, r_max, dtype=torch.float32)
    for r in range(b):
        p = prompts[r // n]
        if p:
            prompt_ids[r, p_max - len(p) :] = torch.tensor(p, dtype=torch.long)
        if len(responses[r]) != len(logprobs[r]):
            raise ValueError(f"row {r}: {len(responses[r])} response tokens but {len(logprobs[r])} logprobs")
        if responses[r]:
            response_ids[r, : len(responses[r])] = torch.tensor(list(responses[r]), dtype=torch.long)
            rollout_logprobs[r, : len(responses[r])] = torch.tensor(list(logprobs[r]), dtype=torch.float32)
    cols_p = torch.arange(p_max)
    cols_r = torch.arange(r_max)
    prompt_mask = cols_p[None, :] >= (p_max - p_len)[:, None]
    response_mask = cols_r[None, :] < r_len[:, None]
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        rollout_logprobs=rollout_logprobs,
        finish_reasons=torch.tensor(list(finish_reasons), dtype=torch.long),
        prompt_lengths=p_len,
        response_lengths=r_len,
    )


def check_sampling(*, n: int, temperature: float, max_tokens: int, top_p: float, top_k: int | None) -> None:
    """Sampling options shared by the generators: n, max_tokens >= 1; temperature >= 0 (0 needs n = 1);
    top_p in (0, 1]; top_k None or >= 1."""
    for name, value in (("n", n), ("max_tokens", max_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if temperature == 0 and n != 1:
        raise ValueError(f"temperature=0 (greedy) needs n=1 (n={n} would repeat one sample; vLLM refuses it)")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None (off) or a positive int, got {top_k!r}")


def check_token_ids(name: str, ids: Sequence[int]) -> list[int]:
    """A sequence of non-negative int token ids (e.g. stop_token_ids), as a list."""
    if isinstance(ids, (str, bytes, Tensor)) or not isinstance(ids, Sequence):
        raise ValueError(f"{name} must be a sequence of ints, got {type(ids).__name__}")
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in ids):
        raise ValueError(f"{name} must hold non-negative ints, got {list(ids)!r}")
    return [int(x) for x in ids]


class RolloutSequences(NamedTuple):
    """Prompt and response side by side, the layout a trainer's forward takes.

    Shapes: input_ids, attention_mask, response_mask [B, P + R]; response_mask is True on the response
    tokens only, so `logprobs[:, P:]` of a forward over these rows lines up with the batch's response_*.
    """

    input_ids: Tensor  # [B, P+R] int64
    attention_mask: Tensor  # [B, P+R] bool, prompt or response token
    response_mask: Tensor  # [B, P+R] bool, response token


def rollout_sequences(batch: RolloutBatch) -> RolloutSequences:
    """`torch.cat([prompt, response], 1)` of the ids and masks (every row's response starts at column P).

    Shapes: RolloutBatch with prompts [B, P] and responses [B, R] -> RolloutSequences of [B, P + R].
    """
    return RolloutSequences(
        input_ids=torch.cat([batch.prompt_ids, batch.response_ids], 1),
        attention_mask=torch.cat([batch.prompt_mask, batch.response_mask], 1),
        response_mask=torch.cat([torch.zeros_like(batch.prompt_mask), batch.response_mask], 1),
    )


def decode_responses(tokenizer, batch: RolloutBatch, *, skip_special_tokens: bool = True) -> list[str]:
    """The text of each row's response tokens (padding excluded), for reward functions.

    An empty batch (B = 0: a rank without prompts) gives [] (tokenizers decode an empty list as one
    empty text, so it is not passed to them).
    Shapes: RolloutBatch with B rows -> B strings.
    """
    ids = [row[:n] for row, n in zip(batch.response_ids.tolist(), batch.response_lengths.tolist())]
    return tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens) if ids else []


def decode_prompts(tokenizer, batch: RolloutBatch, *, skip_special_tokens: bool = False) -> list[str]:
    """The text of each row's prompt tokens (padding excluded; chat-template tokens kept by default), e.g.
    for `rlprims.metrics.log_generations`. Row r is prompt r // n, so a prompt repeats n times.

    An empty batch gives []. Shapes: RolloutBatch with B rows -> B strings.
    """
    p = batch.prompt_ids.shape[1]
    ids = [row[p - n :] for row, n in zip(batch.prompt_ids.tolist(), batch.prompt_lengths.tolist())]
    return tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens) if ids else []
