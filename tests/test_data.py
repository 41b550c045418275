"""Data loading, formats, tokenization and truncation, with the bundled demo tokenizer (offline)."""

import json

import pytest

from fastpo.config import DataConfig
from fastpo.data import demo_paths, load_preference_dataset, load_raw, truncate


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_paths().model)


def ids(tok, text, special=False):
    return tok(text, add_special_tokens=special)["input_ids"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(tok, path, **kw):
    kw.setdefault("eval_fraction", 0.0)
    return load_preference_dataset(DataConfig(dataset=str(path), **kw), tok)


PAIRS = [{"prompt": f"Q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(6)]


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


def test_chat_rows_use_the_chat_template(tok, tmp_path):
    user = {"role": "user", "content": "2+2?"}
    rows = [{  # UltraFeedback-binarized: a string prompt, full conversations in chosen/rejected
        "prompt": "2+2?",
        "chosen": [user, {"role": "assistant", "content": "4"}],
        "rejected": [user, {"role": "assistant", "content": "5"}],
    }, {  # TRL conversational: prompt turns apart from the answer turns
        "prompt": [user],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }]  # fmt: skip
    train, _, report = load(tok, write_jsonl(tmp_path / "c.jsonl", rows))
    assert report.format == "chat" and len(train) == 2
    prompt = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos>User: 2+2?\nAssistant: "
    for ex in train:
        assert ex.prompt_ids == ids(tok, prompt)
        assert ex.response_ids == [ids(tok, "4\n") + [tok.eos_token_id], ids(tok, "5\n") + [tok.eos_token_id]]


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


def test_filters_are_counted(tok, tmp_path):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "", "rejected": "b"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": None, "rejected": "b"},
        {"prompt": "p", "chosen": "abc", "rejected": "abd"},  # identical once cut to 2 tokens
    ]
    train, _, report = load(tok, write_jsonl(tmp_path / "f.jsonl", rows), max_completion_length=2)
    assert len(train) == 1 and report.num_rows == {"train": 5}
    assert report.filtered == {"empty_response": 1, "identical_responses": 2, "malformed": 1}
    assert "identical_responses 2" in str(report)


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
    path = write_jsonl(tmp_path / "w.jsonl", PAIRS + [{"prompt": "p", "chosen": "", "rejected": "b"}])
    serial, _, r1 = load(tok, path)
    parallel, _, r2 = load(tok, path, num_workers=2)
    assert serial == parallel and r1.filtered == r2.filtered == {"empty_response": 1}


def test_demo_assets_load_offline(tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    paths = demo_paths()
    cfg = AutoConfig.from_pretrained(paths.model)
    assert cfg.vocab_size == len(tok) and not cfg.tie_word_embeddings
    model = AutoModelForCausalLM.from_config(cfg)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert tok.decode(tok("Q: What is 3+4?")["input_ids"]) == "<bos>Q: What is 3+4?"
    train, evals, report = load_preference_dataset(DataConfig(), tok)
    assert report.num_examples == {"train": 3000, "eval": 300} and not report.filtered
    rows = [json.loads(line) for line in open(paths.train)]
    assert all(r["chosen"] != r["rejected"] for r in rows)
    eval_prompts = {json.loads(line)["prompt"] for line in open(paths.eval)}
    assert not eval_prompts & {r["prompt"] for r in rows}  # eval problems are unseen in training
