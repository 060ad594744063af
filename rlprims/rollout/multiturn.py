"""Multi-turn rollouts: the model calls tools (or talks with a simulated user) and RL trains on it all.

One loop for both engines: `sample` is `generate` over a vLLM engine or `generate_hf` over an HF model,
with the sampling options bound, e.g. `functools.partial(generate, llm, temperature=1.0)`. Each round,
every live trajectory generates its next turn in one batched `sample` call; the turn's text is parsed
for tool calls; the calls of all trajectories run concurrently in the tool workers (`rlprims.rollout.
tools`); each trajectory's results are appended as token ids and the loop goes on. A trajectory ends
on a turn without a tool call (or when the interaction says so), on a turn cut by a token limit, or at
`max_turns`.

Token in, token out: a turn's sampled token ids are kept exactly as the engine produced them (with
their log-probs) and the next turn's prompt is prompt + everything so far, as ids. Nothing is decoded
and re-tokenized. Text is decoded only to parse calls and to show the conversation to an interaction;
tool results and user replies are rendered by the chat template (`continuation_ids`) and tokenized on
their own, after the special token that ended the model's turn, so no token boundary of the model's
text changes (the drift verl's agent loop had to fix).

The result (`MultiTurnBatch`) wraps the `RolloutBatch` every recipe trains on: prompt, then one
response row holding all turns, with `response_mask` True on model tokens only (tool and user tokens
are context, not actions) and the engine's log-probs on them; `sequence_mask` is True on every
response token (what the trainer's forward attends to; `multiturn_sequences` builds the rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from rlprims._groups import Group, process_group
from rlprims.rollout.batch import (
    FINISH_LENGTH,
    FINISH_STOP,
    RolloutBatch,
    RolloutSequences,
    pack_rollout,
)
from rlprims.rollout.tools import (
    ToolCall,
    ToolPool,
    parse_hermes_tool_calls,
    run_in_pool,
    run_tool_calls,
    truncate_text,
)

__all__ = [
    "FINISH_DONE",
    "FINISH_MAX_TURNS",
    "InteractionReply",
    "MultiTurnBatch",
    "continuation_ids",
    "final_turn_texts",
    "generate_multiturn",
    "multiturn_sequences",
    "tool_use_metrics",
    "tool_use_sums",
]

# Finish codes beyond FINISH_STOP (the last turn had no tool call) and FINISH_LENGTH (a token limit:
# max_turn_tokens, max_response_tokens or the context max_model_len):
FINISH_MAX_TURNS = 2  # the max_turns-th turn still called a tool (not run) or the interaction went on
FINISH_DONE = 3  # the interaction ended the episode

_PROBE = "RLPRIMS-END-OF-TURN-PROBE"


class InteractionReply(NamedTuple):
    """What an interaction (a simulated user) answers a model turn that called no tool."""

    content: str  # the user's next message (ignored when done)
    done: bool = False  # end the episode now
    reward: float | None = None  # recorded in MultiTurnBatch.interaction_rewards (the last one given wins)


class MultiTurnBatch(NamedTuple):
    """Multi-turn rollout: the RolloutBatch to train on, plus what each trajectory did.

    rollout: B = num_prompts * n rows, groups contiguous. response_ids hold all turns (model, tool and
      user tokens), right-padded; response_mask is True on model tokens only; rollout_logprobs are the
      engine's on model tokens and 0 elsewhere; response_lengths = model tokens (= response_mask.sum(1));
      finish_reasons: FINISH_STOP, FINISH_LENGTH, FINISH_MAX_TURNS or FINISH_DONE.
    Shapes: sequence_mask, turn_ids [B, R]; the counts and rewards [B].
    """

    rollout: RolloutBatch
    sequence_mask: Tensor  # [B, R] bool, True on every response token (a prefix of the row)
    turn_ids: Tensor  # [B, R] int64, the model turn (0-based) a token belongs to or answers; -1 on padding
    num_turns: Tensor  # [B] int64, model turns
    num_tool_calls: Tensor  # [B] int64, parsed calls, malformed ones included
    num_tool_errors: Tensor  # [B] int64, calls answered with an error, plus failed interaction calls
    interaction_rewards: Tensor  # [B] float32, the interaction's last reward; NaN where it gave none


def continuation_ids(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, end_of_turn_id: int | None = None
) -> list[int]:
    """Token ids that follow a finished assistant turn to add `messages` and open the next assistant turn.

    The chat template renders [user, assistant, *messages] with the generation prompt; the part after
    the assistant's end-of-turn token (`end_of_turn_id`, default the tokenizer's EOS) is tokenized on
    its own (no special tokens added). E.g. ChatML (SmolLM2, Qwen):
    "\\n<|im_start|>tool\\n{content}<|im_end|>\\n<|im_start|>assistant\\n"; Qwen2.5's template wraps
    "tool" messages in <tool_response> inside a user turn. Raises ValueError when the template renders
    the earlier messages differently once more follow, or puts no end-of-turn token after a turn.
    """
    eot = tokenizer.eos_token_id if end_of_turn_id is None else end_of_turn_id
    eot_text = tokenizer.decode([eot])
    base = [{"role": "user", "content": "U"}, {"role": "assistant", "content": _PROBE}]
    head = tokenizer.apply_chat_template(base, tokenize=False)
    full = tokenizer.apply_chat_template([*base, *messages], tokenize=False, add_generation_prompt=True)
    start = head.find(_PROBE)
    cut = head.find(eot_text, start + len(_PROBE)) if eot_text and start >= 0 else -1
    if cut < 0 or not full.startswith(head[: cut + len(eot_text)]):
        raise ValueError(
            f"the chat template does not end an assistant turn with {eot_text!r} (id {eot}) followed by the "
            "next messages; pass the template's end-of-turn id as end_of_turn_id"
        )
    return list(tokenizer(full[cut + len(eot_text) :], add_special_tokens=False)["input_ids"])


def generate_multiturn(
    sample: Callable[..., RolloutBatch],
    prompt_ids: Sequence[Sequence[int]],
    *,
    n: int,
    tokenizer: Any,
    pool: ToolPool,
    max_turns: int,
    max_response_tokens: int,
    max_model_len: int,
    max_turn_tokens: int | None = None,
    parse_calls: Callable[[str], list[ToolCall]] = parse_hermes_tool_calls,
    interaction: Callable[[list[dict[str, Any]], Any], InteractionReply] | None = None,
    rows: Sequence[Mapping[str, Any]] | None = None,
    seed: int | None = None,
    pad_token_id: int = 0,
    group: Group = None,
) -> MultiTurnBatch:
    """Samples n multi-turn trajectories per prompt, running tool calls between turns.

    sample: `sample(prompt_ids, n=, max_tokens=, seed=) -> RolloutBatch`, e.g.
      `functools.partial(generate, llm, temperature=1.0)` or `partial(generate_hf, model,
      temperature=1.0, max_model_len=L)`. The first round samples n per prompt, later rounds 1 per
      live trajectory (prompt + all turns so far, as ids), all in one call per round.
    tokenizer: decodes turns for parsing and renders results through its chat template.
    pool: the tools and their worker processes (`tool_pool`); also runs the interaction.
    max_turns: model turns per trajectory; a tool call in the last one is not run (FINISH_MAX_TURNS).
    max_response_tokens: all response tokens (model, tool and user) per trajectory. A turn that reaches
      it is cut (FINISH_LENGTH); results that would reach it are not appended (FINISH_LENGTH).
    max_model_len: the engine's context (prompt + response); results that would fill it end the
      trajectory the same way, so every later prompt fits.
    max_turn_tokens: tokens of one model turn (default max_response_tokens).
    parse_calls: text of a turn -> calls; default the Hermes / Qwen2.5 `<tool_call>` JSON format.
    interaction: called in a worker after a turn without a tool call, as interaction(messages, row):
      messages the conversation as text (rows[i]["prompt"] plus the decoded turns and results), row the
      prompt's row. Its InteractionReply (or a (content, done, reward) tuple) either ends the episode
      (done) or is appended as a "user" message. An interaction that raises or times out ends the
      episode and counts as a tool error. Needs `rows`.
    rows: one mapping per prompt (verl rows), for the interaction.
    seed: round t samples with seed + t * B (rows get their own streams, see `generate`).
    pad_token_id: the padding id of the result.
    group: the ranks whose engines step together: vLLM under torchrun with data parallelism needs the
      data-parallel group (`mesh["dp"]`); None is the default group when torch.distributed is
      initialized, else this process alone (as everywhere in rlprims). Rounds go on until every rank
      of the group is done, and a rank whose trajectories have all ended (or that has no prompt)
      still calls `sample` with no prompts each round, as `generate` requires. One all-reduce of one
      number per round. Every rank of the group must call.

    Returns a MultiTurnBatch; B = len(prompt_ids) * n.
    """
    for name, value in (
        ("n", n),
        ("max_turns", max_turns),
        ("max_response_tokens", max_response_tokens),
        ("max_model_len", max_model_len),
        ("max_turn_tokens", max_turn_tokens or 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if interaction is not None and (rows is None or len(rows) != len(prompt_ids)):
        raise ValueError("an interaction needs rows=, one per prompt (its messages start from row['prompt'])")
    turn_limit = max_turn_tokens or max_response_tokens
    prompts = [[int(t) for t in (p.tolist() if hasattr(p, "tolist") else p)] for p in prompt_ids]
    b = len(prompts) * n
    eot = int(tokenizer.eos_token_id)
    resp: list[list[int]] = [[] for _ in range(b)]
    logprobs: list[list[float]] = [[] for _ in range(b)]
    model_tok: list[list[bool]] = [[] for _ in range(b)]
    turn_of: list[list[int]] = [[] for _ in range(b)]
    turns, calls, errors = [0] * b, [0] * b, [0] * b
    finish: list[int | None] = [None] * b
    rewards = [math.nan] * b
    messages = [list(rows[r // n]["prompt"]) if rows is not None else [] for r in range(b)]

    def append(r: int, ids: list[int], lps: list[float], *, model: bool, turn: int) -> None:
        resp[r] += ids
        logprobs[r] += lps
        model_tok[r] += [model] * len(ids)
        turn_of[r] += [turn] * len(ids)

    live = list(range(b))
    round_ = 0
    while _any_rank(bool(live), group):
        budget = {r: min(turn_limit, max_response_tokens - len(resp[r])) for r in live}
        inputs = prompts if round_ == 0 else [prompts[r // n] + resp[r] for r in live]
        out = sample(
            inputs,
            n=n if round_ == 0 else 1,
            max_tokens=max(budget.values(), default=1),
            seed=None if seed is None else seed + round_ * b,
        )
        if out.response_ids.shape[0] != len(live):
            raise RuntimeError(
                f"sample returned {out.response_ids.shape[0]} rows for {len(live)} trajectories"
            )
        pending: list[tuple[int, list[ToolCall]]] = []
        talk: list[int] = []
        for j, r in enumerate(live):
            length = int(out.response_lengths[j])
            ids, lps = out.response_ids[j, :length].tolist(), out.rollout_logprobs[j, :length].tolist()
            cut = int(out.finish_reasons[j]) == FINISH_LENGTH or length > budget[r]
            append(r, ids[: budget[r]], lps[: budget[r]], model=True, turn=turns[r])
            turns[r] += 1
            if cut:
                finish[r] = FINISH_LENGTH
                continue
            messages[r].append(
                {"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}
            )
            found = parse_calls(tokenizer.decode(ids, skip_special_tokens=False))
            calls[r] += len(found)
            if found and turns[r] >= max_turns:
                finish[r] = FINISH_MAX_TURNS
            elif found:
                pending.append((r, found))
            elif interaction is not None:
                talk.append(r)
            else:
                finish[r] = FINISH_STOP

        replies: list[tuple[int, list[dict[str, Any]]]] = []
        results = iter(run_tool_calls(pool, [c for _, found in pending for c in found]))
        for r, found in pending:
            done = [next(results) for _ in found]
            errors[r] += sum(res.error for res in done)
            replies.append((r, [{"role": "tool", "name": res.name, "content": res.content} for res in done]))
        jobs = [(interaction, (messages[r], rows[r // n])) for r in talk]  # type: ignore[index]
        outcomes = run_in_pool(pool, jobs)
        for r, (ok, reply) in zip(talk, outcomes):
            if ok and isinstance(reply, tuple) and len(reply) == 3 and isinstance(reply[0], str):
                reply = InteractionReply(*reply)
                rewards[r] = math.nan if reply.reward is None else float(reply.reward)
                if reply.done:
                    finish[r] = FINISH_DONE
                elif turns[r] >= max_turns:
                    finish[r] = FINISH_MAX_TURNS
                else:
                    replies.append(
                        (
                            r,
                            [
                                {
                                    "role": "user",
                                    "content": truncate_text(reply.content, pool.max_output_chars),
                                }
                            ],
                        )
                    )
            else:
                errors[r] += 1
                finish[r] = FINISH_STOP

        for r, msgs in replies:
            ids = continuation_ids(tokenizer, msgs, end_of_turn_id=eot)
            if resp[r][-1] != eot:  # the turn ended on another stop token: close it as the template does
                ids = [eot, *ids]
            if (
                len(resp[r]) + len(ids) >= max_response_tokens
                or len(prompts[r // n]) + len(resp[r]) + len(ids) >= max_model_len
            ):
                finish[r] = FINISH_LENGTH
                continue
            append(r, ids, [0.0] * len(ids), model=False, turn=turns[r] - 1)
            messages[r] += msgs
        live = [r for r in live if finish[r] is None]
        round_ += 1

    rollout = pack_rollout(prompts, resp, logprobs, finish, n=n, pad_token_id=pad_token_id)
    width = rollout.response_ids.shape[1]
    model_mask = torch.tensor([m + [False] * (width - len(m)) for m in model_tok], dtype=torch.bool).view(
        b, width
    )
    turn_ids = torch.tensor([t + [-1] * (width - len(t)) for t in turn_of], dtype=torch.long).view(b, width)
    rollout = rollout._replace(response_mask=model_mask, response_lengths=model_mask.sum(1))
    return MultiTurnBatch(
        rollout=rollout,
        sequence_mask=turn_ids >= 0,
        turn_ids=turn_ids,
        num_turns=torch.tensor(turns, dtype=torch.long),
        num_tool_calls=torch.tensor(calls, dtype=torch.long),
        num_tool_errors=torch.tensor(errors, dtype=torch.long),
        interaction_rewards=torch.tensor(rewards, dtype=torch.float32),
    )


def _any_rank(flag: bool, group: Group) -> bool:
    """True where `flag` holds on any rank of `group` (this process alone for None / one rank)."""
    pg = process_group(group)
    if pg is None:
        return flag
    cuda = dist.get_backend(pg) == "nccl"
    t = torch.tensor([int(flag)], device=torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=pg)
    return bool(t.item())


def multiturn_sequences(batch: MultiTurnBatch) -> RolloutSequences:
    """Prompt and all turns side by side for the trainer's forward: attention on every token (prompt,
    model, tool, user), response_mask on model tokens only (so tool and user tokens get no loss).

    Shapes: MultiTurnBatch with prompts [B, P] and responses [B, R] -> RolloutSequences of [B, P + R].
    """
    r = batch.rollout
    return RolloutSequences(
        input_ids=torch.cat([r.prompt_ids, r.response_ids], 1),
        attention_mask=torch.cat([r.prompt_mask, batch.sequence_mask.to(r.prompt_mask.device)], 1),
        response_mask=torch.cat([torch.zeros_like(r.prompt_mask), r.response_mask], 1),
    )


def final_turn_texts(tokenizer: Any, batch: MultiTurnBatch, *, skip_special_tokens: bool = True) -> list[str]:
    """The text of each trajectory's last model turn: its answer, for reward functions.

    Only the model's own last turn is scored, never tool output: a reward on the whole response would
    let a trajectory that ends right after a tool result be scored on the tool's text.
    An empty batch (a rank without prompts) gives []. Shapes: MultiTurnBatch with B rows -> B strings.
    """
    r = batch.rollout
    last = (batch.num_turns - 1).to(batch.turn_ids.device)
    keep = r.response_mask & (batch.turn_ids == last[:, None])
    ids = [row[m].tolist() for row, m in zip(r.response_ids, keep)]
    # tokenizers decode an empty list of rows as one empty text: never pass them one
    return tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens) if ids else []


def trajectory_texts(
    tokenizer: Any, batch: MultiTurnBatch, *, skip_special_tokens: bool = False
) -> list[str]:
    """The whole response of each trajectory as text: model turns, tool results and user replies in order.

    Special tokens are kept by default, so the chat template's role markers show who wrote what
    (`<|im_start|>tool ...`): for reading rollouts, e.g. `rlprims.metrics.log_generations`. Padding is
    excluded. An empty batch gives []. Shapes: MultiTurnBatch with B rows -> B strings.
    """
    ids = [row[m].tolist() for row, m in zip(batch.rollout.response_ids, batch.sequence_mask)]
    return tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens) if ids else []


_FINISH_NAMES = {
    FINISH_STOP: "stop",
    FINISH_LENGTH: "length",
    FINISH_MAX_TURNS: "max_turns",
    FINISH_DONE: "done",
}


def tool_use_sums(batch: MultiTurnBatch) -> dict[str, float]:
    """Counts of a multi-turn batch, to be summed over ranks and turned into rates by `tool_use_metrics`.

    Keys: trajectories, turns, tool_calls, tool_errors, with_tool_calls (trajectories with >= 1 call),
    finish_<stop|length|max_turns|done> (trajectories that ended so).
    """
    finish = batch.rollout.finish_reasons
    return {
        "trajectories": float(batch.num_turns.numel()),
        "turns": float(batch.num_turns.sum()),
        "tool_calls": float(batch.num_tool_calls.sum()),
        "tool_errors": float(batch.num_tool_errors.sum()),
        "with_tool_calls": float((batch.num_tool_calls > 0).sum()),
        **{f"finish_{name}": float((finish == code).sum()) for code, name in _FINISH_NAMES.items()},
    }


def tool_use_metrics(sums: Mapping[str, float], *, prefix: str = "") -> dict[str, float]:
    """Rates from (summed) `tool_use_sums`, named for logging under `prefix`:

    tool/call_rate = with_tool_calls / trajectories; tool/calls_mean = tool_calls / trajectories;
    tool/error_rate = tool_errors / tool_calls (0 without calls); num_turns/mean = turns / trajectories;
    finish/<reason> = share of trajectories that ended so. An empty batch gives zeros.
    """
    n = max(sums["trajectories"], 1.0)
    out = {
        f"{prefix}tool/call_rate": sums["with_tool_calls"] / n,
        f"{prefix}tool/calls_mean": sums["tool_calls"] / n,
        f"{prefix}tool/error_rate": sums["tool_errors"] / max(sums["tool_calls"], 1.0),
        f"{prefix}num_turns/mean": sums["turns"] / n,
    }
    return out | {f"{prefix}finish/{name}": sums[f"finish_{name}"] / n for name in _FINISH_NAMES.values()}
