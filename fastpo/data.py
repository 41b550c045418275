"""Preference data: load (Hub ids, local json/jsonl/parquet), normalize formats, tokenize, truncate.

    train, eval, report = load_preference_dataset(cfg.data, tokenizer)

Formats (`DataConfig.format`, "auto" detects them from the columns):

| format     | columns                                                 | prompt / responses                          |
|------------|---------------------------------------------------------|---------------------------------------------|
| preference | prompt, chosen, rejected (strings)                      | as given                                    |
| chat       | chosen, rejected message lists; prompt optional (a      | the shared turns / prompt turns rendered     |
|            | string or a message list), UltraFeedback-binarized style | with the chat template (generation prompt)  |
| hh         | chosen, rejected full transcripts, no prompt            | split at the common prefix, on the last     |
|            |                                                         | "\n\nAssistant:" inside it when present      |
| ranked     | prompt + responses (best first), or prompt +            | K responses, best first                     |
|            | completions + ranks (1 = best) or scores (high = best)  |                                             |
| kto        | prompt, completion, label (bool)                        | one response, label = desirable             |

A prompt or response that is a message list goes through `tokenizer.apply_chat_template`; the response is
the text the full conversation adds after the prompt rendered with `add_generation_prompt=True`.

Tokenization: the prompt and each response are tokenized separately (the prompt with the tokenizer's
special tokens, e.g. BOS, unless it came from a chat template; responses without) and EOS is appended to
each response, so `prompt_ids + response_ids[k]` is exactly the sequence trained on.

Truncation, in this order (each counted in `DataReport.truncated` once per example):
1. "prompt": the prompt to `max_prompt_length`, keeping its start (keep_start) or end (keep_end);
2. "completion": each response to `max_completion_length`, keeping its first tokens;
3. "length": prompt + longest response to `max_length`: keep_start cuts responses (then the prompt's
   end), keep_end cuts the prompt's start (keeping at least one prompt token), then responses.
Filtered examples are counted per reason in `DataReport.filtered`: "malformed" (missing or mistyped
values, a chat without a response turn), "too_few_responses", "empty_prompt", "empty_response" (no
tokens before EOS, or none left after truncation) and "identical_responses".
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from fastpo.config import DEMO_EVAL, DEMO_MODEL, DEMO_TRAIN, DataConfig

FORMATS = {
    "preference": "prompt, chosen, rejected (strings)",
    "chat": "chosen, rejected (message lists) and optionally prompt",
    "hh": "chosen, rejected (full transcripts with a common prefix)",
    "ranked": "prompt + responses (best first), or prompt + completions + ranks|scores",
    "kto": "prompt, completion, label",
}
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
HH_TURN = "\n\nAssistant:"


class DemoPaths(NamedTuple):
    model: str
    """Directory with config.json and the tokenizer files (no weights: random init)."""
    train: str
    """Training preference rows (prompt/chosen/rejected jsonl)."""
    eval: str
    """Held-out preference rows, on problems absent from `train`."""


def demo_paths() -> DemoPaths:
    """Paths of the bundled demo model config/tokenizer and preference data."""
    return DemoPaths(model=DEMO_MODEL, train=DEMO_TRAIN, eval=DEMO_EVAL)


@dataclass
class TokenizedExample:
    """One prompt and its responses, as token ids; what `fastpo.packing` packs."""

    prompt_ids: list[int]
    """Prompt tokens (with the tokenizer's BOS when it adds one)."""
    response_ids: list[list[int]]
    """Response tokens, best first ([chosen, rejected] for pairs; one response for KTO), each ending in EOS
    unless truncated."""
    label: bool | None = None
    """KTO: whether the single response is desirable; None for ranked/paired data."""
    source_index: int = -1
    """Row index in the loaded split, for tracing an example back to its data."""


@dataclass
class DataReport:
    """What loading kept, cut and dropped; printed by the trainer."""

    format: str = ""
    """The data format used (detected when --data.format is auto)."""
    num_rows: dict[str, int] = field(default_factory=dict)
    """Rows read per split ("train", "eval")."""
    num_examples: dict[str, int] = field(default_factory=dict)
    """Examples kept per split."""
    truncated: Counter = field(default_factory=Counter)
    """Truncated examples per rule: prompt, completion, length."""
    filtered: Counter = field(default_factory=Counter)
    """Dropped examples per reason: malformed, too_few_responses, empty_prompt, empty_response,
    identical_responses."""

    def __str__(self) -> str:
        rows = ", ".join(f"{k} {v}" for k, v in self.num_rows.items())
        kept = ", ".join(f"{k} {v}" for k, v in self.num_examples.items())
        cut = ", ".join(f"{k} {v}" for k, v in sorted(self.truncated.items())) or "none"
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(self.filtered.items())) or "none"
        return f"data [{self.format}]: rows {rows}; kept {kept}; truncated: {cut}; filtered: {dropped}"


