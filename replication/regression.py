"""CI regression: a tiny deterministic replicate-voc, compared with a committed reference.

`densecl-bench regression` pretrains MoCo-v2 and DenseCL for 2 epochs on the synthetic images
(small_cpu preset, seed 0), runs the VOC07 SVM and low-shot protocols on a few costs, and checks
every metric against `results/reference/regression.json` within its band. On the same software
stack a CPU run is bit-identical; the bands absorb BLAS/CPU differences between machines, which
training amplifies. `--update` rewrites the reference: a deliberate act, never automatic.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.common import backbone_under_test, default_voc_root
from protocols.voc_svm import VOC07_LOWSHOT, VOC07_SVM
from replication.pipelines import Job, ReplicateVOCConfig, pretrain_checkpoint

REFERENCE = Path("results") / "reference" / "regression.json"
SETTINGS = {"epochs": 2, "seed": 0, "costs": (1.0, 0.0625, 0.00390625), "svm_layers": ("feature5",),
            "lowshot_ks": (1, 2), "lowshot_samples": 2, "solver": "batched"}  # the solver replicate-voc uses
BANDS = {"mAP": 2.0, "loss": 0.05}  # metric points; final pretraining loss (absolute)


@dataclass
class Check:
    metric: str
    reference: float
    measured: float | None
    band: float

    @property
    def ok(self) -> bool:
        return self.measured is not None and abs(self.measured - self.reference) <= self.band


def _band(metric: str) -> float:
    return BANDS["loss"] if metric.endswith("/final_loss") else BANDS["mAP"]


def measure(work: Path, progress: bool = True) -> dict[str, float]:
    """The tiny pipeline's metrics: final pretraining loss, SVM mAP and low-shot means, per method."""
    cfg = ReplicateVOCConfig(seeds=(SETTINGS["seed"],), epochs=SETTINGS["epochs"], runs=str(work / "runs"),
                             workers=0, device="cpu", progress=progress)
    root = default_voc_root(progress=progress)
    metrics: dict[str, float] = {}
    for method in cfg.methods:
        job = Job(method, SETTINGS["seed"])
        backbone, recipe = pretrain_checkpoint(job, cfg, cfg.runs)
        last = Path(recipe["log"]).read_text().splitlines()[-1]
        metrics[f"{method}/final_loss"] = json.loads(last)["loss"]
        subject = backbone_under_test(backbone, seed=job.seed)
        common = dict(layers=SETTINGS["svm_layers"], workers=0, device="cpu", costs=SETTINGS["costs"], seed=job.seed,
                      solver=SETTINGS["solver"])
        runs = [VOC07_SVM.run(subject, root, VOC07_SVM.make_config(common), progress=progress),
                VOC07_LOWSHOT.run(subject, root, VOC07_LOWSHOT.make_config(
                    dict(common, ks=SETTINGS["lowshot_ks"], samples=SETTINGS["lowshot_samples"])), progress=progress)]
        for result in runs:
            for name, value in result.metrics.items():
                if not name.startswith("best/") and (name.endswith("/mAP") or name.endswith("/mean")):
                    metrics[f"{method}/{name}"] = value
    return metrics


def compare(reference: dict[str, Any], measured: dict[str, float]) -> list[Check]:
    return [Check(name, value, measured.get(name), reference.get("bands", {}).get(name, _band(name)))
            for name, value in reference["metrics"].items()]


def run(update: bool = False, reference_path: Path = REFERENCE, progress: bool = True) -> int:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="densecl-regression-") as work:
        measured = measure(Path(work), progress)
    elapsed = time.perf_counter() - started
    if update:
        from baselines.infra import atomic_write_json, provenance

        reference_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"settings": SETTINGS, "metrics": measured, "bands": {m: _band(m) for m in measured},
                   "produced_by": "densecl-bench regression --update", "environment": provenance(),
                   "seconds": round(elapsed, 1)}
        atomic_write_json(reference_path, payload)
        print(f"[regression] wrote the reference {reference_path} ({len(measured)} metrics, {elapsed:.0f} s)")
        return 0
    if not reference_path.is_file():
        print(f"[regression] error: no reference at {reference_path}; create it with "
              "`densecl-bench regression --update`", file=sys.stderr)
        return 1
    checks = compare(json.loads(reference_path.read_text()), measured)
    print(f"{'metric':34s} {'reference':>10s} {'measured':>10s} {'band':>6s}")
    for c in checks:
        shown = "missing" if c.measured is None else f"{c.measured:10.4f}"
        print(f"{c.metric:34s} {c.reference:10.4f} {shown:>10s} {c.band:6.2f}  {'ok' if c.ok else 'OUT OF BAND'}")
    failed = [c for c in checks if not c.ok]
    print(f"[regression] {len(checks) - len(failed)}/{len(checks)} metrics within their bands ({elapsed:.0f} s)")
    return 1 if failed else 0
