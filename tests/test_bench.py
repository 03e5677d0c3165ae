"""scripts/bench.py runs end to end on the toy U-Net: every row gets a time, a paired floor and a
peak memory (a crash in a child process is reported as a 'failed' row, which this test rejects)."""
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a subprocess running scripts/bench.py end to end

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_toy_rows_have_ratios():
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--shape", "toy", "--latent", "4",
         "--only", "locon,lokr_dora", "--steps", "3", "--warmup", "1", "--no-lycoris", "--threads", "1"],
        capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| lycoris_kohya")]
    assert len(rows) == 2, out
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert "failed" not in row, row
        s_step, floor, ratio, mem = float(cells[2]), float(cells[3]), float(cells[4]), float(cells[7])
        low, high = (float(v) for v in cells[5].split("-"))
        assert s_step > 0 and floor > 0 and mem > 0, row
        # the ratio is the median of the paired ratios, inside their printed range (rounded to 0.01)
        assert low - 0.005 <= ratio <= high + 0.005 and low <= high, row
    assert re.search(r"floor alone at the start and end: [\d.]+, [\d.]+ s/step", out), out
