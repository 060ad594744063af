"""rlprims.rollout.multiturn: the multi-turn loop, its masks and limits, and token alignment.

The loop is tested with a scripted `sample` (turns given as text, so every mask, count and limit has a
literal expected value) and then with both real generators: on trajectories with tool results between
the turns, the trainer's log-probs of the model tokens equal the engine's (vLLM: the rollout_corr/kl
check, < 1e-4 on CPU; generate_hf: the same forward, so tighter).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from rlprims.rollout import (
    FINISH_DONE,
    FINISH_LENGTH,
    FINISH_MAX_TURNS,
    FINISH_STOP,
    continuation_ids,
    final_turn_texts,
    generate_multiturn,
    multiturn_sequences,
    tool_pool,
    trajectory_texts,
)
from rlprims.rollout.batch import pack_rollout
from rlprims.rollout.tools import ToolCall, calculator
from tests.rollout import _tools

pytest.importorskip("pebble")

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "%s"}}</tool_call>'


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from rlprims.rollout import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def pool():
    with tool_pool(
        [calculator, _tools.echo, _tools.hang], timeout_s=2.0, max_output_chars=64, workers=2
    ) as p:
        yield p


def prompt_of(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def scripted(tokenizer, scripts: list[list[str]]):
    """A `sample` that answers with fixed turns: scripts[r] are row r's turns, as text (EOS appended;
    a turn ending in "…" is sampled without EOS, so it is cut at max_tokens). The first turns must
    differ between the rows of one prompt. Records what it was asked (`sample.log`)."""
    turns = [
        [
            tokenizer(t.removesuffix("…"), add_special_tokens=False)["input_ids"]
            + ([] if t.endswith("…") else [tokenizer.eos_token_id])
            for t in script
        ]
        for script in scripts
    ]
    served = [0] * len(scripts)
    log = []

    def sample(prompt_ids, *, n, max_tokens, seed):
        log.append(dict(prompt_ids=[list(p) for p in prompt_ids], n=n, max_tokens=max_tokens, seed=seed))
        if not any(served):  # the first round: every row, groups contiguous
            rows = list(range(len(prompt_ids) * n))
        else:  # later rounds: find each trajectory by its first turn
            rows = [
                next(r for r in range(len(scripts)) if served[r] and _contains(list(p), turns[r][0]))
                for p in prompt_ids
            ]
        responses, logprobs, finish = [], [], []
        for r in rows:
            ids = turns[r][served[r]]
            served[r] += 1
            cut = len(ids) > max_tokens or ids[-1] != tokenizer.eos_token_id
            ids = ids[:max_tokens]
            responses.append(ids)
            logprobs.append([-0.01 * (r + 1)] * len(ids))
            finish.append(FINISH_LENGTH if cut else FINISH_STOP)
        return pack_rollout(prompt_ids, responses, logprobs, finish, n=n, pad_token_id=0)

    sample.log = log
    return sample


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def run(tokenizer, pool, scripts, *, n=1, prompts=None, **kw):
    prompts = prompts or [prompt_of(tokenizer, f"What is 12 * {34 + i}?") for i in range(len(scripts) // n)]
    kw = dict(max_turns=4, max_response_tokens=200, max_model_len=512) | kw
    sample = scripted(tokenizer, scripts)
    out = generate_multiturn(sample, prompts, n=n, tokenizer=tokenizer, pool=pool, **kw)
    return out, sample, prompts


def segments(tokenizer, out, r):
    """Row r's response as [(is_model, turn_id, text)], consecutive tokens of one kind merged."""
    ids = out.rollout.response_ids[r][out.sequence_mask[r]].tolist()
    model = out.rollout.response_mask[r][out.sequence_mask[r]].tolist()
    turn = out.turn_ids[r][out.sequence_mask[r]].tolist()
    parts, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (model[i], turn[i]) != (model[start], turn[start]):
            parts.append((model[start], turn[start], tokenizer.decode(ids[start:i])))
            start = i
    return parts


# ---- the loop, scripted ----------------------------------------------------------------------------


