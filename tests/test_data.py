"""Data loading, formats, tokenization and truncation, with the bundled demo tokenizer (offline).

The demo tokenizer is character-level (one id per character, BOS added, no merges), so expected ids can be
written as characters. Parity with TRL's own preprocessing, on merging BPE tokenizers, is in test_data_trl.py.
"""

import json

import pytest

from fastpo import config
from fastpo.config import DataConfig
from fastpo.data import check_data_files, check_token_ids, demo_paths, load_preference_dataset, truncate
from fastpo.data_files import load_raw
from fastpo.packing import TruncationReport, pack_examples


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_paths().model)


def ids(tok, text, special=False):
    return tok(text, add_special_tokens=special)["input_ids"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(tok, path, unpaired=False, **kw):
    kw.setdefault("eval_fraction", 0.0)
    return load_preference_dataset(DataConfig(dataset=str(path), **kw), tok, unpaired=unpaired)


def packing_cost(ex, share_prefix):
    sizes = [len(r) for r in ex.response_ids]
    return len(ex.prompt_ids) + (sum(sizes) if share_prefix else max(sizes))


PAIRS = [{"prompt": f"Q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(6)]
USER = {"role": "user", "content": "2+2?"}


@pytest.mark.parametrize("ext", ["json", "jsonl", "parquet"])
def test_preference_strings_from_local_files(tok, tmp_path, ext):
    path = tmp_path / f"d.{ext}"
    if ext == "parquet":
        import pandas as pd

        pd.DataFrame(PAIRS).to_parquet(path)
    elif ext == "json":
        path.write_text(json.dumps(PAIRS))
    else:
        write_jsonl(path, PAIRS)
    train, evals, report = load(tok, path)
    assert report.format == "preference" and len(train) == 6 and evals == []
    ex = train[2]
    assert ex.source_index == 2 and ex.label is None
    assert ex.prompt_ids == [tok.bos_token_id] + ids(tok, "Q2")
    assert ex.response_ids == [ids(tok, "yes 2") + [tok.eos_token_id], ids(tok, "no 2") + [tok.eos_token_id]]


@pytest.mark.parametrize("rows", [
    [{  # UltraFeedback-binarized: a string prompt, full conversations in chosen/rejected
        "prompt": "2+2?",
        "chosen": [USER, {"role": "assistant", "content": "4"}],
        "rejected": [USER, {"role": "assistant", "content": "5"}],
    }],
    [{  # TRL conversational: prompt turns apart from the answer turns
        "prompt": [USER],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }],
    [{  # implicit prompt: the turns chosen and rejected share
        "chosen": [USER, {"role": "assistant", "content": "4"}],
        "rejected": [USER, {"role": "assistant", "content": "5"}],
    }],
], ids=["ultrafeedback", "conversational", "implicit_prompt"])  # fmt: skip
def test_chat_rows_use_the_chat_template(tok, tmp_path, rows):
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    prompt = tok.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos>User: 2+2?\nAssistant: "
    for append_eos, eos in [("auto", []), ("never", []), ("always", [tok.eos_token_id])]:
        train, _, report = load(tok, path, append_eos=append_eos)
        assert report.format == "chat" and len(train) == 1
        assert train[0].prompt_ids == ids(tok, prompt)
        # auto: the template's own turn end ("\n" here) as rendered, as TRL keeps chat responses
        assert train[0].response_ids == [ids(tok, "4\n") + eos, ids(tok, "5\n") + eos]


def test_append_eos_on_plain_text(tok, tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b<eos>"}]  # a response may already end with EOS
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    a, b, eos = *ids(tok, "ab"), tok.eos_token_id
    for mode, expected in [("auto", [[a, eos], [b, eos]]), ("always", [[a, eos], [b, eos]]),
                           ("never", [[a], [b, eos]])]:  # fmt: skip
        train, _, _ = load(tok, path, append_eos=mode)
        assert train[0].response_ids == expected, mode
    assert config.parse_args(["--data.append_eos", "never"]).data.append_eos == "never"
    with pytest.raises(ValueError, match=r"--data\.append_eos: expected one of"):
        DataConfig(append_eos="sometimes")


def test_hh_transcripts_split_at_the_last_assistant_turn(tok, tmp_path):
    head = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant:"
    rows = [{"chosen": head + " Why did the", "rejected": head + " No."}]
    train, _, report = load(tok, write_jsonl(tmp_path / "hh.jsonl", rows))
    assert report.format == "hh"
    assert train[0].prompt_ids == ids(tok, head, special=True)
    assert train[0].response_ids[0] == ids(tok, " Why did the") + [tok.eos_token_id]
    assert train[0].response_ids[1] == ids(tok, " No.") + [tok.eos_token_id]


def test_ranked_lists_come_best_first(tok, tmp_path):
    rows = [
        {"prompt": "p", "completions": ["b", "a", "c"], "scores": [0.5, 0.9, 0.1]},
        {"prompt": "p", "completions": ["b", "a", "c"], "scores": [1.0, 1.0, 1.0]},
    ]
    train, _, report = load(tok, write_jsonl(tmp_path / "r.jsonl", rows[:1]))
    assert report.format == "ranked"
    assert [tok.decode(r) for r in train[0].response_ids] == ["a<eos>", "b<eos>", "c<eos>"]
    rows = [{"prompt": "p", "completions": ["x", "y"], "ranks": [2, 1]}, {"prompt": "p", "responses": ["x"]}]
    train, _, report = load(tok, write_jsonl(tmp_path / "r2.jsonl", rows[:1]))
    assert [tok.decode(r) for r in train[0].response_ids] == ["y<eos>", "x<eos>"]
    train, _, report = load(tok, write_jsonl(tmp_path / "r3.jsonl", [{"prompt": "p", "responses": ["x", "y"]},
                                                                      {"prompt": "p", "responses": ["x"]}]))
    assert len(train) == 1 and report.filtered == {"too_few_responses": 1}


def test_kto_rows(tok, tmp_path):
    rows = [{"prompt": "p", "completion": "good", "label": True}, {"prompt": "p", "completion": "bad", "label": False}]
    train, _, report = load(tok, write_jsonl(tmp_path / "k.jsonl", rows))
    assert report.format == "kto"
    assert [ex.label for ex in train] == [True, False]
    assert [len(ex.response_ids) for ex in train] == [1, 1]
    assert load(tok, tmp_path / "k.jsonl", num_workers=2)[0] == train  # labels survive worker processes


# ----------------------------------------------------------------------------------------------------
# truncation
# ----------------------------------------------------------------------------------------------------


def test_truncation_rules_are_counted(tok, tmp_path):
    rows = [
        {"prompt": "abcdefgh", "chosen": "xy", "rejected": "z"},  # prompt rule only
        {"prompt": "ab", "chosen": "uvwxyz", "rejected": "q"},  # completion rule only
        {"prompt": "abc", "chosen": "uvwx", "rejected": "q"},  # length rule only
        {"prompt": "a", "chosen": "b", "rejected": "c"},  # untouched
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    # prompt = BOS + chars, responses = chars + EOS
    train, _, report = load(tok, path, max_prompt_length=5, max_completion_length=5, max_length=8)
    assert report.truncated == {"prompt": 1, "completion": 1, "length": 1}
    assert [len(ex.prompt_ids) for ex in train] == [5, 3, 4, 2]
    assert train[0].prompt_ids == [tok.bos_token_id] + ids(tok, "abcd")  # keep_start
    assert train[1].response_ids[0] == ids(tok, "uvwxy")
    assert train[2].response_ids[0] == ids(tok, "uvwx")  # 4 + 4 = 8, EOS cut
    train, _, report = load(tok, path, max_prompt_length=5, truncation_mode="keep_end")
    assert train[0].prompt_ids == ids(tok, "defgh") and report.truncated == {"prompt": 1}


def test_truncate_keep_end_cuts_the_prompt_start():
    cfg = DataConfig(max_length=6, truncation_mode="keep_end")
    prompt, responses, rules = truncate([1, 2, 3, 4], [[5, 6, 7], [8]], cfg)
    assert prompt == [2, 3, 4] and responses == [[5, 6, 7], [8]] and rules == ["length"]
    cfg = DataConfig(max_length=6, truncation_mode="keep_start")
    assert truncate([1, 2, 3, 4], [[5, 6, 7], [8]], cfg) == ([1, 2, 3, 4], [[5, 6], [8]], ["length"])


PROMPT, LONG, SHORT = [1, 2, 3], [4] * 10, [5] * 2  # a 3-token prompt, responses of 10 and 2 tokens


@pytest.mark.parametrize("share_prefix, mode, expected", [
    # shared row: 3 + 10 + 2 = 15 > 9; keep_start keeps the prompt, so 6 tokens of responses: 4 + 2
    (True, "keep_start", (PROMPT, [[4] * 4, SHORT])),
    # keep_end cuts the prompt to one token, leaving 8: 6 + 2
    (True, "keep_end", ([3], [[4] * 6, SHORT])),
    # unshared: [prompt + longest] = 13 > 9
    (False, "keep_start", (PROMPT, [[4] * 6, SHORT])),
    (False, "keep_end", ([3], [[4] * 8, SHORT])),
])  # fmt: skip
def test_truncate_enforces_the_packed_row_budget(share_prefix, mode, expected):
    cfg = DataConfig(max_length=None, max_tokens=9, share_prefix=share_prefix, truncation_mode=mode)
    prompt, responses, rules = truncate(PROMPT, [LONG, SHORT], cfg)
    assert (prompt, responses) == expected and rules == ["max_tokens"]
    assert truncate(PROMPT, [[4], [5]], cfg) == (PROMPT, [[4], [5]], [])  # fits: untouched
    with pytest.raises(ValueError, match=r"--data\.max_tokens: expected at least 2 tokens"):
        DataConfig(max_tokens=1)  # a packed row holds a prompt token and a response token


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_loaded_examples_fit_a_packed_row(tok, tmp_path, share_prefix, mode):
    rows = [{"prompt": "q" * p, "chosen": "a" * c, "rejected": "b" * r}
            for p, c, r in [(2, 3, 3), (10, 2, 2), (3, 12, 1), (6, 6, 6), (1, 1, 1), (17, 2, 3)]]
    path = write_jsonl(tmp_path / "b.jsonl", rows)
    budget = 16
    full, _, _ = load(tok, path, max_length=None, share_prefix=share_prefix, truncation_mode=mode)
    over = sum(packing_cost(ex, share_prefix) > budget for ex in full)
    train, _, report = load(tok, path, max_length=None, max_tokens=budget, share_prefix=share_prefix,
                            truncation_mode=mode)
    assert over > 0 and report.truncated["max_tokens"] + sum(report.filtered.values()) == over
    assert len(train) + sum(report.filtered.values()) == len(rows)
    assert all(packing_cost(ex, share_prefix) <= budget for ex in train)
    batch = pack_examples([(ex.prompt_ids, ex.response_ids) for ex in train], max_tokens=budget,
                          share_prompt=share_prefix, prompt_truncation=mode)
    assert batch.truncation == TruncationReport(num_examples=len(train))  # the packer cuts nothing


def test_filter_reasons_are_exact(tok, tmp_path):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},  # kept
        {"prompt": "p", "chosen": "", "rejected": "b"},  # empty_response
        {"prompt": "p", "chosen": "same", "rejected": "same"},  # identical_responses
        {"prompt": "p", "chosen": None, "rejected": "b"},  # malformed
        {"prompt": "p", "chosen": "abc", "rejected": "abd"},  # identical once cut to 2 tokens
        {"prompt": "a long prompt", "chosen": "a", "rejected": "b"},  # prompt_too_long (BOS + 13 >= 8)
    ]
    path = write_jsonl(tmp_path / "f.jsonl", rows)
    train, _, report = load(tok, path, max_completion_length=2, max_length=8)
    assert len(train) == 1 and report.num_rows == {"train": 6}
    assert report.filtered == {"empty_response": 1, "identical_responses": 2, "malformed": 1, "prompt_too_long": 1}
    assert "identical_responses 2" in str(report) and "prompt_too_long 1" in str(report)
    assert not report.truncated  # counts kept examples only (the cut "abc" was dropped)
    train, _, report = load(tok, path, max_completion_length=2, max_length=8, truncation_mode="keep_end")
    assert len(train) == 2 and report.truncated == {"length": 1}  # keep_end keeps the long prompt's end
    assert report.filtered == {"empty_response": 1, "identical_responses": 2, "malformed": 1}
    # the packed-row budget: keep_start keeps 9 of the long prompt's 14 tokens, leaving its responses none
    train, _, report = load(tok, path, max_length=None, max_tokens=9)
    assert report.filtered == {"empty_response": 1, "identical_responses": 1, "malformed": 1, "exceeds_max_tokens": 1}
    assert len(train) == 2 and report.truncated == {"max_tokens": 1}  # "abc"/"abd" cut to 3 tokens each


def test_empty_prompt_is_its_own_reason(tmp_path):
    from transformers import AutoTokenizer

    no_bos = AutoTokenizer.from_pretrained(demo_paths().model, add_bos_token=False)
    rows = [{"prompt": "", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "b"}]
    train, _, report = load(no_bos, write_jsonl(tmp_path / "p.jsonl", rows))
    assert len(train) == 1 and report.filtered == {"empty_prompt": 1}


# ----------------------------------------------------------------------------------------------------
# reading files
# ----------------------------------------------------------------------------------------------------


NUMERIC = ["19", "019", "1.50", "-0", "1e5", "true", "null", "2"]


@pytest.mark.parametrize("ext", ["json", "jsonl"])
def test_text_is_read_as_written(tok, tmp_path, ext):
    rows = [{"prompt": f"What is {i}?", "chosen": s, "rejected": s + "0"} for i, s in enumerate(NUMERIC)]
    text = "\n".join(json.dumps(r) for r in rows)
    # numbers in text columns are text too, read as written (not 1.5): datasets reads such a file as JSON and
    # turns the numeric strings of the other rows into numbers
    text += '\n{"prompt": "What is 9?", "chosen": 1.50, "rejected": 21}\n'
    path = tmp_path / f"n.{ext}"
    path.write_text(text if ext == "jsonl" else "[" + ",".join(text.split("\n")[:-1]) + "]")
    train, _, report = load(tok, path)
    assert not report.filtered and len(train) == len(rows) + 1
    chosen = [tok.decode(ex.response_ids[0], skip_special_tokens=True) for ex in train]
    assert chosen == NUMERIC + ["1.50"]
    assert tok.decode(train[-1].response_ids[1], skip_special_tokens=True) == "21"


def test_message_contents_and_response_lists_are_read_as_written(tok, tmp_path):
    rows = [{"prompt": [USER], "chosen": [{"role": "assistant", "content": s}],
             "rejected": [{"role": "assistant", "content": "x" + s}]} for s in NUMERIC]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps(rows[0]).replace('"19"', "1.50"))
    train, _, report = load(tok, path)
    assert not report.filtered
    assert [tok.decode(ex.response_ids[0]) for ex in train] == [s + "\n" for s in NUMERIC + ["1.50"]]
    rows = [{"prompt": "p", "responses": [s, s + "0", "x"]} for s in NUMERIC]
    train, _, report = load(tok, write_jsonl(tmp_path / "r.jsonl", rows))
    assert [tok.decode(ex.response_ids[1], skip_special_tokens=True) for ex in train] == [s + "0" for s in NUMERIC]


@pytest.mark.parametrize("ext", ["json", "jsonl"])
def test_mixed_formats_are_refused_with_their_rows(tok, tmp_path, ext):
    rows = [dict(p) for p in PAIRS] * 2
    for i in (3, 7, 8):  # message lists among plain strings
        rows[i] = {"prompt": [USER], "chosen": [{"role": "assistant", "content": "4"}],
                   "rejected": [{"role": "assistant", "content": "5"}]}
    path = tmp_path / f"m.{ext}"
    path.write_text(json.dumps(rows) if ext == "json" else "".join(json.dumps(r) + "\n" for r in rows))
    match = (rf"m\.{ext}': column 'prompt' mixes kinds of values: string in rows \[0, 1, 2, 4, 5\] \.\.\. "
             r"\(9 rows\), message list in rows \[3, 7, 8\] \(3 rows\)")
    with pytest.raises(ValueError, match=match):
        load(tok, path)


def test_mixed_columns_loaded_by_datasets_are_refused(tmp_path):
    # a directory goes through datasets' own loader, which stores the mixed column as JSON
    (tmp_path / "d").mkdir()
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": ["a"], "rejected": "c"}]
    write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    with pytest.raises(ValueError, match=r"column 'chosen' mixes kinds of values: .*list of strings in rows \[1\]"):
        load_raw(str(tmp_path / "d"))


def test_unreadable_files_name_the_file_and_row(tok, tmp_path):
    good = json.dumps(PAIRS[0]).encode()
    bad = good + b"\n" + good + b"\n" + good.replace(b"Q0", b"Q\xff0") + b"\n"
    (tmp_path / "latin.jsonl").write_bytes(bad)
    offset = bad.index(b"\xff")
    cases = {
        "latin.jsonl": rf"latin\.jsonl' is not UTF-8: byte 0xff at line 3 \(byte offset {offset}\)",
        "empty.jsonl": r"empty\.jsonl' has no rows",
        "blank.json": r"blank\.json' has no rows",
        "array.json": r"array\.json' has no rows",
        "broken.jsonl": r"broken\.jsonl' line 2 \(row 1\): invalid JSON",
        "scalar.jsonl": r"scalar\.jsonl' line 2 \(row 1\): expected a JSON object, got list of strings",
    }
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.json").write_text("\n  \n")
    (tmp_path / "array.json").write_text("[]")
    (tmp_path / "broken.jsonl").write_text(json.dumps(PAIRS[0]) + "\n{\"prompt\": \n")
    (tmp_path / "scalar.jsonl").write_text(json.dumps(PAIRS[0]) + '\n["a", "b"]\n')
    for name, match in cases.items():
        path = str(tmp_path / name)
        with pytest.raises(ValueError, match=match):
            check_data_files(DataConfig(dataset=path))
        with pytest.raises(ValueError, match=match):
            load(tok, path)
        with pytest.raises(ValueError, match=match):  # the eval file is checked too
            check_data_files(DataConfig(dataset=write_jsonl(tmp_path / "ok.jsonl", PAIRS), eval_dataset=path))


def test_empty_parquet_has_no_rows(tmp_path):
    import pandas as pd

    pd.DataFrame({"prompt": [], "chosen": [], "rejected": []}, dtype=str).to_parquet(tmp_path / "e.parquet")
    with pytest.raises(ValueError, match=r"e\.parquet' has no rows"):
        check_data_files(DataConfig(dataset=str(tmp_path / "e.parquet")))


def test_check_data_files_accepts_good_files_and_hub_ids(tmp_path):
    check_data_files(DataConfig())  # the bundled demo data
    check_data_files(DataConfig(dataset=write_jsonl(tmp_path / "ok.jsonl", PAIRS), eval_dataset="org/name"))
    with pytest.raises(ValueError, match=r"does not exist"):
        check_data_files(DataConfig(dataset=str(tmp_path / "missing.jsonl")))


# ----------------------------------------------------------------------------------------------------
# token ids and the model's embedding
# ----------------------------------------------------------------------------------------------------


def test_token_ids_must_fit_the_embedding(tok, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    vocab_size = AutoConfig.from_pretrained(demo_paths().model).vocab_size
    train, _, _ = load(tok, write_jsonl(tmp_path / "d.jsonl", PAIRS))
    check_token_ids(train, vocab_size, "demo", "demo")
    # a tokenizer with a token the demo model lacks
    extended = AutoTokenizer.from_pretrained(demo_paths().model)
    extended.add_tokens(["<|im_end|>"], special_tokens=True)
    new_id = extended.convert_tokens_to_ids("<|im_end|>")
    rows = [{"prompt": "p", "chosen": "a<|im_end|>", "rejected": "b"}]
    train, _, _ = load(extended, write_jsonl(tmp_path / "x.jsonl", PAIRS + rows))
    with pytest.raises(ValueError, match=rf"token id {new_id} \(row 6\) from tokenizer 'tok/x' is outside the "
                                         rf"embedding of model 'org/m', which has {vocab_size} rows"):
        check_token_ids(train, vocab_size, "tok/x", "org/m")


# ----------------------------------------------------------------------------------------------------
# unpaired objectives on pairs
# ----------------------------------------------------------------------------------------------------


HH_ROWS = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: yes {i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: no {i}"}
           for i in range(5)]
CHAT_ROWS = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": f"y{i}"}],
              "rejected": [{"role": "assistant", "content": f"n{i}"}]} for i in range(5)]


@pytest.mark.parametrize("rows", [PAIRS, HH_ROWS, CHAT_ROWS], ids=["preference", "hh", "chat"])
def test_pairs_are_unpaired_for_unpaired_objectives(tok, tmp_path, rows):
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    paired, _, _ = load(tok, path)
    unpaired, _, report = load(tok, path, unpaired=True)
    n = len(rows)
    assert len(unpaired) == 2 * n and report.unpaired == {"train": n} and report.num_examples == {"train": 2 * n}
    assert f"unpaired train {n} pairs into {2 * n} examples" in str(report)
    for pair, (good, bad) in zip(paired, zip(unpaired[::2], unpaired[1::2])):
        assert (good.label, bad.label) == (True, False)
        assert good.source_index == bad.source_index == pair.source_index
        assert [good.response_ids[0], bad.response_ids[0]] == pair.response_ids
        assert good.prompt_ids == bad.prompt_ids == pair.prompt_ids  # char-level: no boundary merges
    assert load(tok, path, unpaired=True, num_workers=2)[0] == unpaired


def test_unpaired_counts_are_per_example(tok, tmp_path):
    rows = PAIRS[:3] + [
        {"prompt": None, "chosen": "a", "rejected": "b"},  # two malformed examples
        {"prompt": "p", "chosen": "", "rejected": "b"},  # an empty desirable one; the undesirable one is kept
        {"prompt": "p", "chosen": None, "rejected": "b"},  # a malformed desirable one; the undesirable one is kept
    ]
    train, _, report = load(tok, write_jsonl(tmp_path / "u.jsonl", rows), unpaired=True)
    assert report.filtered == {"malformed": 3, "empty_response": 1}
    assert len(train) + sum(report.filtered.values()) == 2 * len(rows)
    assert [(ex.source_index, ex.label) for ex in train] == [(0, True), (0, False), (1, True), (1, False),
                                                             (2, True), (2, False), (4, False), (5, False)]
    # ranked rows are not pairs: left as they are (the trainer refuses them for unpaired objectives)
    ranked = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "b", "c"]}])
    train, _, report = load(tok, ranked, unpaired=True)
    assert len(train[0].response_ids) == 3 and not report.unpaired


