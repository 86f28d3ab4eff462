"""`efflm data build NAME --from PATH...`: local .txt and .jsonl files (files, folders,
globs) as a TFDS dataset in ArrayRecord files, with `train` and `validation` splits, read
back by `data.source=tfds data.tfds.name=NAME`.

The splits are those `data.source=files` makes: a .txt file is one document (its
trailing `--val-fraction` of characters held out), a .jsonl file one document per line
(its trailing fraction of lines held out). Building again with the same inputs does
nothing; with changed inputs it is an error unless `--overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

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
          overwrite: bool = False) -> dict:
    """Build (or find up to date) the dataset `name` in `data_dir` from the files
    `patterns` name; returns {"name", "path", "built", "train", "validation"}."""
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
            return {**previous["counts"], "name": name, "path": target, "built": False}
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
    return {**counts, "name": name, "path": target, "built": True}
