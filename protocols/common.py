"""What every protocol needs before it starts: the backbone under test and the default data."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from baselines.backbone import Backbone, create_backbone
from baselines.checkpoints import load_backbone
from protocols.datasets import synthetic
from protocols.result import file_sha256

RANDOM_INIT = "random"
# The embedded evaluation data: synthetic VOC scenes, disjoint from the pretraining default (seed 1).
DEFAULT_EVAL_DATA = dict(images=512, size=96, seed=0)


@dataclass
class BackboneUnderTest:
    backbone: Backbone
    info: dict[str, Any]  # path, sha256, detected format (recorded in every result)

    @property
    def cache_id(self) -> str:
        """What the cached features of this backbone depend on."""
        if self.info["sha256"]:
            return self.info["sha256"]
        return f"random-init-{self.info['arch']}-seed{self.info['seed']}"


def backbone_under_test(checkpoint: str | os.PathLike, arch: str | None = None, seed: int = 0,
                        device: str | torch.device = "cpu") -> BackboneUnderTest:
    """`checkpoint` is a file in any supported format, or `random` for a randomly initialised baseline.

    A random ResNet is a strong VOC07 SVM baseline (spec protocols.md §6, fair#34), so it is
    labelled `random-init` everywhere it appears.
    """
    if str(checkpoint) == RANDOM_INIT:
        arch = arch or "resnet50"
        torch.manual_seed(seed)
        backbone = create_backbone(arch).to(device).eval()
        backbone.checkpoint_format = "random-init"
        info = {"path": None, "sha256": None, "format": "random-init", "arch": arch, "seed": seed}
        return BackboneUnderTest(backbone, info)
    path = Path(checkpoint)
    backbone = load_backbone(path, arch, device=device)
    info = {"path": str(path.resolve()), "sha256": file_sha256(path), "format": backbone.checkpoint_format,
            "arch": backbone.name}
    return BackboneUnderTest(backbone, info)


def default_voc_root(progress: bool = True) -> Path:
    return synthetic.cached(**DEFAULT_EVAL_DATA, progress=progress)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
