"""Read and write prompt datasets in verl's parquet schema (so verl's preprocessed files load as-is)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REQUIRED = ("data_source", "prompt", "reward_model")


def validate_rows(rows: list[dict[str, Any]], *, source: str = "rows") -> list[dict[str, Any]]:
    """Checks each row has verl's required fields with the right types; ValueError names row and field.

    Required: data_source (str), prompt (non-empty list of {role, content} dicts), reward_model (dict
    with ground_truth). Optional: ability, extra_info.
    """
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED if k not in row or row[k] is None]
        if missing:
            raise ValueError(f"{source}: row {i} lacks required field(s) {missing}; has {sorted(row)}")
        if not isinstance(row["data_source"], str):
            raise ValueError(f"{source}: row {i} data_source must be a str, got {row['data_source']!r}")
        prompt = row["prompt"]
        if not isinstance(prompt, list) or not prompt:
            raise ValueError(f"{source}: row {i} prompt must be a non-empty list of chat messages")
        for j, msg in enumerate(prompt):
            if not isinstance(msg, dict) or not {"role", "content"} <= set(msg):
                raise ValueError(f"{source}: row {i} prompt[{j}] must be a dict with role and content")
        rm = row["reward_model"]
        if not isinstance(rm, dict) or "ground_truth" not in rm:
            raise ValueError(f"{source}: row {i} reward_model must be a dict with ground_truth, got {rm!r}")
    return rows


def read_verl_parquet(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a verl-schema parquet file as Python dicts, validated (see `validate_rows`)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no parquet file at {path}")
    rows = pq.read_table(path).to_pylist()
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return validate_rows(rows, source=str(path))


def write_verl_parquet(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Writes validated rows to a parquet file (atomically: a temporary file, then a rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    validate_rows(rows)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(path)
    return path
