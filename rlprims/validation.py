"""Validation on held-out prompts: verl's `val-core/<data_source>/acc/...` metrics over every rank's prompts.

`validate` splits the prompts across the data-parallel ranks, samples `n` responses per prompt (greedy
for temperature 0), scores them with the recipe's scoring function (a `score_responses` result, whose
"pred" extra, when the reward function returns one, is the vote of maj@n) and returns
`validation_metrics`.
`validation_metrics` is the arithmetic, taken from verl's `process_validation_metrics`
(`verl/trainer/ppo/metric_utils.py`); for prompt i with scores s_i1..s_in:

  mean@n        mean_j s_ij
  best@n/mean   bootstrap mean of max_j over n draws with replacement (1000 draws, numpy RandomState(seed)
                re-seeded per prompt, seed 42: verl's numbers exactly)
  maj@n/mean    the same bootstrap of the score of the most frequent prediction (first sample of it):
                only with `preds` (verl needs the reward's "pred" for it too)

each averaged over the prompts of one data source, and logged as `val-core/<data_source>/acc/<metric>`.
Every prompt is labelled by its own data source. n = 1 gives only mean@1.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from rlprims.parallel.ranks import rollout_seed
from rlprims.rewards import RewardResult
from rlprims.parallel.stats import Group, process_group
from rlprims.rollout import RolloutBatch, generate

__all__ = [
    "ValidationResult", "prompt_validation_metrics", "validation_metrics", "validate", "validation_samples"]

N_BOOTSTRAP = 1000  # verl's bootstrap_metric default


def _bootstrap_mean(values: Sequence[Any], *, n: int, seed: int, reduce: Callable[[list], float]) -> float:
    rng = np.random.RandomState(seed)  # verl: np.random.seed(seed) before each bootstrap, same stream
    draws = [reduce([values[i] for i in rng.choice(len(values), size=n, replace=True)])
             for _ in range(N_BOOTSTRAP)]
    return float(np.mean(draws))


def _majority_score(pairs: list[tuple[Hashable, float]]) -> float:
    counts = Counter(p for p, _ in pairs)
    top = max(counts, key=counts.get)  # first maximal in insertion order, as verl's max(dict, key=...)
    return next(s for p, s in pairs if p == top)


def prompt_validation_metrics(
    scores: Sequence[float], *, preds: Sequence[Hashable] | None = None, seed: int = 42
) -> dict[str, float]:
    """mean@n, and for n > 1 best@n/mean and (with preds) maj@n/mean, of one prompt's n sample scores.

    verl's `process_validation_metrics` for one prompt and the full n (see the module docstring).
    Shapes: n scores (and n preds) -> {metric: float}.
    """
    n = len(scores)
    if n < 1:
        raise ValueError("a prompt needs at least one score")
    out = {f"mean@{n}": float(np.mean(scores))}
    if n > 1:
        out[f"best@{n}/mean"] = _bootstrap_mean(list(scores), n=n, seed=seed, reduce=max)
        if preds is not None:
            if len(preds) != n:
                raise ValueError(f"{len(preds)} preds for {n} scores")
            pairs = list(zip(preds, scores))
            out[f"maj@{n}/mean"] = _bootstrap_mean(pairs, n=n, seed=seed, reduce=_majority_score)
    return out


def validation_metrics(
    scores: Tensor,
    data_sources: Sequence[str],
    *,
    n: int,
    group: Group,
    preds: Sequence[Hashable] | None = None,
    seed: int = 42,
) -> dict[str, float]:
    """`val-core/<data_source>/acc/<metric>`: each prompt's `prompt_validation_metrics`, averaged over the
    prompts of each data source on every rank of `group` (one all_gather_object; a rank may hold none).
    Also `val-aux/<data_source>/acc/mean@n/stderr`, the standard error of mean@n over the prompts
    (std with ddof=1 / sqrt(P); NaN for one prompt), and `val-aux/<data_source>/num_prompts`.

    Rows i·n .. i·n + n − 1 of `scores` (and `preds`) are prompt i's samples; data_sources[i] its source.
    Equals the single-process result on all ranks' prompts together (tested).
    Shapes: scores [P·n] float, data_sources P strings, preds P·n hashables or None -> {name: float}.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    values = [float(x) for x in scores.tolist()]
    if len(values) != len(data_sources) * n:
        raise ValueError(f"{len(values)} scores for {len(data_sources)} prompts x n={n}")
    if preds is not None and len(preds) != len(values):
        raise ValueError(f"{len(preds)} preds for {len(values)} scores")
    mine = [(src, prompt_validation_metrics(values[i * n : (i + 1) * n], seed=seed,
                                            preds=None if preds is None else preds[i * n : (i + 1) * n]))
            for i, src in enumerate(data_sources)]
    pg = process_group(group)
    if pg is None:
        everyone = [mine]
    else:
        everyone = [None] * dist.get_world_size(pg)
        dist.all_gather_object(everyone, mine, group=pg)
    per_source: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rank_rows in everyone:
        for src, metrics in rank_rows:
            for name, value in metrics.items():
                per_source[src][name].append(value)
    out = {f"val-core/{src}/acc/{name}": float(np.mean(vals))
           for src, by_name in sorted(per_source.items()) for name, vals in by_name.items()}
    for src, by_name in sorted(per_source.items()):  # how far mean@n could move by the prompts drawn
        vals = by_name[f"mean@{n}"]
        sem = float(np.std(vals, ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else float("nan")
        out[f"val-aux/{src}/acc/mean@{n}/stderr"] = sem
        out[f"val-aux/{src}/num_prompts"] = float(len(vals))
    return out


class ValidationResult(NamedTuple):
    """What `validate` returns: the metrics (all ranks), and this rank's batch and its scoring."""

    metrics: dict[str, float]
    batch: RolloutBatch
    rewards: RewardResult | None  # None on a rank without prompts


def validate(
    engine: Any,
    prompts: Sequence[tuple[Sequence[int], dict[str, Any]]],
    score: Callable[[RolloutBatch, list[dict[str, Any]]], RewardResult],
    *,
    n: int,
    temperature: float,
    max_tokens: int,
    pad_token_id: int,
    seed: int,
    group: Group,
) -> ValidationResult:
    """Samples `n` responses for this rank's share of `prompts`, scores them, returns `validation_metrics`.

    prompts: (token ids, verl row) pairs, the same list on every rank; rank d of `group` (the data-parallel
    group: `mesh["dp"]`) takes prompts d, d + D, d + 2D, ... (D = group size; the tp ranks of one engine
    share an index, hence their prompts). temperature 0 is greedy and needs n = 1. score(batch, rows) ->
    `rlprims.rewards.RewardResult` (e.g. `score_responses`), rows = the verl row of each response.
    seed: sampling seeds follow `rollout_seed(seed=seed, step=0, dp_rank=d, ...)`, disjoint across ranks
    (pass e.g. the run's seed + the step). Every rank of `group` must call (a rank with no prompt still
    joins the gather).
    """
    pg = process_group(group)
    d, size = (0, 1) if pg is None else (dist.get_rank(pg), dist.get_world_size(pg))
    mine = list(prompts[d::size])
    seed = rollout_seed(seed=seed, step=0, dp_rank=d, dp_size=size, rows=max(1, -(-len(prompts) // size) * n))
    batch = generate(engine, [ids for ids, _ in mine], n=n, temperature=temperature, max_tokens=max_tokens,
                     pad_token_id=pad_token_id, seed=seed, logprobs=False)  # scores need no log-probs
    rows = [row for _, row in mine for _ in range(n)]
    result = score(batch, rows) if rows else None
    scores = result.scores.cpu() if result is not None else torch.zeros(0)
    preds = result.extra.get("pred") if result is not None else None
    if preds is not None and any(p is None for p in preds):
        preds = None  # a failed call has no prediction: no vote on this rank
    sources = [row["data_source"] for _, row in mine]
    metrics = validation_metrics(scores, sources, n=n, group=group, preds=preds)
    return ValidationResult(metrics, batch, result)


def validation_samples(result: ValidationResult, tokenizer: Any, *, k: int = 4) -> tuple[list, list, list]:
    """(prompts, responses, scores) of the first `k` rows this rank validated, as text, for
    `rlprims.metrics.log_generations(log, step, *validation_samples(result, tokenizer))` (verl's
    val/generations, TRL's log_completions). A rank without prompts gives three empty lists.
    """
    from rlprims.rollout.batch import decode_prompts, decode_responses

    if result.rewards is None or k < 1:
        return [], [], []
    return (decode_prompts(tokenizer, result.batch)[:k], decode_responses(tokenizer, result.batch)[:k],
            result.rewards.scores[:k].tolist())
