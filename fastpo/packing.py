"""Prefix-shared packing: tokenized preference examples -> one padding-lean packed batch.

An example is a prompt p and K ranked responses y_1 .. y_K (chosen/rejected is K = 2, a ranked list is
K > 2, an unpaired KTO completion is K = 1). With prompt sharing an example occupies one contiguous
stretch of a row,

    row positions   s .. s+P-1 | t_1 .. t_1+n_1-1 | ... | t_K .. t_K+n_K-1
    position_ids    0 .. P-1   | P .. P+n_1-1     | ... | P .. P+n_K-1      (each response restarts at P)
    branch          0          | 1                | ... | K

and every response attends to its prompt and causally to itself, never to a sibling or to another
example (`fastpo.attention`). Without sharing each `[p + y_k]` is its own sequence (one branch). Several
examples go in one row (first-fit-decreasing over a token budget); rows are right-padded to the longest
row, and each padding run is a sequence of its own that attends only to itself.

Shape legend (suffixes in the code): B rows, L row length, E examples, R responses (sum_e K_e),
M completion tokens (sum_r n_r), S attention sequences (varlen segments), T gathered keys.
All indices are computed here, on the host, so the forward pass never synchronizes with the device.

Log-prob gather (no duplicated token): completion token t of a response is predicted by the hidden state
of row t - 1, except the first token of every response, which is predicted by the last prompt row s+P-1
(that row sees exactly the prompt). `src_index[m]` is that row in the flattened B*L space, `targets[m]`
the token; the M entries are ordered by response, then by position.

Truncation rule (applied per example, before packing, and counted in `TruncationReport`):
  1. every response is cut to its first `max_completion_tokens` tokens (when set);
  2. if the example's packing unit is still longer than `max_tokens` -- P + sum_k n_k with sharing,
     P + max_k n_k without -- the prompt is cut to fit: `prompt_truncation="keep_end"` keeps its last
     tokens (the ones next to the responses), `"keep_start"` its first;
  3. at least one prompt token must remain; if the responses alone do not fit, `ValueError` (lower
     `max_completion_tokens`). Examples are never dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import torch

from fastpo.losses.types import ResponseLayout

IGNORE_INDEX = -100
PROMPT_TRUNCATION = ("keep_end", "keep_start")


class PreferenceExample(NamedTuple):
    """One tokenized example: a prompt and its responses, best first (`(chosen, rejected)` for pairs)."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[Sequence[int]]


class Span(NamedTuple):
    """Where one packed sequence lies. With sharing one per example (all responses); without, one per
    `[prompt + response]`. `responses` holds `(response index, start column, length)`."""

    example: int
    row: int
    start: int
    prompt_len: int
    responses: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class TruncationReport:
    """What the truncation rule removed from one batch (counts over examples, never drops)."""

    num_examples: int = 0
    num_truncated_examples: int = 0
    num_truncated_prompts: int = 0
    num_truncated_responses: int = 0
    num_dropped_prompt_tokens: int = 0
    num_dropped_response_tokens: int = 0

    def __add__(self, other: TruncationReport) -> TruncationReport:
        return TruncationReport(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass
class AttentionLayout:
    """What the prefix-shared attention needs, for every backend; built once per batch on the host.

    doc            [B, L] int32   sequence id: an example (shared), one [p + y_k] (unshared) or a
                                  padding run; unique within the batch
    branch         [B, L] int32   0 for prompt and padding tokens, k + 1 for response k of its sequence
    position_ids   [B, L] int64   restart at P for every response
    cu_seqlens_q   [S+1]  int32   varlen query segments over the flattened B*L rows: [p + y_1], y_2, ...
    cu_seqlens_k   [S+1]  int32   varlen key segments over the gathered keys: [p + y_1], [p + y_2], ...
    kv_index       [T]    int64   flattened row of every gathered key (T = B*L + sum over extra
                                  responses of P)
    max_seqlen_q, max_seqlen_k    python ints

    A query in branch b sees key j iff j <= i in row order, doc[j] == doc[i] and branch[j] in {0, b}.
    `cache` holds masks built from these tensors (one build per forward, reused by every layer).
    """

    doc: torch.Tensor
    branch: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    kv_index: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def to(self, device, non_blocking: bool = False) -> AttentionLayout:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved, cache={})


