"""What one training micro-batch of the GRPO update costs on one GPU, and where the time goes.

The body is `recipes/grpo.py`'s update loop: `response_logprobs_and_entropy` over a packed micro-batch
(FSDP2, world 1, fp32 master weights, bf16 compute, the Triton log-prob kernel), `ppo_clip_loss`,
`aggregate_token_mean` with the step-wide normalizer, `backward`, and the recipe's per-micro-batch
`.item()` reads; no optimizer step (it is per step, not per micro-batch). The rows are GRPO-like:
`--seqs` sequences of a 20-40-token prompt and a `--response-len`-token response on a random-init
Qwen2 geometry (no downloads), cut into token-balanced micro-batches by `step_micro_batches`.

For each variant and token budget it prints the time per micro-batch, the update's tokens/s, its MFU
(6 · params · tokens / time over the bf16 matmul rate measured at the start) and peak memory, then a
torch.profiler summary (host time by op, device time by kernel, device-idle share) and a cProfile of
the baseline: the numbers behind docs/benchmarks.md's "per-micro-batch cost" section.

Variants (each on a freshly sharded model; "+ac" adds activation checkpointing of every decoder layer):
  base       the library as before this benchmark: FSDP2 gathers and reduces in every micro-batch
  devpack    base with packing on the device (the old path: ~10 host waits per micro-batch)
  noraf      reshard_after_forward=False (no second all-gather in backward)
  gather     reshard_after_forward=False + `gather_once`: one gather and one reduce per mini-batch
  gather+ac  gather with activation checkpointing
  compile    gather + torch.compile of every decoder layer (dynamic shapes)
  cparts     gather + torch.compile of each layer's MLP and two RMSNorms (no graph break: the
             attention stays eager)
  liger      gather + Liger's fused RMSNorm, RoPE and SwiGLU kernels (what the recipes run on CUDA where
             liger-kernel is installed: `--use-liger` unset; CUDA only)
  gather1    gather with the whole model as one FSDP2 unit (`shard_model(..., per_layer=False)`: one set
  liger1     of FSDP2 hooks per forward / backward instead of one per layer), and liger the same way
  ...h       any variant but devpack with an "h" appended (e.g. ligerh): the rows kept on the CPU and the
             forward on the GPU (`device=`), as the recipes run since 2026-12-03 night: packing waits
             for nothing, so the next micro-batch is queued while the GPU finishes the last backward.
             Without "h" the rows are on the GPU and each micro-batch waits once (the copy of its masks).

Jobs are SIZE:VARIANT:BUDGET triples (--jobs); the defaults measure the 0.5B geometry of the GRPO issue
(49,152-token vocabulary) and a few 1.5B / 7B points. `grad_norm` (the mini-batch's gradient norm before
zeroing) must agree across the variants of one size (same data, same initial weights).

    PYTHONPATH=. python benchmarks/micro_batch.py
    PYTHONPATH=. python benchmarks/micro_batch.py --jobs tiny:base:64,tiny:gather:64 --seqs 8 \\
        --response-len 16
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import sys
import time

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

from benchmarks.weight_sync import GEOMETRIES  # noqa: E402

VARIANTS = ("base", "devpack", "noraf", "gather", "gather+ac", "base+ac", "compile", "cparts", "liger",
            "gather1", "liger1")
GATHERED = ("gather", "compile", "cparts", "liger")  # the variants built on gather_once (+ their "1" forms)


def parse_variant(variant: str) -> tuple[str, bool]:
    """(the variant without its "h" suffix, whether the rows stay on the host)."""
    host = variant.endswith("h") and variant[:-1] in VARIANTS and variant != "devpackh"
    return (variant[:-1] if host else variant), host
DEFAULT_JOBS = ",".join([
    "0.5b:base:8192", "0.5b:gather:8192", "0.5b:base:16384", "0.5b:gather:16384", "0.5b:base:32768",
    "0.5b:gather:32768", "0.5b:gather+ac:32768", "0.5b:gather+ac:65536", "0.5b:noraf:8192",
    "1.5b:base:16384", "1.5b:gather:16384", "1.5b:gather+ac:32768", "7b:base+ac:8192", "7b:base+ac:16384",
    "0.5b:compile:16384", "0.5b:liger:16384", "0.5b:liger:26624", "0.5b:liger:32768", "0.5b:gather1:16384",
    "0.5b:liger1:16384", "0.5b:liger1:26624", "0.5b:ligerh:26624", "0.5b:liger1h:26624",
])


def bf16_peak_tflops(device: torch.device) -> float:
    """Measured rate of an 8192³ bf16 matmul (median of 10 after warm-up), TFLOP/s."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * 8192**3 / times[len(times) // 2] / 1e12


