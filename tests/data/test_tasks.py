import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlprims.data import (
    arithmetic_preference_rows,
    arithmetic_problems,
    arithmetic_rows,
    arithmetic_sft_rows,
    convert_gsm8k,
    read_preference_parquet,
    read_sft_parquet,
    read_verl_parquet,
    validate_preference_rows,
    validate_rows,
    validate_sft_rows,
)
from rlprims.data.arithmetic import main as arithmetic_cli
from rlprims.data.gsm8k import INSTRUCTION as GSM8K_INSTRUCTION
from rlprims.data.gsm8k import main as gsm8k_cli
from rlprims.rewards import compute_score


def expression_value(question: str) -> int:
    expr = question.removeprefix("What is ").split("?")[0]
    return eval(expr)  # noqa: S307 - our own generated integers and + - *


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_levels_are_correct_deterministic_and_scored(level):
    rows = arithmetic_rows(40, seed=5, level=level)
    assert rows == arithmetic_rows(40, seed=5, level=level) != arithmetic_rows(40, seed=6, level=level)
    validate_rows(rows)
    for i, row in enumerate(rows):
        truth = row["reward_model"]["ground_truth"]
        assert str(expression_value(row["prompt"][0]["content"])) == truth
        assert row["extra_info"] == ({"split": "train", "index": i} if level == 0 else
                                     {"split": "train", "index": i, "level": level})
        assert compute_score(row["data_source"], f"So it is {truth}.", truth) == 1.0


def test_level_ranges():
    # level 1: a + b with 0..20 -> sums 0..40; level 3: a*b +- c with a, b in 2..20
    for p in arithmetic_problems(200, seed=0, level=1):
        a, op, b = p.expression.split()
        assert op == "+" and 0 <= int(a) <= 20 and 0 <= int(b) <= 20
    ops = set()
    for p in arithmetic_problems(200, seed=0, level=3):
        a, times, b, op, c = p.expression.split()
        ops.add(op)
        assert times == "*" and 2 <= int(a) <= 20 and 2 <= int(b) <= 20 and 0 <= int(c) <= 99
        assert len(p.steps) == 2
    assert ops == {"+", "-"}
    assert arithmetic_problems(1, seed=0, level=3)[0].steps[0].endswith(
        str(eval(arithmetic_problems(1, seed=0, level=3)[0].expression.rsplit(" ", 2)[0])))  # noqa: S307


def test_bad_levels():
    with pytest.raises(ValueError, match="level must be one of"):
        arithmetic_rows(2, seed=0, level=4)
    with pytest.raises(ValueError, match="max_operand applies to level 0 only"):
        arithmetic_rows(2, seed=0, level=2, max_operand=5)
    with pytest.raises(ValueError, match="max_operand >= 1"):
        arithmetic_rows(2, seed=0, max_operand=0)


def test_sft_and_preference_rows_match_the_prompts_and_score_as_intended():
    rl = arithmetic_rows(30, seed=2, level=3)
    sft = arithmetic_sft_rows(30, seed=2, level=3)
    pref = arithmetic_preference_rows(30, seed=2, level=3)
    validate_sft_rows(sft)
    validate_preference_rows(pref)
    for r, s, p in zip(rl, sft, pref, strict=True):
        truth = r["reward_model"]["ground_truth"]
        assert r["prompt"][0]["content"] == s["prompt"] == p["prompt"]
        assert s["response"] == p["chosen"]
        assert compute_score(r["data_source"], s["response"], truth) == 1.0
        assert compute_score(r["data_source"], p["rejected"], truth) == 0.0
    # a literal one: level 1, seed 0
    row = arithmetic_sft_rows(1, seed=0, level=1)[0]
    a, b = map(int, row["prompt"].removeprefix("What is ").split("?")[0].split(" + "))
    assert row["response"] == f"{a} + {b} = {a + b}. The answer is {a + b}."


