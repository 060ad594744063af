"""PPO with a learned critic: clipped surrogate, GAE advantages, clipped value loss.

Schulman et al. 2017, arXiv:1707.06347; GAE: arXiv:1506.02438; the RLHF setting (score at the last
response token, KL to the reference policy in the reward): Ouyang et al. 2022, arXiv:2203.02155.
The critic is the policy's backbone with a fresh scalar head (AutoModelForTokenClassification, num_labels=1,
as verl); the value of response token t is read at the hidden state of token t-1, as log-probs are.

  python recipes/ppo.py                                         # one process, embedded model and task
  torchrun --nproc-per-node 2 recipes/ppo.py                    # FSDP2 over 2 ranks, one engine each
  torchrun --nproc-per-node 8 recipes/ppo.py --model DIR --train-files f.parquet --compute-dtype bfloat16
  python -m rlprims.launch.slurm --nodes 2 --gpus-per-node 8 recipes/ppo.py -- --model DIR ...
Flags: `--help`. A run resumes from the newest checkpoint in `out_dir`.

Departures from the paper / verl: both losses are token-means with the normalizer of the whole optimizer
step (all micro-batches, all ranks); advantages are whitened with all ranks' statistics (= verl's batch
whitening); KL in the reward is k1 with a fixed β, off by default (as verl); critic_warmup=K trains only
the critic for K steps (verl starts the actor one step earlier); no dual clip; no critic dropout; the
critic is checkpointed in critic_checkpoints/ (before the actor: every actor checkpoint has its critic).
"""

from __future__ import annotations

import copy
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

from rlprims.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from rlprims.data import SamplerState, arithmetic_rows, chat_prompt_ids, next_indices, read_verl_parquet, sampler_init
from rlprims.launch import init, parse_args, shutdown
from rlprims.metrics import close_run_log, log_metrics, open_run_log, progress
from rlprims.models.packed import register_packed_attention, response_logprobs, response_logprobs_and_entropy
from rlprims.ops import (aggregate_token_mean, gae_advantages_unwhitened, kl_in_reward, kl_k1, masked_mean, masked_sum,
                         micro_batch_partition, num_micro_batches, pack_sequences, unpack_values,
                         ppo_clip_loss, rollout_correction_metrics, value_loss)
from rlprims.parallel import all_reduce_scalars, build_mesh, engine_weights, shard_model, step_loss_normalizers
from rlprims.rewards import compute_score, load_reward_fn
from rlprims.rollout import create_engine, default_model_path, generate, update_weights


@dataclass
class Args:
    model: str = ""
    """Local HF model directory; empty = the embedded SmolLM2-135M-Instruct (converted once, cached)."""
    train_files: str = ""
    """verl-schema parquet of prompts; empty = the embedded arithmetic task (seed 0)."""
    max_operand: int = 20
    """Embedded task only: operands in [0, max_operand]."""
    reward_fn: str = ""
    """Reward function "module:function" or "file.py:function" (verl's compute_score signature)."""
    out_dir: str = "runs/ppo"
    """metrics.jsonl, curves.png, checkpoints/, critic_checkpoints/, the exports hf/ and critic_hf/."""
    steps: int = 20
    """Rollout + update steps."""
    prompts_per_rank: int = 8
    """Prompts each rank samples per step, one response each (the critic is the baseline: no groups)."""
    max_prompt_len: int = 128
    """Longer prompts are dropped from the dataset (verl's filter_overlong_prompts)."""
    max_response_len: int = 48
    """Sampling stops here; such responses count as cut (response_length/clip_ratio)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's log-probs use the same one."""
    lr: float = 1e-5
    """Actor AdamW learning rate (constant)."""
    critic_lr: float = 1e-5
    """Critic AdamW learning rate (constant; verl's critic default)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm, actor and critic separately."""
    mini_batches: int = 2
    """Optimizer steps per rollout batch and epoch (verl: train_batch_size / ppo_mini_batch_size)."""
    epochs: int = 1
    """Passes over the rollout batch (verl's ppo_epochs)."""
    clip_ratio: float = 0.2
    """PPO clip ε (verl's clip_ratio; symmetric)."""
    vf_clip: float = 0.5
    """Value clip: V stays within ±vf_clip of the old value (verl's cliprange_value)."""
    gamma: float = 1.0
    """GAE discount γ (verl's default)."""
    lam: float = 1.0
    """GAE λ (verl's default)."""
    kl_coef: float = 0.0
    """β of the per-token KL-in-reward penalty −β·k1(π_old, π_ref); 0 = no reference model."""
    critic_warmup: int = 0
    """The first this many steps update only the critic (the policy and its engine stay put)."""
    max_tokens_per_micro_batch: int = 8192
    """Token budget of one forward/backward (verl's dynamic batch size)."""
    compute_dtype: str = "float32"
    """Dtype of the engine and of forward/backward (FSDP2 mixed precision; masters and AdamW stay fp32)."""
    tp: int = 1
    """Tensor-parallel size of each engine (consecutive ranks share one engine and its prompts)."""
    compile_engine: bool = False
    """Let vLLM compile and capture CUDA graphs (slower start, faster decoding on GPUs)."""
    kv_cache_gb: float = 0.5
    """KV cache each engine reserves (on CPU: taken from RAM)."""
    save_every: int = 10
    """Checkpoint every this many steps and after the last (0: only after the last); the newest 2 are kept."""
    seed: int = 0
    """Seeds data order, sampling, the engines and the value head."""


