"""rlprims.checkpoint: DCP round trips (plain module, world-1 group, FSDP2 on 2 ranks), RNG resume,
atomicity under SIGKILL, keep_last, and HF export (tied and untied embeddings, dtype, FSDP2 gather)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from rlprims.checkpoint import checkpoint_step, export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from tests.checkpoint._workers import full_exp_avg, fsdp_worker, tiny_training_step
from tests.rollout.conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def _mlp(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _mlp_step(model, optimizer) -> None:
    """A step whose data comes from the global RNG, so a wrong RNG restore changes the weights."""
    x = torch.randn(7, 5)
    model(x).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _state(model, optimizer) -> dict[str, torch.Tensor]:
    out = {f"param/{k}": v.clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        for k, v in optimizer.state[p].items():
            out[f"optim/{i}/{k}"] = v.clone()
    return out


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _round_trip(tmp_path: Path) -> None:
    model, opt = _mlp(0)
    for _ in range(3):
        _mlp_step(model, opt)
    random.seed(11), np.random.seed(12), torch.manual_seed(13)
    path = save_checkpoint(tmp_path, 3, model=model, optimizer=opt,
                           extra_state={"sampler": [1, 2], "kl": 0.5})
    saved = _state(model, opt)
    draws = _draws()
    _mlp_step(model, opt)  # the uninterrupted run's step 4
    reference = _state(model, opt)

    model2, opt2 = _mlp(1)  # different init, no optimizer state yet
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    assert latest_checkpoint(tmp_path) == path == tmp_path / "step-00000003"
    assert checkpoint_step(path) == 3
    extra = load_checkpoint(path, model=model2, optimizer=opt2)
    assert extra == {"sampler": [1, 2], "kl": 0.5}
    _assert_bitwise(_state(model2, opt2), saved)
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["weight_decay"] == 0.1
    assert _draws() == draws  # python, numpy and torch RNG continue where the saved run was
    # the resumed step 4 equals the uninterrupted one, bitwise (same data: the RNG was restored)
    _mlp_step(model2, opt2)
    _assert_bitwise(_state(model2, opt2), reference)


def test_round_trip_plain_module_without_process_group(tmp_path):
    # in a fresh process: an engine made earlier in this one (vLLM) leaves a default group behind
    code = ("import sys, torch.distributed as dist; from pathlib import Path;"
            "from tests.checkpoint.test_checkpoint import _round_trip;"
            "assert not dist.is_initialized(); _round_trip(Path(sys.argv[1])); print('round trip ok')")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0 and "round trip ok" in done.stdout, done.stderr[-3000:]


def test_round_trip_with_world_one_process_group(tmp_path):
    ours = not dist.is_initialized()  # else: the world-1 group an in-process vLLM engine created
    if ours:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.get_world_size() == 1
        _round_trip(tmp_path / "ckpt")
    finally:
        if ours:
            dist.destroy_process_group()


def test_model_only_checkpoint_and_resave_same_step(tmp_path):
    model, _ = _mlp(0)
    save_checkpoint(tmp_path, 5, model=model, optimizer=None, extra_state={})
    with torch.no_grad():
        model[0].weight.add_(1.0)
    save_checkpoint(tmp_path, 5, model=model, optimizer=None, extra_state={"again": True})  # replaces it
    model2, _ = _mlp(1)
    assert load_checkpoint(tmp_path / "step-00000005", model=model2, optimizer=None) == {"again": True}
    assert torch.equal(model2[0].weight, model[0].weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000005"]


def test_keep_last_prunes_oldest_and_latest_ignores_leftovers(tmp_path):
    model, opt = _mlp(0)
    for step in (1, 2, 3, 10):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, extra_state={"s": step}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000010"]
    # a killed save's temp dir and a step dir without the completion marker are both ignored
    (tmp_path / ".tmp-step-00000011").mkdir()
    (tmp_path / "step-00000012").mkdir()
    (tmp_path / "step-00000012" / ".metadata").write_text("partial")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000010"
    assert latest_checkpoint(tmp_path / "missing") is None
    save_checkpoint(tmp_path, 11, model=model, optimizer=opt, extra_state={}, keep_last=2)
    assert not (tmp_path / ".tmp-step-00000011").exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000011"
    assert (tmp_path / "step-00000010").is_dir() and not (tmp_path / "step-00000003").exists()


def test_bad_inputs(tmp_path):
    model, opt = _mlp(0)
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, model=model, optimizer=opt, extra_state={})
    with pytest.raises(ValueError, match="extra_state"):
        save_checkpoint(tmp_path, 1, model=model, optimizer=opt, extra_state={"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="extra_state"):
        save_checkpoint(tmp_path, 1, model=model, optimizer=opt, extra_state={"x": float("nan")})
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, model=model, optimizer=opt, extra_state={}, keep_last=0)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step-00000001", model=model, optimizer=opt)
    with pytest.raises(ValueError, match="step-<8 digits>"):
        checkpoint_step(tmp_path / "final")
    with pytest.raises(ValueError, match="PreTrainedModel"):
        export_hf(model, tmp_path / "hf")


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    root, ready = tmp_path / "ckpt", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "tests.checkpoint._workers", str(root), str(ready)],
                             cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, "the saving process exited before it was killed"
            assert time.monotonic() < deadline, "the saving process never reached the stalled write"
            time.sleep(0.05)
        assert any((root / ".tmp-step-00000002").iterdir())  # shards of step 2 are on disk
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert latest_checkpoint(root) == root / "step-00000001"
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    assert load_checkpoint(latest_checkpoint(root), model=model, optimizer=opt) == {"step": 1}
    torch.manual_seed(0)  # step 1's weights: the child's init and one step (the +1 came after the save)
    expected = torch.nn.Linear(4, 3)
    expected_opt = torch.optim.AdamW(expected.parameters(), lr=0.1)
    expected(torch.randn(2, 4)).sum().backward()
    expected_opt.step()
    assert torch.equal(model.weight, expected.weight) and torch.equal(model.bias, expected.bias)
    # the next save succeeds and removes the leftover
    save_checkpoint(root, 2, model=model, optimizer=opt, extra_state={"step": 2})
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000002"]
    assert latest_checkpoint(root) == root / "step-00000002"


# ---- HF export ------------------------------------------------------------------------------------------
def _safetensors_keys(path: Path) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            keys |= set(sf.keys())
    return keys


@pytest.mark.parametrize("tie", [True, False])
def test_export_hf_loads_with_transformers_and_gives_same_logits(tmp_path, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = make_tiny_llama(tmp_path / "src", tie=tie)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tiny_training_step(model, opt, seed=3)  # exported weights differ from the source's
    tokenizer = AutoTokenizer.from_pretrained(src)
    out = export_hf(model, tmp_path / "export", tokenizer=tokenizer)
    assert out == tmp_path / "export"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left
    keys = _safetensors_keys(out)
    assert "model.embed_tokens.weight" in keys
    assert ("lm_head.weight" in keys) is (not tie)  # tied: one tensor, saved once (as save_pretrained)

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tie
    ids = torch.tensor([[1, 5, 17, 42, 99, 7]])
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert AutoTokenizer.from_pretrained(out)("<5> <17>")["input_ids"] == tokenizer("<5> <17>")["input_ids"]

    # a second export replaces the first, atomically; dtype casts the weights and the config
    out = export_hf(model, out, dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (out / "tokenizer.json").exists()
    loaded16 = AutoModelForCausalLM.from_pretrained(out)
    assert loaded16.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(loaded16.model.embed_tokens.weight, model.model.embed_tokens.weight.bfloat16())


# ---- FSDP2 on 2 processes --------------------------------------------------------------------------------
def test_fsdp2_two_ranks_round_trip_rng_and_export(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_llama(tmp_path / "tiny", tie=True)
    torch.multiprocessing.spawn(fsdp_worker, args=(2, str(tmp_path / "init"), model_dir, str(tmp_path)),
                                nprocs=2, join=True)
    results = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["changed_by_step"]
        assert r["loaded_equal"], "loaded FSDP2 shards differ from the saved ones"
        assert r["exp_avg_equal"], "AdamW state after the resumed step differs"
        assert r["resumed_equal"], "the resumed step differs from the uninterrupted one"
        assert r["rng_equal"], "RNG draws after load differ from draws after save"
        assert r["extra"] == {"sampler": {"epoch": 0, "offset": 8}, "rank0_only": 0}  # stored once, by rank 0
    assert results[0]["draws"] != results[1]["draws"]  # each rank got its own RNG state back

    params = torch.load(tmp_path / "params.pt")
    # the export (gathered from the shards on rank 0) is the weights after step 2, tied embeddings once
    assert "lm_head.weight" not in _safetensors_keys(tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert exported.config.architectures == ["LlamaForCausalLM"]
    for name, p in exported.named_parameters():
        assert torch.equal(p, params["reference"][name]), name

    # the 2-rank FSDP2 checkpoint loads into an unsharded model in one process (DCP reshards)
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    load_checkpoint(latest_checkpoint(tmp_path / "ckpt"), model=plain, optimizer=opt)
    for name, p in plain.named_parameters():
        assert torch.equal(p, params["saved"][name]), name
    assert all(float(t.abs().sum()) > 0 for t in full_exp_avg(plain, opt).values())


def test_export_hf_loads_in_vllm(tmp_path):
    """vLLM reads the export of a trained tied-embedding model: its log-probs match transformers'.

    In a fresh process: an in-process engine leaves vLLM's default process group behind, which later
    tests of this session (rlprims.launch.init) must not find.
    """
    pytest.importorskip("vllm")
    code = ("import sys; from pathlib import Path; from tests.checkpoint.test_checkpoint import _export_then_vllm;"
            "_export_then_vllm(Path(sys.argv[1])); print('vllm export ok', flush=True)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert "vllm export ok" in done.stdout, (done.stdout[-2000:] + done.stderr[-4000:])


def _export_then_vllm(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlprims.rollout import create_engine, generate
    from tests.rollout.conftest import MAX_MODEL_LEN, forward_logprobs, tiny_engine_prompts
    from tests.tolerances import ENGINE_FP32

    src = make_tiny_llama(tmp_path / "src", tie=True)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tiny_training_step(model, torch.optim.AdamW(model.parameters(), lr=1e-2), seed=4)
    out = export_hf(model, tmp_path / "export", tokenizer=AutoTokenizer.from_pretrained(src))
    engine = create_engine(out, max_model_len=MAX_MODEL_LEN, dtype="float32", seed=0,
                           kv_cache_memory_bytes=16 << 20)
    batch = generate(engine, tiny_engine_prompts(), n=1, temperature=1.0, max_tokens=8, seed=0,
                     pad_token_id=0)
    model.eval()
    expected = forward_logprobs(model, batch, temperature=1.0)
    for r, lp in enumerate(expected):
        torch.testing.assert_close(batch.rollout_logprobs[r][batch.response_mask[r]], lp, **ENGINE_FP32)