def test_cli_writes_train_and_test(tmp_path, capsys):
    arithmetic_cli(["--out", str(tmp_path / "rl"), "--train", "6", "--test", "3", "--level", "2", "--seed", "4"])
    train = read_verl_parquet(tmp_path / "rl" / "train.parquet")
    test = read_verl_parquet(tmp_path / "rl" / "test.parquet")
    assert train == arithmetic_rows(6, seed=4, level=2)
    assert test == arithmetic_rows(3, seed=5, level=2, split="test")
    arithmetic_cli(["--out", str(tmp_path / "sft"), "--train", "4", "--test", "0", "--kind", "sft"])
    assert read_sft_parquet(tmp_path / "sft" / "train.parquet") == arithmetic_sft_rows(4, seed=0)
    assert not (tmp_path / "sft" / "test.parquet").exists()
    arithmetic_cli(["--out", str(tmp_path / "pref"), "--train", "4", "--test", "2", "--kind", "preference"])
    assert read_preference_parquet(tmp_path / "pref" / "test.parquet") == arithmetic_preference_rows(
        2, seed=1, split="test")
    assert "wrote 6 rows" in capsys.readouterr().out


GSM8K_RECORDS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A farm sells 1,200 eggs a day...", "answer": "...\n#### 1,200"},
]


def expected_gsm8k(split):
    return [
        {
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": r["question"] + " " + GSM8K_INSTRUCTION}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": truth},
            "extra_info": {"split": split, "index": i, "answer": r["answer"], "question": r["question"]},
        }
        for i, (r, truth) in enumerate(zip(GSM8K_RECORDS, ["7", "1200"], strict=True))
    ]


def test_convert_gsm8k_parquet_and_jsonl(tmp_path):
    assert GSM8K_INSTRUCTION == 'Let\'s think step by step and output the final answer after "####".'
    src = tmp_path / "hf" / "main"
    src.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(GSM8K_RECORDS), src / "train-00000-of-00001.parquet")
    (src / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_RECORDS))
    written = convert_gsm8k(tmp_path / "hf", tmp_path / "out")
    assert written == [tmp_path / "out" / "train.parquet", tmp_path / "out" / "test.parquet"]
    assert read_verl_parquet(written[0]) == expected_gsm8k("train")
    assert read_verl_parquet(written[1]) == expected_gsm8k("test")
    assert compute_score("openai/gsm8k", "so 1200 eggs\n#### 1,200", "1200") == 1.0
    # one file to an explicit destination, with the split given; and through the CLI
    one = convert_gsm8k(src / "test.jsonl", tmp_path / "x.parquet", split="train")
    assert read_verl_parquet(one[0]) == expected_gsm8k("train")
    gsm8k_cli([str(src / "test.jsonl"), str(tmp_path / "cli")])
    assert read_verl_parquet(tmp_path / "cli" / "test.parquet") == expected_gsm8k("test")


