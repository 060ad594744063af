"""Convert a user's local GSM8K files (openai/gsm8k parquet, or JSON lines) into verl-schema parquet.

The rows match verl's examples/data_preprocess/gsm8k.py: data_source "openai/gsm8k", the question
plus INSTRUCTION as one user message, ability "math", reward_model {style: "rule", ground_truth: the
number after "####" with commas removed}, extra_info {split, index, answer, question}. Nothing is
downloaded: point it at files you have (e.g. a snapshot of the openai/gsm8k dataset repository).

CLI:  python -m rlprims.data.gsm8k SRC DST      (SRC a file or a directory holding train / test files)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from rlprims.data.verl_parquet import read_parquet_rows, write_verl_parquet

DATA_SOURCE = "openai/gsm8k"
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
_SUFFIXES = (".parquet", ".jsonl", ".json")


def _read_raw(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        return read_parquet_rows(path, columns=("question", "answer"))
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"{path}: expected a .parquet or .jsonl file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line_no} is not JSON ({e.msg}); expected one object "
                                 "per line") from e
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def gsm8k_rows(raw: list[dict[str, Any]], *, split: str, source: str = "rows") -> list[dict[str, Any]]:
    """verl-schema rows from GSM8K records {question, answer}; the answer must hold "#### <number>".

    ValueError names `source`, the row and the column of a malformed record.
    """
    rows = []
    for index, record in enumerate(raw):
        if not isinstance(record, dict):
            raise ValueError(f"{source}: row {index} must be an object with question and answer")
        for column in ("question", "answer"):
            value = record.get(column)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{source}: row {index} {column} must be a non-empty str, got {value!r:.80}")
        found = _ANSWER.search(record["answer"])
        if found is None:
            raise ValueError(f"{source}: row {index} answer has no final '#### <number>': "
                             f"{record['answer'][-80:]!r}")
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": f"{record['question']} {INSTRUCTION}"}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": found.group(1).replace(",", "")},
                "extra_info": {"split": split, "index": index, "answer": record["answer"],
                               "question": record["question"]},
            }
        )
    return rows


def _split_of(path: Path) -> str:
    name = path.name.lower()
    found = [s for s in ("train", "test") if s in name]
    if len(found) != 1:
        raise ValueError(f"{path}: cannot tell the split from the name; pass split='train' or 'test'")
    return found[0]


def convert_gsm8k(src: str | Path, dst: str | Path, *, split: str | None = None) -> list[Path]:
    """Converts local GSM8K files to verl-schema parquet; returns the files written.

    src a file (.parquet or .jsonl): written to `dst` if it ends in .parquet, else to dst/<split>.parquet;
    the split comes from `split` or the file name ("train" / "test" in it).
    src a directory: its (recursively found) files with "train" / "test" in their names, one per split,
    become dst/train.parquet and dst/test.parquet; `dst` is a directory.
    """
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        if split is not None:
            raise ValueError("split applies to a single source file, not a directory")
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in _SUFFIXES)
        written = []
        for name in ("train", "test"):
            matches = [p for p in files if name in p.name.lower()]
            if len(matches) > 1:
                raise ValueError(f"{src}: several {name} files {[str(p) for p in matches]}; convert them "
                                 "one by one")
            if matches:
                written += convert_gsm8k(matches[0], dst / f"{name}.parquet", split=name)
        if not written:
            raise ValueError(f"{src}: no .parquet / .jsonl file with 'train' or 'test' in its name")
        return written
    if not src.is_file():
        raise ValueError(f"no GSM8K file or directory at {src}")
    split = split or _split_of(src)
    rows = gsm8k_rows(_read_raw(src), split=split, source=str(src))
    out = dst if dst.suffix == ".parquet" else dst / f"{split}.parquet"
    return [write_verl_parquet(rows, out)]


def main(argv: list[str] | None = None) -> None:
    """CLI for `convert_gsm8k`."""
    parser = argparse.ArgumentParser(prog="python -m rlprims.data.gsm8k", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", 
                        help="a GSM8K .parquet / .jsonl file, or a directory holding train and test files")
    parser.add_argument("dst", help="output directory (or .parquet file when SRC is a file)")
    parser.add_argument("--split", default=None, choices=("train", "test"), help="split of a single SRC file")
    args = parser.parse_args(argv)
    for path in convert_gsm8k(args.src, args.dst, split=args.split):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
