"""MoCo-v2 vs DenseCL training-step speed and peak memory, measured interleaved in one run.

The paper says DenseCL costs under 1% more time than MoCo-v2 (spec pretraining.md §6). The timing is
`protocols.pretrain_overhead.measure` (the `pretrain_overhead` protocol): both models on the same backbone,
batch and image size, steps alternating (A B, then B A, ...) so drift in machine load hits both equally:

- compute-only: forward + backward + SGD on image tensors already in memory;
- end-to-end: the same step fed by the real two-view data pipeline (DataLoader + augmentation).

Peak memory is CUDA's max_memory_allocated per method on a GPU; on a CPU, the peak resident set
size of a fresh process that runs a few steps of one method (the training state included).
`--json FILE` writes every figure, per-step times included; `densecl-bench eval pretrain_overhead
--from-json FILE` stores it as a protocol run that the verdicts read.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
from pathlib import Path

import torch

from baselines import config as configs
from protocols.common import resolve_device
from protocols.pretrain_overhead import COMPARED, OverheadConfig, Stepper, measure


def parse_args(argv=None) -> tuple[OverheadConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configs.add_arguments(parser, OverheadConfig, skip=("from_json",), defaults={"steps": 10})
    parser.add_argument("--data", default="", help="image folder for end-to-end (default: synthetic VOC images)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k not in ("data", "skip_memory", "json")}
    return OverheadConfig(**{"steps": 10, **values}), args


def _peak_rss_worker(method: str, cfg: OverheadConfig, queue) -> None:
    stepper = Stepper(method, cfg, torch.device("cpu"))
    shape = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    for _ in range(3):
        stepper.step(torch.randn(shape), torch.randn(shape))
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB -> MiB on Linux


def peak_memory_mib(cfg: OverheadConfig, device: torch.device) -> dict[str, float]:
    shape = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    peaks = {}
    for method in COMPARED:
        if device.type == "cuda":
            stepper = Stepper(method, cfg, device)
            stepper.step(torch.randn(shape), torch.randn(shape))
            torch.cuda.reset_peak_memory_stats(device)
            stepper.step(torch.randn(shape), torch.randn(shape))
            peaks[method] = torch.cuda.max_memory_allocated(device) / 2**20
            del stepper
            torch.cuda.empty_cache()
        else:
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            proc = ctx.Process(target=_peak_rss_worker, args=(method, cfg, queue))
            proc.start()
            peaks[method] = queue.get()
            proc.join()
    return peaks


def main(argv=None) -> int:
    cfg, args = parse_args(argv)
    device = resolve_device(cfg.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({where}), {cfg.arch} {cfg.image_size}px, batch {cfg.batch_size}, queue {cfg.queue_size}, "
          f"amp {cfg.amp}, channels_last {cfg.channels_last}, "
          f"{cfg.steps} timed steps/method after {cfg.warmup} warm-up")
    if cfg.end_to_end and not args.data:
        from protocols.datasets import synthetic

        args.data = str(synthetic.cached(images=512, size=96, seed=1) / "JPEGImages")
    report = measure(cfg, args.data or None, progress=True)
    if not args.skip_memory:
        report["peak_memory_mib"] = peak_memory_mib(cfg, device)
        report["peak_memory_kind"] = "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS"
    for mode in ("compute_only", "end_to_end"):
        if mode in report:
            r = report[mode]
            print(f"{mode:13s} images/s  MoCo-v2 {r['images_per_s']['mocov2']:8.1f}  "
                  f"DenseCL {r['images_per_s']['densecl']:8.1f}"
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
