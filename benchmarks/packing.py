"""Padded vs packed training forward+backward throughput on a GRPO-like length mix.

Each mode computes the log-probs of the response tokens of the same batches and backpropagates their
sum through a small random Llama:
  - padded, full logits: the plain HF forward, [B, T, V] logits, fp32 log_softmax (verl without
    remove-padding and without fused log-probs);
  - padded, chunked: the padded backbone [B, T_max] with an attention mask (SDPA), then the chunked
    `logprobs_from_hidden` on the response positions only;
  - packed, chunked: the [N] stream with varlen attention (`rlprims.models.packed`), same chunked op.
The headline ratio is packed vs padded-chunked: the two differ only in the backbone.

Sequence lengths are uniform in [--min-len, --max-len] (whole sequence; the first --prompt-len tokens
are prompt, the rest response); the padded batch is right-padded to its longest sequence.
Tokens/s counts valid tokens (Σ attention_mask), the same for both modes.

    python benchmarks/packing.py                      # CPU, small model (about a minute on 2 cores)
    python benchmarks/packing.py --device cuda        # GPU defaults: bf16, larger model and batch
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlprims.models.packed import PACKED_ATTENTION, register_packed_attention, response_logprobs
from rlprims.ops.logprobs import DEFAULT_CHUNK_SIZE, logprobs_from_hidden

CHUNK_SIZE = DEFAULT_CHUNK_SIZE  # tokens per chunk of the log-prob op (--chunk-size)

CPU_DEFAULTS = dict(
    batch_size=8, hidden=128, layers=2, heads=4, kv_heads=2, vocab=2048, steps=4, warmup=1, repeats=2
)
GPU_DEFAULTS = dict(
    batch_size=64, hidden=1024, layers=8, heads=16, kv_heads=4, vocab=32000, steps=10, warmup=2, repeats=3
)


def make_batches(args, device):
    g = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(args.warmup + args.steps):
        lengths = torch.randint(args.min_len, args.max_len + 1, (args.batch_size,), generator=g)
        t = int(lengths.max())
        pos = torch.arange(t)[None, :]
        attn = pos < lengths[:, None]
        resp = attn & (pos >= args.prompt_len)
        ids = torch.randint(0, args.vocab, (args.batch_size, t), generator=g)
        batches.append((ids.to(device), attn.to(device), resp.to(device)))
    return batches


def padded_logprobs(model, ids, attn, resp, temperature):
    """Padded backbone; log-probs of response tokens only (hidden at t − 1 predicts token t)."""
    hidden = model.model(input_ids=ids, attention_mask=attn.long()).last_hidden_state  # right padding
    b_idx, t_idx = torch.nonzero(resp, as_tuple=True)
    lp = logprobs_from_hidden(
        hidden[b_idx, t_idx - 1],
        model.lm_head.weight,
        ids[b_idx, t_idx],
        temperature=temperature,
        chunk_size=CHUNK_SIZE,
    )
    out = torch.zeros(ids.shape, dtype=lp.dtype, device=ids.device)
    return out.index_put((b_idx, t_idx), lp)


def full_logits_logprobs(model, ids, attn, resp, temperature):
    """The plain HF way: padded forward, full [B, T, V] logits, fp32 log_softmax, gather, shift."""
    logits = model(input_ids=ids, attention_mask=attn.long()).logits[:, :-1].float() / temperature
    lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    lp = torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)
    return torch.where(resp, lp, 0.0)


def packed_logprobs(model, ids, attn, resp, temperature):
    return response_logprobs(model, ids, attn, resp, temperature=temperature, chunk_size=CHUNK_SIZE)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(model, batch, fn, impl, device):
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    sync(device)
    t0 = time.perf_counter()
    fn(model, *batch, 1.0).sum().backward()
    sync(device)
    return time.perf_counter() - t0


def run_interleaved(model, batches, args, device):
    """Alternate the modes (and which goes first) `repeats` times per batch; keep each batch's fastest run.

    The minimum over repeats is insensitive to other processes taking cores (a shared CI machine);
    alternating means a slow spell hits both modes alike.
    """
    times = tuple([] for _ in MODES)
    for i, batch in enumerate(batches):
        best = [float("inf")] * len(MODES)
        for r in range(args.repeats):
            order = range(len(MODES)) if (i + r) % 2 == 0 else reversed(range(len(MODES)))
            for m in order:
                best[m] = min(best[m], step(model, batch, *MODES[m][1:], device))
        if i >= args.warmup:
            for m in range(len(MODES)):
                times[m].append(best[m])
    return times


MODES = [
    ("padded, full logits (HF forward)", full_logits_logprobs, "sdpa"),
    ("padded, chunked log-probs", padded_logprobs, "sdpa"),
    ("packed, chunked log-probs", packed_logprobs, PACKED_ATTENTION),
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"], help="default: fp32 CPU, bf16 CUDA"
    )
    p.add_argument("--batch-size", type=int)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int, help="runs per batch and mode; the fastest counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="tokens per log-prob chunk")
    args = p.parse_args()
    global CHUNK_SIZE
    CHUNK_SIZE = args.chunk_size
    defaults = GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    device = torch.device(args.device)

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 8 * 8,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.max_len),
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    register_packed_attention()
    batches = make_batches(args, device)

    # correctness on the first batch
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = padded_logprobs(model, *batches[0], 1.0)
        model.set_attn_implementation(PACKED_ATTENTION)
        got = packed_logprobs(model, *batches[0], 1.0)
    max_diff = float((ref - got).abs().max())

    times = run_interleaved(model, batches, args, device)
    # peak memory of one step of each mode, measured separately (GPU only)
    peaks = []
    for _, fn, impl in MODES:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step(model, batches[-1], fn, impl, device)
        peaks.append(torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"))

    timed = batches[args.warmup :]
    valid = sum(int(a.sum()) for _, a, _ in timed)
    padded = sum(a.numel() for _, a, _ in timed)
    n_params = sum(p.numel() for p in model.parameters())
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    )
    print(
        f"device {name}, torch {torch.__version__}, {dtype}, threads {torch.get_num_threads()}\n"
        f"model: Llama {n_params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads}/{args.kv_heads} heads, vocab {args.vocab}); log-prob chunk {args.chunk_size} tokens\n"
        f"batches: {args.steps} timed (best of {args.repeats}) x {args.batch_size} sequences, "
        f"lengths uniform [{args.min_len}, {args.max_len}], prompt {args.prompt_len}; valid tokens {valid}, padded tokens {padded} "
        f"({100 * (1 - valid / padded):.0f}% padding)\n"
        f"max |logprob padded - packed| on batch 0: {max_diff:.2e}\n"
    )
    pad_times, pack_times = times[1], times[2]
    base = valid / sum(pad_times)
    ratios = sorted(a / b for a, b in zip(pad_times, pack_times))
    print(
        f"per-batch speedup of packed over padded (both chunked): median {statistics.median(ratios):.2f}x, "
        f"range {ratios[0]:.2f}-{ratios[-1]:.2f}x\n"
    )
    print(
        "| mode | tokens in backbone | s/step (median) | valid tokens/s | vs padded chunked "
        "| peak GiB (last batch) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for (label, _, _), ts, computed, peak in zip(MODES, times, (padded, padded, valid), peaks):
        tps = valid / sum(ts)
        print(
            f"| {label} | {computed} | {statistics.median(ts):.3f} | {tps:,.0f} | {tps / base:.2f}x | "
            f"{'-' if math.isnan(peak) else f'{peak:.2f}'} |"
        )


if __name__ == "__main__":
    main()
