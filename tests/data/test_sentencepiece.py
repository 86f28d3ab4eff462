"""SentencePiece (`efflm/data/sentencepiece.py`): a trained model round trips text it does
not normalise; byte counts come from the offsets into the original text, so they stay
exact under a normalising model; specials a model lacks get ids after its pieces."""

import io

import numpy as np
import pytest
import sentencepiece
from test_bpe import TEXTS, corpus

from efflm.config import DataConfig
from efflm.data import get_tokenizer
from efflm.data.sentencepiece import TRAINING, Sentencepiece, SentencepieceSettings
from efflm.data.tokenizer import counts_from_starts
from efflm.errors import DataError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Paths of: efflm's trained model; one that normalises (NFKC, collapsed spaces) and
    has no pad id."""
    root = tmp_path_factory.mktemp("spm")
    ours = str(root / "ours.model")
    assert Sentencepiece.train(corpus(), 400, ours) == 400
    model = io.BytesIO()
    settings = {**TRAINING, "normalization_rule_name": "nmt_nfkc",
                "remove_extra_whitespaces": True, "pad_id": -1, "unk_id": 0, "bos_id": 1,
                "eos_id": 2}
    lines = (line for text in corpus() for line in text.splitlines() if line.strip())
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model,
                                             vocab_size=400, num_threads=1, **settings)
    normalising = root / "nfkc.model"
    normalising.write_bytes(model.getvalue())
    return ours, str(normalising)


def load(path):
    return get_tokenizer(DataConfig(tokenizer="sentencepiece",
                                    sentencepiece=SentencepieceSettings(path=path)))


def test_round_trip_on_text_it_does_not_normalise(models):
    tok = load(models[0])
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 3, 400)
    for text in [t for t in TEXTS if "\x00" not in t]:
        ids, counts = tok.encode_counted(text)
        assert tok.decode(ids) == text
        np.testing.assert_array_equal(tok.encode(text), ids)
        assert counts.sum() == len(text.encode("utf-8")) and (counts >= 0).all()
    # Known pieces: the dummy prefix joins the first space, and a character outside the
    # pieces falls back to its bytes, counted once (on its last byte piece).
    ids, counts = tok.encode_counted(" Ω")
    assert [tok.sp.id_to_piece(int(i)) for i in ids] == ["▁▁", "<0xCE>", "<0xA9>"]
    assert counts.tolist() == [1, 0, 2]
    # Trained on lines, it has no newline piece: a newline is its byte.
    assert [tok.sp.id_to_piece(int(i)) for i in tok.encode("\n")] == ["▁", "<0x0A>"]


def test_counts_exact_under_a_normalising_model(models):
    """NFKC turns 'ﬁ' (3 bytes) into 'fi' and spaces collapse: pieces spell other bytes
    than the text has, and the counts still add up to the text's bytes."""
    tok = load(models[1])
    assert tok.pad_id == tok.sp.get_piece_size() == 400 and tok.vocab_size == 401
    for text in ["ﬁx   the  ＡＢＣ   ", "  für\u3000x", "ﬁﬁﬁ"]:
        ids, counts = tok.encode_counted(text)
        spelled = sum(len(tok.sp.id_to_piece(int(i)).replace("▁", " ").encode()) for i in ids)
        assert spelled != len(text.encode("utf-8"))
        assert counts.sum() == len(text.encode("utf-8")) and (counts >= 0).all()
    ids, counts = tok.encode_counted("ﬁ")  # one character, 3 bytes, spelled "▁fi" or so
    assert counts.sum() == 3 and counts[0] == 3 - counts[1:].sum()
    # Spaces it removes whole leave no token: a document's eos carries their bytes.
    from efflm.data.pipeline import encode_document

    assert len(tok.encode("   ")) == 0
    doc = encode_document(tok, "   ", counted=True)
    assert doc["tokens"].tolist() == [tok.bos_id, tok.eos_id] and doc["bytes"].tolist() == [
        0, 3]


def test_counts_from_starts_on_known_offsets():
    np.testing.assert_array_equal(counts_from_starts([0, 0, 3, 3, 7], 9), [0, 3, 0, 4, 2])
    # A first piece starting after 0 still covers from 0; offsets that go back are held.
    np.testing.assert_array_equal(counts_from_starts([2, 5, 3], 6), [5, 0, 1])
    assert counts_from_starts([], 0).shape == (0,)


def test_a_file_that_is_no_model_is_refused(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="is not a SentencePiece model"):
        load(str(bad))


def test_too_many_pieces_for_the_text_is_one_error(tmp_path):
    with pytest.raises(DataError, match="SentencePiece cannot train 100000 pieces"):
        Sentencepiece.train(corpus(3), 100_000, str(tmp_path / "t.model"))
    assert not list(tmp_path.iterdir())
