"""The data pipeline: corpus -> tokenizer -> grain (shuffle, pack, batch, shard per host)."""

from efflm.data.base import IGNORE
from efflm.data.bpe import Bpe
from efflm.data.pipeline import make_eval_iterator, make_train_iterator
from efflm.data.sentencepiece import Sentencepiece
from efflm.data.sources import SOURCES
from efflm.data.tokenizer import ByteTokenizer
from efflm.errors import DataError

TOKENIZERS = {"byte": ByteTokenizer, "bpe": Bpe, "sentencepiece": Sentencepiece}


def get_tokenizer(cfg):
    """The `data.tokenizer` of a data config (its `data` section)."""
    if cfg.tokenizer not in TOKENIZERS:
        raise DataError(f"data.tokenizer={cfg.tokenizer!r} is not a valid choice; choose "
                        f"one of: {', '.join(sorted(TOKENIZERS))}")
    return TOKENIZERS[cfg.tokenizer].load(cfg)


def data_tokenizer(cfg):
    """The tokenizer of a data config (its `data` section): the source's own token ids
    where it yields them (`DataSource.tokenizer`), else `data.tokenizer`."""
    own = SOURCES[cfg.source].tokenizer(cfg) if cfg.source in SOURCES else None
    return own if own is not None else get_tokenizer(cfg)


__all__ = ["IGNORE", "TOKENIZERS", "SOURCES", "data_tokenizer", "get_tokenizer",
           "make_train_iterator", "make_eval_iterator"]
