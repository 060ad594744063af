"""Pure-PyTorch generation with a KV cache over a Hugging Face causal LM, with `generate`'s interface.

For machines without vLLM, and as the reference vLLM is tested against. One batched forward per token:
the prompts (each repeated n times) are left-padded into one batch, prefilled once, then decoded with
the model's KV cache (`past_key_values`). It is slow next to vLLM (no paged attention, no continuous
batching, finished rows still ride along until the whole batch ends) but exact: in fp32 its greedy
tokens and log-probs match vLLM's on the same weights (tests/rollout/test_fallback.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from rlprims.rollout.batch import (
    FINISH_LENGTH,
    FINISH_STOP,
    RolloutBatch,
    check_prompts,
    check_sampling,
    check_token_ids,
    empty_rollout,
    pack_rollout,
)

__all__ = ["generate_hf", "processed_logprobs"]


def processed_logprobs(logits: Tensor, *, temperature: float, top_k: int | None, top_p: float) -> Tensor:
    """Log-probs of the distribution a token is sampled from: temperature, then top-k, then top-p.

    temperature = 0 (greedy): log_softmax(logits), no masking (vLLM's convention for greedy requests).
    Otherwise z = logits / temperature; tokens outside the k largest z get -inf; then, in order of
    decreasing probability, a token is kept while the probability mass strictly before it is < top_p
    (so the most likely token is always kept); returns log_softmax over the kept tokens.
    Matches vLLM's logprobs_mode="processed_logprobs" (its sampler applies the same steps in this order).
    Shapes: logits [B, V] -> [B, V] float32 (-inf on masked tokens).
    """
    z = logits.float()
    if temperature == 0:
        return torch.log_softmax(z, dim=-1)
    z = z / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = torch.where(z < kth, torch.full_like(z, float("-inf")), z)
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = torch.where(drop, torch.full_like(z, float("-inf")), z)
    return torch.log_softmax(z, dim=-1)


@torch.no_grad()
def generate_hf(
    model: Any,
    prompt_ids: Sequence[Sequence[int] | Tensor],
    *,
    n: int,
    temperature: float,
    max_tokens: int,
    top_p: float = 1.0,
    top_k: int | None = None,
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    seed: int | None = None,
    max_model_len: int | None = None,
    pad_token_id: int = 0,
    progress: bool = False,
) -> RolloutBatch:
    """Samples n responses per prompt from an HF causal LM with a KV cache; same result as `generate`.

    Same arguments, layout and finish rules as `rlprims.rollout.generate` (rows i*n .. i*n + n - 1 are
    prompt i's samples; EOS / stop token kept with FINISH_STOP; FINISH_LENGTH at max_tokens or at
    max_model_len). rollout_logprobs are `processed_logprobs` of the sampled tokens, i.e. vLLM's
    default logprobs_mode. EOS ids come from model.generation_config (else model.config).

    model: a `transformers` causal LM (anything whose forward takes input_ids, attention_mask,
      position_ids, past_key_values, use_cache and returns .logits and .past_key_values); run in
      eval mode for the call (its mode is restored after), on its own device and dtype.
    seed: None uses the global torch RNG; an int gives row r its own generator seeded seed + r (same
      rule as `generate`; the streams differ from vLLM's, so sampled tokens differ from vLLM's).
    max_model_len: longest prompt + response; default model.config.max_position_embeddings.
    progress: a tqdm bar over the decoding steps (stderr).

    Shapes: see RolloutBatch (B = len(prompt_ids) * n).
    """
    check_sampling(n=n, temperature=temperature, max_tokens=max_tokens, top_p=top_p, top_k=top_k)
    stops = set(check_token_ids("stop_token_ids", stop_token_ids))
    limit_len = max_model_len if max_model_len is not None else int(model.config.max_position_embeddings)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    prompts = check_prompts(prompt_ids, vocab_size=vocab, max_model_len=limit_len)
    if not prompts:
        return empty_rollout()
    if not ignore_eos:
        stops |= _eos_ids(model)

    device = next(model.parameters()).device
    rows = [p for p in prompts for _ in range(n)]
    b = len(rows)
    p_len = torch.tensor([len(p) for p in rows], device=device)
    p_max = int(p_len.max())
    ids = torch.full((b, p_max), pad_token_id, dtype=torch.long, device=device)
    for r, p in enumerate(rows):
        ids[r, p_max - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
    attn = (torch.arange(p_max, device=device)[None, :] >= (p_max - p_len)[:, None]).long()
    positions = (attn.cumsum(1) - 1).clamp(min=0)
    budget = [min(max_tokens, limit_len - len(p)) for p in rows]
    generators = None
    if seed is not None:
        generators = [torch.Generator(device=device).manual_seed(seed + r) for r in range(b)]

    responses: list[list[int]] = [[] for _ in range(b)]
    logprobs: list[list[float]] = [[] for _ in range(b)]
    finish = [FINISH_LENGTH] * b
    alive = [True] * b
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        next_pos = p_len.clone()
        steps = range(max(budget))
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="generate", leave=False, dynamic_ncols=True)
        for _ in steps:
            lp = processed_logprobs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
            tokens = _sample(lp, greedy=temperature == 0, generators=generators)
            tok_lp = lp.gather(1, tokens[:, None])[:, 0]
            tok_list, lp_list = tokens.tolist(), tok_lp.tolist()
            for r in range(b):
                if not alive[r]:
                    continue
                responses[r].append(tok_list[r])
                logprobs[r].append(lp_list[r])
                if tok_list[r] in stops:
                    finish[r], alive[r] = FINISH_STOP, False
                elif len(responses[r]) >= budget[r]:
                    alive[r] = False
            if not any(alive):
                break
            live = torch.tensor(alive, device=device)
            feed = torch.where(live, tokens, torch.full_like(tokens, pad_token_id))
            attn = torch.cat([attn, live[:, None].long()], dim=1)
            out = model(
                input_ids=feed[:, None],
                attention_mask=attn,
                position_ids=next_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            cache, logits = out.past_key_values, out.logits[:, -1]
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    return pack_rollout(prompts, responses, logprobs, finish, n=n, pad_token_id=pad_token_id)


def _sample(lp: Tensor, *, greedy: bool, generators: list[torch.Generator] | None) -> Tensor:
    if greedy:
        return lp.argmax(dim=-1)
    probs = lp.exp()
    if generators is None:
        return torch.multinomial(probs, 1)[:, 0]
    return torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)])


def _eos_ids(model: Any) -> set[int]:
    for cfg in (getattr(model, "generation_config", None), model.config):
        eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        if eos is not None:
            return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
    return set()
