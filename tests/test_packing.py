"""Packing invariants: layout, positions, targets, spans, bin packing, varlen metadata, truncation, errors."""

import random

import pytest
import torch

from fastpo.packing import (
    PreferenceExample,
    TruncationReport,
    first_fit_decreasing,
    pack_examples,
)

IGNORE = -100


def make_examples(spec, seed=0, vocab=100):
    """spec: [(prompt_len, [response_len, ...]), ...] -> examples with random tokens in [1, vocab)."""
    rng = random.Random(seed)

    def toks(n):
        return [rng.randrange(1, vocab) for _ in range(n)]

    return [PreferenceExample(toks(p), [toks(r) for r in rs]) for p, rs in spec]


# several examples per row, K = 2 and K = 3, lengths from 1 to 30 tokens
SPEC = [(1, [5, 3]), (25, [2, 17]), (8, [1, 4, 9]), (3, [30, 6]), (12, [7, 7, 2]), (40, [4, 1])]


@pytest.fixture(params=[True, False], ids=["shared", "unshared"])
def share_prompt(request):
    return request.param


def test_spans_reconstruct_every_sequence(share_prompt):
    exs = make_examples(SPEC)
    b = pack_examples(exs, max_tokens=64, share_prompt=share_prompt)
    ids = b.input_ids
    seen = []
    for sp in b.spans:
        ex = exs[sp.example]
        assert ids[sp.row, sp.start : sp.start + sp.prompt_len].tolist() == list(ex.prompt_ids)
        for r, t, n in sp.responses:
            k = int(b.response_rank[r])
            assert int(b.response_example[r]) == sp.example
            assert ids[sp.row, t : t + n].tolist() == list(ex.response_ids[k])
            seen.append(r)
    assert sorted(seen) == list(range(b.num_responses))
    assert b.num_examples == len(exs)
    assert b.num_responses == sum(len(ex.response_ids) for ex in exs)


def test_positions_restart_at_prompt_length(share_prompt):
    b = pack_examples(make_examples(SPEC), max_tokens=64, share_prompt=share_prompt)
    pos, branch = b.position_ids, b.layout.branch
    for sp in b.spans:
        P = sp.prompt_len
        assert pos[sp.row, sp.start : sp.start + P].tolist() == list(range(P))
        assert branch[sp.row, sp.start : sp.start + P].eq(0).all()
        for j, (_, t, n) in enumerate(sp.responses):
            assert pos[sp.row, t : t + n].tolist() == list(range(P, P + n))
            assert branch[sp.row, t : t + n].eq(j + 1).all()
        docs = b.layout.doc[sp.row, sp.start : sp.responses[-1][1] + sp.responses[-1][2]]
        assert docs.eq(docs[0]).all()


def test_targets_only_on_completion_tokens(share_prompt):
    exs = make_examples(SPEC)
    b = pack_examples(exs, max_tokens=64, share_prompt=share_prompt)
    flat_ids, flat_labels = b.input_ids.flatten(), b.labels.flatten()
    completion = torch.zeros_like(flat_labels, dtype=torch.bool)
    completion[b.tgt_index] = True
    assert (flat_labels != IGNORE).eq(completion).all()
    assert flat_labels[b.tgt_index].eq(flat_ids[b.tgt_index]).all()
    assert b.targets.eq(flat_ids[b.tgt_index]).all()
    assert b.targets.numel() == sum(len(r) for ex in exs for r in ex.response_ids)
    # targets in response order, each response's tokens in order
    expected = [tok for ex in exs for r in ex.response_ids for tok in r]
    assert b.targets.tolist() == expected
    assert b.token_response.tolist() == [r for r, n in enumerate(b.response_num_tokens.tolist()) for _ in range(n)]


def test_first_token_is_predicted_by_last_prompt_row(share_prompt):
    b = pack_examples(make_examples(SPEC), max_tokens=64, share_prompt=share_prompt)
    L = b.input_ids.shape[1]
    starts = torch.cat([torch.zeros(1, dtype=torch.long), b.response_num_tokens.cumsum(0)[:-1]])
    for sp in b.spans:
        last_prompt_row = sp.row * L + sp.start + sp.prompt_len - 1
        for r, t, n in sp.responses:
            m0 = int(starts[r])
            assert int(b.src_index[m0]) == last_prompt_row
            assert b.src_index[m0 + 1 : m0 + n].tolist() == list(range(sp.row * L + t, sp.row * L + t + n - 1))
            assert b.tgt_index[m0 : m0 + n].tolist() == list(range(sp.row * L + t, sp.row * L + t + n))


def test_response_metadata():
    exs = make_examples(SPEC)
    b = pack_examples(exs, max_tokens=64)
    ks = [len(ex.response_ids) for ex in exs]
    assert b.response_example.tolist() == [e for e, k in enumerate(ks) for _ in range(k)]
    assert b.response_rank.tolist() == [j for k in ks for j in range(k)]
    assert b.response_num_tokens.tolist() == [len(r) for ex in exs for r in ex.response_ids]
    assert b.example_offsets.tolist() == [0, *torch.tensor(ks).cumsum(0).tolist()]


