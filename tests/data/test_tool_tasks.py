"""rlprims.data.tool_tasks: the multiplication-with-a-calculator task, tools named in rows, tool prompts."""

from __future__ import annotations

import json

import pytest

from rlprims.data import (
    calculator_demo,
    multiplication_rows,
    read_verl_parquet,
    row_tool_names,
    tool_prompt_ids,
    write_verl_parquet,
)
from rlprims.rewards import compute_score


def test_rows_are_verl_rows_with_their_tools():
    rows = multiplication_rows(3, seed=0, demos=2)
    for row in rows:
        a, b = (
            int(x) for x in row["prompt"][-1]["content"].split("?")[0].removeprefix("What is ").split(" * ")
        )
        assert 100 <= a <= 999 and 100 <= b <= 999
        assert row["reward_model"]["ground_truth"] == str(a * b)
        assert row["prompt"][:-1] == calculator_demo(17, 23) + calculator_demo(45, 61)
        assert row_tool_names(row) == ["calculator"]
        assert (
            compute_score(row["data_source"], f"The answer is {a * b}.", row["reward_model"]["ground_truth"])
            == 1
        )
    assert rows == multiplication_rows(3, seed=0, demos=2)  # deterministic in the seed
    assert rows != multiplication_rows(3, seed=1, demos=2)
    assert len(multiplication_rows(2, seed=0, demos=0)[0]["prompt"]) == 1


def test_demo_is_a_hermes_call():
    user, call, result, answer = calculator_demo(17, 23)
    body = call["content"].removeprefix("<tool_call>").removesuffix("</tool_call>")
    assert json.loads(body) == {"name": "calculator", "arguments": {"expression": "17 * 23"}}
    assert result == {"role": "tool", "content": "391"} and answer["content"] == "The answer is 391."


def test_rows_round_trip_through_parquet(tmp_path):
    rows = multiplication_rows(4, seed=0)
    assert read_verl_parquet(write_verl_parquet(rows, tmp_path / "t.parquet")) == rows


def test_tool_names_from_verl_tools_kwargs():
    row = {
        "extra_info": {
            "tools_kwargs": {"calc_gsm8k_reward": {"create_kwargs": {"ground_truth": "1"}}, "search": None}
        }
    }
    assert row_tool_names(row) == ["calc_gsm8k_reward"]  # a None entry: the key of another row's tool
    assert row_tool_names({"extra_info": None}) == [] and row_tool_names({}) == []


def test_tool_prompt_ids_renders_each_rows_tools_and_drops_long_prompts():
    class Tok:  # a character tokenizer: the render function is the recipe's choice, tested elsewhere
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    def render(tokenizer, messages, schemas):
        return "|".join(s["function"]["name"] for s in schemas) + ":" + messages[-1]["content"]

    schemas = {"calculator": {"function": {"name": "calculator"}}}
    rows = [
        {"prompt": [{"role": "user", "content": "hi"}], "extra_info": {"tools": ["calculator"]}},
        {"prompt": [{"role": "user", "content": "x" * 50}], "extra_info": {"tools": ["calculator"]}},
        {"prompt": [{"role": "user", "content": "no tools"}]},
    ]
    out = tool_prompt_ids(Tok(), rows, schemas, render=render, max_len=20)
    assert [("".join(map(chr, ids)), row) for ids, row in out] == [
        ("calculator:hi", rows[0]),
        (":no tools", rows[2]),
    ]
    with pytest.raises(ValueError, match=r"row 0 names tool\(s\) \['search'\]"):
        tool_prompt_ids(
            Tok(), [{"prompt": [], "extra_info": {"tools": ["search"]}}], schemas, render=render, max_len=20
        )
