"""rlprims.rollout.tools: Hermes call parsing, schema checks, prompts, and the time-limited worker pool.

Every bad input of issue 18 is here: malformed tool-call JSON, an unknown tool name, wrong argument
types, a tool that raises, hangs, prints megabytes, returns megabytes or kills its worker. Each becomes an
error observation (never an exception, never a hang), and the pool keeps working afterwards.
"""

from __future__ import annotations

import time

import pytest

from rlprims.rollout import (
    ToolCall,
    calculator,
    check_tool_arguments,
    minimal_tool_prompt,
    minimal_tool_system_prompt,
    parse_hermes_tool_calls,
    run_in_pool,
    run_tool_calls,
    template_has_tools,
    template_tool_prompt,
    tool_pool,
    tool_schema,
)
from tests.rollout import _tools

pytest.importorskip("pebble")

TIMEOUT_S = 1.5
MAX_CHARS = 200


@pytest.fixture(scope="module")
def pool():
    tools = [
        calculator,
        _tools.echo,
        _tools.add,
        _tools.fail,
        _tools.hang,
        _tools.flood,
        _tools.big,
        _tools.die,
        _tools.worker_pid,
    ]
    with tool_pool(tools, timeout_s=TIMEOUT_S, max_output_chars=MAX_CHARS, workers=2) as p:
        yield p


# ---- parsing -------------------------------------------------------------------------------------


def test_parse_one_call():
    text = (
        'Let me compute.<tool_call>{"name": "calculator", "arguments": {"expression": "2 * 3"}}</tool_call>'
    )
    assert parse_hermes_tool_calls(text) == [ToolCall("calculator", {"expression": "2 * 3"})]


def test_parse_qwen_layout_several_calls_and_string_arguments():
    text = (
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "echo", "arguments": "{\\"text\\": \\"hi\\"}"}\n</tool_call>'
    )
    assert parse_hermes_tool_calls(text) == [
        ToolCall("add", {"a": 1, "b": 2}),
        ToolCall("echo", {"text": "hi"}),
    ]


def test_parse_no_call_is_an_answer():
    assert parse_hermes_tool_calls("The answer is 6.") == []


def test_parse_missing_arguments_means_none():
    assert parse_hermes_tool_calls('<tool_call>{"name": "worker_pid"}</tool_call>') == [
        ToolCall("worker_pid", {})
    ]


@pytest.mark.parametrize(
    "body, message",
    [
        ('{"name": "calculator", "arguments": {"expression": "1+1"}', "not valid JSON"),
        ("calculator(1 + 1)", "not valid JSON"),
        ('["calculator"]', "must be a JSON object"),
        ('{"arguments": {}}', "must be a JSON object"),
        ('{"name": 3, "arguments": {}}', "must be a JSON object"),
        ('{"name": "calculator", "arguments": [1, 2]}', "must be a JSON object"),
    ],
)
def test_parse_malformed_calls_carry_an_error(body, message):
    (call,) = parse_hermes_tool_calls(f"<tool_call>{body}</tool_call>")
    assert call.error is not None and message in call.error


def test_parse_unclosed_tag_is_one_malformed_call():
    calls = parse_hermes_tool_calls('<tool_call>{"name": "echo", "arguments": {"text": "a"}}')
    assert len(calls) == 1 and "never closed" in calls[0].error


# ---- schemas and prompts ---------------------------------------------------------------------------


def test_schema_of_calculator():
    assert tool_schema(calculator) == {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluates an arithmetic expression and returns its value.",
            "parameters": {
                "type": "object",
                "properties": {
                    "expression": {
                        "type": "string",
                        "description": 'Numbers with + - * / // % ** and parentheses, e.g. "123 * 456".',
                    }
                },
                "required": ["expression"],
            },
            "return": {"type": "string"},
        },
    }