@pytest.mark.parametrize("max_tokens", [48, 64, 100])
def test_rows_respect_budget_and_hold_whole_units(share_prompt, max_tokens):
    exs = make_examples(SPEC)
    b = pack_examples(exs, max_tokens=max_tokens, share_prompt=share_prompt)
    B, L = b.input_ids.shape
    assert L <= max_tokens
    used = torch.zeros(B, dtype=torch.long)
    for sp in b.spans:
        end = sp.responses[-1][1] + sp.responses[-1][2]
        used[sp.row] += end - sp.start
    assert (used <= max_tokens).all()
    assert int(used.sum()) == b.num_tokens == B * L - b.num_pad_tokens
    shared_tokens = sum(len(ex.prompt_ids) + sum(map(len, ex.response_ids)) for ex in exs)
    unshared_tokens = sum(len(ex.prompt_ids) * len(ex.response_ids) + sum(map(len, ex.response_ids)) for ex in exs)
    assert b.num_tokens == (shared_tokens if share_prompt else unshared_tokens)
    if share_prompt:
        assert sorted(sp.example for sp in b.spans) == list(range(len(exs)))


def test_several_examples_per_row():
    b = pack_examples(make_examples(SPEC), max_tokens=64)
    rows = [sp.row for sp in b.spans]
    assert max(rows.count(r) for r in set(rows)) >= 2
    assert b.input_ids.shape[0] >= 2


def test_packing_is_deterministic(share_prompt):
    a = pack_examples(make_examples(SPEC), max_tokens=64, share_prompt=share_prompt)
    b = pack_examples(make_examples(SPEC), max_tokens=64, share_prompt=share_prompt)
    for name in ("input_ids", "position_ids", "src_index", "targets", "token_response"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.spans == b.spans


def test_first_fit_decreasing():
    # FFD on 7, 5, 4, 3, 1 with capacity 10: [7, 3], [5, 4, 1]
    assert first_fit_decreasing([3, 7, 1, 5, 4], 10) == [[1, 0], [3, 4, 2]]
    # ties keep input order
    assert first_fit_decreasing([5, 5, 5], 10) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="capacity"):
        first_fit_decreasing([11], 10)


def test_padding_runs_are_their_own_sequences():
    b = pack_examples(make_examples(SPEC), max_tokens=64)
    doc, branch, pos = b.layout.doc, b.layout.branch, b.position_ids
    real_docs = {int(doc[sp.row, sp.start]) for sp in b.spans}
    pad = torch.ones_like(doc, dtype=torch.bool)
    for sp in b.spans:
        pad[sp.row, sp.start : sp.responses[-1][1] + sp.responses[-1][2]] = False
    assert int(pad.sum()) == b.num_pad_tokens > 0
    for row in range(doc.shape[0]):
        cols = pad[row].nonzero().flatten()
        if cols.numel():
            assert doc[row, cols].eq(doc[row, cols[0]]).all() and int(doc[row, cols[0]]) not in real_docs
            assert branch[row, cols].eq(0).all()
            assert pos[row, cols].tolist() == list(range(cols.numel()))
    assert b.labels[pad].eq(IGNORE).all()


def test_varlen_metadata(share_prompt):
    """q segments tile the B*L rows in order; every k segment gathers rows with consecutive positions
    0 .. lk-1 and ends with exactly its q segment (what bottom-right causal alignment relies on)."""
    exs = make_examples(SPEC)
    b = pack_examples(exs, max_tokens=64, share_prompt=share_prompt)
    lay = b.layout
    B, L = b.input_ids.shape
    cu_q, cu_k = lay.cu_seqlens_q.tolist(), lay.cu_seqlens_k.tolist()
    assert lay.cu_seqlens_q.dtype == lay.cu_seqlens_k.dtype == torch.int32
    assert cu_q[0] == cu_k[0] == 0 and cu_q[-1] == B * L and cu_k[-1] == lay.kv_index.numel()
    extra = sum(len(ex.prompt_ids) * (len(ex.response_ids) - 1) for ex in exs) if share_prompt else 0
    assert lay.kv_index.numel() == B * L + extra
    flat_pos, flat_doc = lay.position_ids.flatten(), lay.doc.flatten()
    for s in range(len(cu_q) - 1):
        lq, lk = cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s]
        rows_k = lay.kv_index[cu_k[s] : cu_k[s + 1]]
        assert flat_pos[rows_k].tolist() == list(range(lk))
        assert flat_doc[rows_k].eq(flat_doc[rows_k[0]]).all()
        assert rows_k[lk - lq :].tolist() == list(range(cu_q[s], cu_q[s + 1]))
    assert lay.max_seqlen_q == max(a - b for a, b in zip(cu_q[1:], cu_q[:-1]))
    assert lay.max_seqlen_k == max(a - b for a, b in zip(cu_k[1:], cu_k[:-1]))


