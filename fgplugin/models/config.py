"""Model and training configuration: one dataclass per concern, paper defaults in configs/<variant>.toml.

``load_config(variant, overrides)`` reads the variant's TOML file and applies overrides. An override
key is a model field (``trunk``), a training field (``lr`` or ``train.lr``); values from the command
line are strings and are parsed as TOML values (``--set lr=3e-4``, ``--set csn_mask=fixed``).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any

from ..errors import FgpluginError
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from .pretrained import recommended_preprocess

VARIANTS = ("asen_v2", "asen", "csn", "ag_mlan", "global", "mtc")  # what each builds: factory.MODELS
POSTERIORS = ("softmax", "sqrt", "prob")


class ConfigError(FgpluginError):
    """A configuration key or value is invalid."""


@dataclass
class TrainConfig:
    """Optimisation settings (paper defaults per variant come from the TOML files)."""

    seed: int = 0
    batch_size: int = 16  # triplets per step (3x as many images)
    steps: int | None = None  # total optimiser steps; None: from epochs
    epochs: float = 50.0
    triplets_per_epoch: int | None = None  # None: one triplet per training item
    lr: float = 1e-4
    lr_step_epochs: float = 3.0  # StepLR: multiply the lr by lr_decay every this many epochs
    lr_decay: float = 0.9
    weight_decay: float = 0.0
    # The trunk's learning rate is lr * trunk_lr_scale (fine-tuning practice for a pretrained trunk:
    # the new heads learn at lr while the ImageNet features move slowly); 1 = one rate for everything
    trunk_lr_scale: float = 1.0
    # Leading trunk stages kept exactly as loaded (no gradient, BatchNorm statistics fixed): 1 = the
    # stride-8 stem, as detectron2's freeze_at does for pretrained backbones. Low-level ImageNet filters
    # need no fine-tuning on a small catalog, and the stem's backward pass is the costliest (about 40 %
    # of an EfficientNet-Lite0 step at 96 px); 3 freezes the whole trunk (a linear probe)
    freeze_stages: int = 0
    # `train --extend`: the new part trains its own copy of the last trunk stage on each of its paths
    # (where freeze_stages leaves that stage trainable), so a new attribute unlike the base's (colour
    # after shape attributes) is not limited to the features the base's training kept; false shares
    # the base's stages (a smaller export and a faster extension)
    extend_last_stage: bool = True
    # where that copy starts: "base", the base's fine-tuned stage; "weights", the trunk's own weights
    # (trunk_weights, as training from the start; random without), which still hold what the base tuned away
    extend_stage_start: str = "base"
    margin: float = 0.2
    # sampled: the loss sees exactly the sampled triplets (the papers); batch_all: every valid triplet
    # among the batch's images, for every attribute (many more per trunk pass: learns much faster);
    # batch_hard: only the hardest positive and negative of each anchor among them (harder negatives)
    mining: str = "sampled"
    # Proxy classification on each attribute's embedding, added to the metric loss with this weight
    # (0: the papers' objective). Learned proxies, one per value; logits = cls_scale * cosine.
    cls_weight: float = 0.0
    cls_scale: float = 16.0
    sampling: str = "balanced"  # balanced: attribute, then two values uniformly (papers); natural: anchor item uniformly
    augment: bool = True  # small random resized crop + horizontal flip
    crop_scale: float = 0.8  # smallest area fraction of the random crop
    # ASEN_v2 second stage (joint): global + local_weight * local + align_weight * alignment
    stage1_fraction: float = 0.7  # share of the steps spent in stage 1 (50 of 70 epochs in the paper)
    stage2_lr_local: float = 1e-4
    stage2_lr_global: float = 1e-5
    stage2_lr_step_epochs: float = 1.0
    local_weight: float = 0.1
    align_weight: float = 0.1
    # CSN norm penalties (the paper's embed_loss and mask_loss)
    embed_norm_weight: float = 5e-3
    mask_norm_weight: float = 5e-4
    # Runtime
    amp: bool = True  # autocast on CUDA (ignored on CPU)
    workers: int = 2
    cache: str = "auto"  # auto | memory | off: keep decoded images in memory
    cache_max_mb: int = 2048
    eval_every: int | None = None  # steps between validations; None: about 10 per run
    checkpoint_every: int | None = None  # steps between last/ checkpoints; None: with validation
    valid_max_items: int = 2000  # cap on validation items (queries + candidates)


@dataclass
class ModelConfig:
    variant: str
    trunk: str = "resnet18"
    trunk_weights: str | None = None
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    embed_dim: int = 1024
    feature_stage: int = 2  # trunk stages feeding the embedding: 2 = stride 16 (ASEN), 3 = stride 32
    # ASEN / ASEN_v2 attention
    attr_embed_dim: int = 512
    asa_dim: int = 512
    aca_reduction: int = 2
    # ASEN_v2 local branch
    local_trunk: str = "resnet34"
    local_trunk_weights: str | None = None
    local_size: int = 112
    local_asa_dim: int = 256
    roi_threshold: float = 0.1
    global_share: float = 0.6  # test-time similarity = share * cos_global + (1 - share) * cos_local
    # Share of the proxy posterior in each attribute's vector (needs train.cls_weight > 0): similarity =
    # (1 - proxy_share) * cos(embeddings) + proxy_share * cos(posteriors over the attribute's values)
    proxy_share: float = 0.0
    # How a posterior p over an attribute's values becomes a unit vector (mtc's vectors, the part
    # proxy_share appends): softmax (p / |p|: cosine of the posteriors, as the papers' baselines),
    # sqrt (sqrt(p), already unit: cosine = the Bhattacharyya coefficient sum sqrt(p_i q_i)) or prob
    # ([p, sqrt(1 - |p|^2)], one value longer; a query drops the last value, so it ranks items by
    # p_q . p_x, the probability they hold its value: see fgplugin.similarity)
    posterior: str = "softmax"
    # The classifier behind train.cls_weight: proxy (cosine to one learned proxy per value, on each
    # attribute's embedding; every variant) or linear (asen / asen_v2: AG-MLAN's classification
    # branch, a softmax head per attribute on the pooled stride-32 trunk features, as mtc) or both
    # (asen / asen_v2: the linear branch gives the posterior, and the proxy term, at the same weight,
    # also trains each attribute's embedding to classify; the embedding is then a second classifier
    # on the attention-pooled features rather than a triplet-only space)
    classifier: str = "proxy"
    # CSN
    csn_mask: str = "learned"  # learned | fixed (disjoint, not trained)
    csn_mask_init: str = "disjoint"  # disjoint (1 on the attribute's block, 0.1 elsewhere) | normal (0.9, 0.7)
    # AG-MLAN
    agmlan_channels: int = 512
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.image_size < 32:
            raise ConfigError(f"image_size {self.image_size} is too small (at least 32)")
        if self.feature_stage not in (2, 3):
            raise ConfigError(f"feature_stage must be 2 (stride 16) or 3 (stride 32), not {self.feature_stage}")
        if not 0.0 < self.global_share <= 1.0:
            raise ConfigError(f"global_share must be in (0, 1], not {self.global_share}")
        if not 0.0 <= self.proxy_share < 1.0:
            raise ConfigError(f"proxy_share must be in [0, 1), not {self.proxy_share}")
        if self.posterior not in POSTERIORS:
            raise ConfigError(f"posterior must be {', '.join(POSTERIORS[:-1])} or {POSTERIORS[-1]}, not {self.posterior!r}")
        if self.classifier not in ("proxy", "linear", "both"):
            raise ConfigError(f"classifier must be proxy, linear or both, not {self.classifier!r}")
        if self.classifier != "proxy" and self.variant not in ("asen", "asen_v2"):
            raise ConfigError(f"classifier = {self.classifier} is for asen and asen_v2, not {self.variant}")
        if self.proxy_share > 0 and (self.variant == "mtc" or self.train.cls_weight <= 0):
            raise ConfigError("proxy_share > 0 needs the proxy classifier: set train.cls_weight > 0 "
                              "(and a variant other than mtc, whose vectors are posteriors already)")
        if not 0.0 <= self.roi_threshold < 1.0:
            raise ConfigError(f"roi_threshold must be in [0, 1), not {self.roi_threshold}")
        if self.csn_mask not in ("learned", "fixed"):
            raise ConfigError(f"csn_mask must be learned or fixed, not {self.csn_mask!r}")
        if self.csn_mask_init not in ("disjoint", "normal"):
            raise ConfigError(f"csn_mask_init must be disjoint or normal, not {self.csn_mask_init!r}")
        t = self.train
        if t.sampling not in ("balanced", "natural"):
            raise ConfigError(f"sampling must be balanced or natural, not {t.sampling!r}")
        if t.mining not in ("sampled", "batch_all", "batch_hard"):
            raise ConfigError(f"mining must be sampled, batch_all or batch_hard, not {t.mining!r}")
        if t.cache not in ("auto", "memory", "off"):
            raise ConfigError(f"cache must be auto, memory or off, not {t.cache!r}")
        if t.batch_size < 1 or (t.steps is not None and t.steps < 1) or t.epochs <= 0:
            raise ConfigError("batch_size, steps and epochs must be positive")
        if t.cls_weight < 0 or t.cls_scale <= 0:
            raise ConfigError(f"cls_weight must be >= 0 and cls_scale > 0, not {t.cls_weight} / {t.cls_scale}")
        if not 0.0 < t.trunk_lr_scale <= 10.0:
            raise ConfigError(f"trunk_lr_scale must be in (0, 10], not {t.trunk_lr_scale}")
        if t.freeze_stages not in (0, 1, 2, 3):
            raise ConfigError(f"freeze_stages must be 0, 1, 2 or 3 (leading trunk stages kept as loaded), not {t.freeze_stages}")
        if t.extend_stage_start not in ("base", "weights"):
            raise ConfigError(f"extend_stage_start must be base or weights, not {t.extend_stage_start!r}")
        if not 0.0 < t.stage1_fraction <= 1.0:
            raise ConfigError(f"stage1_fraction must be in (0, 1], not {t.stage1_fraction}")
        if not 0.05 <= t.crop_scale <= 1.0:
            raise ConfigError(f"crop_scale must be in [0.05, 1], not {t.crop_scale}")
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("mean and std need three values (R, G, B)")

    def preprocess(self) -> Preprocess:
        return Preprocess(self.image_size, self.mean, self.std)  # type: ignore[arg-type]

    @property
    def proxy_term(self) -> bool:
        """Whether training adds the proxy classification term on the embeddings (``classifier``)."""
        return self.train.cls_weight > 0 and self.classifier in ("proxy", "both")

    @property
    def has_posterior(self) -> bool:
        """Whether the vectors carry a classifier posterior (mtc's are one; proxy_share appends one)."""
        return self.variant == "mtc" or self.proxy_share > 0

    @property
    def query_slack(self) -> bool:
        """Whether each vector ends with the slack coordinate that a query drops (posterior = prob)."""
        return self.has_posterior and self.posterior == "prob"

    def posterior_width(self, values: int) -> int:
        """The length of the posterior vector over ``values`` values (prob adds the slack)."""
        return values + (1 if self.posterior == "prob" else 0)

    @property
    def linear_branch(self) -> bool:
        """Whether asen / asen_v2 carry the linear classification branch (``classifier``)."""
        return self.train.cls_weight > 0 and self.classifier in ("linear", "both")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        train = d.pop("train", {}) or {}
        _check_keys(d, cls, "model")
        _check_keys(train, TrainConfig, "train")
        if "mean" in d:
            d["mean"] = tuple(d["mean"])
        if "std" in d:
            d["std"] = tuple(d["std"])
        return cls(**d, train=TrainConfig(**train))

    def model_fields(self) -> dict[str, Any]:
        """Everything that shapes the network (not how it is trained): must match to resume or load."""
        d = self.to_dict()
        d.pop("train")
        return d


_MODEL_FIELDS = {f.name: f for f in fields(ModelConfig) if f.name != "train"}
_TRAIN_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _check_keys(d: dict[str, Any], cls: type, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {where} config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def _parse_text(value: str) -> Any:
    """A command-line value as a TOML value (numbers, booleans, lists), else the plain string."""
    if value.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _coerce(name: str, f: dataclasses.Field, value: Any) -> Any:
    t = str(f.type)  # a string: this module uses postponed annotations
    if isinstance(value, str) and (t not in ("str", "str | None") or value.lower() in ("none", "null")):
        value = _parse_text(value)
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"config key {name!r} cannot be empty")
    try:
        if t.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if t.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if t.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1", "on"):
                    return True
                if value.lower() in ("false", "no", "0", "off"):
                    return False
                raise ValueError
            return bool(value)
        if t.startswith("tuple"):
            if isinstance(value, str):
                value = [float(v) for v in value.split(",")]
            return tuple(float(v) for v in value)
        if t.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {name!r}: {value!r} is not a valid {t}") from None
    return value


def apply_overrides(config: ModelConfig, overrides: dict[str, Any] | None) -> ModelConfig:
    """A copy of ``config`` with ``overrides`` applied (keys: model fields, training fields, train.X)."""
    d = config.to_dict()
    for key, value in (overrides or {}).items():
        name = key[len("train."):] if key.startswith("train.") else key
        if name in _TRAIN_FIELDS and (key.startswith("train.") or name not in _MODEL_FIELDS):
            d["train"][name] = _coerce(key, _TRAIN_FIELDS[name], value)
        elif name in _MODEL_FIELDS and not key.startswith("train."):
            if name == "variant" and value != config.variant:
                raise ConfigError("the variant cannot be overridden; pick it with load_config(variant, ...)")
            d[name] = _coerce(key, _MODEL_FIELDS[name], value)
        else:
            raise ConfigError(
                f"unknown config key {key!r}; model keys: {', '.join(sorted(_MODEL_FIELDS))}; "
                f"training keys: {', '.join(sorted(_TRAIN_FIELDS))}"
            )
    return ModelConfig.from_dict(d)


def variant_defaults(variant: str) -> dict[str, Any]:
    """The raw TOML table of ``fgplugin/configs/<variant>.toml``."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    text = (resources.files("fgplugin") / "configs" / f"{variant}.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def load_config(variant: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """Paper defaults for ``variant`` (``fgplugin/configs/<variant>.toml``) with ``overrides`` applied.

    When the trunk is an EfficientNet-Lite and mean/std are not overridden, the preprocessing its
    weights expect ([-1, 1] pixels) replaces the ImageNet mean/std.
    """
    d = variant_defaults(variant)
    d.setdefault("variant", variant)
    if d["variant"] != variant:
        raise ConfigError(f"configs/{variant}.toml declares variant {d['variant']!r}")
    config = apply_overrides(ModelConfig.from_dict(d), overrides)
    over = set(overrides or {})
    if config.trunk.startswith("efficientnet_lite") and not over & {"mean", "std"}:
        pre = recommended_preprocess(config.trunk, config.image_size)
        config.mean, config.std = pre.mean, pre.std
    return config


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["lr=3e-4", "train.batch_size=32"]`` -> dict (values stay strings; apply_overrides parses them)."""
    out: dict[str, Any] = {}
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"--set {p!r}: expected key=value")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


__all__ = ["ModelConfig", "TrainConfig", "ConfigError", "VARIANTS", "load_config", "apply_overrides",
           "parse_overrides", "variant_defaults"]
