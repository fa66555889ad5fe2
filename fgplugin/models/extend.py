"""Extending a trained model with new attributes (``fgplugin train --extend``): the contract a variant
implements to be extended (``Extendable``), the extended schema's checks, and the extended model.

An extended model keeps its base whole and frozen and adds one *part* per extension: a model of the
same variant built for the new attributes only, whose attribute-independent modules (trunks, attention,
the shared embedding layer) are the base's own objects (``Extendable.share_from``), so a part learns
only what is specific to its attributes (ASEN / ASEN_v2: the attribute embedding rows, shared by both
branches, plus classifier heads and proxies where the config has them; csn: the masks; ag_mlan: rows,
masks, heads; mtc: the softmax heads). A part may also own a trainable copy of the last trunk stage
on each of its paths (``Extendable.own_last_stages``, on by default: ``train.extend_last_stage``), so
that a new attribute unlike the base's is not limited to what the base's training kept of the image.
``embed_all`` runs the trunk once (up to each last stage, and the base's last stages), then the base's
own code on it with the base's shapes (so the base attributes' vectors are bit-identical to the base
model's: no matmul sees another shape), then each part's (its own last stages on the shared input of
those stages), concatenated after.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import FgpluginError
from ..schema import AttributeSchema
from .base import AttributeModel
from .vectors import pad_to


class ExtensionError(FgpluginError):
    """A model cannot be extended as asked (the variant, an attribute, the schema)."""


class Extendable(AttributeModel):
    """A variant whose attribute set can grow. ``embed_all(images)`` must be exactly
    ``embed_from(trunk_map(images), images)``: the extended model relies on it for bit-identity."""

    def trunk_map(self, images: torch.Tensor) -> Any:
        """The attribute-independent trunk pass (what ``embed_from`` takes)."""
        raise NotImplementedError

    def embed_from(self, features: Any, images: torch.Tensor) -> torch.Tensor:
        """``embed_all`` from the trunk pass ``features`` of ``images``: [B, A, D]."""
        raise NotImplementedError

    def share_from(self, base: "Extendable") -> None:
        """Use ``base``'s attribute-independent modules (the same objects) instead of this model's own.
        This model, built with ``base``'s config for the new attributes, then differs from ``base``
        only in its attribute-specific parameters."""
        raise NotImplementedError

    def check_extendable(self) -> None:
        """Raise ExtensionError when this configuration leaves a new attribute nothing to learn."""

    def own_last_stages(self, frozen: int, source: "Extendable") -> bool:
        """After ``share_from``: replace the shared last trunk stage of each path this model reads
        (unless it is among the first ``frozen`` stages, kept as loaded) with a trainable copy of the
        same stage of ``source`` (a model of the same variant and trunks: the base, or one built from
        the trunks' weights). Returns whether any was copied (False: no such stage to own)."""
        return False


# Variants without the contract, and why (the refusal names the cause).
NOT_EXTENDABLE = {
    "global": "its one embedding is shared by every attribute, so a new attribute has nothing of its own "
              "to learn; train a model with the attribute instead",
}


def extended_schema(base: AttributeSchema, catalog: AttributeSchema, added: list[str], *,
                    catalog_is: str) -> AttributeSchema:
    """The schema of ``base`` extended with ``added`` (declared, with their values, in the catalog's
    schema ``catalog``): base attributes first, in order, then ``added``; name and metadata fields from
    the catalog's schema. Refuses an attribute the base has, one the catalog's schema lacks, and a
    catalog schema whose base attributes are missing or differ from the base's."""
    if not added:
        raise ExtensionError("name at least one new attribute to extend the model with (--attribute NAME)")
    dup = sorted({n for n in added if added.count(n) > 1})
    if dup:
        raise ExtensionError(f"attribute {dup[0]!r} is named twice")
    for n in added:
        if n in base:
            raise ExtensionError(f"attribute {n!r} is already in the base model (its attributes: "
                                 f"{', '.join(base.names)}); --attribute names a new attribute")
        if n not in catalog:
            raise ExtensionError(f"attribute {n!r} is not declared in {catalog_is} (attributes: "
                                 f"{', '.join(catalog.names)}); add it with its values")
    missing = [n for n in base.names if n not in catalog]
    if missing:
        raise ExtensionError(f"{catalog_is} lacks the base model's attribute(s) {', '.join(missing)}; its "
                             "schema must declare the base attributes exactly as the base model has them")
    for a in base:
        if catalog[a.name].to_dict() != a.to_dict():
            raise ExtensionError(
                f"attribute {a.name!r} differs between the base model ({a.to_dict()}) and {catalog_is} "
                f"({catalog[a.name].to_dict()}); the base attributes and their values must stay as they were")
    return AttributeSchema(tuple(base.attributes) + tuple(catalog[n] for n in added), name=catalog.name,
                           metadata=dict(catalog.metadata))


def sub_schema(schema: AttributeSchema, names: list[str]) -> AttributeSchema:
    """The attributes ``names`` of ``schema`` as a schema of their own (a part's)."""
    return AttributeSchema(tuple(schema[n] for n in names), name=schema.name, metadata=dict(schema.metadata))


class ExtendedModel(AttributeModel):
    """A base model (``root``, frozen) plus ``parts`` for added attributes; only the last part trains.

    ``extends``: what the last extension was made from, as the card records it: ``version`` (the base
    export's version, None when extended from a checkpoint), ``attributes`` (the base's, in order) and
    ``added`` (the last part's attributes). ``own_stages``: per part, None when it shares every trunk
    stage, else ``frozen``: it owns copies of its last trunk stages not among the first ``frozen``
    (a checkpoint records it to rebuild the same structure).
    """

    def __init__(self, schema: AttributeSchema, root: Extendable, parts: list[Extendable], extends: dict[str, Any],
                 own_stages: list[int | None]):
        names = [n for m in (root, *parts) for n in m.schema.names]
        if names != schema.names:
            raise ExtensionError(f"the extended model's parts hold {names}, its schema {schema.names}")
        super().__init__(root.config, schema)
        self.root = root
        self.parts = nn.ModuleList(parts)  # each already shares the root's modules (extend_model)
        if len(own_stages) != len(parts):
            raise ExtensionError(f"{len(parts)} extension parts but {len(own_stages)} own-stage flags")
        self.own_stages = [None if o is None else int(o) for o in own_stages]
        self.extends = {"version": extends.get("version"), "attributes": list(extends["attributes"]),
                        "added": list(extends["added"])}
        self.dims = {n: d for m in (root, *parts) for n, d in m.dims.items()}
        self.training_stages = parts[-1].training_stages
        own = {id(p) for m in (root, *parts[:-1]) for p in m.parameters()}
        for p in self.parameters():
            p.requires_grad_(False)
        self._trainable = [p for p in parts[-1].parameters() if id(p) not in own]
        for p in self._trainable:
            p.requires_grad_(True)
        self.train(False)

    @property
    def groups(self) -> list[list[str]]:
        """The attribute names of the root, then of each part (what a checkpoint records to rebuild it)."""
        return [list(m.schema.names) for m in (self.root, *self.parts)]

    @property
    def config(self):
        return self._config

    @config.setter
    def config(self, value) -> None:
        # The trainer sets the run's config (e.g. more steps on resume); the training part's losses read
        # it. The base and the earlier parts keep theirs: the base may be the caller's own model object.
        self._config = value
        if "parts" in self._modules:
            self.parts[-1].config = value

    def _offsets(self) -> list[tuple[AttributeModel, int]]:
        out, start = [], 0
        for m in (self.root, *self.parts):
            out.append((m, start))
            start += m.num_attributes
        return out

    def embed_all(self, images: torch.Tensor) -> torch.Tensor:
        x = self.root.trunk_map(images)
        outs = [self.root.embed_from(x, images)] + [p.embed_from(x, images) for p in self.parts]
        d = self.dim
        return torch.cat([pad_to(o, d) for o in outs], dim=1)

    def attention(self, images: torch.Tensor, attr_idx: torch.Tensor):
        maps = boxes = None
        for m, start in self._offsets():
            sel = (attr_idx >= start) & (attr_idx < start + m.num_attributes)
            mm, bb = m.attention(images, (attr_idx - start).clamp(0, m.num_attributes - 1))
            if mm is not None:
                s = sel.to(mm.device).view(-1, *([1] * (mm.ndim - 1)))
                maps = mm if maps is None else torch.where(s, mm, maps)
            if bb is not None:
                s = sel.to(bb.device).view(-1, 1)
                boxes = bb if boxes is None else torch.where(s, bb, boxes)
        return maps, boxes

    def training_losses(self, images, attr, labels, stage=1):
        part, start = self._offsets()[-1]
        if bool((attr < start).any()):
            raise ExtensionError("an extension trains on triplets of its new attributes only")
        return part.training_losses(images, attr - start, labels[:, start:start + part.num_attributes], stage)

    def parameter_groups(self, stage: int, lr: float | None = None) -> list[dict]:
        # Every new parameter is a head: one rate, train.lr, in every stage.
        return [{"params": list(self._trainable), "lr": self.config.train.lr if lr is None else lr, "name": "added"}]

    def train(self, mode: bool = True) -> "ExtendedModel":
        super().train(mode)
        self.root.eval()  # the base (and every module the parts share with it) stays as it was:
        for p in self.parts[:-1]:  # BatchNorm statistics included
            p.eval()
        return self

    def start_stage(self, stage: int) -> None:
        self.parts[-1].start_stage(stage)

    def extra_repr(self) -> str:
        return f"extends {self.extends['attributes']} with {[g for g in self.groups[1:]]}"


def extend_model(base: AttributeModel, schema: AttributeSchema, added_part: AttributeModel,
                 extends: dict[str, Any], *, own_stages: int | None,
                 stages_from: AttributeModel | None = None) -> ExtendedModel:
    """``base`` (a plain extendable model or an extended one) with ``added_part`` (a fresh model of
    the same variant and config for the attributes ``extends["added"]``) appended; ``own_stages``:
    None, the part shares every trunk stage; n, it owns copies of its last trunk stages not among the
    first n (those are kept as loaded: train.freeze_stages), copied from ``stages_from`` (default: the base)."""
    if isinstance(base, ExtendedModel):
        root, parts, owned = base.root, list(base.parts), list(base.own_stages)
    elif isinstance(base, Extendable):
        root, parts, owned = base, [], []
    else:
        why = NOT_EXTENDABLE.get(base.config.variant, "it does not implement the extension contract")
        raise ExtensionError(f"a {base.config.variant} model cannot be extended: {why}")
    if not isinstance(added_part, Extendable):
        raise ExtensionError(f"a {added_part.config.variant} model cannot be an extension part")
    added_part.check_extendable()
    added_part.share_from(root)  # only the new part: the earlier ones keep what they learned
    if own_stages is not None and not added_part.own_last_stages(own_stages, stages_from or root):
        own_stages = None  # nothing to own: record it as shared, so a rebuild makes the same structure
    return ExtendedModel(schema, root, [*parts, added_part], extends, [*owned, own_stages])


__all__ = ["Extendable", "ExtendedModel", "ExtensionError", "NOT_EXTENDABLE", "extend_model", "extended_schema",
           "sub_schema"]