def load_preference_dataset(
    cfg: DataConfig, tokenizer
) -> tuple[list[TokenizedExample], list[TokenizedExample], DataReport]:
    """Load, normalize, tokenize and truncate `cfg.dataset` (and its eval part). Raises ValueError on an
    unknown dataset, missing columns or an empty training set after filtering."""
    train_ds, eval_ds = load_splits(cfg)
    fmt = cfg.format if cfg.format != "auto" else detect_format(train_ds, cfg.dataset)
    check_columns(train_ds.column_names, fmt, cfg.dataset)
    if eval_ds is not None:
        check_columns(eval_ds.column_names, fmt, cfg.eval_dataset or cfg.dataset)
    report = DataReport(format=fmt)
    train = tokenize_split(train_ds, fmt, tokenizer, cfg, report, "train")
    evals = tokenize_split(eval_ds, fmt, tokenizer, cfg, report, "eval") if eval_ds is not None else []
    if not train:
        raise ValueError(f"no training examples left from {cfg.dataset!r} after filtering ({report})")
    return train, evals, report


# ----------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------


def load_raw(source: str, config_name: str | None = None):
    """A Hub id or a local file/directory -> `datasets.DatasetDict`; ValueError with the source on failure."""
    import datasets

    path = Path(source).expanduser()
    local = path.exists() or path.suffix in LOCAL_BUILDERS or source.startswith((".", "/", "~"))
    if local and not path.exists():
        raise ValueError(f"dataset file {source!r} does not exist (expected a Hub id or a local "
                         f".json/.jsonl/.parquet file)")
    if path.is_file() and path.suffix not in LOCAL_BUILDERS:
        raise ValueError(f"dataset file {source!r}: unsupported extension {path.suffix!r}; "
                         f"expected one of {sorted(LOCAL_BUILDERS)}")
    try:
        if path.is_file():
            return datasets.load_dataset(LOCAL_BUILDERS[path.suffix], data_files=str(path))
        return datasets.load_dataset(str(path) if local else source, name=config_name)
    except Exception as e:  # datasets raises many types (DatasetNotFoundError, FileNotFoundError, ...)
        where = "local directory" if local else "Hugging Face Hub dataset"
        raise ValueError(f"could not load {where} {source!r}: {type(e).__name__}: {e}. Expected a Hub "
                         "dataset id or a local .json/.jsonl/.parquet file") from e


def load_splits(cfg: DataConfig):
    """(train, eval or None) `datasets.Dataset`s: the eval file, else the eval split, else a seeded
    `eval_fraction` carved from the training rows."""
    raw = load_raw(cfg.dataset, cfg.dataset_config)
    if cfg.train_split not in raw:
        raise ValueError(f"dataset {cfg.dataset!r} has no split {cfg.train_split!r} (--data.train_split); "
                         f"its splits: {list(raw)}")
    train = raw[cfg.train_split]
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


# ----------------------------------------------------------------------------------------------------
# formats
# ----------------------------------------------------------------------------------------------------


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def detect_format(ds, source: str = "") -> str:
    """The format of a `datasets.Dataset` from its columns (and the type of the first row's values)."""
    cols = set(ds.column_names)
    if {"prompt", "completion", "label"} <= cols:
        return "kto"
    if "prompt" in cols and ("responses" in cols or ("completions" in cols and cols & {"ranks", "scores"})):
        return "ranked"
    if {"chosen", "rejected"} <= cols:
        first = ds[0] if len(ds) else {}
        if any(_is_messages(first.get(k)) for k in ("prompt", "chosen", "rejected")):
            return "chat"
        return "preference" if "prompt" in cols else "hh"
    raise ValueError(_columns_error(source, cols, "cannot detect the data format"))


