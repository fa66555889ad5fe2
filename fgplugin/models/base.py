"""The interface every model variant implements (evaluation, export and the encoder rely on it)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..preprocess import Preprocess
from ..schema import AttributeSchema
from . import losses as L
from .config import ModelConfig
from .vectors import pad_to, posterior_vector


class AttributeModel(nn.Module):
    """An image -> one L2-normalised vector per attribute model (an ``fgplugin.encoding.Encoder``).

    - ``dims[name]``: the meaningful size of attribute ``name``'s vector; ``embed_all`` pads every
      attribute to D = max(dims) with zeros (so ``out[:, i, :dims[name]]`` is the vector).
    - ``embed_all`` runs each trunk once per batch and has no data-dependent Python control flow,
      so ``torch.jit.trace`` / ``torch.export`` capture it.
    - ``training_losses`` gives the variant's own objective on a triplet batch (``.losses``).
    """

    config: ModelConfig
    schema: AttributeSchema
    dims: dict[str, int]
    proxies: L.ProxyClassifier | None  # the proxy classifier (``attach_proxies``), None without one
    training_stages: tuple[int, ...] = (1,)  # ASEN_v2 has two: 1 (global branch) and 2 (joint)

    def __init__(self, config: ModelConfig, schema: AttributeSchema):
        super().__init__()
        self.config = config
        self.schema = schema
        self.num_attributes = len(schema)
        self.proxies = None  # a plain attribute until attach_proxies registers the module

    @property
    def device(self) -> torch.device:
        """Where the parameters are, so where ``embed_all`` runs."""
        return next(self.parameters()).device

    @property
    def dim(self) -> int:
        """D: the common (padded) vector size of ``embed_all``."""
        return max(self.dims.values())

    @property
    def preprocess(self) -> Preprocess:
        """How an image becomes this model's input (size, mean, std), as ``ExportedEncoder.preprocess``."""
        return self.config.preprocess()

    @property
    def query_slack(self) -> bool:
        """Whether each vector ends with the slack value a query drops (as ``ExportedEncoder.query_slack``)."""
        return self.config.query_slack

    def embed_all(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, A, D]: every attribute's L2-normalised vector."""
        raise NotImplementedError

    def embed(self, images: torch.Tensor, attr_idx: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S], [B] -> [B, D]: the vector of attribute ``attr_idx[i]`` for image i."""
        out = self.embed_all(images)
        return out[torch.arange(out.shape[0], device=out.device), attr_idx.to(out.device)]

    def attention(self, images: torch.Tensor, attr_idx: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(attention map [B, h, w] in [0, 1] or None, ROI box [B, 4] (x0, y0, x1, y1) in input pixels or None)."""
        return None, None

    def training_losses(self, images: torch.Tensor, attr: torch.Tensor, labels: torch.Tensor, stage: int = 1) -> dict[str, torch.Tensor]:
        """The variant's objective on a triplet batch.

        ``images`` [3T, 3, S, S]: anchors, then positives, then negatives; ``attr`` [T] the triplets'
        attribute; ``labels`` [3T, A] class indices (-1 = unknown) of the same images.
        Returns {"loss": total, ...named parts (detached copies are logged)}.
        """
        raise NotImplementedError

    def attach_proxies(self, dim: int) -> None:
        """Give the model its proxy classifier when ``config.proxy_term`` (called after ``dims`` is
        set). With ``proxy_share`` > 0 each attribute's vector also carries its posterior, so
        ``dims`` grows by the attribute's value count."""
        sizes = [a.num_classes for a in self.schema]
        self.proxies = L.ProxyClassifier(sizes, dim, self.config.train.cls_scale) if self.config.proxy_term else None
        if self.config.proxy_share > 0:
            self.dims = {a.name: self.dims[a.name] + self.config.posterior_width(a.num_classes) for a in self.schema}

    def with_posteriors(self, vectors: torch.Tensor, emb: torch.Tensor, idx: torch.Tensor,
                        logits: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Unit ``vectors`` [B, K, D0] under attributes ``idx`` [B, K], with the classifier's posterior
        appended when ``proxy_share`` = s > 0: [sqrt(1 - s) * vector, sqrt(s) * posterior], so
        cosine = (1 - s) cos + s cos_posterior. The posterior comes from the proxies on ``emb``
        [B, K, E] (the embedding they were trained on) or, with classifier = "linear" / "both", from the
        per-attribute ``logits`` ([B, values] each)."""
        s = self.config.proxy_share
        if s == 0:
            return vectors
        if logits is None:
            post = self.proxies.posteriors(emb, idx, self.config.posterior)
        else:
            width = self.config.posterior_width(max(a.num_classes for a in self.schema))  # not traced shapes
            every = torch.stack([pad_to(posterior_vector(lg, self.config.posterior), width) for lg in logits], dim=1)
            post = every[torch.arange(idx.shape[0], device=idx.device).unsqueeze(1), idx]  # [B, K, V]
        return torch.cat([(1 - s) ** 0.5 * vectors, s ** 0.5 * post.to(vectors.dtype)], dim=-1)

    def metric_terms(self, embed: "Callable[[torch.Tensor], torch.Tensor]", attr: torch.Tensor,
                     labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The metric loss on a triplet batch, as ``config.train.mining`` says, plus the proxy
        classification term when ``train.cls_weight`` > 0.

        ``embed(idx [N, K]) -> [N, K, E]`` embeds every image under K attributes. Returns
        ({"metric": weighted total, "triplet": ..., ["proxy": ...]}, each image's embedding under its
        own triplet's attribute [N, E]).
        """
        t = self.config.train
        n = labels.shape[0]
        own = attr.repeat(3)
        if t.mining in ("batch_all", "batch_hard"):
            idx = torch.arange(self.num_attributes, device=labels.device).expand(n, -1)
            e = embed(idx)
            loss = L.batch_all_triplet_loss if t.mining == "batch_all" else L.batch_hard_triplet_loss
            trip, mine = loss(e, labels, t.margin), e[torch.arange(n, device=e.device), own]
        else:
            idx = own.reshape(-1, 1)
            e = embed(idx)
            mine = e[:, 0]
            trip = L.triplet_ranking_loss(*L.split_triplets(mine), margin=t.margin)
        parts = {"metric": trip, "triplet": trip}
        if self.proxies is not None:
            parts["proxy"] = self.proxies(e, idx, labels)
            parts["metric"] = trip + t.cls_weight * parts["proxy"]
        return parts, mine

    def trunk_stages(self) -> list[tuple[int, nn.Module]]:
        """(stage index 0-2, module) of every trunk stage the model holds (``build_trunk``), wherever the
        variant keeps it: where pretrained weights live, and what ``train.freeze_stages`` counts."""
        return []

    def trunk_modules(self) -> list[nn.Module]:
        """The parts built from a trunk, where pretrained weights live."""
        return [m for _, m in self.trunk_stages()]

    def frozen_trunk_stages(self) -> list[nn.Module]:
        """The trunk stages that ``train.freeze_stages`` keeps as loaded (the first n of every trunk)."""
        n = self.config.train.freeze_stages
        return [m for i, m in self.trunk_stages() if i < n]

    def freeze_trunk_stages(self) -> None:
        """Stop gradients into the frozen stages."""
        for m in self.frozen_trunk_stages():
            m.requires_grad_(False)
        self.train(self.training)  # their BatchNorm layers to eval mode now, too

    def train(self, mode: bool = True) -> "AttributeModel":
        super().train(mode)
        for m in self.frozen_trunk_stages():
            m.eval()  # frozen stages keep their BatchNorm running statistics, not the batch's
        return self

    def parameter_groups(self, stage: int, lr: float | None = None) -> list[dict]:
        """Optimiser parameter groups for a training stage (default: everything at ``lr`` / config lr,
        the trunk at ``lr * train.trunk_lr_scale``)."""
        lr = self.config.train.lr if lr is None else lr
        return self.split_trunk([p for p in self.parameters() if p.requires_grad], lr, "all")

    def split_trunk(self, params: list[nn.Parameter], lr: float, name: str) -> list[dict]:
        """One group ``name`` at ``lr``, or, with ``train.trunk_lr_scale`` != 1, the trunk's parameters
        among ``params`` apart at the scaled rate (heads first: the trainer logs the first group's lr).
        An unscaled run keeps one group, so its optimiser state matches older checkpoints."""
        scale = self.config.train.trunk_lr_scale
        if scale == 1.0:
            return [{"params": params, "lr": lr, "name": name}]
        in_trunk = {id(p) for m in self.trunk_modules() for p in m.parameters()}
        groups = [{"params": [p for p in params if id(p) not in in_trunk], "lr": lr, "name": name},
                  {"params": [p for p in params if id(p) in in_trunk], "lr": lr * scale, "name": f"{name} trunk"}]
        return [g for g in groups if g["params"]]

    def start_stage(self, stage: int) -> None:
        """Hook called when training enters ``stage`` (ASEN_v2 switches its local branch on)."""

    def extra_repr(self) -> str:
        return f"variant={self.config.variant}, trunk={self.config.trunk}, attributes={self.num_attributes}, D={self.dim}"

