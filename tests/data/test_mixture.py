"""Mixtures of sources (`efflm/data/mixture.py`): the proportions of the training
examples, a resumed position, validation per source and combined, and the entries it
refuses."""

import json
import os

import numpy as np
import pytest
from conftest import SMALL

from efflm.cli import main
from efflm.config import DataConfig
from efflm.data import make_train_iterator
from efflm.data.build import build
from efflm.data.mixture import MixtureSettings
from efflm.data.sources import FilesSettings
from efflm.data.tfds import TfdsSettings
from efflm.data.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(files folder of 'a' text, TFDS data dir of 'b' text): 40 documents each."""
    root = tmp_path_factory.mktemp("mix")
    for letter in "ab":
        (root / letter).mkdir()
        for i in range(40):
            (root / letter / f"{i}.txt").write_text(letter * (50 + 7 * i), encoding="utf-8")
    build("bees", [str(root / "b")], str(root / "tfds"), val_fraction=0.1)
    return str(root / "a"), str(root / "tfds")


def _cfg(sources, weights=("files:1", "tfds:3")):
    files, data_dir = sources
    return DataConfig(source="mixture", seq_len=32,
                      files=FilesSettings(paths=[files]),
                      tfds=TfdsSettings(name="bees", data_dir=data_dir),
                      mixture=MixtureSettings(sources=list(weights)))


def _share_of_a(batches):
    targets = np.concatenate([b["targets"][b["segment_ids"] > 0] for b in batches])
    a, b = np.sum(targets == ord("a")), np.sum(targets == ord("b"))
    return a / (a + b)


def test_examples_follow_the_weights_and_resume(sources):
    it = make_train_iterator(_cfg(sources), ByteTokenizer(), global_batch=8, seed=0)
    batches = [next(it) for _ in range(30)]
    assert abs(_share_of_a(batches) - 0.25) < 0.03  # files:1 against tfds:3
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    again = make_train_iterator(_cfg(sources), ByteTokenizer(), global_batch=8, seed=0)
    again.set_state(state)
    for want in expected:
        got = next(again)
        assert all((got[k] == want[k]).all() for k in want)
    even = make_train_iterator(_cfg(sources, ("files:1", "tfds:1")), ByteTokenizer(),
                               global_batch=8, seed=0)
    assert abs(_share_of_a([next(even) for _ in range(30)]) - 0.5) < 0.03


def test_a_run_evaluates_each_source_and_all_together(sources, tmp_path, capsys):
    files, data_dir = sources
    args = ["data.source=mixture", "data.mixture.sources=[files:1,tfds:3]",
            f"data.files.paths=[{files}]", "data.tfds.name=bees",
            f"data.tfds.data_dir={data_dir}"]
    assert main(["train", "--config", "tiny", *SMALL, *args, "train.steps=2",
                 "train.eval_every=2", f"train.workdir={tmp_path}"]) == 0
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        row = json.loads(f.readlines()[-1])
    for prefix in ("eval_", "eval_files_", "eval_tfds_"):
        assert row[prefix + "loss"] > 0 and row[prefix + "bits_per_byte"] > 0, row
    # The combined numbers are over both splits' tokens together.
    total = row["eval_files_tokens"] + row["eval_tfds_tokens"]
    assert row["eval_tokens"] <= total
    # A mixed source's own settings are checked on resume, as the mixture's are.
    capsys.readouterr()
    assert main(["train", "--config", "tiny", *SMALL, *args, "data.tfds.val_split=train",
                 "train.steps=3", f"train.workdir={tmp_path}"]) == 2
    assert "data.tfds.val_split" in capsys.readouterr().err


@pytest.mark.parametrize("entries, words", [
    ("[pycode:0.3,files:0]", "positive weight"),
    ("[pycode:0.3,files]", "positive weight"),
    ("[pycode:1,nowhere:1]", "'nowhere' is not a source of text"),
    ("[pycode:1,mixture:1]", "'mixture' is not a source of text"),
    ("[pycode:1,mqar:1]", "yields token ids"),
    ("[pycode:1]", "needs two sources or more"),
    ("[pycode:1,pycode:2]", "names pycode twice"),
])
def test_bad_entries_are_one_line_exit_2(tmp_path, capsys, entries, words):
    assert main(["train", "--config", "tiny", *SMALL, "data.source=mixture",
                 f"data.mixture.sources={entries}", "data.files.paths=[x.txt]",
                 f"train.workdir={tmp_path}/w"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
