"""Read and write prompt datasets in verl's parquet schema (so verl's preprocessed files load as-is).

Every malformed row raises ValueError naming the file (or "rows"), the row index and the column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REQUIRED = ("data_source", "prompt", "reward_model")


def check_messages(messages: Any, *, source: str, row: int, column: str) -> None:
    """Checks a chat conversation: a non-empty list of {role: str, content: str} dicts, content non-empty.

    ValueError names `source`, `row` and `column` (and the message index).
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{source}: row {row} {column} must be a non-empty list of chat messages "
                         f"{{role, content}}, got {_short(messages)}")
    for j, msg in enumerate(messages):
        if not isinstance(msg, dict) or not {"role", "content"} <= set(msg):
            raise ValueError(f"{source}: row {row} {column}[{j}] must be a dict with role and content, "
                             f"got {_short(msg)}")
        if not isinstance(msg["role"], str) or not msg["role"]:
            raise ValueError(f"{source}: row {row} {column}[{j}].role must be a non-empty str, "
                             f"got {msg['role']!r}")
        if not isinstance(msg["content"], str) or not msg["content"].strip():
            raise ValueError(f"{source}: row {row} {column}[{j}].content must be a non-empty str, "
                             f"got {_short(msg['content'])}")


def check_text(value: Any, *, source: str, row: int, column: str) -> None:
    """Checks a non-empty (not only whitespace) string; ValueError names source, row and column."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{source}: row {row} {column} must be a non-empty str, got {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate_rows(rows: list[dict[str, Any]], *, source: str = "rows") -> list[dict[str, Any]]:
    """Checks each row has verl's required fields with the right types; ValueError names row and field.

    Required: data_source (non-empty str), prompt (non-empty list of {role, content} dicts with
    non-empty string content), reward_model (dict with ground_truth). Optional: ability (str),
    extra_info (dict). `source` (the file name) starts every message.
    """
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: row {i} must be a dict, got {_short(row)}")
        missing = [k for k in REQUIRED if k not in row or row[k] is None]
        if missing:
            raise ValueError(f"{source}: row {i} lacks required field(s) {missing}; has {sorted(row)}")
        if not isinstance(row["data_source"], str) or not row["data_source"]:
            raise ValueError(f"{source}: row {i} data_source must be a non-empty str, "
                             f"got {row['data_source']!r}")
        check_messages(row["prompt"], source=source, row=i, column="prompt")
        rm = row["reward_model"]
        if not isinstance(rm, dict) or rm.get("ground_truth") is None:
            raise ValueError(f"{source}: row {i} reward_model must be a dict with ground_truth, "
                             f"got {_short(rm)}")
        if row.get("ability") is not None and not isinstance(row["ability"], str):
            raise ValueError(f"{source}: row {i} ability must be a str, got {row['ability']!r}")
        if row.get("extra_info") is not None and not isinstance(row["extra_info"], dict):
            raise ValueError(f"{source}: row {i} extra_info must be a dict, got {_short(row['extra_info'])}")
    return rows


def read_parquet_rows(path: str | Path, *, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """All rows of a parquet file as dicts; ValueError if the file is missing, unreadable, empty, or lacks
    one of `columns` (the message names the file and the column, and lists the columns it has).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no parquet file at {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from e
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: every row lacks column(s) {missing}; the file has {table.column_names}")
    rows = table.to_pylist()
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def read_verl_parquet(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a verl-schema parquet file as Python dicts, validated (see `validate_rows`)."""
    rows = read_parquet_rows(path, columns=REQUIRED)
    return validate_rows(rows, source=str(path))


def write_parquet_rows(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Writes rows (dicts) to a parquet file atomically (a temporary file, then a rename); makes the
    parent directory. No validation: the typed writers validate first.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(path)
    return path


def write_verl_parquet(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Writes validated rows to a parquet file (atomically: a temporary file, then a rename)."""
    validate_rows(rows)
    return write_parquet_rows(rows, path)
