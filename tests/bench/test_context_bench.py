"""`efflm bench context`'s analytic ring work (`ring_work`) against a count of the tiles
causality needs."""

import pytest

from efflm.bench.context import ring_work


@pytest.mark.parametrize("n", [2, 4, 8])
def test_ring_work_counts_the_tiles_each_device_computes(n):
    """In chunk x chunk blocks (a half x half tile is a quarter): the plain ring computes
    every chunk at or before its own as a whole tile; zig-zag computes exactly the half
    tiles causality needs for its halves me and 2n - 1 - me, the same on every device."""
    ring = [me + 1 for me in range(n)]
    zigzag = [sum(key <= query for query in (me, 2 * n - 1 - me) for key in range(2 * n)) / 4
              for me in range(n)]
    assert ring_work("ring", n) == (max(ring), sum(ring) / n)
    assert ring_work("zigzag", n) == (max(zigzag), sum(zigzag) / n)
    assert len(set(zigzag)) == 1