@pytest.mark.parametrize(
    "arguments, problem",
    [
        ({"a": 1, "b": 2}, None),
        ({"a": 1}, None),
        ({}, "missing required argument(s) ['a']"),
        ({"a": 1, "c": 2}, "unexpected argument(s) ['c'] (expected ['a', 'b'])"),
        ({"a": "1"}, "argument 'a' must be integer, got str '1'"),
        ({"a": True}, "argument 'a' must be integer, got bool True"),
        ({"a": 1.5}, "argument 'a' must be integer, got float 1.5"),
    ],
)
def test_argument_checks(arguments, problem):
    got = check_tool_arguments(tool_schema(_tools.add), arguments)
    assert got == (None if problem is None else f"add(): {problem}")


def test_argument_checks_union_nullable_enum():
    schema = {
        "function": {
            "name": "f",
            "parameters": {
                "properties": {
                    "x": {"type": ["integer", "string"]},
                    "y": {"type": "number", "nullable": True},
                    "z": {"type": "string", "enum": ["a", "b"]},
                },
                "required": [],
            },
        }
    }
    assert check_tool_arguments(schema, {"x": "s", "y": None, "z": "a"}) is None
    assert check_tool_arguments(schema, {"x": 1, "y": 2.5}) is None
    assert "must be integer or string" in check_tool_arguments(schema, {"x": [1]})
    assert "must be one of ['a', 'b']" in check_tool_arguments(schema, {"z": "c"})


def test_calculator():
    assert calculator("123 * 456") == "56088"
    assert calculator(" (2 + 3) * -4 ") == "-20"
    assert calculator("7 / 2") == "3.5"
    assert calculator("8 / 2") == "4"
    for bad in ("__import__('os').system('true')", "2 ** 1000", "x + 1", "'a' * 3"):
        with pytest.raises(ValueError):
            calculator(bad)


