"""rlprims.metrics: JSONL content, console line, resume de-duplication, rank-0-only writing, curves PNG,
progress bars, and the optional wandb / TensorBoard back-ends."""

from __future__ import annotations

import json
import struct
import sys

import pytest
import torch

from rlprims.metrics import close_run_log, log_metrics, open_run_log, perf_metrics, plot_curves, progress


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_and_console(tmp_path, capsys):
    log = open_run_log(tmp_path, rank=0, config={"lr": 1e-6, "model": "tiny"})
    log_metrics(log, 1, {"critic/score/mean": 0.25, "response_length/mean": torch.tensor(12.5),
                         "perf/total_num_tokens": 400, "actor/entropy": float("nan"),
                         "timing_s/step": 3.0, "val-core/arith/acc/mean@1": 0.5})
    log_metrics(log, 2, {"critic/score/mean": 0.5})
    log_metrics(log, 3, {"val-core/arith/acc/mean@1": 0.5, "val-aux/arith/acc/mean@1/stderr": 0.0312})
    assert _lines(tmp_path / "metrics.jsonl")[:2] == [
        {"step": 1, "critic/score/mean": 0.25, "response_length/mean": 12.5, "perf/total_num_tokens": 400,
         "actor/entropy": None, "timing_s/step": 3.0, "val-core/arith/acc/mean@1": 0.5},  # nan -> null
        {"step": 2, "critic/score/mean": 0.5},
    ]
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 1e-6, "model": "tiny"}
    out = capsys.readouterr().out.splitlines()
    assert out == ["step     1  score 0.25  len 12.5  entropy nan  s/step 3  arith/acc/mean@1 0.5",
                   "step     2  score 0.5", "step     3  arith/acc/mean@1 0.5 ± 0.031"]


def test_bad_metrics(tmp_path):
    log = open_run_log(tmp_path, rank=0, config={})
    with pytest.raises(ValueError, match="'a/b'.*shape"):
        log_metrics(log, 1, {"a/b": torch.zeros(2)})
    with pytest.raises(ValueError, match="'a/b'.*str"):
        log_metrics(log, 1, {"a/b": "high"})
    with pytest.raises(ValueError, match="step"):
        log_metrics(log, 1, {"step": 3})
    with pytest.raises(ValueError, match="step"):
        log_metrics(log, -1, {})
    with pytest.raises(ValueError, match="resume_step"):
        open_run_log(tmp_path, rank=0, config={}, resume_step=-2)


def test_resume_drops_steps_after_the_checkpoint(tmp_path):
    log = open_run_log(tmp_path, rank=0, config={})
    log_metrics(log, 0, {"val-core/x/acc/mean@1": 0.1})
    for step in range(1, 6):
        log_metrics(log, step, {"critic/score/mean": step / 10})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "critic/sc')  # the line a SIGKILL cut short
    # the run resumes from the checkpoint of step 3 and logs steps 4.. again: no duplicates
    log = open_run_log(tmp_path, rank=0, config={}, resume_step=3)
    for step in range(4, 7):
        log_metrics(log, step, {"critic/score/mean": step / 10})
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5, 6]
    # a fresh run (no checkpoint) starts the file again
    open_run_log(tmp_path, rank=0, config={})
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_rerun_without_checkpoint_starts_afresh(tmp_path):
    """A run killed before its first checkpoint is rerun from step 0 (resume_step=0, as the recipes pass
    the step they start at): its step-0 lines are logged again, so the old ones must go."""
    def run(steps):
        log = open_run_log(tmp_path, rank=0, config={}, resume_step=0)
        log_metrics(log, 0, {"val-core/x/acc/mean@1": 0.1})
        for step in range(1, steps + 1):
            log_metrics(log, step, {"critic/score/mean": step / 10})

    run(steps=2)  # killed after step 2, before saving
    run(steps=3)  # the rerun, uninterrupted
    uninterrupted = tmp_path / "metrics.jsonl"
    assert [r["step"] for r in _lines(uninterrupted)] == [0, 1, 2, 3]


