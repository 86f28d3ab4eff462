"""Tests for efflm.data: tokenizer, sources, packing, resume, sharding, errors."""

import collections
import json
import random

import numpy as np
import pytest

from efflm.config import DataConfig
from efflm.data import (
    SOURCES,
    TOKENIZERS,
    get_tokenizer,
    make_eval_iterator,
    make_train_iterator,
    pipeline,
)
from efflm.data.sources import FilesSettings, is_validation, make_source, pycode_files
from efflm.data.tokenizer import ByteTokenizer
from efflm.errors import DataError

TOK = ByteTokenizer()
PAD, BOS, EOS = 256, 257, 258
KEYS = ("inputs", "targets", "segment_ids", "positions")


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def files_cfg(paths, val_paths=(), **kw):
    files = FilesSettings(paths=[str(p) for p in paths], val_paths=[str(p) for p in val_paths])
    return DataConfig(source="files", files=files, **kw)


def random_texts(n, seed, max_len=120):
    rng = random.Random(seed)
    alphabet = "abcdefghij klmnop\nqrs()=:é漢🙂"
    return [f"doc{i}:" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(max_len)))
            for i in range(n)]


def reference_examples(text, seq_len):
    """The spec, written out: [bos]+bytes+[eos] cut into overlapping chunks of seq_len+1."""
    tokens = [BOS] + list(text.encode("utf-8")) + [EOS]
    out = []
    for i in range(len(tokens)):
        chunk = tokens[i * seq_len:i * seq_len + seq_len + 1]
        if len(chunk) < 2:
            break
        out.append((tuple(chunk[:-1]), tuple(chunk[1:])))
    return out


def row_examples(batch):
    """(inputs, targets) of every example in a batch, after checking the row invariants."""
    out = []
    for inp, tgt, seg, pos in zip(*(batch[k] for k in KEYS)):
        pad = seg == 0
        assert (inp[pad] == PAD).all() and (tgt[pad] == PAD).all() and (pos[pad] == 0).all()
        assert (inp[~pad] < PAD + 3).all()
        ids = seg[~pad]
        # Segments are contiguous and numbered 1, 2, ... in order; padding only at the end.
        assert (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all()
        if len(ids):
            assert ids[0] == 1 and not pad[:len(ids)].any()
        for s in np.unique(ids):
            where = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(pos[where], np.arange(len(where)))
            x, y = inp[where], tgt[where]
            # Each target is the next input within the segment (the last is the chunk's end).
            np.testing.assert_array_equal(y[:-1], x[1:])
            out.append((tuple(x.tolist()), tuple(y.tolist())))
    return out


# --- tokenizer -----------------------------------------------------------------------


def test_tokenizer_round_trip_and_specials():
    tok = get_tokenizer(DataConfig())
    assert set(TOKENIZERS) == {"byte", "bpe", "sentencepiece"} and tok.vocab_size == 259
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD, BOS, EOS)
    text = "héllo wörld — 日本語 🙂\n\tdef f(x): return x"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.tolist() == list(text.encode("utf-8"))
    assert tok.encode("é").tolist() == [0xC3, 0xA9]
    assert tok.decode(ids) == text
    assert tok.decode([BOS, 104, 105, EOS, PAD, 300]) == "hi"
    assert tok.decode(np.array([[104], [105]])) == "hi"
    assert tok.decode([0xC3]) == "\ufffd"
    assert tok.encode("").shape == (0,)


def test_unknown_tokenizer():
    with pytest.raises(DataError, match="data.tokenizer='wordpiece'.*byte"):
        get_tokenizer(DataConfig(tokenizer="wordpiece"))


# --- sources ---------------------------------------------------------------------------


def test_pycode_split_by_file_deterministic_disjoint():
    assert set(SOURCES) == {"pycode", "files", "mqar", "tfds", "mixture"}
    root, names = pycode_files()
    assert len(names) > 100 and list(names) == sorted(names)
    assert all(n.endswith(".py") for n in names)
    assert not any("site-packages" in n or "dist-packages" in n for n in names)
    assert "os.py" in names and "json/__init__.py" in names
    cfg = DataConfig(source="pycode", val_fraction=0.02)
    train, val = make_source(cfg, "train"), make_source(cfg, "val")
    assert len(val) > 0 and len(train) > 0
    assert set(train.names).isdisjoint(val.names)
    assert sorted(train.names + val.names) == sorted(names)
    assert 0.002 < len(val) / len(names) < 0.06
    # The split depends on the file's name only, not on the order of files.
    shuffled = list(names)
    random.Random(0).shuffle(shuffled)
    assert {n for n in shuffled if is_validation(n, 0.02)} == set(val.names)
    assert make_source(cfg, "val").names == val.names
    assert is_validation("os.py", 0.999999) and not is_validation("os.py", 1e-12)
    # Documents are the files' text, read on demand.
    i = train.names.index("os.py") if "os.py" in train.names else None
    src, i = (train, i) if i is not None else (val, val.names.index("os.py"))
    assert "def makedirs(" in src[i]


