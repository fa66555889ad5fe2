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


# -- evaluate() on models -------------------------------------------------------------------------------
import hashlib  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from fgplugin.attention_viz import GT_COLOUR, PANEL, save_attention  # noqa: E402
from fgplugin.catalog import load_catalog  # noqa: E402
from fgplugin.errors import FgpluginError, ModelCardError  # noqa: E402
from fgplugin.evaluation import evaluate  # noqa: E402
from fgplugin.images import load_image  # noqa: E402
from fgplugin.preprocess import Preprocess  # noqa: E402
from fgplugin.splits import Splits  # noqa: E402
from fgplugin.synth import generate, load_boxes, synth_schema  # noqa: E402

SIZE = 64  # model input; the generated images are 96 px, so every box is rescaled


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth"), 60, seed=1, size=96)


@pytest.fixture(scope="module")
def data(synth):
    cat = load_catalog(synth, synth_schema())
    return cat, Splits.load(synth.parent / "splits.json"), load_boxes(synth.parent)


def _key(x: torch.Tensor) -> str:
    return hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest()


class Oracle(torch.nn.Module):
    """A stand-in model that recognises each catalog image (by the hash of its preprocessed tensor)
    and answers from ground truth: one-hot label vectors, ground-truth ROI boxes, peaked maps. It
    tests evaluate()'s plumbing (ids, labels, box scaling) with known right answers."""

    query_slack = False  # the Encoder contract (fgplugin.encoding): plain cosine queries

    def __init__(self, cat, boxes, *, labels=None, roi="truth"):
        super().__init__()
        self.schema, self.config = cat.schema, None
        pre = self.preprocess
        lab = cat.label_matrix() if labels is None else labels
        self.by_key = {}
        for row, it in enumerate(cat.items):
            img = load_image(it.image, base_dir=cat.base_dir)
            sx, sy = SIZE / img.size[0], SIZE / img.size[1]
            b = {a: None if v is None else (v[0] * sx, v[1] * sy, v[2] * sx, v[3] * sy)
                 for a, v in boxes[it.id].items()}
            self.by_key[_key(pre(img))] = (lab[row], b)
        self.roi = roi

    @property
    def preprocess(self):
        return Preprocess(SIZE)

    def embed_all(self, x):
        width = max(a.num_classes for a in self.schema)
        out = torch.zeros(len(x), len(self.schema), width)
        for i in range(len(x)):
            lab, _ = self.by_key[_key(x[i])]
            for a, v in enumerate(lab):
                if v >= 0:
                    out[i, a, v] = 1.0
        return out

    def attention(self, x, attr_idx):
        boxes, maps = torch.zeros(len(x), 4), torch.zeros(len(x), SIZE, SIZE)  # 1-px cells
        for i in range(len(x)):
            name = self.schema.names[int(attr_idx[i])]
            box = self.by_key[_key(x[i])][1][name]
            boxes[i] = torch.tensor(box if self.roi == "truth" else (0.0, 0.0, SIZE, SIZE))
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            maps[i, int(cy), int(cx)] = 1.0
        return maps, boxes


def test_evaluate_scores_a_perfect_model_perfectly(data):
    cat, splits, boxes = data
    rep = evaluate(Oracle(cat, boxes), cat, splits, n_triplets=300, boxes=boxes)
    visible = [a for a, n in rep.queries_per_attribute.items() if n > 0]
    assert visible and all(rep.per_attribute_map[a] == pytest.approx(1.0) for a in visible)
    assert rep.overall_weighted == pytest.approx(1.0) and rep.triplet_accuracy == 1.0
    assert rep.n_triplets == 300
    q, c = splits.part("test")
    assert (rep.n_queries, rep.n_candidates) == (len(q), len(c))
    # Queries per attribute are the test queries whose label is visible.
    lab = {it.id: it.labels for it in cat}
    hidden = synth_schema()["pocket"].not_visible
    assert rep.queries_per_attribute["pocket"] == sum(lab[i]["pocket"] not in (None, hidden) for i in q)
    # ROI: truth boxes scaled from 96 px images to the 64 px input give IoU 1 and peaks inside.
    assert rep.roi["mean_iou"] == pytest.approx(1.0, abs=1e-5) and rep.roi["peak_in_box"] == 1.0
    assert 0.0 < rep.roi["box_area_fraction"] < 1.0
    assert rep.encode_ms_per_image > 0 and rep.forward_ms_per_image > 0
    json.dumps(rep.to_dict())  # JSON-ready


def test_evaluate_with_shuffled_labels_is_at_chance_and_whole_image_rois_score_box_area(data):
    cat, splits, boxes = data
    rng = np.random.default_rng(0)
    shuffled = cat.label_matrix()[rng.permutation(len(cat))]
    rep = evaluate(Oracle(cat, boxes, labels=shuffled, roi="whole"), cat, splits, n_triplets=300, boxes=boxes)
    # One-hot vectors of wrong labels: many exact ties, broken pessimistically, so at or below chance.
    assert rep.overall_weighted <= rep.chance["overall_weighted"] + 0.05
    roi = rep.roi
    assert roi["mean_iou"] == pytest.approx(roi["box_area_fraction"], abs=1e-5)  # whole image: IoU = box area share


