"""The trackers with the versions pip resolves today: a wandb run in offline mode and TensorBoard event
files, each read back from disk (the logged values arrive, resumed and fresh runs behave), and the
validation samples of `log_generations` (generations.jsonl, wandb table, TensorBoard text)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch

from rlprims.metrics import close_run_log, log_generations, log_metrics, open_run_log


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- wandb (offline) -------------------------------------------------------------------------------------
@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """wandb in offline mode with every file it writes under tmp_path (nothing sent, nothing in ~)."""
    pytest.importorskip("wandb")
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_CONFIG_DIR": tmp_path / "wandb-config", "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
                       "WANDB_DATA_DIR": tmp_path / "wandb-data", "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(var, str(value))
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)


def _wandb_records(run_dir: Path) -> list:
    """The protobuf records of an offline run's `run-<id>.wandb` file (a LevelDB-style log: a 7-byte
    ':W&B' header, then 32 KiB blocks of records, each crc32 (4) + length (2) + type (1) + data, a
    record split across blocks as FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, part, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is zero padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def _wandb_history(run_dir: Path) -> dict[int, dict]:
    """step -> the values logged at that step (wandb's own keys, starting with '_', left out)."""
    out: dict[int, dict] = {}
    for r in _wandb_records(run_dir):
        if r.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in r.history.item:  # a media value (table, image) arrives as nested keys
                *outer, last = list(item.nested_key) or [item.key]
                node = row
                for k in outer:
                    node = node.setdefault(k, {})
                node[last] = json.loads(item.value_json)
            step = row.pop("_step")
            out.setdefault(step, {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    return out


def _wandb_config(run_dir: Path) -> dict:
    for r in _wandb_records(run_dir):
        if r.WhichOneof("record_type") == "run":
            return {i.key: json.loads(i.value_json) for i in r.run.config.update if not i.key.startswith("_")}
    raise AssertionError("no run record")


def _offline_runs(out_dir: Path, run_id: str) -> list[Path]:
    return sorted((out_dir / "wandb").glob(f"offline-run-*-{run_id}"))


def test_wandb_offline_run_logs_values_config_and_generations(tmp_path, wandb_offline):
    out = tmp_path / "run"
    log = open_run_log(out, rank=0, config={"lr": 1e-6, "model": "tiny"}, wandb_project="rlprims-test")
    log_metrics(log, 1, {"critic/score/mean": 0.25, "actor/entropy": float("nan")})
    log_metrics(log, 2, {"critic/score/mean": 0.5, "val-core/arith/acc/mean@1": 0.75})
    log_generations(log, 2, ["1+1=", "2+2="], ["2", "5"], torch.tensor([1.0, 0.0]))
    close_run_log(log)

    run_id = (out / "wandb_run_id").read_text().strip()
    (run_dir,) = _offline_runs(out, run_id)
    history = _wandb_history(run_dir)
    assert history[1] == {"critic/score/mean": 0.25}  # the NaN entropy is left out, as for TensorBoard
    assert history[2]["critic/score/mean"] == 0.5 and history[2]["val-core/arith/acc/mean@1"] == 0.75
    table = history[2]["val/generations"]
    assert table["_type"] == "table-file" and table["nrows"] == 2 and table["ncols"] == 4
    assert json.loads((run_dir / "files" / table["path"]).read_text()) == {
        "columns": ["step", "prompt", "response", "score"],
        "data": [[2, "1+1=", "2", 1.0], [2, "2+2=", "5", 0.0]],
    }
    assert any(v.get("_type") == "image-file" for v in history[max(history)].values() if isinstance(v, dict))
    assert _wandb_config(run_dir) == {"lr": 1e-6, "model": "tiny"}


def test_wandb_resumed_run_continues_the_run_and_a_fresh_one_starts_another(tmp_path, wandb_offline):
    out = tmp_path / "run"
    log = open_run_log(out, rank=0, config={}, wandb_project="rlprims-test")
    log_metrics(log, 1, {"critic/score/mean": 0.25})
    close_run_log(log)
    first = (out / "wandb_run_id").read_text().strip()

    time.sleep(1.1)  # wandb names an offline run's directory by the second it starts: keep both apart
    log = open_run_log(out, rank=0, config={}, wandb_project="rlprims-test", resume_step=1)
    log_metrics(log, 2, {"critic/score/mean": 0.5})
    close_run_log(log)
    assert (out / "wandb_run_id").read_text().strip() == first  # same wandb run
    resumed = _offline_runs(out, first)
    assert len(resumed) == 2 and _wandb_history(resumed[-1])[2]["critic/score/mean"] == 0.5

    for fresh_step in (None, 0):  # no checkpoint: a new wandb run
        log = open_run_log(out, rank=0, config={}, wandb_project="rlprims-test", resume_step=fresh_step)
        close_run_log(log)
        assert (out / "wandb_run_id").read_text().strip() != first


# ---- TensorBoard ------------------------------------------------------------------------------------------
def _tb(log_dir: Path):
    """TensorBoard's own reader (the one its server uses: it applies purges to every kind of event)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def _tb_values(acc, tag: str) -> list[tuple[int, object]]:
    from tensorboard.util import tensor_util

    out = []
    for e in acc.Tensors(tag):
        v = tensor_util.make_ndarray(e.tensor_proto)
        out.append((e.step, v.item() if v.dtype.kind == "f" else v.item().decode()))
    return out


def test_tensorboard_scalars_text_and_purge_on_resume_and_fresh_runs(tmp_path):
    pytest.importorskip("tensorboard")
    log = open_run_log(tmp_path, rank=0, config={}, tensorboard=True)
    for step in (0, 1, 2, 3):
        log_metrics(log, step, {"critic/score/mean": step / 4, "actor/entropy": float("nan")})
    log_generations(log, 3, ["1+1=", "x"], ["2\n<|im_end|>", "y"], [1.0, float("nan")])
    close_run_log(log)
    acc = _tb(tmp_path / "tensorboard")
    assert acc.Tags()["tensors"] == ["critic/score/mean", "val/generations/text_summary"]  # no NaN entropy
    assert _tb_values(acc, "critic/score/mean") == [(0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75)]
    ((step, text),) = _tb_values(acc, "val/generations/text_summary")
    assert step == 3
    assert "**sample 0**, score 1.0" in text and "    2\n    <|im_end|>" in text  # verbatim code block
    assert "**sample 1**, score None" in text

    # resumed from the checkpoint of step 1: steps 2, 3 of the killed run are purged, then logged again
    log = open_run_log(tmp_path, rank=0, config={}, tensorboard=True, resume_step=1)
    log_metrics(log, 2, {"critic/score/mean": 0.125})
    close_run_log(log)
    acc = _tb(tmp_path / "tensorboard")
    assert _tb_values(acc, "critic/score/mean") == [(0, 0.0), (1, 0.25), (2, 0.125)]
    assert _tb_values(acc, "val/generations/text_summary") == []

    # a fresh run (no checkpoint) into the same directory hides everything before it
    log = open_run_log(tmp_path, rank=0, config={}, tensorboard=True, resume_step=0)
    log_metrics(log, 0, {"critic/score/mean": 1.0})
    close_run_log(log)
    assert _tb_values(_tb(tmp_path / "tensorboard"), "critic/score/mean") == [(0, 1.0)]


# ---- generations.jsonl --------------------------------------------------------------------------------
def test_generations_jsonl_literal_and_resume(tmp_path):
    log = open_run_log(tmp_path, rank=0, config={})
    assert not (tmp_path / "generations.jsonl").exists()  # appears with the first samples
    log_generations(log, 0, ["a"], ["b"], [0.0])
    log_generations(log, 2, ["c", "d"], ["e", "f"], torch.tensor([1.0, float("inf")]))
    log_generations(log, 4, [], [], [])  # nothing to write (e.g. rank 0 had no validation prompts)
    assert _lines(tmp_path / "generations.jsonl") == [
        {"step": 0, "prompt": "a", "response": "b", "score": 0.0},
        {"step": 2, "prompt": "c", "response": "e", "score": 1.0},
        {"step": 2, "prompt": "d", "response": "f", "score": None},  # non-finite -> null
    ]
    with open(tmp_path / "generations.jsonl", "a") as f:
        f.write('{"step": 4, "prom')  # cut short by a kill
    open_run_log(tmp_path, rank=0, config={}, resume_step=1)
    assert [r["step"] for r in _lines(tmp_path / "generations.jsonl")] == [0]
    open_run_log(tmp_path, rank=0, config={}, resume_step=0)
    assert (tmp_path / "generations.jsonl").read_text() == ""


def test_generations_bad_input_and_other_ranks(tmp_path):
    log = open_run_log(tmp_path / "r0", rank=0, config={})
    with pytest.raises(ValueError, match="2 prompts, 1 responses and 2 scores"):
        log_generations(log, 1, ["a", "b"], ["c"], [1.0, 0.0])
    with pytest.raises(ValueError, match="sample 0.*str"):
        log_generations(log, 1, [[1, 2]], ["c"], [1.0])
    with pytest.raises(ValueError, match="step"):
        log_generations(log, -1, ["a"], ["c"], [1.0])
    with pytest.raises(ValueError, match="scores\\[0\\].*str"):
        log_generations(log, 1, ["a"], ["c"], ["high"])
    other = open_run_log(tmp_path / "r1", rank=1, config={})
    with pytest.raises(ValueError, match="1 prompts, 0 responses"):  # every rank checks the lengths
        log_generations(other, 1, ["a"], [], [1.0])
    log_generations(other, 1, ["a"], ["c"], [1.0])
    assert not (tmp_path / "r1").exists()
