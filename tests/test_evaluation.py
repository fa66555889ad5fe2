"""Evaluation: the retrieval metrics against brute-force references, and evaluate() on a trained model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fgplugin.evaluation import (
    average_precision,
    chance_map,
    expected_random_ap,
    retrieval_map,
    roi_iou,
    triplet_accuracy,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _brute_ap(scores: np.ndarray, relevant: np.ndarray) -> float:
    """One query, by the textbook definition, pessimistic ties (non-relevant first among equals)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], bool(relevant[i])))
    hits, total = 0, 0.0
    for rank, i in enumerate(order, start=1):
        if relevant[i]:
            hits += 1
            total += hits / rank
    return total / hits


def test_retrieval_map_matches_a_per_query_loop():
    rng = np.random.default_rng(0)
    q, c, a, d = 25, 80, 3, 6
    qv, cv = _unit(rng.normal(size=(q, a, d))), _unit(rng.normal(size=(c, a, d)))
    ql, cl = rng.integers(-1, 4, size=(q, a)), rng.integers(-1, 4, size=(c, a))
    res = retrieval_map(qv, ql, cv, cl, attribute_names=["x", "y", "z"])
    expected, counts = {}, {}
    for j, name in enumerate("xyz"):
        cm = cl[:, j] >= 0
        aps = []
        for i in np.flatnonzero(ql[:, j] >= 0):
            rel = cl[cm, j] == ql[i, j]
            if rel.any():
                aps.append(_brute_ap((cv[cm, j] @ qv[i, j]).astype(np.float32), rel))
        expected[name], counts[name] = np.mean(aps), len(aps)
        assert res["per_attribute"][name] == pytest.approx(expected[name], abs=1e-9)
        assert res["n_queries"][name] == counts[name]
        assert res["n_candidates"][name] == int(cm.sum())
    total = sum(counts.values())
    assert res["overall_weighted"] == pytest.approx(sum(expected[n] * counts[n] for n in "xyz") / total)
    assert res["overall_mean"] == pytest.approx(np.mean(list(expected.values())))


def test_perfect_embeddings_score_one_and_ignore_missing_labels():
    labels_q = np.array([[0, 1], [1, -1], [2, 0], [-1, 1]])
    labels_c = np.array([[0, 0], [1, 1], [2, 0], [0, 1], [-1, 0], [1, -1]])
    onehot = lambda lab: np.stack([np.eye(3)[np.maximum(lab[:, j], 0)] for j in range(2)], 1)  # noqa: E731
    qv, cv = onehot(labels_q), onehot(labels_c)
    # A candidate with a missing label would tie with value-0 items; it must simply not be ranked.
    res = retrieval_map(qv, labels_q, cv, labels_c)
    assert res["per_attribute"] == {"0": 1.0, "1": 1.0}
    assert res["n_queries"] == {"0": 3, "1": 3}
    assert res["n_candidates"] == {"0": 5, "1": 5}


def test_ties_are_broken_pessimistically_and_collapsed_models_score_below_chance():
    ap = average_precision(torch.zeros(1, 4), torch.tensor([[True, False, False, True]]))
    assert float(ap[0]) == pytest.approx((1 / 3 + 2 / 4) / 2)
    rng = np.random.default_rng(1)
    ql, cl = rng.integers(0, 3, size=(30, 1)), rng.integers(0, 3, size=(90, 1))
    same = np.ones((30, 1, 4)) / 2.0
    collapsed = retrieval_map(same, ql, np.ones((90, 1, 4)) / 2.0, cl)
    assert collapsed["overall_weighted"] < chance_map(ql, cl)["overall_weighted"]


def test_queries_without_relevant_candidates_are_skipped_and_counted():
    qv = _unit(np.ones((2, 1, 2)))
    res = retrieval_map(qv, np.array([[0], [5]]), _unit(np.ones((3, 1, 2))), np.array([[0], [1], [0]]))
    assert res["n_queries"] == {"0": 1} and res["n_skipped"] == {"0": 1}


def test_expected_random_ap_is_exact():
    rng = np.random.default_rng(2)
    n, r = 40, 6
    sims = []
    for _ in range(20000):
        rel = np.zeros(n, bool)
        rel[rng.choice(n, r, replace=False)] = True
        hits = np.cumsum(rel)
        sims.append((hits / np.arange(1, n + 1))[rel].mean())
    exact = float(expected_random_ap(np.array([n]), np.array([r]))[0])
    assert exact == pytest.approx(np.mean(sims), abs=3 * np.std(sims) / np.sqrt(len(sims)))
    assert float(expected_random_ap(np.array([5]), np.array([5]))[0]) == pytest.approx(1.0)


def test_random_embeddings_score_near_chance():
    rng = np.random.default_rng(3)
    ql, cl = rng.integers(0, 4, size=(400, 2)), rng.integers(0, 4, size=(1600, 2))
    res = retrieval_map(_unit(rng.normal(size=(400, 2, 16))), ql, _unit(rng.normal(size=(1600, 2, 16))), cl)
    chance = chance_map(ql, cl)
    assert 0.2 < chance["overall_weighted"] < 0.35
    assert res["overall_weighted"] == pytest.approx(chance["overall_weighted"], abs=0.02)


def test_triplet_accuracy_counts_strict_wins_per_attribute():
    vecs = np.zeros((4, 2, 2))
    vecs[:, 0] = [[1, 0], [1, 0], [0, 1], [1, 0]]  # attribute 0: 0~1, 2 far, 3 identical to 0
    vecs[:, 1] = [[1, 0], [0, 1], [1, 0], [1, 0]]  # attribute 1: 0~2
    triplets = np.array([[0, 0, 1, 2], [0, 0, 2, 1], [1, 0, 2, 1], [0, 0, 1, 3]])
    res = triplet_accuracy(vecs, triplets, attribute_names=["a", "b"])
    assert res["per_attribute"] == {"a": pytest.approx(1 / 3), "b": 1.0}  # the tie (last) counts as wrong
    assert res["overall"] == pytest.approx(0.5)
    assert res["n"] == {"a": 3, "b": 1}


def test_roi_iou():
    pred = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 0, 0]])
    gt = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]])
    assert roi_iou(pred, gt).tolist() == pytest.approx([1.0, 50 / 150, 0.0, 0.0])
