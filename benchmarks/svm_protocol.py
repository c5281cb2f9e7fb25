r"""Speed and agreement of the VOC07 SVM protocols: the project's liblinear path against the batched solver.

Both sides get the same synthetic VOC07-shaped features (spec protocols.md §1.4-§1.7, §7) in ONE
run: the liblinear path is `voc_svm.train_and_test_svm` / `voc_svm.run_low_shot` with its process
pool (workers = all cores unless --workers), the batched one `svm_solver.train_and_test_svm_batched`
/ `svm_solver.run_low_shot_batched`. Printed per layer and protocol: wall and CPU seconds (this
process plus its worker processes; the cores may be shared with other work), the speed-up, the
mAP difference, the largest per-class AP difference, chosen-cost agreement (a disagreement inside a
CV tie < 1e-4 is marked), peak memory (RSS; CUDA max allocated on a GPU), liblinear's
ConvergenceWarnings and the batched solver's certificates. The last line is always

  speedup full: X.Xx, lowshot: Y.Yx, max mAP diff: Z

(wall-time ratios summed over layers; Z in mAP points over both protocols; n/a where not run).

Defaults are the VOC07 sizes: 5011 train / 4952 test rows, 20 classes, 19 costs, 3 folds, 5 low-shot
samples x 8 ks, layers of 2048 and 9216 dims. The liblinear side takes tens of minutes there on two
cores; scale down with --train-rows/--test-rows/--dims/--classes/--costs/--ks/--samples, e.g.
  python benchmarks/svm_protocol.py --train-rows 1500 --test-rows 1500 --dims 2048 --classes 8
--gpu-only times only the batched solver (--device cuda) on the five ResNet-50 layer sizes
(9216/9216/8192/9216/8192), full and low-shot.

Threads: torch's OpenMP threads spin while waiting; on cores shared with other work that makes
small tensor operations slow by orders of magnitude, so this script sets OMP_WAIT_POLICY=PASSIVE
(before torch is imported) unless it is set already.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads its OpenMP runtime (see above)

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocols import svm_solver, voc_svm

# Images per class in VOC07 trainval (approximate), to make label frequencies VOC-like.
VOC07_TRAINVAL_IMAGES = (
    238, 243, 330, 181, 244, 186, 713, 337, 445, 141, 200, 421, 287, 245, 2008, 245, 96, 229, 261, 256,
)
RESNET50_LAYER_DIMS = (9216, 9216, 8192, 9216, 8192)  # feat1..feat5 of the SVM protocol (§1.3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rows", type=int, default=5011, help="train images (VOC07 trainval: 5011)")
    parser.add_argument("--test-rows", type=int, default=4952, help="test images (VOC07 test: 4952)")
    parser.add_argument("--dims", default="2048,9216", help="comma-separated feature sizes, one layer each")
    parser.add_argument("--classes", type=int, default=20, help="label columns, the first N VOC classes (<= 20)")
    parser.add_argument("--costs", default="all", help="comma-separated costs, or 'all' for the reference's 19")
    parser.add_argument("--ks", default="1,2,4,8,16,32,64,96", help="low-shot k values")
    parser.add_argument("--samples", type=int, default=5, help="low-shot samples")
    parser.add_argument("--workers", type=int, default=None, help="liblinear worker processes (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="data seed and LinearSVC random_state")
    parser.add_argument("--device", default="cpu", help="batched solver device: cpu or cuda")
    parser.add_argument("--tol", type=float, default=svm_solver.DEFAULT_TOL, help="batched solver tolerance")
    parser.add_argument("--gpu-only", action="store_true",
                        help="time only the batched solver on the five ResNet-50 layer sizes (implies --device cuda)")
    parser.add_argument("--skip-full", action="store_true", help="skip the full SVM protocol")
    parser.add_argument("--skip-low-shot", action="store_true", help="skip the low-shot protocol")
    return parser.parse_args(argv)


def synthetic_voc(train_rows: int, test_rows: int, dims: int, classes: int, seed: int):
    """float32, non-negative (post-ReLU pooled) features whose class signal is weak and shared
    across a few directions; multi-label labels with VOC07 class frequencies and a few difficult (-1).

    Each class has (at least) its VOC07 trainval count of positives, scaled to the rows asked for,
    so k=96 low-shot samples exist at VOC07 size (sheep has 96). The labels depend on the seed and
    the row counts only, not on dims, so every layer of a run sees the same labels.
    """
    label_rng = np.random.default_rng([seed, 0])
    feature_rng = np.random.default_rng([seed, 1, dims])
    counts = np.array(VOC07_TRAINVAL_IMAGES[:classes])
    prevalence = counts / 5011
    prototypes = np.maximum(feature_rng.normal(size=(classes, dims)), 0).astype(np.float32)

    def split(rows: int):
        present = np.zeros((rows, classes), dtype=bool)
        for c in range(classes):
            present[label_rng.choice(rows, size=min(rows, round(counts[c] * rows / 5011)), replace=False), c] = True
        empty = ~present.any(axis=1)
        present[empty, label_rng.choice(classes, size=int(empty.sum()), p=prevalence / prevalence.sum())] = True
        difficult = ~present & (label_rng.random((rows, classes)) < 0.15 * prevalence)
        labels = np.where(present, 1, 0).astype(np.int32)
        labels[difficult] = -1
        strength = label_rng.uniform(0.0, 0.6, size=(rows, classes)) * (present | difficult)
        features = feature_rng.normal(size=(rows, dims)).astype(np.float32) + strength.astype(np.float32) @ prototypes
        return np.maximum(features, 0), labels

    return split(train_rows), split(test_rows)


# ----------------------------------------------------------------------------------------------
# Measuring


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets this process's VmHWM (peak RSS)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_gib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measured(fn, *args, **kwargs):
    """(result, wall s, CPU s of this process and of worker processes that ended, peak RSS GiB, CUDA GiB)."""
    _reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = children.ru_utime + children.ru_stime
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn(*args, **kwargs)
    wall = time.perf_counter() - wall
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - cpu + children.ru_utime + children.ru_stime - child_cpu
    cuda = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    worker_peak = children.ru_maxrss / 2**20  # the largest worker process so far
    return result, wall, cpu, max(_peak_rss_gib(), 0.0), cuda, worker_peak


def full_agreement(ours: dict, ref: dict) -> dict:
    ap_diff = max(abs(ours["ap"][c] - ref["ap"][c]) for c in ref["ap"])
    tie_classes = {t["class"] for t in ours["ties"]}
    differ = [c for c, a, b in zip(ref["classes"], ours["chosen_cost_index"], ref["chosen_cost_index"], strict=False)
              if a != b]
    return {"map_diff": ours["mAP"] - ref["mAP"], "ap_diff": ap_diff, "differ": differ,
            "differ_outside_ties": [c for c in differ if c not in tie_classes], "ties": ours["ties"],
            "cv_diff": float(np.nanmax(np.abs(np.array(ours["cv_ap"]) - np.array(ref["cv_ap"]))))}


def low_shot_agreement(ours: dict, ref: dict) -> dict:
    means = [a["mean"] - b["mean"] for a, b in zip(ours["per_k"], ref["per_k"], strict=True)]
    differ = [a["k"] for a, b in zip(ours["per_k"], ref["per_k"], strict=True) if a["cost_index"] != b["cost_index"]]
    grid = 100 * float(np.abs(np.array(ours["test_map"]) - np.array(ref["test_map"])).max())
    return {"map_diff": max(means, key=abs), "grid_diff": grid, "differ": differ}


def report(kind: str, lib: tuple | None, bat: tuple, agree: dict | None) -> None:
    _, wall, cpu, rss, cuda, _ = bat
    result = bat[0]
    diag = result["solver_diagnostics"]
    line = (f"  batched   {wall:8.1f} s wall {cpu:9.1f} CPU-s  peak RSS {rss:5.2f} GiB"
            + (f", CUDA {cuda:5.2f} GiB" if cuda else "")
            + f"  [{diag['problems']} problems, max rel. grad {diag['max_rel_grad']:.1e}, "
            f"Stage A share {diag['stage_a_share']:.2f}, not converged {diag['not_converged']}]")
    if lib is None:
        print(line)
        return
    ref, lwall, lcpu, lrss, _, worker_rss = lib
    print(f"  liblinear {lwall:8.1f} s wall {lcpu:9.1f} CPU-s  peak RSS {lrss:5.2f} GiB (largest worker "
          f"{worker_rss:5.2f} GiB)  [{ref['fits']} fits, {ref['workers']} workers, "
          f"{ref['convergence_warnings']} ConvergenceWarnings (max_iter reached)]")
    print(line)
    print(f"  speed-up {lwall / wall:6.1f}x wall, {lcpu / cpu:6.1f}x CPU")
    if kind == "full":
        print(f"  mAP {result['mAP']:.4f} vs {ref['mAP']:.4f}: diff {agree['map_diff']:+.2e} points; max per-class AP "
              f"diff {agree['ap_diff']:.2e}; max CV AP diff {agree['cv_diff']:.1e}")
        print(f"  chosen costs: {len(ref['classes']) - len(agree['differ'])}/{len(ref['classes'])} identical"
              + (f"; differ for {agree['differ']} ({len(agree['differ_outside_ties'])} outside CV ties)"
                 if agree["differ"] else "")
              + f"; ties < 1e-4 in the batched CV table: {len(agree['ties'])}"
              + (f" ({', '.join(t['class'] + ' ' + '/'.join(f'{c:g}' for c in t['costs']) for t in agree['ties'])})"
                 if agree["ties"] else ""))
    else:
        print(f"  per-k mean mAP: max diff {agree['map_diff']:+.2e} points; max diff over samples x ks x costs "
              f"{agree['grid_diff']:.2e} points; chosen cost differs for k in {agree['differ'] or 'none'}")


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    costs = voc_svm.DEFAULT_COSTS if args.costs == "all" else tuple(float(c) for c in args.costs.split(","))
    ks = tuple(int(k) for k in args.ks.split(","))
    if not 1 <= args.classes <= 20:
        sys.exit("--classes must be in 1..20")
    device = "cuda" if args.gpu_only else args.device
    try:
        svm_solver.resolve_solver_device(device)
    except voc_svm.SVMInputError as error:
        print(f"cannot run: {error}", file=sys.stderr)
        print("speedup full: n/a, lowshot: n/a, max mAP diff: n/a")
        return 2
    dims = RESNET50_LAYER_DIMS if args.gpu_only else tuple(int(d) for d in args.dims.split(","))
    settings = svm_solver.SolverSettings(tol=args.tol)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"rows {args.train_rows} train / {args.test_rows} test, {args.classes} classes, {len(costs)} costs, "
          f"layers {dims}; low-shot ks {ks} x {args.samples} samples; cores {cores}, liblinear workers "
          f"{args.workers or 'all'}, batched device {device} ({torch.get_num_threads()} torch threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), load average {os.getloadavg()[0]:.1f}")

    totals = {"full": [0.0, 0.0], "lowshot": [0.0, 0.0]}
    max_diff = None
    for d in dims:
        (train_x, train_y), (test_x, test_y) = synthetic_voc(args.train_rows, args.test_rows, d, args.classes,
                                                             args.seed)
        print(f"\nlayer {d}-d: train {train_x.shape} test {test_x.shape}, "
              f"{int((train_y == 1).sum())} positive labels")
        if not args.skip_full:
            cfg = voc_svm.SVMConfig(costs=costs, seed=args.seed, workers=args.workers)
            bat = measured(svm_solver.train_and_test_svm_batched, train_x, train_y, test_x, test_y, cfg, False,
                           device=device, settings=settings)
            lib = agree = None
            if not args.gpu_only:
                lib = measured(voc_svm.train_and_test_svm, train_x, train_y, test_x, test_y, cfg, False)
                agree = full_agreement(bat[0], lib[0])
                totals["full"][0] += lib[1]
                max_diff = max(abs(agree["map_diff"]), max_diff or 0.0)
            totals["full"][1] += bat[1]
            print(f" full SVM ({len(costs)} costs x {args.classes} classes x (3 folds) + refits):")
            report("full", lib, bat, agree)
        usable = voc_svm.feasible_ks(train_y, ks)
        if usable != ks:
            print(f" low-shot: k={sorted(set(ks) - set(usable))} need more rows per class than {args.train_rows}; "
                  f"running k={list(usable)}")
        if not args.skip_low_shot and usable:
            lcfg = voc_svm.LowShotConfig(ks=usable, samples=args.samples, costs=costs, seed=args.seed,
                                         workers=args.workers)
            bat = measured(svm_solver.run_low_shot_batched, train_x, train_y, test_x, test_y, lcfg, False,
                           device=device, settings=settings)
            lib = agree = None
            if not args.gpu_only:
                lib = measured(voc_svm.run_low_shot, train_x, train_y, test_x, test_y, lcfg, False)
                agree = low_shot_agreement(bat[0], lib[0])
                totals["lowshot"][0] += lib[1]
                max_diff = max(abs(agree["map_diff"]), agree["grid_diff"], max_diff or 0.0)
            totals["lowshot"][1] += bat[1]
            print(f" low-shot ({args.samples} samples x {len(usable)} ks x {args.classes} classes "
                  f"x {len(costs)} costs):")
            report("lowshot", lib, bat, agree)
        del train_x, test_x

    def ratio(kind: str) -> str:
        lib, bat = totals[kind]
        return f"{lib / bat:.1f}x" if lib and bat else "n/a"

    if args.gpu_only:
        print(f"\nbatched total: full {totals['full'][1]:.1f} s, low-shot {totals['lowshot'][1]:.1f} s "
              f"on {device} for {len(dims)} layers")
    print(f"speedup full: {ratio('full')}, lowshot: {ratio('lowshot')}, "
          f"max mAP diff: {'n/a' if max_diff is None else f'{max_diff:.2e}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
