"""One rank of the torchrun tests in test_engine_distributed.py (not collected by pytest).

usage: python -m torch.distributed.run --standalone --nproc-per-node 2 tests/rollout/_dist_worker.py \
           MODEL_DIR TP OUT_DIR [--trainer-group]

Each rank creates its engine with create_engine, generates, pushes perturbed weights, restores them,
and writes what it saw to OUT_DIR/rank{RANK}.json for the test to compare with one process.
--trainer-group: init a gloo process group first, as a trainer would, and all-reduce on it at the end.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())  # the repository root: tests.rollout.conftest


def main() -> None:
    model_dir, tp, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    trainer_group = "--trainer-group" in sys.argv
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if trainer_group:
        torch.distributed.init_process_group("gloo")

    from transformers import AutoModelForCausalLM

    from rlprims.rollout import create_engine, generate, update_weights
    from tests.rollout.conftest import MAX_MODEL_LEN, perturbed, tiny_engine_prompts

    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    engine = create_engine(
        model_dir,
        max_model_len=MAX_MODEL_LEN,
        dtype="float32",
        seed=0,
        tensor_parallel_size=tp,
        kv_cache_memory_bytes=16 << 20,
    )
    cfg = engine.llm_engine.vllm_config.parallel_config
    dp_rank = rank // tp
    # data parallel: each engine gets its own prompts; a TP group shares them
    prompts = tiny_engine_prompts() if tp > 1 else tiny_engine_prompts()[dp_rank::world]

    def greedy():
        out = generate(engine, prompts, n=1, temperature=0, max_tokens=16)
        return {"ids": out.response_ids.tolist(), "logprobs": out.rollout_logprobs.tolist()}

    result = {"rank": rank, "tp": cfg.tensor_parallel_size, "dp": cfg.data_parallel_size, "prompts": prompts}
    result["greedy"] = greedy()
    update_weights(engine, perturbed(original))
    result["perturbed"] = greedy()
    update_weights(engine, iter(original.items()))  # streamed this time
    result["restored"] = greedy()
    if tp > 1:  # TP ranks given different prompts must fail loudly on every rank, not produce garbage
        try:
            generate(engine, prompts if rank % tp == 0 else prompts[:1], n=1, temperature=0, max_tokens=4)
            result["tp_mismatch_error"] = None
        except ValueError as e:
            result["tp_mismatch_error"] = str(e)
        try:  # one rank's input is invalid: it must not raise alone and leave the other rank waiting
            generate(engine, [[1] * 500] if rank % tp == 0 else prompts, n=1, temperature=0, max_tokens=4)
            result["tp_invalid_error"] = None
        except ValueError as e:
            result["tp_invalid_error"] = str(e)
    if tp == 1 and trainer_group:  # the engines step together: a rank without prompts must still join,
        # or its peer waits in vLLM's dp all-reduce while it waits in the trainer's (a hang before the fix)
        lone = [prompts[0]] if rank == 0 else []
        out = generate(engine, lone, n=2, temperature=1.0, max_tokens=8, seed=1)
        result["uneven"] = [out.response_ids.shape[0]]
        torch.distributed.barrier()
        lone = [prompts[0]] if rank == 1 else []
        out = generate(engine, lone, n=1, temperature=0, max_tokens=8)
        result["uneven"].append(out.response_ids.shape[0])
        result["after_uneven"] = greedy()
    if trainer_group:
        x = torch.tensor([float(rank + 1)])
        torch.distributed.all_reduce(x)
        result["trainer_allreduce"] = x.item()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    print(f"[rank {rank}] done", flush=True)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    if int(sys.argv[2]) == 1:
        os._exit(0)  # skip the slow (~7 s) interpreter teardown
    # TP > 1: a normal exit, which unlinks vLLM's CPU TP shared memory (/dev/shm/*cpushm_*); os._exit would
    # leave it behind and the next TP run on this host would fail with "create shm ... errno: 17"
