"""Preference data: load (Hub ids, local json/jsonl/parquet), normalize formats, tokenize, truncate.

    check_data_files(cfg.data)   # preflight, before the model is built: local files readable, UTF-8, with rows
    train, eval, report = load_preference_dataset(cfg.data, tokenizer, unpaired=cfg.loss.unpaired)
    check_token_ids(train + eval, vocab_size, tokenizer_source, model_source)

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

Files are read by `fastpo.data_files`: local .json/.jsonl exactly as written (numeric strings stay strings),
one kind of value per column (a file mixing formats is refused with the rows that disagree).

Unpaired objectives (KTO; `load_preference_dataset(..., unpaired=True)`) read kto rows as they are and split
each pair of the paired formats (preference, chat, hh) into a desirable example (chosen, label True) and an
undesirable one (rejected, label False), as TRL's `unpair_preference_dataset`; both keep the row's index.

Tokenization follows TRL's DPOTrainer (KTOTrainer for unpaired examples), so the token ids are TRL's: the prompt
is tokenized alone and followed by each response (plain text with the tokenizer's special tokens, e.g. BOS;
message lists through the chat template, the prompt with the generation prompt), and the responses start where
the prompt alone and prompt + response first differ (the earliest point over the responses). Prompt tokens past
that point (a merge across the boundary, or a template that renders a
prompt alone differently) are left out, as TRL does, and counted as truncation "prompt_boundary". EOS follows
`DataConfig.append_eos`: "auto" (TRL's rule) appends it to plain-text responses that do not already end with it
and keeps template output as rendered, since the template ends the turn itself (`<|im_end|>\n`, `<|eot_id|>`);
"always" also appends it to template output that does not end with it (trailing whitespace aside); "never"
appends nothing.

Truncation, in this order (`truncate`; each counted in `DataReport.truncated` once per kept example):
1. "prompt": the prompt to `max_prompt_length`, keeping its start (keep_start) or end (keep_end);
2. "completion": each response to `max_completion_length`, keeping its first tokens;
3. "length": prompt + longest response to `max_length`: keep_start keeps the prompt's first tokens and cuts the
   responses to the room left; keep_end cuts the prompt's start (keeping at least one token), then responses;
4. "max_tokens": the packed-row budget `max_tokens`, prompt + the sum of the responses with `share_prefix`
   (prompt + the longest without), by rule 3 with all responses cut to one common length. Every example that
   leaves this module fits a packed row, so the packer never cuts.

Dropped examples are counted in `DataReport.filtered`, one reason each: "malformed" (missing or mistyped
values, a chat without a response turn), "too_few_responses" (fewer than 2 in a ranked row), "empty_prompt" (no
prompt token), "empty_response" (an empty response, or one without tokens of its own), "prompt_too_long"
(keep_start: the prompt fills `max_length`), "exceeds_max_tokens" (rule 4 leaves a response no token) and
"identical_responses" (equal token ids after truncation).

HH transcripts split on the last "\n\nAssistant:" of their common prefix (as TRL's script that built
trl-lib/hh-rlhf-helpful-base does), where TRL's `extract_prompt` splits at the first character that differs.
When the two answers differ from their first character (the usual case) the ids are the same; when they share
a start, the sequence is the same and only the prompt/response boundary differs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from fastpo.config import DEMO_EVAL, DEMO_MODEL, DEMO_TRAIN, DataConfig
from fastpo.data_files import (  # noqa: F401  (check_data_files is part of this module's API)
    check_data_files,
    is_messages,
    load_splits,
)

FORMATS = {
    "preference": "prompt, chosen, rejected (strings)",
    "chat": "chosen, rejected (message lists) and optionally prompt",
    "hh": "chosen, rejected (full transcripts with a common prefix)",
    "ranked": "prompt + responses (best first), or prompt + completions + ranks|scores",
    "kto": "prompt, completion, label",
}
PAIRED_FORMATS = ("preference", "chat", "hh")
"""Formats with one chosen/rejected pair per row: unpaired objectives unpair them."""
HH_TURN = "\n\nAssistant:"
OVER_BUDGET = {"length": "prompt_too_long", "max_tokens": "exceeds_max_tokens"}
"""Filter reason of a truncation rule that leaves a response no token."""


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
    """Response tokens, best first ([chosen, rejected] for pairs; one response for KTO), ending as
    `DataConfig.append_eos` says unless truncated."""
    label: bool | None = None
    """KTO: whether the single response is desirable; None for ranked/paired data."""
    source_index: int = -1
    """Row index in the loaded split, for tracing an example back to its data (both examples of an unpaired
    pair carry their row's index)."""


@dataclass
class DataReport:
    """What loading kept, cut and dropped; printed by the trainer. Counts are per example and exact: a row
    gives one example (two when unpaired), each kept or dropped for one reason, so the kept examples of all
    splits plus all drops equal the rows (twice the rows when unpaired)."""

    format: str = ""
    """The data format used (detected when --data.format is auto)."""
    num_rows: dict[str, int] = field(default_factory=dict)
    """Rows read per split ("train", "eval")."""
    unpaired: dict[str, int] = field(default_factory=dict)
    """Pairs split into a desirable and an undesirable example, per split (unpaired objectives on pairs)."""
    num_examples: dict[str, int] = field(default_factory=dict)
    """Examples kept per split."""
    truncated: Counter = field(default_factory=Counter)
    """Kept examples per truncation rule: prompt_boundary, prompt, completion, length, max_tokens."""
    filtered: Counter = field(default_factory=Counter)
    """Dropped examples per reason: malformed, too_few_responses, empty_prompt, empty_response,
    prompt_too_long, exceeds_max_tokens, identical_responses."""

    def __str__(self) -> str:
        rows = ", ".join(f"{k} {v}" for k, v in self.num_rows.items())
        pairs = "".join(f"; unpaired {k} {v} pairs into {2 * v} examples" for k, v in self.unpaired.items())
        kept = ", ".join(f"{k} {v}" for k, v in self.num_examples.items())
        cut = ", ".join(f"{k} {v}" for k, v in sorted(self.truncated.items())) or "none"
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(self.filtered.items())) or "none"
        return f"data [{self.format}]: rows {rows}{pairs}; kept {kept}; truncated: {cut}; filtered: {dropped}"