def test_continuation_ids_chatml(tokenizer):
    ids = continuation_ids(tokenizer, [{"role": "tool", "content": "408"}])
    assert tokenizer.decode(ids) == "\n<|im_start|>tool\n408<|im_end|>\n<|im_start|>assistant\n"
    # prompt + turn + continuation is exactly the template's tokenization of the whole conversation
    # (for a turn whose text tokenizes the same way it was sampled)
    turn = CALL % "12 * 34"
    conv = [
        {"role": "user", "content": "What is 12 * 34?"},
        {"role": "assistant", "content": turn},
        {"role": "tool", "content": "408"},
    ]
    full = tokenizer(
        tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    turn_ids = tokenizer(turn, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert prompt_of(tokenizer, "What is 12 * 34?") + turn_ids + ids == full


def test_tool_round_trip(tokenizer, pool):
    out, sample, prompts = run(tokenizer, pool, [[CALL % "12 * 34", "The answer is 408."]])
    r = out.rollout
    assert segments(tokenizer, out, 0) == [
        (True, 0, CALL % "12 * 34" + "<|im_end|>"),
        (False, 0, "\n<|im_start|>tool\n408<|im_end|>\n<|im_start|>assistant\n"),
        (True, 1, "The answer is 408.<|im_end|>"),
    ]
    assert r.finish_reasons.tolist() == [FINISH_STOP]
    assert (
        out.num_turns.tolist() == [2]
        and out.num_tool_calls.tolist() == [1]
        and out.num_tool_errors.tolist() == [0]
    )
    assert r.response_lengths.tolist() == [r.response_mask.sum().item()]
    assert (r.rollout_logprobs[r.response_mask] == -0.01).all() and (
        r.rollout_logprobs[~r.response_mask] == 0
    ).all()
    assert final_turn_texts(tokenizer, out) == ["The answer is 408."]
    assert trajectory_texts(tokenizer, out) == [
        CALL % "12 * 34" + "<|im_end|>\n<|im_start|>tool\n408<|im_end|>\n<|im_start|>assistant\n"
        "The answer is 408.<|im_end|>"
    ]
    assert math.isnan(out.interaction_rewards.item())
    # token in, token out: the second turn's prompt is the first prompt plus the response so far, as ids
    first, second = sample.log
    assert first["prompt_ids"] == prompts and first["n"] == 1
    n_resp = (
        out.sequence_mask.sum().item()
        - len(tokenizer("The answer is 408.", add_special_tokens=False)["input_ids"])
        - 1
    )
    assert second["prompt_ids"] == [prompts[0] + r.response_ids[0, :n_resp].tolist()]


def test_no_prompt_gives_an_empty_batch_and_no_texts(tokenizer, pool):
    """A rank without prompts: B = 0 everywhere, and texts are [] (a tokenizer decodes no rows as [''])."""
    out, sample, _ = run(tokenizer, pool, [], prompts=[])
    assert out.rollout.response_ids.shape[0] == 0 and out.num_turns.shape == (0,)
    assert final_turn_texts(tokenizer, out) == [] and trajectory_texts(tokenizer, out) == []
    assert sample.log == []  # alone, no round (with peers, test_multiturn_dp: empty rounds until they end)


def test_sequences_attend_to_tool_tokens_but_train_on_model_tokens(tokenizer, pool):
    out, _, _ = run(
        tokenizer,
        pool,
        [[CALL % "2 * 3", "6"], ["I think 7.", "unused"]],
        n=2,
        prompts=[prompt_of(tokenizer, "What is 2 * 3?")],
    )
    seqs = multiturn_sequences(out)
    p = out.rollout.prompt_ids.shape[1]
    assert torch.equal(seqs.attention_mask[:, p:], out.sequence_mask)
    assert torch.equal(seqs.response_mask[:, p:], out.rollout.response_mask)
    assert not seqs.response_mask[:, :p].any()
    # row 0 has a hole (the tool result); row 1 answered at once: its response is all model tokens
    assert (out.sequence_mask[0] & ~out.rollout.response_mask[0]).sum() > 0
    assert torch.equal(out.sequence_mask[1], out.rollout.response_mask[1])
    assert out.num_turns.tolist() == [2, 1]


def test_model_tokens_are_kept_as_sampled(tokenizer, pool):
    """A turn sampled with a non-canonical tokenization (a word spelled letter by letter) keeps its ids."""
    odd = [tokenizer.convert_tokens_to_ids(c) for c in "<tool_call>"] + tokenizer(
        '{"name": "echo", "arguments": {"text": "hi"}}</tool_call>', add_special_tokens=False
    )["input_ids"]
    assert (
        tokenizer.decode(odd).startswith("<tool_call>") and odd != tokenizer("<tool_call>")["input_ids"][:3]
    )

    def sample(prompt_ids, *, n, max_tokens, seed):
        first = len(sample.seen) == 0
        sample.seen.append(prompt_ids)
        ids = (
            odd + [tokenizer.eos_token_id]
            if first
            else tokenizer("ok")["input_ids"] + [tokenizer.eos_token_id]
        )
        return pack_rollout(prompt_ids, [ids], [[-1.0] * len(ids)], [FINISH_STOP], n=1, pad_token_id=0)

    sample.seen = []
    prompt = prompt_of(tokenizer, "Say hi.")
    out = generate_multiturn(
        sample,
        [prompt],
        n=1,
        tokenizer=tokenizer,
        pool=pool,
        max_turns=3,
        max_response_tokens=100,
        max_model_len=512,
    )
    assert out.rollout.response_ids[0, : len(odd) + 1].tolist() == odd + [tokenizer.eos_token_id]
    assert sample.seen[1][0][len(prompt) : len(prompt) + len(odd)] == odd
    assert out.num_tool_calls.tolist() == [1] and out.num_tool_errors.tolist() == [0]


def test_bad_calls_are_error_observations_and_the_trajectory_goes_on(tokenizer, pool):
    scripts = [
        ['<tool_call>{"name": "calculator", "arguments": {"expression": "1 +"</tool_call>', "Sorry."],
        ['<tool_call>{"name": "search", "arguments": {"q": "x"}}</tool_call>', "Sorry!"],
        ['<tool_call>{"name": "calculator", "arguments": {"expression": 12}}</tool_call>', "Sorry?"],
        ['<tool_call>{"name": "hang", "arguments": {"seconds": 100}}</tool_call>', "Sorry..."],
    ]
    out, _, _ = run(tokenizer, pool, scripts)
    obs = [segments(tokenizer, out, r)[1][2] for r in range(4)]
    assert "Error: the tool call is not valid JSON" in obs[0]
    assert "Error: unknown tool 'search'" in obs[1]
    assert "Error: calculator(): argument 'expression' must be string, got int 12" in obs[2]
    assert "Error: hang(): timed out after 2 s" in obs[3]
    assert out.num_tool_errors.tolist() == [1, 1, 1, 1] and out.num_turns.tolist() == [2, 2, 2, 2]
    assert out.rollout.finish_reasons.tolist() == [FINISH_STOP] * 4


def test_limits(tokenizer, pool):
    call = CALL % "1 + 1"
    # max_turns: the last turn's call is not run
    out, _, _ = run(tokenizer, pool, [[call, call, call]], max_turns=2)
    assert out.rollout.finish_reasons.tolist() == [FINISH_MAX_TURNS]
    assert out.num_turns.tolist() == [2] and out.num_tool_calls.tolist() == [2]
    assert [s[0] for s in segments(tokenizer, out, 0)] == [True, False, True]
    # max_turn_tokens: a long turn is cut
    out, sample, _ = run(tokenizer, pool, [["word " * 50]], max_turn_tokens=8)
    assert out.rollout.finish_reasons.tolist() == [
        FINISH_LENGTH
    ] and out.rollout.response_lengths.tolist() == [8]
    assert sample.log[0]["max_tokens"] == 8
    # max_response_tokens: the second turn only gets what is left; a result that does not fit ends it
    n_call = len(tokenizer(call, add_special_tokens=False)["input_ids"]) + 1
    out, sample, _ = run(
        tokenizer,
        pool,
        [[call, "The answer is two, I am quite sure of it."]],
        max_response_tokens=n_call + 15,
    )
    assert out.rollout.finish_reasons.tolist() == [FINISH_LENGTH]
    assert out.sequence_mask.sum().item() == n_call + 15
    n_obs = len(continuation_ids(tokenizer, [{"role": "tool", "content": "2"}]))
    assert sample.log[1]["max_tokens"] == 15 - n_obs
    out, _, _ = run(tokenizer, pool, [[call, "2"]], max_response_tokens=n_call + 5)
    assert out.rollout.finish_reasons.tolist() == [FINISH_LENGTH] and out.num_turns.tolist() == [1]
    assert out.sequence_mask.sum().item() == n_call  # the result was not appended
    # the context: a result that would fill max_model_len ends the trajectory the same way
    prompt = prompt_of(tokenizer, "What is 1 + 1?")
    out, _, _ = run(tokenizer, pool, [[call, "2"]], prompts=[prompt], max_model_len=len(prompt) + n_call + 5)
    assert out.rollout.finish_reasons.tolist() == [FINISH_LENGTH] and out.num_turns.tolist() == [1]


def test_interaction(tokenizer, pool):
    rows = [
        {"prompt": [{"role": "user", "content": "Guess my number."}], "reward_model": {"ground_truth": "7"}}
    ]
    prompts = [prompt_of(tokenizer, "Guess my number.")] * 1
    out, _, _ = run(
        tokenizer,
        pool,
        [["Is it 3?", "Is it 5?", "It is 7."]],
        prompts=prompts,
        rows=rows,
        interaction=_tools.guess_game,
    )
    assert out.rollout.finish_reasons.tolist() == [FINISH_DONE]
    assert out.interaction_rewards.tolist() == [1.0] and out.num_turns.tolist() == [3]
    parts = segments(tokenizer, out, 0)
    assert parts[1] == (False, 0, "\n<|im_start|>user\nNo, try again (1).<|im_end|>\n<|im_start|>assistant\n")
    assert parts[3] == (False, 1, "\n<|im_start|>user\nNo, try again (2).<|im_end|>\n<|im_start|>assistant\n")
    # out of turns: the last reward counts, the episode ends at max_turns
    out, _, _ = run(
        tokenizer,
        pool,
        [["Is it 3?", "Is it 5?"]],
        prompts=prompts,
        rows=rows,
        interaction=_tools.guess_game,
        max_turns=2,
    )
    assert out.rollout.finish_reasons.tolist() == [FINISH_MAX_TURNS] and out.interaction_rewards.tolist() == [
        0.0
    ]
    # a crashing simulator ends the episode and counts as an error
    out, _, _ = run(
        tokenizer, pool, [["Is it 3?"]], prompts=prompts, rows=rows, interaction=_tools.broken_interaction
    )
    assert out.rollout.finish_reasons.tolist() == [FINISH_STOP] and out.num_tool_errors.tolist() == [1]
    with pytest.raises(ValueError, match="needs rows="):
        run(tokenizer, pool, [["x"]], interaction=_tools.guess_game)


# ---- real generators: the trainer's log-probs equal the engine's on multi-turn trajectories -----------


def always_echo(text: str) -> list[ToolCall]:
    """Every turn calls the echo tool (a random model never writes a real call)."""
    return [ToolCall("echo", {"text": text[:12]})]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    from tests.recipes.conftest import make_tiny_chat_model

    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


def trainer_logprobs(model_dir, out):
    from transformers import AutoModelForCausalLM

    from rlprims.models.packed import register_packed_attention, response_logprobs

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=register_packed_attention()
    )
    seqs = multiturn_sequences(out)
    with torch.no_grad():
        lp = response_logprobs(model, *seqs, temperature=1.0)
    return lp[:, out.rollout.prompt_ids.shape[1] :]


def check_alignment(out, model_dir, *, tol):
    from rlprims.ops import rollout_correction_metrics

    r = out.rollout
    assert (out.num_turns >= 2).sum() >= 4, out.num_turns  # trajectories with tool results inside
    assert (out.sequence_mask & ~r.response_mask).any()
    lp = trainer_logprobs(model_dir, out)
    diff = (lp - r.rollout_logprobs).abs()[r.response_mask]
    kl = rollout_correction_metrics(lp, r.rollout_logprobs, r.response_mask)["rollout_corr/kl"]
    assert diff.max() < tol and abs(kl.item()) < 1e-4, (diff.max(), kl)


def test_vllm_multiturn_logprobs_match_the_trainer(chat_model_dir, tokenizer, pool):
    pytest.importorskip("vllm")
    from rlprims.rollout import create_engine, generate

    engine = create_engine(
        chat_model_dir, max_model_len=256, dtype="float32", seed=0, kv_cache_memory_bytes=32 << 20
    )
    # a random model rarely samples EOS: a third of the vocabulary ends a turn, so turns stay short
    sample = functools.partial(
        generate, engine, temperature=1.0, stop_token_ids=list(range(3, len(tokenizer), 3))
    )
    prompts = [prompt_of(tokenizer, q) for q in ("What is 2 * 3?", "Name a prime.")]
    out = generate_multiturn(
        sample,
        prompts,
        n=4,
        tokenizer=tokenizer,
        pool=pool,
        max_turns=3,
        max_response_tokens=120,
        max_model_len=256,
        max_turn_tokens=12,
        parse_calls=always_echo,
        seed=7,
    )
    check_alignment(out, chat_model_dir, tol=1e-3)


def test_hf_multiturn_logprobs_match_the_trainer(chat_model_dir, tokenizer, pool):
    from transformers import AutoModelForCausalLM

    from rlprims.rollout import generate_hf

    model = AutoModelForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32)
    sample = functools.partial(
        generate_hf,
        model,
        temperature=1.0,
        max_model_len=256,
        stop_token_ids=list(range(3, len(tokenizer), 3)),
    )
    prompts = [prompt_of(tokenizer, q) for q in ("What is 2 * 3?", "Name a prime.")]
    out = generate_multiturn(
        sample,
        prompts,
        n=4,
        tokenizer=tokenizer,
        pool=pool,
        max_turns=3,
        max_response_tokens=120,
        max_model_len=256,
        max_turn_tokens=12,
        parse_calls=always_echo,
        seed=7,
    )
    check_alignment(out, chat_model_dir, tol=1e-4)


