"""Fitting a compact model (``fgplugin export --dim N``; the map is ``fgplugin.models.compact``): the
trained model encodes its training split once, and each attribute's principal axes are fitted on those
vectors. Only the training part is used, so the validation and test figures of the compact model stay
honest."""

from __future__ import annotations

import torch

from ..catalog import Catalog
from ..evaluation import encode_catalog
from ..models import AttributeModel
from ..models.compact import CompactError, CompactModel, fit_projection
from ..progress import OnProgress
from ..splits import Splits


def compact_model(model: AttributeModel, catalog: Catalog, splits: Splits, dim: int, *,
                  device: str | torch.device = "cpu", batch_size: int = 64,
                  on_progress: OnProgress | None = None) -> CompactModel:
    """``model`` followed by its ``dim``-value projection, fitted on the catalog's training split."""
    have = catalog.by_id()
    ids = [i for i in splits.train if i in have]
    if not ids:
        raise CompactError(f"no item of the training split is in {catalog.path}: the projection is fitted on it")
    vecs = encode_catalog(model, catalog, ids, batch_size=batch_size, device=device, on_progress=on_progress)
    projection = fit_projection(vecs.numpy(), dict(model.dims), list(model.schema.names), dim)
    return CompactModel(model.cpu(), projection).eval()


__all__ = ["compact_model"]
