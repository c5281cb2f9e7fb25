"""CI regression: a tiny deterministic replicate-voc, compared with a committed reference.

`densecl-bench regression` pretrains MoCo-v2 and DenseCL for 2 epochs (16 steps) on the synthetic
images (the small_cpu preset, pinned here, seed 0), runs the VOC07 SVM and low-shot protocols on the
pretrained backbones, runs the same SVM protocols on fixed features drawn from a seeded generator,
and checks every metric against `results/reference/regression.json` (issue 14):

- pretraining: the losses of every step (step 1 is the freshly initialised model on the first batch,
  a fingerprint of the augmentations, the backbone set-up and the losses; the later steps add the
  optimizer, the key-encoder update and the queues), the learning rate of every step, and summaries
  of the final weights (norms of the encoders and of their updates, the query-key lag, BN running
  statistics, the queue means);
- the SVMs on the pretrained features: the AP and the CV-chosen cost of every class, the mAP, the
  low-shot means and their chosen costs, and the statistics of the features themselves;
- the feature extraction of the SVM protocols on a freshly initialised, seeded backbone (statistics of the
  features: no training in between, so they hold to float32 noise);
- the SVMs on fixed features: nearly bit-reproducible on any machine (float64 solver, certified to
  1e-7), so their per-class APs and chosen costs hold to tight bands and catch any change of the
  SVM protocol (class weights, normalisation, costs, folds, low-shot sampling, AP).

On the same software stack (the `exact.stack` of the reference: packages, CPU, ISA, thread count)
a CPU run is bit-identical, so sha256 digests of the final weights, the step losses, the features
and the SVM results must match exactly. On another stack only the bands apply; they are set above
the spread measured between thread counts and an emulated AVX2 machine (`measured_spread` of the
reference, `python -m replication.regression --measure-spread`) and far below the effects of the
fidelity bugs in tests/test_regression_mutations.py. `--update` rewrites the reference: a deliberate
act, never automatic.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REFERENCE = Path("results") / "reference" / "regression.json"
PRODUCED_BY = "densecl-bench regression --update"
# Everything the measurement depends on is pinned here, not taken from the pipelines' defaults.
SETTINGS: dict[str, Any] = {
    "preset": "small_cpu", "methods": ("mocov2", "densecl"), "epochs": 2, "seed": 0, "log_every": 1,
    "pretrain_data": {"images": 512, "size": 96, "seed": 1},  # the embedded pretraining images
    "costs": (1.0, 0.0625, 0.00390625), "svm_layers": ("feature5",), "lowshot_ks": (1, 2), "lowshot_samples": 2,
    "solver": "batched",  # the solver replicate-voc uses
    "extraction_split": "val",  # 140 images through the SVM feature extraction with a random-init backbone
    # Fixed SVM features: per image, the sum of its classes' centres (difficult: half) plus noise.
    "fixed_features": {"seed": 0, "dims": 48, "signal": 1.0, "noise": 2.5, "difficult": 0.5,
                       "costs": (100.0, 10.0, 1.0, 0.0625, 0.00390625, 0.5**10, 0.5**13),
                       "lowshot_ks": (1, 2, 4), "lowshot_samples": 2},
}
# Bands per kind of metric: (floor, factor). With a measured spread (the reference's `measured_spread`) a
# metric's band is max(floor, factor x spread), the spread taken over the metrics of the same name in every
# method (per step, a running maximum over the steps so far: the spread grows with training); without one,
# the floor. Kinds ending in /rel are relative to the reference value. The factors leave room for machines
# noisier than the emulated one; the pretrained-feature SVMs, whose spread after 16 chaotic steps is large,
# get a small factor on the largest spread of their kind and serve to catch a broken pipeline, while the
# SVM protocol itself is pinned by the fixed features.
BANDS: dict[str, tuple[float, float]] = {
    "loss": (2e-5, 10.0),  # every step's losses and the final loss (the log rounds to 1e-6)
    "lr": (1e-9, 10.0),
    "state/rel": (1e-6, 10.0),  # weight summaries
    "state/ptr": (0.5, 0.0),  # queue pointers: integers
    "features/rel": (1e-3, 10.0),  # statistics of the pretrained features
    "extraction/rel": (1e-5, 10.0),  # statistics of the random-init backbone's features (float32 noise only)
    "pretrained/ap": (5.0, 3.0),  # per-class AP on the pretrained features, AP points
    "pretrained/mAP": (2.0, 3.0),
    "pretrained/lowshot": (2.0, 3.0),
    "fixed/ap": (0.02, 10.0),  # the fixed features: AP points
    "fixed/mAP": (0.01, 10.0),
    "fixed/lowshot": (0.02, 10.0),
    "cost": (0.5, 0.0),  # log2 of a chosen cost on the fixed features: any other cost of the grid is out of band
}
# Per run, this many fixed-feature metrics may leave their bands: last-bit differences of another BLAS can swap
# two nearly tied test scores (one class's AP, or a CV-chosen cost, moves), which no real SVM bug stays below.
FIXED_OUTLIERS = 2
LOG = logging.getLogger("densecl_bench.regression")


@dataclass
class Check:
    metric: str
    reference: float | str
    measured: float | str | None
    band: float

    @property
    def ok(self) -> bool:
        if self.measured is None:
            return False
        if isinstance(self.reference, str) or isinstance(self.measured, str):
            return self.measured == self.reference
        return abs(self.measured - self.reference) <= self.band

    @property
    def deviation(self) -> float:
        """|measured - reference| / band (inf when missing or an exact value differs)."""
        if not self.ok:
            return math.inf
        if isinstance(self.reference, str):
            return 0.0
        return abs(self.measured - self.reference) / self.band if self.band else 0.0


def kind(metric: str) -> str:
    """The band kind of a metric name (see BANDS)."""
    parts = metric.split("/")
    if parts[0] == "fixed":
        return "cost" if "log2_cost" in parts else "fixed/mAP" if parts[-1] == "mAP" else \
            "fixed/lowshot" if parts[1] == "lowshot" else "fixed/ap"
    if parts[0] == "random_init":
        return "extraction/rel"
    if metric.endswith("/final_loss"):
        return "loss"
    if len(parts) > 1 and parts[1].startswith("step"):
        return "lr" if parts[-1] == "lr" else "loss"
    if len(parts) > 1 and parts[1] == "state":
        return "state/ptr" if parts[-1].endswith("_ptr") else "state/rel"
    if "stats" in parts:
        return "features/rel"
    if parts[-1] == "mAP":
        return "pretrained/mAP"
    if "k=" in metric:
        return "pretrained/lowshot"
    return "pretrained/ap"


def _step(metric: str) -> int | None:
    """The training step a metric belongs to (the final loss is the last step's), else None."""
    parts = metric.split("/")
    if len(parts) > 1 and parts[1].startswith("step"):
        return int(parts[1][4:])
    return None


def _spread_key(metric: str) -> str:
    """What a metric's spread is pooled over: its name without the method (per kind for pretrained SVMs)."""
    name = kind(metric)
    if name.startswith("pretrained/"):
        return name
    return metric.split("/", 1)[1] if metric.split("/")[0] in SETTINGS["methods"] else metric


def _band(metric: str, value: float | None = None) -> float:
    """The default band of a metric (no measured spread): its kind's floor."""
    floor = BANDS[kind(metric)][0]
    return floor * max(abs(value), 1e-12) if kind(metric).endswith("/rel") and value is not None else floor


def bands_from_spread(metrics: dict[str, float], spread: dict[str, Any] | None) -> dict[str, float]:
    """Each metric's band: max(floor, factor x measured spread) by the rules of BANDS."""
    diffs = (spread or {}).get("max_abs_diff", {})
    pooled: dict[str, float] = {}
    by_step: dict[int, float] = {}
    for m, d in diffs.items():
        if m not in metrics:
            continue
        if kind(m) == "loss" and _step(m) is not None:
            by_step[_step(m)] = max(by_step.get(_step(m), 0.0), d)
        rel = d / max(abs(metrics[m]), 1e-12) if kind(m).endswith("/rel") else d
        pooled[_spread_key(m)] = max(pooled.get(_spread_key(m), 0.0), rel)
    last = max((_step(m) or 0) for m in metrics)
    envelope, running = {}, 0.0
    for step in range(1, last + 1):
        running = max(running, by_step.get(step, 0.0))
        envelope[step] = running
    bands = {}
    for m, value in metrics.items():
        floor, factor = BANDS[kind(m)]
        if kind(m) == "loss":
            step = _step(m) or last
            measured = envelope.get(step, 0.0)
        else:
            measured = pooled.get(_spread_key(m), 0.0)
        if kind(m).endswith("/rel"):
            bands[m] = max(floor, factor * measured) * max(abs(value), 1e-12)
        else:
            bands[m] = max(floor, factor * measured)
    return bands


# ---------------------------------------------------------------------------------------------- the stack


def stack() -> dict[str, Any]:
    """What a bit-identical CPU run depends on: packages, interpreter, OS/libc, CPU, ISA, threads."""
    import numpy
    import PIL
    import scipy
    import sklearn
    import timm
    import torch
    import torchvision

    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    variables = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")
    return {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "timm": timm.__version__, "numpy": numpy.__version__, "scipy": scipy.__version__,
        "sklearn": sklearn.__version__, "pillow": PIL.__version__,
        "system": f"{platform.system()} {platform.machine()} {' '.join(platform.libc_ver())}".strip(),
        "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "isa_overrides": {v: os.environ[v] for v in variables if v in os.environ},
    }


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()


def _files_digest(root: Path) -> str:
    """sha256 over the relative paths and bytes of every file of a dataset folder."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def _tensor_digest(state: dict) -> str:
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if isinstance(value, torch.Tensor):
            h.update(name.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- pretraining


def _pretrain_config(method: str, out: Path, data: str, progress: bool):
    from baselines import config as configs
    from baselines.train import PretrainConfig

    return configs.resolve(PretrainConfig, SETTINGS["preset"], {
        "method": method, "seed": SETTINGS["seed"], "epochs": SETTINGS["epochs"], "log_every": SETTINGS["log_every"],
        "workers": 0, "device": "cpu", "data": data, "out": str(out), "progress": progress})


def _state_summary(final: dict, initial: dict) -> dict[str, float]:
    """Norms that move with every part of a training step, far less noisy than the weights themselves."""

    def norm(names: list[str], state: dict, minus: dict | None = None) -> float:
        total = 0.0
        for n in names:
            t = state[n].double()
            if minus is not None:
                t = t - minus[n].double()
            total += float((t * t).sum())
        return math.sqrt(total)

    q = [n for n in final if n.startswith("encoder_q.") and final[n].is_floating_point()
         and not n.endswith(("running_mean", "running_var"))]
    k = ["encoder_k." + n[len("encoder_q."):] for n in q]
    q_head = [n for n in q if n.startswith("encoder_q.1.")]
    means = [n for n in final if n.startswith("encoder_q.0.") and n.endswith("running_mean")]
    var = [n for n in final if n.startswith("encoder_q.0.") and n.endswith("running_var")]
    k_stats = [n for n in final if n.startswith("encoder_k.0.") and n.endswith(("running_mean", "running_var"))]
    summary = {
        "q_norm": norm(q, final), "q_head_norm": norm(q_head, final), "q_update": norm(q, final, initial),
        "k_update": norm(k, final, initial), "k_lag": math.sqrt(sum(
            float(((final[a].double() - final[b].double()) ** 2).sum()) for a, b in zip(q, k, strict=True))),
        "bn_mean_norm": norm(means, final), "bn_var_sum": float(sum(final[n].double().sum() for n in var)),
        "k_bn_stats_norm": norm(k_stats, final),
    }
    for name in ("queue", "queue2"):
        if name in final:
            queue = final[name].double()
            summary[f"{name}_mean_norm"] = float(queue.mean(dim=1).norm())
            summary[f"{name}_gram_mean"] = float((queue.T @ queue).mean())
            summary[f"{name}_ptr"] = float(final[f"{name}_ptr"].item())
    return summary


def pretrain_metrics(method: str, work: Path, progress: bool) -> tuple[Path, dict[str, float], dict[str, str]]:
    """Pretrain one method; (backbone path, per-step and weight metrics, exact digests)."""
    from baselines.infra import seed_everything
    from baselines.train import build_model, pretrain, read_training_checkpoint
    from protocols.datasets import synthetic

    data = str(synthetic.cached(**SETTINGS["pretrain_data"], progress=progress) / "JPEGImages")
    cfg = _pretrain_config(method, work / "runs" / method, data, progress)
    backbone = pretrain(cfg)
    records = [json.loads(line) for line in (Path(cfg.out) / "log.jsonl").read_text().splitlines() if line.strip()]
    metrics: dict[str, float] = {}
    for record in records:
        for key in ("loss", "loss_global", "loss_dense", "lr"):
            if key in record:
                metrics[f"{method}/step{record['step']:02d}/{key}"] = float(record[key])
    metrics[f"{method}/final_loss"] = float(records[-1]["loss"])
    final = read_training_checkpoint(Path(cfg.out) / "checkpoints" / "last.pth")["state_dict"]
    seed_everything(cfg.seed)  # as the trainer does before building its model
    initial = build_model(cfg).state_dict()
    for name, value in _state_summary(final, initial).items():
        metrics[f"{method}/state/{name}"] = value
    numbers = [{k: v for k, v in r.items() if k not in ("time", "images_per_s")} for r in records]
    exact = {f"{method}/log_sha256": _digest(numbers), f"{method}/weights_sha256": _tensor_digest(final)}
    return backbone, metrics, exact


# ---------------------------------------------------------------------------------------------- SVMs


def _svm_metrics(prefix: str, svm: dict[str, Any] | None, low_shot: dict[str, Any] | None,
                 costs: bool = True) -> dict[str, float]:
    """Per-class AP (and CV-chosen cost), mAP; per k the low-shot stats (and chosen cost) and every cell's mAP."""
    metrics: dict[str, float] = {}
    if svm is not None:
        metrics[f"{prefix}/mAP"] = float(svm["mAP"])
        for name, ap in svm["ap"].items():
            metrics[f"{prefix}/ap/{name}"] = float(ap)
        if costs:
            for name, cost in svm["chosen_cost"].items():
                metrics[f"{prefix}/log2_cost/{name}"] = math.log2(cost)
    if low_shot is not None:
        for row in low_shot["per_k"]:
            for stat in ("mean", "min", "max"):
                metrics[f"{prefix}/k={row['k']}/{stat}"] = float(row[stat])
            if costs:
                metrics[f"{prefix}/k={row['k']}/log2_cost"] = math.log2(row["cost"])
        test_map = low_shot["test_map"]  # samples x ks x costs, fractions
        for si, sample in zip(low_shot["sample_ids"], test_map, strict=True):
            for k, by_cost in zip(low_shot["ks"], sample, strict=True):
                for cost, value in zip(low_shot["costs"], by_cost, strict=True):
                    metrics[f"{prefix}/k={k}/s{si}/c=2^{math.log2(cost):g}"] = 100.0 * float(value)
    return metrics


def protocol_metrics(method: str, backbone: Path, root: Path, work: Path, progress: bool) -> tuple[dict, dict]:
    """The VOC07 SVM and low-shot protocols on one pretrained backbone (features in a private cache)."""
    import numpy as np

    from protocols.common import backbone_under_test
    from protocols.voc_svm import VOC07_LOWSHOT, VOC07_SVM

    subject = backbone_under_test(backbone, seed=SETTINGS["seed"])
    cache = work / "features" / method  # private: a change of the feature code is never hidden by a cache hit
    common = dict(layers=SETTINGS["svm_layers"], workers=0, device="cpu", costs=SETTINGS["costs"],
                  seed=SETTINGS["seed"], solver=SETTINGS["solver"], cache_dir=str(cache))
    svm = VOC07_SVM.run(subject, root, VOC07_SVM.make_config(common), progress=progress)
    few = VOC07_LOWSHOT.run(subject, root, VOC07_LOWSHOT.make_config(
        dict(common, ks=SETTINGS["lowshot_ks"], samples=SETTINGS["lowshot_samples"])), progress=progress)
    metrics: dict[str, float] = {}
    exact: dict[str, str] = {}
    for layer in SETTINGS["svm_layers"]:
        # The chosen costs on the pretrained features flip between machines (their CV scores are close after
        # chaotic training): they count in the exact digest only; the fixed features pin the cost selection.
        metrics.update(_svm_metrics(f"{method}/{layer}", svm.details["svm"][layer], few.details["low_shot"][layer],
                                    costs=False))
        # the protocols' own flat metrics, as the pipeline stores them
        metrics[f"{method}/{layer}/mAP"] = svm.metrics[f"{layer}/mAP"]
        for k in SETTINGS["lowshot_ks"]:
            metrics[f"{method}/{layer}/k={k}/mean"] = few.metrics[f"{layer}/k={k}/mean"]
        digests = []
        for split in ("trainval", "test"):
            (path,) = cache.glob(f"*/{split}_{layer}.npy")
            x = np.load(path).astype(np.float64)
            digests.append(x.tobytes())
            metrics[f"{method}/{layer}/stats/{split}_mean"] = float(x.mean())
            metrics[f"{method}/{layer}/stats/{split}_row_norm"] = float(np.linalg.norm(x, axis=1).mean())
            metrics[f"{method}/{layer}/stats/{split}_active"] = float((x > 0).mean())
        exact[f"{method}/{layer}/features_sha256"] = _digest(*digests)
        exact[f"{method}/{layer}/svm_sha256"] = _digest(
            svm.details["svm"][layer]["ap"], svm.details["svm"][layer]["chosen_cost"],
            few.details["low_shot"][layer]["test_map"], few.details["low_shot"][layer]["per_k"])
    return metrics, exact


def extraction_metrics(root: Path, work: Path, progress: bool) -> tuple[dict[str, float], dict[str, str]]:
    """The protocols' feature extraction (transform, forward in eval mode, pooling) on a freshly initialised,
    seeded backbone: no training chaos, so the feature statistics hold to float32 noise on any machine."""
    import numpy as np

    from protocols import voc_svm
    from protocols.common import RANDOM_INIT, backbone_under_test

    subject = backbone_under_test(RANDOM_INIT, arch="resnet18", seed=SETTINGS["seed"])
    split = SETTINGS["extraction_split"]
    cfg = voc_svm.VOCFeatures(layers=SETTINGS["svm_layers"], train_split=split, test_split=split, workers=0,
                              device="cpu", cache_dir=str(work / "features" / RANDOM_INIT))
    features, _, _, _ = voc_svm.voc07_features(subject, root, cfg, progress)
    direction = np.random.default_rng(SETTINGS["seed"])
    metrics: dict[str, float] = {}
    exact: dict[str, str] = {}
    for layer, (x, _) in features.items():
        x = np.asarray(x, dtype=np.float64)
        v = direction.standard_normal(x.shape[1])
        prefix = f"random_init/{layer}/stats"
        metrics.update({f"{prefix}/mean": float(x.mean()), f"{prefix}/std": float(x.std()),
                        f"{prefix}/row_norm": float(np.linalg.norm(x, axis=1).mean()),
                        f"{prefix}/projection": float((x @ v).mean() / np.linalg.norm(v)),
                        f"{prefix}/first_row_norm": float(np.linalg.norm(x[0]))})
        exact[f"random_init/{layer}/features_sha256"] = _digest(x.tobytes())
    return metrics, exact


def fixed_features(root: Path):
    """(train_x, train_y, test_x, test_y): features from a seeded generator on the VOC labels (float64, exact)."""
    import numpy as np

    from protocols.datasets import voc

    spec = SETTINGS["fixed_features"]
    _, train_y = voc.classification_labels(root, "trainval")
    _, test_y = voc.classification_labels(root, "test")
    rng = np.random.default_rng(spec["seed"])
    centres = rng.standard_normal((train_y.shape[1], spec["dims"]))

    def draw(y: np.ndarray) -> np.ndarray:
        present = (y == 1) * 1.0 + (y == -1) * spec["difficult"]
        return spec["signal"] * present @ centres + spec["noise"] * rng.standard_normal((len(y), spec["dims"]))

    return draw(train_y), train_y, draw(test_y), test_y


def fixed_metrics(root: Path, progress: bool) -> tuple[dict[str, float], dict[str, str]]:
    """Both SVM protocols on the fixed features: nearly machine-independent, so held to tight bands."""
    from protocols import voc_svm

    spec = SETTINGS["fixed_features"]
    train_x, train_y, test_x, test_y = fixed_features(root)
    svm = voc_svm.train_and_test_svm(train_x, train_y, test_x, test_y, voc_svm.SVMConfig(
        costs=spec["costs"], seed=SETTINGS["seed"], solver=SETTINGS["solver"], device="cpu"),
        progress=progress, class_names=voc_svm.CLASS_NAMES, desc="SVM fixed features")
    few = voc_svm.run_low_shot(train_x, train_y, test_x, test_y, voc_svm.LowShotConfig(
        ks=spec["lowshot_ks"], samples=spec["lowshot_samples"], costs=spec["costs"], seed=SETTINGS["seed"],
        solver=SETTINGS["solver"], device="cpu"), progress=progress, class_names=voc_svm.CLASS_NAMES,
        desc="low-shot fixed features")
    metrics = {**_svm_metrics("fixed/svm", svm, None), **_svm_metrics("fixed/lowshot", None, few)}
    return metrics, {"fixed/svm_sha256": _digest(svm["ap"], svm["cv_ap"], few["test_map"])}


# ---------------------------------------------------------------------------------------------- measure, compare


class PhaseFailed(Exception):
    """Raised by a fail-fast check: a phase's metrics left their bands, so the whole run would fail."""


def measure(work: Path, progress: bool = True, check=None) -> tuple[dict[str, float], dict[str, str]]:
    """Every metric of the regression (name -> value) and the exact digests (name -> sha256).

    Phases: the fixed-feature SVMs, the pretraining of each method, then the protocols on each backbone.
    `check(phase, metrics, digests)`, if given, runs after each phase (and may raise PhaseFailed).
    """
    from protocols.common import default_voc_root
    from protocols.datasets import synthetic

    root = default_voc_root(progress=progress)
    pretrain_root = synthetic.cached(**SETTINGS["pretrain_data"], progress=progress)
    metrics: dict[str, float] = {}
    exact: dict[str, str] = {}

    def phase(name: str, result: tuple[dict[str, float], dict[str, str]], started: float) -> None:
        metrics.update(result[0])
        exact.update(result[1])
        LOG.info("%s: %.0f s", name, time.perf_counter() - started)
        if check is not None:
            check(name, result[0], result[1])

    started = time.perf_counter()
    phase("synthetic data", ({}, {"data/voc_sha256": _files_digest(root),
                                  "data/pretrain_sha256": _files_digest(pretrain_root)}), started)
    started = time.perf_counter()
    phase("SVMs on the fixed features", fixed_metrics(root, progress), started)
    started = time.perf_counter()
    phase("feature extraction (random-init backbone)", extraction_metrics(root, work, progress), started)
    backbones = {}
    for method in SETTINGS["methods"]:
        started = time.perf_counter()
        backbones[method], pre, pre_exact = pretrain_metrics(method, work, progress)
        phase(f"{method} pretraining", (pre, pre_exact), started)
    for method in SETTINGS["methods"]:
        started = time.perf_counter()
        phase(f"{method} features and SVMs", protocol_metrics(method, backbones[method], root, work, progress), started)
    return metrics, exact


def compare(reference: dict[str, Any], measured: dict[str, float]) -> list[Check]:
    """Every reference metric against its band (the reference's, else the default of its kind)."""
    bands = reference.get("bands", {})
    return [Check(name, value, measured.get(name), bands.get(name, _band(name, value)))
            for name, value in reference["metrics"].items()]


def compare_exact(reference: dict[str, Any], digests: dict[str, str]) -> list[Check]:
    return [Check(name, value, digests.get(name), 0.0) for name, value in reference["exact"]["values"].items()]


def same_stack(reference: dict[str, Any], current: dict[str, Any]) -> bool:
    return reference.get("exact", {}).get("stack") == current


def _group(metric: str) -> str:
    parts = metric.split("/")
    if parts[0] == "fixed":
        return "/".join(parts[:2])
    if len(parts) > 1 and parts[1].startswith("step"):
        return f"{parts[0]}/steps"
    return "/".join(parts[:2]) if parts[1] in ("state", "final_loss") else f"{parts[0]}/{kind(metric)}"


def failures(checks: list[Check]) -> tuple[list[Check], list[Check]]:
    """(failing, tolerated): up to FIXED_OUTLIERS fixed-feature metrics out of band are tolerated."""
    failed = [c for c in checks if not c.ok]
    fixed = [c for c in failed if c.metric.startswith("fixed/") and c.measured is not None]
    tolerated = fixed if len(fixed) <= FIXED_OUTLIERS else []
    return [c for c in failed if c not in tolerated], tolerated


def report(checks: list[Check], exact: list[Check] | None, elapsed: float, notes: list[str] = ()) -> int:
    """Print the out-of-band metrics and a summary per group (stdout); 1 if anything failed."""
    failed, tolerated = failures(checks)
    if failed or tolerated:
        print(f"{'metric':44s} {'reference':>12s} {'measured':>12s} {'band':>9s}")
    for c in failed:
        shown = "missing" if c.measured is None else f"{c.measured:12.6g}"
        print(f"{c.metric:44s} {c.reference:12.6g} {shown:>12s} {c.band:9.3g}  OUT OF BAND")
    for c in tolerated:
        print(f"{c.metric:44s} {c.reference:12.6g} {c.measured:12.6g} {c.band:9.3g}  outside its band, tolerated "
              f"(at most {FIXED_OUTLIERS} fixed-feature metrics: a swap of two nearly tied scores)")
    groups: dict[str, list[Check]] = {}
    for c in checks:
        groups.setdefault(_group(c.metric), []).append(c)
    print(f"\n{'group':30s} {'in band':>9s}  worst |measured - reference| / band")
    for name, members in groups.items():
        worst = max(members, key=lambda c: c.deviation)
        ok = sum(c.ok for c in members)
        shown = "missing or out" if not math.isfinite(worst.deviation) else f"{worst.deviation:.3f}"
        print(f"{name:30s} {ok:4d}/{len(members):<4d}  {shown} ({worst.metric})")
    bad_exact = [c for c in exact or [] if not c.ok]
    if exact is None:
        print("\n[regression] another software stack than the reference's: the bands apply, the digests do not")
    else:
        for c in bad_exact:
            print(f"{c.metric:44s} EXACT MISMATCH on the reference's stack (reference {str(c.reference)[:12]}, "
                  f"measured {str(c.measured)[:12]})")
        same = len(exact) - len(bad_exact)
        print(f"\n[regression] same stack as the reference: {same}/{len(exact)} digests identical")
    for note in notes:
        print(f"[regression] {note}")
    print(f"[regression] {len(checks) - len(failed) - len(tolerated)}/{len(checks)} metrics within their bands "
          f"({elapsed:.0f} s)")
    return 1 if failed or bad_exact else 0


def _measure_timed(progress: bool, check=None) -> tuple[dict[str, float], dict[str, str], float]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="densecl-regression-") as work:
        metrics, digests = measure(Path(work), progress, check)
    return metrics, digests, time.perf_counter() - started