def test_text_and_jsonl_val_fraction(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("0123456789" * 10, encoding="utf-8")
    jl = write_jsonl(tmp_path / "b.jsonl", [f"line {i}" for i in range(10)])
    (tmp_path / "c.jsonl").write_text('\n{"text": "only"}\n\n', encoding="utf-8")
    cfg = files_cfg([txt, jl, tmp_path / "c.jsonl"], val_fraction=0.2)
    train, val = make_source(cfg, "train"), make_source(cfg, "val")
    assert [train[i] for i in range(len(train))] == (
        ["0123456789" * 8] + [f"line {i}" for i in range(8)] + ["only"])
    assert [val[i] for i in range(len(val))] == ["0123456789" * 2, "line 8", "line 9"]
    with pytest.raises(IndexError):
        train[len(train)]


def test_val_paths_dirs_and_globs(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "corpus" / "sub" / "a.txt").write_text("ä", encoding="utf-8")
    (tmp_path / "corpus" / ".hidden").write_text("no", encoding="utf-8")
    write_jsonl(tmp_path / "v1.jsonl", ["val one", "val two"])
    write_jsonl(tmp_path / "v2.jsonl", ["val three"])
    cfg = files_cfg([tmp_path / "corpus"], val_paths=[str(tmp_path / "v*.jsonl")])
    train, val = make_source(cfg, "train"), make_source(cfg, "val")
    assert [train[i] for i in range(len(train))] == ["bee", "ä"]
    assert [val[i] for i in range(len(val))] == ["val one", "val two", "val three"]


def test_data_errors(tmp_path):
    missing = str(tmp_path / "x.txt")
    with pytest.raises(DataError, match=r"data.files.paths: '.*x.txt' does not exist"):
        make_source(files_cfg([missing]), "train")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.txt' is empty"):
        make_source(files_cfg([empty]), "train")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(DataError, match="blank.jsonl' has no documents"):
        make_source(files_cfg([blank]), "train")
    for bad in ['{"text": "ok"}\nnot json\n', '{"text": "ok"}\n[1, 2]\n',
                '{"text": "ok"}\n{"text": 5}\n', '{"text": "ok"}\n{"txt": "a"}\n']:
        path = tmp_path / "bad.jsonl"
        path.write_text(bad)
        with pytest.raises(DataError, match=r"bad.jsonl' line 2 is not a JSON object"):
            make_source(files_cfg([path]), "train")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="directory .*nothing' has no files"):
        make_source(files_cfg([tmp_path / "nothing"]), "train")
    with pytest.raises(DataError, match="matches no files"):
        make_source(files_cfg([tmp_path / "*.parquet"]), "train")
    with pytest.raises(DataError, match=r"data.files.val_paths: '.*v.txt' does not exist"):
        make_source(files_cfg([empty], val_paths=[str(tmp_path / "v.txt")]), "val")
    with pytest.raises(DataError, match="needs data.files.paths"):
        make_source(DataConfig(source="files"), "train")
    one = write_jsonl(tmp_path / "one.jsonl", ["single"])
    with pytest.raises(DataError, match="no validation documents"):
        make_source(files_cfg([one]), "val")
    with pytest.raises(DataError, match="not divisible by the number of processes"):
        make_train_iterator(files_cfg([one]), TOK, global_batch=3, seed=0, process_count=2)
    with pytest.raises(DataError, match="not divisible by the number of processes"):
        make_eval_iterator(files_cfg([one]), TOK, global_batch=5, process_count=2)


# --- packing ---------------------------------------------------------------------------


def test_eval_packs_every_document_once(tmp_path):
    texts = random_texts(40, seed=1)
    val = write_jsonl(tmp_path / "val.jsonl", texts)
    cfg = files_cfg([val], val_paths=[val], seq_len=32)
    batches = list(make_eval_iterator(cfg, TOK, global_batch=4))
    for b in batches:
        assert set(b) == {*KEYS, "target_bytes"}
        assert all(b[k].dtype == np.int32 and b[k].shape == (4, 32) for k in KEYS)
    found = [ex for b in batches for ex in row_examples(b)]
    expected = [ex for t in texts for ex in reference_examples(t, 32)]
    assert collections.Counter(found) == collections.Counter(expected)
    # Every document's text comes back from its examples, and nothing else is in the rows.
    firsts = {bytes(x[1:]).decode("utf-8", "ignore").split(":")[0] for x, _ in found
              if x[0] == BOS}
    assert firsts == {f"doc{i}" for i in range(40)}
    real = sum(len(x) for x, _ in expected)
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == real