@pytest.mark.parametrize("loss, fmt, ok", [
    ("kto", "kto", True),
    ("kto", "preference", True),
    ("kto", "chat", True),
    ("apo_zero_unpaired", "hh", True),
    ("kto", "ranked", False),
    ("dpo", "kto", False),
    ("dpo", "ranked", True),
])  # fmt: skip
def test_data_format_for_unpaired_objectives(loss, fmt, ok):
    cfg = config.parse_args(["--loss.name", loss])
    if ok:
        config.check_data_format(cfg, fmt)
        return
    with pytest.raises(ValueError, match=r"ranked lists" if fmt == "ranked" else r"gives unpaired rows"):
        config.check_data_format(cfg, fmt)


# ----------------------------------------------------------------------------------------------------
# splits, sources, workers, demo
# ----------------------------------------------------------------------------------------------------


def test_eval_split_is_seeded_and_disjoint(tok, tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(40)]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    a_train, a_eval, _ = load(tok, path, eval_fraction=0.25, seed=1)
    b_train, b_eval, _ = load(tok, path, eval_fraction=0.25, seed=1)
    _, c_eval, _ = load(tok, path, eval_fraction=0.25, seed=2)
    prompts = lambda exs: {tok.decode(e.prompt_ids) for e in exs}  # noqa: E731
    assert len(a_eval) == 10 and len(a_train) == 30
    assert prompts(a_eval) == prompts(b_eval) and prompts(a_eval) != prompts(c_eval)
    assert not prompts(a_eval) & prompts(a_train)


