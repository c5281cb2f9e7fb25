"""The GPU figures of issue 13 in one run and one table: pretraining step times, protocol throughput, det/seg.

    python benchmarks/gpu_check.py                          # on one GPU: at most 5 minutes on an H100/H200
    python benchmarks/gpu_check.py --json gpu_check.json    # also save the table and the raw figures
    python benchmarks/gpu_check.py --device cpu --tiny      # tiny sizes, about a minute: the smoke test's run

Every figure comes from the project's own code and benchmarks, imported (not re-implemented):

- pretrain: `protocols.pretrain_overhead.measure` (what `benchmarks/pretrain_step.py` prints): MoCo-v2 and
  DenseCL steps interleaved at R50/224, batch 32, queue 65536, in fp32 and in bf16 autocast; compute-only
  (tensors already on the device) and end-to-end (our DataLoader and MoCo-v2 augmentation on synthetic JPEGs).
  Each gives the DenseCL/MoCo-v2 median step-time ratio and images/s per method; peak memory per method and
  precision is `pretrain_step.peak_memory_mib` (CUDA max_memory_allocated over one step).
- svm: the batched solver (`protocols.svm_solver`) on one VOC07-sized layer (5011/4952 rows x 9216-d, 20
  classes, 19 costs, 3 folds + refits) from `benchmarks/svm_protocol.py`'s synthetic features: seconds, fits/s.
- knn: `protocols.knn.knn_classify` (FAISS on the CPU, as the protocol runs it) via `benchmarks/knn.py`:
  queries/s on a 100k x 2048 bank, k up to 200.
- features: `protocols.features.extract_to` as the VOC07 protocol calls it (all five SVM-pooled layers,
  Resize(256) + 224x224 squash, batch 32): images/s, JPEG decoding included.
- detseg: `benchmarks/dense_step.py` (each model in its own process; --tiny: in this one) at the reference
  input sizes, R50, batch 2 (the reference's per-GPU batch): seconds per training iteration. Skipped, with
  the reason in the table, when mmcv/mmdet/mmseg are missing.

The synthetic JPEGs are the generator's 96 px scenes re-encoded at 500x375 (a VOC/ImageNet-sized image),
so decoding costs what it costs on real data. Every timed section warms up first (CUDA context, cuDNN
autotuning, loader workers, FAISS threads) and synchronises CUDA around its timers (--tiny skips the
det/seg warm-up: there the figures only show that the code runs).

Budgets on one H200 (estimates: no GPU was available when this was written, so none is measured yet):
setup and synthetic data 20 s; pretrain 100 s (2 precisions x 2 modes x 45 paired rounds, plus peak memory);
svm 40 s; knn 20 s; features 15 s; detseg 80 s (4 models x 7 iterations, about 10 s start-up each): 275 s.
The footer prints each section's seconds, so a run shows where it stands against these.

bf16 rows are skipped (with the reason) on a GPU without native bf16 (compute capability < 8.0). On a CPU
the pretraining peak-memory rows are skipped (`benchmarks/pretrain_step.py` measures peak RSS). The project
never needs a GPU: `--device cpu --tiny` runs every section at tiny sizes. A failed section fills its rows
with the error and the exit status is 1.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see benchmarks/svm_protocol.py

import argparse
import gc
import json
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for `benchmarks` and the packages

import torch

from baselines.data import find_images
from baselines.methods import paper_name
from benchmarks import dense_step, knn, pretrain_step, svm_protocol
from protocols.common import SubjectError, resolve_device
from protocols.pretrain_overhead import COMPARED, OverheadConfig, measure

LOG = logging.getLogger("gpu_check")
IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000


@dataclass(frozen=True)
class Sizes:
    """Every size the sections use: FULL is the issue's, TINY runs in seconds on a busy CPU."""

    arch: str
    image_size: int
    batch_size: int
    queue_size: int
    steps: int
    warmup: int
    scenes: int  # distinct synthetic scenes
    jpeg_size: tuple[int, int]  # (width, height) they are re-encoded at
    listed: int  # lines of the list file the loaders read: the scenes repeated, so epochs are long
    feature_images: int
    svm_rows: tuple[int, int]
    svm_dim: int
    svm_classes: int
    svm_costs: tuple[float, ...] | None  # None: the reference's 19
    knn_bank: int
    knn_queries: int
    knn_dim: int
    knn_classes: int
    knn_ks: tuple[int, ...]
    dense_scale: str
    dense_arch: str
    dense_batch: int | None  # None: dense_step's default (2 at the reference scale)
    dense_iterations: int
    dense_warmup: int
    dense_isolated: bool  # each model in its own process, so its peak memory is its own; TINY spares the imports


