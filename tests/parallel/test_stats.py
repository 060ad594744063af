"""Cross-rank statistics, data-parallel coordinates, rollout seeds and validation metrics: every
distributed result on 4 gloo processes (the world group with uneven shards, one of them empty, and the
dp axis of a (dp 2, tp 2) mesh) equals the single-process result on the whole batch. One spawn of 4
processes serves every test (~30 s of imports on 2 cores)."""

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlprims.ops import (
    gae_advantages,
    gpg_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
)
from rlprims.parallel.advantages import (
    dist_gae_advantages,
    dist_gpg_advantages,
    dist_reinforce_pp_advantages,
    dist_reinforce_pp_baseline_advantages,
)
from rlprims.parallel.ranks import dp_rank_and_size, rollout_seed
from rlprims.parallel.stats import (
    dist_batch_metrics,
    dist_cat_rows,
    dist_masked_max,
    dist_masked_mean,
    dist_masked_min,
    dist_masked_var,
    dist_masked_whiten,
    dist_mean_max_min,
)
from rlprims.validation import prompt_validation_metrics, validation_metrics
from tests.tolerances import REORDER

B, T = 10, 7
WORLD = 4
# Uneven shards (rank 1 holds no row): the result must not depend on how rows are split.
SPLITS = [0, 4, 4, 8, 10]  # multiples of GROUP: groups never span ranks
GROUP = 2
DP_SPLIT = [0, 6, 10]  # 4 ranks as (dp 2) x (tp 2): both ranks of a tp pair hold the same rows


def _batch():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(B, T, generator=g, dtype=torch.float64) * 3 + 1
    lengths = torch.tensor([7, 1, 0, 4, 2, 7, 3, 0, 5, 6])  # rows 2 and 7 empty
    mask = torch.arange(T)[None, :] < lengths[:, None]
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    rows = lengths > 0
    values = torch.where(mask, values, torch.tensor(float("nan")))  # padding must never leak
    return values, mask, scores, rows


VAL_N = 4
VAL_SOURCES = ["a", "b", "a", "c", "a", "b", "a"]  # 7 prompts, labelled each by its own source


def _val_data():
    g = torch.Generator().manual_seed(1)
    scores = (torch.rand(len(VAL_SOURCES) * VAL_N, generator=g) < 0.4).float()
    preds = [int(x) for x in torch.randint(0, 3, (len(scores),), generator=g)]
    return scores, preds