def devpack_logprobs_and_entropy(model, input_ids, attention_mask, response_mask, *, temperature):
    """The packed forward as it was before host packing: pack_sequences on the device."""
    from rlprims.kernels import logprobs_and_entropy
    from rlprims.models.packed import packed_hidden_states
    from rlprims.ops.logprobs import LogprobsEntropy
    from rlprims.ops.packing import pack_sequences, packed_response_positions

    packed = pack_sequences(input_ids, attention_mask)
    positions = packed_response_positions(response_mask, packed)
    hidden = packed_hidden_states(model, packed)
    weight = model.get_output_embeddings().weight
    lp, ent = logprobs_and_entropy(hidden.index_select(0, positions - 1), weight,
                                   packed.input_ids.index_select(0, positions), temperature=temperature)

    def padded(v):
        flat = torch.zeros(packed.batch_size * packed.seq_len, dtype=v.dtype, device=v.device)
        return flat.index_copy(0, packed.indices.index_select(0, positions), v).view(
            packed.batch_size, packed.seq_len)

    return LogprobsEntropy(padded(lp), padded(ent))


def build(args, size: str, variant: str, device: torch.device):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rlprims.models.packed import register_packed_attention
    from rlprims.parallel import build_mesh, decoder_layers, shard_model

    geo = dict(GEOMETRIES[size])
    if args.vocab and size != "7b":
        geo["vocab_size"] = args.vocab
    cfg = Qwen2Config(max_position_embeddings=4096, **geo)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32,
                                                 attn_implementation=register_packed_attention())
    if variant == "compile":
        for layer in decoder_layers(model):
            layer.compile(dynamic=True)
    if variant.startswith("liger"):  # Liger's fused RMSNorm, RoPE and SwiGLU (what --use-liger does)
        from rlprims.models.fused import use_liger_kernels

        use_liger_kernels(model)
    if variant == "cparts":  # the memory-bound pieces around the attention, each one graph (no break)
        for layer in decoder_layers(model):
            for part in (layer.mlp, layer.input_layernorm, layer.post_attention_layernorm):
                part.compile(dynamic=True, fullgraph=True)
    cuda = device.type == "cuda"
    shard_model(model, build_mesh(device_type=device.type), param_dtype=torch.bfloat16 if cuda else None,
                reshard_after_forward=not variant.startswith(("noraf", *GATHERED)),
                activation_checkpointing=variant.endswith("+ac"), per_layer=not variant.endswith("1"))
    return model, cfg


def rows(args, cfg, device):
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(20, 41, (args.seqs,), generator=g)
    P, R = int(prompt.max()), args.response_len
    ids = torch.randint(10, cfg.vocab_size, (args.seqs, P + R), generator=g)
    pos = torch.arange(P + R)
    attention = (pos[None] >= (P - prompt)[:, None])  # left-padded prompts, full responses
    response = (pos[None] >= P).expand(args.seqs, -1).clone()
    adv = torch.randn(args.seqs, generator=g)[:, None].expand(-1, P + R).contiguous()
    on_device = [t.to(device) for t in (ids, attention, response, adv)]
    return dict(device=on_device, host=[ids, attention, response]), (prompt + R).tolist()


