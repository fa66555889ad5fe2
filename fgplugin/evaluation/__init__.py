"""Evaluation as in the ASEN / ASEN_v2 papers: per-attribute retrieval MAP, triplet accuracy, ROI IoU.

- ``metrics``: the measures on arrays (MAP, exact chance MAP, triplet accuracy, ROI IoU).
- ``protocol``: a split part encoded with a model and scored (``evaluate`` -> ``EvalReport``).
- ``roi``: how well each attribute's attention finds its ground-truth region (generated data).
- ``inference``: where and in which mode a model runs, its variant, the attention capability.
"""

from __future__ import annotations

from .inference import AttentionModel, EvalMode, run_device, variant_of
from .metrics import average_precision, box_area, chance_map, expected_random_ap, retrieval_map, roi_iou, triplet_accuracy
from .protocol import EvalReport, encode_catalog, evaluate, query_vectors
from .roi import roi_metrics

__all__ = [
    "average_precision", "retrieval_map", "expected_random_ap", "chance_map", "triplet_accuracy", "box_area",
    "roi_iou", "encode_catalog", "query_vectors", "evaluate", "EvalReport", "roi_metrics", "AttentionModel",
    "EvalMode", "run_device", "variant_of",
]
