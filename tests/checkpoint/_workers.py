"""Processes the checkpoint tests start: FSDP2 ranks (torch.multiprocessing.spawn) and a save to kill."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch


def tiny_training_step(model, optimizer, *, seed: int) -> float:
    """One AdamW step on a fixed random token batch (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (2, 12), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter as a full tensor (gathered from DTensor shards)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def full_exp_avg(model, optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        t = optimizer.state[p]["exp_avg"]
        out[n] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()
    return out


def _sharded_llama(model_dir: str, seed: int):
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if seed:  # a different starting point, so a load that does nothing cannot pass
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def fsdp_worker(rank: int, world: int, init_file: str, model_dir: str, out: str) -> None:
    """Rank `rank` of 2: train, save, train on (reference); fresh model, load, same step; compare."""
    import torch.distributed as dist

    from rlprims.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out_dir = Path(out)
        model, opt = _sharded_llama(model_dir, seed=0)
        assert type(model.model.embed_tokens.weight).__name__ == "DTensor"
        tiny_training_step(model, opt, seed=1)
        torch.manual_seed(100 + rank)  # per-rank RNG, as after `launch.init` + rank-dependent sampling
        save_checkpoint(out_dir / "ckpt", 1, model=model, optimizer=opt,
                        extra_state={"sampler": {"epoch": 0, "offset": 8}, "rank0_only": rank})
        draws_after_save = torch.rand(4)
        saved_params = full_params(model)
        tiny_training_step(model, opt, seed=2)
        reference = full_params(model)
        export_hf(model, out_dir / "hf")  # the weights after step 2, gathered on rank 0
        ref_exp_avg = full_exp_avg(model, opt)

        torch.manual_seed(999)
        model2, opt2 = _sharded_llama(model_dir, seed=7)
        extra = load_checkpoint(latest_checkpoint(out_dir / "ckpt"), model=model2, optimizer=opt2)
        draws_after_load = torch.rand(4)
        loaded_params = full_params(model2)
        tiny_training_step(model2, opt2, seed=2)
        resumed = full_params(model2)
        result = {
            "extra": extra,
            "rng_equal": torch.equal(draws_after_save, draws_after_load),
            "loaded_equal": all(torch.equal(saved_params[n], loaded_params[n]) for n in saved_params),
            "resumed_equal": all(torch.equal(reference[n], resumed[n]) for n in reference),
            "exp_avg_equal": all(torch.equal(ref_exp_avg[n], t)
                                 for n, t in full_exp_avg(model2, opt2).items()),
            "changed_by_step": not all(torch.equal(saved_params[n], reference[n]) for n in reference),
            "draws": draws_after_save.tolist(),
        }
        if rank == 0:
            torch.save({"saved": saved_params, "reference": reference}, out_dir / "params.pt")
        (out_dir / f"result-{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def killed_save_main(root: str, ready_file: str) -> None:
    """Saves step 1, then starts step 2 with a writer that stalls after DCP wrote its shards."""
    import torch.distributed.checkpoint as dcp

    from rlprims.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    save_checkpoint(root, 1, model=model, optimizer=opt, extra_state={"step": 1})
    with torch.no_grad():
        model.weight.add_(1.0)
    original_save = dcp.save

    def stalling_save(*args, **kwargs):
        result = original_save(*args, **kwargs)
        Path(ready_file).write_text("mid-save")
        time.sleep(600)  # the test SIGKILLs us here
        return result

    dcp.save = stalling_save
    save_checkpoint(root, 2, model=model, optimizer=opt, extra_state={"step": 2})


if __name__ == "__main__":
    killed_save_main(sys.argv[1], sys.argv[2])
    os._exit(0)