FULL = Sizes(arch="resnet50", image_size=224, batch_size=32, queue_size=65536, steps=40, warmup=5, scenes=256,
             jpeg_size=(500, 375), listed=4096, feature_images=2048, svm_rows=(5011, 4952), svm_dim=9216,
             svm_classes=20, svm_costs=None, knn_bank=100_000, knn_queries=10_000, knn_dim=2048, knn_classes=1000,
             knn_ks=(10, 20, 100, 200), dense_scale="reference", dense_arch="resnet50", dense_batch=None,
             dense_iterations=5, dense_warmup=2, dense_isolated=True)
TINY = Sizes(arch="resnet18", image_size=32, batch_size=4, queue_size=16, steps=2, warmup=1, scenes=8,
             jpeg_size=(96, 72), listed=32, feature_images=8, svm_rows=(120, 120), svm_dim=64, svm_classes=3,
             svm_costs=(0.01, 1.0, 100.0), knn_bank=2000, knn_queries=200, knn_dim=32, knn_classes=10, knn_ks=(10, 20),
             dense_scale="small", dense_arch="resnet18", dense_batch=1, dense_iterations=1, dense_warmup=0,
             dense_isolated=False)


@dataclass
class Row:
    section: str
    name: str
    value: float | None
    unit: str
    note: str = ""


@dataclass
class Context:
    """What every section gets: the sizes, the device, the loader settings and the synthetic images."""

    sizes: Sizes
    device: torch.device
    workers: int
    channels_last: bool
    listing: Path
    files: list[str]
    details: dict = field(default_factory=dict)  # raw figures, for --json


Found = dict[str, tuple[float | None, str]]  # row name -> (value, note)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_peak_note(device: torch.device) -> str:
    return f", CUDA peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB" if device.type == "cuda" else ""


def reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------
# Data


def pipeline_images(sizes: Sizes, out: Path) -> Path:
    """A list file of synthetic scenes re-encoded at `sizes.jpeg_size`, repeated to `sizes.listed` lines.

    The generator draws small scenes quickly; at VOC/ImageNet size JPEG decoding costs what it does on real
    images. A long list keeps epochs long, so the loaders do not stall at epoch ends during the timed steps.
    """
    from PIL import Image

    from protocols.datasets import synthetic

    source = synthetic.cached(images=sizes.scenes, size=96, seed=1, progress=False) / "JPEGImages"
    names = []
    for path in sorted(source.glob("*.jpg")):
        with Image.open(path) as image:
            image.convert("RGB").resize(sizes.jpeg_size, Image.Resampling.BICUBIC).save(out / path.name, quality=90)
        names.append(path.name)
    listing = out / "images.txt"
    listing.write_text("".join(f"{names[i % len(names)]}\n" for i in range(sizes.listed)))
    return listing


# ----------------------------------------------------------------------------------------------
# Sections: each has its row names (always printed) and a body that fills them


PRECISIONS = {"fp32": "none", "bf16": "bf16"}  # row label -> OverheadConfig.amp
MODES = {"compute_only": "compute-only", "end_to_end": "end-to-end"}


def precision_names(precision: str) -> list[tuple[str, str]]:
    names = []
    for mode in MODES.values():
        names.append((f"{precision} {mode} step time DenseCL/MoCo-v2", "ratio"))
        names += [(f"{precision} {mode} {paper_name(m)}", "img/s") for m in COMPARED]
    return names + [(f"{precision} peak memory {paper_name(m)}", "MiB") for m in COMPARED]


def pretrain_names() -> list[tuple[str, str]]:
    return [name for precision in PRECISIONS for name in precision_names(precision)]


