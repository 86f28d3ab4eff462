"""`data.tokenizer=bpe`: byte-level BPE (GPT-2's scheme: "Language Models are
Unsupervised Multitask Learners") in a Hugging Face `tokenizers` file.

Each token of a byte-level vocabulary spells a fixed run of bytes and the text is
never normalised, so a token's byte count is its spelling's length and bits per byte
are exact. A file with a normaliser, a prefix space, or no byte-level pre-tokenizer is
refused. Special tokens are matched only as ids, never in text: a document that
contains "<|eos|>" is encoded as those characters.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from efflm.data.tokenizer import FileTokenizer, utf8_text
from efflm.errors import ConfigError, DataError

SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>")  # ids 0, 1, 2 of a trained one


@dataclass
class BpeSettings:
    """`data.bpe`: the tokenizer file (`efflm data tokenizer bpe` writes one; a GPT-2
    style tokenizer.json also serves) and which of its special tokens pad, begin and end
    a document."""

    path: str = ""
    sha256: str = ""  # the file's, filled in at load; a resume and eval check it
    pad: str = SPECIALS[0]
    bos: str = SPECIALS[1]
    eos: str = SPECIALS[2]


def _nodes(node) -> list[dict]:
    """A pre-tokenizer or decoder and, for a sequence, its members."""
    if not node:
        return []
    inner = node.get("pretokenizers") or node.get("decoders") or []
    return [node, *(n for child in inner for n in _nodes(child))]


# Pre-tokenizers that split text without dropping or changing any of it.
KEEPS_TEXT = ("ByteLevel", "Sequence", "Split", "Digits", "Punctuation")


def byte_level_problem(spec: dict) -> str:
    """Why the tokenizer described by `spec` (its JSON) is not plain byte-level BPE; ''
    when it is."""
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')}, not BPE"
    if model.get("dropout"):
        return "it samples its merges (BPE dropout)"
    if spec.get("normalizer"):
        return f"it normalises text ({spec['normalizer'].get('type')})"
    nodes = _nodes(spec.get("pre_tokenizer"))
    pre = [n for n in nodes if n.get("type") == "ByteLevel"]
    if not pre:
        return "its pre-tokenizer is not byte-level"
    if any(n.get("add_prefix_space") for n in pre):
        return "its pre-tokenizer adds a prefix space"
    for n in nodes:
        if n.get("type") not in KEEPS_TEXT or n.get("behavior") == "Removed":
            return f"its pre-tokenizer {n.get('type')} drops text"
    if not any(n.get("type") == "ByteLevel" for n in _nodes(spec.get("decoder"))):
        return "its decoder is not byte-level"
    return ""


class Bpe(FileTokenizer):
    name = "bpe"
    settings = BpeSettings
    suffix = ".json"

    def __init__(self, path: str, sha256: str, options: tuple):
        super().__init__(path, sha256, options)
        from tokenizers import Tokenizer

        try:
            self.hf = Tokenizer.from_file(path)
        except Exception as e:  # the library's parse errors
            raise DataError(f"data.bpe.path={path!r} is not a tokenizers file "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                            ) from None
        spec = json.loads(self.hf.to_str())
        problem = byte_level_problem(spec)
        if problem:
            raise ConfigError(f"data.bpe.path={path!r} is not plain byte-level BPE: "
                              f"{problem}, so its tokens' byte counts are not fixed")
        self.hf.encode_special_tokens = True
        self.hf.no_truncation()
        self.hf.no_padding()
        vocab = self.hf.get_vocab(with_added_tokens=True)
        from tokenizers import pre_tokenizers

        missing = set(pre_tokenizers.ByteLevel.alphabet()) - set(vocab)
        if missing:
            raise ConfigError(f"data.bpe.path={path!r} lacks {len(missing)} of the 256 "
                              "byte-level tokens, so some bytes cannot be encoded")
        self.vocab_size = max(vocab.values()) + 1
        lengths = np.zeros(self.vocab_size, np.int32)
        for token, i in vocab.items():
            lengths[i] = len(token)  # byte-level: one character per byte
        added = spec.get("added_tokens", [])
        for token in added:  # a special stands for no text; other added tokens for theirs
            lengths[token["id"]] = 0 if token["special"] else len(
                token["content"].encode("utf-8"))
        self.lengths = lengths
        specials = {token["content"]: token["id"] for token in added if token["special"]}
        names = dict(options)
        for role in ("pad", "bos", "eos"):
            if names[role] not in specials:
                raise ConfigError(f"data.bpe.{role}={names[role]!r} is not a special token "
                                  f"of {path!r}; it has: "
                                  f"{', '.join(sorted(specials)) or 'none'}")
            setattr(self, f"{role}_id", specials[names[role]])

    def encode(self, text: str) -> np.ndarray:
        ids = self.hf.encode(utf8_text(text), add_special_tokens=False).ids
        return np.asarray(ids, np.int32)

    def token_byte_lengths(self) -> np.ndarray:
        return self.lengths

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        ids = ids[(ids >= 0) & (ids < self.vocab_size)]
        return self.hf.decode(ids.tolist(), skip_special_tokens=True)

    @staticmethod
    def train(texts, vocab_size: int, path: str) -> int:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + len(SPECIALS):
            raise DataError(f"--vocab-size {vocab_size} is below what byte-level BPE needs: "
                            f"{len(alphabet)} bytes + {len(SPECIALS)} specials = "
                            f"{len(alphabet) + len(SPECIALS)}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                      initial_alphabet=alphabet, show_progress=False)
        tok.train_from_iterator((utf8_text(t) for t in texts), trainer)
        tmp = path + ".tmp"
        tok.save(tmp)
        os.replace(tmp, path)
        return tok.get_vocab_size()
