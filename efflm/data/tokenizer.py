"""Tokenizers: text <-> int32 token ids."""

from __future__ import annotations

import numpy as np

from efflm.errors import DataError


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus pad, bos and eos specials above them."""

    name = "byte"
    settings = None  # its own settings (`data.<name>.*`), a dataclass; None: none
    resumable = ()  # fields of `settings` that a resumed run may change
    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of `text` as int32 ids, without specials."""
        data = text.encode("utf-8", errors="replace")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """Text of the byte ids in `ids`; specials and other ids >= 256 are dropped."""
        ids = np.asarray(ids).reshape(-1)
        ids = ids[(ids >= 0) & (ids < 256)]
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        """How many bytes of text each id stands for (for bits per byte)."""
        lengths = np.zeros(self.vocab_size, np.int32)
        lengths[:256] = 1
        return lengths


class TokenIds:
    """The vocabulary of a source that yields token ids (no text): ids 0..vocab_size-1,
    0 the padding."""

    name = "token ids"
    pad_id = 0
    bos_id = eos_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> np.ndarray:
        raise DataError("this run's data are token ids, not text (its data.source "
                        "generates them): it takes no text prompt")

    def token_byte_lengths(self) -> None:
        """None: token ids stand for no text, so bits per byte do not apply."""
        return None
