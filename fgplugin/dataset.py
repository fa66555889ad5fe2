"""Torch datasets over a catalog: images decoded on demand, labels as class indices."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .catalog import Catalog
from .errors import ImageError
from .images import load_image


class CatalogImages(Dataset):
    """Items ``ids`` of ``catalog``: returns (image tensor, row index into ``ids``).

    Labels are available as ``self.labels`` (int64 [N, A], -1 = missing / not visible), aligned with
    ``ids``, so samplers and losses index them without touching images.
    """

    def __init__(self, catalog: Catalog, ids: Sequence[str], transform: Callable):
        lookup = catalog.by_id()
        missing = [i for i in ids if i not in lookup]
        if missing:
            raise ImageError(missing[0], f"id not in catalog {catalog.path} ({len(missing)} missing)", kind="missing")
        self.catalog = catalog
        self.ids = list(ids)
        self.items = [lookup[i] for i in self.ids]
        self.transform = transform
        full = catalog.label_matrix()
        row_of = {it.id: r for r, it in enumerate(catalog.items)}
        self.labels = full[[row_of[i] for i in self.ids]] if self.ids else np.zeros((0, len(catalog.schema)), np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.items[i]
        img = load_image(item.image, base_dir=self.catalog.base_dir)
        return self.transform(img), i
