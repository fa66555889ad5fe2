"""Image preprocessing shared by training, evaluation, export, the encoder worker and the server.

One definition, recorded in the model card, so an image becomes the same tensor everywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYMMETRIC = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # maps [0, 1] to [-1, 1] (EfficientNet-Lite weights)


@dataclass(frozen=True)
class Preprocess:
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def transform(self) -> T.Compose:
        # Squash to a square (no crop): attributes at the edges (hem, sleeves) must stay in view.
        return T.Compose([
            T.ToImage(),
            T.Resize((self.image_size, self.image_size), antialias=True),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(list(self.mean), list(self.std)),
        ])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform()(image.convert("RGB"))

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        tf = self.transform()
        return torch.stack([tf(im.convert("RGB")) for im in images])

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] RGB (for attention overlays)."""
        m = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        s = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x * s + m).clamp(0, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        return cls(int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]))  # type: ignore[arg-type]