def test_missing_columns(tok, tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"columns found: \['answer', 'question'\].*preference: prompt"):
        load(tok, path)
    with pytest.raises(ValueError, match=r"format 'kto' needs columns"):
        load(tok, write_jsonl(tmp_path / "p.jsonl", PAIRS), format="kto")


def test_unknown_dataset(tok, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    with pytest.raises(ValueError, match=r"does not exist"):
        load(tok, tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unsupported extension '\.csv'"):
        load(tok, tmp_path / "x.csv")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"could not load Hugging Face Hub dataset 'no-such-org/no-such-data'"):
        load_raw("no-such-org/no-such-data")


def test_empty_after_filtering(tok, tmp_path):
    rows = [{"prompt": "p", "chosen": "s", "rejected": "s"}] * 3
    with pytest.raises(ValueError, match=r"no training examples.*identical_responses 3"):
        load(tok, write_jsonl(tmp_path / "e.jsonl", rows))


def test_parallel_tokenization_matches(tok, tmp_path):
    rows = PAIRS + [{"prompt": "p", "chosen": "", "rejected": "b"},
                    {"prompt": "abcdefgh", "chosen": "a", "rejected": "b"}]
    path = write_jsonl(tmp_path / "w.jsonl", rows)
    serial, _, r1 = load(tok, path, max_prompt_length=4)
    parallel, _, r2 = load(tok, path, max_prompt_length=4, num_workers=2)
    assert serial == parallel and r1 == r2
    assert r1.filtered == {"empty_response": 1} and r1.truncated == {"prompt": 1}


def test_demo_assets_load_offline(tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    paths = demo_paths()
    cfg = AutoConfig.from_pretrained(paths.model)
    assert cfg.vocab_size == len(tok) and not cfg.tie_word_embeddings
    model = AutoModelForCausalLM.from_config(cfg)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert tok.decode(tok("Q: What is 3+4?")["input_ids"]) == "<bos>Q: What is 3+4?"
    train, evals, report = load_preference_dataset(DataConfig(), tok)
    assert report.num_examples == {"train": 3000, "eval": 300} and not report.filtered and not report.truncated
    check_token_ids(train + evals, cfg.vocab_size, paths.model, paths.model)
    rows = [json.loads(line) for line in open(paths.train)]
    assert all(r["chosen"] != r["rejected"] for r in rows)
    eval_prompts = {json.loads(line)["prompt"] for line in open(paths.eval)}
    assert not eval_prompts & {r["prompt"] for r in rows}  # eval problems are unseen in training