def test_minimal_system_prompt():
    text = minimal_tool_system_prompt(
        [tool_schema(calculator), tool_schema(_tools.add)], preamble="Be brief."
    )
    assert text == (
        "Be brief.\nYou can call these tools:\n"
        "- calculator(expression: string): Evaluates an arithmetic expression and returns its value.\n"
        "- add(a: integer, b?: integer): Adds two integers.\n"
        'To call a tool, write <tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}'
        "</tool_call> and end your turn. The result comes back in the next message."
    )


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from rlprims.rollout import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def test_minimal_prompt_on_a_template_without_tools(smol_tokenizer):
    assert not template_has_tools(smol_tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 * 3?"}]
    text = minimal_tool_prompt(smol_tokenizer, messages, [tool_schema(calculator)])
    assert text == (
        "<|im_start|>system\n"
        + minimal_tool_system_prompt([tool_schema(calculator)], preamble="Be brief.")
        + "<|im_end|>\n<|im_start|>user\n2 * 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="no tool section"):
        template_tool_prompt(smol_tokenizer, messages, [tool_schema(calculator)])


def test_template_prompt_uses_the_templates_tool_section(smol_tokenizer):
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = (
        "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t.function.name }};{% endfor %}"
        "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert template_has_tools(tok)
    text = template_tool_prompt(tok, [{"role": "user", "content": "hi"}], [tool_schema(calculator)])
    expected = "<|im_start|>system\ncalculator;<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    assert text == expected + "<|im_start|>assistant\n"


# ---- the worker pool -------------------------------------------------------------------------------


def test_a_good_call(pool):
    assert run_tool_calls(pool, [ToolCall("calculator", {"expression": "123 * 456"})]) == [
        ("calculator", "56088", False)
    ]


def test_bad_calls_become_error_observations(pool):
    calls = [
        ToolCall("", {}, "the tool call is not valid JSON (...)"),
        ToolCall("search", {"q": "x"}),
        ToolCall("add", {"a": "one"}),
        ToolCall("fail", {"reason": "no luck"}),
        ToolCall("calculator", {"expression": "1 +"}),
        ToolCall("add", {"a": 2, "b": 3}),
    ]
    results = run_tool_calls(pool, calls)
    assert [r.error for r in results] == [True, True, True, True, True, False]
    assert results[0].content == "Error: the tool call is not valid JSON (...)"
    assert results[1].content.startswith("Error: unknown tool 'search' (available: add, big, calculator,")
    assert results[2].content == "Error: add(): argument 'a' must be integer, got str 'one'"
    assert results[3].content == "Error: fail(): ValueError: no luck"
    assert results[4].content.startswith("Error: calculator(): SyntaxError")
    assert results[5].content == "5"


def test_a_hanging_tool_times_out_and_the_pool_recovers(pool):
    t0 = time.perf_counter()
    (result,) = run_tool_calls(pool, [ToolCall("hang", {"seconds": 600})])
    elapsed = time.perf_counter() - t0
    assert result == ("hang", f"Error: hang(): timed out after {TIMEOUT_S:g} s", True)
    assert elapsed < TIMEOUT_S + 5, elapsed  # the limit, pebble's polling, and a worker restart
    assert run_tool_calls(pool, [ToolCall("echo", {"text": "still here"})])[0].content == "still here"


def test_a_dying_worker_is_an_error_and_is_replaced(pool):
    (result,) = run_tool_calls(pool, [ToolCall("die", {"code": 3})])
    assert result.error and "worker process died" in result.content and "3" in result.content
    assert run_tool_calls(pool, [ToolCall("add", {"a": 1})])[0] == ("add", "1", False)


def test_output_is_truncated_in_the_worker(pool):
    printed, returned = run_tool_calls(
        pool, [ToolCall("flood", {"megabytes": 4}), ToolCall("big", {"megabytes": 8})]
    )
    assert printed.content[:MAX_CHARS] == "x" * MAX_CHARS  # 4 MiB of lines, then "done" (cut)
    assert printed.content[MAX_CHARS:] == f"... [truncated {(4 << 20) + 4 - MAX_CHARS} characters]"
    assert not printed.error
    assert returned.content == "y" * MAX_CHARS + f"... [truncated {(8 << 20) - MAX_CHARS} characters]"


def test_calls_run_concurrently(pool):
    run_tool_calls(pool, [ToolCall("worker_pid", {})] * 4)  # both workers up
    t0 = time.perf_counter()
    results = run_tool_calls(pool, [ToolCall("hang", {"seconds": 1.0})] * 2)
    assert all(r.content == "woke up" for r in results)
    assert time.perf_counter() - t0 < 1.9


def test_run_in_pool_for_interactions(pool):
    row = {"reward_model": {"ground_truth": "6"}}
    out = run_in_pool(
        pool,
        [
            (_tools.guess_game, ([{"role": "assistant", "content": "It is 6."}], row)),
            (_tools.broken_interaction, ([], row)),
        ],
    )
    assert out[0] == (True, ("", True, 1.0))
    assert out[1] == (False, "RuntimeError: simulator crashed")


def test_pool_rejects_bad_setups():
    with pytest.raises(ValueError, match="cannot be sent to worker processes"):
        tool_pool([lambda x: x])
    with pytest.raises(ValueError, match="two tools are named 'echo'"):
        tool_pool([_tools.echo, _tools.echo])
    with pytest.raises(ValueError, match="timeout_s > 0"):
        tool_pool([_tools.echo], timeout_s=0)


def test_load_tools():
    from rlprims.rollout import load_tools

    assert load_tools("rlprims.rollout:calculator, tests.rollout._tools:echo") == [calculator, _tools.echo]
    for spec, message in (
        ("calculator", "must be 'module:function'"),
        ("nope.mod:f", "No module named"),
        ("tests.rollout._tools:missing", "has no attribute 'missing'"),
    ):
        with pytest.raises(ValueError, match=message):
            load_tools(spec)
