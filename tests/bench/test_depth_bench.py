"""`efflm bench depth`: the decoding cache per token of each caching variant (what the
README states for `tiny`, `tiny_mor`), and bad row keys."""

import pytest

from efflm.bench.depth import VARIANTS, cache_bytes_per_token, main
from efflm.config import load_config


def test_decode_cache_per_token_of_each_caching_variant():
    """Dense tiny: 4 layers of keys and values (256 float32 each) and a valid flag;
    tiny_mor: first, last and a cache per recursion (3), or the first recursion's only
    under kv=shared, whatever the router."""
    layer = 2 * 256 * 4 + 1
    kib = {k: cache_bytes_per_token(load_config(VARIANTS[k][1], VARIANTS[k][2]))
           for k in ("dense", "mor", "mor-kv", "mor-token-kv")}
    assert kib == {"dense": 4 * layer, "mor": 5 * layer, "mor-kv": 3 * layer,
                   "mor-token-kv": 3 * layer}
    assert [round(kib[k] / 1024) for k in ("dense", "mor", "mor-kv")] == [8, 10, 6]


@pytest.mark.parametrize("args, words", [
    (["--variants", "dense,mor-tok"], "did you mean 'mor-token'"),
    (["--variants", "dense", "--train", "mor"], "--train mor not among --variants"),
])
def test_bad_rows_exit_2_with_one_line(capsys, args, words):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and err.strip().splitlines()[-1].count(words)
