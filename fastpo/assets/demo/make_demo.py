"""Regenerate the bundled demo assets: `python fastpo/assets/demo/make_demo.py`.

Writes, next to this file and deterministically (fixed seed):

- `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`: a character-level tokenizer
  (printable ASCII plus newline, and `<pad>`, `<bos>`, `<eos>`, `<unk>`) with a small chat template,
  loadable offline with `AutoTokenizer.from_pretrained(dir)`.
- `config.json`: a tiny Llama decoder, built with random init by
  `AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(dir))` (no weights are shipped).
- `train.jsonl`, `eval.jsonl`: prompt/chosen/rejected rows over small generated problems in which the
  chosen answer is correct and the rejected one is a plausible mistake (the other letter or number
  of a comparison, the wrong parity). Each problem (prompt) lands
  in exactly one of the two files, so the eval accuracy measures preferences on problems never seen in
  training.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234
NUM_TRAIN = 3000
NUM_EVAL = 300
EVAL_PROBLEM_FRAC = 0.15
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
# Plain "Role: text" lines; the prompt part ends with "Assistant: " so that rendering the prompt with
# add_generation_prompt=True is a prefix of rendering the whole conversation.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)
MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "use_cache": False,
    "dtype": "float32",
}


def vocab() -> list[str]:
    """Special tokens first (pad = 0), then newline and printable ASCII."""
    specials = [SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")]
    return specials + ["\n"] + [chr(c) for c in range(32, 127)]


def write_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, processors

    tokens = vocab()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(tokens[:4])
    tok.decoder = decoders.Fuse()
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokens.index(bos))]
    )
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "padding_side": "right",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        **SPECIAL_TOKENS,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", SPECIAL_TOKENS)
    return len(tokens)


def write_model_config(out: Path, vocab_size: int) -> None:
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    _write_json(out / "config.json", {**MODEL_CONFIG, "vocab_size": vocab_size, **ids})


# Problem generators: each returns every (prompt, correct answer, [plausible wrong answers]) of its
# kind, so that problems can be split between train and eval before sampling rows.
def alphabet_problems():
    letters = "abcdefghijklmnopqrstuvwxyz"
    for x in letters:
        for y in letters:
            if x != y:
                yield f"Which comes first in the alphabet, {x} or {y}?", min(x, y), [max(x, y)]


def compare_problems():
    for a in range(10, 100, 3):
        for b in range(11, 100, 4):
            if a != b:
                yield f"Which is larger, {a} or {b}?", str(max(a, b)), [str(min(a, b))]
                yield f"Which is smaller, {a} or {b}?", str(min(a, b)), [str(max(a, b))]


def parity_problems():
    for n in range(100):
        yes, no = ("yes", "no") if n % 2 == 0 else ("no", "yes")
        yield f"Is {n} even?", yes, [no]


def make_rows(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Split each kind's problems into train and eval problems, then sample rows from each side."""
    kinds = [
        list(alphabet_problems()),
        list(compare_problems()),
        list(parity_problems()),
    ]
    train, evals = [], []
    for problems in kinds:
        problems = list({p[0]: p for p in problems}.values())
        rng.shuffle(problems)
        num_eval = max(2, round(EVAL_PROBLEM_FRAC * len(problems)))
        evals.append(problems[:num_eval])
        train.append(problems[num_eval:])
    return _sample(rng, train, NUM_TRAIN), _sample(rng, evals, NUM_EVAL)


def _sample(rng: random.Random, kinds: list[list], num_rows: int) -> list[dict]:
    rows = []
    for i in range(num_rows):
        prompt, chosen, wrong = rng.choice(kinds[i % len(kinds)])
        rejected = rng.choice([w for w in wrong if w != chosen])
        rows.append({"prompt": f"Q: {prompt}\nA: ", "chosen": chosen, "rejected": rejected})
    rng.shuffle(rows)
    return rows


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main(out: Path = HERE) -> None:
    vocab_size = write_tokenizer(out)
    write_model_config(out, vocab_size)
    train, evals = make_rows(random.Random(SEED))
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "eval.jsonl", evals)
    print(f"wrote {len(train)} train and {len(evals)} eval rows, vocab {vocab_size}, to {out}")


if __name__ == "__main__":
    main()
