"""The tool's worth: greedy accuracy on grpo_tools' held-out products, with and without the calculator.

For each model (default: the embedded SmolLM2-135M-Instruct; add a run's export, e.g.
runs/grpo_tools/hf, whose weights are loaded into the same engine), on the recipe's held-out questions
(`multiplication_rows(N, seed=1, split="test")`, the rows `recipes/grpo_tools.py` validates on), greedy:
- "no tool": the question alone through the chat template (no tool section, no solved example), one
  turn of up to `--max-response-len` tokens: what the model does unaided;
- "tool offered": the recipe's prompt (the minimal tool format and `--demos` solved examples) and its
  multi-turn rollout (`generate_multiturn`, the calculator in worker processes, the recipe's limits).
Both are scored by the recipe's reward (`compute_score` on the last model turn). Prints a markdown
table: accuracy ± standard error, tool-call rate, tool-error rate, seconds. Results: docs/agentic.md.

usage: python benchmarks/agentic_baseline.py [--models default runs/grpo_tools/hf] [--prompts 128]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["default"], help='"default" or HF model directories')
    parser.add_argument("--prompts", type=int, default=128, help="held-out questions (the recipe's 128)")
    parser.add_argument("--demos", type=int, default=1, help="solved examples with the tool (the recipe's 1)")
    parser.add_argument("--max-response-len", type=int, default=128)
    parser.add_argument("--max-turn-len", type=int, default=48)
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--max-prompt-len", type=int, default=320)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from rlprims.data import multiplication_rows, tool_prompt_ids
    from rlprims.launch import quiet_console
    from rlprims.rewards import compute_score, score_responses
    from safetensors.torch import load_file

    from rlprims.rollout import (calculator, create_engine, decode_responses, default_model_path,
                                 final_turn_texts, generate, generate_multiturn, minimal_tool_prompt,
                                 tool_pool, tool_use_metrics, tool_use_sums, update_weights)

    quiet_console()
    pool = tool_pool([calculator], timeout_s=5.0, max_output_chars=256)
    max_model_len = args.max_prompt_len + args.max_response_len
    # One engine for every model (same architecture and tokenizer: checkpoints of one run): the later
    # ones are loaded into it with update_weights, as the recipes sync the trainer's weights.
    first = default_model_path() if args.models[0] == "default" else args.models[0]
    tokenizer = AutoTokenizer.from_pretrained(first)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine = create_engine(first, max_model_len=max_model_len, dtype="float32", seed=0,
                           kv_cache_memory_bytes=1 << 30)
    sample = functools.partial(generate, engine, temperature=0.0, pad_token_id=pad)
    bare = multiplication_rows(args.prompts, seed=1, demos=0, split="test")
    bare_ids = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                              return_dict=False) for r in bare]
    rows = multiplication_rows(args.prompts, seed=1, demos=args.demos, split="test")
    prompts = tool_prompt_ids(tokenizer, rows, pool.schemas, render=minimal_tool_prompt,
                              max_len=args.max_prompt_len)
    table = []
    for name in args.models:
        if name != args.models[0]:
            update_weights(engine, load_file(str(Path(name) / "model.safetensors")))
        t0 = time.perf_counter()
        out = sample(bare_ids, n=1, max_tokens=args.max_response_len)
        bare_scores = score_responses(decode_responses(tokenizer, out), bare, compute_score).scores
        table.append((name, "no tool", bare_scores, None, time.perf_counter() - t0))

        t0 = time.perf_counter()
        mt = generate_multiturn(sample, [p for p, _ in prompts], n=1, tokenizer=tokenizer, pool=pool,
                                max_turns=args.max_turns, max_response_tokens=args.max_response_len,
                                max_model_len=max_model_len, max_turn_tokens=args.max_turn_len,
                                pad_token_id=pad)
        answers = final_turn_texts(tokenizer, mt)
        scores = score_responses(answers, [r for _, r in prompts], compute_score).scores
        table.append((name, "tool offered", scores, tool_use_metrics(tool_use_sums(mt)),
                      time.perf_counter() - t0))

    print(f"\n{args.prompts} held-out 3-digit products (grpo_tools' validation rows), greedy, "
          f"torch {torch.__version__}, {os.cpu_count()} CPU cores\n")
    print("| model | prompt | accuracy | tool-call rate | tool-error rate | s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, kind, scores, tools, secs in table:
        acc = scores.float().mean().item()
        err = math.sqrt(acc * (1 - acc) / max(len(scores) - 1, 1))
        call = f"{tools['tool/call_rate']:.3f}" if tools else "-"
        error = f"{tools['tool/error_rate']:.3f}" if tools else "-"
        print(f"| {name} | {kind} | {acc:.3f} ± {err:.3f} | {call} | {error} | {secs:.0f} |")


if __name__ == "__main__":
    main()
