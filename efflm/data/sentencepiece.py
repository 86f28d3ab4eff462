"""`data.tokenizer=sentencepiece`: a SentencePiece model file ("SentencePiece: A simple
and language independent subword tokenizer and detokenizer for Neural Text
Processing").

A model may normalise text (NFKC, collapsed spaces) and adds a dummy-prefix space, so a
piece's spelling is not the text it came from: each token's byte count comes from the
offsets SentencePiece reports into the original text (`counts_from_starts`), and bits
per byte stay exact. Pad, bos and eos are the model's own ids where it has them, else
ids after its pieces.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from efflm.data.tokenizer import FileTokenizer, counts_from_starts, utf8_text
from efflm.errors import DataError

# How `efflm data tokenizer sentencepiece` trains (Llama's choices): BPE pieces, unknown
# characters as their bytes, text kept as it is (no normalisation, spaces not
# collapsed: indentation survives), runs of spaces as pieces, digits one by one.
TRAINING = dict(model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                remove_extra_whitespaces=False, add_dummy_prefix=True,
                allow_whitespace_only_pieces=True, split_digits=True, pad_id=0, unk_id=1,
                bos_id=2, eos_id=3, input_sentence_size=2_000_000,
                shuffle_input_sentence=True, max_sentence_length=1 << 16, minloglevel=2)


@dataclass
class SentencepieceSettings:
    """`data.sentencepiece`: the model file (`efflm data tokenizer sentencepiece`
    trains one)."""

    path: str = ""
    sha256: str = ""  # the file's, filled in at load; a resume and eval check it


def _pieces(sp, text: str):
    """The pieces of `text` with their ids and byte offsets."""
    try:
        return sp.encode(text, return_type="proto").pieces
    except (TypeError, ValueError):  # sentencepiece < 0.2.1 names it differently
        return sp.encode(text, out_type="immutable_proto").pieces


class Sentencepiece(FileTokenizer):
    name = "sentencepiece"
    settings = SentencepieceSettings
    suffix = ".model"

    def __init__(self, path: str, sha256: str, options: tuple):
        super().__init__(path, sha256, options)
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(model_file=path)
        except (RuntimeError, OSError) as e:
            raise DataError(f"data.sentencepiece.path={path!r} is not a SentencePiece model "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                            ) from None
        self.pieces = self.sp.get_piece_size()
        extra = self.pieces
        for role, own in (("pad", self.sp.pad_id()), ("bos", self.sp.bos_id()),
                          ("eos", self.sp.eos_id())):
            if own < 0:  # the model has none: one more id
                own, extra = extra, extra + 1
            setattr(self, f"{role}_id", own)
        self.vocab_size = extra

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(utf8_text(text)), np.int32)

    def encode_counted(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        text = utf8_text(text)
        pieces = _pieces(self.sp, text)
        ids = np.fromiter((p.id for p in pieces), np.int32, len(pieces))
        starts = np.fromiter((p.begin for p in pieces), np.int64, len(pieces))
        return ids, counts_from_starts(starts, len(text.encode("utf-8")))

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        return self.sp.decode(ids[(ids >= 0) & (ids < self.pieces)].tolist())

    @staticmethod
    def train(texts, vocab_size: int, path: str) -> int:
        import io

        import sentencepiece

        def lines():  # SentencePiece trains on sentences: a document's lines
            for text in texts:
                yield from (line for line in utf8_text(text).splitlines() if line.strip())

        model = io.BytesIO()
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size,
                num_threads=os.cpu_count() or 1, **TRAINING)
        except RuntimeError as e:
            raise DataError(f"SentencePiece cannot train {vocab_size} pieces on this text: "
                            f"{str(e).splitlines()[0]}") from None
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(model.getvalue())
        os.replace(tmp, path)
        return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue()
                                                    ).get_piece_size()
