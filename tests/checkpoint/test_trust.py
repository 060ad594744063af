"""Checkpoint trust: loading runs no code from the checkpoint. A tampered `.metadata` (plain pickle in
torch DCP) or a tampered non-tensor shard entry (DCP: torch.load(weights_only=False)) is refused before
DCP reads it, naming the file, while unmodified DCP would have run it (shown on the same files); entries
that point outside the directory are refused; checkpoint.json / extra_state.json are validated, with
`expect` for the caller's keys; and on 2 gloo ranks every rank raises."""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict

from rlprims.checkpoint import load_checkpoint, save_checkpoint


class _Payload:
    """What an attacker pickles: unpickling it runs os.system (here: creates a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def _saved(tmp_path: Path, step: int = 3) -> tuple[Path, torch.nn.Module, torch.optim.Optimizer]:
    model, optimizer = _mlp()
    path = save_checkpoint(tmp_path / "ckpt", step, model=model, optimizer=optimizer,
                           extra_state={"step": step, "sampler": {"epoch": 0, "offset": 4}})
    return path, model, optimizer


def test_untampered_checkpoint_loads_with_expect(tmp_path):
    path, model, _ = _saved(tmp_path)
    fresh, fresh_opt = _mlp()
    extra = load_checkpoint(path, model=fresh, optimizer=fresh_opt, expect={"step": int, "sampler": dict})
    assert extra == {"step": 3, "sampler": {"epoch": 0, "offset": 4}}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_tampered_metadata_is_refused_and_runs_nothing(tmp_path):
    path, _, _ = _saved(tmp_path)
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match=r"\.metadata: global posix\.system is not a checkpoint metadata type; "
                                         r"refused to load: a pickle can run code"):
        load_checkpoint(path, model=_mlp()[0], optimizer=None)
    assert not marker.exists()
    with pytest.raises(CheckpointException):  # the control: plain DCP runs the payload (then fails)
        dcp.load({"model": _mlp()[0].state_dict()}, checkpoint_id=path)
    assert marker.exists()


def test_tampered_optimizer_entry_is_refused_and_runs_nothing(tmp_path):
    """The attacker appends a pickled payload to the shard file and points the lr entry of the (allowed,
    re-pickled) metadata at it: only tensors and plain values load with weights_only=True."""
    path, _, _ = _saved(tmp_path)
    marker = tmp_path / "pwned"
    meta = pickle.loads((path / ".metadata").read_bytes())  # the test trusts its own file
    key = next(k for k in meta.storage_data if k.fqn == "optimizer.param_groups.0.lr")
    info = meta.storage_data[key]
    shard = path / info.relative_path
    blob = io.BytesIO()
    torch.save(_Payload(marker), blob)
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(blob.getvalue())
    meta.storage_data[key] = type(info)(info.relative_path, offset, len(blob.getvalue()),
                                        info.transform_descriptors)
    (path / ".metadata").write_bytes(pickle.dumps(meta))
    model, optimizer = _mlp()
    with pytest.raises(ValueError, match=r"__0_0\.distcp: entry 'optimizer\.param_groups\.0\.lr' does not load "
                                         r"with torch\.load\(weights_only=True\)"):
        load_checkpoint(path, model=model, optimizer=optimizer)
    assert not marker.exists()
    state = {"optimizer": get_state_dict(model, optimizer)[1]}
    dcp.load(state, checkpoint_id=path)  # the control: plain DCP runs the payload, and lr = its result
    assert marker.exists() and state["optimizer"]["param_groups"][0]["lr"] == 0


def test_tampered_rank_local_metadata_is_refused(tmp_path):
    """DCP falls back to `__<rank>.metadata` when `.metadata` fails to load: such files are checked too."""
    path, _, _ = _saved(tmp_path)
    (path / "__0.metadata").write_bytes(pickle.dumps(_Payload(tmp_path / "pwned")))
    with pytest.raises(ValueError, match=r"__0\.metadata: global posix\.system is not"):
        load_checkpoint(path, model=_mlp()[0], optimizer=None)
    assert not (tmp_path / "pwned").exists()


def test_entry_outside_the_directory_is_refused(tmp_path):
    path, _, _ = _saved(tmp_path)
    meta = pickle.loads((path / ".metadata").read_bytes())
    key = next(iter(meta.storage_data))
    info = meta.storage_data[key]
    meta.storage_data[key] = type(info)("../../outside.distcp", info.offset, info.length,
                                        info.transform_descriptors)
    (path / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(ValueError, match=r"points to '\.\./\.\./outside\.distcp', not a file of"):
        load_checkpoint(path, model=_mlp()[0], optimizer=None)


def test_tampered_rng_file_is_refused(tmp_path):
    path, _, _ = _saved(tmp_path)
    torch.save({"python": _Payload(tmp_path / "pwned")}, path / "rng-rank-00000.pt")
    with pytest.raises(ValueError, match=r"rng-rank-00000\.pt does not load with torch\.load\(weights_only"):
        load_checkpoint(path, model=_mlp()[0], optimizer=None)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("text, match", [
    ('{"step": "999", "sampler": {}}', r'"step" must be the checkpoint\'s step 3 \(an int\), got \'999\''),
    ('{"step": 4}', r'"step" must be the checkpoint\'s step 3'),
    ('{"step": true}', r'"step" must be'),
    ("[3]", r"must hold a JSON object .*got list"),
    ('{"step": 3, "x": NaN}', r"is not a readable JSON file: NaN is not JSON"),
    ("{", r"is not a readable JSON file"),
    ('{"step": 3}', r"has no 'sampler' \(keys: \['step'\]\)"),
    ('{"step": 3, "sampler": [0, 4]}', r"'sampler' must be dict, got list"),
])
def test_extra_state_is_validated(tmp_path, text, match):
    path, _, _ = _saved(tmp_path)
    (path / "extra_state.json").write_text(text)
    with pytest.raises(ValueError, match=r"extra_state\.json.*" + match):
        load_checkpoint(path, model=_mlp()[0], optimizer=None, expect={"step": int, "sampler": dict})


def test_expect_types(tmp_path):
    model, _ = _mlp()
    save_checkpoint(tmp_path, 1, model=model, optimizer=None,
                    extra_state={"n": 2, "lr": 1, "flag": True, "kl": None})
    path = tmp_path / "step-00000001"
    assert load_checkpoint(path, model=model, optimizer=None,
                           expect={"n": int, "lr": float, "flag": bool, "kl": (float, type(None))})["lr"] == 1
    with pytest.raises(ValueError, match="'flag' must be int, got bool True"):
        load_checkpoint(path, model=model, optimizer=None, expect={"flag": int})
    with pytest.raises(ValueError, match="'kl' must be float, got NoneType"):
        load_checkpoint(path, model=model, optimizer=None, expect={"kl": float})


def test_marker_is_validated_and_save_checks_the_step(tmp_path):
    path, _, _ = _saved(tmp_path)
    moved = path.with_name("step-00000004")
    path.rename(moved)
    with pytest.raises(ValueError, match=r'checkpoint\.json must be a JSON object with "step": 4'):
        load_checkpoint(moved, model=_mlp()[0], optimizer=None)
    (moved / "checkpoint.json").write_text('{"step": 4, "world_size": "2"}')
    with pytest.raises(ValueError, match=r'"world_size" must be an int >= 1'):
        load_checkpoint(moved, model=_mlp()[0], optimizer=None)
    with pytest.raises(ValueError, match=r"extra_state\['step'\] must be the step being saved \(5\)"):
        save_checkpoint(tmp_path / "other", 5, model=_mlp()[0], optimizer=None, extra_state={"step": 4})


def _worker(rank: int, world: int, init_file: str, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # a hang fails the test instead of blocking it
    try:
        model, _ = _mlp()
        path = save_checkpoint(root, 2, model=model, optimizer=None, extra_state={"step": 2})
        dist.barrier()
        try:
            # only rank 1 asks for a key the file lacks (as if its copy differed): both ranks must raise
            load_checkpoint(path, model=model, optimizer=None, expect={"missing" if rank == 1 else "step": int})
            outcome = "loaded"
        except ValueError as e:
            outcome = str(e)
        Path(root, f"r{rank}.txt").write_text(outcome)
        dist.barrier()  # both ranks still in step with each other
    finally:
        dist.destroy_process_group()


def test_two_ranks_both_raise_when_one_rank_refuses():
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_worker, args=(2, os.path.join(tmp, "init"), os.path.join(tmp, "ck")),
                                    nprocs=2, join=True)
        outcomes = [Path(tmp, "ck", f"r{r}.txt").read_text() for r in range(2)]
    assert outcomes[0] == outcomes[1]
    assert "has no 'missing'" in outcomes[0]  # rank 1's refusal, raised on rank 0 too