def reference_payload(metrics: dict[str, float], digests: dict[str, str], elapsed: float,
                      spread: dict[str, Any] | None) -> dict[str, Any]:
    from baselines.infra import provenance

    bands = bands_from_spread(metrics, spread)
    rules = {"per_kind_floor_and_factor": BANDS, "fixed_outliers": FIXED_OUTLIERS,
             "rule": "band = max(floor, factor x measured spread); spread pooled over the methods per metric name "
                     "(pretrained SVMs: per kind), per step a running maximum; kinds ending in /rel relative"}
    if spread is not None:
        worst: dict[str, list] = {}
        for m, d in spread.get("max_abs_diff", {}).items():
            if m in bands and d / bands[m] > worst.get(kind(m), [0.0])[0]:
                worst[kind(m)] = [d / bands[m], m]
        rules["largest_spread_over_band"] = dict(sorted(worst.items()))
    payload = {"settings": SETTINGS, "metrics": metrics, "bands": bands, "band_rules": rules,
               "exact": {"stack": stack(), "values": digests}, "produced_by": PRODUCED_BY,
               "environment": provenance(), "seconds": round(elapsed, 1)}
    if spread is not None:
        payload["measured_spread"] = spread
    return payload


def run(update: bool = False, reference_path: Path = REFERENCE, progress: bool = True,
        cross_stack: bool = False, fail_fast: bool = False) -> int:
    """Measure and compare (or, with `update`, write the reference); 0 when everything is within its band.

    `cross_stack`: judge by the bands alone, as on another machine, even on the reference's stack (the mutation
    tests use it: each bug must leave a band, not only change a digest). `fail_fast`: stop after the first phase
    with a metric out of band; the verdict is the same as a full run's, which fails when any metric does.
    """
    if not update and not reference_path.is_file():
        print(f"[regression] error: no reference at {reference_path}; create it with "
              "`densecl-bench regression --update`", file=sys.stderr)
        return 1
    if update:
        from baselines.infra import atomic_write_json

        metrics, digests, elapsed = _measure_timed(progress)
        old = json.loads(reference_path.read_text()) if reference_path.is_file() else {}
        spread = old.get("measured_spread")
        if spread is not None and spread.get("settings") != json.loads(json.dumps(SETTINGS)):
            LOG.warning("the reference's measured_spread was taken with other settings; dropped (re-measure with "
                        "`python -m replication.regression --measure-spread`)")
            spread = None
        reference_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(reference_path, reference_payload(metrics, digests, elapsed, spread))
        print(f"[regression] wrote the reference {reference_path} ({len(metrics)} metrics, {len(digests)} digests, "
              f"{elapsed:.0f} s)")
        return 0
    reference = json.loads(reference_path.read_text())
    use_exact = not cross_stack and same_stack(reference, stack())
    measured: dict[str, float] = {}
    digests: dict[str, str] = {}

    def check(phase: str, metrics: dict[str, float], phase_digests: dict[str, str]) -> None:
        measured.update(metrics)
        digests.update(phase_digests)
        if not fail_fast:
            return
        part = {**reference, "metrics": {m: v for m, v in reference["metrics"].items() if m in metrics}}
        bad = failures(compare(part, metrics))[0]
        if use_exact:
            values = {m: v for m, v in reference["exact"]["values"].items() if m in phase_digests}
            bad += [c for c in compare_exact({"exact": {"values": values}}, phase_digests) if not c.ok]
        if bad:
            raise PhaseFailed(phase)

    started = time.perf_counter()
    stopped = None
    try:
        _measure_timed(progress, check)
    except PhaseFailed as failed:
        stopped = str(failed)
    elapsed = time.perf_counter() - started
    if stopped is not None:  # judge what was measured; the phases not run are not "missing"
        reference = {**reference, "metrics": {m: v for m, v in reference["metrics"].items() if m in measured},
                     "exact": {**reference.get("exact", {}), "values": {
                         m: v for m, v in reference.get("exact", {}).get("values", {}).items() if m in digests}}}
        print(f"[regression] fail-fast: stopped after the phase '{stopped}', which has metrics out of band")
    checks = compare(reference, measured)
    exact = compare_exact(reference, digests) if use_exact else None
    notes = []
    if exact is None:
        other = [n for n, v in reference.get("exact", {}).get("values", {}).items()
                 if n.startswith("data/") and n in digests and digests[n] != v]
        if other:
            notes.append(f"the synthetic images differ from the reference's ({', '.join(other)}: another Pillow or "
                         "libjpeg?); the pretraining metrics cannot be expected in their bands on other data")
    return report(checks, exact, elapsed, notes)