@dataclass
class PackedBatch:
    """A packed batch of preference examples (shape legend in the module docstring).

    input_ids            [B, L] int64   tokens; `pad_token_id` after the end of each row
    position_ids         [B, L] int64   (also in `layout`)
    labels               [B, L] int64   the completion token at its own position, `ignore_index` elsewhere
    src_index            [M]    int64   flattened B*L row whose hidden state predicts completion token m
    tgt_index            [M]    int64   flattened B*L row of completion token m
    targets              [M]    int64   completion token m (`input_ids.flatten()[tgt_index]`)
    token_response       [M]    int64   response of token m; M is ordered by response then position
    response_example     [R]    int64   example of response r, in input order
    response_rank        [R]    int64   rank of r within its example: 0 = chosen/best, 1 = rejected, ...
    response_num_tokens  [R]    int64   completion tokens of r after truncation
    example_offsets      [E+1]  int64   responses of example e are example_offsets[e] .. [e+1] - 1
    responses            `fastpo.losses.ResponseLayout` of the M head rows: token -> response, example ->
                         ranked responses (examples may hold different numbers of responses); built on the
                         host, its CPU copy kept when the batch moves
    layout               AttentionLayout for `fastpo.attention`
    spans                Span per packed sequence (host metadata)

    Responses are numbered example-major in input order, so with K responses for every example
    `logp_sum.view(E, K)[:, 0]` is the chosen column.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    src_index: torch.Tensor
    tgt_index: torch.Tensor
    targets: torch.Tensor
    token_response: torch.Tensor
    response_example: torch.Tensor
    response_rank: torch.Tensor
    response_num_tokens: torch.Tensor
    example_offsets: torch.Tensor
    responses: ResponseLayout
    layout: AttentionLayout
    spans: tuple[Span, ...]
    num_examples: int
    num_responses: int
    num_tokens: int
    """Non-padding tokens in the rows (what every matmul of the decoder runs on, padding aside)."""
    num_pad_tokens: int
    shared: bool
    ignore_index: int
    truncation: TruncationReport

    def to(self, device, non_blocking: bool = False) -> PackedBatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved, responses=self.responses.to(device),
                       layout=self.layout.to(device, non_blocking=non_blocking))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)


# ----------------------------------------------------------------------------------------------------
# input normalization and truncation
# ----------------------------------------------------------------------------------------------------


def as_example(item) -> PreferenceExample:
    """Accept a `PreferenceExample`, a `(prompt_ids, [response_ids, ...])` pair, or a mapping with
    `prompt_input_ids` and one of: `chosen_input_ids` + `rejected_input_ids` (pairs),
    `responses_input_ids` (ranked list, best first), `completion_input_ids` (unpaired, K = 1)."""
    if isinstance(item, PreferenceExample):
        return item
    if isinstance(item, Mapping):
        prompt = item["prompt_input_ids"]
        if "chosen_input_ids" in item:
            return PreferenceExample(prompt, (item["chosen_input_ids"], item["rejected_input_ids"]))
        if "responses_input_ids" in item:
            return PreferenceExample(prompt, tuple(item["responses_input_ids"]))
        if "completion_input_ids" in item:
            return PreferenceExample(prompt, (item["completion_input_ids"],))
        raise KeyError(
            "an example mapping needs prompt_input_ids and chosen_input_ids/rejected_input_ids, "
            f"responses_input_ids or completion_input_ids; got keys {sorted(item)}"
        )
    prompt, responses = item
    return PreferenceExample(prompt, tuple(responses))


def _validate(i: int, ex: PreferenceExample, min_responses: int) -> None:
    if len(ex.prompt_ids) == 0:
        raise ValueError(f"example {i}: empty prompt (at least one token, e.g. BOS, predicts the first response token)")
    if len(ex.response_ids) < min_responses:
        raise ValueError(
            f"example {i}: {len(ex.response_ids)} response(s), need at least min_responses={min_responses} "
            "(pass min_responses=1 for unpaired KTO-style examples)"
        )
    for k, response in enumerate(ex.response_ids):
        if len(response) == 0:
            raise ValueError(f"example {i}: response {k} has no tokens")


def _truncate(i, ex, *, max_tokens, max_completion_tokens, prompt_truncation, shared):
    """Apply the module's truncation rule to one example; return it and its `TruncationReport`."""
    responses = [list(r) for r in ex.response_ids]
    dropped_response_tokens = 0
    num_truncated_responses = 0
    if max_completion_tokens is not None:
        for k, r in enumerate(responses):
            if len(r) > max_completion_tokens:
                dropped_response_tokens += len(r) - max_completion_tokens
                num_truncated_responses += 1
                responses[k] = r[:max_completion_tokens]
    need = sum(map(len, responses)) if shared else max(map(len, responses))
    prompt_budget = max_tokens - need
    if prompt_budget < 1:
        layout = "sum" if shared else "longest"
        raise ValueError(
            f"example {i}: its responses ({layout} {need} tokens after max_completion_tokens="
            f"{max_completion_tokens}) plus one prompt token do not fit max_tokens={max_tokens}; "
            "lower max_completion_tokens or raise max_tokens"
        )
    prompt = list(ex.prompt_ids)
    dropped_prompt_tokens = max(0, len(prompt) - prompt_budget)
    if dropped_prompt_tokens:
        prompt = prompt[dropped_prompt_tokens:] if prompt_truncation == "keep_end" else prompt[:prompt_budget]
    report = TruncationReport(
        num_examples=1,
        num_truncated_examples=int(dropped_prompt_tokens > 0 or num_truncated_responses > 0),
        num_truncated_prompts=int(dropped_prompt_tokens > 0),
        num_truncated_responses=num_truncated_responses,
        num_dropped_prompt_tokens=dropped_prompt_tokens,
        num_dropped_response_tokens=dropped_response_tokens,
    )
    return PreferenceExample(prompt, responses), report


