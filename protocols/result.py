"""What every protocol's `run(...)` returns: metrics plus the provenance needed to trust them.

The replication harness stores these as `result.json`; keeping one small dataclass here means
every protocol records the same fields (DESIGN.md, "Interfaces").
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baselines.files import file_sha256


@dataclass
class ProtocolResult:
    protocol: str  # the claims' protocol_id, e.g. "voc07_svm", "knn_in1k" (protocols.registry)
    metrics: dict[str, float]  # flat names, e.g. "feature5/mAP", "best/mAP", "top1@k=20"
    config: dict[str, Any]  # the fully resolved protocol config
    dataset: dict[str, Any]  # name, root, split sizes, content hash
    checkpoint: dict[str, Any] = field(default_factory=dict)  # path, sha256, detected format
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    details: dict[str, Any] = field(default_factory=dict)  # protocol-specific tables (chosen costs, CV table, ...)
    # What the verdicts match claims on: method, pretrain_data, epochs, arch, seed of the weights under test.
    pretraining: dict[str, Any] = field(default_factory=dict)
    scale: str = ""  # "small" (synthetic data or weights, or a CPU preset) or "paper"; set by Protocol.run

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def checkpoint_info(path: str | os.PathLike | None, detected_format: str | None = None) -> dict[str, Any]:
    """Path, sha256 and detected format of the checkpoint a protocol ran on (random init: no path)."""
    if path is None:
        return {"path": None, "sha256": None, "format": detected_format or "random-init"}
    path = Path(path)
    return {"path": str(path.resolve()), "sha256": file_sha256(path), "format": detected_format}
