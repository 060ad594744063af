"""FSDP2 on gloo with 2 and 4 CPU processes, compared with one unsharded process.

One spawn per world size runs every check (process start + imports dominate the cost):
gathered weights == the unsharded model's exactly (fp32 and bf16, bounded buckets, renaming);
one SGD step on W ranks (1/W of the batch each) == the same step on one process with the whole batch;
DTensor resharding to the engine's TP=2 layout == slicing the full tensor as vLLM does; `gather_once`
micro-batches with activation checkpointing or CPU offload give the same gradients and new weights.
A failing worker's assertion comes back as the test's error (mp.spawn re-raises it with the traceback).
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.tolerances import GRAD_SPLIT, REORDER

BUCKET = 20_000  # bytes: several buckets for the ~0.2 MB model below, one tensor (embedding 64 KB) alone


def tiny_config(**overrides):
    from transformers import LlamaConfig

    # Odd vocabulary (250: FSDP chunks 125/125 on 2 ranks, 63/63/63/61 on 4; vLLM pads it to 256),
    # GQA with 2 kv heads, untied lm_head (the engine test covers tied embeddings).
    kw = dict(
        vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_model(seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config())
    with torch.no_grad():  # norms away from 1 so a wrong gather of them shows
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 250, (4, 7), generator=g)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False  # uneven token counts per rank
    mask[3, 2:] = False
    return ids, mask


def loss_fn(model, ids, mask, num_tokens):
    """Token-sum cross-entropy / global token count: summed over ranks it is the whole batch's mean."""
    logits = model(ids[:, :-1]).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return torch.where(mask, nll, 0.0).sum() / num_tokens


