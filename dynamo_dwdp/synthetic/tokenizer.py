"""An offline, deterministic byte-level BPE tokenizer in DeepSeek-V3 style, for random checkpoints.

* Trained with the `tokenizers` package on the corpus committed at `dynamo_dwdp/assets/corpus.txt`
  (never on files of the Python install, which differ between machines), so the same vocab size
  gives a byte-identical tokenizer.json everywhere.
* Ids 0..4 are the special tokens `<｜begin▁of▁sentence｜>`, `<｜end▁of▁sentence｜>`, `<｜▁pad▁｜>`,
  `<｜User｜>`, `<｜Assistant｜>` (DeepSeek spellings; bos=0, eos=1, pad=2 as in DeepSeek-V3).
* The vocabulary has exactly `vocab_size` ids. Where BPE training stops earlier (the corpus is too small
  for 100k merges), the remaining ids are filler entries of the BPE vocabulary with visible text
  (" tok1234" for id 1234). No merge produces them, so they never change how text is encoded, but a
  random model that emits any id < vocab_size can always be detokenized (Dynamo's frontend needs that).
* tokenizer_config.json holds `chat_template` (a DeepSeek-style Jinja template written for both
  Jinja2 and minijinja), bos/eos/pad, `tokenizer_class: PreTrainedTokenizerFast` and `model_max_length`.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from dynamo_dwdp.errors import UserError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT)
MIN_FREQUENCY = 2
FILLER_FORMAT = " tok{id}"

# System messages first (DeepSeek puts them right after BOS), then the turns in order. `content` may be
# a string or a list of OpenAI-style parts ({"type": "text", "text": ...}); non-text parts are dropped.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is none -%}"
    "{%- elif content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ render(message['content']) }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '" + USER + "' }}{{ render(message['content']) }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '" + ASSISTANT + "' }}{{ render(message['content']) }}{{ '" + EOS + "' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + ASSISTANT + "' }}{%- endif -%}"
)


def corpus_text() -> str:
    """The committed training corpus (UTF-8, '\\n' line ends whatever the checkout does)."""
    raw = resources.files("dynamo_dwdp").joinpath("assets/corpus.txt").read_bytes()
    return raw.decode("utf-8").replace("\r\n", "\n")


def build_tokenizer(vocab_size: int):
    """A `tokenizers.Tokenizer` with exactly `vocab_size` ids (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise UserError(f"vocab_size={vocab_size} is too small for a byte-level tokenizer (need >= "
                        f"{len(SPECIAL_TOKENS) + 256})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_FREQUENCY,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus_text().splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))

    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for i, t in enumerate(SPECIAL_TOKENS):
        if vocab.get(t) != i:
            raise AssertionError(f"special token {t} did not get id {i}")
    if len(vocab) < vocab_size:
        byte_encoder = _byte_to_unicode()
        used = set(vocab)
        for i in range(len(vocab), vocab_size):
            text = FILLER_FORMAT.format(id=i)
            piece = "".join(byte_encoder[b] for b in text.encode("utf-8"))
            while piece in used:                       # a learned token that looks the same: make it unique
                piece += byte_encoder[ord("_")]
            vocab[piece] = i
            used.add(piece)
    if sorted(vocab.values()) != list(range(vocab_size)):
        raise AssertionError("tokenizer ids are not exactly 0..vocab_size-1")
    spec["model"]["vocab"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))


def _byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable-character table that byte-level BPE uses for its token strings."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_config(model_max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length),
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer_files(out_dir: str | os.PathLike, vocab_size: int, model_max_length: int) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json into `out_dir`; return their names."""
    out = Path(out_dir)
    tok = build_tokenizer(vocab_size)
    files = {
        "tokenizer.json": tok.to_str(pretty=True) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config(model_max_length), indent=2, ensure_ascii=False) + "\n",
    }
    for name, text in files.items():
        tmp = out / (name + ".partial")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
    return list(files)