def _everything(values, mask, scores, rows, group):
    out = {
        "mean": dist_masked_mean(values, mask, group=group),
        "var": dist_masked_var(values, mask, group=group),
        "var_biased": dist_masked_var(values, mask, group=group, unbiased=False),
        "max": dist_masked_max(values, mask, group=group),
        "min": dist_masked_min(values, mask, group=group),
        "whiten": dist_masked_whiten(values, mask, group=group),
        "whiten_keep_mean": dist_masked_whiten(values, mask, group=group, shift_mean=False),
        "logged": dist_mean_max_min({"tok": (values, mask), "seq": (scores, rows)}, group=group),
    }
    rewards, old_values = torch.where(mask, values, 0.0), torch.where(mask, values * 0.5 - 1, 0.0)
    out["gae"] = dist_gae_advantages(rewards, old_values, mask, gamma=0.9, lam=0.8, group=group)
    out["rpp"] = dist_reinforce_pp_advantages(rewards, mask, gamma=0.9, group=group)
    out["rpp_baseline"] = dist_reinforce_pp_baseline_advantages(scores, mask, group_size=GROUP, group=group)
    out["batch"] = dist_batch_metrics(scores, scores * 2, values, mask, mask.sum(-1), max_response_len=7,
                                      group=group)
    binary = (scores > 0.3).double()  # GPG's α counts the nonzero scores of the whole batch
    out["gpg"] = dist_gpg_advantages(binary, mask, group_size=GROUP, group=group)
    return out


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        values, mask, scores, rows = _batch()
        lo, hi = SPLITS[rank], SPLITS[rank + 1]
        res = {"world": _everything(values[lo:hi], mask[lo:hi], scores[lo:hi], rows[lo:hi], None)}
        vscores, preds = _val_data()
        mine = list(range(len(VAL_SOURCES)))[rank::world]
        idx = [i * VAL_N + k for i in mine for k in range(VAL_N)]
        res["val"] = validation_metrics(vscores[idx], [VAL_SOURCES[i] for i in mine], n=VAL_N, group=None,
                                        preds=[preds[j] for j in idx])
        from rlprims.parallel import build_mesh

        mesh = build_mesh(device_type="cpu", tp=2)
        d, size = dp_rank_and_size(mesh)
        res["dp"] = (d, size)
        lo, hi = DP_SPLIT[d], DP_SPLIT[d + 1]
        res["mesh"] = _everything(values[lo:hi], mask[lo:hi], scores[lo:hi], rows[lo:hi], mesh["dp"])
        res["pg"] = _everything(values[lo:hi], mask[lo:hi], scores[lo:hi], rows[lo:hi], mesh.get_group("dp"))
        res["whiten_rows"] = (lo, hi)
        lo, hi = SPLITS[rank], SPLITS[rank + 1]
        width = [7, 3, 5, 2][rank]  # ranks with different widths: padded to the widest
        res["cat"] = (dist_cat_rows(values[lo:hi, :width], group=None), dist_cat_rows(mask[lo:hi, :width], group=None))
        torch.save(res, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _expected():
    values, mask, scores, rows = _batch()
    v = values[mask]
    return {
        "mean": masked_mean(values, mask),
        "var": masked_var(values, mask),
        "var_biased": masked_var(values, mask, unbiased=False),
        "max": v.max(),
        "min": v.min(),
        "whiten": masked_whiten(values, mask),
        "whiten_keep_mean": masked_whiten(values, mask, shift_mean=False),
        "gae": gae_advantages(torch.where(mask, values, 0.0), torch.where(mask, values * 0.5 - 1, 0.0), mask,
                              gamma=0.9, lam=0.8),
        "rpp": reinforce_pp_advantages(torch.where(mask, values, 0.0), mask, gamma=0.9),
        "rpp_baseline": reinforce_pp_baseline_advantages(scores, mask, group_size=GROUP),
        "gpg": gpg_advantages((scores > 0.3).double(), mask, group_size=GROUP),
        "logged": {"tok/mean": masked_mean(values, mask).item(), "tok/max": v.max().item(),
                   "tok/min": v.min().item(), "seq/mean": scores[rows].mean().item(),
                   "seq/max": scores[rows].max().item(), "seq/min": scores[rows].min().item()},
    }


def mask_all():
    return _batch()[1]


def _compare(got: dict, expected: dict, rows: tuple[int, int]) -> None:
    lo, hi = rows
    for k in ("mean", "var", "var_biased", "max", "min"):
        torch.testing.assert_close(got[k], expected[k], **REORDER, msg=k)
    for k in ("whiten", "whiten_keep_mean", "rpp_baseline", "gpg"):
        torch.testing.assert_close(got[k], expected[k][lo:hi], **REORDER, msg=k)
    for k in ("gae", "rpp"):
        for a, b in zip(got[k], expected[k]):
            torch.testing.assert_close(a, b[lo:hi], **REORDER, msg=k)
    lengths = mask_all().sum(-1).double()
    _, _, scores, _ = _batch()
    v = _batch()[0][mask_all()]
    assert got["batch"] == pytest.approx({
        "critic/score/mean": scores.mean().item(), "critic/score/max": scores.max().item(),
        "critic/score/min": scores.min().item(), "critic/rewards/mean": 2 * scores.mean().item(),
        "critic/rewards/max": 2 * scores.max().item(), "critic/rewards/min": 2 * scores.min().item(),
        "critic/advantages/mean": v.mean().item(), "critic/advantages/max": v.max().item(),
        "critic/advantages/min": v.min().item(), "response_length/mean": lengths.mean().item(),
        "response_length/max": 7.0, "response_length/min": 0.0, "response_length/clip_ratio": 0.2,
    }, rel=1e-12, abs=1e-12)
    assert got["logged"].keys() == expected["logged"].keys()
    for k, v in expected["logged"].items():
        assert got["logged"][k] == pytest.approx(v, rel=1e-12, abs=1e-12), k


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(WORLD, os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        yield [torch.load(os.path.join(tmp, f"r{r}.pt"), weights_only=False) for r in range(WORLD)]


def test_world_group_equals_one_process(ranks):
    expected = _expected()
    for rank, res in enumerate(ranks):
        _compare(res["world"], expected, (SPLITS[rank], SPLITS[rank + 1]))


def test_dp_axis_of_a_tp_mesh_counts_each_row_once(ranks):
    results = ranks
    assert [res["dp"] for res in results] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    expected = _expected()
    for res in results:
        _compare(res["mesh"], expected, res["whiten_rows"])
        _compare(res["pg"], expected, res["whiten_rows"])


def test_cat_rows_concatenates_in_rank_order(ranks):
    values, mask, _, _ = _batch()
    widths = [7, 3, 5, 2]
    for res in ranks:
        got_values, got_mask = res["cat"]
        assert got_values.shape == (B, T) and got_mask.dtype == torch.bool
        for rank, w in enumerate(widths):
            lo, hi = SPLITS[rank], SPLITS[rank + 1]
            assert torch.equal(got_mask[lo:hi, :w], mask[lo:hi, :w]) and not got_mask[lo:hi, w:].any()
            expect = torch.where(mask[lo:hi, :w], values[lo:hi, :w], 0.0)
            assert torch.equal(torch.where(got_mask[lo:hi, :w], got_values[lo:hi, :w], 0.0), expect)


def test_validation_metrics_equal_one_process(ranks):
    results = ranks
    scores, preds = _val_data()
    expected = validation_metrics(scores, VAL_SOURCES, n=VAL_N, group=None, preds=preds)
    assert set(expected) == {f"val-core/{s}/acc/{m}" for s in "abc"
                             for m in ("mean@4", "best@4/mean", "maj@4/mean")} | {
        f"val-aux/{s}/{m}" for s in "abc" for m in ("acc/mean@4/stderr", "num_prompts")}
    for res in results:
        assert res["val"].keys() == expected.keys()
        for k, v in expected.items():
            assert res["val"][k] == pytest.approx(v, rel=1e-12, nan_ok=True), k


# ------------------------------------------------------------------------------------------------
# One process


def test_one_process_literal():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    assert dist_masked_mean(values, mask, group=None).item() == 2.5
    assert dist_masked_var(values, mask, group=None).item() == pytest.approx(5.0 / 3.0)
    assert dist_masked_max(values, mask, group=None).item() == 4.0
    assert dist_masked_min(values, mask, group=None).item() == 1.0
    assert dist_mean_max_min({"x": (values, mask)}, group=None) == {"x/mean": 2.5, "x/max": 4.0, "x/min": 1.0}
    none = torch.zeros_like(mask)
    assert dist_mean_max_min({"x": (values, none)}, group=None) == {"x/mean": 0.0, "x/max": 0.0, "x/min": 0.0}
    assert torch.equal(dist_masked_whiten(values, none, group=None), torch.zeros_like(values))
    with pytest.raises(ValueError, match="mask"):
        dist_masked_mean(values, mask.float(), group=None)


def test_rollout_seeds_never_overlap_within_a_run():
    # Every (step, round, dp rank) block of `rows` seeds is disjoint from every other one.
    rows, dp_size, rounds = 6, 3, 2
    seen = set()
    for step in range(5):
        for r in range(rounds):
            for d in range(dp_size):
                s = rollout_seed(seed=7, step=step, dp_rank=d, dp_size=dp_size, rows=rows, round=r,
                                 rounds=rounds)
                block = set(range(s, s + rows))
                assert not block & seen
                seen |= block
    # a literal: seed 0 puts block k at k * rows
    assert rollout_seed(seed=0, step=2, dp_rank=1, dp_size=3, rows=6) == (2 * 3 + 1) * 6
    with pytest.raises(ValueError, match="dp_rank"):
        rollout_seed(seed=0, step=0, dp_rank=3, dp_size=3, rows=6)
    with pytest.raises(ValueError, match="rows"):
        rollout_seed(seed=0, step=0, dp_rank=0, dp_size=1, rows=0)


def _verl_bootstrap(data, subset_size, reduce_fn, seed=42, n_bootstrap=1000):
    """verl's bootstrap_metric (metric_utils.py) as written there: the global numpy RNG, re-seeded."""
    np.random.seed(seed)
    out = []
    for _ in range(n_bootstrap):
        idxs = np.random.choice(len(data), size=subset_size, replace=True)
        out.append(reduce_fn([data[i] for i in idxs]))
    return np.mean(out)


def _verl_maj(data):
    vote2vals = {}
    for d in data:
        vote2vals.setdefault(d["pred"], []).append(d["val"])
    counts = {k: len(v) for k, v in vote2vals.items()}
    return vote2vals[max(counts, key=counts.get)][0]


def test_prompt_metrics_match_verl():
    state = np.random.get_state()
    try:
        scores = [1.0, 0.0, 0.0, 1.0, 0.0]
        preds = ["7", "3", "3", "7", "5"]
        got = prompt_validation_metrics(scores, preds=preds)
        assert got["mean@5"] == 0.4
        assert got["best@5/mean"] == _verl_bootstrap(scores, 5, np.max)
        vote = [{"val": v, "pred": p} for v, p in zip(scores, preds)]
        assert got["maj@5/mean"] == _verl_bootstrap(vote, 5, _verl_maj)
        assert 0.0 < got["maj@5/mean"] < got["best@5/mean"] < 1.0
        assert prompt_validation_metrics([0.5]) == {"mean@1": 0.5}
        # the standard error of mean@1 over 4 prompts scored 1, 0, 1, 1: std(ddof=1) / 2
        four = validation_metrics(torch.tensor([1.0, 0.0, 1.0, 1.0]), ["s"] * 4, n=1, group=None)
        assert four["val-core/s/acc/mean@1"] == 0.75 and four["val-aux/s/num_prompts"] == 4.0
        assert four["val-aux/s/acc/mean@1/stderr"] == pytest.approx(0.5 / 2)
        assert "maj@2/mean" not in prompt_validation_metrics([0.0, 1.0])  # no preds: no vote (as verl)
    finally:
        np.random.set_state(state)