def run_mini_batch(model, data, plan, *, devpack: bool, gather: bool, host: bool = False):
    """One mini-batch of the recipe's update loop; returns the gradient norm before zeroing."""
    from rlprims.models.packed import response_logprobs_and_entropy
    from rlprims.ops import aggregate_token_mean, ppo_clip_loss
    from rlprims.parallel import gather_once, step_loss_normalizers

    ids, attention, response, adv = data["device"]
    norms = step_loss_normalizers([response[p] for p in plan])
    stats = 0.0
    for part in gather_once(model, plan, enabled=gather):
        idx = torch.tensor(part, dtype=torch.long, device=ids.device)
        if devpack:
            out = devpack_logprobs_and_entropy(model, ids[idx], attention[idx], response[idx], temperature=1.0)
        elif host:  # the recipes' path: rows cut and packed on the host, the forward on the GPU
            cpu_idx = torch.tensor(part, dtype=torch.long)
            out = response_logprobs_and_entropy(model, *(t[cpu_idx] for t in data["host"]), temperature=1.0,
                                                device=ids.device)
        else:
            out = response_logprobs_and_entropy(model, ids[idx], attention[idx], response[idx], temperature=1.0)
        m = response[idx]
        pg = ppo_clip_loss(out.logprobs, out.logprobs.detach(), adv[idx], m, clip_low=0.2, clip_high=0.28)
        loss = aggregate_token_mean(pg.loss, m, num_tokens=norms.num_tokens)
        loss.backward()
        # the recipe's per-micro-batch reads
        stats += m.sum().item() / max(norms.num_tokens.item(), 1)
        stats += loss.item() + pg.metrics["pg_clipfrac"].item() + pg.metrics["ppo_kl"].item()
        stats += aggregate_token_mean(out.entropy.detach(), m, num_tokens=norms.num_tokens).item()
    norm = torch.stack([p.grad.to_local().float().norm() for p in model.parameters()]).norm().item()
    model.zero_grad(set_to_none=True)
    return norm


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(args, size, variant, budget, device, peak_tflops, out_dir):
    from rlprims.parallel import step_micro_batches

    t_build = time.perf_counter()
    name, host = parse_variant(variant)
    model, cfg = build(args, size, name, device)
    data, lengths = rows(args, cfg, device)
    (plan,) = step_micro_batches(lengths, max_tokens=budget)
    params = sum(p.numel() for p in model.parameters())
    kw = dict(devpack=name == "devpack", gather=name.startswith(GATHERED), host=host)
    state_bytes = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    t0 = time.perf_counter()
    run_mini_batch(model, data, plan, **kw)  # warm-up (compiles, autotune, allocator)
    sync(device)
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        grad_norm = run_mini_batch(model, data, plan, **kw)
        sync(device)
        times.append(time.perf_counter() - t0)
    t = min(times)
    tokens = sum(lengths)
    mb_tokens = max(sum(lengths[i] for i in part) for part in plan)
    row = dict(size=size, variant=variant, budget=budget, micro_batches=len(plan), tokens=tokens,
               grad_norm=round(grad_norm, 5),
               s_per_micro_batch=round(t / len(plan), 4), update_s=round(t, 3),
               tokens_per_s=round(tokens / t), mfu=round(6 * params * tokens / t / 1e12 / peak_tflops, 3),
               warmup_s=round(warm_s, 1), build_s=round(t0 - t_build, 1), params_b=round(params / 1e9, 3))
    if device.type == "cuda":
        row["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        # peak over the parameters (+ fp32 grads: 4 bytes/param), per token of the largest micro-batch
        row["act_kib_per_token"] = round((torch.cuda.max_memory_allocated() - state_bytes - 4 * params)
                                         / mb_tokens / 1024, 1)
    if f"{size}:{variant}:{budget}" == args.profile:
        profile(model, data, plan, device, out_dir, **kw)
    del model, data
    return row


def profile(model, data, plan, device, out_dir, **kw):
    """torch.profiler and cProfile over one mini-batch of the baseline; summaries printed, full in out_dir."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with tprofile(activities=acts) as prof:
        run_mini_batch(model, data, plan, **kw)
        sync(device)
    wall = time.perf_counter() - t0
    ka = prof.key_averages()
    host = ka.table(sort_by="self_cpu_time_total", row_limit=35, max_name_column_width=60)
    dev = ka.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60) \
        if device.type == "cuda" else ""
    kernel_us = sum(e.self_device_time_total for e in ka if e.device_type.name == "CUDA")
    syncs = {e.key: (e.count, round(e.cpu_time_total / 1e3, 1)) for e in ka
             if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense",
                          "aten::item", "cudaMemcpyAsync", "aten::nonzero", "cudaLaunchKernel",
                          "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
                          "cudaEventSynchronize")}
    fsdp = {e.key: round(e.cpu_time_total / 1e3, 1) for e in ka if e.key.startswith("FSDP::")}
    pr = cProfile.Profile()
    sync(device)
    pr.enable()
    run_mini_batch(model, data, plan, **kw)
    sync(device)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(60)
    summary = dict(micro_batches=len(plan), wall_s=round(wall, 3), device_kernel_s=round(kernel_us / 1e6, 3),
                   device_busy=round(kernel_us / 1e6 / wall, 3), syncs_and_launches=syncs,
                   fsdp_ms=fsdp)
    with open(os.path.join(out_dir, "profile_host.txt"), "w") as f:
        f.write(host)
    with open(os.path.join(out_dir, "profile_device.txt"), "w") as f:
        f.write(dev)
    with open(os.path.join(out_dir, "profile_cprofile.txt"), "w") as f:
        f.write(s.getvalue())
    print("PROFILE " + json.dumps(summary), flush=True)
    print("\n".join(host.splitlines()[:40]), flush=True)
    print("\n".join(s.getvalue().splitlines()[:70]), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", default=DEFAULT_JOBS,
                   help=f"SIZE:VARIANT:BUDGET,...; sizes {sorted(GEOMETRIES)}, "
                   f"variants {VARIANTS}")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary size, except 7b (0 = the geometry's)")
    p.add_argument("--seqs", type=int, default=128, help="rows in the measured mini-batch")
    p.add_argument("--response-len", type=int, default=512)
    p.add_argument("--profile", default="0.5b:gather:8192", help="the job to profile (SIZE:VARIANT:BUDGET)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--time-limit", type=float, default=400, help="skip what would start after this many s")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the profile files")
    args = p.parse_args(argv)
    from rlprims.launch import init

    start = time.perf_counter()
    ctx = init(seed=0)
    device = ctx.device
    peak = bf16_peak_tflops(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, "
          f"bf16 matmul {peak:.0f} TFLOP/s", flush=True)
    os.makedirs(args.out, exist_ok=True)
    jobs = []
    for job in args.jobs.split(","):
        size, variant, budget = job.split(":")
        if size not in GEOMETRIES or parse_variant(variant)[0] not in VARIANTS:
            p.error(f"bad job {job!r}: size from {sorted(GEOMETRIES)}, variant from {VARIANTS}")
        jobs.append((size, variant, int(budget)))
    table = []
    for size, variant, budget in jobs:
        if time.perf_counter() - start > args.time_limit:
            print(f"skipped {size} {variant} {budget}: time limit", flush=True)
            continue
        try:
            row = measure(args, size, variant, budget, device, peak, args.out)
        except Exception as e:  # noqa: BLE001 - a failing variant is reported, the others still run
            row = dict(size=size, variant=variant, budget=budget, error=f"{type(e).__name__}: {str(e)[:300]}")
        gc.collect()  # FSDP modules hold reference cycles: free the last model before the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print("ROW " + json.dumps(row), flush=True)
        table.append(row)
    cols = ["size", "variant", "budget", "micro_batches", "s_per_micro_batch", "update_s", "tokens_per_s",
            "mfu",
            "peak_alloc_gib", "act_kib_per_token", "grad_norm", "warmup_s", "error"]
    cols = [c for c in cols if any(c in r for r in table)]
    print(f"# micro-batch cost, {time.strftime('%Y-%m-%d')}, vocab {args.vocab} (7b: its own), "
          f"{args.seqs} rows × (20-40 + {args.response_len}) tokens, bf16 peak {peak:.0f} TFLOP/s")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in table:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    with open(os.path.join(args.out, "micro_batch.jsonl"), "w") as f:
        for r in table:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
