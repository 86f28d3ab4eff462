"""Tokenizers (`data.tokenizer`): text <-> int32 token ids, and how many bytes of text
each token stands for, so that bits per byte are exact whatever the vocabulary.

The contract is `Tokenizer`; `byte` lives here, `bpe` in `bpe.py`, `sentencepiece` in
`sentencepiece.py`. A tokenizer read from a file (`FileTokenizer`) records the file's
SHA-256 in the config (`data.<name>.sha256`), so a resume, `efflm eval` and
`efflm generate` refuse another file under the same path.
"""

from __future__ import annotations

import functools
import hashlib
import os

import numpy as np

from efflm.errors import ConfigError, DataError


def utf8_text(text: str) -> str:
    """`text` as valid UTF-8 (a lone surrogate, which cannot be encoded, becomes '?'):
    the text whose bytes bits per byte count."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="replace").decode("utf-8")


def counts_from_starts(starts, total: int) -> np.ndarray:
    """Bytes per token from the byte offset where each token's text starts (`starts`,
    one per token, in order) and the text's length: token i covers [starts[i],
    starts[i+1]), the first from 0 and the last to the end, so the counts add up to
    `total` exactly even where a normaliser drops or rewrites text."""
    bounds = np.asarray(starts, np.int64).reshape(-1)
    if not len(bounds):
        return np.zeros(0, np.int32)
    bounds = np.concatenate([[0], np.clip(np.maximum.accumulate(bounds[1:]), 0, total),
                             [total]])
    return np.diff(bounds).astype(np.int32)


class Tokenizer:
    """A `data.tokenizer`: its hooks, with their defaults."""

    name = ""
    settings = None  # its own settings (`data.<name>.*`), a dataclass; None: none
    resumable = ()  # fields of `settings` that a resumed run may change
    earlier_defaults: dict = {}  # setting -> its value before its default changed
    trainable = False  # whether `efflm data tokenizer NAME` can train one (`train`)
    suffix = ""  # the file name ending of a trained one
    pad_id: int
    bos_id: int
    eos_id: int
    vocab_size: int
    fingerprint = ""  # identifies its vocabulary (for caches keyed by tokenization)

    @classmethod
    def load(cls, cfg) -> Tokenizer:
        """The tokenizer the data config `cfg` (the `data` section) names."""
        return cls()

    def pin(self, cfg) -> None:
        """Record in the data config `cfg` what a resume must find again (a file's hash)."""

    def encode(self, text: str) -> np.ndarray:
        """The token ids of `text` (int32), without specials."""
        raise NotImplementedError

    def encode_counted(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, bytes): `encode(text)` and how many bytes of `text`'s UTF-8 each id
        covers; they add up to the text's length unless no id is left (text a
        normaliser removes whole), which `encode_document` gives to the eos."""
        ids = self.encode(text)
        return ids, self.token_byte_lengths()[ids]

    def token_byte_lengths(self) -> np.ndarray:
        """Bytes of text per id, where that is fixed per id (`encode_counted`'s default)."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        """The text of `ids`; specials and ids outside the vocabulary are dropped."""
        raise NotImplementedError

    @staticmethod
    def train(texts, vocab_size: int, path: str) -> int:
        """Train one of `vocab_size` ids on the strings `texts`, write it to `path`, and
        return its vocabulary size (the corpus may give fewer merges than asked)."""
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, plus pad, bos and eos specials above them."""

    name = fingerprint = "byte"
    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of `text` as int32 ids, without specials."""
        data = text.encode("utf-8", errors="replace")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        ids = ids[(ids >= 0) & (ids < 256)]
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, np.int32)
        lengths[:256] = 1
        return lengths


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FileTokenizer(Tokenizer):
    """A tokenizer read from the file `data.<name>.path`, whose settings hold `path` and
    `sha256` (the file's hash: empty until the config is loaded; a set value that the
    file does not match is an error)."""

    resumable = ("path",)  # the same file may have moved
    trainable = True

    @classmethod
    def load(cls, cfg) -> Tokenizer:
        own = getattr(cfg, cls.name)
        key = f"data.{cls.name}.path"
        if not own.path:
            raise ConfigError(f"data.tokenizer={cls.name} needs {key}, its file; train one "
                              f"with `efflm data tokenizer {cls.name} --vocab-size 4096 "
                              f"--out tok{cls.suffix}`")
        if not os.path.isfile(own.path):
            raise DataError(f"{key}={own.path!r} does not exist; give the {cls.name} file "
                            f"(`efflm data tokenizer {cls.name}` trains one)")
        try:
            digest = file_sha256(own.path)
        except OSError as e:
            raise DataError(f"{key}={own.path!r} cannot be read ({e.strerror or e})") from None
        if own.sha256 and own.sha256 != digest:
            raise ConfigError(f"{key}={own.path!r} is not the file this config was written "
                              f"for (data.{cls.name}.sha256 {own.sha256[:12]}..., the file "
                              f"{digest[:12]}...); point {key} at the tokenizer the run "
                              "trained with")
        return _load_file(cls, own.path, digest, _options(own))

    def pin(self, cfg) -> None:
        getattr(cfg, self.name).sha256 = self.sha256

    def __init__(self, path: str, sha256: str, options: tuple):
        self.path, self.sha256, self.options = path, sha256, options
        self.fingerprint = f"{self.name}:{sha256}:{options}"

    def __reduce__(self):
        """Pickled (grain worker processes) as what to load, so library state such as
        "specials are not matched in text" comes back as set here."""
        return _load_file, (type(self), self.path, self.sha256, self.options)


def _options(settings) -> tuple:
    """A file tokenizer's settings other than where its file is (they shape its ids)."""
    return tuple(sorted((k, v) for k, v in vars(settings).items()
                        if k not in ("path", "sha256")))


@functools.lru_cache(maxsize=8)
def _load_file(cls, path: str, sha256: str, options: tuple) -> Tokenizer:
    return cls(path, sha256, options)


class TokenIds(Tokenizer):
    """The vocabulary of a source that yields token ids (no text): ids 0..vocab_size-1,
    0 the padding."""

    name = "token ids"
    pad_id = 0
    bos_id = eos_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.fingerprint = f"token ids:{vocab_size}"

    def encode(self, text: str) -> np.ndarray:
        raise DataError("this run's data are token ids, not text (its data.source "
                        "generates them): it takes no text prompt")
