"""Box-jitter consistency: how much a detection's class distribution moves under box jitter.

certood's own detection-specific score (no paper defines it exactly): test-time-augmentation
consistency (Wang et al., "Aleatoric uncertainty estimation with test-time augmentation for
medical image segmentation", Neurocomputing 2019) applied to the box instead of the image, a
cousin of sampling-based detection uncertainty (Miller et al., "Dropout Sampling for Robust
Object Detection in Open-Set Conditions", ICRA 2018, which perturbs the head instead). An ID
object keeps its class distribution when its box moves a little; the prediction on an unknown
object, which the head never learnt, is unstable.

The detector adapter provides the tap ``box_jitter.logits``, ``[N, (K+1) * C]`` flattened:
block 0 holds the detection's own class logits (``C`` columns, background first, as
torchvision's ``cls_logits``: pooled at the detection's proposal, the features that scored it),
blocks ``1..K`` the class logits re-pooled at ``K`` jittered copies of the detection's final
(regressed) box (shifted by +-20% of width/height, scaled 0.8/1.2, aspect changes). So the
score also sees how much the class distribution moves from the proposal to the refined box:
on ID objects the head agrees with itself across that step as well. With ``p_k`` the softmax over the **foreground** logits of block ``k`` (column 0
dropped), the score is, higher = more OOD,

    mean_{k=1..K} KL(p_0 || p_k) = mean_k sum_c p_0c (log p_0c - log p_kc)

computed in float64 through ``log_softmax`` (stable for large logits). It lies in
``[0, inf)``; it is 0 when every jittered box gives the same foreground distribution.

>>> same = torch.tensor([[0.0, 2.0, 1.0, 5.0, 2.0, 1.0]])  # K=1, C=3; backgrounds differ
>>> jitter_kl_score(same, jitters=1)
tensor([0.], dtype=torch.float64)
>>> round(jitter_kl_score(torch.tensor([[0.0, 0.0, 0.0, 0.0, 2.0, 0.0]]), 1).item(), 4)
0.4338
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from certood.errors import CertoodError
from certood.scores.base import Score, check_int

# Jittered boxes per detection in the two-stage adapter's ``box_jitter.logits`` tap (fixed
# there, so not a spec key: a wrong count could still split the tap evenly and mean nothing).
JITTERS = 8


def jitter_blocks(features: Tensor, jitters: int, who: str = "jitter_kl") -> Tensor:
    """``[N, (K+1) * C]`` as ``[N, K+1, C]``, or raise if the width does not split so."""
    blocks = jitters + 1
    width = features.shape[-1]
    if width % blocks != 0 or width // blocks < 2:
        raise CertoodError(f"{who}: expected (jitters+1)*C = {blocks}*C columns with C >= 2 "
                           f"class logits per block (background first), found {width} columns")
    return features.reshape(*features.shape[:-1], blocks, width // blocks)


def jitter_kl_score(features: Tensor, jitters: int) -> Tensor:
    """Mean over the ``K`` jittered blocks of ``KL(p_0 || p_k)`` on foreground softmaxes; ``[N]``.

    ``features`` is ``[N, (K+1) * C]``, each block's column 0 the background logit. Float64.
    """
    blocks = jitter_blocks(features, jitters)
    log_p = torch.log_softmax(blocks[..., 1:].to(torch.float64), dim=-1)  # [N, K+1, C-1]
    own = log_p[..., :1, :]
    kl = (own.exp() * (own - log_p[..., 1:, :])).sum(dim=-1).clamp(min=0)  # [N, K]
    return kl.mean(dim=-1)


class JitterKL(Score):
    """Mean KL from the detection's own foreground distribution to its jittered boxes'.

    Needs no fitting and keeps no state; ``fit`` only checks the width of the features.

    >>> JitterKL(jitters=2).score(torch.zeros(4, 9)).shape  # 3 blocks of C=3
    torch.Size([4])
    """

    kind = "jitter_kl"
    needs_fit = False

    def __init__(self, jitters: int = JITTERS) -> None:
        super().__init__()
        self.jitters = check_int("jitter_kl.jitters", jitters)

    def _fit(self, features: Tensor, labels: Tensor | None) -> None:
        jitter_blocks(features, self.jitters, "jitter_kl.fit")

    def _score(self, features: Tensor) -> Tensor:
        jitter_blocks(features, self.jitters, "jitter_kl.score")
        return jitter_kl_score(features, self.jitters).to(features.dtype)

    def params(self) -> dict[str, Any]:
        return {"jitters": self.jitters}