def test_convert_gsm8k_errors_name_file_row_column(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text(json.dumps(GSM8K_RECORDS[0]) + "\n" + json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl: row 1 answer has no final '#### <number>'"):
        convert_gsm8k(bad, tmp_path / "out")
    bad.write_text(json.dumps({"question": "", "answer": "#### 1"}) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl: row 0 question must be a non-empty str"):
        convert_gsm8k(bad, tmp_path / "out")
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"train.jsonl: line 1 is not JSON"):
        convert_gsm8k(bad, tmp_path / "out")
    pq.write_table(pa.Table.from_pylist([{"question": "q"}]), tmp_path / "test.parquet")
    with pytest.raises(ValueError, match=r"test.parquet: every row lacks column\(s\) \['answer'\]"):
        convert_gsm8k(tmp_path / "test.parquet", tmp_path / "out")
    (tmp_path / "data.jsonl").write_text(json.dumps(GSM8K_RECORDS[0]) + "\n")
    with pytest.raises(ValueError, match="cannot tell the split"):
        convert_gsm8k(tmp_path / "data.jsonl", tmp_path / "out")
    with pytest.raises(ValueError, match="no GSM8K file"):
        convert_gsm8k(tmp_path / "missing.jsonl", tmp_path / "out")


def write_rows(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize(
    ("mutate", "which", "message"),
    [
        (lambda r: r.pop("prompt"), "all", r"every row lacks column\(s\) \['prompt'\]"),
        (lambda r: r.update(prompt=[]), 1, r"row 1 prompt must be a non-empty list of chat messages"),
        (lambda r: r.update(prompt=[{"role": "user", "content": "  "}]), 1,
         r"row 1 prompt\[0\].content must be a non-empty str"),
        (lambda r: r.update(prompt=[{"role": "", "content": "hi"}]), 2, r"row 2 prompt\[0\].role must be a non-empty"),
        # wrong types: a parquet column has one type, so every row carries it and row 0 is reported
        (lambda r: r.update(prompt="just a string"), "all", r"row 0 prompt must be a non-empty list"),
        (lambda r: r.update(data_source=7), "all", r"row 0 data_source must be a non-empty str"),
        (lambda r: r.update(reward_model={"style": "rule"}), "all", r"row 0 reward_model must be a dict with ground_truth"),
        (lambda r: r.update(extra_info="x"), "all", r"row 0 extra_info must be a dict"),
    ],
)
def test_malformed_verl_files_name_file_row_and_column(tmp_path, mutate, which, message):
    rows = arithmetic_rows(3, seed=0)
    for i, r in enumerate(rows):
        if which == "all" or i == which:
            mutate(r)
    path = write_rows(tmp_path / "bad.parquet", rows)
    with pytest.raises(ValueError, match=rf"bad.parquet: .*{message}"):
        read_verl_parquet(path)


def test_malformed_sft_and_preference_files(tmp_path):
    rows = arithmetic_sft_rows(3, seed=0)
    rows[2]["response"] = ""
    with pytest.raises(ValueError, match=r"sft.parquet: row 2 response must be a non-empty str"):
        read_sft_parquet(write_rows(tmp_path / "sft.parquet", rows))
    with pytest.raises(ValueError, match=r"sft.parquet: every row lacks column\(s\) \['response'\]"):
        read_sft_parquet(write_rows(tmp_path / "sft.parquet", [{"prompt": "p"}]))
    bad_turns = [{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}]
    with pytest.raises(ValueError, match=r"sft.parquet: row 0 messages needs an assistant message"):
        read_sft_parquet(write_rows(tmp_path / "sft.parquet", bad_turns))
    bad_shape = [{"messages": [{"role": "user", "text": "hi"}]}]
    with pytest.raises(ValueError, match=r"row 0 messages\[0\] must be a dict with role and content"):
        read_sft_parquet(write_rows(tmp_path / "sft.parquet", bad_shape))
    pref = arithmetic_preference_rows(2, seed=0)
    pref[1]["chosen"] = "  "
    with pytest.raises(ValueError, match=r"pref.parquet: row 1 chosen must be a non-empty str"):
        read_preference_parquet(write_rows(tmp_path / "pref.parquet", pref))
    with pytest.raises(ValueError, match=r"pref.parquet: every row lacks column\(s\) \['rejected'\]"):
        read_preference_parquet(write_rows(tmp_path / "pref.parquet", [{"prompt": "p", "chosen": "c"}]))
    with pytest.raises(ValueError, match="not a readable parquet file"):
        (tmp_path / "junk.parquet").write_text("not parquet")
        read_verl_parquet(tmp_path / "junk.parquet")


@given(st.integers(0, 3), st.integers(0, 10**6))
def test_every_generated_row_validates(level, seed):
    validate_rows(arithmetic_rows(3, seed=seed, level=level))
    validate_sft_rows(arithmetic_sft_rows(3, seed=seed, level=level))
    validate_preference_rows(arithmetic_preference_rows(3, seed=seed, level=level))