def test_truncation_of_completions_is_counted(share_prompt):
    exs = make_examples([(4, [10, 3]), (2, [6, 8, 1])])
    b = pack_examples(exs, max_tokens=100, max_completion_tokens=5, share_prompt=share_prompt)
    assert b.response_num_tokens.tolist() == [5, 3, 5, 5, 1]
    assert b.truncation == TruncationReport(
        num_examples=2, num_truncated_examples=2, num_truncated_prompts=0, num_truncated_responses=3,
        num_dropped_prompt_tokens=0, num_dropped_response_tokens=5 + 1 + 3,
    )  # fmt: skip
    # the first tokens are kept
    assert b.targets[:5].tolist() == exs[0].response_ids[0][:5]


@pytest.mark.parametrize("rule", ["keep_end", "keep_start"])
def test_prompt_truncation_rule(rule):
    exs = make_examples([(30, [6, 4]), (5, [3, 3])])
    b = pack_examples(exs, max_tokens=20, prompt_truncation=rule)
    # shared unit: P + 6 + 4 <= 20 -> 10 prompt tokens kept
    sp = next(s for s in b.spans if s.example == 0)
    kept = b.input_ids[sp.row, sp.start : sp.start + sp.prompt_len].tolist()
    prompt = list(exs[0].prompt_ids)
    assert kept == (prompt[-10:] if rule == "keep_end" else prompt[:10])
    assert b.truncation.num_truncated_prompts == 1
    assert b.truncation.num_dropped_prompt_tokens == 20
    assert b.truncation.num_truncated_examples == 1 and b.truncation.num_examples == 2


def test_unshared_truncation_budget_is_per_sequence():
    exs = make_examples([(30, [6, 4])])
    b = pack_examples(exs, max_tokens=20, share_prompt=False)
    # each [p + y_k] must fit: P + max(6, 4) <= 20 -> 14 prompt tokens kept
    assert {sp.prompt_len for sp in b.spans} == {14}
    assert b.truncation.num_dropped_prompt_tokens == 16


def test_responses_wider_than_budget_raise():
    exs = make_examples([(3, [15, 10])])
    with pytest.raises(ValueError, match="example 0.*max_tokens=20"):
        pack_examples(exs, max_tokens=20)
    # with a completion cap it fits (and is counted)
    b = pack_examples(exs, max_tokens=20, max_completion_tokens=8)
    assert b.truncation.num_truncated_responses == 2 and b.truncation.num_truncated_prompts == 0


def test_empty_response_raises():
    with pytest.raises(ValueError, match="example 1: response 1 has no tokens"):
        pack_examples([([1, 2], [[3], [4]]), ([1], [[2], []])], max_tokens=10)


def test_empty_prompt_raises():
    with pytest.raises(ValueError, match="example 0: empty prompt"):
        pack_examples([([], [[3], [4]])], max_tokens=10)


def test_single_response_needs_opt_in():
    exs = [([1, 2], [[3, 4]]), ([5], [[6], [7]])]
    with pytest.raises(ValueError, match="example 0: 1 response.*min_responses=2"):
        pack_examples(exs, max_tokens=10)
    b = pack_examples(exs, max_tokens=10, min_responses=1)
    assert b.response_example.tolist() == [0, 1, 1]
    assert b.response_rank.tolist() == [0, 0, 1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens=1), "max_tokens"),
        (dict(max_tokens=10, prompt_truncation="left"), "prompt_truncation"),
        (dict(max_tokens=10, max_completion_tokens=0), "max_completion_tokens"),
        (dict(max_tokens=10, min_responses=0), "min_responses"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pack_examples([([1], [[2], [3]])], **kwargs)


def test_mapping_inputs():
    pair = {"prompt_input_ids": [1, 2], "chosen_input_ids": [3], "rejected_input_ids": [4, 5]}
    ranked = {"prompt_input_ids": [6], "responses_input_ids": [[7], [8], [9]]}
    unpaired = {"prompt_input_ids": [1], "completion_input_ids": [2, 3]}
    b = pack_examples([pair, ranked, unpaired], max_tokens=16, min_responses=1)
    assert b.targets.tolist() == [3, 4, 5, 7, 8, 9, 2, 3]
    assert b.response_rank.tolist() == [0, 1, 0, 1, 2, 0]
    with pytest.raises(KeyError, match="prompt_input_ids"):
        pack_examples([{"prompt_input_ids": [1], "text": [2]}], max_tokens=16)


def test_to_moves_every_tensor_and_drops_mask_cache():
    b = pack_examples(make_examples(SPEC), max_tokens=64)
    b.layout.cache["x"] = 1
    m = b.to("meta")
    for name in ("input_ids", "position_ids", "labels", "src_index", "targets", "token_response", "response_example"):
        assert getattr(m, name).device.type == "meta"
    for name in ("doc", "branch", "position_ids", "cu_seqlens_q", "cu_seqlens_k", "kv_index"):
        assert getattr(m.layout, name).device.type == "meta"
    assert m.layout.cache == {} and b.layout.cache == {"x": 1}
    assert m.spans == b.spans and m.layout.max_seqlen_q == b.layout.max_seqlen_q