# ---------------------------------------------------------------------------------------------- measured spread

# Ways of running the same code that change the floating-point summation order: thread counts, OMP_NUM_THREADS
# unset, and an emulated AVX2 machine (ATen, oneDNN and MKL kernels restricted to AVX2) as a stand-in for CI.
SPREAD_VARIANTS: dict[str, dict[str, str | None]] = {
    "omp_unset": {"OMP_NUM_THREADS": None},
    "threads_1": {"OMP_NUM_THREADS": "1"},
    "threads_2": {"OMP_NUM_THREADS": "2"},
    "avx2_emulated": {"OMP_NUM_THREADS": None, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                      "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def _dump(path: Path, progress: bool) -> int:
    metrics, digests, elapsed = _measure_timed(progress)
    path.write_text(json.dumps({"metrics": metrics, "digests": digests, "stack": stack(), "seconds": elapsed}))
    return 0


def measure_spread(reference_path: Path = REFERENCE, variants: list[str] | None = None) -> int:
    """Run the regression under each variant (subprocesses, one at a time) and record the spread in the reference."""
    names = variants or list(SPREAD_VARIANTS)
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="densecl-spread-") as tmp:
        for name in names:
            env = dict(os.environ)
            for key, value in SPREAD_VARIANTS[name].items():
                if value is None:
                    env.pop(key, None)
                else:
                    env[key] = value
            out = Path(tmp) / f"{name}.json"
            LOG.info("spread run %s", name)
            subprocess.run([sys.executable, "-m", "replication.regression", "--dump", str(out), "--no-progress"],
                           env=env, check=True)
            runs[name] = json.loads(out.read_text())
    base = runs[names[0]]["metrics"]
    diffs = {m: max(abs(r["metrics"][m] - base[m]) for r in runs.values()) for m in base}
    by_kind: dict[str, dict[str, Any]] = {}
    for m, d in diffs.items():
        entry = by_kind.setdefault(kind(m), {"max_abs_diff": 0.0, "metric": m})
        if d >= entry["max_abs_diff"]:
            entry.update(max_abs_diff=d, metric=m)
        if kind(m).endswith("/rel"):
            entry["max_rel_diff"] = max(entry.get("max_rel_diff", 0.0), d / max(abs(base[m]), 1e-12))
    steps: dict[str, float] = {}
    for m, d in diffs.items():
        parts = m.split("/")
        if len(parts) > 2 and parts[1].startswith("step") and parts[2] == "loss":
            steps[parts[1]] = max(steps.get(parts[1], 0.0), d)
    spread = {
        "settings": json.loads(json.dumps(SETTINGS)),
        "runs": {n: {"variables": SPREAD_VARIANTS[n], "threads": r["stack"]["threads"],
                     "cpu_capability": r["stack"]["cpu_capability"], "seconds": round(r["seconds"], 1),
                     "digests": r["digests"]} for n, r in runs.items()},
        "identical_to_first": {n: r["digests"] == runs[names[0]]["digests"] for n, r in runs.items()},
        "max_abs_diff_by_kind": dict(sorted(by_kind.items())),
        "max_abs_diff_loss_by_step": dict(sorted(steps.items())),
        "max_abs_diff": {m: d for m, d in diffs.items() if d > 0},
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    reference = json.loads(reference_path.read_text()) if reference_path.is_file() else None
    if reference is None:
        reference = reference_payload(base, runs[names[0]]["digests"], runs[names[0]]["seconds"], spread)
    reference["measured_spread"] = spread
    from baselines.infra import atomic_write_json

    atomic_write_json(reference_path, reference)
    print(f"[regression] measured spread over {', '.join(names)} written to {reference_path}; "
          "bands follow from it at the next `--update`")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(prog="python -m replication.regression", description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="write a new reference (deliberate; commit it)")
    parser.add_argument("--reference", default=str(REFERENCE))
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--cross-stack", action="store_true",
                        help="judge by the bands alone, as on another machine (ignore the exact digests)")
    parser.add_argument("--measure-spread", nargs="*", metavar="VARIANT", default=None,
                        help=f"measure the spread over {', '.join(SPREAD_VARIANTS)} and record it in the reference")
    parser.add_argument("--fail-fast", action="store_true",
                        help="stop after the first phase with a metric out of band (the same verdict, sooner)")
    parser.add_argument("--dump", metavar="JSON", help="measure only and write the metrics to JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    if args.dump:
        return _dump(Path(args.dump), args.progress)
    if args.measure_spread is not None:
        return measure_spread(Path(args.reference), args.measure_spread or None)
    return run(args.update, Path(args.reference), args.progress, args.cross_stack, args.fail_fast)


if __name__ == "__main__":
    sys.exit(main())