# ---- a template with a tool section (Hermes / Qwen2.5 layout) ------------------------------------------

# Written for this test in the layout Qwen2.5 and Hermes models use: tools listed in the system message,
# calls as "<tool_call>\n{json}\n</tool_call>" after the assistant's text, consecutive tool results
# grouped in one user turn, each inside <tool_response>.
HERMES_LIKE = (  # newlines as {{ '\n' }}: transformers renders templates with trim_blocks
    "{%- if tools %}{{ '<|im_start|>system\\n# Tools\\n<tools>' }}"
    "{%- for t in tools %}{{ '\\n' + (t | tojson) }}{% endfor %}"
    "{{- '\\n</tools>\\nCall a tool with <tool_call>\\n{...}\\n</tool_call><|im_end|>\\n' }}{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def hermes_tokenizer(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = HERMES_LIKE
    return tok


def test_template_with_tools_two_calls_in_one_turn(hermes_tokenizer, pool):
    from rlprims.rollout import template_has_tools, template_tool_prompt, tool_schema

    tok = hermes_tokenizer
    assert template_has_tools(tok)
    text = template_tool_prompt(
        tok, [{"role": "user", "content": "What is 2 * 3 + 4?"}], [tool_schema(calculator)]
    )
    assert text.startswith(
        '<|im_start|>system\n# Tools\n<tools>\n{"type": "function", "function": {"name": "calc'
    )
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "%s"}}\n</tool_call>'
    turn = "Two steps.\n" + call % "2 * 3" + "\n" + call % "6 + 4"
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    out, _, _ = run(tok, pool, [[turn, "The answer is 10."]], prompts=[prompt])
    assert out.num_tool_calls.tolist() == [2] and out.num_tool_errors.tolist() == [0]
    obs = segments(tok, out, 0)[1]
    assert obs == (
        False,
        0,
        "\n<|im_start|>user\n<tool_response>\n6\n</tool_response>\n<tool_response>\n10\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n",
    )