def bf16_problem(device: torch.device) -> str | None:
    """Why bf16 autocast cannot be timed here, or None; older GPUs would only emulate it."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return f"skipped: {torch.cuda.get_device_name(device)} has no native bf16 (compute capability < 8.0)"
    return None


def run_pretrain(ctx: Context) -> Found:
    s, found = ctx.sizes, {}
    for precision, amp in PRECISIONS.items():
        problem = bf16_problem(ctx.device) if amp == "bf16" else None
        if problem:
            LOG.warning("pretrain %s %s", precision, problem)
            found.update({name: (None, problem) for name, _ in precision_names(precision)})
            continue
        cfg = OverheadConfig(arch=s.arch, image_size=s.image_size, batch_size=s.batch_size, queue_size=s.queue_size,
                             steps=s.steps, warmup=s.warmup, device=str(ctx.device), workers=ctx.workers, amp=amp,
                             channels_last=ctx.channels_last)
        LOG.info("pretrain %s: %d warm-up + %d paired rounds, compute-only then end-to-end", precision, s.warmup,
                 s.steps)
        report = measure(cfg, ctx.listing)
        for key, mode in MODES.items():
            r = report[key]
            waits = f", including waits for data ({ctx.workers} workers per loader)" if key == "end_to_end" else ""
            found[f"{precision} {mode} step time DenseCL/MoCo-v2"] = (
                r["densecl_over_mocov2"], f"medians of {s.steps} paired steps after {s.warmup} warm-up{waits}")
            for m in COMPARED:
                found[f"{precision} {mode} {paper_name(m)}"] = (
                    r["images_per_s"][m], f"{1000 * r['seconds_per_step'][m]:.1f} ms/step of {s.batch_size} images")
        if ctx.device.type == "cuda":
            report["peak_memory_mib"] = pretrain_step.peak_memory_mib(cfg, ctx.device)
        for m in COMPARED:
            found[f"{precision} peak memory {paper_name(m)}"] = (
                (report["peak_memory_mib"][m], "CUDA max_memory_allocated over one step, training state included")
                if "peak_memory_mib" in report else
                (None, "skipped: CUDA only (peak RSS on a CPU: benchmarks/pretrain_step.py)"))
        ctx.details[f"pretrain_{precision}"] = report
    return found


def svm_names() -> list[tuple[str, str]]:
    return [("full protocol, one layer", "s"), ("full protocol fits", "fits/s")]


def run_svm(ctx: Context) -> Found:
    from protocols import svm_solver, voc_svm

    s = ctx.sizes
    costs = s.svm_costs or voc_svm.DEFAULT_COSTS
    (wx, wy), (wtx, wty) = svm_protocol.synthetic_voc(*TINY.svm_rows, TINY.svm_dim, TINY.svm_classes, 1)
    svm_solver.train_and_test_svm_batched(wx, wy, wtx, wty, voc_svm.SVMConfig(costs=TINY.svm_costs), False,
                                          device=ctx.device)  # warm-up: CUDA context, cuBLAS/cuSOLVER handles
    LOG.info("svm: synthetic %s x %d-d features", s.svm_rows, s.svm_dim)
    (train_x, train_y), (test_x, test_y) = svm_protocol.synthetic_voc(*s.svm_rows, s.svm_dim, s.svm_classes, 0)
    LOG.info("svm: full protocol, %d classes x %d costs, batched solver on %s", s.svm_classes, len(costs), ctx.device)
    cfg = voc_svm.SVMConfig(costs=costs)
    sync(ctx.device)  # measured() times to the solver's return, which copies the scores to the host
    result, wall, _, _, cuda_gib, _ = svm_protocol.measured(
        svm_solver.train_and_test_svm_batched, train_x, train_y, test_x, test_y, cfg, False, device=ctx.device)
    ctx.details["svm"] = {"seconds": wall, "fits": result["fits"], "mAP": result["mAP"],
                          "solver_diagnostics": result["solver_diagnostics"], "cuda_peak_gib": cuda_gib}
    what = (f"{s.svm_rows[0]}/{s.svm_rows[1]} rows x {s.svm_dim}-d, {s.svm_classes} classes x {len(costs)} costs x "
            f"{cfg.folds} folds + refits on {ctx.device}")
    memory = f", CUDA peak {cuda_gib:.2f} GiB" if ctx.device.type == "cuda" else ""
    diag = result["solver_diagnostics"]
    return {"full protocol, one layer": (wall, what + memory),
            "full protocol fits": (result["fits"] / wall, f"{result['fits']} fits, {diag['not_converged']} not "
                                   f"converged")}


def knn_names() -> list[tuple[str, str]]:
    return [("weighted k-NN", "queries/s")]


def run_knn(ctx: Context) -> Found:
    import faiss

    s = ctx.sizes

    def args(bank: int) -> argparse.Namespace:
        return knn.parse_args(["--sizes", str(bank), "--queries", str(s.knn_queries), "--dim", str(s.knn_dim),
                               "--classes", str(s.knn_classes), "--ks", *map(str, s.knn_ks), "--storage", "ram"])

    knn.measure(args(max(1000, max(s.knn_ks))), max(1000, max(s.knn_ks)))  # warm-up: FAISS/BLAS threads
    LOG.info("knn: bank %d x %d, %d queries", s.knn_bank, s.knn_dim, s.knn_queries)
    r = knn.measure(args(s.knn_bank), s.knn_bank)
    ctx.details["knn"] = r
    note = (f"bank {s.knn_bank:,} x {s.knn_dim}, {s.knn_classes} classes, k {list(s.knn_ks)}, FAISS on "
            f"{faiss.omp_get_max_threads()} CPU threads (the protocol's path)")
    if s.knn_dim == FULL.knn_dim:
        full = r["seconds"] * IMAGENET_TRAIN / s.knn_bank * IMAGENET_VAL / s.knn_queries
        note += f"; IN-1k (1.28M bank, 50k queries) ~{full:.0f} s by linear scaling"
    return {"weighted k-NN": (s.knn_queries / r["seconds"], note)}


def feature_names() -> list[tuple[str, str]]:
    return [("VOC07 SVM features, 5 layers", "img/s")]


def run_features(ctx: Context) -> Found:
    from baselines.backbone import FEATURE_NAMES, create_backbone
    from protocols.datasets.classification import LabeledImages
    from protocols.features import extract_to, svm_transform
    from protocols.voc_svm import VOCFeatures

    s = ctx.sizes
    batch = VOCFeatures().batch_size
    backbone = create_backbone(s.arch)
    samples = [(path, 0) for path in ctx.files[: s.feature_images]]
    with tempfile.TemporaryDirectory(prefix="gpu_check_features_") as tmp:

        def extract(rows: list[tuple[str, int]], split: str) -> float:
            sync(ctx.device)
            start = time.perf_counter()
            extract_to(Path(tmp), backbone, LabeledImages(rows, svm_transform()), list(FEATURE_NAMES), "svm", split,
                       batch_size=batch, workers=ctx.workers, device=ctx.device, progress=False)
            sync(ctx.device)
            return time.perf_counter() - start

        extract(samples[: 2 * batch], "warmup")  # cuDNN autotuning, loader start
        reset_cuda_peak(ctx.device)
        LOG.info("features: %d images, %s, all five SVM-pooled layers", len(samples), s.arch)
        seconds = extract(samples, "timed")
        memory = cuda_peak_note(ctx.device)
    ctx.details["features"] = {"images": len(samples), "seconds": seconds}
    width, height = s.jpeg_size
    return {"VOC07 SVM features, 5 layers": (
        len(samples) / seconds, f"{s.arch} fp32, {len(samples)} JPEGs {width}x{height}, Resize(256) + 224x224, "
        f"batch {batch}, {ctx.workers} workers, written to .npy memmaps{memory}")}


def detseg_names() -> list[tuple[str, str]]:
    return [(f"{model} training iteration", "s/iter") for model in dense_step.MODELS]


def run_detseg(ctx: Context) -> Found:
    from protocols.transfer import MMStackMissing, require_mm_stack

    s = ctx.sizes
    try:
        for package in ("mmdet", "mmseg"):
            require_mm_stack(package)
    except MMStackMissing as missing:
        LOG.warning("detseg skipped: %s", missing)
        return {name: (None, f"skipped: {str(missing).split(';')[0]}") for name, _ in detseg_names()}
    measure_model = dense_step.run_isolated if s.dense_isolated else dense_step.measure_one  # same arguments
    found = {}
    for model in dense_step.MODELS:
        LOG.info("detseg: %s at the %s scale, %d warm-up + %d timed iterations", model, s.dense_scale, s.dense_warmup,
                 s.dense_iterations)
        try:
            r = measure_model(model, s.dense_scale, s.dense_arch, s.dense_batch, s.dense_iterations, s.dense_warmup,
                              str(ctx.device))
        except Exception as err:  # one model's failure leaves the other rows
            found[f"{model} training iteration"] = (None, f"failed: {err}".splitlines()[0])
            continue
        ctx.details[f"detseg_{model}"] = r
        shape = "x".join(map(str, r["input"]))
        whose = "" if s.dense_isolated else " of this whole process"
        found[f"{model} training iteration"] = (
            r["seconds_per_iteration"], f"{s.dense_scale} input {shape}, {r['arch']}, median of {s.dense_iterations} "
            f"after {s.dense_warmup} warm-up, peak {r['peak_memory_mib']} MiB ({r['memory_kind']}{whose})")
    return found


SECTIONS: dict[str, tuple[Callable[[], list[tuple[str, str]]], Callable[[Context], Found]]] = {
    "pretrain": (pretrain_names, run_pretrain),
    "svm": (svm_names, run_svm),
    "knn": (knn_names, run_knn),
    "features": (feature_names, run_features),
    "detseg": (detseg_names, run_detseg),
}


def run_section(section: str, ctx: Context) -> list[Row]:
    """The section's rows; a section that fails fills its rows with the error, so the others still report."""
    names, body = SECTIONS[section]
    try:
        found = body(ctx)
    except Exception as err:
        LOG.exception("section %s failed", section)
        found = {name: (None, f"failed: {type(err).__name__}: {err}".splitlines()[0]) for name, _ in names()}
    finally:
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    rows = []
    for name, unit in names():
        value, note = found.get(name, (None, "failed: not measured"))
        rows.append(Row(section, name, value, unit, note))
    return rows


