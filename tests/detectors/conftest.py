"""Shared checks of the detector adapter tests."""
from __future__ import annotations

import pytest
import torch
from scipy.optimize import linear_sum_assignment


def _pair_detections(a, b, box_atol: float, score_atol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices ``(rows, cols)`` pairing each detection of ``a`` with one of ``b``: an optimal
    assignment on box and score distance among detections of the same label."""
    assert len(a) == len(b), f"{len(a)} vs {len(b)} detections"
    box_gap = (a.boxes[:, None, :] - b.boxes[None, :, :]).abs().amax(-1)
    score_gap = (a.scores[:, None] - b.scores[None, :]).abs()
    cost = box_gap / box_atol + score_gap / score_atol
    cost[a.labels[:, None] != b.labels[None, :]] = float("inf")
    cost = torch.nan_to_num(cost, posinf=1e12)
    rows, cols = linear_sum_assignment(cost.double().numpy())
    return torch.as_tensor(rows), torch.as_tensor(cols)


def _assert_same_detections(a, b, box_atol: float, score_atol: float, tap_rtol: float = 1e-4,
                            tap_atol: float = 1e-5, taps=()) -> None:
    """``a`` and ``b`` hold the same detections, to tolerance, in any order among near ties.

    Two runs that sum in different orders (another batch size, another runtime) give scores
    that agree to float tolerance, so two detections whose scores are that close may swap
    places in the score-sorted output. Detections are paired by label, box and score (an
    optimal assignment); every pair must agree within the tolerances, and so must the named
    taps of each pair.
    """
    rows, cols = _pair_detections(a, b, box_atol, score_atol)
    assert torch.equal(a.labels[rows], b.labels[cols])
    torch.testing.assert_close(b.boxes[cols], a.boxes[rows], rtol=0, atol=box_atol)
    torch.testing.assert_close(b.scores[cols], a.scores[rows], rtol=0, atol=score_atol)
    for point in taps:
        torch.testing.assert_close(b.taps[point][cols], a.taps[point][rows], rtol=tap_rtol,
                                   atol=tap_atol)
    for name in ("logits",):
        torch.testing.assert_close(getattr(b, name)[cols], getattr(a, name)[rows], rtol=tap_rtol,
                                   atol=tap_atol)


@pytest.fixture(scope="session")
def same_detections():
    """``same_detections(a, b, box_atol, score_atol, taps=...)``: equal up to near-tie order."""
    return _assert_same_detections


@pytest.fixture(scope="session")
def pair_detections():
    """``pair_detections(a, b, box_atol, score_atol) -> (rows, cols)``: ``a[rows]`` ~ ``b[cols]``."""
    return _pair_detections
