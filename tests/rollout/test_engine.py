"""vLLM in this process on the tiny random Llama: generate, log-probs, weight updates, bad input.

All tests share the session engine `tiny_engine` (and one reference engine); the ones that change its
weights restore them before they return.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("vllm")

from rlprims.rollout import (  # noqa: E402
    FINISH_LENGTH,
    FINISH_STOP,
    create_engine,
    generate,
    generate_hf,
    sleep_engine,
    update_weights,
    wake_engine,
)
from tests.rollout.conftest import (  # noqa: E402
    EOS_ID,
    MAX_MODEL_LEN,
    check_layout,
    forward_logprobs,
    perturbed,
    tiny_engine_prompts,
)
from tests.tolerances import ENGINE_FP32, EXACT  # noqa: E402


def _greedy(engine, prompts=None):
    return generate(engine, prompts or tiny_engine_prompts(), n=1, temperature=0, max_tokens=16)


def _assert_same(a, b, **tol):
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.response_mask, b.response_mask)
    torch.testing.assert_close(a.rollout_logprobs, b.rollout_logprobs, **(tol or EXACT))


# ---------------------------------------------------------------------------------------------- generate


def test_generate_layout(tiny_engine):
    prompts = tiny_engine_prompts()
    batch = generate(tiny_engine, prompts, n=3, temperature=1.0, max_tokens=12, seed=0)
    check_layout(batch, prompts, 3)
    assert batch.response_ids.shape == (9, 12)


def test_generate_seed_determinism(tiny_engine):
    kw = dict(n=4, temperature=1.0, max_tokens=10)
    a = generate(tiny_engine, tiny_engine_prompts(), seed=7, **kw)
    b = generate(tiny_engine, tiny_engine_prompts(), seed=7, progress=True, **kw)  # a bar changes nothing
    c = generate(tiny_engine, tiny_engine_prompts(), seed=8, **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.response_ids, c.response_ids)
    assert len({tuple(a.response_ids[r].tolist()) for r in range(4)}) == 4  # a group's samples differ
    # the same prompt twice in one call: different rows, different seeds, different samples
    twice = generate(tiny_engine, [[1, 5], [1, 5]], n=1, temperature=1.0, max_tokens=10, seed=7)
    assert not torch.equal(twice.response_ids[0], twice.response_ids[1])


def test_without_logprobs_the_samples_are_the_same_and_logprobs_nan(tiny_engine):
    kw = dict(n=2, temperature=1.0, max_tokens=10, seed=3)
    a = generate(tiny_engine, tiny_engine_prompts(), **kw)
    b = generate(tiny_engine, tiny_engine_prompts(), logprobs=False, **kw)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    assert torch.isfinite(a.rollout_logprobs).all()
    assert b.rollout_logprobs[b.response_mask].isnan().all()  # "not asked for", never a silent 0
    assert (b.rollout_logprobs[~b.response_mask] == 0).all()


def test_greedy_matches_fallback(tiny_engine, tiny_hf_model):
    ours = generate(tiny_engine, tiny_engine_prompts(), n=1, temperature=0, max_tokens=32)
    ref = generate_hf(
        tiny_hf_model, tiny_engine_prompts(), n=1, temperature=0, max_tokens=32, max_model_len=MAX_MODEL_LEN
    )
    _assert_same(ours, ref, **ENGINE_FP32)
    assert torch.equal(ours.finish_reasons, ref.finish_reasons)


def test_stop_tokens(tiny_engine):
    free = generate(tiny_engine, tiny_engine_prompts(), n=1, temperature=0, max_tokens=8)
    assert (free.finish_reasons == FINISH_LENGTH).all() and (free.response_lengths == 8).all()
    row = free.response_ids[0].tolist()
    k = next(i for i in range(1, 8) if row[i] not in row[:i])  # first new token after position 0
    out = generate(
        tiny_engine, tiny_engine_prompts(), n=1, temperature=0, max_tokens=8, stop_token_ids=[row[k]]
    )
    assert out.response_ids[0][: k + 1].tolist() == row[: k + 1]  # the stop token is kept, mask True
    assert out.response_lengths[0] == k + 1 and out.finish_reasons[0] == FINISH_STOP


def test_eos_ends_responses(tiny_engine):
    # hot sampling so that EOS (id 2 of 256) comes up; seed fixed, so the outcome is fixed
    out = generate(tiny_engine, tiny_engine_prompts(), n=16, temperature=1.5, max_tokens=48, seed=0)
    stopped = out.finish_reasons == FINISH_STOP
    assert stopped.any(), "no response hit EOS; pick another seed"
    last = out.response_ids.gather(1, (out.response_lengths - 1)[:, None])[:, 0]
    assert (last[stopped] == EOS_ID).all()
    assert ((out.response_ids == EOS_ID) & out.response_mask).sum() == stopped.sum()  # EOS only at the end
    assert (out.response_lengths[~stopped] == 48).all()
    ignored = generate(
        tiny_engine, tiny_engine_prompts(), n=16, temperature=1.5, max_tokens=48, seed=0, ignore_eos=True
    )
    assert (ignored.finish_reasons == FINISH_LENGTH).all()


def test_model_length_limit(tiny_engine):
    long = [1] + [5] * (MAX_MODEL_LEN - 7)  # leaves room for 6 tokens
    out = generate(tiny_engine, [long, [1, 5]], n=1, temperature=0, max_tokens=20, ignore_eos=True)
    assert out.response_lengths.tolist() == [6, 20] and (out.finish_reasons == FINISH_LENGTH).all()


def test_bad_prompts(tiny_engine):
    with pytest.raises(
        ValueError, match=rf"prompt_ids\[1\] has {MAX_MODEL_LEN} tokens.*max_model_len={MAX_MODEL_LEN}"
    ):
        generate(tiny_engine, [[1, 5], [1] * MAX_MODEL_LEN], n=1, temperature=0, max_tokens=4)
    with pytest.raises(ValueError, match=r"prompt_ids\[0\] has token ids outside \[0, 256\)"):
        generate(tiny_engine, [[1, 256]], n=1, temperature=0, max_tokens=4)
    with pytest.raises(ValueError, match=r"prompt_ids\[2\] is empty"):
        generate(tiny_engine, [[1], [2], []], n=1, temperature=0, max_tokens=4)
    empty = generate(tiny_engine, [], n=4, temperature=1.0, max_tokens=4)
    assert empty.response_ids.shape == (0, 0) and empty.finish_reasons.shape == (0,)


# ---------------------------------------------------------------------------------------- update_weights


def test_update_weights_follows_trainer(tiny_engine, perturbed_engine, original_weights):
    assert "lm_head.weight" in original_weights  # tied alias accepted and ignored
    base = _greedy(tiny_engine)
    sampled_kw = dict(n=2, temperature=1.0, max_tokens=12, seed=3)
    try:
        update_weights(tiny_engine, perturbed(original_weights))
        pushed = _greedy(tiny_engine)
        assert not torch.equal(pushed.response_ids, base.response_ids)
        _assert_same(pushed, _greedy(perturbed_engine))
        _assert_same(
            generate(tiny_engine, tiny_engine_prompts(), **sampled_kw),
            generate(perturbed_engine, tiny_engine_prompts(), **sampled_kw),
        )
    finally:
        update_weights(tiny_engine, original_weights)
    _assert_same(_greedy(tiny_engine), base)


def test_update_weights_streamed_buckets(tiny_engine, perturbed_engine, original_weights):
    base = _greedy(tiny_engine)
    names = sorted(original_weights)
    new_weights = perturbed(original_weights)

    def buckets(weights, size):  # what a sharded trainer yields: a few tensors at a time, lazily
        for i in range(0, len(names), size):
            yield [(k, weights[k]) for k in names[i : i + size]]

    try:
        update_weights(tiny_engine, itertools.chain.from_iterable(buckets(new_weights, 3)))
        _assert_same(_greedy(tiny_engine), _greedy(perturbed_engine))
    finally:
        update_weights(tiny_engine, itertools.chain.from_iterable(buckets(original_weights, 5)))
    _assert_same(_greedy(tiny_engine), base)


def test_update_weights_bf16_tensors_are_cast(tiny_engine, tiny_hf_model, original_weights):
    # a bf16 trainer pushing into an fp32 engine: the engine holds the bf16 values, cast to fp32
    import copy

    base = _greedy(tiny_engine)
    rounded = {k: v.to(torch.bfloat16) for k, v in perturbed(original_weights).items()}
    reference = copy.deepcopy(tiny_hf_model)
    reference.load_state_dict({k: v.float() for k, v in rounded.items()})
    try:
        update_weights(tiny_engine, rounded)
        ref = generate_hf(
            reference, tiny_engine_prompts(), n=1, temperature=0, max_tokens=16, max_model_len=MAX_MODEL_LEN
        )
        _assert_same(_greedy(tiny_engine), ref, **ENGINE_FP32)
    finally:
        update_weights(tiny_engine, original_weights)
    _assert_same(_greedy(tiny_engine), base)


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda w: w | {"model.layers.0.self_attn.bogus.weight": torch.zeros(3)},
            r"unknown weight names.*\['model\.layers\.0\.self_attn\.bogus\.weight'\]",
        ),
        (
            lambda w: w | {"model.norm.weight": torch.zeros(5)},
            r"shape mismatches: \['model\.norm\.weight: got \(5,\), checkpoint has \(128,\)'\]",
        ),
        (
            lambda w: {k: v for k, v in w.items() if "k_proj" not in k},
            r"missing names .*'model\.layers\.0\.self_attn\.k_proj\.weight'",
        ),
        (
            lambda w: list(w.items()) + [("model.norm.weight", w["model.norm.weight"])],
            r"names sent more than once: \['model\.norm\.weight'\]",
        ),
        (
            lambda w: w | {"model.norm.weight": torch.ones(128, dtype=torch.long)},
            r"not a floating-point tensor",
        ),
        (lambda w: w | {"lm_head.weight": w["lm_head.weight"] + 1}, r"ties its embeddings, but the lm_head"),
    ],
)
def test_update_weights_rejects_bad_sets_untouched(tiny_engine, original_weights, edit, match):
    base = _greedy(tiny_engine)
    with pytest.raises(ValueError, match=match) as info:
        update_weights(tiny_engine, edit(dict(original_weights)))
    assert "The engine was not touched" in str(info.value)
    _assert_same(_greedy(tiny_engine), base)


def test_update_weights_stream_errors(tiny_engine, original_weights):
    base = _greedy(tiny_engine)
    stream = iter(list(original_weights.items()) + [("bogus.weight", torch.zeros(2))])
    with pytest.raises(ValueError, match=r"unknown weight names.*\['bogus\.weight'\].*inconsistent now"):
        update_weights(tiny_engine, stream)
    _assert_same(_greedy(tiny_engine), base)  # every valid tensor was the original one

    def broken():
        yield from list(original_weights.items())[:3]
        raise OSError("trainer died")

    with pytest.raises(RuntimeError, match="the weight stream raised") as info:
        update_weights(tiny_engine, broken())
    assert isinstance(info.value.__cause__, OSError)
    update_weights(tiny_engine, original_weights)  # the engine is still usable
    _assert_same(_greedy(tiny_engine), base)


# ---------------------------------------------------------------------------------- sleep / create checks


def test_sleep_is_refused_on_cpu(tiny_engine, tiny_model_dir):
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("CPU-backend behaviour; the CUDA path is benchmarks/rollout_gpu_check.py")
    with pytest.raises(ValueError, match="without enable_sleep_mode=True"):
        sleep_engine(tiny_engine, level=1)
    sleep_engine(tiny_engine, level=0)  # level 0 (what fit_to_device gives on CPU): a no-op on any engine
    with pytest.raises(ValueError, match="level must be 0, 1 or 2"):
        sleep_engine(tiny_engine, level=3)
    with pytest.raises(ValueError, match="without enable_sleep_mode=True"):
        wake_engine(tiny_engine)
    with pytest.raises(ValueError, match="CPU backend has no sleep mode"):
        create_engine(tiny_model_dir, max_model_len=64, enable_sleep_mode=True)


def test_create_engine_bad_args(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="needs one process per TP rank"):
        create_engine(tiny_model_dir, max_model_len=64, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="local HF model directory"):
        create_engine(tmp_path, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len must be a positive int"):
        create_engine(tiny_model_dir, max_model_len=0)
    with pytest.raises(ValueError, match="logprobs_mode"):
        create_engine(tiny_model_dir, max_model_len=64, logprobs_mode="raw_logits")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(ValueError, match="engine core in this process"):
        create_engine(tiny_model_dir, max_model_len=64)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with pytest.raises(ValueError, match="WORLD_SIZE=3 is not a multiple of tensor_parallel_size=2"):
        create_engine(tiny_model_dir, max_model_len=64, tensor_parallel_size=2)