# ----------------------------------------------------------------------------------------------
# Output


FORMATS = {"ratio": ".3f", "img/s": ".1f", "MiB": ".0f", "s": ".2f", "fits/s": ".1f", "queries/s": ".0f",
           "s/iter": ".3f"}


def format_table(rows: list[Row]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'section':9s} {'row':{width}s} {'value':>10s} {'unit':9s} note"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        value = "-" if r.value is None else format(r.value, FORMATS.get(r.unit, ".4g"))
        lines.append(f"{r.section:9s} {r.name:{width}s} {value:>10s} {r.unit:9s} {r.note}")
    return "\n".join(lines)


def device_line(device: torch.device) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        what = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}"
        stack = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        what, stack = platform.processor() or platform.machine(), "no CUDA in use"
    return (f"device {device} ({what}) | torch {torch.__version__}, {stack} | Python {platform.python_version()} | "
            f"{cores} CPU cores, {torch.get_num_threads()} torch threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")


def settings_line(ctx: Context, tiny: bool) -> str:
    s, cudnn, matmul = ctx.sizes, torch.backends.cudnn, torch.backends.cuda.matmul
    return (f"settings {'tiny' if tiny else 'full'} | pretrain {s.arch}/{s.image_size}px batch {s.batch_size} queue "
            f"{s.queue_size}, {s.steps} timed paired steps after {s.warmup} warm-up, fp32 and bf16 autocast, "
            f"channels_last {ctx.channels_last}, cudnn.benchmark {cudnn.benchmark}, TF32 conv {cudnn.allow_tf32} "
            f"matmul {matmul.allow_tf32} (torch defaults), {ctx.workers} workers per loader, {s.listed} listed JPEGs "
            f"({s.scenes} distinct, {s.jpeg_size[0]}x{s.jpeg_size[1]}) | svm {s.svm_rows[0]}/{s.svm_rows[1]} x "
            f"{s.svm_dim}-d | knn {s.knn_bank:,} x {s.knn_dim} bank, {s.knn_queries:,} queries | features "
            f"{s.feature_images} images | det/seg {s.dense_scale} scale {s.dense_arch}, {s.dense_iterations} timed "
            f"after {s.dense_warmup} warm-up")