def test_eval_pads_the_last_batch_with_empty_rows(tmp_path):
    path, texts = one_row_docs(tmp_path, 6, seq_len=16)
    cfg = files_cfg([path], val_paths=[path], seq_len=16)
    batches = list(make_eval_iterator(cfg, TOK, global_batch=4))
    assert len(batches) == 2
    assert [i for b in batches for i in doc_ids(b)] == [f"{i:03d}" for i in range(6)]
    last = batches[-1]
    assert (last["segment_ids"][:2] == 1).all() and (last["segment_ids"][2:] == 0).all()
    assert (last["inputs"][2:] == PAD).all() and (last["targets"][2:] == PAD).all()
    assert (last["positions"][2:] == 0).all()
    np.testing.assert_array_equal(last["positions"][1], np.arange(16))
    np.testing.assert_array_equal(last["inputs"][1], [BOS] + list(texts[5].encode()))
    np.testing.assert_array_equal(last["targets"][1], list(texts[5].encode()) + [EOS])


def test_eval_is_deterministic_finite_and_sharded(tmp_path):
    val = write_jsonl(tmp_path / "val.jsonl", random_texts(30, seed=2))
    cfg = files_cfg([val], val_paths=[val], seq_len=16)
    whole = list(make_eval_iterator(cfg, TOK, global_batch=6))
    again = list(make_eval_iterator(cfg, TOK, global_batch=6))
    assert len(whole) == len(again) > 2
    parts = [list(make_eval_iterator(cfg, TOK, global_batch=6, process_index=p,
                                     process_count=2)) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for w, a, p0, p1 in zip(whole, again, *parts):
        for k in KEYS:
            np.testing.assert_array_equal(w[k], a[k])
            assert p0[k].shape == p1[k].shape == (3, 16)
            np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), w[k])


def test_eval_sample_is_fixed_and_drawn_from_the_whole_split(tmp_path):
    texts = random_texts(60, seed=7, max_len=100)
    val = write_jsonl(tmp_path / "val.jsonl", texts)
    cfg = files_cfg([val], val_paths=[val], seq_len=16)
    everything = [ex for t in texts for ex in reference_examples(t, 16)]
    first = [ex for b in list(make_eval_iterator(cfg, TOK, global_batch=4))[:3]
             for ex in row_examples(b)]
    sample = list(make_eval_iterator(cfg, TOK, global_batch=4, num_batches=3))
    found = [ex for b in sample for ex in row_examples(b)]
    assert 0 < len(sample) <= 3 and len(found) >= 12
    assert not collections.Counter(found) - collections.Counter(everything)  # a subset
    # Not the first batches in file order: documents from all over the split.
    docs = {i for i, t in enumerate(texts) for ex in reference_examples(t, 16) if ex in found}
    assert set(found) != set(first) and max(docs) - min(docs) > 30
    assert_same_batches(list(make_eval_iterator(cfg, TOK, global_batch=4, num_batches=3)),
                        sample)
    parts = [list(make_eval_iterator(cfg, TOK, global_batch=4, num_batches=3,
                                     process_index=p, process_count=2)) for p in range(2)]
    for w, p0, p1 in zip(sample, *parts):
        for k in KEYS:
            np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), w[k])
    # A sample as large as the split is the whole split.
    whole = [ex for b in make_eval_iterator(cfg, TOK, global_batch=4, num_batches=10**4)
             for ex in row_examples(b)]
    assert collections.Counter(whole) == collections.Counter(everything)


def test_train_batches_have_the_right_examples(tmp_path):
    texts = random_texts(25, seed=3, max_len=300)
    path = write_jsonl(tmp_path / "train.jsonl", texts)
    cfg = files_cfg([path], seq_len=24, val_fraction=0.1)
    train_texts = texts[:len(texts) - 2]  # the last 10% of lines are validation
    expected = {ex for t in train_texts for ex in reference_examples(t, 24)}
    it = make_train_iterator(cfg, TOK, global_batch=4, seed=0)
    found = [ex for _ in range(150) for ex in row_examples(next(it))]
    assert set(found) == expected  # 150 batches are about 4 epochs: every example seen
    same = make_train_iterator(cfg, TOK, global_batch=4, seed=0)
    other = make_train_iterator(cfg, TOK, global_batch=4, seed=1)
    a, b, c = (next(x) for x in (make_train_iterator(cfg, TOK, global_batch=4, seed=0),
                                 same, other))
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(a["inputs"], c["inputs"])


