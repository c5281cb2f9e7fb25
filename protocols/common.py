"""What every protocol needs before it starts: the backbone under test, what it was pretrained on, the default data.

torch and the models are imported by the functions that use them, so the protocol declarations that import
this module stay importable without them (`densecl-bench eval ... --help`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from baselines.infra import UserError
from baselines.methods import evaluable_methods
from protocols.result import file_sha256

if TYPE_CHECKING:
    import torch

    from baselines.backbone import Backbone

RANDOM_INIT = "random"
# The embedded evaluation data: synthetic VOC scenes, disjoint from the pretraining default (seed 1).
DEFAULT_EVAL_DATA = dict(images=512, size=96, seed=0)
PRETRAINING_KEYS = ("method", "pretrain_data", "epochs", "seed")
# What users call the pretraining data -> how claims.csv names it.
PRETRAIN_NAMES = {"imagenet": "in1k", "in1k": "in1k", "imagenet-1k": "in1k", "coco": "coco"}


class SubjectError(UserError, ValueError):
    """Pretraining metadata that is unknown or contradicts what the checkpoint file declares; one line."""


@dataclass
class BackboneUnderTest:
    backbone: Backbone
    info: dict[str, Any]  # path, sha256, detected format, arch (recorded in every result)
    # method, pretrain_data, epochs, arch, seed: what the verdicts match claims on (recorded in every result)
    pretraining: dict[str, Any] = field(default_factory=dict)

    @property
    def cache_id(self) -> str:
        """What the cached features of this backbone depend on."""
        if self.info["sha256"]:
            return self.info["sha256"]
        return f"random-init-{self.info['arch']}-seed{self.info['seed']}"


def backbone_under_test(checkpoint: str | os.PathLike, arch: str | None = None, seed: int = 0,
                        device: str | torch.device = "cpu", *, method: str | None = None,
                        pretrain_data: str | None = None, epochs: int | None = None,
                        pretrain_seed: int | None = None) -> BackboneUnderTest:
    """`checkpoint` is a file in any supported format, or `random` for a randomly initialised baseline.

    A random ResNet is a strong VOC07 SVM baseline (spec protocols.md §6, fair#34), so it is
    labelled `random-init` everywhere it appears. Method, pretraining data and epochs come from
    our own checkpoints' metadata; for foreign files the caller gives them (`eval --method ...`).
    Given values that contradict the file are an error, not a silent override.
    """
    import torch

    from baselines.backbone import create_backbone
    from baselines.checkpoints import load_backbone

    pretrain_data = PRETRAIN_NAMES.get(str(pretrain_data).lower(), pretrain_data) if pretrain_data else None
    given = {"method": method, "pretrain_data": pretrain_data, "epochs": epochs, "seed": pretrain_seed}
    if method is not None and method not in evaluable_methods():
        raise SubjectError(f"unknown method {method!r}; choose from {', '.join(evaluable_methods())}")
    if str(checkpoint) == RANDOM_INIT:
        # A random init's "pretraining seed" is its init seed: `eval --checkpoint random --pretrain-seed 3`
        # gives the seed-3 baseline that pairs with both methods' seed-3 runs.
        seed = seed if pretrain_seed is None else pretrain_seed
        arch = arch or "resnet50"
        torch.manual_seed(seed)
        backbone = create_backbone(arch).to(device).eval()
        backbone.checkpoint_format = "random-init"
        info = {"path": None, "sha256": None, "format": "random-init", "arch": arch, "seed": seed}
        declared = {"method": "random", "seed": seed}
        return BackboneUnderTest(backbone, info, _pretraining(declared, given, arch, "random init"))
    path = Path(checkpoint)
    backbone = load_backbone(path, arch, device=device)
    info = {"path": str(path.resolve()), "sha256": file_sha256(path), "format": backbone.checkpoint_format,
            "arch": backbone.name}
    declared = getattr(backbone, "declared_pretraining", {})
    return BackboneUnderTest(backbone, info, _pretraining(declared, given, backbone.name, str(path)))


def _pretraining(declared: dict[str, Any], given: dict[str, Any], arch: str, where: str) -> dict[str, Any]:
    conflicts = [f"{key} {declared[key]!r} in the file, {given[key]!r} given" for key in PRETRAINING_KEYS
                 if given[key] is not None and key in declared and declared[key] != given[key]]
    if conflicts:
        raise SubjectError(f"{where}: {'; '.join(conflicts)}")
    values = {key: given[key] if given[key] is not None else declared.get(key) for key in PRETRAINING_KEYS}
    return {**values, "arch": arch}


def default_voc_root(progress: bool = True) -> Path:
    from protocols.datasets import synthetic

    return synthetic.cached(**DEFAULT_EVAL_DATA, progress=progress)


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when there is one; a device this machine lacks is a one-line error, not a torch trace."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SubjectError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SubjectError(f"--device {name}: CUDA is not available on this machine; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SubjectError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def run_scale(synthetic_data: bool, pretraining: dict[str, Any], preset: str | None = None) -> str:
    """"small" when the data or the weights are synthetic, or a CPU-sized preset ran; else "paper".

    Only paper-scale runs are compared with the paper's absolute numbers (DESIGN.md, "Verdicts").
    """
    pretrained_on = str(pretraining.get("pretrain_data") or "")
    if synthetic_data or pretrained_on.startswith("synthetic") or preset == "small":
        return "small"
    return "paper"


def scale_milestones(reference: Sequence[int], reference_epochs: int, epochs: int) -> tuple[int, ...]:
    """The reference's LR steps at the same fractions of a shorter/longer run, in epochs (the linear probe's
    30/90 and 60/90 of E) or iterations (detection's 150/200 and 185/200).

    Rounded half up, at least 1; a step at or after the run's end never fires and is dropped.
    Steps that collide (tiny runs) are kept, so the LR still ends 100x lower.
    """
    scaled = (max(1, math.floor(m * epochs / reference_epochs + 0.5)) for m in reference)
    return tuple(m for m in scaled if m < epochs)
