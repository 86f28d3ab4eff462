"""`efflm data build NAME --from PATH...`: local .txt and .jsonl files (files, folders,
globs) as a TFDS dataset in ArrayRecord files, with `train` and `validation` splits, read
back by `data.source=tfds data.tfds.name=NAME`.

The splits are those `data.source=files` makes: a .txt file is one document (its
trailing `--val-fraction` of characters held out), a .jsonl file one document per line
(its trailing fraction of lines held out). Building again with the same inputs does
nothing; with changed inputs it is an error unless `--overwrite`.

`train_tokenizer` trains a `data.tokenizer` (bpe, sentencepiece) on a training split:
`efflm data tokenizer` on any configured source, `efflm data build --tokenizer` on the
built dataset, stored beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time

from efflm.data import TOKENIZERS
from efflm.data.sources import expand_paths, file_source
from efflm.data.tfds import TfdsSettings, data_dir_of
from efflm.errors import DataError

VERSION = "1.0.0"
INPUTS_FILE = "efflm_inputs.json"  # beside the dataset's versions: what it was built from
NAME = re.compile(r"[a-zA-Z]\w*")


def fingerprint(paths: list[str], val_fraction: float) -> str:
    """A hash of the input files' names and contents and the split fraction."""
    h = hashlib.sha256(json.dumps(val_fraction).encode())
    for path in paths:
        h.update(os.path.abspath(path).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _builder_class(name: str, splits: dict):
    import tensorflow_datasets as tensorflow_datasets

    core = tensorflow_datasets.core

    class LocalCorpus(core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = core.Version(VERSION)

        def _info(self):
            text = tensorflow_datasets.features.Text()
            return core.DatasetInfo(builder=self,
                                    features=tensorflow_datasets.features.FeaturesDict(
                                        {"text": text}),
                                    description="Built by `efflm data build`.")

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(docs) for split, docs in splits.items()}

        def _generate_examples(self, docs):
            for i in range(len(docs)):
                yield i, {"text": docs[i]}

    LocalCorpus.name = name
    return LocalCorpus


def build(name: str, patterns: list[str], data_dir: str = "", val_fraction: float = 0.02,
          overwrite: bool = False, tokenizer: str = "", vocab_size: int = 0) -> dict:
    """Build (or find up to date) the dataset `name` in `data_dir` from the files
    `patterns` name; returns {"name", "path", "built", "train", "validation"}, and with
    `tokenizer`, "tokenizer": `train_tokenizer`'s result for one of `vocab_size` ids
    trained on the training split and kept in the dataset's `tokenizers/` folder
    ("trained": False where it was there already)."""
    if tokenizer:  # bad tokenizer settings fail before anything is built
        check_trainable(tokenizer, vocab_size)
    if not NAME.fullmatch(name):
        raise DataError(f"dataset name {name!r} must be a letter followed by letters, "
                        "digits or underscores (e.g. my_corpus)")
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    paths = expand_paths(patterns, "--from")
    root = data_dir_of(TfdsSettings(name=name, data_dir=data_dir))
    target, marker = os.path.join(root, name), os.path.join(root, name, INPUTS_FILE)
    digest = fingerprint(paths, val_fraction)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            previous = json.load(f)
        if previous["fingerprint"] == digest:
            result = {**previous["counts"], "name": name, "path": target, "built": False}
            return _with_tokenizer(result, tokenizer, vocab_size, patterns, val_fraction)
        if not overwrite:
            raise DataError(f"the inputs of {name!r} changed since it was built in {target!r}; "
                            "pass --overwrite to rebuild it, or choose another name")
        shutil.rmtree(target)
    elif os.path.exists(target):
        raise DataError(f"{target!r} exists and was not built by `efflm data build`; choose "
                        "another name or --data-dir")
    splits = {"train": file_source(patterns, "--from", val_fraction, "train"),
              "validation": file_source(patterns, "--from", val_fraction, "val")}
    for split, docs in splits.items():
        if not len(docs):
            raise DataError(f"--from gives no {split} documents; add files (a .jsonl file "
                            "needs two lines or more to hold one out)")
    builder = _builder_class(name, splits)(data_dir=root, file_format="array_record")
    builder.download_and_prepare()
    counts = {split: len(docs) for split, docs in splits.items()}
    tmp = marker + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"fingerprint": digest, "inputs": [os.path.abspath(p) for p in paths],
                   "val_fraction": val_fraction, "counts": counts}, f, indent=1)
    os.replace(tmp, marker)
    result = {**counts, "name": name, "path": target, "built": True}
    return _with_tokenizer(result, tokenizer, vocab_size, patterns, val_fraction)


def _tokenizer_file(tokenizer: str, vocab_size: int, target: str) -> str:
    """Where a dataset in `target` keeps its tokenizer; DataError for bad settings."""
    check_trainable(tokenizer, vocab_size)
    suffix = TOKENIZERS[tokenizer].suffix
    return os.path.join(target, "tokenizers", f"{tokenizer}_{vocab_size}{suffix}")


def _with_tokenizer(result: dict, tokenizer: str, vocab_size: int, patterns: list[str],
                    val_fraction: float) -> dict:
    if not tokenizer:
        return result
    path = _tokenizer_file(tokenizer, vocab_size, result["path"])
    if os.path.isfile(path):
        return {**result, "tokenizer": {"path": path, "trained": False}}
    docs = file_source(patterns, "--from", val_fraction, "train")
    return {**result, "tokenizer": train_tokenizer(tokenizer, docs, vocab_size, path)}


def check_trainable(name: str, vocab_size: int) -> None:
    """DataError unless `name` is a tokenizer efflm trains and `vocab_size` positive."""
    trainable = sorted(k for k, cls in TOKENIZERS.items() if cls.trainable)
    if name not in trainable:
        raise DataError(f"tokenizer {name!r} cannot be trained; choose one of: "
                        f"{', '.join(trainable)}")
    if vocab_size <= 0:
        raise DataError(f"--vocab-size must be a positive number of ids, got {vocab_size}")


def train_tokenizer(name: str, docs, vocab_size: int, path: str,
                    overwrite: bool = False) -> dict:
    """Train the tokenizer `name` of about `vocab_size` ids on the documents `docs` (a
    random-access source) and write it to `path`; returns {"path", "vocab_size",
    "documents", "bytes", "seconds", "trained": True}. An existing `path` is kept unless
    `overwrite`."""
    check_trainable(name, vocab_size)
    if os.path.isdir(path) or (os.path.exists(path) and not overwrite):
        raise DataError(f"{path!r} exists; pass --overwrite to replace it, or choose another "
                        "--out")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the folder of {path!r} ({e.strerror or e})") from None
    size = [0]

    def texts():
        for i in range(len(docs)):
            text = docs[i]
            size[0] += len(text.encode("utf-8", errors="replace"))
            yield text

    start = time.perf_counter()
    try:
        vocab = TOKENIZERS[name].train(texts(), vocab_size, path)
    except OSError as e:
        raise DataError(f"cannot write {path!r} ({e.strerror or e})") from None
    return {"path": path, "vocab_size": vocab, "documents": len(docs), "bytes": size[0],
            "seconds": time.perf_counter() - start, "trained": True}
