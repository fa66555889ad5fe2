"""The model variants: one set of parts (trunks, attention, heads), each variant a configuration.

- ``asen_v2``: ASEN_v2 — global branch (trunk to stride 16, ASA, ACA) and a local branch on a square
  zoom of the ASA region (batched ``roi_align``); vector = [sqrt(0.6) g, sqrt(0.4) l] (both unit).
- ``asen``: the global branch alone (ASEN, AAAI 2020).
- ``csn``: Conditional Similarity Networks — one embedding, a (learned or fixed disjoint) mask per attribute.
- ``ag_mlan``: multi-level fusion (layer2 + layer3), per-attribute classification through layer4,
  ASA -> spatial attention -> ACA embedding with a ReLU mask per attribute, uncertainty-weighted losses.
- ``global``: one attribute-agnostic embedding (the same vector for every attribute).
- ``mtc``: a multi-task attribute classifier; each head's softmax posterior is that attribute's vector.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..schema import AttributeSchema
from . import losses as L
from .attention import (
    AttributeChannelAttention,
    AttributeSpatialAttention,
    PooledSpatialAttention,
    crop_rois,
    minmax_normalise,
    roi_boxes,
)
from .base import AttributeModel
from .config import ConfigError, ModelConfig
from .extend import Extendable, ExtensionError
from .trunks import build_trunk
from .vectors import l2n, pad_to, posterior_vector


class StagedFeatures(nn.Module):
    """The first ``n`` stages of a trunk (later stages are dropped: no dead weights in checkpoints)."""

    def __init__(self, trunk: nn.Module, n: int):
        super().__init__()
        self.stages = nn.ModuleList(list(trunk.stages)[:n])
        self.channels = list(trunk.channels)[:n]

    @property
    def out_channels(self) -> int:
        return self.channels[-1]

    def numbered(self) -> list[tuple[int, nn.Module]]:
        """(trunk stage index, stage): the kept stages are the trunk's first ones."""
        return list(enumerate(self.stages))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.shared_pass(x))

    # An extension part shares the trunk pass up to the last stage and may own a trainable copy of
    # that stage (``with_own_last``): a new attribute then gets features the base's training did not
    # tune away (colour after a trunk fine-tuned on shape attributes). The same ops in the same order
    # as ``forward``, so the base's vectors stay bit-identical.
    def shared_pass(self, x: torch.Tensor) -> "LastStagePass":
        """The stages before the last, then the last: what every part of an extended model reuses."""
        for stage in self.stages[:-1]:
            x = stage(x)
        last = self.stages[-1]
        return LastStagePass(x, last(x), last)

    def finish(self, run: "LastStagePass") -> torch.Tensor:
        """This module's output from ``run``: its output as computed, unless this module's last stage is
        its own copy, which then runs on the input of the last stage."""
        return run.output if run.last is self.stages[-1] else self.stages[-1](run.before)

    def with_own_last(self, source: "StagedFeatures") -> "StagedFeatures":
        """The same stages, the last one a trainable copy of ``source``'s last stage (the same trunk's:
        this module itself, or one built from the trunk's weights)."""
        twin = StagedFeatures.__new__(StagedFeatures)
        nn.Module.__init__(twin)
        twin.stages = nn.ModuleList([*self.stages[:-1], copy.deepcopy(source.stages[-1])])
        twin.channels = list(self.channels)
        return twin


class LastStagePass(NamedTuple):
    """A trunk pass split before its last stage: the input of the last stage, its output, and the stage."""
    before: torch.Tensor
    output: torch.Tensor
    last: nn.Module


