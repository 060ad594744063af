"""rlprims.launch.sizing: CPU keeps the recipes' historical defaults; on a GPU the documented choices.

The GPU branch is a pure function of the model's geometry and the GPU's memory (`fit_to_memory`), so it
is tested here without a GPU, on the geometries the benchmarks measured (Qwen2.5 0.5B with the 49k
vocabulary of the GRPO issue, 1.5B, 7B) and an H200's 143,771 MiB.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlprims.launch import Dist, fit_to_device
from rlprims.launch.sizing import GiB, ModelGeometry, fit_to_memory, kv_cache_bytes, model_geometry

CPU = Dist(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"), backend="gloo")
H200 = 143771 * 2**20
Q05 = ModelGeometry(params=402_000_000, layers=24, hidden=896, intermediate=4864, vocab=49152, kv_heads=2,
                    head_dim=64)
Q15 = ModelGeometry(params=1_544_000_000, layers=28, hidden=1536, intermediate=8960, vocab=151936, kv_heads=2,
                    head_dim=128)
Q7 = ModelGeometry(params=7_616_000_000, layers=28, hidden=3584, intermediate=18944, vocab=152064, kv_heads=4,
                   head_dim=128)
WORKLOAD = dict(max_prompt_len=128, max_response_len=512)  # the GRPO issue's side-by-side: 64 x 8 rows


def RunArgs(**overrides):  # noqa: N802 - the recipes' RunArgs defaults for the fields sizing reads
    fields = dict(compile_engine=None, kv_cache_gb=0.0, gpu_memory_utilization=0.4, sleep_level=-1,
                  max_tokens_per_micro_batch=0, activation_checkpointing=None, max_prompt_len=128,
                  max_response_len=48, tp=1, dtype="float32", compute_dtype="")
    return SimpleNamespace(**(fields | overrides))


def test_cpu_keeps_the_historical_defaults():
    fit = fit_to_device(RunArgs(), "unused-on-cpu", CPU, rows=16)
    assert fit.enforce_eager and fit.sleep_level == 0
    assert fit.kv_cache_bytes == GiB // 2 and fit.max_tokens_per_micro_batch == 8192
    assert not (fit.checkpointing or fit.gather_once or fit.cpu_offload)
    assert fit.max_num_seqs is None  # vLLM's own default
    assert fit.engine_kwargs == dict(kv_cache_memory_bytes=GiB // 2, enforce_eager=True,
                                     enable_sleep_mode=False)


def test_cpu_explicit_values_are_kept():
    args = RunArgs(kv_cache_gb=0.1, max_tokens_per_micro_batch=200, compile_engine=True,
                   activation_checkpointing=True, sleep_level=0)
    fit = fit_to_device(args, "unused-on-cpu", CPU, rows=16)
    assert fit.kv_cache_bytes == int(0.1 * GiB) and fit.max_tokens_per_micro_batch == 200
    assert not fit.enforce_eager and fit.checkpointing
    with pytest.raises(ValueError, match="no sleep mode"):
        fit_to_device(RunArgs(sleep_level=2), "unused-on-cpu", CPU, rows=16)
    with pytest.raises(ValueError, match="sleep-level"):
        fit_to_device(RunArgs(sleep_level=3), "unused-on-cpu", CPU, rows=16)


def test_gpu_choices_for_the_measured_geometries():
    args = SimpleNamespace(**WORKLOAD)
    small = fit_to_memory(args, Q05, total_memory=H200, world_size=1, rows=512)
    assert not small.enforce_eager and small.sleep_level == 2
    # the rollout batch at once: 512 x 640 tokens x 12,288 bytes (24 layers, 2 kv heads of 64, bf16), +25 %
    assert small.kv_cache_bytes == int(1.25 * 512 * 640 * 12288) + (64 << 20)
    # micro-batches of 32k tokens hide the host's work at 0.5B; without Liger they would take a third of
    # the GPU (1.5 MB/token), so they stop at a quarter of it
    assert small.max_tokens_per_micro_batch == 24576 and not small.checkpointing and small.gather_once
    assert not small.cpu_offload and not small.use_liger
    assert small.shard_kwargs == dict(activation_checkpointing=False, reshard_after_forward=False,
                                      cpu_offload=False, per_layer=True)
    assert small.max_num_seqs == 512 and small.engine_kwargs == dict(
        kv_cache_memory_bytes=small.kv_cache_bytes, enforce_eager=False, enable_sleep_mode=True,
        engine_args={"max_num_seqs": 512})
    assert fit_to_memory(args, Q05, total_memory=H200, world_size=1, rows=20).max_num_seqs == 256  # floor
    assert fit_to_memory(args, Q05, total_memory=H200, world_size=1, rows=1001).max_num_seqs == 1008  # of 8
    mid = fit_to_memory(args, Q15, total_memory=H200, world_size=1, rows=512, liger_available=True)
    # 16k tokens of 1.5B are GPU work enough; Liger on
    assert mid.max_tokens_per_micro_batch == 16384 and not mid.checkpointing and not mid.gather_once
    assert mid.use_liger
    big = fit_to_memory(args, Q7, total_memory=H200, world_size=1, rows=512)
    assert big.cpu_offload and big.checkpointing and big.gather_once  # 122 GB of fp32 state: to the CPU
    assert big.shard_kwargs == dict(activation_checkpointing=True, reshard_after_forward=False,
                                    cpu_offload=True, per_layer=True)
    assert big.max_tokens_per_micro_batch == 16384
    # 8 ranks share the 7B state: no offload, no gathering (6 bytes/param would be 46 GB on every rank)
    node = fit_to_memory(args, Q7, total_memory=H200, world_size=8, rows=512)
    assert not node.cpu_offload and not node.gather_once


def test_liger_where_installed_and_the_micro_batch_it_allows():
    args = SimpleNamespace(**WORKLOAD)
    fused = fit_to_memory(args, Q05, total_memory=H200, world_size=1, rows=512, liger_available=True)
    # 6 x 0.402B x 32,768 FLOPs per micro-batch: 34 GiB of activations at Liger's 1.09 MB/token, within
    # a quarter of the GPU (35 GiB)
    assert fused.use_liger and fused.max_tokens_per_micro_batch == 32768 and not fused.checkpointing
    off = SimpleNamespace(**WORKLOAD, use_liger=False)
    assert not fit_to_memory(off, Q05, total_memory=H200, world_size=1, rows=512,
                             liger_available=True).use_liger
    on = SimpleNamespace(**WORKLOAD, use_liger=True)  # explicit: load_model then says what is missing
    assert fit_to_memory(on, Q05, total_memory=H200, world_size=1, rows=512).use_liger
    # a smaller GPU: its quarter is below the 16k floor, which still holds
    quarter = fit_to_memory(args, Q05, total_memory=H200 // 2, world_size=1, rows=512, liger_available=True)
    assert quarter.max_tokens_per_micro_batch == 16384
    assert not fit_to_device(RunArgs(), "unused-on-cpu", CPU, rows=16).use_liger
    with pytest.raises(ValueError, match="--use-liger true: .* CUDA only"):
        fit_to_device(RunArgs(use_liger=True), "unused-on-cpu", CPU, rows=16)


def test_liger_supports(monkeypatch):
    import sys

    from rlprims.models.fused import liger_supports

    assert liger_supports("qwen2") and liger_supports("llama") and not liger_supports("no-such-model")
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)  # not installed
    assert not liger_supports("qwen2")

    def broken():
        raise RuntimeError("triton mismatch")

    monkeypatch.setattr("rlprims.models.fused._liger", broken)  # installed, but fails to import
    with pytest.warns(UserWarning, match="failed to import .RuntimeError: triton mismatch.*use-liger false"):
        assert not liger_supports("qwen2")


def test_cpu_offload_must_fit_the_host():
    """7B with fp32 masters on one H200: 113 GiB of state goes to the CPU; a 128 GiB host (the H200
    machine's) would be killed mid-run, so the fit says what to change instead."""
    args = SimpleNamespace(**WORKLOAD)
    with pytest.raises(ValueError, match=r"7\.62B model.*113 GiB.*128 GiB: use --dtype bfloat16"):
        fit_to_memory(args, Q7, total_memory=H200, world_size=1, rows=512, host_memory=128 * GiB)
    roomy = fit_to_memory(args, Q7, total_memory=H200, world_size=1, rows=512, host_memory=512 * GiB)
    assert roomy.cpu_offload
    # four ranks of one node pin four quarters: the node holds the whole state again
    with pytest.raises(ValueError, match="more GPUs"):
        fit_to_memory(args, Q7, total_memory=H200 // 3, world_size=4, rows=512, host_memory=128 * GiB,
                      local_world_size=4)
    # bf16 masters (what the 7B H200 run used): 57 GiB of state stays on the GPU, with checkpointing
    bf16 = fit_to_memory(SimpleNamespace(**WORKLOAD, dtype="bfloat16"), Q7, total_memory=H200, world_size=1,
                         rows=512, host_memory=128 * GiB)
    assert not bf16.cpu_offload and bf16.checkpointing and not bf16.gather_once


def test_rollout_logprobs_where_something_reads_them():
    cpu = fit_to_device(RunArgs(), "unused-on-cpu", CPU, rows=16)
    assert cpu.rollout_logprobs  # CPU: kept on (rollout_corr/* in every run)
    gpu = lambda **kw: fit_to_memory(SimpleNamespace(**WORKLOAD, **kw), Q05, total_memory=H200,  # noqa: E731
                                     world_size=1, rows=512).rollout_logprobs
    assert not gpu() and gpu(rollout_is="token") and gpu(rollout_rs="seq_mean") and gpu(rollout_logprobs=True)
    assert not fit_to_device(RunArgs(rollout_logprobs=False), "unused-on-cpu", CPU, rows=16).rollout_logprobs
    with pytest.raises(ValueError, match="--rollout-is / --rollout-rs need"):
        gpu(rollout_is="token", rollout_logprobs=False)


def test_gpu_explicit_values_are_kept():
    args = SimpleNamespace(**WORKLOAD, compile_engine=False, kv_cache_gb=2.0, sleep_level=0,
                           max_tokens_per_micro_batch=4096, activation_checkpointing=True)
    fit = fit_to_memory(args, Q05, total_memory=H200, world_size=1, rows=512)
    assert fit.enforce_eager and fit.kv_cache_bytes == 2 * GiB and fit.sleep_level == 0
    assert fit.max_tokens_per_micro_batch == 4096 and fit.checkpointing


def test_kv_cache_bytes_literal_and_cap():
    g = ModelGeometry(params=1, layers=2, hidden=8, intermediate=16, vocab=10, kv_heads=2, head_dim=4)
    # 2 (K, V) x 2 layers x 2 heads x 4 dims x 2 bytes = 64 bytes a token; 3 rows x 10 tokens x 1.25
    kw = dict(rows=3, max_model_len=10, dtype_bytes=2, tensor_parallel_size=1)
    assert kv_cache_bytes(g, budget_bytes=1 << 30, **kw) == 2400 + (64 << 20)
    assert kv_cache_bytes(g, budget_bytes=5000, **kw) == 5000  # capped
    assert kv_cache_bytes(g, budget_bytes=1 << 30, **(kw | dict(tensor_parallel_size=2))) == 1200 + (64 << 20)
    with pytest.raises(ValueError, match="does not hold one sequence"):
        kv_cache_bytes(g, budget_bytes=639, **kw)


def test_model_geometry_counts_the_parameters(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    cfg.save_pretrained(tmp_path)
    g = model_geometry(tmp_path)
    model = AutoModelForCausalLM.from_config(cfg)
    assert g.params == sum(p.numel() for p in model.parameters())
    assert (g.layers, g.hidden, g.intermediate, g.vocab, g.kv_heads, g.head_dim) == (2, 32, 48, 64, 2, 8)
    assert g.model_type == "qwen2"


def test_share_prompts_on_by_default_and_as_given():
    assert fit_to_device(RunArgs(), "unused-on-cpu", CPU, rows=16).share_prompts
    assert not fit_to_device(RunArgs(share_prompts=False), "unused-on-cpu", CPU, rows=16).share_prompts
    gpu = lambda **kw: fit_to_memory(SimpleNamespace(**WORKLOAD, **kw), Q05, total_memory=H200,  # noqa: E731
                                     world_size=1, rows=512).share_prompts
    assert gpu() and gpu(share_prompts=True) and not gpu(share_prompts=False)


def test_a_recipe_without_an_engine():
    """SFT / reward model: rows=0 (no engine, nothing asleep), their `max_len` bounds one sequence."""
    sft = SimpleNamespace(max_len=256, max_tokens_per_micro_batch=0)
    cpu = fit_to_device(sft, "unused-on-cpu", CPU, rows=0)
    assert cpu.max_tokens_per_micro_batch == 8192 and cpu.shard_kwargs == dict(
        activation_checkpointing=False, reshard_after_forward=True, cpu_offload=False, per_layer=True)
    gpu = fit_to_memory(SimpleNamespace(max_len=14000), Q05, total_memory=H200, world_size=1, rows=0)
    assert gpu.kv_cache_bytes == 0 and gpu.sleep_level == 0 and gpu.max_num_seqs is None
    # 2 x max_len is more than a quarter of the GPU allows (24,576): two sequences a micro-batch still
    assert gpu.max_tokens_per_micro_batch == 28000 // 1024 * 1024 and gpu.gather_once
    with pytest.raises(ValueError, match="one sequence of 2000000 tokens does not fit"):
        fit_to_memory(SimpleNamespace(max_len=2_000_000), Q05, total_memory=H200, world_size=1, rows=0)


def test_cpu_offload_as_given():
    args = lambda **kw: SimpleNamespace(**WORKLOAD, **kw)  # noqa: E731
    forced = fit_to_memory(args(cpu_offload=True), Q05, total_memory=H200, world_size=1, rows=512)
    assert forced.cpu_offload and forced.shard_kwargs["cpu_offload"]
    with pytest.raises(ValueError, match="more than 80 % of the host's 128 GiB"):  # checked when forced too
        fit_to_memory(args(cpu_offload=True), Q7, total_memory=H200, world_size=1, rows=512,
                      host_memory=128 * GiB)
    with pytest.raises(ValueError, match="awake engine .* do not fit"):  # 7B fp32 kept on the GPU
        fit_to_memory(args(cpu_offload=False), Q7, total_memory=H200, world_size=1, rows=512)
    with pytest.raises(ValueError, match="on the CPU already"):
        fit_to_device(RunArgs(cpu_offload=True), "unused-on-cpu", CPU, rows=16)


def test_fsdp_per_layer_as_given():
    """--fsdp-per-layer: unset = each decoder layer its own FSDP2 unit; false = the whole model one unit."""
    args = lambda **kw: SimpleNamespace(**WORKLOAD, **kw)  # noqa: E731
    assert fit_to_memory(args(), Q05, total_memory=H200, world_size=1, rows=512).shard_kwargs["per_layer"]
    one = fit_to_memory(args(fsdp_per_layer=False), Q05, total_memory=H200, world_size=1, rows=512)
    assert one.shard_kwargs["per_layer"] is False and one.gather_once
    assert fit_to_device(SimpleNamespace(fsdp_per_layer=False), "unused-on-cpu", CPU, rows=0).per_layer is False
