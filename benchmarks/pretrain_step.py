"""MoCo-v2 vs DenseCL training-step speed and peak memory, measured interleaved in one run.

The paper says DenseCL costs under 1% more time than MoCo-v2 (spec pretraining.md §6). Both
models are built on the same backbone, batch and image size; their steps alternate (A B, then B A,
...) so drift in machine load hits both equally, and the medians are compared:

- compute-only: forward + backward + SGD on image tensors already in memory;
- end-to-end: the same step fed by the real two-view data pipeline (DataLoader + augmentation).

Peak memory is CUDA's max_memory_allocated per method on a GPU; on a CPU, the peak resident set
size of a fresh process that runs a few steps of one method (the training state included).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from baselines.augment import TwoViews, mocov2_augmentation
from baselines.data import PretrainImages, PretrainSampler, find_images
from baselines.train import PretrainConfig, build_model, seed_everything
from protocols.datasets import synthetic

METHODS = ("mocov2", "densecl")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", help="timm backbone")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="images per step")
    parser.add_argument("--queue-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method and mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--data", default="", help="image folder for end-to-end (default: synthetic VOC images)")
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers for end-to-end")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--bn-group-size", type=int, default=0, help="ghost BN groups (0: off)")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Stepper:
    """One method's model + optimizer; `step(im_q, im_k)` is one full training iteration."""

    def __init__(self, method: str, args: argparse.Namespace, device: torch.device) -> None:
        cfg = PretrainConfig(method=method, arch=args.arch, queue_size=args.queue_size, bn_group_size=args.bn_group_size,
                             batch_size=args.batch_size, data="-", out="-")
        seed_everything(0)
        self.model = build_model(cfg).to(device)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
        self.device = device
        self.amp = args.amp == "bf16"
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    def step(self, im_q: torch.Tensor, im_k: torch.Tensor) -> None:
        im_q = im_q.to(self.device, non_blocking=True, memory_format=self.memory_format)
        im_k = im_k.to(self.device, non_blocking=True, memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.model(im_q, im_k)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def timed(stepper: Stepper, batch) -> float:
    stepper.sync()
    start = time.perf_counter()
    stepper.step(*batch)
    stepper.sync()
    return time.perf_counter() - start


def interleave(steppers: dict[str, Stepper], batches, steps: int, warmup: int) -> dict[str, list[float]]:
    """Alternate the methods step by step, flipping the order each round; `batches()` gives the next inputs."""
    times = {m: [] for m in steppers}
    for round_index in range(warmup + steps):
        order = list(steppers) if round_index % 2 == 0 else list(reversed(steppers))
        for method in order:
            batch, wait = batches(method)
            seconds = timed(steppers[method], batch) + wait
            if round_index >= warmup:
                times[method].append(seconds)
    return times


def image_files(args: argparse.Namespace) -> list[str]:
    data = args.data or str(synthetic.cached(images=512, size=96, seed=1) / "JPEGImages")
    return find_images(data)


def loader_for(files: list[str], args: argparse.Namespace) -> DataLoader:
    dataset = PretrainImages(files, TwoViews(mocov2_augmentation(args.image_size)), seed=0)
    sampler = PretrainSampler(len(files), args.batch_size, seed=0)
    sampler.set_epoch(0)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                      persistent_workers=args.workers > 0, generator=torch.Generator().manual_seed(0))


def endless(loader: DataLoader):
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        epoch += 1
        yield from loader


def summarize(times: dict[str, list[float]], batch_size: int) -> dict:
    median = {m: statistics.median(t) for m, t in times.items()}
    return {
        "seconds_per_step": median,
        "images_per_s": {m: batch_size / s for m, s in median.items()},
        "densecl_over_mocov2": median["densecl"] / median["mocov2"],
    }


def _peak_rss_worker(method: str, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    stepper = Stepper(method, args, torch.device("cpu"))
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    for _ in range(3):
        stepper.step(torch.randn(shape), torch.randn(shape))
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB -> MiB on Linux


def peak_memory_mib(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    peaks = {}
    for method in METHODS:
        if device.type == "cuda":
            stepper = Stepper(method, args, device)
            stepper.step(torch.randn(shape), torch.randn(shape))
            torch.cuda.reset_peak_memory_stats(device)
            stepper.step(torch.randn(shape), torch.randn(shape))
            peaks[method] = torch.cuda.max_memory_allocated(device) / 2**20
            del stepper
            torch.cuda.empty_cache()
        else:
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            proc = ctx.Process(target=_peak_rss_worker, args=(method, args, queue))
            proc.start()
            peaks[method] = queue.get()
            proc.join()
    return peaks


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{args.arch} {args.image_size}px, batch {args.batch_size}, queue {args.queue_size}, amp {args.amp}, "
          f"channels_last {args.channels_last}, {args.steps} timed steps/method after {args.warmup} warm-up")
    steppers = {m: Stepper(m, args, device) for m in METHODS}
    report: dict = {"config": vars(args), "device": str(device)}

    shape = (args.batch_size, 3, args.image_size, args.image_size)
    fixed = (torch.randn(shape).to(device), torch.randn(shape).to(device))
    report["compute_only"] = summarize(interleave(steppers, lambda m: (fixed, 0.0), args.steps, args.warmup), args.batch_size)

    if not args.skip_end_to_end:
        files = image_files(args)
        streams = {m: endless(loader_for(files, args)) for m in METHODS}

        def next_batch(method):
            start = time.perf_counter()
            im_q, im_k, _ = next(streams[method])
            return (im_q, im_k), time.perf_counter() - start

        report["end_to_end"] = summarize(interleave(steppers, next_batch, args.steps, args.warmup), args.batch_size)
    del steppers
    if not args.skip_memory:
        report["peak_memory_mib"] = peak_memory_mib(args, device)
        report["peak_memory_kind"] = "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"

    for mode in ("compute_only", "end_to_end"):
        if mode in report:
            r = report[mode]
            print(f"{mode:13s} images/s  MoCo-v2 {r['images_per_s']['mocov2']:8.1f}  DenseCL {r['images_per_s']['densecl']:8.1f}"
                  f"  step-time ratio DenseCL/MoCo-v2 {r['densecl_over_mocov2']:.3f}")
    if "peak_memory_mib" in report:
        p = report["peak_memory_mib"]
        print(f"peak memory ({report['peak_memory_kind']}) MiB  MoCo-v2 {p['mocov2']:.0f}  DenseCL {p['densecl']:.0f}"
              f"  ratio {p['densecl'] / p['mocov2']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
