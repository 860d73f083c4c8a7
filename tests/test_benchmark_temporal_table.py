"""benchmarks/temporal_table.py: the bootstrap intervals over unknown objects."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("temporal_table", REPO / "benchmarks" / "temporal_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_intervals_over_objects_and_paired_differences():
    table = _module()
    rows = [{"score": "e", "method": "frame", "missed_at_budget": [1, 1, 0, 0] * 8},
            {"score": "e", "method": "ema", "missed_at_budget": [0, 1, 0, 0] * 8},
            {"score": "e", "method": "max", "missed_at_budget": [1, 1, 0, 0] * 8}]
    table.add_intervals(rows, n_boot=500)
    lo, hi = rows[0]["fpr95_at_budget_ci"]
    assert lo < 0.5 < hi and 0.2 < lo and hi < 0.8
    assert rows[0]["diff_to_frame_ci"] == [0.0, 0.0] and rows[2]["diff_to_frame_ci"] == [0.0, 0.0]
    dlo, dhi = rows[1]["diff_to_frame_ci"]  # ema misses a quarter fewer, on the same objects
    assert -0.45 < dlo < dhi < -0.05
    assert table._ci(rows[1]).startswith(" [")
