"""Fixtures for the rollout tests: a tiny random Llama saved as an HF directory, and shared engines.

Engines start in ~3 s on CPU but `import vllm` takes ~10 s, so every vLLM test of the session shares
the engines made here (vLLM tears down process-global state when an engine is deleted, so they live
until the session ends).
"""

from __future__ import annotations

import os

import pytest
import torch

# A head_dim the CPU attention kernel supports (32, 64, 80, ...), an even head count (TP=2), GQA, tied
# embeddings (as SmolLM2). Weights larger than the HF init so greedy text is not flat (no argmax ties).
TINY = dict(vocab=256, hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, max_len=256)
EOS_ID = 2
MAX_MODEL_LEN = 96


def make_tiny_llama(path: str | os.PathLike[str], *, seed: int = 0, tie: bool = True) -> str:
    """Saves a random Llama (TINY dims) with a word-level tokenizer ("<0>".."<255>") to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = str(path)
    vocab = {f"<{i}>": i for i in range(TINY["vocab"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<1>", eos_token=f"<{EOS_ID}>", unk_token="<0>", pad_token="<0>"
    )
    fast.save_pretrained(path)
    cfg = LlamaConfig(
        vocab_size=TINY["vocab"],
        hidden_size=TINY["hidden"],
        intermediate_size=2 * TINY["hidden"],
        num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"],
        head_dim=TINY["head_dim"],
        max_position_embeddings=TINY["max_len"],
        bos_token_id=1,
        eos_token_id=EOS_ID,
        pad_token_id=0,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3 if "embed" in name or "lm_head" in name else 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: str):
    pytest.importorskip("vllm")
    from rlprims.rollout import create_engine

    return create_engine(
        tiny_model_dir, max_model_len=MAX_MODEL_LEN, dtype="float32", seed=0, kv_cache_memory_bytes=32 << 20
    )


def perturbed(state_dict: dict[str, torch.Tensor], *, seed: int = 123) -> dict[str, torch.Tensor]:
    """The trainer's weights after a step: each tensor + 0.05 N(0, 1); the tied lm_head stays tied."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sorted(state_dict.items())}
    out["lm_head.weight"] = out["model.embed_tokens.weight"]  # one tensor, two names
    return out


@pytest.fixture(scope="session")
def original_weights(tiny_hf_model) -> dict[str, torch.Tensor]:
    # HF's state_dict of a tied model holds lm_head.weight too (the same tensor as embed_tokens)
    return {k: v.detach().clone() for k, v in tiny_hf_model.state_dict().items()}


@pytest.fixture(scope="session")
def perturbed_engine(tiny_hf_model, original_weights, tmp_path_factory):
    """An engine loaded from a saved copy of the perturbed weights: what update_weights must reproduce."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlprims.rollout import create_engine

    model = AutoModelForCausalLM.from_config(tiny_hf_model.config, dtype=torch.float32)
    model.load_state_dict(perturbed(original_weights))
    path = tmp_path_factory.mktemp("tiny-perturbed")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_hf_model.name_or_path).save_pretrained(path)
    return create_engine(
        path, max_model_len=MAX_MODEL_LEN, dtype="float32", seed=0, kv_cache_memory_bytes=16 << 20
    )


def tiny_engine_prompts() -> list[list[int]]:
    """Prompts of different lengths (2, 5, 3 tokens) starting with BOS."""
    return [[1, 5], [1, 17, 42, 99, 7], [1, 200, 3]]


def forward_logprobs(model, batch, *, temperature, top_k=None, top_p=1.0):
    """Teacher-forced reference: processed log-probs of each response from one forward over the row."""
    from rlprims.rollout import processed_logprobs

    rows = []
    for r in range(batch.response_ids.shape[0]):
        prompt = batch.prompt_ids[r][batch.prompt_mask[r]]
        resp = batch.response_ids[r][batch.response_mask[r]]
        with torch.no_grad():
            logits = model(torch.cat([prompt, resp])[None]).logits[0, len(prompt) - 1 : -1]
        lp = processed_logprobs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        rows.append(lp.gather(1, resp[:, None])[:, 0])
    return rows


def check_layout(batch, prompts, n):
    """Shapes, group layout, masks and lengths of a RolloutBatch made from `prompts` with n samples."""
    b = len(prompts) * n
    assert batch.prompt_ids.shape == batch.prompt_mask.shape == (b, max(map(len, prompts)))
    assert batch.response_ids.shape == batch.response_mask.shape == batch.rollout_logprobs.shape
    assert batch.response_ids.shape[0] == b
    for r in range(b):  # group layout: rows i*n .. i*n+n-1 hold prompt i
        assert batch.prompt_ids[r][batch.prompt_mask[r]].tolist() == prompts[r // n]
    assert torch.equal(batch.response_mask.sum(1), batch.response_lengths)
    assert torch.equal(batch.prompt_lengths, torch.tensor([len(prompts[r // n]) for r in range(b)]))
    # response mask is a prefix; log-probs are <= 0 on it and exactly 0 outside
    cols = torch.arange(batch.response_mask.shape[1])
    assert torch.equal(batch.response_mask, cols[None] < batch.response_lengths[:, None])
    assert (batch.rollout_logprobs[batch.response_mask] <= 0).all()
    assert (batch.rollout_logprobs[~batch.response_mask] == 0).all()


__all__ = [
    "make_tiny_llama",
    "tiny_engine_prompts",
    "perturbed",
    "check_layout",
    "forward_logprobs",
    "EOS_ID",
    "MAX_MODEL_LEN",
    "TINY",
]