def _columns_error(source: str, cols, what: str) -> str:
    accepted = "; ".join(f"{k}: {v}" for k, v in FORMATS.items())
    return f"dataset {source!r}: {what}; columns found: {sorted(cols)}. Accepted formats: {accepted}"


def check_columns(columns, fmt: str, source: str = "") -> None:
    cols = set(columns)
    required = {
        "preference": [{"prompt", "chosen", "rejected"}],
        "chat": [{"chosen", "rejected"}],
        "hh": [{"chosen", "rejected"}],
        "ranked": [{"prompt", "responses"}, {"prompt", "completions", "ranks"}, {"prompt", "completions", "scores"}],
        "kto": [{"prompt", "completion", "label"}],
    }[fmt]
    if not any(r <= cols for r in required):
        need = " or ".join(str(sorted(r)) for r in required)
        raise ValueError(_columns_error(source, cols, f"format {fmt!r} needs columns {need}"))


class Malformed(ValueError):
    """A row that cannot be read in its format (counted as "malformed", not raised to the user)."""


def normalize(row: dict, fmt: str) -> tuple[object, list, bool | None]:
    """A row -> (prompt, responses best first, KTO label). Prompt/responses are strings or message lists."""
    if fmt == "kto":
        label = row["label"]
        if not isinstance(label, (bool, int)):
            raise Malformed("label")
        return row["prompt"], [row["completion"]], bool(label)
    if fmt == "ranked":
        if row.get("responses") is not None:
            return row["prompt"], list(row["responses"]), None
        completions = list(row["completions"])
        if row.get("ranks") is not None:
            order = sorted(range(len(completions)), key=lambda i: row["ranks"][i])
        else:
            order = sorted(range(len(completions)), key=lambda i: -row["scores"][i])
        return row["prompt"], [completions[i] for i in order], None
    if fmt == "hh":
        return split_transcripts(row["chosen"], row["rejected"])
    if fmt == "chat":
        return _chat_pair(row.get("prompt"), row["chosen"], row["rejected"])
    return row["prompt"], [row["chosen"], row["rejected"]], None


def split_transcripts(chosen: str, rejected: str) -> tuple[str, list[str], None]:
    """HH-style: the prompt is the longest common prefix, cut back to the last "\\n\\nAssistant:" inside it
    (or else to its last whitespace), so the responses start at a turn or word boundary."""
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise Malformed("transcript")
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    prefix = chosen[:n]
    turn = prefix.rfind(HH_TURN)
    if turn >= 0:
        n = turn + len(HH_TURN)
    elif n < min(len(chosen), len(rejected)):
        space = max(prefix.rfind(" "), prefix.rfind("\n"))
        n = space + 1 if space >= 0 else n
    return chosen[:n], [chosen[n:], rejected[n:]], None


def _chat_pair(prompt, chosen, rejected):
    """Chat rows: the prompt turns are the `prompt` column (messages, or a string = one user turn) when the
    responses hold only the answer, else the turns `chosen` and `rejected` share."""
    if not _is_messages(chosen) or not _is_messages(rejected):
        raise Malformed("messages")
    if isinstance(prompt, str) and chosen and chosen[0]["role"] != "assistant":
        prompt = None  # UltraFeedback: the string prompt repeats the first user turn of each list
    if prompt is None:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and chosen[n - 1]["role"] == "assistant":
            n -= 1
        return chosen[:n], [chosen[n:], rejected[n:]], None
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not _is_messages(prompt):
        raise Malformed("prompt")
    return prompt, [chosen, rejected], None


# ----------------------------------------------------------------------------------------------------
# tokenization and truncation
# ----------------------------------------------------------------------------------------------------


def render_chat(tokenizer, prompt, response) -> tuple[str, str]:
    """(prompt text, response text) through the chat template; a string side is a single user/assistant turn."""
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    response = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
    if not response:
        raise Malformed("no response turn")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat-format data needs a tokenizer with a chat template (tokenizer.chat_template is None)")
    full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    for add_generation_prompt in (True, False):
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=add_generation_prompt)
        if full.startswith(head):
            return head, full[len(head):]
    raise Malformed("the chat template does not render the prompt as a prefix of the conversation")


