"""`efflm bench recall` (`bench/recall.py`): the table and plot it writes, and the
models it refuses."""

import pytest

from efflm.bench.recall import still_rising
from efflm.cli import main


def test_writes_a_row_per_kind_and_width_and_a_plot(tmp_path, capsys):
    out, png = tmp_path / "recall.md", tmp_path / "recall.png"
    assert main(["bench", "recall", "--kinds", "softmax", "--widths", "32",
                 "--settings", "16:2", "--steps", "2", "--out", str(out),
                 "--plot", str(png)]) == 0
    rows = [r for r in out.read_text().splitlines() if r.startswith("| softmax | 32 |")]
    assert len(rows) == 1 and 0 <= float(rows[0].split("|")[3].strip(" *")) <= 1
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["model.depth.kind=mod"], "sees the answers"),
    (["--settings", "16-2"], "--settings '16-2'"),
])
def test_refuses_in_one_line(capsys, args, message):
    assert main(["bench", "recall", "--kinds", "softmax", "--widths", "32", "--steps", "2",
                 *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_cell_is_marked_while_its_accuracy_still_rises():
    assert still_rising({"accuracy": 0.9, "half": 0.5})
    assert not still_rising({"accuracy": 0.99, "half": 0.98})
    assert not still_rising({"accuracy": 0.4, "half": 0.6})
