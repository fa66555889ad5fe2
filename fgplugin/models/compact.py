"""Compact vectors (``fgplugin export --dim N``): each attribute's vector projected to N dimensions by a
linear map fitted on the training split, then re-normalised, so the stores keep N values per attribute
instead of the model's full width (issue 27: ASEN_v2's 1024 + 1024 floats per attribute).

Why a fitted projection rather than a narrower network: the full-width model keeps what it learned
(narrow heads trained from the start lose 1.5-1.8 MAP on the real sets, bench/RESULTS.md "The papers'
head widths"), the projection is fitted in seconds on vectors the model already gives, one trained
model serves every size, and it applies as well to a concatenated vector (ASEN_v2's global + local
branches, a posterior appended by ``proxy_share``) as to a single one: the size is chosen, not doubled.

The map is the principal axes of each attribute's training vectors (PCA): ``y = (x - mean_a) @ basis_a``,
``basis_a`` [D_a, N] the top N right singular vectors of the centred training vectors. Cosines on
``y / |y|`` approximate the full vectors' ranking; ``bench/compact.py`` measures the MAP it costs per
size and codec. A compact model is an ``AttributeModel`` (its ``embed_all`` is the base's followed by the
map), so evaluation, export and the encoder take it as they take any model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import FgpluginError
from .base import AttributeModel
from .vectors import l2n

MIN_ITEMS_PER_DIM = 2  # fewer training vectors than this many per kept dimension: the axes are noise


class CompactError(FgpluginError):
    """A model cannot be compacted as asked (the size, the data, the model)."""


@dataclass(frozen=True)
class Projection:
    """Per attribute (schema order): ``mean`` [A, D] and ``basis`` [A, D, dim] (zero rows past an
    attribute's own width), and the share of the training vectors' variance the kept axes hold."""

    dim: int
    mean: np.ndarray
    basis: np.ndarray
    kept_variance: dict[str, float]
    items: int  # training vectors it was fitted on


def fit_projection(vectors: np.ndarray, dims: dict[str, int], names: list[str], dim: int) -> Projection:
    """The PCA map of each attribute's vectors ``vectors`` [N, A, D] (``dims[name]``: the meaningful width)
    to ``dim`` dimensions. CompactError when ``dim`` is not below every width or the data are too few."""
    n, a, width = vectors.shape
    if a != len(names):
        raise CompactError(f"vectors hold {a} attributes; the schema names {len(names)}")
    narrowest = min(dims[name] for name in names)
    if not 1 <= dim < narrowest:
        raise CompactError(f"--dim {dim}: a compact size must be at least 1 and below the model's narrowest "
                           f"attribute vector ({narrowest} values)")
    if n < MIN_ITEMS_PER_DIM * dim:
        raise CompactError(f"--dim {dim} needs at least {MIN_ITEMS_PER_DIM * dim} training items to fit its axes; "
                           f"the training split has {n}")
    mean = np.zeros((a, width), np.float32)
    basis = np.zeros((a, width, dim), np.float32)
    kept: dict[str, float] = {}
    for i, name in enumerate(names):
        x = vectors[:, i, :dims[name]].astype(np.float64)
        mu = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mu, full_matrices=False)
        mean[i, :dims[name]] = mu
        basis[i, :dims[name]] = vt[:dim].T
        total = float((s ** 2).sum())
        kept[name] = float((s[:dim] ** 2).sum() / total) if total > 0 else 1.0
    return Projection(dim, mean, basis, kept, n)


class CompactModel(AttributeModel):
    """``base`` followed by a fitted ``Projection``: every attribute's vector has ``projection.dim`` values."""

    def __init__(self, base: AttributeModel, projection: Projection):
        if base.query_slack:
            raise CompactError("a model whose vectors end with a slack value (posterior = prob) cannot be compacted: "
                               "the projection would mix the value a query drops into the rest")
        super().__init__(base.config, base.schema)
        self.base = base
        self.dims = {name: projection.dim for name in base.schema.names}
        self.projection_info = {"dim": projection.dim, "items": projection.items,
                                "kept_variance": {k: round(v, 4) for k, v in projection.kept_variance.items()},
                                "from_dims": {k: int(v) for k, v in base.dims.items()}}
        self.register_buffer("mean", torch.from_numpy(projection.mean))
        self.register_buffer("basis", torch.from_numpy(projection.basis))

    def embed_all(self, images: torch.Tensor) -> torch.Tensor:
        x = self.base.embed_all(images) - self.mean
        return l2n(torch.einsum("bad,adk->bak", x, self.basis))

    def attention(self, images: torch.Tensor, attr_idx: torch.Tensor):
        return self.base.attention(images, attr_idx)

    def training_losses(self, images, attr, labels, stage=1):
        raise CompactError("a compact model is not trained: train the full-size model, then export it with --dim")


__all__ = ["CompactError", "CompactModel", "Projection", "fit_projection"]