def global_stats(named: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """verl's `<name>/mean`, `/max`, `/min` of each (values, mask) over the valid entries of all ranks."""
    rows = [torch.stack([x.double() for x in (torch.where(m, v, 0).sum(), m.sum(), torch.where(m, v, -torch.inf).max(),
                                              torch.where(m, -v, -torch.inf).max())]) for v, m in named.values()]
    sums, ext = (t.contiguous() for t in torch.stack(rows).split(2, dim=1))
    dist.all_reduce(sums)
    dist.all_reduce(ext, op=dist.ReduceOp.MAX)
    return {f"{k}/{f}": x for k, (s, n), (hi, lo) in zip(named, sums.tolist(), ext.tolist())
            for f, x in (("mean", s / max(n, 1.0)), ("max", hi), ("min", -lo))}


def main(args: Args) -> None:
    # ---- setup: ranks, engine, sharded actor + critic (+ reference), data, resume ---------------------
    ctx = init(seed=args.seed)
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    dtype, compute = torch.float32, getattr(torch, args.compute_dtype)
    model_dir = args.model or default_model_path()
    engine = create_engine(model_dir, max_model_len=args.max_prompt_len + args.max_response_len,
                           dtype=str(compute).removeprefix("torch."), seed=args.seed, tensor_parallel_size=args.tp,
                           kv_cache_memory_bytes=int(args.kv_cache_gb * 2**30), enforce_eager=not args.compile_engine)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    attn = register_packed_attention()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn).to(device)
    critic = AutoModelForTokenClassification.from_pretrained(  # the backbone + a fresh Linear(H, 1) head
        model_dir, dtype=dtype, attn_implementation=attn, num_labels=1).to(device)  # eval mode: no dropout
    ref_model = copy.deepcopy(model).requires_grad_(False) if args.kl_coef > 0 else None
    mesh = build_mesh(device_type=device.type, tp=args.tp)
    for m in [m for m in (model, critic, ref_model) if m is not None]:
        shard_model(m, mesh, param_dtype=compute if compute != dtype else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, weight_decay=0.0)
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else compute_score

    rows = (read_verl_parquet(args.train_files) if args.train_files
            else arithmetic_rows(4096, seed=0, max_operand=args.max_operand))
    data = chat_prompt_ids(tokenizer, rows, max_len=args.max_prompt_len)
    out_dir = Path(args.out_dir)
    actor_root, critic_root = out_dir / "checkpoints", out_dir / "critic_checkpoints"
    step, sampler = 0, sampler_init()
    if (ckpt := latest_checkpoint(actor_root)) is not None:
        load_checkpoint(critic_root / ckpt.name, model=critic, optimizer=critic_opt)
        extra = load_checkpoint(ckpt, model=model, optimizer=optimizer)  # second: its RNG states stay
        step, sampler = extra["step"], SamplerState.from_dict(extra["sampler"])
    log = open_run_log(out_dir, rank=rank, config=asdict(args), resume_step=step)
    update_weights(engine, engine_weights(model, dtype=compute))  # a resumed trainer is ahead of the engine

    while step < args.steps:
        step += 1
        t_step = time.perf_counter()
        # ---- rollout (the ranks of a TP group share an engine, hence their prompts) and scores -------
        picked, sampler = next_indices(sampler, len(data), batch_size=args.prompts_per_rank, rank=rank // args.tp,
                                       world_size=world // args.tp, seed=args.seed)
        t0 = time.perf_counter()
        batch = generate(engine, [data[i][0] for i in picked], n=1, temperature=args.temperature,
                         max_tokens=args.max_response_len, pad_token_id=pad_id,
                         seed=((args.seed * 1_000_003 + step) * 4099 + rank // args.tp) * 4096)  # row r: seed + r
        batch = type(batch)(*(t.to(device) for t in batch))
        t_gen = time.perf_counter() - t0
        mask, lens = batch.response_mask, batch.response_lengths
        texts = tokenizer.batch_decode([ids[:n] for ids, n in zip(batch.response_ids.tolist(), lens.tolist())],
                                       skip_special_tokens=True)
        scores = torch.tensor([reward_fn(r["data_source"], t, r["reward_model"]["ground_truth"], r.get("extra_info"))
                               for r, t in zip((data[i][1] for i in picked), texts)], device=device)
        t_reward = time.perf_counter() - t0 - t_gen

        # ---- micro-batches (the same count on every rank: FSDP2 runs collectives in each pass) --------
        P, B = batch.prompt_ids.shape[1], mask.shape[0]
        input_ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
        attention = torch.cat([batch.prompt_mask, mask], 1)
        full_resp = torch.cat([torch.zeros_like(batch.prompt_mask), mask], 1)
        lengths = (batch.prompt_lengths + lens).tolist()
        minis = [c.tolist() for c in torch.arange(B).chunk(args.mini_batches)]
        budget = args.max_tokens_per_micro_batch
        count = torch.tensor([max(num_micro_batches([lengths[i] for i in mb], max_tokens=budget) for mb in minis)],
                             device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        plans = [[[mb[j] for j in part] for part in micro_batch_partition(
            [lengths[i] for i in mb], max_tokens=budget, min_micro_batches=int(count))]
            for mb in minis]

        def logprobs_of(m, part, entropy: bool):
            idx = torch.tensor(part, dtype=torch.long, device=device)
            fn = response_logprobs_and_entropy if entropy else response_logprobs
            out = fn(m, input_ids[idx], attention[idx], full_resp[idx], temperature=args.temperature)
            return (out.logprobs[:, P:], out.entropy[:, P:]) if entropy else out[:, P:]

        def values_of(part) -> torch.Tensor:
            """V(response token t) = head(h_{t-1}): one packed forward of the critic, read one column left."""
            packed = pack_sequences(input_ids[part], attention[part])
            out = critic(input_ids=packed.input_ids[None], position_ids=packed.position_ids[None], use_cache=False,
                         cu_seq_lens_q=packed.cu_seqlens, cu_seq_lens_k=packed.cu_seqlens,
                         max_length_q=packed.max_seqlen, max_length_k=packed.max_seqlen)
            return unpack_values(out.logits[0, :, 0].float(), packed)[:, P - 1 : -1]

        # ---- old log-probs, old values and reference log-probs, all before any update ---------------
        t0 = time.perf_counter()
        old_logprobs, old_values, ref_logprobs = (torch.zeros_like(batch.rollout_logprobs) for _ in range(3))
        with torch.no_grad():
            for part in (p for plan in plans for p in plan):
                old_logprobs[part], old_values[part] = logprobs_of(model, part, entropy=False), values_of(part)
                if ref_model is not None:
                    ref_logprobs[part] = logprobs_of(ref_model, part, entropy=False)
        t_old = time.perf_counter() - t0

        # ---- token rewards (score at the last response token, − β·KL) → GAE → whitened over the step ---
        rewards = torch.zeros_like(old_values).index_put_((torch.arange(B, device=device), lens - 1), scores)
        kl_metrics = {}
        if ref_model is not None:
            rewards, kl_m = kl_in_reward(rewards, kl_k1(old_logprobs, ref_logprobs), mask, kl_coef=args.kl_coef)
            kl_metrics = all_reduce_scalars({k: v.item() for k, v in kl_m.items()}, mean=True, device=device)
        gae = gae_advantages_unwhitened(rewards, old_values, mask, gamma=args.gamma, lam=args.lam)
        returns = gae.returns
        pairs = (("a", gae.advantages), ("r", returns), ("d", returns - old_values))  # d: for vf_explained_var
        sums = all_reduce_scalars({"n": mask.sum().item(), **{f"{k}{p}": masked_sum(x**p, mask).item() for k, x in pairs
                                                              for p in (1, 2)}}, mean=False, device=device)
        n = sums["n"]
        var = {k: (sums[f"{k}2"] - sums[f"{k}1"] ** 2 / n) / max(n - 1, 1) for k in "ard"}
        advantages = torch.where(mask, (gae.advantages - sums["a1"] / n) * (var["a"] + 1e-8) ** -0.5, 0.0)

        # ---- update: epochs x mini-batches of optimizer steps per model, token-mean over each mini-batch --
        updates, stats = args.epochs * len(plans), defaultdict(float)  # this rank's shares, summed over ranks

        def critic_loss(part, m):
            values = values_of(part)
            vf = value_loss(values, old_values[part], returns[part], m, clip_range=args.vf_clip)
            return vf.loss, {**vf.metrics, "vpred_mean": masked_mean(values.detach(), m)}

        def actor_loss(part, m):
            logprobs, entropy = logprobs_of(model, part, entropy=True)
            pg = ppo_clip_loss(logprobs, old_logprobs[part], advantages[part], m,
                               clip_low=args.clip_ratio, clip_high=args.clip_ratio)
            return pg.loss, {**pg.metrics, "entropy": masked_mean(entropy.detach(), m)}

        def train(name: str, loss_name: str, m, opt, loss_fn) -> float:
            t0 = time.perf_counter()
            for plan in (p for _ in range(args.epochs) for p in plans):
                norms = step_loss_normalizers([mask[part] for part in plan])
                for part in progress(plan, desc=f"step {step} {name}", rank=rank):
                    per_token, diag = loss_fn(part, mask[part])
                    loss = aggregate_token_mean(per_token, mask[part], num_tokens=norms.num_tokens)
                    loss.backward()
                    stats[f"{name}/{loss_name}"] += loss.item() / updates
                    share = mask[part].sum().item() / norms.num_tokens.item() / updates  # of the step's means
                    for k, v in diag.items():
                        stats[f"{name}/{k}"] += v.item() * share
                norm = torch.nn.utils.clip_grad_norm_(m.parameters(), args.max_grad_norm)  # global norm
                stats[f"{name}/grad_norm"] += norm.full_tensor().item() / updates / world
                opt.step()
                opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        t_critic = train("critic", "vf_loss", critic, critic_opt, critic_loss)
        t_actor = train("actor", "pg_loss", model, optimizer, actor_loss) if step > args.critic_warmup else 0.0
        t0 = time.perf_counter()
        if step > args.critic_warmup:  # push the new policy into this rank's engine, in place
            update_weights(engine, engine_weights(model, dtype=compute))
        t_sync = time.perf_counter() - t0

        # ---- log, validate, checkpoint -------------------------------------------------------------
        corr = rollout_correction_metrics(old_logprobs, batch.rollout_logprobs, mask)
        ones = torch.ones_like(mask[:, 0])
        local = {
            "response_length/clip_ratio": (lens >= args.max_response_len).float().mean().item(),
            "actor/lr": args.lr, "critic/lr": args.critic_lr,
            **{k: corr[k].item() for k in ("rollout_corr/kl", "rollout_corr/training_ppl", "rollout_corr/rollout_ppl")},
            "timing_s/gen": t_gen, "timing_s/reward": t_reward, "timing_s/old_log_prob": t_old,
            "timing_s/update_critic": t_critic, "timing_s/update_actor": t_actor, "timing_s/sync": t_sync,
            "timing_s/step": time.perf_counter() - t_step,
        }
        metrics = {**all_reduce_scalars(local, mean=True, device=device), **kl_metrics,
                   **all_reduce_scalars(stats, mean=False, device=device),
                   "critic/vf_explained_var": 1.0 - var["d"] / (var["r"] + 1e-5),
                   **global_stats({"critic/score": (scores, ones), "critic/rewards": (rewards.sum(-1), ones),
                                   "critic/advantages": (advantages, mask), "critic/returns": (returns, mask),
                                   "critic/values": (old_values, mask), "response_length": (lens.float(), ones)})}
        metrics["perf/total_num_tokens"] = all_reduce_scalars({"t": sum(lengths)}, mean=False, device=device)["t"]
        metrics["perf/throughput"] = metrics["perf/total_num_tokens"] / metrics["timing_s/step"] / world
        log_metrics(log, step, metrics)
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            save_checkpoint(critic_root, step, model=critic, optimizer=critic_opt, extra_state={}, keep_last=2)
            save_checkpoint(actor_root, step, model=model, optimizer=optimizer, keep_last=2,
                            extra_state={"step": step, "sampler": sampler.to_dict()})

    export_hf(model, out_dir / "hf", tokenizer=tokenizer)
    export_hf(critic, out_dir / "critic_hf", tokenizer=tokenizer)
    close_run_log(log)
    shutdown(ctx)


if __name__ == "__main__":
    main(parse_args(Args))
    os._exit(0)  # the embedded engine's teardown at interpreter exit is slow and can hang; all is flushed
