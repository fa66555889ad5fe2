"""The Encoder contract: what the parts that encode images (evaluation, the index worker, queries, the
HTTP server) may ask of a model, declared once.

Two families implement it: the training model (``fgplugin.models.AttributeModel``, an ``Encoder`` and an
``AttentionModel``) and the loaded export (``fgplugin.export.ExportedEncoder``, a ``DeployedEncoder``:
versioned, with a model card and numpy output, but no attention branch). Callers use these attributes directly; nothing probes with getattr.

This module imports neither torch nor numpy at run time, so a query client without the training
stack can name the contract.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:  # annotations only: the contract itself needs neither library
    from pathlib import Path

    import numpy as np
    import torch

    from .preprocess import Preprocess
    from .schema import AttributeSchema


@runtime_checkable
class Encoder(Protocol):
    """Images in, one L2-normalised vector per attribute out."""

    @property
    def schema(self) -> "AttributeSchema":
        """The attribute schema the model was trained for (its names are the vector order)."""

    @property
    def preprocess(self) -> "Preprocess":
        """How an image becomes the input tensor (size, mean, std), the same everywhere."""

    @property
    def query_slack(self) -> bool:
        """posterior = prob models: each vector ends with a slack value a query drops (fgplugin.similarity)."""

    @property
    def device(self) -> "torch.device":
        """Where ``embed_all`` runs; inputs are moved there by the caller."""

    @property
    def dims(self) -> Mapping[str, int]:
        """Vector size per attribute."""

    def embed_all(self, images: "torch.Tensor") -> "torch.Tensor":
        """[B, 3, H, W] preprocessed images -> [B, A, D] vectors (A attributes in schema order)."""


@runtime_checkable
class DeployedEncoder(Encoder, Protocol):
    """An exported, versioned encoder as the index worker, queries and ``fgplugin serve`` use it."""

    @property
    def path(self) -> "Path":
        """The export folder (shown in reports and recorded in the store)."""

    @property
    def version(self) -> str:
        """Content hash of the export: documents record it; a new version means re-encoding."""

    @property
    def card(self) -> Mapping[str, Any]:
        """The model card (``model.json``)."""

    @property
    def attributes(self) -> Sequence[str]:
        """The schema's attribute names, in vector order."""

    def encode_tensors(self, batch: "torch.Tensor") -> Mapping[str, "np.ndarray"]:
        """[B, 3, H, W] preprocessed images -> attribute -> float32 [B, d] unit vectors."""


@runtime_checkable
class AttentionModel(Protocol):
    """A model that can show where each attribute's branch looks: every training model
    (``AttributeModel``); a variant without attention answers ``(None, None)``. An export keeps only the
    encoder, so it is never one."""

    @property
    def schema(self) -> "AttributeSchema":
        """As ``Encoder.schema``."""

    @property
    def preprocess(self) -> "Preprocess":
        """As ``Encoder.preprocess``."""

    def attention(self, images: "torch.Tensor",
                  attr_idx: "torch.Tensor") -> "tuple[torch.Tensor | None, torch.Tensor | None]":
        """(attention map [B, h, w] in [0, 1] or None, ROI box [B, 4] (x0, y0, x1, y1) in input pixels or None)."""
