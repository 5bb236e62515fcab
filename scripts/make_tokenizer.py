"""Train the shipped tiny model's tokenizer: byte-level BPE, vocab 4096, on fasttune's bundled data (deterministic).

    python scripts/make_tokenizer.py   # writes src/fasttune/assets/tiny/{tokenizer.json,tokenizer_config.json,special_tokens_map.json}

BOS is added by the tokenizer's post-processor (so `tokenizer(text)` starts with <|begin_of_text|>); the ChatML
chat_template therefore does not emit BOS, and fasttune's data pipeline adds it exactly once.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "fasttune" / "assets" / "data"
OUT = ROOT / "src" / "fasttune" / "assets" / "tiny"

BOS, EOS, PAD, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]  # ids 0..4
VOCAB_SIZE = 4096

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def training_texts() -> list[str]:
    texts = (DATA / "corpus.txt").read_text(encoding="utf-8").split("\n\n")
    for line in (DATA / "instructions.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts += [row["instruction"], row.get("input", ""), row["output"]]
    for line in (DATA / "conversations.jsonl").read_text(encoding="utf-8").splitlines():
        texts += [turn["value"] for turn in json.loads(line)["conversations"]]
    texts += ["system", "user", "assistant"]  # ChatML role names
    return [t for t in texts if t]


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=1, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(training_texts(), trainer=trainer)  # single pass over a fixed list: deterministic
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]),
    ])
    return tok


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tok = build()
    tok.save(str(OUT / "tokenizer.json"))
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": [IM_START, IM_END]}
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "added_tokens_decoder": added,
        "model_max_length": 2048,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML_TEMPLATE,
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (OUT / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    print(f"vocab size {tok.get_vocab_size()} -> {OUT}")


if __name__ == "__main__":
    main()