def one_row_docs(tmp_path, n, seq_len):
    """n documents of seq_len - 1 bytes: each gives exactly one full row."""
    texts = [f"{i:03d}".ljust(seq_len - 1, "x") for i in range(n)]
    return write_jsonl(tmp_path / "rows.jsonl", texts), texts


def doc_ids(batch):
    return [bytes(row[1:4].tolist()).decode() for row, seg in
            zip(batch["inputs"], batch["segment_ids"]) if seg[0]]


def test_train_reshuffles_each_epoch(tmp_path, monkeypatch):
    path, _ = one_row_docs(tmp_path, 12, seq_len=16)
    monkeypatch.setattr(pipeline, "SHUFFLE_WINDOW_TOKENS", 16 * 12)  # window: one epoch
    cfg = files_cfg([path], val_paths=[path], seq_len=16)
    it = make_train_iterator(cfg, TOK, global_batch=4, seed=0)
    ids = [i for _ in range(9) for i in doc_ids(next(it))]
    epochs = [ids[0:12], ids[12:24], ids[24:36]]
    for e in epochs:
        assert sorted(e) == [f"{i:03d}" for i in range(12)]
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert epochs[0] != sorted(epochs[0])


def test_two_processes_read_disjoint_documents(tmp_path, monkeypatch):
    path, _ = one_row_docs(tmp_path, 16, seq_len=16)
    monkeypatch.setattr(pipeline, "SHUFFLE_WINDOW_TOKENS", 16 * 8)  # window: 8 examples
    cfg = files_cfg([path], val_paths=[path], seq_len=16)
    its = [make_train_iterator(cfg, TOK, global_batch=4, seed=5, process_index=p,
                               process_count=2) for p in range(2)]
    seen = [[], []]
    for _ in range(4):  # 4 global batches of 4 rows: one epoch
        for p, it in enumerate(its):
            batch = next(it)
            assert all(batch[k].shape == (2, 16) for k in KEYS)
            seen[p] += doc_ids(batch)
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"{i:03d}" for i in range(16)]


# --- resume ----------------------------------------------------------------------------


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k])


def test_resume_is_bitwise_exact_after_json(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", random_texts(20, seed=4, max_len=200))
    cfg = files_cfg([path], seq_len=16)
    a = make_train_iterator(cfg, TOK, global_batch=4, seed=7)
    for _ in range(3):
        next(a)
    state = json.loads(json.dumps(a.get_state()))
    after = [next(a) for _ in range(3)]
    b = make_train_iterator(cfg, TOK, global_batch=4, seed=7)
    b.set_state(state)
    assert_same_batches([next(b) for _ in range(3)], after)
    fresh = make_train_iterator(cfg, TOK, global_batch=4, seed=7)
    assert not np.array_equal(next(fresh)["inputs"], after[0]["inputs"])


def test_resume_across_windows_and_epochs(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "SHUFFLE_WINDOW_TOKENS", 16 * 7)  # 7-example windows
    path = write_jsonl(tmp_path / "t.jsonl", random_texts(9, seed=5, max_len=60))
    cfg = files_cfg([path], seq_len=16)
    a = make_train_iterator(cfg, TOK, global_batch=2, seed=1)
    states, batches = [], []
    for _ in range(40):
        states.append(json.loads(json.dumps(a.get_state())))
        batches.append(next(a))
    for k in range(0, 36, 5):
        b = make_train_iterator(cfg, TOK, global_batch=2, seed=1)
        b.set_state(states[k])
        assert_same_batches([next(b) for _ in range(4)], batches[k:k + 4])


def test_resume_refuses_other_settings(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", random_texts(5, seed=6))
    cfg = files_cfg([path], seq_len=16)
    state = make_train_iterator(cfg, TOK, global_batch=4, seed=0).get_state()
    other = make_train_iterator(cfg, TOK, global_batch=4, seed=1)
    with pytest.raises(DataError, match="seed: saved 0, now 1"):
        other.set_state(state)


def test_pycode_train_batch():
    cfg = DataConfig(source="pycode", seq_len=64)
    it = make_train_iterator(cfg, TOK, global_batch=4, seed=0)
    batch = next(it)
    assert all(batch[k].shape == (4, 64) and batch[k].dtype == np.int32 for k in KEYS)
    assert (batch["segment_ids"] > 0).mean() > 0.9
    row_examples(batch)
