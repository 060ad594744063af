"""recipes/sft.py under torchrun with 2 processes on the tiny random chat model (no inference engine).

One 3-step run saving every 2 steps, then the same command after deleting the step-3 checkpoint: the
second run resumes from step 2 and must log step 3 exactly as the first did (loss, lr, gradient norm:
data order, weights, optimizer and LR schedule all restored).
"""

import math
import shutil

import pytest

from tests.recipes.conftest import assert_documented, metric_lines, run_recipe

FLAGS = ["--steps", "3", "--save-every", "2", "--batch-size", "4", "--val-rows", "6", "--val-every", "2",
         "--lr", "1e-3", "--warmup-ratio", "0.34", "--max-tokens-per-micro-batch", "160"]


@pytest.fixture(scope="module")
def run(tiny_chat_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    run_recipe("sft", out, "--model", tiny_chat_model, *FLAGS)
    first = metric_lines(out)
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    run_recipe("sft", out, "--model", tiny_chat_model, *FLAGS)
    return out, first, metric_lines(out)


def test_metrics(run):
    _, lines, _ = run
    assert_documented(lines)
    steps = [m for m in lines if "train/loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        for key in ("train/loss", "train/lr", "train/grad_norm", "perf/total_num_tokens", "timing_s/step"):
            assert key in m and math.isfinite(m[key]), key
    assert [m["step"] for m in lines if "val/loss" in m] == [0, 2, 3]
    # warmup = int(0.34 * 3) = 1 step from 0, then cosine over the 2 others: lr 0, 1e-3, 1e-3 * (1 + cos(π/2))/2
    assert [m["train/lr"] for m in steps] == pytest.approx([0.0, 1e-3, 5e-4], rel=1e-12)
    assert steps[0]["train/loss"] > 5  # random model, vocab ~49k: ln(49152) ≈ 10.8
    assert steps[2]["train/loss"] < steps[1]["train/loss"]  # lr 1e-3 on the same task: the loss drops


def test_resume_reproduces_the_step(run):
    _, first, second = run
    untimed = lambda lines, step: [{k: v for k, v in m.items() if not k.startswith(("timing_s/", "perf/throughput"))}
                                   for m in lines if m["step"] == step]
    assert untimed(second, 3) and untimed(second, 3) == untimed(first, 3)  # bitwise: same floats in the JSON
    assert [m for m in second if m["step"] <= 2] == [m for m in first if m["step"] <= 2]  # kept, not re-run


def test_checkpoint_and_export(run):
    out, _, _ = run
    assert (out / "checkpoints" / "step-00000003" / "checkpoint.json").is_file()
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "model.safetensors").is_file()
