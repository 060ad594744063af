"""FSDP2 CPU offload, end to end in one process: `python tests/parallel/_offload_worker.py OUT_DIR [cuda|cpu]`.

On CUDA this is the path only a GPU takes: the sharded parameters, gradients and Adam state are CPU
tensors while the process group (NCCL) reaches only the GPU, so the gradient clipping
(`clip_sharded_grad_norm_`), the weight gather (`engine_weights`) and the HF export must go through the
GPU. Checked against the same model kept whole on the device:
  1. two `optimizer_step`s (Adam, the norm clipped to 0.3 of the first step's) give the same gradient
     norms and the same weights;
  2. a DCP checkpoint of the offloaded model and optimizer, loaded into a fresh offloaded pair, gives the
     same weights and Adam state, and the next step is identical to the original's;
  3. `export_hf` writes weights that load back equal to the gathered ones.
Writes OUT_DIR/result.json ({"ok": true, ...}) on success; any failed check raises.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rlprims.checkpoint import export_hf, load_checkpoint, save_checkpoint  # noqa: E402
from rlprims.launch import init  # noqa: E402
from rlprims.parallel import build_mesh, engine_weights, optimizer_step, shard_model  # noqa: E402
from rlprims.parallel.fsdp import offloaded_to_cpu  # noqa: E402
from tests.parallel.test_fsdp import batch, loss_fn, make_model  # noqa: E402


def _parts(device):
    ids, mask = batch()
    ids, mask = ids.to(device), mask.to(device)
    return [(ids[:2], mask[:2], mask.sum()), (ids[2:], mask[2:], mask.sum())]  # two micro-batches


def _step(model, opt, device, max_norm):
    return optimizer_step(model, opt, _parts(device), lambda p: (loss_fn(model, *p), {}), max_grad_norm=max_norm)[0]


def _full(model):
    return {n: t.detach().cpu().clone() for n, t in engine_weights(model)}


def _adam_state(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, s in opt.state.items():
        for k in ("exp_avg", "exp_avg_sq"):
            t = s[k]
            out[f"{names[id(p)]}.{k}"] = (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()
    return out


def main(out_dir: str, device: str) -> None:
    out = Path(out_dir)
    ctx = init(seed=0, device=device)
    mesh = build_mesh(device_type=ctx.device.type)
    adam = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)

    ref = make_model().to(ctx.device)
    ref_opt = torch.optim.AdamW(ref.parameters(), **adam)
    first = _step(ref, ref_opt, ctx.device, 1e9)
    max_norm = 0.3 * first  # the second step is clipped
    ref_norms = [first, _step(ref, ref_opt, ctx.device, max_norm)]

    model = shard_model(make_model(), mesh, cpu_offload=True)
    assert offloaded_to_cpu(model) == (ctx.device.type == "cuda"), "CPU shards on a GPU mesh expected"
    assert all(p.to_local().device.type == "cpu" for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), **adam)
    norms = [_step(model, opt, ctx.device, 1e9), _step(model, opt, ctx.device, max_norm)]
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=1e-6)
    got, want = _full(model), {n: p.detach().cpu() for n, p in ref.named_parameters()}
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")

    save_checkpoint(out / "ckpt", 2, model=model, optimizer=opt, extra_state={"step": 2})
    fresh = shard_model(make_model(seed=1), mesh, cpu_offload=True)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), **adam)
    _step(fresh, fresh_opt, ctx.device, 1e9)  # Adam state exists, and differs, before the load
    extra = load_checkpoint(out / "ckpt" / "step-00000002", model=fresh, optimizer=fresh_opt)
    assert extra == {"step": 2}, extra
    assert all(p.to_local().device.type == "cpu" for p in fresh.parameters()), "the load moved shards"
    loaded = _full(fresh)
    for n in got:
        assert torch.equal(loaded[n], got[n]), n
    state, fresh_state = _adam_state(model, opt), _adam_state(fresh, fresh_opt)
    assert state.keys() == fresh_state.keys()
    for k in state:
        assert torch.equal(fresh_state[k], state[k]), k
    assert _step(fresh, fresh_opt, ctx.device, max_norm) == _step(model, opt, ctx.device, max_norm)
    after, fresh_after = _full(model), _full(fresh)
    for n in after:
        assert torch.equal(fresh_after[n], after[n]), n

    export_hf(model, out / "hf")
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    for n, t in back.state_dict().items():
        assert torch.equal(t, after[n]), n
    (out / "result.json").write_text(json.dumps({"ok": True, "device": str(ctx.device), "norms": norms,
                                                 "offloaded": offloaded_to_cpu(model)}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cuda")
