"""Reading preference data: local .json/.jsonl/.parquet files exactly as written, Hub datasets through
`datasets`, and the train / eval splits.

Local .json/.jsonl files are parsed with Python's json module: datasets' JSON builder stores a column whose
rows mix types as JSON and reads numeric strings back as numbers ("019" -> 19), and text must stay as written.
Text columns (`TEXT_COLUMNS`, message contents included) read a JSON number as its literal text (1.50 -> "1.50").
Every column holds one kind of value in all rows; a file mixing formats (say plain strings and message lists)
is refused with the rows that disagree. Errors name the file and the row (for undecodable bytes, the byte
offset).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from fastpo.config import DEMO_EVAL, DEMO_TRAIN, DataConfig

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion", "responses", "completions")
"""Columns of text (strings or message lists): a JSON number in them is read as its literal text."""
MAX_LISTED_ROWS = 5




def check_data_files(cfg: DataConfig) -> None:
    """Preflight, before the model is built: every local data file (--data.dataset, --data.eval_dataset) exists,
    has a supported extension, decodes and has rows; errors name the file and the row. Hub ids are checked
    when loaded."""
    for source in (cfg.dataset, cfg.eval_dataset):
        path = local_path(source) if source is not None else None
        if path is not None and path.is_file():
            read_local_file(path)


def local_path(source: str) -> Path | None:
    """The local file or directory `source` names, None for a Hub id; ValueError if a path-like source is
    missing or has an unsupported extension."""
    path = Path(source).expanduser()
    local = path.exists() or path.suffix in LOCAL_BUILDERS or source.startswith((".", "/", "~"))
    if not local:
        return None
    if not path.exists():
        raise ValueError(f"dataset file {source!r} does not exist (expected a Hub id or a local "
                         f".json/.jsonl/.parquet file)")
    if path.is_file() and path.suffix not in LOCAL_BUILDERS:
        raise ValueError(f"dataset file {source!r}: unsupported extension {path.suffix!r}; "
                         f"expected one of {sorted(LOCAL_BUILDERS)}")
    return path


def read_local_file(path: Path):
    """A local .json/.jsonl/.parquet file -> `datasets.Dataset`, with at least one row."""
    import datasets
    import pyarrow.parquet as pq

    if LOCAL_BUILDERS[path.suffix] == "json":
        return rows_to_dataset(read_json_rows(path), str(path))
    try:
        ds = datasets.Dataset.from_parquet(str(path)) if pq.ParquetFile(path).metadata.num_rows else None
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError, ...)
        raise ValueError(f"dataset file {str(path)!r}: cannot read it as parquet: {type(e).__name__}: {e}") from e
    if ds is None:
        raise ValueError(f"dataset file {str(path)!r} has no rows")
    check_column_types(ds, str(path))
    return ds


def read_json_rows(path: Path) -> list[dict]:
    """The rows of a .json (an array of objects, or one object per line) or .jsonl file, values as written."""
    name = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"dataset file {name!r} cannot be read: {e}") from e
    text = _decode_utf8(data, name).removeprefix("\ufeff")
    rows = _json_array(text, name) if text.lstrip().startswith("[") else _json_lines(text, name)
    if not rows:
        raise ValueError(f"dataset file {name!r} has no rows")
    return rows


def _decode_utf8(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"dataset file {name!r} is not UTF-8: byte {data[e.start]:#04x} at line {line} (byte offset "
                         f"{e.start}); re-encode the file as UTF-8") from None


def _json_lines(text: str, name: str) -> list[dict]:
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = _parse_json(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"dataset file {name!r} line {lineno} (row {len(rows)}): invalid JSON, {e.msg} at "
                             f"column {e.colno}") from None
        if not isinstance(row, dict):
            raise ValueError(f"dataset file {name!r} line {lineno} (row {len(rows)}): expected a JSON object, "
                             f"got {value_kind(row)}")
        rows.append(row)
    return rows


def _json_array(text: str, name: str) -> list[dict]:
    try:
        rows = _parse_json(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"dataset file {name!r}: invalid JSON, {e.msg} at line {e.lineno} column {e.colno}") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"dataset file {name!r} row {i}: expected a JSON object, got {value_kind(row)}")
    return rows


class _JsonNumber(str):
    """The literal text of a JSON number: text in `TEXT_COLUMNS`, a number elsewhere (`_resolve_numbers`)."""


def _parse_json(text: str):
    return json.loads(text, parse_int=_JsonNumber, parse_float=_JsonNumber)


def _resolve_numbers(value, as_text: bool):
    if isinstance(value, _JsonNumber):
        return str(value) if as_text else json.loads(value)
    if isinstance(value, list):
        return [_resolve_numbers(v, as_text) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_numbers(v, as_text) for k, v in value.items()}
    return value


def rows_to_dataset(rows: list[dict], source: str):
    """`datasets.Dataset` of JSON rows: one column per key of any row (None where a row lacks it), each column
    holding one kind of value."""
    import datasets

    names = list(dict.fromkeys(k for row in rows for k in row))
    columns = {k: [_resolve_numbers(row.get(k), k in TEXT_COLUMNS) for row in rows] for k in names}
    for k, values in columns.items():
        check_one_kind(values, k, source)
    try:
        return datasets.Dataset.from_dict(columns)
    except Exception as e:  # pyarrow: ArrowInvalid, ArrowTypeError
        raise ValueError(f"dataset {source!r}: cannot store its rows: {type(e).__name__}: {e}") from e


def is_messages(value) -> bool:
    """A chat message list: dicts with string `role` and `content`."""
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def value_kind(value) -> str | None:
    """The kind of a JSON value that tells formats apart: "string", "message list", "list of strings", ...;
    None for null and an empty list, which fit any kind."""
    if value is None or (isinstance(value, list) and not value):
        return None
    if isinstance(value, list):
        if is_messages(value):
            return "message list"
        kinds = {value_kind(v) for v in value}
        if len(kinds) > 1 or None in kinds:
            return "list"
        kind = kinds.pop()
        return "list of lists" if kind.startswith("list") else f"list of {kind}s"
    kinds = ((bool, "boolean"), ((int, float, _JsonNumber), "number"), (str, "string"), (dict, "object"))
    return next((name for types, name in kinds if isinstance(value, types)), type(value).__name__)


def check_one_kind(values, column: str, source: str) -> None:
    """Raise, listing rows, when the values of a column are of more than one kind (mixed formats)."""
    rows = defaultdict(list)
    for i, v in enumerate(values):
        kind = value_kind(v)
        if kind is not None:
            rows[kind].append(i)
    if len(rows) > 1:
        parts = ", ".join(f"{k} in rows {r[:MAX_LISTED_ROWS]}{' ...' if len(r) > MAX_LISTED_ROWS else ''} "
                          f"({len(r)} rows)" for k, r in sorted(rows.items(), key=lambda kv: -len(kv[1])))
        raise ValueError(f"dataset {source!r}: column {column!r} mixes kinds of values: {parts}; every row must "
                         "use the same format")


def check_column_types(ds, source: str) -> None:
    """datasets stores a column whose rows mix types as JSON (and reads numeric strings back as numbers):
    refuse such columns, listing the rows, as `rows_to_dataset` does for local JSON."""
    import datasets

    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Json) or isinstance(getattr(feature, "feature", None), datasets.Json):
            check_one_kind(ds[name], name, source)


def load_raw(source: str, config_name: str | None = None):
    """A Hub id or a local file/directory -> `datasets.DatasetDict` (a file through `read_local_file`, the rest
    through datasets); ValueError with the source on failure."""
    import datasets

    path = local_path(source)
    if path is not None and path.is_file():
        return datasets.DatasetDict({"train": read_local_file(path)})
    try:
        raw = datasets.load_dataset(str(path) if path is not None else source, name=config_name)
    except Exception as e:  # datasets raises many types (DatasetNotFoundError, FileNotFoundError, ...)
        where = "local directory" if path is not None else "Hugging Face Hub dataset"
        raise ValueError(f"could not load {where} {source!r}: {type(e).__name__}: {e}. Expected a Hub "
                         "dataset id or a local .json/.jsonl/.parquet file") from e
    for split, ds in raw.items():
        check_column_types(ds, f"{source}[{split}]")
    return raw


def load_splits(cfg: DataConfig):
    """(train, eval or None) `datasets.Dataset`s: the eval file, else the eval split, else a seeded
    `eval_fraction` carved from the training rows."""
    raw = load_raw(cfg.dataset, cfg.dataset_config)
    if cfg.train_split not in raw:
        raise ValueError(f"dataset {cfg.dataset!r} has no split {cfg.train_split!r} (--data.train_split); "
                         f"its splits: {list(raw)}")
    train = raw[cfg.train_split]
    if len(train) == 0:
        raise ValueError(f"dataset {cfg.dataset!r} split {cfg.train_split!r} has no rows")
    eval_source = cfg.eval_dataset
    if eval_source is None and os.path.abspath(cfg.dataset) == os.path.abspath(DEMO_TRAIN):
        eval_source = DEMO_EVAL
    if eval_source is not None:
        raw_eval = load_raw(eval_source, cfg.dataset_config)
        split = cfg.eval_split if cfg.eval_split in raw_eval else next(iter(raw_eval))
        evals = raw_eval[split]
    elif cfg.eval_split in raw and cfg.eval_split != cfg.train_split:
        evals = raw[cfg.eval_split]
    elif cfg.eval_fraction > 0 and len(train) >= 2:
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed, shuffle=True)
        train, evals = parts["train"], parts["test"]
    else:
        evals = None
    if cfg.max_train_examples is not None:
        train = train.select(range(min(cfg.max_train_examples, len(train))))
    if evals is not None and cfg.max_eval_examples is not None:
        evals = evals.select(range(min(cfg.max_eval_examples, len(evals))))
    return train, evals
