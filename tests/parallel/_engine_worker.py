"""The engine check of test_weight_sync.py, in its own process (not collected by pytest).

usage: python tests/parallel/_engine_worker.py WORK_DIR [cpu|cuda]

A process group of world 1 (gloo on CPU, NCCL on CUDA, as rlprims.launch.init makes), a tiny tied Llama sharded with FSDP2,
one SGD step, then: engine A (created from the weights before the step) gets the new weights through
update_weights(engine_weights(model)); engine B is loaded from a checkpoint of the same new weights
saved with save_pretrained. Writes what both generated to WORK_DIR/result.json.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.getcwd())  # the repository root


def main() -> None:
    work = sys.argv[1]
    device = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method=f"file://{work}/pg", rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
    else:
        dist.init_process_group("gloo", init_method=f"file://{work}/pg", rank=0, world_size=1)
    # on CUDA two engines share the GPU: each is small (a tiny model, 16 MiB of KV cache)
    engine_opts = dict(gpu_memory_utilization=0.2) if device.type == "cuda" else {}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlprims.parallel import build_mesh, engine_weights, shard_model
    from rlprims.rollout import create_engine, generate, update_weights
    from tests.rollout.conftest import MAX_MODEL_LEN, make_tiny_llama, tiny_engine_prompts

    before = make_tiny_llama(os.path.join(work, "before"))
    engine = create_engine(before, max_model_len=MAX_MODEL_LEN, dtype="float32", seed=0,
                           kv_cache_memory_bytes=16 << 20, **engine_opts)

    def greedy(llm):
        out = generate(llm, tiny_engine_prompts(), n=1, temperature=0, max_tokens=16)
        return {"ids": out.response_ids.tolist(), "logprobs": out.rollout_logprobs.tolist()}

    result = {"before": greedy(engine)}
    torch.manual_seed(0)
    model = shard_model(AutoModelForCausalLM.from_pretrained(before, dtype=torch.float32).to(device),
                        build_mesh(device_type=device.type))
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    ids = torch.randint(3, 256, (4, 12)).to(device)
    model(ids, labels=ids).loss.backward()
    opt.step()

    update_weights(engine, engine_weights(model, bucket_bytes=40_000, dtype=torch.float32))
    result["synced"] = greedy(engine)

    full = dict(engine_weights(model))  # gathered again: the checkpoint of the same weights
    plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(full, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied
    after = os.path.join(work, "after")
    plain.save_pretrained(after)
    AutoTokenizer.from_pretrained(before).save_pretrained(after)
    reference = create_engine(after, max_model_len=MAX_MODEL_LEN, dtype="float32", seed=0,
                              kv_cache_memory_bytes=16 << 20, **engine_opts)
    result["checkpoint"] = greedy(reference)
    with open(os.path.join(work, "result.json"), "w") as f:
        json.dump(result, f)
    print("done", flush=True)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # skip vLLM's slow interpreter teardown
