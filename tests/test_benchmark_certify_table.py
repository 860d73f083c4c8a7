"""benchmarks/certify_table.py: its rates, the MILP exact minimum on a small head, the table."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("certify_table", REPO / "benchmarks" / "certify_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rates_count_all_and_flagged_boxes(table):
    r = table.rates(["certified_ood", "undecided", "certified_id", "certified_ood"], [True, True, False, False])
    assert r["certified"] == 0.75 and r["certified_flagged"] == 0.5 and r["n_flagged"] == 2
    assert table.rates([], [])["certified"] is None


def test_small_heads_bounds_are_ordered_and_render(table, monkeypatch):
    monkeypatch.setattr(table, "SMALL_SIZES", [(8, 16, 16, 2)])
    rows = table.small_heads(1, 20.0)
    assert len(rows) == 2
    for r in rows:  # IBP <= CROWN <= exact minimum <= the centre's value
        assert r["exact"] is not None
        assert r["ibp"] <= r["crown"] + 1e-9 <= r["exact"] + 2e-9 <= r["centre"] + 3e-9
    out = {"command": "x", "date": "d", "machine": "m", "total_seconds": 1.0, "spec": "s", "rule": "e > t.e",
           "region": {"norm": "inf", "tap": "roi", "domain": "nonnegative", "exact": "z3"},
           "images_per_set": {"id_test": 1}, "boxes_per_set": {"id_test": 1}, "detector_seconds_per_image": 0.01,
           "table": [{"eps": 0.005, "sets": {"id_test": {
               "ibp": table.rates(["undecided"], [True]), "crown": table.rates(["certified_ood"], [True]),
               "pgd_upper_bound": {"unflipped": 1.0, "unflipped_flagged": 1.0}}},
               "cost": {"ibp": {"seconds_per_box": 0.001, "seconds_per_image": 0.001, "to_detector": 0.1},
                        "crown": {"seconds_per_box": 0.05, "seconds_per_image": 0.05, "to_detector": 5.0}}}],
           "small_heads": rows}
    md = table.render(out)
    assert "| 0.005 | id_test | 0.0 / 0.0 | 100.0 / 100.0 | 100.0 / 100.0 | 5.00x |" in md
    assert "| 8-16-16-2 | 0.75x | 1 (1) |" in md
