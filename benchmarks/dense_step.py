"""Seconds per training iteration and peak memory of each dense-protocol model, at the small-scale and
the reference image sizes, on whatever device is present.

    python benchmarks/dense_step.py                                   # every model, both scales
    python benchmarks/dense_step.py --models voc-c4 voc-fcn --scales small --iterations 5
    python benchmarks/dense_step.py --arch resnet50 --device cuda

Each (model, scale) runs in its own process, so peak memory is that model's alone: CUDA
`max_memory_allocated`, or on the CPU the peak resident set size (which includes the ~1 GiB of
the torch/mm imports). The timed iterations follow `--warmup` untimed ones; the median is printed.
Batches are built from the synthetic scenes resized by the protocol's own pipeline, so the image
sizes are the protocol's (reference: 480-800 short side for detection, 512/769 crops for FCN).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODELS = ("voc-c4", "coco-fpn", "voc-fcn", "cityscapes-fcn")
SCALES = ("small", "reference")


def _batch(model: str, scale: str, batch_size: int, arch_depth: int):
    """(mm model config, dataset) for one benchmark point, built through the protocols' own code."""
    from protocols import detection, mmdet_adapter, mmseg_adapter, segmentation
    from protocols.datasets import dense, synthetic

    voc = synthetic.cached(images=32, size=96, seed=0, progress=False)
    if model in detection.TASKS:
        cfg = detection.make_config(model, scale, batch_size=batch_size)
        if model == "voc-c4":
            train, _ = mmdet_adapter.voc_datasets([voc], "trainval", voc, "test", tuple(cfg.train_short_sides),
                                                  cfg.max_size, cfg.test_short_side, "ignore")
            model_cfg = mmdet_adapter.faster_rcnn_c4(arch_depth, 20, False, cfg.rois_per_image, cfg.test_proposals)
        else:
            coco = dense.synthetic_coco(voc)
            train, _ = mmdet_adapter.coco_datasets(coco, "train2017", "val2017", tuple(cfg.train_short_sides),
                                                   cfg.max_size, cfg.test_short_side)
            model_cfg = mmdet_adapter.mask_rcnn_fpn(arch_depth, 20, False, cfg.rois_per_image, cfg.test_proposals)
        return mmdet_adapter.build_model(model_cfg), train, mmdet_adapter.collate, cfg
    cfg = segmentation.make_config(model, scale, batch_size=batch_size)
    if model == "voc-fcn":
        train, _ = mmseg_adapter.voc_datasets(voc, "train", None, "val", tuple(cfg.scale), cfg.crop_size)
        classes = 21
    else:
        train, _ = mmseg_adapter.cityscapes_datasets(dense.synthetic_cityscapes(voc), "train", "val",
                                                     tuple(cfg.scale), cfg.crop_size)
        classes = 19
    model_cfg = mmseg_adapter.fcn(arch_depth, classes, False, cfg.crop_size, cityscapes=model == "cityscapes-fcn")
    return mmseg_adapter.build_model(model_cfg), train, mmseg_adapter.collate, cfg


def measure_one(model: str, scale: str, arch: str, batch_size: int | None, iterations: int, warmup: int,
                device: str) -> dict:
    import torch

    from protocols.transfer import resnet_depth

    warnings.simplefilter("ignore")
    from protocols import detection, segmentation

    module = detection if model in detection.TASKS else segmentation
    reference_batch = module.make_config(model, scale).batch_size
    batch_size = batch_size or (reference_batch if scale == "small" else 2)
    net, train, collate, cfg = _batch(model, scale, batch_size, resnet_depth(arch))
    net.to(device).train()
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, shape = [], None
    for step in range(warmup + iterations):
        batch = collate([train[(step * batch_size + i) % len(train)] for i in range(batch_size)])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        tic = time.perf_counter()
        data = net.data_preprocessor(batch, training=True)
        loss, _ = net.parse_losses(net(**data, mode="loss"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - tic)
        shape = tuple(data["inputs"].shape)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"model": model, "scale": scale, "arch": arch, "device": device, "batch": batch_size,
            "input": list(shape), "seconds_per_iteration": statistics.median(times),
            "peak_memory_mib": round(peak),
            "memory_kind": "cuda allocated" if device.startswith("cuda") else "peak RSS",
            "rois_per_image": getattr(cfg, "rois_per_image", None), "threads": torch.get_num_threads()}


class BenchmarkFailed(RuntimeError):
    """A (model, scale) point whose child process failed; the message is its last stderr line."""


def run_isolated(model: str, scale: str, arch: str, batch_size: int | None, iterations: int, warmup: int,
                 device: str) -> dict:
    """`measure_one` in a fresh process, so the peak memory it reports is that model's alone."""
    command = [sys.executable, __file__, "--one", f"{model}:{scale}", "--arch", arch, "--iterations",
               str(iterations), "--warmup", str(warmup), "--device", device]
    if batch_size:
        command += ["--batch", str(batch_size)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise BenchmarkFailed(lines[-1] if lines else f"exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--scales", nargs="+", choices=SCALES, default=list(SCALES))
    parser.add_argument("--arch", default="resnet18", help="resnet18 (the small-scale backbone) or resnet50")
    parser.add_argument("--batch", type=int, help="images per iteration (default: the small preset's; 2 at reference)")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default: 1)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.one:
        model, scale = args.one.split(":")
        print(json.dumps(measure_one(model, scale, args.arch, args.batch, args.iterations, args.warmup, device)))
        return 0
    print(f"{'model':15s} {'scale':9s} {'arch':9s} {'batch':>5s} {'input':>18s} {'s/iter':>8s} "
          f"{'peak MiB':>9s}  ({device})")
    for model in args.models:
        for scale in args.scales:
            try:
                r = run_isolated(model, scale, args.arch, args.batch, args.iterations, args.warmup, device)
            except BenchmarkFailed as failure:
                print(f"{model:15s} {scale:9s} failed: {failure}")
                continue
            print(f"{model:15s} {scale:9s} {r['arch']:9s} {r['batch']:5d} {'x'.join(map(str, r['input'])):>18s} "
                  f"{r['seconds_per_iteration']:8.2f} {r['peak_memory_mib']:9d}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
