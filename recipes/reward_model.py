"""Reward model: a Bradley-Terry scalar head on the language model, trained on preference pairs, FSDP2.

Ouyang et al. 2022 (InstructGPT), arXiv:2203.02155, step 2; Stiennon et al. 2020, arXiv:2009.01325.
The model is `AutoModelForSequenceClassification` with `num_labels=1`: the backbone plus a linear head
`score` (hidden → 1, no bias; new weights, seeded identically on every rank). The reward of a conversation
is the head applied to the final hidden state of its last token that is not the pad token, exactly what
the HF class computes on a right-padded batch, so the export loads and scores with plain transformers:
    AutoModelForSequenceClassification.from_pretrained(out_dir / "hf")(input_ids, attention_mask).logits[:, 0]
(`save_pretrained` writes the backbone, `score.weight` and a config naming *ForSequenceClassification.)
Loss per pair: −log σ(r_c − r_r) (chosen, rejected), averaged over the pairs of the whole step (all
micro-batches, all ranks). Chosen and rejected of a pair share a micro-batch (one padding-free forward).
AdamW with linear warmup and cosine decay. Held-out pairs every `val_every` steps: accuracy (fraction with
r_chosen > r_rejected), loss, margin.

Data: parquet with columns prompt (str or chat messages), chosen, rejected (rlprims.data.preference);
empty = embedded arithmetic pairs (the rejected reply has a wrong final answer).

Launch (defaults: the embedded SmolLM2-135M-Instruct and the embedded arithmetic pairs; no downloads):
  python recipes/reward_model.py                                # one process
  torchrun --nproc-per-node 2 recipes/reward_model.py           # FSDP2 over 2 ranks
  torchrun --nproc-per-node 8 recipes/reward_model.py --model DIR --train-files prefs.parquet \
      --val-files val.parquet --compute-dtype bfloat16                              # a GPU node
  python -m rlprims.launch.slurm --nodes 2 --gpus-per-node 8 recipes/reward_model.py -- --model DIR ...
Every Args field is a flag (`--help`). A run resumes from the newest checkpoint in `out_dir`.

Deliberate departures from the papers / verl:
- InstructGPT trains on all K-choose-2 comparisons of a prompt as one batch element; here a row is one pair.
- Trailing pad tokens are dropped from each conversation before scoring (SmolLM2's pad token is its eos), so
  the scored token is the one HF's sequence classifier pools; verl's RM dataset keeps the eos.
- The prompt goes through the chat template (verl's RMDataset tokenizes the raw prompt string).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlprims.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from rlprims.data import (SamplerState, arithmetic_preference_rows, next_indices, preference_tokens,
                          read_preference_parquet, sampler_init)
from rlprims.launch import fit_to_device, init, parse_args, shutdown
from rlprims.metrics import close_run_log, log_metrics, open_run_log, progress
from rlprims.models.fused import load_model
from rlprims.ops import micro_batch_partition, num_micro_batches, pack_sequences
from rlprims.parallel import all_reduce_scalars, build_mesh, gather_once, shard_model
from rlprims.rollout import default_model_path
from rlprims.schedules import cosine_lr_factor, is_due


@dataclass
class Args:
    model: str = ""
    """Local HF causal-LM (or reward-model) directory; empty = the embedded SmolLM2-135M-Instruct."""
    train_files: str = ""
    """Preference parquet (prompt, chosen, rejected); empty = embedded arithmetic pairs (seed 0)."""
    val_files: str = ""
    """Preference parquet for the held-out accuracy; empty = embedded arithmetic pairs (seed 1)."""
    out_dir: str = "runs/reward_model"
    """metrics.jsonl, checkpoints/ and the final HF export (hf/) go here."""
    steps: int = 50
    """Optimizer steps (the cosine schedule spans them)."""
    pairs_per_rank: int = 8
    """Preference pairs per rank per step; the global batch is world_size x pairs_per_rank."""
    max_len: int = 256
    """Pairs with a conversation longer than this (in tokens) are dropped from the data."""
    lr: float = 1e-5
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of the steps with a linear warmup from 0."""
    min_lr_ratio: float = 0.0
    """The cosine decays from lr to min_lr_ratio * lr at the last step."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    max_tokens_per_micro_batch: int = 0
    """Token budget of one packed forward/backward (a pair's two conversations count together); 0 = fit."""
    dtype: str = "float32"
    """Dtype of the sharded master weights and the optimizer state."""
    compute_dtype: str = ""
    """Dtype of the gathered weights in forward/backward (FSDP2 mixed precision); empty = bfloat16 on CUDA,
    else dtype."""
    activation_checkpointing: bool | None = None
    """Recompute each decoder layer in backward (less activation memory); unset = fit (only if needed)."""
    use_liger: bool | None = None
    """Liger's fused Triton kernels for the trainer's RMSNorms, rotary embedding and SwiGLU (verl's
    use_liger; CUDA only; `pip install liger-kernel`; rlprims.models.fused); unset = on where CUDA and
    liger-kernel are there and it has kernels for the model type."""
    val_pairs: int = 64
    """Held-out pairs for val/rm/* (0 = no validation)."""
    val_every: int = 10
    """Validate every this many steps, before the first and after the last (0: only those two)."""
    save_every: int = 10
    """Checkpoint every this many steps and after the last (0: only after the last; -1: never)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest)."""
    wandb_project: str = ""
    """Also log to this Weights & Biases project (needs `pip install wandb`)."""
    tensorboard: bool = False
    """Also write TensorBoard events to out_dir/tensorboard (needs `pip install tensorboard`)."""
    seed: int = 0
    """Seeds data order and the head's initialisation."""


def main(args: Args) -> None:
    # ---- setup: ranks, model with its scalar head, FSDP2, optimizer + schedule, data, resume -----------
    ctx = init(seed=args.seed)
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    dtype = getattr(torch, args.dtype)
    compute = getattr(torch, args.compute_dtype or ("bfloat16" if device.type == "cuda" else args.dtype))
    model_dir = args.model or default_model_path()
    fit = fit_to_device(args, model_dir, ctx, rows=0)  # micro-batch tokens, checkpointing, offload
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, dtype=dtype, device=device, auto_class=AutoModelForSequenceClassification,
                       use_liger=fit.use_liger, num_labels=1)  # packed attention
    if model.config.pad_token_id is None:  # HF pools the last non-pad token; it needs to know the pad token
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.eos_token_id
    pad_id = model.config.pad_token_id
    shard_model(model, build_mesh(device_type=device.type), param_dtype=compute if compute != dtype else None,
                **fit.shard_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_factor = partial(cosine_lr_factor, warmup_steps=int(args.warmup_ratio * args.steps),
                        total_steps=args.steps, min_lr_ratio=args.min_lr_ratio)  # warmup, then cosine
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    def pairs_of(rows):
        """Token ids of (chosen, rejected) per row, trailing pad tokens dropped; pairs over max_len left
        out."""
        def strip(ids):
            return ids[: max(i + 1 for i, t in enumerate(ids) if t != pad_id)]
        tokens = [preference_tokens(tokenizer, r) for r in rows]
        pairs = [(strip(t.chosen.input_ids), strip(t.rejected.input_ids)) for t in tokens]
        return [p for p in pairs if max(map(len, p)) <= args.max_len]

    rows = (read_preference_parquet(args.train_files) if args.train_files
            else arithmetic_preference_rows(2048, seed=0))
    val_rows = (read_preference_parquet(args.val_files) if args.val_files
                else arithmetic_preference_rows(args.val_pairs, seed=1, split="test"))[: args.val_pairs]
    data, val = pairs_of(rows), pairs_of(val_rows)
    out_dir = Path(args.out_dir)
    step, sampler = 0, sampler_init()
    if (ckpt := latest_checkpoint(out_dir / "checkpoints")) is not None:
        extra = load_checkpoint(ckpt, model=model, optimizer=optimizer)
        step, sampler = extra["step"], SamplerState.from_dict(extra["sampler"])
        scheduler.load_state_dict(extra["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    log = open_run_log(out_dir, rank=rank, config=asdict(args), resume_step=step,
                       wandb_project=args.wandb_project or None, tensorboard=args.tensorboard)
    if rank == 0:
        print(f"{len(data)} of {len(rows)} pairs fit {args.max_len} tokens; start at step {step}")

    def plan_of(pairs):
        """Micro-batches of pairs, the same count on every rank (FSDP2 runs collectives in every forward and
        backward); a rank without pairs gets a dummy pair, and an empty micro-batch reruns pair 0: both
        contribute zero loss."""
        lengths = [len(c) + len(r) for c, r in pairs] or [4]
        budget = fit.max_tokens_per_micro_batch
        count = torch.tensor([num_micro_batches(lengths, max_tokens=budget)], device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return micro_batch_partition(lengths, max_tokens=budget, min_micro_batches=int(count))

    def rewards(pairs, part):
        """r(chosen), r(rejected) [k] of the pairs in `part` from one packed forward, and which of them
        count."""
        rows = part or [0]
        counted = torch.tensor([bool(part) and i < len(pairs) for i in rows], device=device)
        source = pairs or [([pad_id] * 2, [pad_id] * 2)]
        seqs = [source[i][0] for i in rows] + [source[i][1] for i in rows]  # chosen first, then rejected
        ids = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long, device=device)
        attention = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], attention[i, : len(s)] = torch.tensor(s, device=device), True
        packed = pack_sequences(ids, attention)
        out = model(input_ids=packed.input_ids[None], position_ids=packed.position_ids[None], use_cache=False,
                    output_hidden_states=True, cu_seq_lens_q=packed.cu_seqlens,
                    cu_seq_lens_k=packed.cu_seqlens, max_length_q=packed.max_seqlen,
                    max_length_k=packed.max_seqlen)
        # the head on each sequence's last token (FSDP2 keeps the root's weights gathered after its forward)
        r = model.score(out.hidden_states[-1][0][packed.cu_seqlens[1:].long() - 1]).squeeze(-1).float()
        return r[: len(counted)], r[len(counted):], counted

    def pair_stats(r_chosen, r_rejected, counted, num_pairs):
        """Loss −log σ(r_c − r_r) summed over counted pairs / num_pairs (the step total), and stats."""
        margin = r_chosen - r_rejected
        loss = torch.where(counted, -F.logsigmoid(margin), 0.0).sum() / num_pairs
        won = torch.where(counted, (margin > 0).float(), 0.0).sum().item() / num_pairs
        return loss, {"loss": loss.item(), "accuracy": won,
                      "margin": torch.where(counted, margin.detach(), 0.0).sum().item() / num_pairs}

    def validate() -> dict[str, float]:
        mine = val[rank::world]
        n = all_reduce_scalars({"n": len(mine)}, mean=False, device=device)["n"]
        stats = dict.fromkeys(("loss", "accuracy", "margin"), 0.0)
        with torch.no_grad():
            for part in plan_of(mine):
                for k, v in pair_stats(*rewards(mine, part), max(n, 1.0))[1].items():
                    stats[k] += v
        return {f"val/rm/{k}": v for k, v in all_reduce_scalars(stats, mean=False, device=device).items()}

    if step == 0 and args.val_pairs:
        log_metrics(log, 0, validate())

    while step < args.steps:
        step += 1
        t0 = time.perf_counter()
        picked, sampler = next_indices(sampler, len(data), batch_size=args.pairs_per_rank, rank=rank,
                                       world_size=world, seed=args.seed)
        mine = [data[i] for i in picked]
        num_pairs = all_reduce_scalars({"n": len(mine)}, mean=False, device=device)["n"]
        stats = dict.fromkeys(("loss", "accuracy", "margin"), 0.0)
        plan = plan_of(mine)
        parts = gather_once(model, plan, enabled=fit.gather_once)  # one gather and one reduce per step
        for part in progress(parts, total=len(plan), desc=f"step {step}", rank=rank):
            loss, part_stats = pair_stats(*rewards(mine, part), num_pairs)
            loss.backward()
            for k, v in part_stats.items():
                stats[k] += v  # this rank's share of the step's means
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        metrics = {f"rm/{k}": v for k, v in all_reduce_scalars(stats, mean=False, device=device).items()}
        metrics["rm/lr"] = lr
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        metrics["rm/grad_norm"] = grad_norm.item()
        metrics["timing_s/step"] = time.perf_counter() - t0
        if args.val_pairs and is_due(step, every=args.val_every, last=args.steps):
            metrics.update(validate())
        log_metrics(log, step, metrics)
        if is_due(step, every=args.save_every, last=args.steps):
            save_checkpoint(out_dir / "checkpoints", step, model=model, optimizer=optimizer,
                            extra_state={"step": step, "sampler": sampler.to_dict(),
                                         "scheduler": scheduler.state_dict()},
                            keep_last=args.keep_checkpoints)

    export_hf(model, out_dir / "hf", tokenizer=tokenizer)
    close_run_log(log)
    shutdown(ctx)


if __name__ == "__main__":
    main(parse_args(Args))
