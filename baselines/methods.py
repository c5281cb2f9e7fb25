"""The pretraining methods, one registry entry each (timm-style: a plain dict, one line per method).

Training (`baselines.train`), the pipelines, the claims vocabulary and the verdicts all read this
dict, so a new method is its module plus one line here. `paper_name` is how `claims.csv` writes
the method; the verdicts match stored runs to claims by it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    name: str  # config and CLI name
    paper_name: str  # the `method` column of claims.csv
    summary: str
    build: Callable[[Any, Any], Any]  # (Backbone, PretrainConfig) -> the pretraining nn.Module


def _shared(cfg: Any) -> dict[str, Any]:
    """The settings every MoCo-style method takes (spec pretraining.md §2)."""
    return dict(dim=cfg.dim, hidden_dim=cfg.hidden_dim or None, queue_size=cfg.queue_size,
                momentum=cfg.moco_momentum, temperature=cfg.temperature, bn_group_size=cfg.bn_group_size)


def _mocov2(backbone: Any, cfg: Any) -> Any:
    from baselines.moco import MoCoV2

    return MoCoV2(backbone, **_shared(cfg))


def _densecl(backbone: Any, cfg: Any) -> Any:
    from baselines.densecl import DenseCL

    return DenseCL(backbone, loss_lambda=cfg.loss_lambda, lambda_warmup_iters=cfg.lambda_warmup_iters, **_shared(cfg))


# The models are imported when built, so reading this registry (the CLI, the claims) costs no torch import.
METHODS: dict[str, Method] = {
    "mocov2": Method("mocov2", "MoCo-v2", "MoCo-v2: global InfoNCE against a queue of momentum keys", _mocov2),
    "densecl": Method("densecl", "DenseCL", "DenseCL: MoCo-v2 plus a dense InfoNCE over matched feature locations",
                      _densecl),
}

# Checkpoints one evaluates but this project does not pretrain; named so that their runs meet their claims.
OTHER_METHODS: dict[str, str] = {"supervised": "Supervised", "random": "Random", "mocov1": "MoCo-v1",
                                 "mocov2plus": "MoCo-v2+"}


def paper_name(name: str) -> str:
    """`densecl` -> `DenseCL`; a name already in paper form, or unknown, comes back unchanged."""
    if name in METHODS:
        return METHODS[name].paper_name
    return OTHER_METHODS.get(name, name)


def paper_names() -> tuple[str, ...]:
    """Every method name a claim may use."""
    return tuple(m.paper_name for m in METHODS.values()) + tuple(OTHER_METHODS.values())


def evaluable_methods() -> tuple[str, ...]:
    """What `eval --method` accepts."""
    return (*METHODS, *OTHER_METHODS)
