"""Pretraining step time of DenseCL against MoCo-v2, as a protocol: the "<1% slower" claim (spec pretraining.md §6).

Both models are built on the same backbone, batch and image size; their steps alternate (A B, then B A, ...)
so drift in machine load hits both equally. Each timed round gives one *paired* observation (DenseCL's step,
MoCo-v2's step), which is what the verdict's paired interval is computed over:

- compute-only: forward + backward + SGD on image tensors already in memory (what `step_time` reports: on a
  GPU the data pipeline hides behind compute, on a CPU it competes with it and would blur the comparison);
- end-to-end: the same step fed by the real two-view data pipeline (DataLoader + augmentation).

`benchmarks/pretrain_step.py` prints these figures (and peak memory); `eval pretrain_overhead` stores them,
or reads a stored benchmark JSON (`--from-json`) instead of measuring. torch is imported by the code that
measures, so the declaration below (and `densecl-bench eval pretrain_overhead --help`) does not need it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from baselines.config import ConfigError, option
from baselines.infra import seed_everything
from baselines.methods import METHODS, paper_name
from protocols.registry import DefaultData, Protocol, Reading
from protocols.result import ProtocolResult

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

COMPARED = ("mocov2", "densecl")
MODES = ("compute_only", "end_to_end")


@dataclass
class OverheadConfig:
    arch: str = option("resnet18", "timm backbone of both models")
    image_size: int = option(64, "crop size of both views")
    batch_size: int = option(32, "images per step")
    queue_size: int = option(4096, "K of both queues")
    steps: int = option(20, "timed steps per method and mode (paired rounds)")
    warmup: int = option(2, "untimed steps per method first")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    workers: int = option(2, "data-loader workers for end-to-end")
    amp: str = option("none", "autocast dtype: none or bf16", choices=("none", "bf16"))
    channels_last: bool = option(False, "channels_last memory format")
    bn_group_size: int = option(0, "ghost BN groups (0: off)")
    output_stride: int = option(32, "32, or 16 for a dilated last stage", choices=(16, 32))
    end_to_end: bool = option(True, "also time the steps fed by the real data pipeline")
    from_json: str | None = option(None, "read the figures of `benchmarks/pretrain_step.py --json FILE` instead of "
                                   "measuring")


class Stepper:
    """One method's model + optimizer; `step(im_q, im_k)` is one full training iteration."""

    def __init__(self, method: str, cfg: OverheadConfig, device: torch.device) -> None:
        import torch

        from baselines.train import PretrainConfig, build_model

        pretrain = PretrainConfig(method=method, arch=cfg.arch, queue_size=cfg.queue_size,
                                  bn_group_size=cfg.bn_group_size, batch_size=cfg.batch_size, data="-", out="-",
                                  output_stride=cfg.output_stride, image_size=cfg.image_size)
        seed_everything(0)
        self.model = build_model(pretrain).to(device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
        self.device = device
        self.amp = cfg.amp == "bf16"
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def step(self, im_q: torch.Tensor, im_k: torch.Tensor) -> None:
        import torch

        im_q = im_q.to(self.device, non_blocking=True, memory_format=self.memory_format)
        im_k = im_k.to(self.device, non_blocking=True, memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.model(im_q, im_k)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def timed(stepper: Stepper, batch) -> float:
    stepper.sync()
    start = time.perf_counter()
    stepper.step(*batch)
    stepper.sync()
    return time.perf_counter() - start


def interleave(steppers: dict[str, Stepper], batches: Callable, steps: int, warmup: int,
               progress: bool = False) -> dict[str, list[float]]:
    """Alternate the methods step by step, flipping the order each round; `batches(method)` gives (inputs, wait)."""
    from tqdm.auto import tqdm

    times: dict[str, list[float]] = {m: [] for m in steppers}
    for round_index in tqdm(range(warmup + steps), desc="paired steps", disable=not progress, leave=False):
        order = list(steppers) if round_index % 2 == 0 else list(reversed(steppers))
        for method in order:
            batch, wait = batches(method)
            seconds = timed(steppers[method], batch) + wait
            if round_index >= warmup:
                times[method].append(seconds)
    return times


def loader_for(files: list[str], cfg: OverheadConfig) -> DataLoader:
    import torch
    from torch.utils.data import DataLoader

    from baselines.augment import TwoViews, mocov2_augmentation
    from baselines.data import PretrainImages, PretrainSampler

    dataset = PretrainImages(files, TwoViews(mocov2_augmentation(cfg.image_size)), seed=0)
    sampler = PretrainSampler(len(files), cfg.batch_size, seed=0)
    sampler.set_epoch(0)
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                      persistent_workers=cfg.workers > 0, generator=torch.Generator().manual_seed(0))


def endless(loader: DataLoader):
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        epoch += 1
        yield from loader


def summarize(times: dict[str, list[float]], batch_size: int) -> dict[str, Any]:
    median = {m: statistics.median(t) for m, t in times.items()}
    return {"seconds_per_step": median, "images_per_s": {m: batch_size / s for m, s in median.items()},
            "densecl_over_mocov2": median["densecl"] / median["mocov2"], "times": times}


def measure(cfg: OverheadConfig, images: str | Path | None, progress: bool = False) -> dict[str, Any]:
    """The paired step times of both methods: {"compute_only": {...}, "end_to_end": {...}, "device": ...}."""
    import torch

    from baselines.data import find_images
    from protocols.common import resolve_device

    device = resolve_device(cfg.device)
    steppers = {m: Stepper(m, cfg, device) for m in COMPARED}
    report: dict[str, Any] = {"config": asdict(cfg), "device": str(device)}
    shape = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    fixed = (torch.randn(shape).to(device), torch.randn(shape).to(device))
    report["compute_only"] = summarize(interleave(steppers, lambda m: (fixed, 0.0), cfg.steps, cfg.warmup, progress),
                                       cfg.batch_size)
    if cfg.end_to_end and images is not None:
        files = find_images(images)
        streams = {m: endless(loader_for(files, cfg)) for m in COMPARED}

        def next_batch(method: str):
            start = time.perf_counter()
            im_q, im_k, _ = next(streams[method])
            return (im_q, im_k), time.perf_counter() - start

        report["end_to_end"] = summarize(interleave(steppers, next_batch, cfg.steps, cfg.warmup, progress),
                                         cfg.batch_size)
    return report


def _pretraining_images(progress: bool = True) -> DefaultData:
    from protocols.datasets import synthetic

    root = synthetic.cached(images=512, size=96, seed=1, progress=progress) / "JPEGImages"
    return DefaultData(root, {}, f"the synthetic pretraining images in {root}")


def _benchmark_json(path: Path) -> dict[str, Any]:
    """The figures of `benchmarks/pretrain_step.py --json`; anything else is a one-line error naming the file."""
    what = "a benchmarks/pretrain_step.py --json file with per-step times"
    try:
        report = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--from-json {path}: not {what} ({err})") from None
    if not isinstance(report, dict):
        raise ConfigError(f"--from-json {path}: not {what}")
    missing = [key for key in ("compute_only", "config") if key not in report]
    if missing or "times" not in report["compute_only"]:
        raise ConfigError(f"--from-json {path}: not {what} (missing {', '.join(missing) or 'compute_only.times'})")
    return report


def run(subject, data, cfg: OverheadConfig, *, work_dir=None, progress: bool = True) -> ProtocolResult:
    """Measure (or read) the paired step times; `subject` is unused: both models start from the same fresh init."""
    report = _benchmark_json(Path(cfg.from_json)) if cfg.from_json else measure(cfg, data, progress)
    metrics: dict[str, float] = {}
    for mode in MODES:
        if mode in report:
            for method, seconds in report[mode]["seconds_per_step"].items():
                metrics[f"{mode}/{method}/seconds_per_step"] = seconds
            metrics[f"{mode}/densecl_over_mocov2"] = report[mode]["densecl_over_mocov2"]
    arch = report["config"].get("arch", cfg.arch)
    return ProtocolResult(
        protocol="pretrain_overhead", metrics=metrics, config={**asdict(cfg), "measured": report["config"]},
        dataset={"name": Path(data).name if data is not None else "", "images": str(data) if data else None},
        details={"device": report.get("device"), "times": {m: report[m]["times"] for m in MODES if m in report},
                 "step_time_mode": "compute_only"},
        pretraining={"method": None, "arch": arch},
    )


def measurements(result: ProtocolResult) -> list[Reading]:
    """Each timed round of the compute-only mode is one paired observation of `step_time` per method."""
    times = result.details.get("times", {}).get("compute_only", {})
    return [Reading("pretrain_overhead", "step_time", seconds, method=paper_name(method), replicate=i)
            for method in COMPARED if method in METHODS for i, seconds in enumerate(times.get(method, []))]


PRETRAIN_OVERHEAD = Protocol(
    name="pretrain_overhead", summary="DenseCL vs MoCo-v2 pretraining step time on this machine (spec §6)",
    description="Times MoCo-v2 and DenseCL training steps interleaved on the same backbone, batch and image size "
    "(compute-only, and end-to-end with the real data pipeline on --data images, default the synthetic pretraining "
    "images). Every paired round is one observation for the '<1% slower' claim. --from-json reads the output of "
    "benchmarks/pretrain_step.py --json instead of measuring. No checkpoint is needed.",
    metrics=('step_time', 'slowdown_pct'), config=OverheadConfig, body=run, measurements=measurements,
    default_data=_pretraining_images, subject="none")