def test_evaluate_refuses_a_model_of_another_schema(data):
    cat, splits, boxes = data
    oracle = Oracle(cat, boxes)
    s = synth_schema()
    oracle.schema = type(s)(s.attributes[:2], name="other")
    with pytest.raises(ModelCardError, match=r"the model was built for schema 'other'.*but the catalog .* uses"):
        evaluate(oracle, cat, splits)


SMALL = {"trunk": "resnet_tiny", "local_trunk": "resnet_tiny", "image_size": SIZE, "local_size": 32,
         "embed_dim": 32, "attr_embed_dim": 16, "asa_dim": 16, "local_asa_dim": 16}


def test_eval_cli_on_a_run_folder_with_attention_overlays(synth, data, tmp_path):
    from fgplugin.models import build_model, load_config, save_checkpoint
    from fgplugin_cli.app import app

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "run" / "best", build_model(load_config("asen_v2", SMALL), synth_schema()))
    out = tmp_path / "att"
    res = CliRunner().invoke(app, ["eval", "--checkpoint", str(tmp_path / "run"), "--catalog", str(synth),
                                   "--json", "--triplets", "100", "--device", "cpu",
                                   "--save-attention", str(out), "--attention-images", "2"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["variant"] == "asen_v2" and set(rep["per_attribute_map"]) == set(synth_schema().names)
    assert 0.0 <= rep["roi"]["mean_iou"] <= 1.0 and 0.0 <= rep["roi"]["peak_in_box"] <= 1.0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    sheet = np.asarray(Image.open(pngs[0]).convert("RGB"))
    assert sheet.shape[1] == PANEL * (len(synth_schema()) + 1)
    assert (np.abs(sheet.astype(int) - GT_COLOUR).sum(-1) < 60).any()  # ground-truth boxes are drawn

    cat, splits, boxes = data
    torch.manual_seed(0)
    csn = build_model(load_config("csn", SMALL), synth_schema())
    with pytest.raises(FgpluginError, match="no attention"):
        save_attention(csn, cat, splits.test_query, tmp_path / "none", boxes=boxes)


def test_eval_cli_reports_bad_arguments_clearly(synth, tmp_path):
    from fgplugin_cli.app import app

    res = CliRunner().invoke(app, ["eval", "--catalog", str(synth)])
    assert res.exit_code == 2 and "exactly one of --checkpoint" in res.output
    res = CliRunner().invoke(app, ["eval", "--checkpoint", str(tmp_path), "--catalog", str(synth)])
    assert res.exit_code == 2 and "no checkpoint here" in res.output


class PosteriorOracle(Oracle):
    """Noisy posteriors (each item's true value with 0.3 to 0.9 of the mass, the rest spread at random)
    stored as posterior = prob vectors [p, sqrt(1 - |p|^2)]: a model whose queries drop the slack."""

    def __init__(self, cat, boxes):
        super().__init__(cat, boxes)
        self.query_slack = True  # as AttributeModel.query_slack / ExportedEncoder.query_slack say it
        self.dims = {a.name: a.num_classes + 1 for a in self.schema}

    def embed_all(self, x):
        width = max(self.dims.values())
        out = torch.zeros(len(x), len(self.schema), width)
        for i in range(len(x)):
            key = _key(x[i])
            lab, _ = self.by_key[key]
            rng = np.random.default_rng(int(key[:8], 16))
            for a, attr in enumerate(self.schema):
                k = attr.num_classes
                mass = rng.uniform(0.3, 0.9)  # on the true value (value 0 where not visible)
                p = rng.dirichlet(np.full(k, 0.5)) * (1 - mass)
                p[max(int(lab[a]), 0)] += mass
                out[i, a, :k] = torch.from_numpy(p).float()
                out[i, a, k] = float(np.sqrt(max(0.0, 1 - (p * p).sum())))
        return out


def test_evaluate_scores_queries_without_the_slack_value(data):
    """For a posterior = prob model, evaluate() ranks with the query form (slack dropped): its MAP is
    the one of those queries against the stored candidates, not the plain cosine of stored vectors."""
    from fgplugin.similarity import query_form_padded

    cat, splits, boxes = data
    model = PosteriorOracle(cat, boxes)
    rep = evaluate(model, cat, splits, n_triplets=0)
    q_ids, c_ids = splits.part("test")
    row = {it.id: r for r, it in enumerate(cat.items)}
    pre = model.preprocess
    imgs = torch.stack([pre(load_image(cat.by_id()[i].image, base_dir=cat.base_dir)) for i in list(q_ids) + list(c_ids)])
    vecs = model.embed_all(imgs)
    labels = cat.label_matrix()[[row[i] for i in list(q_ids) + list(c_ids)]]
    nq = len(q_ids)
    names = model.schema.names
    queries = query_form_padded(vecs, [model.dims[n] for n in names], True)
    want = retrieval_map(queries[:nq], labels[:nq], vecs[nq:], labels[nq:], attribute_names=names)
    plain = retrieval_map(vecs[:nq], labels[:nq], vecs[nq:], labels[nq:], attribute_names=names)
    assert rep.overall_weighted == pytest.approx(want["overall_weighted"], abs=1e-9)
    assert abs(want["overall_weighted"] - plain["overall_weighted"]) > 1e-4  # the two rankings differ here