# ----------------------------------------------------------------------------------------------------
# bin packing
# ----------------------------------------------------------------------------------------------------


def first_fit_decreasing(costs: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices, in placement order) of total cost <= capacity.

    Items in decreasing cost (ties by index, so the result is deterministic), each into the first bin
    with room. Every cost must be <= capacity.
    """
    order = sorted(range(len(costs)), key=lambda u: (-costs[u], u))
    bins: list[list[int]] = []
    room: list[int] = []
    for u in order:
        c = costs[u]
        if c > capacity:
            raise ValueError(f"item {u} costs {c} tokens > capacity {capacity}")
        for b, free in enumerate(room):
            if c <= free:
                bins[b].append(u)
                room[b] -= c
                break
        else:
            bins.append([u])
            room.append(capacity - c)
    return bins


# ----------------------------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------------------------


class _Builder:
    """Accumulates the flattened B*L arrays and the varlen segments while sequences are written."""

    def __init__(self, num_rows: int, row_len: int, pad_token_id: int, ignore_index: int, num_responses: int):
        n = num_rows * row_len
        self.L = row_len
        self.input_ids = [pad_token_id] * n
        self.position_ids = [0] * n
        self.labels = [ignore_index] * n
        self.doc = [0] * n
        self.branch = [0] * n
        self.seqlens_q: list[int] = []
        self.seqlens_k: list[int] = []
        self.kv_index: list[int] = []
        self.src: list[list[int]] = [[] for _ in range(num_responses)]
        self.tgt: list[list[int]] = [[] for _ in range(num_responses)]
        self.num_docs = 0

    def sequence(self, flat_start: int, prompt: list[int], responses: list[tuple[int, list[int]]]) -> list[tuple]:
        """Write `prompt || y_1 || ... || y_k` from flattened row `flat_start`; return the branch starts."""
        doc = self.num_docs
        self.num_docs += 1
        P = len(prompt)
        s = flat_start
        self._write(s, prompt, range(P), doc, 0)
        t = s + P
        placed = []
        for j, (r, ids) in enumerate(responses):
            n = len(ids)
            self._write(t, ids, range(P, P + n), doc, j + 1)
            self.labels[t : t + n] = ids
            # first token <- last prompt row; token i > 0 <- row of token i - 1 in the same branch
            self.src[r] = [s + P - 1, *range(t, t + n - 1)]
            self.tgt[r] = list(range(t, t + n))
            if j == 0:  # q [p || y_1] against k [p || y_1]
                self.seqlens_q.append(P + n)
                self.kv_index.extend(range(s, t + n))
            else:  # q [y_j] against k [p || y_j] (bottom-right causal alignment)
                self.seqlens_q.append(n)
                self.kv_index.extend(range(s, s + P))
                self.kv_index.extend(range(t, t + n))
            self.seqlens_k.append(P + n)
            placed.append((r, t % self.L, n))
            t += n
        return placed

    def padding(self, flat_start: int, n: int) -> None:
        """A padding run: its own sequence, causal over itself, so no query row is empty (no NaN)."""
        doc = self.num_docs
        self.num_docs += 1
        self.position_ids[flat_start : flat_start + n] = range(n)
        self.doc[flat_start : flat_start + n] = [doc] * n
        self.seqlens_q.append(n)
        self.seqlens_k.append(n)
        self.kv_index.extend(range(flat_start, flat_start + n))

    def _write(self, start, ids, positions, doc, branch):
        n = len(ids)
        self.input_ids[start : start + n] = ids
        self.position_ids[start : start + n] = positions
        self.doc[start : start + n] = [doc] * n
        self.branch[start : start + n] = [branch] * n


def _cu(seqlens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *seqlens], dtype=torch.int64).cumsum(0).to(torch.int32)


def pack_examples(
    examples: Sequence,
    *,
    max_tokens: int,
    share_prompt: bool = True,
    max_completion_tokens: int | None = None,
    prompt_truncation: str = "keep_end",
    min_responses: int = 2,
    pad_token_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> PackedBatch:
    """Pack tokenized preference examples into rows of at most `max_tokens` tokens.

    examples               `PreferenceExample`s, `(prompt_ids, [response_ids, ...])` pairs or mappings
                           (see `as_example`); responses best first.
    max_tokens             token budget of one row (the longest row sets L).
    share_prompt           True: `[p, y_1 .. y_K]` per example (prompt computed once). False:
                           `[p + y_k]` per response, packed as independent sequences (the baseline, and
                           the layout for models that cannot share), with the same output type.
    max_completion_tokens  cut every response to this many tokens (first tokens kept).
    prompt_truncation      "keep_end" or "keep_start": the part of the prompt kept when an example does
                           not fit (the rule is in the module docstring).
    min_responses          2 for pairwise / listwise objectives; 1 allows unpaired (KTO) examples.

    Deterministic: rows come from first-fit-decreasing over the packing units (an example with
    sharing, one `[p + y_k]` without), ties broken by input order.
    """
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    if prompt_truncation not in PROMPT_TRUNCATION:
        raise ValueError(f"prompt_truncation must be one of {PROMPT_TRUNCATION}, got {prompt_truncation!r}")
    if max_completion_tokens is not None and max_completion_tokens < 1:
        raise ValueError(f"max_completion_tokens must be >= 1 or None, got {max_completion_tokens}")
    if min_responses < 1:
        raise ValueError(f"min_responses must be >= 1, got {min_responses}")
    if len(examples) == 0:
        raise ValueError("no examples to pack")

    exs, report = [], TruncationReport()
    for i, item in enumerate(examples):
        ex = as_example(item)
        _validate(i, ex, min_responses)
        ex, rep = _truncate(
            i,
            ex,
            max_tokens=max_tokens,
            max_completion_tokens=max_completion_tokens,
            prompt_truncation=prompt_truncation,
            shared=share_prompt,
        )
        exs.append(ex)
        report = report + rep

    offsets = [0]
    for ex in exs:
        offsets.append(offsets[-1] + len(ex.response_ids))
    num_responses = offsets[-1]

    # packing units: (example, responses of the unit)
    if share_prompt:
        units = [(e, list(range(len(ex.response_ids)))) for e, ex in enumerate(exs)]
    else:
        units = [(e, [k]) for e, ex in enumerate(exs) for k in range(len(ex.response_ids))]
    costs = [len(exs[e].prompt_ids) + sum(len(exs[e].response_ids[k]) for k in ks) for e, ks in units]
    rows = first_fit_decreasing(costs, max_tokens)
    row_len = max(sum(costs[u] for u in row) for row in rows)

    built = _Builder(len(rows), row_len, pad_token_id, ignore_index, num_responses)
    spans = []
    for b, row in enumerate(rows):
        col = 0
        for u in row:
            e, ks = units[u]
            ex = exs[e]
            responses = [(offsets[e] + k, list(ex.response_ids[k])) for k in ks]
            placed = built.sequence(b * row_len + col, list(ex.prompt_ids), responses)
            spans.append(Span(e, b, col, len(ex.prompt_ids), tuple(placed)))
            col += costs[u]
        if col < row_len:
            built.padding(b * row_len + col, row_len - col)
    return _to_batch(built, spans, exs, offsets, len(rows), row_len, share_prompt, ignore_index, report)


def _to_batch(built, spans, exs, offsets, num_rows, row_len, shared, ignore_index, report) -> PackedBatch:
    def long(x):
        return torch.tensor(x, dtype=torch.int64)

    def rows(x, dtype=torch.int64):
        return torch.tensor(x, dtype=dtype).view(num_rows, row_len)

    input_ids = rows(built.input_ids)
    position_ids = rows(built.position_ids)
    src_index = long([i for r in built.src for i in r])
    tgt_index = long([i for r in built.tgt for i in r])
    response_num_tokens = long([len(r) for r in built.tgt])
    num_responses = len(built.tgt)
    response_example = long([e for e, ex in enumerate(exs) for _ in ex.response_ids])
    response_rank = long([k for ex in exs for k in range(len(ex.response_ids))])
    layout = AttentionLayout(
        doc=rows(built.doc, torch.int32),
        branch=rows(built.branch, torch.int32),
        position_ids=position_ids,
        cu_seqlens_q=_cu(built.seqlens_q),
        cu_seqlens_k=_cu(built.seqlens_k),
        kv_index=long(built.kv_index),
        max_seqlen_q=max(built.seqlens_q),
        max_seqlen_k=max(built.seqlens_k),
    )
    token_response = torch.repeat_interleave(torch.arange(num_responses), response_num_tokens)
    num_tokens = sum(len(ex.prompt_ids) * (1 if shared else len(ex.response_ids)) for ex in exs) + int(
        response_num_tokens.sum()
    )
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        labels=rows(built.labels),
        src_index=src_index,
        tgt_index=tgt_index,
        targets=input_ids.flatten()[tgt_index],
        token_response=token_response,
        response_example=response_example,
        response_rank=response_rank,
        response_num_tokens=response_num_tokens,
        example_offsets=long(offsets),
        responses=ResponseLayout.from_groups(token_response, response_example, response_rank),
        layout=layout,
        spans=tuple(spans),
        num_examples=len(exs),
        num_responses=num_responses,
        num_tokens=num_tokens,
        num_pad_tokens=num_rows * row_len - num_tokens,
        shared=shared,
        ignore_index=ignore_index,
        truncation=report,
    )