def test_other_ranks_write_and_print_nothing(tmp_path, capsys):
    log = open_run_log(tmp_path / "r1", rank=1, config={"a": 1})
    log_metrics(log, 1, {"critic/score/mean": 1.0})
    assert close_run_log(log) is None
    assert list(progress(range(3), desc="rollout", rank=1)) == [0, 1, 2]
    assert not (tmp_path / "r1").exists()
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""


def test_progress_on_rank0_draws_a_bar(capsys):
    assert list(progress(iter(range(4)), desc="update", rank=0, total=4)) == [0, 1, 2, 3]
    assert "update" in capsys.readouterr().err


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_curves_writes_png_of_present_keys(tmp_path):
    log = open_run_log(tmp_path, rank=0, config={})
    for step in range(1, 8):
        log_metrics(log, step, {"critic/score/mean": step / 8, "response_length/mean": 30.0 - step,
                                "actor/ppo_kl": 0.0, "rollout_corr/kl": 1e-4 * step})
    log_metrics(log, 7, {"val-core/arith/acc/mean@1": 0.7})
    png = close_run_log(log)
    assert png == tmp_path / "curves.png"
    w4, h4 = _png_size(png)  # reward, length, KL (rollout_corr/kl: ppo_kl is all zeros) -> 2 x 2 grid
    only_reward = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "one.png",
                              keys=[("reward", ("critic/score/mean",)), ("missing", ("nope",))])
    w1, h1 = _png_size(only_reward)  # the absent panel is skipped: one panel
    assert w4 > w1 and h4 > h1
    assert plot_curves(tmp_path / "metrics.jsonl", tmp_path / "none.png", keys=[("x", ("nope",))]) is None
    assert not (tmp_path / "none.png").exists()


def test_close_run_log_draws_the_recipes_panels(tmp_path):
    log = open_run_log(tmp_path, rank=0, config={})
    for step in range(1, 4):
        log_metrics(log, step, {"critic/score/mean": step / 4, "tool/call_rate": 0.5})
    png = close_run_log(log, curves=[("tool-call rate", ("tool/call_rate",))])
    assert _png_size(png) == _png_size(plot_curves(tmp_path / "metrics.jsonl", tmp_path / "one.png",
                                                   keys=[("reward", ("critic/score/mean",))]))  # one panel
    log = open_run_log(tmp_path / "b", rank=0, config={})
    log_metrics(log, 1, {"critic/score/mean": 0.5})
    assert close_run_log(log, curves=[("tool-call rate", ("tool/call_rate",))]) is None  # nothing to draw


def test_missing_backends_raise_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError, installed or not
    with pytest.raises(ImportError, match="pip install wandb"):
        open_run_log(tmp_path / "w", rank=0, config={}, wandb_project="rlprims")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        open_run_log(tmp_path / "t", rank=1, config={}, tensorboard=True)  # every rank checks
    assert not (tmp_path / "w").exists() and not (tmp_path / "t").exists()


def test_perf_metrics_on_cpu():
    step = {"perf/total_num_tokens": 1200, "timing_s/step": 3.0}
    assert perf_metrics(step, world_size=2, device=torch.device("cpu")) == {"perf/throughput": 200.0}
    with pytest.raises(KeyError, match="timing_s/step"):
        perf_metrics({"perf/total_num_tokens": 1}, world_size=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="world_size"):
        perf_metrics(step, world_size=0, device=torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_perf_metrics_peak_memory_per_step():
    device = torch.device("cuda")
    step = {"perf/total_num_tokens": 1, "timing_s/step": 1.0}
    perf_metrics(step, world_size=1, device=device)  # resets the peak
    x = torch.empty(256 << 20, dtype=torch.uint8, device=device)  # 0.25 GiB
    first = perf_metrics(step, world_size=1, device=device)
    del x  # freed during the second step: its peak still holds x, the third's does not
    second = perf_metrics(step, world_size=1, device=device)
    third = perf_metrics(step, world_size=1, device=device)
    assert first["perf/max_memory_allocated_gb"] >= 0.25 and second["perf/max_memory_allocated_gb"] >= 0.25
    assert third["perf/max_memory_allocated_gb"] < 0.25
    assert first["perf/max_memory_reserved_gb"] >= 0.25