def tokenize_example(row: dict, fmt: str, tokenizer, cfg: DataConfig) -> tuple[TokenizedExample | None, str, list[str]]:
    """One row -> (example or None, status "ok" or a filter reason, truncation rules applied)."""
    try:
        prompt, responses, label = normalize(row, fmt)
        ids = _tokenize(tokenizer, prompt, responses)
    except (Malformed, KeyError, TypeError, IndexError):
        return None, "malformed", []
    prompt_ids, response_ids = ids
    if fmt != "kto" and len(response_ids) < 2:
        return None, "too_few_responses", []
    if any(len(r) == 0 for r in response_ids):
        return None, "empty_response", []
    eos = tokenizer.eos_token_id
    if eos is not None:
        response_ids = [r if r[-1] == eos else r + [eos] for r in response_ids]
    prompt_ids, response_ids, rules = truncate(prompt_ids, response_ids, cfg)
    if not prompt_ids:
        return None, "empty_prompt", rules
    if any(len(r) == 0 for r in response_ids):
        return None, "empty_response", rules
    if len({tuple(r) for r in response_ids}) < len(response_ids):
        return None, "identical_responses", rules
    return TokenizedExample(prompt_ids, response_ids, label), "ok", rules


def _tokenize(tokenizer, prompt, responses) -> tuple[list[int], list[list[int]]]:
    if not isinstance(prompt, (str, list)) or not all(isinstance(r, (str, list)) for r in responses):
        raise Malformed("types")
    chat = isinstance(prompt, list) or any(isinstance(r, list) for r in responses)
    if not chat:
        prompt_ids = tokenizer(prompt)["input_ids"]
        return prompt_ids, [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    rendered = [render_chat(tokenizer, prompt, r) for r in responses]
    prompt_ids = tokenizer(rendered[0][0], add_special_tokens=False)["input_ids"]
    return prompt_ids, [tokenizer(text, add_special_tokens=False)["input_ids"] for _, text in rendered]


def truncate(prompt_ids: list[int], response_ids: list[list[int]], cfg: DataConfig):
    """Apply the three truncation rules (module docstring); returns (prompt, responses, rules applied)."""
    rules = []
    keep_start = cfg.truncation_mode == "keep_start"
    m = cfg.max_prompt_length
    if m is not None and len(prompt_ids) > m:
        prompt_ids = prompt_ids[:m] if keep_start else prompt_ids[-m:]
        rules.append("prompt")
    m = cfg.max_completion_length
    if m is not None and any(len(r) > m for r in response_ids):
        response_ids = [r[:m] for r in response_ids]
        rules.append("completion")
    m = cfg.max_length
    longest = max(len(r) for r in response_ids)
    if m is not None and len(prompt_ids) + longest > m:
        if not keep_start:
            prompt_ids = prompt_ids[-max(m - longest, 1):]
        prompt_ids = prompt_ids[:m]
        response_ids = [r[: m - len(prompt_ids)] for r in response_ids]
        rules.append("length")
    return prompt_ids, response_ids, rules


def tokenize_split(ds, fmt: str, tokenizer, cfg: DataConfig, report: DataReport, split: str) -> list[TokenizedExample]:
    """Tokenize a split (in `cfg.num_workers` processes when > 0), counting truncations and filters."""
    report.num_rows[split] = len(ds)
    if cfg.num_workers > 0:
        results = _map_parallel(ds, fmt, tokenizer, cfg)
    else:
        results = (tokenize_example(row, fmt, tokenizer, cfg) for row in ds)
    examples = []
    for i, (example, status, rules) in enumerate(results):
        report.truncated.update(rules)
        if example is None:
            report.filtered[status] += 1
            continue
        example.source_index = i
        examples.append(example)
    report.num_examples[split] = len(examples)
    return examples


def _map_parallel(ds, fmt, tokenizer, cfg):
    def fn(row):
        example, status, rules = tokenize_example(row, fmt, tokenizer, cfg)
        return {
            "_prompt_ids": example.prompt_ids if example else [],
            "_response_ids": example.response_ids if example else [],
            "_label": example.label if example else None,
            "_status": status,
            "_rules": rules,
        }

    out = ds.map(fn, num_proc=cfg.num_workers, remove_columns=ds.column_names, load_from_cache_file=False)
    for row in out:
        ok = row["_status"] == "ok"
        example = TokenizedExample(row["_prompt_ids"], row["_response_ids"], row["_label"]) if ok else None
        yield example, row["_status"], row["_rules"]