def _pool(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


class ASENBranch(nn.Module):
    """Trunk features -> ASA (attention-weighted sum) -> ACA -> linear embedding, for K attributes per image."""

    def __init__(self, features: StagedFeatures, attr_dim: int, asa_dim: int, reduction: int, embed_dim: int):
        super().__init__()
        c = features.out_channels
        self.features = features
        self.asa = AttributeSpatialAttention(c, attr_dim, asa_dim)
        self.aca = AttributeChannelAttention(c, attr_dim, reduction)
        self.fc = nn.Linear(c, embed_dim)

    def forward(self, images: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """``images`` [B, 3, S, S], ``a`` [B, K, e] -> (embeddings [B, K, E], ASA weights [B, K, hw], (h, w))."""
        return self.attend(self.features(images), a)

    def attend(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """The same from the trunk's feature map ``x`` [B, C, h, w]."""
        pooled, w = self.asa(x, a)
        return self.fc(self.aca(pooled, a)), w, (x.shape[-2], x.shape[-1])


class ASEN(Extendable):
    """ASEN (``local=False``) and ASEN_v2 (``local=True``)."""

    def __init__(self, config: ModelConfig, schema: AttributeSchema, local: bool):
        super().__init__(config, schema)
        c = config
        self.local = local
        self.attr_embedding = nn.Embedding(len(schema), c.attr_embed_dim)
        trunk = build_trunk(c.trunk, c.trunk_weights)
        self.global_branch = ASENBranch(StagedFeatures(trunk, c.feature_stage),
                                        c.attr_embed_dim, c.asa_dim, c.aca_reduction, c.embed_dim)
        self.heads = None
        self.cls_stage = None
        if c.linear_branch:
            # AG-MLAN's classification branch: the trunk's stride-32 stage on the global branch's map
            # (already in it with feature_stage 3), pooled, one softmax head per attribute (as mtc).
            self.cls_stage = trunk.stages[2] if c.feature_stage == 2 else nn.Identity()
            self.heads = _Heads(trunk.channels[2], [a.num_classes for a in schema])
        if local:
            # The attribute embedding is shared by both branches, as in the reference code.
            self.local_branch = ASENBranch(
                StagedFeatures(build_trunk(c.local_trunk, c.local_trunk_weights), c.feature_stage),
                c.attr_embed_dim, c.local_asa_dim, c.aca_reduction, c.embed_dim)
            # Weight of the global cosine: 1 until stage 2 trains the local branch, then global_share.
            self.register_buffer("share", torch.tensor(1.0))
            self.training_stages = (1, 2)
        self.dims = {n: (2 if local else 1) * c.embed_dim for n in schema.names}
        self.attach_proxies(c.embed_dim)  # on the global embedding

    # -- parts --------------------------------------------------------------------------------
    def _global(self, images: torch.Tensor, idx: torch.Tensor):
        """(embeddings [B, K, E], ASA weights [B, K, hw], (h, w), trunk map [B, C, h, w])."""
        return self._global_from(self.global_branch.features(images), idx)

    def _global_from(self, x: torch.Tensor, idx: torch.Tensor):
        """The same from the trunk map ``x``."""
        return (*self.global_branch.attend(x, self.attr_embedding(idx)), x)

    def _logits(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """The classification branch's per-attribute logits from the trunk map (None without one)."""
        return None if self.heads is None else self.heads(_pool(self.cls_stage(x)))

    def _local(self, images: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, hw: tuple[int, int]):
        """Local embeddings [B, K, E] and boxes [B*K, 4] from the global ASA weights ``w`` [B, K, h*w]."""
        b, k = idx.shape
        maps = w.detach().reshape(b * k, hw[0], hw[1])
        boxes = roi_boxes(maps, self.config.image_size, self.config.roi_threshold)
        owner = torch.arange(b, device=images.device).repeat_interleave(k)
        crops = crop_rois(images, boxes, self.config.local_size, owner)
        emb, _, _ = self.local_branch(crops, self.attr_embedding(idx.reshape(b * k, 1)))
        return emb.reshape(b, k, -1), boxes

    def _combine(self, g: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        s = self.share
        return l2n(torch.cat([torch.sqrt(s) * l2n(g), torch.sqrt(1 - s) * l2n(l)], dim=-1))

    def _vectors(self, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self._vectors_from(self.global_branch.features(images), images, idx)

    def _vectors_from(self, x: torch.Tensor, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        g, w, hw, x = self._global_from(x, idx)
        logits = self._logits(x) if self.config.proxy_share > 0 else None
        if not self.local:
            return self.with_posteriors(l2n(g), g, idx, logits)
        l, _ = self._local(images, idx, w, hw)
        return self.with_posteriors(self._combine(g, l), g, idx, logits)

    # -- interface ----------------------------------------------------------------------------
    def embed_all(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_from(self.trunk_map(images), images)

    # -- extension (fgplugin.models.extend) ---------------------------------------------------
    def trunk_map(self, images: torch.Tensor) -> LastStagePass:
        return self.global_branch.features.shared_pass(images)

    def embed_from(self, features: LastStagePass, images: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(self.num_attributes, device=images.device).expand(images.shape[0], -1)
        return self._vectors_from(self.global_branch.features.finish(features), images, idx)

    def share_from(self, base: "ASEN") -> None:
        # The trunks are the base's; the attribute embedding (shared by both branches), each branch's
        # ASA, ACA and embedding layer, the classification heads and the proxies are this part's own,
        # the branches' layers starting from the base's trained values.
        self.global_branch.load_state_dict(base.global_branch.state_dict())
        self.global_branch.features = base.global_branch.features
        if self.heads is not None:
            self.cls_stage = base.cls_stage
        if self.local:
            self.local_branch.load_state_dict(base.local_branch.state_dict())
            self.local_branch.features = base.local_branch.features
            self.share.copy_(base.share)

    def own_last_stages(self, frozen: int, source: "ASEN") -> bool:
        owned = False
        if len(self.global_branch.features.stages) > frozen:
            self.global_branch.features = self.global_branch.features.with_own_last(source.global_branch.features)
            owned = True
        if self.heads is not None and not isinstance(self.cls_stage, nn.Identity) and frozen <= 2:
            self.cls_stage = copy.deepcopy(source.cls_stage)  # the classification branch's stride-32 stage
            owned = True
        if self.local and len(self.local_branch.features.stages) > frozen:
            self.local_branch.features = self.local_branch.features.with_own_last(source.local_branch.features)
            owned = True
        return owned

    def embed(self, images: torch.Tensor, attr_idx: torch.Tensor) -> torch.Tensor:
        return self._vectors(images, attr_idx.to(images.device).reshape(-1, 1))[:, 0]

    def attention(self, images: torch.Tensor, attr_idx: torch.Tensor):
        idx = attr_idx.to(images.device).reshape(-1, 1)
        _, w, (h, wd), _ = self._global(images, idx)
        maps = w[:, 0].reshape(-1, h, wd)
        boxes = roi_boxes(maps, self.config.image_size, self.config.roi_threshold)
        return minmax_normalise(maps), boxes

    def training_losses(self, images, attr, labels, stage=1):
        t = self.config.train
        kept: dict[str, Any] = {}

        def embed(idx):
            g, w, hw, x = self._global(images, idx)
            kept.update(w=w, hw=hw, idx=idx, x=x)
            return g

        metric, g = self.metric_terms(embed, attr, labels)
        loss_g = metric.pop("metric")
        named = {("global" if k == "triplet" else k): v for k, v in metric.items()}
        if self.heads is not None:  # the classification branch (classifier = "linear" / "both")
            named["classification"] = L.multitask_cross_entropy(self._logits(kept["x"]), labels)
            loss_g = loss_g + t.cls_weight * named["classification"]
        if not self.local or stage == 1:
            return {"loss": loss_g, **named}
        own = attr.repeat(3)
        w = kept["w"]
        if kept["idx"].shape[1] > 1:  # batch_all / batch_hard embedded every attribute: keep each image's own
            w = w[torch.arange(w.shape[0], device=w.device), own]
        l, _ = self._local(images, own.reshape(-1, 1), w.reshape(w.shape[0], 1, -1), kept["hw"])
        l = l[:, 0]
        loss_l = L.triplet_ranking_loss(*L.split_triplets(l), margin=t.margin)
        align = L.alignment_loss(g, l)
        total = loss_g + t.local_weight * loss_l + t.align_weight * align
        return {"loss": total, **named, "local": loss_l, "align": align}

    def parameter_groups(self, stage: int, lr: float | None = None) -> list[dict]:
        t = self.config.train
        global_params = list(self.attr_embedding.parameters()) + list(self.global_branch.parameters())
        for extra in (self.proxies, self.heads, self.cls_stage):
            if extra is not None:
                global_params += list(extra.parameters())
        if stage == 1:
            return self.split_trunk(global_params, t.lr if lr is None else lr, "global")
        # Stage 2 (as asenpp): local branch at the fast rate, global branch and attributes at the slow one.
        return (self.split_trunk(list(self.local_branch.parameters()), t.stage2_lr_local, "local")
                + self.split_trunk(global_params, t.stage2_lr_global, "global"))

    def trunk_stages(self) -> list[tuple[int, nn.Module]]:
        stages = self.global_branch.features.numbered()
        if self.heads is not None and not isinstance(self.cls_stage, nn.Identity):
            stages.append((2, self.cls_stage))  # the trunk's own stride-32 stage
        if self.local:
            stages += self.local_branch.features.numbered()
        return stages

    def start_stage(self, stage: int) -> None:
        if self.local and stage >= 2:
            self.share.fill_(self.config.global_share)


class CSN(Extendable):
    """Conditional Similarity Networks: embedding * mask[attribute]."""

    def __init__(self, config: ModelConfig, schema: AttributeSchema):
        super().__init__(config, schema)
        c = config
        a, e = len(schema), c.embed_dim
        if e < a:
            raise ConfigError(f"csn: embed_dim {e} must be at least the number of attributes ({a}) for disjoint masks")
        self.features = StagedFeatures(build_trunk(c.trunk, c.trunk_weights), c.feature_stage)
        self.fc = nn.Linear(self.features.out_channels, e)
        block = e // a
        disjoint = torch.zeros(a, e)
        for i in range(a):
            disjoint[i, i * block:(i + 1) * block] = 1.0
        if c.csn_mask == "fixed":
            self.register_buffer("masks", disjoint)
        elif c.csn_mask_init == "disjoint":
            self.masks = nn.Parameter(disjoint.clamp_min(0.1))  # the code's "prein": 1 on the block, 0.1 elsewhere
        else:
            self.masks = nn.Parameter(torch.empty(a, e).normal_(0.9, 0.7))
        self.dims = {n: e for n in schema.names}
        self.attach_proxies(e)

    def trunk_stages(self) -> list[tuple[int, nn.Module]]:
        return self.features.numbered()

    def _mask(self) -> torch.Tensor:
        return F.relu(self.masks) if self.config.csn_mask == "learned" else self.masks

    def _embedding(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(_pool(self.features(images)))

    def embed_all(self, images):
        return self.embed_from(self.trunk_map(images), images)

    def trunk_map(self, images: torch.Tensor) -> LastStagePass:
        return self.features.shared_pass(images)

    def share_from(self, base: "CSN") -> None:
        # The trunk is the base's; the embedding layer (from the base's values), masks, proxies this part's.
        self.fc.load_state_dict(base.fc.state_dict())
        self.features = base.features

    def own_last_stages(self, frozen: int, source) -> bool:
        if len(self.features.stages) <= frozen:
            return False
        self.features = self.features.with_own_last(source.features)
        return True

    def check_extendable(self) -> None:
        if self.config.csn_mask == "fixed":
            raise ExtensionError("a csn model with fixed masks (csn_mask = fixed) cannot be extended: a new "
                                 "attribute's fixed mask would have nothing to learn")

    def embed_from(self, features: LastStagePass, images: torch.Tensor) -> torch.Tensor:
        e = self.fc(_pool(self.features.finish(features))).unsqueeze(1) * self._mask().unsqueeze(0)
        idx = torch.arange(self.num_attributes, device=images.device).expand(images.shape[0], -1)
        return self.with_posteriors(l2n(e), e, idx)

    def training_losses(self, images, attr, labels, stage=1):
        t = self.config.train
        x = self._embedding(images)
        masks = self._mask()
        metric, _ = self.metric_terms(lambda idx: x.unsqueeze(1) * masks[idx], attr, labels)
        m = masks[attr]  # [T, E]: the masks the sampled triplets use
        embed_norm, mask_norm = L.csn_norm_penalties(x, m, attr.shape[0])
        total = metric.pop("metric") + t.embed_norm_weight * embed_norm + t.mask_norm_weight * mask_norm
        return {"loss": total, **metric, "embed_norm": embed_norm, "mask_norm": mask_norm}


class _Heads(nn.Module):
    """One linear classifier per attribute over its visible values (a single matmul, split)."""

    def __init__(self, in_features: int, sizes: list[int]):
        super().__init__()
        self.sizes = list(sizes)
        self.fc = nn.Linear(in_features, sum(sizes))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(self.fc(x), self.sizes, dim=-1))


class AGMLAN(Extendable):
    """Attribute-guided multi-level attention network."""

    def __init__(self, config: ModelConfig, schema: AttributeSchema):
        super().__init__(config, schema)
        c = config
        trunk = build_trunk(c.trunk, c.trunk_weights)
        c8, c16, c32 = trunk.channels
        self.s8, self.s16, self.s32 = trunk.stages[0], trunk.stages[1], trunk.stages[2]
        # layer2 (stride 8) projected to layer3's channels and resized to its grid, then added.
        self.proj = nn.Sequential(nn.Conv2d(c8, c16, 1, bias=False), nn.BatchNorm2d(c16))
        self.heads = _Heads(c32, [a.num_classes for a in schema])
        cm = c.agmlan_channels
        self.reduce = nn.Sequential(nn.Conv2d(2 * c16, cm, 1, bias=False), nn.BatchNorm2d(cm), nn.ReLU(inplace=True))
        self.attr_embedding = nn.Embedding(len(schema), c.attr_embed_dim)
        self.asa = AttributeSpatialAttention(cm, c.attr_embed_dim, c.asa_dim)
        self.spatial = PooledSpatialAttention()
        self.aca = AttributeChannelAttention(cm, c.attr_embed_dim, c.aca_reduction)
        self.fc = nn.Linear(cm, c.embed_dim)
        self.masks = nn.Parameter(torch.empty(len(schema), c.embed_dim).normal_(0.9, 0.7))
        self.log_vars = nn.Parameter(torch.zeros(2))  # task uncertainty: classification, triplet
        self.dims = {n: c.embed_dim for n in schema.names}
        self.attach_proxies(c.embed_dim)

    def trunk_stages(self) -> list[tuple[int, nn.Module]]:
        return [(0, self.s8), (1, self.s16), (2, self.s32)]

    def _fused(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f8 = self.s8(images)
        f16 = self.s16(f8)
        fused = f16 + F.adaptive_avg_pool2d(self.proj(f8), f16.shape[-2:])
        return fused, f16

    def _embed(self, fused: torch.Tensor, f16: torch.Tensor, idx: torch.Tensor):
        x = self.reduce(torch.cat([fused, f16], dim=1))
        a = self.attr_embedding(idx)  # [B, K, e]
        w = self.asa.weights(x, a)  # [B, K, hw]
        att = w * self.spatial(x, w)
        pooled = torch.bmm(att, x.flatten(2).transpose(1, 2))  # [B, K, C]
        e = l2n(self.fc(self.aca(pooled, a)) * F.relu(self.masks[idx]))
        return e, att, (x.shape[-2], x.shape[-1])

    def embed_all(self, images):
        return self.embed_from(self.trunk_map(images), images)

    def trunk_map(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fused(images)

    def embed_from(self, features: tuple[torch.Tensor, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        fused, f16 = features
        idx = torch.arange(self.num_attributes, device=images.device).expand(images.shape[0], -1)
        e = self._embed(fused, f16, idx)[0]
        return self.with_posteriors(e, e, idx)

    def share_from(self, base: "AGMLAN") -> None:
        # The trunk's stages and the stride-8 projection (``trunk_map``) are the base's; the reduction,
        # attention and embedding layers (from the base's values), the attribute embedding, masks,
        # heads and proxies are this part's own.
        for own, theirs in ((self.reduce, base.reduce), (self.asa, base.asa), (self.spatial, base.spatial),
                            (self.aca, base.aca), (self.fc, base.fc)):
            own.load_state_dict(theirs.state_dict())
        self.log_vars.data.copy_(base.log_vars.data)
        self.s8, self.s16, self.s32, self.proj = base.s8, base.s16, base.s32, base.proj

    def embed(self, images, attr_idx):
        fused, f16 = self._fused(images)
        idx = attr_idx.to(images.device).reshape(-1, 1)
        e = self._embed(fused, f16, idx)[0]
        return self.with_posteriors(e, e, idx)[:, 0]

    def attention(self, images, attr_idx):
        fused, f16 = self._fused(images)
        _, att, (h, w) = self._embed(fused, f16, attr_idx.to(images.device).reshape(-1, 1))
        return minmax_normalise(att[:, 0].reshape(-1, h, w)), None

    def training_losses(self, images, attr, labels, stage=1):
        fused, f16 = self._fused(images)
        logits = self.heads(_pool(self.s32(fused)))
        cls = L.multitask_cross_entropy(logits, labels)
        metric, _ = self.metric_terms(lambda idx: self._embed(fused, f16, idx)[0], attr, labels)
        total = L.uncertainty_weighted([cls, metric.pop("metric")], self.log_vars)
        return {"loss": total, "classification": cls, **metric}


class GlobalEmbedding(AttributeModel):
    """One attribute-agnostic embedding, repeated for every attribute."""

    def __init__(self, config: ModelConfig, schema: AttributeSchema):
        super().__init__(config, schema)
        c = config
        self.features = StagedFeatures(build_trunk(c.trunk, c.trunk_weights), c.feature_stage)
        self.fc = nn.Linear(self.features.out_channels, c.embed_dim)
        self.dims = {n: c.embed_dim for n in schema.names}
        self.attach_proxies(c.embed_dim)

    def trunk_stages(self) -> list[tuple[int, nn.Module]]:
        return self.features.numbered()

    def _embedding(self, images):
        return l2n(self.fc(_pool(self.features(images))))

    def embed_all(self, images):
        e = self._embedding(images).unsqueeze(1).expand(-1, self.num_attributes, -1).contiguous()
        idx = torch.arange(self.num_attributes, device=images.device).expand(images.shape[0], -1)
        return self.with_posteriors(e, e, idx)

    def training_losses(self, images, attr, labels, stage=1):
        e = self._embedding(images).unsqueeze(1)
        metric, _ = self.metric_terms(lambda idx: e.expand(-1, idx.shape[1], -1), attr, labels)
        return {"loss": metric.pop("metric"), **metric}


class MultiTaskClassifier(Extendable):
    """A softmax head per attribute; the posterior (as a unit vector, ``config.posterior``) is the
    attribute's vector."""

    def __init__(self, config: ModelConfig, schema: AttributeSchema):
        super().__init__(config, schema)
        c = config
        self.features = StagedFeatures(build_trunk(c.trunk, c.trunk_weights), c.feature_stage)
        self.heads = _Heads(self.features.out_channels, [a.num_classes for a in schema])
        self.dims = {a.name: config.posterior_width(a.num_classes) for a in schema}

    def trunk_stages(self) -> list[tuple[int, nn.Module]]:
        return self.features.numbered()

    def logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.heads(_pool(self.features(images)))

    def embed_all(self, images):
        return self.embed_from(self.trunk_map(images), images)

    def trunk_map(self, images: torch.Tensor) -> LastStagePass:
        return self.features.shared_pass(images)

    def embed_from(self, features: LastStagePass, images: torch.Tensor) -> torch.Tensor:
        d = self.dim
        return torch.stack([pad_to(posterior_vector(lg, self.config.posterior), d)
                            for lg in self.heads(_pool(self.features.finish(features)))], dim=1)

    def share_from(self, base: "MultiTaskClassifier") -> None:
        self.features = base.features  # the heads are per attribute

    def own_last_stages(self, frozen: int, source) -> bool:
        if len(self.features.stages) <= frozen:
            return False
        self.features = self.features.with_own_last(source.features)
        return True

    def training_losses(self, images, attr, labels, stage=1):
        loss = L.multitask_cross_entropy(self.logits(images), labels)
        return {"loss": loss, "classification": loss}

