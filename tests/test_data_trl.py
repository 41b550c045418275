"""fastpo's token ids against TRL's own preprocessing (TRL is a test dependency), row by row.

TRL's side is `DPOTrainer._prepare_dataset` / `KTOTrainer._prepare_dataset` itself, called with a stand-in
for the trainer (they read its tokenizer, and KTO its KL and weight settings) on the same file loaded through
`datasets`. The tokenizers are byte-level BPEs trained here, offline, with merges, so tokens can merge across
the prompt/response boundary: a Qwen2-style ChatML one (assistant turns end "<|im_end|>\\n", EOS <|im_end|>,
no BOS) and a Llama-3-style one (BOS added, turns end <|eot_id|>, EOS <|eot_id|>).
"""

import json
import types

import pytest

from fastpo.config import DataConfig
from fastpo.data import load_preference_dataset

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CORPUS = [
    "What is 9+10? Answer: 19. The answer is 19, not 21. Answer: 21",
    "The sky is blue. The sea is blue too. I think the cat sat on the mat.",
    "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road?",
    "\n\nHuman: Hi!\n\nAssistant: Hello! How can I help you today?",
    "user\nWhat is 9+10?\nassistant\n19\n\n\n\n",
]
USER = {"role": "user", "content": "What is 9+10?"}


def assistant(text):
    return [{"role": "assistant", "content": text}]


def byte_bpe(special_tokens, *, bos=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 4, trainer)
    if bos is not None:
        bos_id = tk.token_to_id(bos)
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    return tk


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import PreTrainedTokenizerFast

    chatml = PreTrainedTokenizerFast(
        tokenizer_object=byte_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML,
    )
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    llama3 = PreTrainedTokenizerFast(
        tokenizer_object=byte_bpe(special, bos="<|begin_of_text|>"),
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>", chat_template=LLAMA3,
    )
    assert chatml.bos_token is None and llama3("Hi")["input_ids"][0] == llama3.bos_token_id  # as Qwen2, Llama-3
    return {"chatml": chatml, "llama3": llama3}


@pytest.fixture(scope="module")
def trl_side(tmp_path_factory):
    """TRL's preprocessing of a file: (kind, path, tokenizer) -> its rows, through DPOTrainer / KTOTrainer."""
    import datasets
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    out = str(tmp_path_factory.mktemp("trl"))
    dpo_args = DPOConfig(output_dir=out, max_length=None, bf16=False, report_to=[])
    kto_args = KTOConfig(output_dir=out, max_length=None, bf16=False, report_to=[])

    def prepare(kind, path, tokenizer):
        ds = datasets.load_dataset("json", data_files=str(path))["train"]
        stand_in = types.SimpleNamespace(_tokenizer=tokenizer, calculate_KL=False, desirable_weight=1.0,
                                         undesirable_weight=1.0)
        trainer, args = (DPOTrainer, dpo_args) if kind == "dpo" else (KTOTrainer, kto_args)
        return list(trainer._prepare_dataset(stand_in, ds, tokenizer, args, "train"))

    return prepare


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(path, tokenizer, *, unpaired=False):
    cfg = DataConfig(dataset=str(path), eval_fraction=0.0, max_length=None)
    return load_preference_dataset(cfg, tokenizer, unpaired=unpaired)


def assert_same_as_dpo(examples, report, trl_rows):
    assert not report.filtered and len(examples) == len(trl_rows)
    for ex, row in zip(examples, trl_rows):
        assert ex.prompt_ids == row["prompt_ids"], ex.source_index
        assert ex.response_ids == [row["chosen_ids"], row["rejected_ids"]], ex.source_index


CHAT_STYLES = {
    "conversational": [  # prompt turns apart from the answer turns
        {"prompt": [USER], "chosen": assistant("19"), "rejected": assistant("21")},
        {"prompt": [{"role": "system", "content": "Be brief."}, USER], "chosen": assistant("The answer is 19."),
         "rejected": assistant("I think the answer is 21.")},
        {"prompt": [USER, *assistant("21"), {"role": "user", "content": "Sure?"}], "chosen": assistant("No: 19."),
         "rejected": assistant("Yes.")},
    ],
    "implicit_prompt": [  # the shared turns are the prompt, multi-turn
        {"chosen": [USER, *assistant("19")], "rejected": [USER, *assistant("21")]},
        {"chosen": [USER, *assistant("21"), {"role": "user", "content": "Sure?"}, *assistant("No: 19.")],
         "rejected": [USER, *assistant("21"), {"role": "user", "content": "Sure?"}, *assistant("Yes.")]},
    ],
}


