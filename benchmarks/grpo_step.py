"""One GRPO step on one GPU, end to end, with fixed work: tokens/s and where the time goes.

The step is `recipes/grpo.py`'s, on a random-init Qwen2 geometry (no downloads; the engine starts from a
config-only directory with load_format="dummy" and receives the trainer's weights before the first
step): prompts × n samples of exactly `--response-len` tokens (ignore_eos, so every run does the same
work) → random 0/1 scores (fixed seed; the reward function is not what is measured) → `grpo_advantages`
→ one no-grad packed forward for the old log-probs (what verl's `compute_log_prob` does; the recipe skips
it when on-policy) → `ppo_clip_loss` over packed micro-batches with the step-wide token-mean, FSDP2
(fp32 master weights, bf16 compute), AdamW → `update_weights(engine, engine_weights(model))`.

Printed per geometry: median over `--steps` measured steps (after one warm-up) of each phase, tokens/s
per GPU (prompt + response tokens / step time, verl's `perf/throughput`), and peak GPU memory of the
process (trainer + engine share it: the engine's weights and KV cache are allocated by torch too).

    PYTHONPATH=. python benchmarks/grpo_step.py                         # 0.5b then 1.5b, 64 × 8 × 512
    PYTHONPATH=. python benchmarks/grpo_step.py --sizes 0.5b --compile-engine
    PYTHONPATH=. python benchmarks/grpo_step.py --sizes tiny --prompts 4 --n 2 --response-len 16   # CPU smoke
Each geometry runs in its own subprocess (vLLM keeps process-global state).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

from benchmarks.weight_sync import GEOMETRIES  # noqa: E402  (Qwen2 geometries shared with that benchmark)

PHASES = ("gen", "reward", "old_log_prob", "update_actor", "sync")


def one_size(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rlprims.launch import init
    from rlprims.models.packed import (register_packed_attention, response_logprobs,
                                       response_logprobs_and_entropy)
    from rlprims.ops import aggregate_token_mean, grpo_advantages, ppo_clip_loss
    from rlprims.parallel import (build_mesh, engine_weights, shard_model, step_loss_normalizers,
                                  step_micro_batches)
    from rlprims.rollout import create_engine, generate, rollout_sequences, update_weights

    ctx = init(seed=0)
    device, cuda = ctx.device, ctx.device.type == "cuda"
    compute = torch.bfloat16 if cuda else torch.float32
    cfg = Qwen2Config(max_position_embeddings=4096, **GEOMETRIES[args.size])
    tmp = tempfile.mkdtemp(prefix="grpo_step_")
    cfg.save_pretrained(tmp)
    t0 = time.perf_counter()
    engine = create_engine(tmp, max_model_len=args.prompt_len + args.response_len,
                           dtype=str(compute).removeprefix("torch."),
                           seed=0, kv_cache_memory_bytes=int(args.kv_cache_gb * 2**30),
                           gpu_memory_utilization=0.9, enforce_eager=not args.compile_engine,
                           engine_args=dict(load_format="dummy", skip_tokenizer_init=True))
    engine_start = time.perf_counter() - t0
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32,
                                                 attn_implementation=register_packed_attention())
    model = shard_model(model, build_mesh(device_type=device.type), param_dtype=compute if cuda else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)

    def sync() -> None:
        update_weights(engine, engine_weights(model, dtype=compute, bucket_bytes=1 << 30))

    sync()

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    def step(k: int) -> dict[str, float]:
        prompts = torch.randint(10, cfg.vocab_size, (args.prompts, args.prompt_len), generator=g).tolist()
        batch, t_gen = timed(lambda: generate(engine, prompts, n=args.n, temperature=1.0,
                                              max_tokens=args.response_len, ignore_eos=True, seed=k))
        batch = type(batch)(*(t.to(device) for t in batch))
        mask = batch.response_mask

        def reward():
            scores = torch.randint(0, 2, (mask.shape[0],), generator=g).float().to(device)
            return grpo_advantages(scores, mask, group_size=args.n)

        advantages, t_reward = timed(reward)
        P, seqs = batch.prompt_ids.shape[1], rollout_sequences(batch)
        lengths = (batch.prompt_lengths + batch.response_lengths).tolist()
        (plan,) = step_micro_batches(lengths, max_tokens=args.max_tokens_per_micro_batch)
        parts = [torch.tensor(p, dtype=torch.long, device=device) for p in plan]

        def old_log_prob():
            out = torch.zeros_like(batch.rollout_logprobs)
            with torch.no_grad():
                for idx in parts:
                    out[idx] = response_logprobs(model, *(t[idx] for t in seqs), temperature=1.0)[:, P:]
            return out

        old_logprobs, t_old = timed(old_log_prob)

        def update():
            norms = step_loss_normalizers([mask[idx] for idx in parts])
            for idx in parts:
                lp, _ = response_logprobs_and_entropy(model, *(t[idx] for t in seqs), temperature=1.0)
                out = ppo_clip_loss(lp[:, P:], old_logprobs[idx], advantages[idx], mask[idx],
                                    clip_low=0.2, clip_high=0.28)
                aggregate_token_mean(out.loss, mask[idx], num_tokens=norms.num_tokens).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        _, t_update = timed(update)
        _, t_sync = timed(sync)
        times = dict(gen=t_gen, reward=t_reward, old_log_prob=t_old, update_actor=t_update, sync=t_sync)
        times["step"] = sum(times.values())
        times["tokens"] = float(sum(lengths))
        times["micro_batches"] = float(len(parts))
        return times

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step(0)  # warm-up: first-call setup of every kernel
    runs = [step(k) for k in range(1, args.steps + 1)]
    row = dict(size=args.size, params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
               engine_start_s=round(engine_start, 1), micro_batches=int(runs[0]["micro_batches"]),
               tokens=int(runs[0]["tokens"]))
    for key in (*PHASES, "step"):
        row[f"{key}_s"] = round(statistics.median(r[key] for r in runs), 3)
    row["tokens_per_s_per_gpu"] = round(row["tokens"] / row["step_s"] / ctx.world_size)
    row["gen_tokens_per_s"] = round(args.prompts * args.n * args.response_len / row["gen_s"])
    if cuda:
        row["peak_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 1)
        row["device"] = torch.cuda.get_device_name()
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="0.5b,1.5b", help=f"comma-separated, from {sorted(GEOMETRIES)}")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--response-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=2, help="measured steps, after one warm-up step")
    p.add_argument("--max-tokens-per-micro-batch", type=int, default=32768)
    p.add_argument("--kv-cache-gb", type=float, default=16.0)
    p.add_argument("--compile-engine", action="store_true", help="vLLM torch.compile + CUDA graphs")
    p.add_argument("--size", help=argparse.SUPPRESS)  # internal: run this one geometry here
    args = p.parse_args(argv)
    for name in ("prompts", "n", "prompt_len", "response_len", "steps", "max_tokens_per_micro_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if args.n < 2:
        p.error("--n must be ≥ 2 (GRPO standardizes within a group)")
    if args.size:
        print("ROW " + json.dumps(one_size(args)), flush=True)
        os._exit(0)  # skip vLLM's slow teardown
    sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in GEOMETRIES:
            p.error(f"unknown size {s!r}; choose from {sorted(GEOMETRIES)}")
    rows = []
    for size in sizes:
        own_args = argv if argv is not None else sys.argv[1:]
        cmd = [sys.executable, os.path.abspath(__file__), "--size", size, *own_args]
        env = dict(os.environ, PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
            env.pop(k, None)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode != 0 or not found:
            sys.stderr.write((proc.stdout + proc.stderr)[-6000:])
            raise SystemExit(f"grpo_step.py: size {size} failed (exit code {proc.returncode}); output above")
        rows.append(json.loads(found[0]))
        print(f"done: {size} {found[0]}", file=sys.stderr, flush=True)  # kept if a later size is cut off
    print(f"# GRPO step, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {args.prompts} prompts × "
          f"{args.n} samples × {args.response_len} tokens (prompt {args.prompt_len}), "
          f"{'compiled' if args.compile_engine else 'eager'} engine")
    cols = ["size", "params_b", "tokens", "micro_batches", *(f"{k}_s" for k in PHASES), "step_s",
            "tokens_per_s_per_gpu", "gen_tokens_per_s", "peak_gib", "engine_start_s", "device"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
