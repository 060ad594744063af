"""SFT: supervised fine-tuning on prompt/response (or multi-turn) data, FSDP2, packed micro-batches.

Ouyang et al. 2022 (InstructGPT), arXiv:2203.02155, step 1; verl's SFT trainer (`fsdp_sft_trainer`).
Each step every rank takes `batch_size` conversations (a disjoint slice of the global batch), packs them
into micro-batches of at most `max_tokens_per_micro_batch` tokens, and minimizes the negative log-likelihood
of the response tokens only (`sft_tokens` masks system/user/template tokens): loss = −Σ log π(y_t) / N,
N the number of response tokens of the whole step (all micro-batches, all ranks), so the gradient is that of
one big batch. AdamW with linear warmup then cosine decay (as verl's sft_trainer.yaml: lr 1e-5, betas
(0.9, 0.95), weight decay 0.01, warmup 10% of the steps, grad clip 1.0). Validation loss every `val_every`.

Data: verl's SFT parquet (`prompt` + `response` columns, or a `messages` column of chat messages; other
columns ignored); empty = the embedded arithmetic SFT rows (worked answers). No inference engine is used.

Launch (defaults: the embedded SmolLM2-135M-Instruct and the embedded arithmetic SFT data; no downloads):
  python recipes/sft.py                                         # one process
  torchrun --nproc-per-node 2 recipes/sft.py                    # FSDP2 over 2 ranks
  torchrun --nproc-per-node 8 recipes/sft.py --model DIR --train-files sft.parquet --val-files val.parquet \
      --compute-dtype bfloat16                                                      # a GPU node
  python -m rlprims.launch.slurm --nodes 2 --gpus-per-node 8 recipes/sft.py -- --model DIR ...
Every Args field is a flag (`--help`). A run resumes from the newest checkpoint in `out_dir`.

Deliberate departures from verl:
- Token-mean over the whole step (verl's SFT loss is a per-micro-batch mean, rescaled by the accumulation
  count, which weighs tokens of short micro-batches more).
- Conversations longer than `max_len` are dropped (with a count), not truncated (verl: truncation="error").
- Multi-turn rows are rendered turn by turn and need a prefix-stable chat template (rlprims.data.sft).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from rlprims.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from rlprims.data import (SFTTokens, SamplerState, arithmetic_sft_rows, next_indices, read_sft_parquet,
                          sampler_init, sft_tokens)
from rlprims.launch import fit_to_device, init, parse_args, shutdown
from rlprims.metrics import close_run_log, log_metrics, open_run_log, perf_metrics, progress
from rlprims.models.fused import load_model
from rlprims.models.packed import response_logprobs
from rlprims.ops import aggregate_token_mean, masked_sum, micro_batch_partition, num_micro_batches
from rlprims.parallel import all_reduce_scalars, build_mesh, gather_once, shard_model, step_loss_normalizers
from rlprims.rollout import default_model_path
from rlprims.schedules import cosine_lr_factor, is_due


@dataclass
class Args:
    model: str = ""
    """Local HF model directory; empty = the embedded SmolLM2-135M-Instruct (converted once, cached)."""
    train_files: str = ""
    """verl SFT parquet (prompt/response or messages); empty = embedded arithmetic SFT rows (seed 0)."""
    val_files: str = ""
    """verl SFT parquet for the validation loss; empty = embedded arithmetic SFT rows (seed 1)."""
    out_dir: str = "runs/sft"
    """metrics.jsonl, curves.png, checkpoints/ and the final HF export (hf/) go here."""
    steps: int = 50
    """Optimizer steps (the cosine schedule spans them)."""
    batch_size: int = 8
    """Conversations per rank per step; the global batch is world_size x batch_size."""
    max_len: int = 256
    """Longer tokenized conversations are dropped from the data."""
    lr: float = 1e-5
    """Peak AdamW learning rate (verl's SFT default)."""
    weight_decay: float = 0.01
    """AdamW weight decay (verl's SFT default)."""
    warmup_ratio: float = 0.1
    """Fraction of the steps with a linear warmup from 0 (verl's warmup_steps_ratio)."""
    min_lr_ratio: float = 0.0
    """The cosine decays from lr to min_lr_ratio * lr at the last step."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (verl's clip_grad)."""
    max_tokens_per_micro_batch: int = 0
    """Token budget of one packed forward/backward; 0 = fit (CPU: 8192; GPU: from the model and memory)."""
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
    val_rows: int = 64
    """Conversations in the validation loss (0 = no validation)."""
    val_every: int = 10
    """Validation loss every this many steps, before the first and after the last (0: only those two)."""
    save_every: int = 10
    """Checkpoint every this many steps and after the last (0: only after the last; -1: never)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the newest)."""
    wandb_project: str = ""
    """Also log to this Weights & Biases project (needs `pip install wandb`)."""
    tensorboard: bool = False
    """Also write TensorBoard events to out_dir/tensorboard (needs `pip install tensorboard`)."""
    seed: int = 0
    """Seeds data order and initialisation."""


def main(args: Args) -> None:
    # ---- setup: ranks, sharded model, optimizer + schedule, data, resume --------------------------------
    ctx = init(seed=args.seed)
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    dtype = getattr(torch, args.dtype)
    compute = getattr(torch, args.compute_dtype or ("bfloat16" if device.type == "cuda" else args.dtype))
    model_dir = args.model or default_model_path()
    fit = fit_to_device(args, model_dir, ctx, rows=0)  # micro-batch tokens, checkpointing, offload
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = load_model(model_dir, dtype=dtype, device=device, use_liger=fit.use_liger)  # packed attention
    shard_model(model, build_mesh(device_type=device.type), param_dtype=compute if compute != dtype else None,
                **fit.shard_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay)
    lr_factor = partial(cosine_lr_factor, warmup_steps=int(args.warmup_ratio * args.steps),
                        total_steps=args.steps, min_lr_ratio=args.min_lr_ratio)  # warmup, then cosine
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    rows = read_sft_parquet(args.train_files) if args.train_files else arithmetic_sft_rows(2048, seed=0)
    val_rows = (read_sft_parquet(args.val_files) if args.val_files
                else arithmetic_sft_rows(args.val_rows, seed=1, split="test"))[: args.val_rows]
    data = [t for t in (sft_tokens(tokenizer, r) for r in rows) if len(t.input_ids) <= args.max_len]
    val = [t for t in (sft_tokens(tokenizer, r) for r in val_rows) if len(t.input_ids) <= args.max_len]
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
        print(f"{len(data)} of {len(rows)} conversations fit {args.max_len} tokens; start at step {step}")

    def micro_batches(examples):
        """Padded tensors and a packing plan with the same number of micro-batches on every rank (FSDP2
        runs collectives in each forward/backward). A rank without examples gets a dummy row, counted
        nowhere."""
        examples = examples or [SFTTokens([pad_id, pad_id], [False, False])]
        lengths = [len(e.input_ids) for e in examples]
        ids = torch.full((len(examples), max(lengths)), pad_id, dtype=torch.long)
        loss_mask = torch.zeros(ids.shape, dtype=torch.bool)
        attention = torch.zeros(ids.shape, dtype=torch.bool)
        for i, e in enumerate(examples):
            ids[i, : lengths[i]] = torch.tensor(e.input_ids)
            loss_mask[i, : lengths[i]] = torch.tensor(e.loss_mask)
            attention[i, : lengths[i]] = True
        budget = fit.max_tokens_per_micro_batch
        count = torch.tensor([num_micro_batches(lengths, max_tokens=budget)], device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        plan = micro_batch_partition(lengths, max_tokens=budget, min_micro_batches=int(count))
        return ids.to(device), attention.to(device), loss_mask.to(device), plan

    def nll(ids, attention, loss_mask, part):
        """−log π(token) at the response tokens of rows `part`, and the mask of the tokens that count."""
        idx = torch.tensor(part or [0], dtype=torch.long, device=device)
        a, m = attention[idx], loss_mask[idx] & bool(part)
        # nothing to score (an empty micro-batch, the dummy row): still run forward and backward, as the
        # other ranks do, on each row's last token, and count none of it
        scored = m if m.any() else a & (a.cumsum(1) == a.sum(1, keepdim=True))
        return -response_logprobs(model, ids[idx], a, scored, temperature=1.0), m

    def validate() -> dict[str, float]:
        """Token-mean NLL of the response tokens of the validation conversations (split over ranks)."""
        ids, attention, loss_mask, plan = micro_batches(val[rank::world])
        total = count = 0.0
        with torch.no_grad():
            for part in plan:
                loss, mask = nll(ids, attention, loss_mask, part)
                total, count = total + masked_sum(loss, mask).item(), count + mask.sum().item()
        sums = all_reduce_scalars({"nll": total, "n": count}, mean=False, device=device)
        return {"val/loss": sums["nll"] / max(sums["n"], 1.0)}

    if step == 0 and args.val_rows:
        log_metrics(log, 0, validate())

    while step < args.steps:
        step += 1
        t0 = time.perf_counter()
        picked, sampler = next_indices(sampler, len(data), batch_size=args.batch_size, rank=rank,
                                       world_size=world, seed=args.seed)
        ids, attention, loss_mask, plan = micro_batches([data[i] for i in picked])
        norms = step_loss_normalizers([loss_mask[part] for part in plan if part])
        tokens = float(sum(len(data[i].input_ids) for i in picked))
        stats = {"train/loss": 0.0, "perf/total_num_tokens": tokens}
        parts = gather_once(model, plan, enabled=fit.gather_once)  # one gather and one reduce per step
        for part in progress(parts, total=len(plan), desc=f"step {step}", rank=rank):
            loss, mask = nll(ids, attention, loss_mask, part)
            loss = aggregate_token_mean(loss, mask, num_tokens=norms.num_tokens)
            loss.backward()
            stats["train/loss"] += loss.item()  # this rank's share of the step's token mean
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        metrics = all_reduce_scalars(stats, mean=False, device=device)
        metrics["train/lr"] = lr
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        metrics["train/grad_norm"] = grad_norm.item()
        metrics["timing_s/step"] = time.perf_counter() - t0
        metrics |= perf_metrics(metrics, world_size=world, device=device)
        if args.val_rows and is_due(step, every=args.val_every, last=args.steps):
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
