"""Monitor specs: the YAML format, its strict loader, and the rule language.

>>> from certood.spec import SCORE_KINDS, TAP_POINTS
>>> SCORE_KINDS[:2], TAP_POINTS["cls_logits"]
(('energy', 'mahalanobis'), 'logits')
"""
from certood.spec.loader import check_spec_file, check_spec_text, load_spec, load_spec_text
from certood.spec.model import (
    DataSource, DataSpec, DetectorSpec, OutputSpec, ScoreSpec, Spec, ThresholdSpec,
)
from certood.spec.consistency import check_rule_consistency, score_ranges
from certood.spec.rule import Rule, RuleProblem, check_rule, class_key, parse_rule
from certood.spec.v1 import SCORE_KIND_TABLE, SCORE_KINDS, TAP_POINTS, json_schema

__all__ = [
    "DataSource", "DataSpec", "DetectorSpec", "OutputSpec", "Rule", "RuleProblem", "SCORE_KINDS",
    "SCORE_KIND_TABLE", "ScoreSpec", "Spec", "TAP_POINTS", "ThresholdSpec", "check_rule",
    "check_rule_consistency", "check_spec_file", "check_spec_text", "class_key", "json_schema", "load_spec",
    "load_spec_text", "parse_rule", "score_ranges",
]