def load_preference_dataset(
    cfg: DataConfig, tokenizer, *, unpaired: bool = False
) -> tuple[list[TokenizedExample], list[TokenizedExample], DataReport]:
    """Load, normalize, tokenize and truncate `cfg.dataset` (and its eval part); `unpaired` (the objective's
    trait) splits pairs into labelled examples. Raises ValueError on an unknown dataset, unreadable or mixed
    rows, missing columns or an empty training set after filtering."""
    if cfg.append_eos == "always" and tokenizer.eos_token is None:
        raise ValueError("--data.append_eos=always: the tokenizer has no EOS token (tokenizer.eos_token is None)")
    train_ds, eval_ds = load_splits(cfg)
    fmt = cfg.format if cfg.format != "auto" else detect_format(train_ds, cfg.dataset)
    check_columns(train_ds.column_names, fmt, cfg.dataset)
    if eval_ds is not None:
        check_columns(eval_ds.column_names, fmt, cfg.eval_dataset or cfg.dataset)
    report = DataReport(format=fmt)
    unpair = unpaired and fmt in PAIRED_FORMATS
    train = tokenize_split(train_ds, fmt, tokenizer, cfg, report, "train", unpair=unpair)
    evals = tokenize_split(eval_ds, fmt, tokenizer, cfg, report, "eval", unpair=unpair) if eval_ds is not None else []
    if not train:
        raise ValueError(f"no training examples left from {cfg.dataset!r} after filtering ({report})")
    return train, evals, report


def check_token_ids(examples, vocab_size: int, tokenizer_source: str, model_source: str) -> None:
    """Raise when a token id is outside the model's embedding (a tokenizer of another model): the embedding
    lookup would fail on the device with an opaque index error, or read another row on some kernels."""
    largest, row = -1, -1
    for ex in examples:
        top = max((t for ids in (ex.prompt_ids, *ex.response_ids) for t in ids), default=-1)
        if top > largest:
            largest, row = top, ex.source_index
    if largest >= vocab_size:
        raise ValueError(f"token id {largest} (row {row}) from tokenizer {tokenizer_source!r} is outside the "
                         f"embedding of model {model_source!r}, which has {vocab_size} rows (ids 0..{vocab_size - 1})"
                         "; use the model's own tokenizer (--model.tokenizer)")


# ----------------------------------------------------------------------------------------------------
# formats
# ----------------------------------------------------------------------------------------------------


def _first_value(ds, column: str):
    return next((v for v in ds[column] if v is not None), None) if column in ds.column_names else None


def detect_format(ds, source: str = "") -> str:
    """The format of a `datasets.Dataset` from its columns (and, for pairs, the kind of their values, one kind
    per column)."""
    cols = set(ds.column_names)
    if {"prompt", "completion", "label"} <= cols:
        return "kto"
    if "prompt" in cols and ("responses" in cols or ("completions" in cols and cols & {"ranks", "scores"})):
        return "ranked"
    if {"chosen", "rejected"} <= cols:
        if any(is_messages(_first_value(ds, k)) for k in ("chosen", "rejected", "prompt")):
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
    if not is_messages(chosen) or not is_messages(rejected):
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
    if not is_messages(prompt):
        raise Malformed("prompt")
    return prompt, [chosen, rejected], None


