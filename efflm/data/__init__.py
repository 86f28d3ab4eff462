"""The data pipeline: corpus -> tokenizer -> grain (shuffle, pack, batch, shard per host)."""

from efflm.data.pipeline import make_eval_iterator, make_train_iterator
from efflm.data.sources import SOURCES
from efflm.data.tokenizer import ByteTokenizer
from efflm.errors import DataError

TOKENIZERS = {"byte": ByteTokenizer}


def get_tokenizer(name: str):
    """A tokenizer instance by its `data.tokenizer` name."""
    if name not in TOKENIZERS:
        raise DataError(f"data.tokenizer={name!r} is not a valid choice; choose one of: "
                        f"{', '.join(sorted(TOKENIZERS))}")
    return TOKENIZERS[name]()


__all__ = ["TOKENIZERS", "SOURCES", "get_tokenizer", "make_train_iterator",
           "make_eval_iterator"]
