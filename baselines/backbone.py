"""The one backbone interface every pretrainer and protocol uses: a timm CNN as five named maps.

`feature1` is the stem after conv1+BN+ReLU (before the max-pool) and `feature2`..`feature5` are
the four stages, the numbering of the evaluation protocols (spec protocols.md §1.3). The module's
own children are timm's, so a ResNet's `state_dict()` has torchvision key names and any
torchvision/timm ResNet checkpoint (minus `fc.*`) loads strictly.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from baselines.backbone_names import CONV_INITS, FEATURE_NAMES, REDUCTIONS
from baselines.backbone_names import layer_list as layer_list  # re-exported: the protocols' --layers parser
from baselines.infra import UserError


class ArchitectureError(UserError, ValueError):
    """An architecture name that is not a timm CNN with the five feature maps the protocols need."""


class Backbone(nn.Module):
    """A timm `features_only` trunk whose forward returns `{feature1: ..., ..., feature5: ...}`."""

    def __init__(self, name: str, conv_init: str = "openselfsup", **timm_kwargs) -> None:
        super().__init__()
        trunk = _create_trunk(name, **timm_kwargs)
        if hasattr(trunk, "return_layers"):
            # Adopt the trunk's children so state-dict keys carry no wrapper prefix (ResNets).
            for child_name, module in trunk.named_children():
                self.add_module(child_name, module)
            self._outputs = {layer: FEATURE_NAMES[i] for i, layer in enumerate(trunk.return_layers)}
        else:
            # Models with their own feature class (EfficientNet, ...) keep it whole.
            self.trunk = trunk
            self._outputs = {}
        self.name = name
        self.channels: dict[str, int] = dict(zip(FEATURE_NAMES, trunk.feature_info.channels(), strict=True))
        self.reductions: dict[str, int] = dict(zip(FEATURE_NAMES, trunk.feature_info.reduction(), strict=True))
        init_conv_weights(self, conv_init)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self._outputs:
            return dict(zip(FEATURE_NAMES, self.trunk(x), strict=True))
        features = {}
        for name, module in self.named_children():
            x = module(x)
            if name in self._outputs:
                features[self._outputs[name]] = x
        return features


def _create_trunk(name: str, **timm_kwargs) -> nn.Module:
    if not timm.is_model(name):
        raise ArchitectureError(
            f"unknown architecture {name!r}: not a timm model (e.g. resnet18, resnet50; "
            "see timm.list_models())"
        )
    expected = expected_reductions(timm_kwargs.get("output_stride", 32))
    kwargs = dict(features_only=True, out_indices=(0, 1, 2, 3, 4), pretrained=False)
    if name.startswith(("resnet", "resnext", "wide_resnet", "seresnet", "seresnext")):
        kwargs["zero_init_last"] = False  # the official code never zero-inits bn3 (spec §2.1)
    kwargs.update(timm_kwargs)
    try:
        trunk = timm.create_model(name, **kwargs)
    except (RuntimeError, IndexError, AssertionError) as err:
        raise ArchitectureError(f"architecture {name!r} cannot give five feature maps: {err}") from err
    reductions = tuple(trunk.feature_info.reduction())
    if reductions != expected:
        raise ArchitectureError(
            f"architecture {name!r} has feature reductions {reductions}; the protocols need "
            f"a CNN with the five reductions {expected}"
        )
    return trunk


def expected_reductions(output_stride: int) -> tuple[int, ...]:
    """(2, 4, 8, 16, 32); with output_stride 16 the last stage is dilated instead of strided: (2, 4, 8, 16, 16)."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    return tuple(min(r, output_stride) for r in REDUCTIONS)


def init_conv_weights(module: nn.Module, conv_init: str) -> None:
    """Re-initialise as the official code does, or keep timm's own init.

    "openselfsup": every Conv2d kaiming-normal fan_in (relu), bias 0; BN weight 1, bias 0
    (spec §2.1, OpenSelfSup `backbones/resnet.py`). "timm": leave timm's init (fan_out).
    """
    if conv_init not in CONV_INITS:
        raise ValueError(f"unknown conv_init {conv_init!r}; choose one of {CONV_INITS}")
    if conv_init == "timm":
        return
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def create_backbone(name: str = "resnet50", conv_init: str = "openselfsup", **timm_kwargs) -> Backbone:
    """The single entry point: `create_backbone("resnet50")` gives the official ResNet-50 trunk."""
    return Backbone(name, conv_init=conv_init, **timm_kwargs)