# ----------------------------------------------------------------------------------------------------
# tokenization and truncation
# ----------------------------------------------------------------------------------------------------


class Outcome(NamedTuple):
    """What became of one example: kept (`example`) or dropped (`status` is the filter reason)."""

    example: TokenizedExample | None
    status: str
    """Either "ok" or a `DataReport.filtered` reason."""
    rules: list[str]
    """Truncation rules applied to a kept example."""


def render_chat(tokenizer, prompt, responses) -> tuple[str, list[str]]:
    """(prompt text with the generation prompt, [prompt + response_k conversation text]) through the chat
    template; a string side is a single user/assistant turn."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat-format data needs a tokenizer with a chat template (tokenizer.chat_template is None)")
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    turns = [[{"role": "assistant", "content": r}] if isinstance(r, str) else list(r) for r in responses]
    if not all(map(is_messages, [prompt, *turns])) or not all(turns):
        raise Malformed("messages, or no response turn")
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return head, [tokenizer.apply_chat_template(prompt + t, tokenize=False) for t in turns]


def eos_suffix(text: str, eos: str | None, mode: str, chat: bool) -> str:
    """The EOS text to append to a rendered prompt + response, by `DataConfig.append_eos` (module docstring)."""
    if eos is None or mode == "never" or (mode == "auto" and chat):
        return ""
    done = text.endswith(eos) if mode == "auto" else text.rstrip().endswith(eos)
    return "" if done else eos


def encode(tokenizer, prompt, responses, append_eos: str = "auto") -> tuple[list[int], list[list[int]], bool]:
    """(prompt ids, response ids, whether prompt tokens were left out at the boundary), as TRL tokenizes: the
    prompt alone and prompt + each response, the responses starting where all of them leave the prompt."""
    if not isinstance(prompt, (str, list)) or not all(isinstance(r, (str, list)) for r in responses):
        raise Malformed("types")
    chat = isinstance(prompt, list) or any(isinstance(r, list) for r in responses)
    if chat:
        prompt_text, texts = render_chat(tokenizer, prompt, responses)
    else:
        prompt_text, texts = prompt, [prompt + r for r in responses]
    texts = [t + eos_suffix(t, tokenizer.eos_token, append_eos, chat) for t in texts]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=not chat)["input_ids"]
    full_ids = [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    n = min(_common_prefix(prompt_ids, f) for f in full_ids)
    return prompt_ids[:n], [f[n:] for f in full_ids], n < len(prompt_ids)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def truncate(prompt_ids: list[int], response_ids: list[list[int]], cfg: DataConfig):
    """Apply the four truncation rules (module docstring); returns (prompt, responses, rules applied). A rule
    that leaves a response no token is the last applied (`OVER_BUDGET` names the filter reason)."""
    keep_start = cfg.truncation_mode == "keep_start"
    prompt, responses, rules = list(prompt_ids), [list(r) for r in response_ids], []
    m = cfg.max_prompt_length
    if m is not None and len(prompt) > m:
        prompt = prompt[:m] if keep_start else prompt[-m:]
        rules.append("prompt")
    m = cfg.max_completion_length
    if m is not None and any(len(r) > m for r in responses):
        responses = [r[:m] for r in responses]
        rules.append("completion")
    budgets = (("length", cfg.max_length, False), ("max_tokens", cfg.max_tokens, cfg.share_prefix))
    for rule, budget, shared in budgets:
        if budget is not None and len(prompt) + _cost(responses, shared) > budget:
            prompt, responses = _fit(prompt, responses, budget, shared, keep_start)
            rules.append(rule)
            if not all(responses):
                break
    return prompt, responses, rules


def _cost(responses: list[list[int]], shared: bool) -> int:
    """Response tokens in a packed row: all of them with a shared prompt, else the longest [prompt + response]."""
    return sum(map(len, responses)) if shared else max(map(len, responses))


def _fit(prompt, responses, budget: int, shared: bool, keep_start: bool):
    """Cut prompt + responses to `budget` (`_cost`): keep_start keeps the prompt's start, keep_end its end (at
    least one token); the responses are then cut to the longest common length that fits the room left."""
    prompt = prompt[:budget] if keep_start else prompt[-max(budget - _cost(responses, shared), 1):]
    cap = _response_cap([len(r) for r in responses], budget - len(prompt), shared)
    return prompt, [r[:cap] for r in responses]


def _response_cap(lengths: list[int], room: int, shared: bool) -> int:
    """The largest c with sum_k min(n_k, c) <= room (shared) or c <= room (one response per sequence)."""
    if not shared:
        return room
    left = room
    for i, n in enumerate(sorted(lengths)):
        if n * (len(lengths) - i) > left:
            return left // (len(lengths) - i)
        left -= n
    return room


def tokenize_example(prompt, responses: list, label: bool | None, tokenizer, cfg: DataConfig) -> Outcome:
    """A normalized example -> its `Outcome` (kept, truncated, or dropped with its one reason)."""
    if label is None and len(responses) < 2:
        return Outcome(None, "too_few_responses", [])
    if any(r == "" for r in responses):
        return Outcome(None, "empty_response", [])
    try:
        prompt_ids, response_ids, boundary = encode(tokenizer, prompt, responses, cfg.append_eos)
    except Malformed:
        return Outcome(None, "malformed", [])
    if not prompt_ids:
        return Outcome(None, "empty_prompt", [])
    if not all(response_ids):
        return Outcome(None, "empty_response", [])
    prompt_ids, response_ids, rules = truncate(prompt_ids, response_ids, cfg)
    if not all(response_ids):
        return Outcome(None, OVER_BUDGET[rules[-1]], [])
    if len({tuple(r) for r in response_ids}) < len(response_ids):
        return Outcome(None, "identical_responses", [])
    return Outcome(TokenizedExample(prompt_ids, response_ids, label), "ok", ["prompt_boundary"] * boundary + rules)


def tokenize_row(row: dict, fmt: str, tokenizer, cfg: DataConfig, unpair: bool = False) -> list[Outcome]:
    """One row -> the outcomes of its examples: one, or with `unpair` two (chosen desirable, rejected not)."""
    count = 2 if unpair else 1
    try:
        prompt, responses, label = normalize(row, fmt)
    except (Malformed, KeyError, TypeError, IndexError):
        return [Outcome(None, "malformed", [])] * count
    if unpair:
        return [tokenize_example(prompt, [r], good, tokenizer, cfg) for r, good in zip(responses, (True, False))]
    return [tokenize_example(prompt, responses, label, tokenizer, cfg)]


def tokenize_split(ds, fmt: str, tokenizer, cfg: DataConfig, report: DataReport, split: str, *,
                   unpair: bool = False) -> list[TokenizedExample]:
    """Tokenize a split (in `cfg.num_workers` processes when > 0), counting unpaired rows, truncations and
    filters."""
    report.num_rows[split] = len(ds)
    if unpair:
        report.unpaired[split] = len(ds)
    if cfg.num_workers > 0:
        results = _map_parallel(ds, fmt, tokenizer, cfg, unpair)
    else:
        results = (tokenize_row(row, fmt, tokenizer, cfg, unpair) for row in ds)
    examples = []
    for i, outcomes in enumerate(results):
        for example, status, rules in outcomes:
            if example is None:
                report.filtered[status] += 1
                continue
            report.truncated.update(rules)
            example.source_index = i
            examples.append(example)
    report.num_examples[split] = len(examples)
    return examples


def _outcome_features():
    from datasets import Features, List, Value

    ids = List(Value("int64"))
    return Features({"_outcomes": List({"prompt_ids": ids, "response_ids": List(ids), "label": Value("bool"),
                                        "status": Value("string"), "rules": List(Value("string"))})})


def _outcome_record(outcome: Outcome) -> dict:
    ex = outcome.example or TokenizedExample([], [])
    return {"prompt_ids": ex.prompt_ids, "response_ids": ex.response_ids, "label": ex.label,
            "status": outcome.status, "rules": outcome.rules}


def _outcome_from_record(record: dict) -> Outcome:
    ok = record["status"] == "ok"
    example = TokenizedExample(record["prompt_ids"], record["response_ids"], record["label"]) if ok else None
    return Outcome(example, record["status"], record["rules"])


def _map_parallel(ds, fmt, tokenizer, cfg, unpair):
    """`tokenize_row` over the rows in `cfg.num_workers` processes (datasets.map), in row order."""

    def fn(row):
        return {"_outcomes": [_outcome_record(o) for o in tokenize_row(row, fmt, tokenizer, cfg, unpair)]}

    out = ds.map(fn, num_proc=cfg.num_workers, remove_columns=ds.column_names, load_from_cache_file=False,
                 features=_outcome_features())
    for row in out:
        yield [_outcome_from_record(r) for r in row["_outcomes"]]