def default_workers() -> int:
    """Loader workers per DataLoader: the end-to-end mode runs two loaders at once, so half the spare cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, (cores - 2) // 2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (a minute or less on 2 CPU cores): a smoke run")
    parser.add_argument("--json", help="also write the table, the settings and the raw figures to this file")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        help="run only these sections (default: all)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="data-loader workers per loader (default: half the spare cores, at most 8)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last for the pretraining models")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[gpu_check %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports which SIMD build it found
    try:
        device = resolve_device(args.device)
    except SubjectError as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2
    if device.type == "cpu" and not args.tiny:
        LOG.warning("full sizes on a CPU take hours; --tiny is the CPU run")
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)  # the child processes of detseg get "cuda:N" too
        torch.backends.cudnn.benchmark = True  # as the trainer sets it (baselines/train.py)
    sizes = TINY if args.tiny else FULL
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_images_") as tmp:
        LOG.info("setup: %d synthetic JPEGs at %dx%d", sizes.scenes, *sizes.jpeg_size)
        listing = pipeline_images(sizes, Path(tmp))
        ctx = Context(sizes, device, args.workers, args.channels_last, listing, find_images(listing))
        seconds["setup"] = time.perf_counter() - started
        print(device_line(device))
        print(settings_line(ctx, args.tiny), flush=True)
        rows: list[Row] = []
        for section in args.sections:
            start = time.perf_counter()
            rows += run_section(section, ctx)
            seconds[section] = time.perf_counter() - start
    seconds["total"] = time.perf_counter() - started
    print(format_table(rows))
    print("seconds: " + ", ".join(f"{name} {value:.1f}" for name, value in seconds.items())
          + ("" if args.tiny else " (budget, estimated: 275 on an H200)"))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": device_line(device), "settings": settings_line(ctx, args.tiny), "sizes": asdict(sizes),
            "rows": [asdict(r) for r in rows], "seconds": seconds, "details": ctx.details}, indent=1, default=str))
    return 1 if any(r.note.startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