@pytest.mark.parametrize("style", list(CHAT_STYLES))
@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_chat_ids_equal_trl(tokenizers, trl_side, tmp_path, template, style):
    tok = tokenizers[template]
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT_STYLES[style])
    examples, _, report = load(path, tok)
    assert_same_as_dpo(examples, report, trl_side("dpo", path, tok))
    turn_end = tok("<|im_end|>\n" if template == "chatml" else "<|eot_id|>", add_special_tokens=False)["input_ids"]
    for r in (r for ex in examples for r in ex.response_ids):  # the template's turn end, with no EOS after it
        assert r[-len(turn_end):] == turn_end and r.count(tok.eos_token_id) == 1


def test_ultrafeedback_rows_equal_trl_on_their_conversations(tokenizers, trl_side, tmp_path):
    """UltraFeedback-binarized rows repeat the first user turn as a string prompt; TRL reads the same rows
    without it (the shared turns are the prompt)."""
    tok = tokenizers["chatml"]
    rows = CHAT_STYLES["implicit_prompt"]
    ours = write_jsonl(tmp_path / "uf.jsonl", [{"prompt": USER["content"], **r} for r in rows])
    examples, _, report = load(ours, tok)
    assert_same_as_dpo(examples, report, trl_side("dpo", write_jsonl(tmp_path / "trl.jsonl", rows), tok))


PLAIN = [
    {"prompt": "What is 9+10? Answer: ", "chosen": "19", "rejected": "21"},  # " 19" merges across the boundary
    {"prompt": "What is 9+10?", "chosen": " The answer is 19.", "rejected": " 21"},
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "Say hi.", "chosen": " Hello!", "rejected": " Hi!<|im_end|>"},  # already ends with (ChatML's) EOS
    {"prompt": "Caf\u00e9?", "chosen": " Oui, caf\u00e9 \u2615", "rejected": " Non."},  # multi-byte characters
]


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_plain_text_ids_equal_trl(tokenizers, trl_side, tmp_path, template):
    tok = tokenizers[template]
    path = write_jsonl(tmp_path / "plain.jsonl", PLAIN)
    examples, _, report = load(path, tok)
    trl_rows = trl_side("dpo", path, tok)
    assert_same_as_dpo(examples, report, trl_rows)
    # prompt tokens TRL leaves out (merged with the response) are counted
    cut = sum(len(row["prompt_ids"]) < len(tok(r["prompt"])["input_ids"]) for r, row in zip(PLAIN, trl_rows))
    assert cut > 0 and report.truncated["prompt_boundary"] == cut


HH_HEAD = "\n\nHuman: Tell me a joke.\n\nAssistant:"
HH = [
    {"chosen": HH_HEAD + " Why did the chicken cross the road?", "rejected": HH_HEAD + " No."},
    {"chosen": "\n\nHuman: Hi!\n\nAssistant: Hello!\n\nHuman: 9+10?\n\nAssistant: 19",
     "rejected": "\n\nHuman: Hi!\n\nAssistant: Hello!\n\nHuman: 9+10?\n\nAssistant: 21"},
]


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_hh_ids_equal_trl(tokenizers, trl_side, tmp_path, template):
    tok = tokenizers[template]
    path = write_jsonl(tmp_path / "hh.jsonl", HH)
    examples, _, report = load(path, tok)
    assert report.format == "hh"
    assert_same_as_dpo(examples, report, trl_side("dpo", path, tok))


def test_hh_answers_with_a_common_start_keep_trl_sequences(tokenizers, trl_side, tmp_path):
    """TRL's extract_prompt moves the answers' common start ("The") into the prompt; fastpo keeps the whole
    answer as the response. The trained sequences are the same."""
    tok = tokenizers["chatml"]
    rows = [{"chosen": HH_HEAD + " The chicken crossed.", "rejected": HH_HEAD + " The road."}]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    (ex,), _, _ = load(path, tok)
    (row,) = trl_side("dpo", path, tok)
    assert ex.prompt_ids == tok(HH_HEAD)["input_ids"] and len(row["prompt_ids"]) > len(ex.prompt_ids)
    assert ex.prompt_ids + ex.response_ids[0] == row["prompt_ids"] + row["chosen_ids"]
    assert ex.prompt_ids + ex.response_ids[1] == row["prompt_ids"] + row["rejected_ids"]


def as_kto(examples):
    return sorted((tuple(ex.prompt_ids), tuple(ex.response_ids[0]), ex.label) for ex in examples)


@pytest.mark.parametrize("rows", [PLAIN, CHAT_STYLES["conversational"], HH], ids=["preference", "chat", "hh"])
def test_unpaired_ids_equal_trl_kto(tokenizers, trl_side, tmp_path, rows):
    tok = tokenizers["llama3"]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    examples, _, report = load(path, tok, unpaired=True)
    trl_rows = trl_side("kto", path, tok)
    assert not report.filtered and report.unpaired == {"train": len(rows)}
    theirs = sorted((tuple(r["prompt_ids"]), tuple(r["completion_ids"]), r["label"]) for r in trl_rows)
    assert as_kto(examples) == theirs
