r"""Speed of protocols.voc_svm against a plain serial loop of the same sklearn fits.

The plain loop is how the reference scripts work (spec protocols.md §1.4-§1.7): one process,
for class, for cost: `cross_val_score` + `fit` on all rows (every cost refitted), then test the
CV-chosen cost; low-shot: for sample, k, class, cost: fit + test. Both sides get the same
synthetic VOC07-shaped features and the same fixed LinearSVC random_state, so their mAPs must be
identical; the script prints the difference. At the real size (5011 x 8192, 20 classes, 19 costs)
the serial loop takes hours on two cores: scale down with --train-rows/--test-rows/--dims/
--classes/--costs/--ks/--samples. Prints what was run, wall times, the ratio and both mAPs.

Example (about two minutes on two busy cores):
  python benchmarks/svm_protocol.py --train-rows 1500 --test-rows 1500 --dims 2048 \
      --classes 8 --costs 1,10,0.0625,0.001953125 --ks 1,8,32 --samples 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import cross_val_score
from sklearn.svm import LinearSVC
from threadpoolctl import threadpool_limits

from protocols import voc_svm

# Images per class in VOC07 trainval (approximate), to make label frequencies VOC-like.
VOC07_TRAINVAL_IMAGES = (
    238, 243, 330, 181, 244, 186, 713, 337, 445, 141, 200, 421, 287, 245, 2008, 245, 96, 229, 261, 256,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-rows", type=int, default=5011, help="train images (VOC07 trainval: 5011)")
    parser.add_argument("--test-rows", type=int, default=4952, help="test images (VOC07 test: 4952)")
    parser.add_argument("--dims", type=int, default=8192, help="feature dims (feat5: 8192)")
    parser.add_argument("--classes", type=int, default=20, help="label columns, the first N VOC classes (<= 20)")
    parser.add_argument("--costs", default="all", help="comma-separated costs, or 'all' for the reference's 19")
    parser.add_argument("--ks", default="1,2,4,8,16,32,64,96", help="low-shot k values")
    parser.add_argument("--samples", type=int, default=5, help="low-shot samples")
    parser.add_argument("--workers", type=int, default=None, help="our side's worker processes (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="data seed and LinearSVC random_state of both sides")
    parser.add_argument(
        "--reference-blas-threads", type=int, default=None,
        help="cap the reference loop's BLAS threads (default: the library's, as the reference runs; "
        "ours always uses 1 per worker)",
    )
    parser.add_argument("--skip-full", action="store_true", help="skip the full SVM comparison")
    parser.add_argument("--skip-low-shot", action="store_true", help="skip the low-shot comparison")
    return parser.parse_args(argv)


def synthetic_voc(train_rows: int, test_rows: int, dims: int, classes: int, seed: int):
    """float32, non-negative (post-ReLU pooled) features whose class signal is weak and shared
    across a few directions; multi-label labels with VOC07 class frequencies and a few difficult (-1)."""
    rng = np.random.default_rng(seed)
    prevalence = np.array(VOC07_TRAINVAL_IMAGES[:classes]) / 5011
    prototypes = np.maximum(rng.normal(size=(classes, dims)), 0).astype(np.float32)

    def split(rows: int):
        present = rng.random((rows, classes)) < prevalence
        empty = ~present.any(axis=1)
        present[empty, rng.choice(classes, size=int(empty.sum()), p=prevalence / prevalence.sum())] = True
        difficult = ~present & (rng.random((rows, classes)) < 0.15 * prevalence)
        labels = np.where(present, 1, 0).astype(np.int32)
        labels[difficult] = -1
        strength = rng.uniform(0.0, 0.6, size=(rows, classes)) * (present | difficult)
        features = rng.normal(size=(rows, dims)).astype(np.float32) + strength.astype(np.float32) @ prototypes
        return np.maximum(features, 0), labels

    return split(train_rows), split(test_rows)


def reference_normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / (np.linalg.norm(x, axis=1) + 1e-5)[:, np.newaxis]


def reference_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """The test-time AP as §1.5 states it, written as loops, independently of voc_svm.interpolated_ap."""
    order = np.argsort(scores)[::-1]
    tp = (labels[order] > 0).astype(np.float64)
    fp = 1.0 - tp
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    precision, recall = tp / (tp + fp), tp / float(np.sum(labels > 0))
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    steps = np.where(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def reference_svm(cost: float, seed: int) -> LinearSVC:
    return LinearSVC(
        C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2", loss="squared_hinge",
        tol=1e-4, dual=True, max_iter=2000, random_state=seed,
    )


def reference_full(train_x, train_y, test_x, test_y, costs, seed) -> float:
    """One process, for class, for cost: cross_val_score + fit; then test the CV-chosen cost."""
    x_train, x_test = reference_normalise(train_x), reference_normalise(test_x)
    aps = []
    for c in range(train_y.shape[1]):
        y = train_y[:, c].copy()
        y[y == 0] = -1
        cv, models = [], []
        for cost in costs:
            model = reference_svm(cost, seed)
            cv.append(cross_val_score(model, x_train, y, cv=3, scoring="average_precision").mean())
            models.append(model.fit(x_train, y))
        scores = models[int(np.argmax(cv))].decision_function(x_test)
        keep = test_y[:, c] != -1
        aps.append(reference_ap(scores[keep], test_y[keep, c]))
    return 100.0 * float(np.mean(aps))


def reference_low_shot(train_x, train_y, test_x, test_y, samples, ks, costs, seed) -> list[float]:
    """One process, for sample, k, class, cost: fit on the sampled rows + test; per k the mean x100
    at the cost with the best sample-mean test mAP."""
    x_train, x_test = reference_normalise(train_x), reference_normalise(test_x)
    sample_ids = sorted({s for s, _ in samples})
    per_sample_k = {}
    for s in sample_ids:
        for k in ks:
            targets = samples[(s, k)]
            ap = np.zeros((len(costs), train_y.shape[1]))
            for c in range(train_y.shape[1]):
                rows = np.where(targets[:, c] != -1)[0]
                y = targets[rows, c].copy()
                y[y == 0] = -1
                keep = test_y[:, c] != -1
                for j, cost in enumerate(costs):
                    scores = reference_svm(cost, seed).fit(x_train[rows], y).decision_function(x_test)
                    ap[j, c] = reference_ap(scores[keep], test_y[keep, c])
            per_sample_k[(s, k)] = np.array([np.mean(ap[j]) for j in range(len(costs))])
    means = []
    for k in ks:
        mean_by_cost = np.stack([per_sample_k[(s, k)] for s in sample_ids]).mean(axis=0)
        means.append(100.0 * float(mean_by_cost[int(np.argmax(mean_by_cost))]))
    return means


def timed(fn, *args, blas_threads: int | None = None):
    start = time.perf_counter()
    with warnings.catch_warnings(), threadpool_limits(limits=blas_threads, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        result = fn(*args)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    costs = voc_svm.DEFAULT_COSTS if args.costs == "all" else tuple(float(c) for c in args.costs.split(","))
    ks = tuple(int(k) for k in args.ks.split(","))
    if not 1 <= args.classes <= 20:
        sys.exit("--classes must be in 1..20")
    (train_x, train_y), (test_x, test_y) = synthetic_voc(
        args.train_rows, args.test_rows, args.dims, args.classes, args.seed
    )
    print(f"data: train {train_x.shape} test {test_x.shape} float32, {args.classes} classes, "
          f"{int((train_y == -1).sum())}/{int((test_y == -1).sum())} difficult train/test labels")
    print(f"costs ({len(costs)}): {', '.join(f'{c:g}' for c in costs)}")
    print(f"cores available: {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}, "
          f"our workers: {args.workers or 'all'}, random_state {args.seed} on both sides, "
          f"reference BLAS threads: {args.reference_blas_threads or 'library default'}, "
          f"load average {os.getloadavg()[0]:.1f}")

    if not args.skip_full:
        n_tasks = args.classes * len(costs)
        print(f"\nfull SVM: reference {n_tasks} x (3 CV + 1 refit) = {4 * n_tasks} fits; "
              f"ours {3 * n_tasks} CV + {args.classes} refits")
        cfg = voc_svm.SVMConfig(costs=costs, seed=args.seed, workers=args.workers)
        ours, ours_s = timed(voc_svm.train_and_test_svm, train_x, train_y, test_x, test_y, cfg, False)
        ref_map, ref_s = timed(
            reference_full, train_x, train_y, test_x, test_y, costs, args.seed, blas_threads=args.reference_blas_threads
        )
        print(f"  ours      {ours_s:8.1f} s  mAP {ours['mAP']:.6f}  ({ours['convergence_warnings']} not converged)")
        print(f"  reference {ref_s:8.1f} s  mAP {ref_map:.6f}")
        print(f"  speed-up {ref_s / ours_s:.2f}x   mAP difference {ours['mAP'] - ref_map:+.3e}")

    if not args.skip_low_shot:
        lcfg = voc_svm.LowShotConfig(ks=ks, samples=args.samples, costs=costs, seed=args.seed, workers=args.workers)
        samples = voc_svm.low_shot_samples(train_y, ks, args.samples, args.seed)
        fits = args.samples * len(ks) * args.classes * len(costs)
        print(f"\nlow-shot: ks {ks}, {args.samples} samples: {fits} fits on each side")
        ours, ours_s = timed(voc_svm.run_low_shot, train_x, train_y, test_x, test_y, lcfg, False)
        ref_means, ref_s = timed(
            reference_low_shot, train_x, train_y, test_x, test_y, samples, ks, costs, args.seed,
            blas_threads=args.reference_blas_threads,
        )
        our_means = [row["mean"] for row in ours["per_k"]]
        print(f"  ours      {ours_s:8.1f} s  mean mAP per k {' '.join(f'{m:.4f}' for m in our_means)}")
        print(f"  reference {ref_s:8.1f} s  mean mAP per k {' '.join(f'{m:.4f}' for m in ref_means)}")
        diff = max(abs(a - b) for a, b in zip(our_means, ref_means, strict=True))
        print(f"  speed-up {ref_s / ours_s:.2f}x   max |mAP difference| {diff:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