def reference_step():
    """One SGD step of the unsharded model on the whole batch: (weights after, grads)."""
    model = make_model()
    ids, mask = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    loss_fn(model, ids, mask, mask.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, grads


def expected_tp_slice(name, full, tp_rank, tp=2):
    """vLLM's cut written out for tiny_config at TP=2 (heads 4 x 16, kv 2 x 16, vocab 250 -> 256)."""
    if "embed_tokens" in name or "lm_head" in name:  # 256 / 2 = 128 rows per rank, zeros past 250
        shard = torch.zeros(128, full.shape[1])
        rows = full[128 * tp_rank : min(128 * (tp_rank + 1), 250)]
        shard[: rows.shape[0]] = rows
        return shard
    if any(k in name for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
        n = full.shape[0] // tp  # q 64 -> 32, k/v 32 -> 16 (one kv head each), gate/up 96 -> 48
        return full[n * tp_rank : n * (tp_rank + 1)]
    if any(k in name for k in ("o_proj", "down_proj")):
        n = full.shape[1] // tp
        return full[:, n * tp_rank : n * (tp_rank + 1)]
    return full  # norms


def _worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    torch.set_num_threads(1)
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from rlprims.parallel import (
        build_mesh,
        engine_tp_layout,
        engine_tp_slice,
        engine_weights,
        gather_once,
        reshard_for_engine,
        shard_model,
        weight_buckets,
    )

    mesh = build_mesh(device_type="cpu", tp=2, timeout_s=60)
    assert mesh.mesh_dim_names == ("dp", "tp") and tuple(mesh.shape) == (world // 2, 2)
    assert mesh.get_local_rank("tp") == rank % 2 and mesh.get_local_rank("dp") == rank // 2

    # --- gathered weights == unsharded weights, exactly --------------------------------------------
    full = {k: v.clone() for k, v in make_model().state_dict().items()}
    model = shard_model(make_model(), mesh)
    params = dict(model.named_parameters())
    assert all(isinstance(p, DTensor) for p in params.values())
    assert params["model.embed_tokens.weight"].to_local().shape[0] == (125 if world == 2 else (63 if rank < 3 else 61))
    buckets = list(weight_buckets(model, bucket_bytes=BUCKET))
    for b in buckets:  # bounded: a bucket over the limit holds one tensor
        assert len(b) == 1 or sum(t.numel() * t.element_size() for _, t in b) <= BUCKET
    assert len(buckets) > 3
    got = [kv for b in buckets for kv in b]
    assert [k for k, _ in got] == list(full)
    for k, t in got:
        assert not isinstance(t, DTensor) and torch.equal(t, full[k]), k
    streamed = list(engine_weights(model, bucket_bytes=BUCKET, dtype=torch.bfloat16, name_map=lambda n: "x." + n))
    assert [k for k, _ in streamed] == ["x." + k for k in full]
    for k, t in streamed:
        assert t.dtype == torch.bfloat16 and torch.equal(t, full[k[2:]].to(torch.bfloat16)), k

    # HF export's two ways to rank 0's CPU: torch's state dict, and buckets through the mesh's device
    # (the way for CPU-offloaded shards on GPUs); only rank 0 holds them
    from rlprims.checkpoint import _full_state_dict
    from rlprims.parallel import offloaded_to_cpu

    assert not offloaded_to_cpu(model)  # a CPU mesh: its CPU shards are not "offloaded"
    via_torch = _full_state_dict(model, through_buckets=False)
    via_buckets = _full_state_dict(model, through_buckets=True)
    assert list(via_buckets) == (list(full) if rank == 0 else [])
    for k, t in via_buckets.items():
        assert t.device.type == "cpu" and torch.equal(t, via_torch[k]) and torch.equal(t, full[k]), k

    # --- TP resharding: DTensor -> the engine's TP=2 shards == vLLM's slicing of the full tensor ----
    layout = engine_tp_layout(model.config, tp_size=2)
    for name, p in params.items():
        shard = reshard_for_engine(p, mesh, name=name, layout=layout)
        want = expected_tp_slice(name, full[name], rank % 2)
        assert torch.equal(shard, want), name
        assert torch.equal(engine_tp_slice(full[name], name=name, layout=layout, tp_rank=rank % 2), want), name

    # --- one optimizer step, 1/W of the batch per rank == the whole batch on one process -----------
    # SGD, not Adam: Adam's first step is ~lr*sign(g), so a gradient of ~1e-8 that differs by its last
    # ulps (sums over ranks vs. over one batch) moves a weight by ~lr; SGD keeps the comparison tight.
    ref_weights, ref_grads = reference_step()
    assert all(not torch.equal(ref_weights[n], full[n]) for n in ref_weights)  # the step moved every weight
    for kw in (dict(reshard_after_forward=True), dict(reshard_after_forward=False)):
        model = shard_model(make_model(), mesh, **kw)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
        ids, mask = batch()
        rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
        loss_fn(model, ids[rows], mask[rows], mask.sum()).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad.full_tensor(), ref_grads[n], **GRAD_SPLIT, msg=lambda m: f"{n}: {m}")
        opt.step()
        for n, t in engine_weights(model):
            torch.testing.assert_close(t, ref_weights[n], **REORDER, msg=lambda m: f"{n}: {m}")
        if kw["reshard_after_forward"]:
            continue
        # one FSDP unit for the whole model: the same gathered weights after the step
        for n, t in engine_weights(shard_model(make_model(), mesh, per_layer=False)):
            assert torch.equal(t, full[n]), n

    # --- gather_once with activation checkpointing or CPU offload: one row per micro-batch, the same
    # gradients; after the step the next forward sees the new weights (nothing stays gathered) --------
    after = make_model()
    after.load_state_dict(ref_weights)
    ids, mask = batch()
    with torch.no_grad():
        ref_loss_after = loss_fn(after, ids, mask, mask.sum())
    for ac, offload, per_layer in ((False, False, True), (True, False, True), (False, True, True),
                                   (False, False, False), (True, False, False)):
        model = shard_model(make_model(), mesh, reshard_after_forward=False, activation_checkpointing=ac,
                            cpu_offload=offload, per_layer=per_layer)
        assert sum(isinstance(m, FSDPModule) for m in model.modules()) == (3 if per_layer else 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
        mine = [[r] for r in range(rank * 4 // world, (rank + 1) * 4 // world)]
        for rows in gather_once(model, mine):
            loss_fn(model, ids[rows], mask[rows], mask.sum()).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad.full_tensor(), ref_grads[n], **GRAD_SPLIT, msg=lambda m: f"{n}: {m}")
        opt.step()
        with torch.no_grad():
            mine_rows = [r for rows in mine for r in rows]
            loss = loss_fn(model, ids[mine_rows], mask[mine_rows], mask.sum())
        dist.all_reduce(loss)
        torch.testing.assert_close(loss, ref_loss_after, **REORDER)

    # --- the clipping used for CPU-offloaded shards: one scalar all-reduced, torch's formula ----------
    from rlprims.parallel.step import clip_sharded_grad_norm_

    ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref_grads.values()]))
    for max_norm in (1e9, 0.3 * ref_norm.item()):  # not clipped, clipped to 0.3 of the norm
        model = shard_model(make_model(), mesh, cpu_offload=True)
        rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
        loss_fn(model, ids[rows], mask[rows], mask.sum()).backward()
        norm = clip_sharded_grad_norm_(model.parameters(), max_norm, device=torch.device("cpu"))
        torch.testing.assert_close(norm, ref_norm, **GRAD_SPLIT)
        scale = min(1.0, max_norm / (ref_norm.item() + 1e-6))
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad.full_tensor(), ref_grads[n] * scale, **GRAD_SPLIT,
                                       msg=lambda m: f"{n}: {m}")
    with pytest.raises(ValueError, match="sharded over one mesh"):
        clip_sharded_grad_norm_(make_model().parameters(), 1.0, device=torch.device("cpu"))
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_gather_step_and_tp_reshard(world):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init")), nprocs=world, join=True)


def test_cpu_offload_step_checkpoint_and_export(tmp_path):
    """tests/parallel/_offload_worker.py on gloo (its CUDA run, the GPU-only group, is in tests/gpu): two
    clipped AdamW steps of the offloaded model equal the whole model's; a DCP checkpoint restores weights
    and Adam state exactly; export_hf loads back."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(repo / "tests" / "parallel" / "_offload_worker.py"), str(tmp_path),
                           "cpu"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["ok"] and not r["offloaded"] and r["device"] == "cpu", r
