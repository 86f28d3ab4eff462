"""The kernel benchmarks (`efflm bench flash_attention|grouped_matmul|linear_attention`,
timed, and `fused_cross_entropy`) at the tiniest shapes.

On CPU the Pallas kernels run interpreted and cuDNN is not available: the tables must
say so, and every other cell must hold a measured, positive number.
"""

import jax
import pytest

from efflm import cli
from efflm.bench import kernels

GPU = jax.default_backend() == "gpu"
TIMING = ["--runs", "1", "--warmup", "1"]


def _rows(path) -> list[list[str]]:
    """Body rows of the markdown table in `path`, as lists of cells."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    assert lines[1].startswith("|---")
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def _positive(cell: str, interpret: bool = False) -> float:
    """The leading number of a measured cell; checks the interpret mark."""
    assert not cell.startswith("n/a"), cell
    assert cell.endswith(" interpret") == interpret, cell
    value = float(cell.split()[0].rstrip("x"))
    assert value > 0, cell
    return value


def test_flash_attention_table(tmp_path):
    out = tmp_path / "flash_attention.md"
    assert kernels.main(["flash_attention", "--seqs", "64", "--head-dims", "32", "--tokens",
                         "128", "--width", "64", "--peak-n", "64", *TIMING,
                         "--out", str(out)]) == 0
    text = out.read_text()
    assert "efflm bench flash_attention" in text and "3.5x the forward matmul FLOPs" in text
    (row,) = _rows(out)
    head_dim, seq, shape, gflop, ours, xla, cudnn, mha = row
    assert (head_dim, seq, shape) == ("32", "64", "2 x 2 (2)")
    assert float(gflop) == pytest.approx(kernels.attention_flops(2, 2, 64, 32) / 1e9, rel=1e-3)
    for cell, interpreted in ((ours, not GPU), (xla, False), (mha, not GPU)):
        _positive(cell, interpreted)
        assert "%)" in cell  # fraction of the measured matmul peak
    if not GPU:
        assert cudnn.startswith("n/a: cuDNN needs a GPU")


def test_flash_attention_grouped_heads_skip_mha(tmp_path):
    out = tmp_path / "flash_attention.md"
    kernels.main(["flash_attention", "--seqs", "32", "--head-dims", "16", "--tokens", "32",
                  "--width", "32", "--group", "2", "--impls", "mha", "--peak-n", "32",
                  *TIMING, "--out", str(out)])
    gflop = f"{kernels.attention_flops(1, 2, 32, 16) / 1e9:.4g}"
    assert _rows(out) == [["16", "32", "1 x 2 (1)", gflop,
                           "n/a: jax's Pallas mha takes no grouped K/V heads"]]


def test_grouped_matmul_table(tmp_path):
    out = tmp_path / "grouped_matmul.md"
    assert kernels.main(["grouped_matmul", "--tokens", "64", "--d-models", "32", "--ffn", "32",
                         "--experts", "2", "--peak-n", "64", *TIMING, "--out", str(out)]) == 0
    (row,) = _rows(out)
    tokens, shape, experts, *cells = row
    assert (tokens, shape) == ("64", "32 x 32")
    assert experts.startswith("2 (")
    low, high = map(int, experts[3:-1].split("-"))
    assert 0 <= low <= high <= 64 and low + high == 64
    for i in (0, 3):  # forward, then forward+backward: ours, ragged_dot, speed-up
        _positive(cells[i], interpret=not GPU)
        _positive(cells[i + 1])
        assert cells[i + 2].endswith("x") and _positive(cells[i + 2]) > 0


@pytest.mark.parametrize("gates", [[], ["--gla"]])
def test_linear_attention_table(tmp_path, gates):
    out = tmp_path / "linear_attention.md"
    assert kernels.main(["linear_attention", "--seqs", "64", "--batch", "1", "--heads", "1",
                         "--head-dim", "16", "--chunk", "16", *gates, *TIMING,
                         "--out", str(out)]) == 0
    assert ("GLA gates" in out.read_text()) == bool(gates)
    (row,) = _rows(out)
    seq, shape, pallas, xla, flash, *ratios = row
    assert (seq, shape) == ("64", "1 x 1 x 16")
    _positive(pallas, interpret=not GPU)
    _positive(xla)
    _positive(flash, interpret=not GPU)
    assert all(r.endswith("x") and _positive(r) for r in ratios)


def test_selected_attention_table(tmp_path):
    out = tmp_path / "selected_attention.md"
    assert kernels.main(["selected_attention", "--seqs", "64", "--heads", "2", "--kv-heads",
                         "1", "--head-dim", "16", "--select-block", "16", "--select-blocks",
                         "2", "--block-q", "16", *TIMING, "--out", str(out)]) == 0
    (row,) = _rows(out)
    seq, union, pallas, xla, flash, *ratios = row
    # 4 blocks of 16; a query block of 16 holds queries of one block: own + one earlier.
    assert seq == "64" and 1.0 <= float(union) <= 2.0
    _positive(pallas, interpret=not GPU)
    _positive(xla)
    _positive(flash, interpret=not GPU)
    assert all(r.endswith("x") and _positive(r) for r in ratios)


def test_fused_cross_entropy_table(tmp_path):
    out = tmp_path / "fused_cross_entropy.md"
    assert kernels.main(["fused_cross_entropy", "--tokens", "64", "--d-model", "16",
                         "--vocabs", "256", "--block-v", "64", "--out", str(out)]) == 0
    assert "efflm bench fused_cross_entropy" in out.read_text()
    (row,) = _rows(out)
    assert row[:2] == ["256", f"{64 * 256 * 4 / 2**20:.1f}"]


def test_fused_cross_entropy_times_each_implementation(tmp_path):
    out = tmp_path / "fused_cross_entropy.md"
    assert kernels.main(["fused_cross_entropy", "--time", "--tokens", "32", "--d-model", "16",
                         "--vocabs", "128", "--block-v", "64", "--runs", "1", "--warmup", "1",
                         "--out", str(out)]) == 0
    memory, timed = ([cell.strip() for cell in line.strip("|").split("|")]
                     for line in out.read_text().splitlines() if line.startswith("| 128 |"))
    assert len(memory) == 9 and len(timed) == 6
    naive, xla, pallas = timed[1:4]
    assert float(naive) > 0 and float(xla) > 0
    assert _positive(pallas, interpret=not GPU) > 0


@pytest.mark.parametrize("argv", [
    ["flash_attention", "--seqs", "abc"],
    ["flash_attention", "--seqs", "128,-5"],
    ["flash_attention", "--head-dims", "0"],
    ["flash_attention", "--width", "100", "--head-dims", "64"],
    ["flash_attention", "--width", "64", "--head-dims", "32", "--group", "3"],
    ["flash_attention", "--impls", "ours,flash3"],
    ["grouped_matmul", "--tokens", "-1"],
    ["grouped_matmul", "--experts", "8,,64"],
    ["linear_attention", "--batch", "two"],
    ["fused_cross_entropy", "--vocabs", "0"],
    ["nope"],
    ["attn"],  # the old names are gone
])
def test_bad_input_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        kernels.main(argv)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["flash_attention", "grouped_matmul", "linear_attention",
                                  "selected_attention", "fused_cross_entropy"])
def test_registered_in_the_cli(name, capsys):
    # A bad list reaches this module's parser, so `efflm bench NAME` dispatches here.
    flag = {"grouped_matmul": "--tokens", "fused_cross_entropy": "--vocabs"}.get(name, "--seqs")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", name, flag, "abc"])
    assert exit_.value.code == 2
    assert f"efflm bench {name}: error: argument {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["attn", "gmm", "linear", "ce"])
def test_unknown_name_lists_the_choices(name, capsys):
    assert cli.main(["bench", name]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"efflm: error: unknown benchmark {name!r}; choose one of: mfu, ")
    choices = line.split("choose one of: ")[1].split(", ")
    assert set(kernels.TABLES) <= set(choices) and "attention" in choices


def test_flop_convention():
    # Causal: half of 2 matmuls of 2*T*T*D each; backward 2.5x forward.
    forward = 2 * 2 * 3 * 4 * 128 * 128 * 64 / 2
    assert kernels.attention_flops(3, 4, 128, 64) == pytest.approx(3.5 * forward)
