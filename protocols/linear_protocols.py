"""The linear probes' declarations: the reference recipes, the settings and the three protocols.

Importable without torch, so `densecl-bench eval linear_in1k --help` (and the listing of every protocol)
stays fast: the probe itself, `protocols.linear`, subclasses torch's Dataset and Sampler at module level,
so its `run` is named here with `Lazy` and imported when a probe runs. `protocols.linear` re-exports
every name defined here.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.backbone_names import FEATURE_NAMES, layer_list
from baselines.config import option
from protocols.registry import Lazy, Protocol, Reading, synthetic_voc
from protocols.result import ProtocolResult

SPEC_IMAGE_SIZE = 224


@dataclass(frozen=True)
class Recipe:
    """The reference hyper-parameters of one probe variant."""

    epochs: int
    milestones: tuple[int, ...]
    lr: float
    nesterov: bool
    weight_decay: float
    layers: tuple[str, ...]
    head: str  # "mhead": pool -> BN -> fc per stage; "avgpool": GAP -> fc on feature5
    augment: str  # "imagenet-mhead", "crop-flip" or "places" (see train_transform)
    batch_size: int = 256
    momentum: float = 0.9


RECIPES = {
    # §2.1 `r50_multihead.py`: step [30, 60, 90] over 90 epochs (the step at 90 never fires).
    "mhead": Recipe(epochs=90, milestones=(30, 60), lr=0.01, nesterov=True, weight_decay=1e-4, layers=FEATURE_NAMES,
                    head="mhead", augment="imagenet-mhead"),
    # §2.3 `r50_last.py` = MoCo `main_lincls.py`.
    "avgpool": Recipe(epochs=100, milestones=(60, 80), lr=30.0, nesterov=False, weight_decay=0.0,
                      layers=("feature5",), head="avgpool", augment="crop-flip"),
    # §2.2 Places205 `r50_multihead.py`: the mhead model, steps [7, 14, 21] over 28 epochs (21 fires), no colour aug.
    "places205": Recipe(epochs=28, milestones=(7, 14, 21), lr=0.01, nesterov=True, weight_decay=1e-4,
                        layers=FEATURE_NAMES, head="mhead", augment="places"),
}


@dataclass
class LinearConfig:
    variant: str = option("mhead", "recipe: mhead (§2.1), avgpool (§2.3) or places205 (§2.2)", choices=tuple(RECIPES))
    probe_epochs: int | None = option(None, "training epochs of the heads (default: the recipe's 90/100/28; the LR "
                                      "steps scale with it)")
    milestones: tuple[int, ...] | None = option(None, "LR steps in epochs (default: the recipe's at the same "
                                                "fractions of --probe-epochs)")
    batch_size: int = option(256, "training batch")
    lr: float | None = option(None, "base LR at batch 256 (default: the recipe's 0.01 / 30)")
    scale_lr: bool = option(False, "multiply the LR by batch/256 (linear scaling)")
    weight_decay: float | None = option(None, "weight decay (default: the recipe's 1e-4 / 0)")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool | None = option(None, "Nesterov momentum (default: the recipe's)")
    image_size: int = option(SPEC_IMAGE_SIZE, "crop size; < 224 only for small runs (pools adapt to the §1.3 grids)")
    layers: tuple[str, ...] | None = option(None, "mhead heads to train: comma list of feature1..feature5 or 'all' "
                                            "(default: all five)", parse=layer_list)
    train_split: str | None = option(None, "default: train, or trainval on a VOC root")
    test_split: str | None = option(None, "default: val, or test on a VOC root")
    seed: int = option(0, "seeds the head init, the epoch order and every augmentation")
    workers: int = option(2, "data-loading processes")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    eval_every: int = option(0, "also evaluate every N epochs (0: only at the end)")
    checkpoint_seconds: float = option(600.0, "mid-epoch state saves, seconds apart (with a work dir)")


def measurements(result: ProtocolResult) -> list[Reading]:
    """`<layer>/top1` -> (protocol, layer, top1), and top5 likewise; the best-head summary is left out."""
    readings = []
    for name, value in result.metrics.items():
        layer, _, metric = name.partition("/")
        if value is not None and layer != "best" and metric in ("top1", "top5"):
            readings.append(Reading(result.protocol, metric, value, layer=layer))
    return readings


_LINEAR_HELP = ("The backbone stays frozen in eval mode. Data: an ImageNet-style folder (train/<class>/*, "
                "val/<class>/*), meta/{train,val}_labeled.txt list files, or a VOC root (largest object per image). "
                "--probe-epochs scales the LR steps; the resolved schedule is recorded. With --work-dir the run is "
                "resumable (nothing lost on Ctrl-C).")
_COMMON = dict(config=LinearConfig, body=Lazy("protocols.linear:run"), measurements=measurements,
               default_data=synthetic_voc, metrics=("top1", "top5"), resumable=True,
               torchrun=True)
LINEAR_IN1K = Protocol(
    name="linear_in1k", summary="ImageNet linear probe on GAP res5, the MoCo recipe (spec §2.3)",
    description="GAP res5 -> Linear, SGD lr 30, wd 0, steps 60/80 of 100 epochs, batch 256, crop+flip. " + _LINEAR_HELP,
    fixed={"variant": "avgpool"}, **_COMMON)
LINEAR_IN1K_MHEAD = Protocol(
    name="linear_in1k_mhead", summary="ImageNet linear heads on each frozen stage, OpenSelfSup r50_multihead (§2.1)",
    description="Per stage AvgPool -> BN without affine -> Linear, SGD lr 0.01 Nesterov wd 1e-4, steps 30/60 of 90 "
    "epochs, batch 256, crop+flip+colour jitter+Lighting. " + _LINEAR_HELP,
    fixed={"variant": "mhead"}, **_COMMON)
LINEAR_PLACES205_MHEAD = Protocol(
    name="linear_places205_mhead", summary="Places205 linear heads on each frozen stage (spec §2.2)",
    description="The mhead model on Places205 (205 classes): steps 7/14/21 of 28 epochs, Resize 256 -> CenterCrop "
    "256 -> RandomCrop 224 -> flip, no colour augmentation. " + _LINEAR_HELP,
    fixed={"variant": "places205"}, **_COMMON)