def test_tool_use_metrics():
    from rlprims.rollout import tool_use_metrics, tool_use_sums
    from rlprims.rollout.batch import RolloutBatch

    finish = torch.tensor([FINISH_STOP, FINISH_STOP, FINISH_LENGTH, FINISH_MAX_TURNS])
    rollout = RolloutBatch(*([torch.zeros(4, 1)] * 5), finish, torch.ones(4), torch.ones(4))
    from rlprims.rollout import MultiTurnBatch

    mt = MultiTurnBatch(
        rollout,
        torch.ones(4, 1, dtype=torch.bool),
        torch.zeros(4, 1, dtype=torch.long),
        num_turns=torch.tensor([2, 1, 3, 3]),
        num_tool_calls=torch.tensor([1, 0, 3, 2]),
        num_tool_errors=torch.tensor([0, 0, 1, 1]),
        interaction_rewards=torch.full((4,), math.nan),
    )
    sums = tool_use_sums(mt)
    assert sums == {
        "trajectories": 4.0,
        "turns": 9.0,
        "tool_calls": 6.0,
        "tool_errors": 2.0,
        "with_tool_calls": 3.0,
        "finish_stop": 2.0,
        "finish_length": 1.0,
        "finish_max_turns": 1.0,
        "finish_done": 0.0,
    }
    assert tool_use_metrics(sums, prefix="val-aux/") == {
        "val-aux/tool/call_rate": 0.75,
        "val-aux/tool/calls_mean": 1.5,
        "val-aux/tool/error_rate": 2 / 6,
        "val-aux/num_turns/mean": 2.25,
        "val-aux/finish/stop": 0.5,
        "val-aux/finish/length": 0.25,
        "val-aux/finish/max_turns": 0.25,
        "val-aux/finish/done": 0.0,
    }
    empty = dict.fromkeys(sums, 0.0)
    assert all(v == 0 for v in tool_use_metrics(empty).values())
