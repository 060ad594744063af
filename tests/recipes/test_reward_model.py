"""recipes/reward_model.py: two steps under torchrun with 2 processes on the tiny random chat model; the
export loads as AutoModelForSequenceClassification (head included) and, scoring the held-out pairs with
plain transformers on a right-padded batch, reproduces the recipe's own final validation numbers."""

import math

import pytest
import torch

from tests.recipes.conftest import assert_documented, metric_lines, run_recipe

VAL_PAIRS = 8


@pytest.fixture(scope="module")
def run(tiny_chat_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward_model")
    run_recipe("reward_model", out, "--model", tiny_chat_model, "--steps", "2", "--pairs-per-rank", "4",
               "--val-pairs", str(VAL_PAIRS), "--lr", "1e-3", "--warmup-ratio", "0",
               "--max-tokens-per-micro-batch", "200")
    return out, metric_lines(out)


def test_metrics(run):
    _, lines = run
    assert_documented(lines)
    steps = [m for m in lines if "rm/loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        for key in ("rm/loss", "rm/accuracy", "rm/margin", "rm/lr", "rm/grad_norm", "timing_s/step"):
            assert key in m and math.isfinite(m[key]), key
        assert 0.0 <= m["rm/accuracy"] <= 1.0 and m["rm/grad_norm"] > 0
    assert [m["step"] for m in lines if "val/rm/accuracy" in m] == [0, 2]
    # −log σ(Δ) at a random head (Δ ≈ 0) is ≈ ln 2
    assert steps[0]["rm/loss"] == pytest.approx(math.log(2), abs=0.1)


def test_export_scores_like_the_recipe(run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlprims.data import arithmetic_preference_rows, preference_tokens

    out, lines = run
    assert (out / "checkpoints" / "step-00000002" / "checkpoint.json").is_file()
    model, info = AutoModelForSequenceClassification.from_pretrained(out / "hf", output_loading_info=True)
    assert not info["missing_keys"] and model.config.num_labels == 1  # the trained head was saved
    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    margins = []
    for row in arithmetic_preference_rows(VAL_PAIRS, seed=1, split="test"):
        pair = preference_tokens(tokenizer, row)
        seqs = [pair.chosen.input_ids, pair.rejected.input_ids]
        ids = torch.full((2, max(map(len, seqs))), model.config.pad_token_id)
        attention = torch.zeros_like(ids)  # not ids != pad: the pad token (<|im_end|>) is inside the prompt too
        for i, s in enumerate(seqs):
            ids[i, : len(s)], attention[i, : len(s)] = torch.tensor(s), 1
        with torch.no_grad():  # HF scores the last non-pad token of each row, as the recipe trains it
            r = model(input_ids=ids, attention_mask=attention).logits[:, 0]
        margins.append((r[0] - r[1]).item())
    final = [m for m in lines if "val/rm/margin" in m][-1]
    assert sum(margins) / len(margins) == pytest.approx(final["val/rm/margin"], rel=1e-4, abs=1e-5)
    assert sum(m > 0 for m in margins) / len(margins) == final["val/rm/accuracy"]
