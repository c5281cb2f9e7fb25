"""VOC07 linear-SVM protocols on precomputed features: full (3-fold CV picks the cost) and low-shot.

Follows shared/spec/protocols.md §1.4-§1.7 and the step-by-step equations of §7. The input is
feature arrays, one row per image in sorted image-id order (as `datasets.voc.classification_labels`
returns the labels: 1 present, 0 absent, -1 difficult/ignore).

Why it is faster than the reference while giving the same numbers:
- the features are converted to float64 and row-normalised once, then shared with the workers
  through a memory-mapped .npy instead of being pickled into every task (spec §1.4, fair#35);
- fits run in a process pool, one (class, cost) task at a time, every LinearSVC with a fixed
  `random_state`, so results do not depend on the worker count or on scheduling (§1.6.3);
- only the CV-chosen cost of each class is refitted on all rows. The reference refits all 19 and
  tests one; the fits it throws away cannot change the result;
- one BLAS thread per worker, and sklearn's per-call finiteness scan of the test matrix is
  skipped (the features were checked once).

sklearn, threadpoolctl and tqdm are imported where the fits run, so the declarations below (and
`densecl-bench eval voc07_svm --help`) need none of them.
"""

from __future__ import annotations

import difflib
import hashlib
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from baselines.backbone_names import layer_list
from baselines.config import option
from baselines.infra import UserError, atomic_numpy_save, get_logger, load_numpy_file, to_jsonable
from protocols.datasets.voc import VOC_CLASSES
from protocols.registry import Protocol, Reading, synthetic_voc
from protocols.result import ProtocolResult

if TYPE_CHECKING:
    from sklearn.svm import LinearSVC
    from tqdm import tqdm

# §1.4: `parse_cost_list("1.0,10.0,100.0")` = [1, 10, 100] + [0.5**n for n in 4..19].
DEFAULT_COSTS: tuple[float, ...] = (1.0, 10.0, 100.0, *(0.5**n for n in range(4, 20)))
LOW_SHOT_KS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 96)  # §1.7, MODE="full"
NORM_EPS = 1e-5  # x / (||x|| + 1e-5), svm_helper.normalize_features (§1.4)
CLASS_WEIGHT = {1: 2, -1: 1}
NEGATIVES_PER_POSITIVE = 19  # §1.7: k positives and 19k negatives per class
CLASS_NAMES: tuple[str, ...] = tuple(sorted(VOC_CLASSES))  # label columns are in sorted class order (§1.2)
LOW_SHOT_COST_SELECTION = (
    "test set (oracle): argmax over costs of the sample-mean test mAP, as the reference (spec §1.7)"
)
_SAMPLE_NAME = re.compile(r"^sample(\d+)_k(\d+)$")
SOLVERS = ("liblinear", "batched")
LOG = get_logger("voc_svm")


class SVMInputError(UserError, ValueError):
    """Inputs the SVM protocol cannot run on; the message is one line that says which and why."""


@dataclass
class SVMConfig:
    costs: tuple[float, ...] = DEFAULT_COSTS
    folds: int = 3
    max_iter: int = 2000
    tol: float = 1e-4
    seed: int = 0  # LinearSVC random_state; the reference leaves it unset (§1.6.3)
    workers: int | None = None  # None: every core this process may use
    solver: str = "liblinear"  # or "batched" (protocols.svm_solver, issue 11)
    device: str = "cpu"  # where the batched solver runs


@dataclass
class LowShotConfig:
    ks: tuple[int, ...] = LOW_SHOT_KS
    samples: int = 5  # sample ids 1..samples, as FAIR's file names
    costs: tuple[float, ...] = DEFAULT_COSTS
    seed: int = 0  # seeds the sampler and LinearSVC's random_state
    sample_dir: str | None = None  # FAIR-format `*_sample{s}_k{k}.npy` files instead of sampling
    negatives_per_positive: int = NEGATIVES_PER_POSITIVE
    max_iter: int = 2000
    tol: float = 1e-4
    workers: int | None = None
    solver: str = "liblinear"
    device: str = "cpu"


# ----------------------------------------------------------------------------------------------
# AP


def interpolated_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """All-point interpolated AP of the reference's test step (§1.5), not sklearn's and not 11-point.

    `labels > 0` are positives, everything else negative; filter difficult rows before calling.
    Ties are ordered as the reference orders them, `np.argsort(scores)[::-1]` (numpy's default
    unstable sort, reversed), so tied scores are not averaged. With no positive the recall is
    0/0 and the AP is undefined: this returns NaN (the reference divides by zero to NaN too).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise SVMInputError(f"AP needs one label per score, got {scores.size} scores and {labels.size} labels")
    if not np.isfinite(scores).all():
        raise SVMInputError("AP got non-finite scores")
    is_positive = labels[np.argsort(scores)[::-1]] > 0
    positives = int(is_positive.sum())
    if positives == 0:
        return float("nan")
    tp = np.cumsum(is_positive, dtype=np.float64)
    fp = np.cumsum(~is_positive, dtype=np.float64)
    recall = np.concatenate(([0.0], tp / positives, [1.0]))
    precision = np.concatenate(([0.0], tp / (tp + fp), [0.0]))
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # precision envelope, right to left
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def cv_average_precision(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """sklearn's `average_precision_score(labels, scores)`, the CV score of §1.4, without its per-call checks.

    The batched solver scores ~1,100 CV fits per layer, where sklearn's input validation costs ten
    times the arithmetic. This repeats sklearn 1.9's steps operation by operation (descending
    mergesort, tied scores grouped into one threshold, float64 cumulative sums, the reversed step
    integral clipped at 0), so the value is bit-identical (tests/test_voc_svm.py compares them).
    Returns None when `labels` has no +1: sklearn warns and defines that case, so let it.
    """
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(scores, kind="mergesort")[::-1]
    ranked = scores[order]
    hits = (np.asarray(labels)[order] == 1).astype(np.float64)
    thresholds = np.concatenate([np.flatnonzero(np.diff(ranked)), [hits.size - 1]])
    tps = np.cumsum(hits)[thresholds]
    if tps[-1] == 0:
        return None
    fps = 1 + thresholds.astype(np.float64) - tps
    precision = np.concatenate([np.flip(tps / (tps + fps)), [1.0]])
    recall = np.concatenate([np.flip(tps / tps[-1]), [0.0]])
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


# ----------------------------------------------------------------------------------------------
# Input checks and feature preparation


def _check_labels(labels: np.ndarray, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise SVMInputError(f"{what} must be an N x classes matrix, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise SVMInputError(f"{what} must be integers 1/0/-1, got dtype {labels.dtype}")
    if not np.isin(labels, (-1, 0, 1)).all():
        raise SVMInputError(f"{what} may only hold 1 (present), 0 (absent) and -1 (difficult)")
    return labels.astype(np.int32, copy=False)


def _check_features(features: np.ndarray, labels: np.ndarray, what: str) -> None:
    if getattr(features, "ndim", None) != 2:
        raise SVMInputError(f"{what} features must be an N x D matrix, got shape {np.shape(features)}")
    if features.shape[0] != labels.shape[0]:
        raise SVMInputError(
            f"{what} features have {features.shape[0]} rows but {what} labels {labels.shape[0]}; "
            "rows must align with the sorted image ids"
        )


def _check_inputs(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    train_y, test_y = _check_labels(train_y, "train labels"), _check_labels(test_y, "test labels")
    _check_features(train_x, train_y, "train")
    _check_features(test_x, test_y, "test")
    if train_y.shape[1] != test_y.shape[1]:
        raise SVMInputError(f"train labels have {train_y.shape[1]} classes but test labels {test_y.shape[1]}")
    if train_x.shape[1] != test_x.shape[1]:
        raise SVMInputError(f"train features have {train_x.shape[1]} dims but test features {test_x.shape[1]}")
    return train_y, test_y


def _class_names(n_classes: int, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return list(CLASS_NAMES) if n_classes == len(CLASS_NAMES) else [f"class{c}" for c in range(n_classes)]
    if len(names) != n_classes:
        raise SVMInputError(f"got {len(names)} class names for {n_classes} label columns")
    return list(names)


def _require_test_positives(test_y: np.ndarray, names: Sequence[str]) -> None:
    """Without a non-difficult positive the test AP is undefined (NaN), so fail before training."""
    for c, name in enumerate(names):
        if not (test_y[:, c] == 1).any():
            raise SVMInputError(f"class {name!r} has no positive test rows, so its AP is undefined")


def _check_costs(costs: Iterable[float]) -> tuple[float, ...]:
    costs = tuple(float(c) for c in costs)
    if not costs or any(not np.isfinite(c) or c <= 0 for c in costs):
        raise SVMInputError(f"costs must be a non-empty list of positive numbers, got {costs}")
    return costs


def check_solver(solver: str) -> str:
    """The solver name, or a one-line SVMInputError (with a suggestion) for a typo."""
    if solver not in SOLVERS:
        close = difflib.get_close_matches(str(solver), SOLVERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SVMInputError(f"unknown SVM solver {solver!r}{hint}; choose from {', '.join(SOLVERS)}")
    return solver


def _check_seed(seed: int) -> int:
    if int(seed) != seed or seed < 0:
        raise SVMInputError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def normalise_features(features: np.ndarray, out: np.ndarray | None = None, chunk_rows: int = 1024) -> np.ndarray:
    """float64 rows divided by (L2 norm + 1e-5), exactly the reference's formula (§1.4, §7.1).

    Works in row chunks so a float32 memmap never needs a full float64 temporary; each row's norm
    is the same computation whatever the chunking, so the result equals the one-shot formula.
    """
    out = np.empty(features.shape, dtype=np.float64) if out is None else out
    for start in range(0, features.shape[0], chunk_rows):
        rows = np.asarray(features[start:start + chunk_rows], dtype=np.float64)
        norms = np.linalg.norm(rows, axis=1)
        out[start:start + chunk_rows] = rows / (norms + NORM_EPS)[:, np.newaxis]
    if not np.isfinite(out).all():
        raise SVMInputError("features contain NaN or infinity")
    return out


def _available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _resolve_workers(workers: int | None, tasks: int) -> int:
    if workers is not None and workers < 1:
        raise SVMInputError(f"workers must be >= 1 or None, got {workers}")
    return max(1, min(workers or _available_cores(), tasks))


# ----------------------------------------------------------------------------------------------
# Worker side: state shared by every task of one run, and the tasks themselves


_STATE: dict[str, Any] = {}


def _worker_init(array_paths: dict[str, str], settings: dict[str, Any]) -> None:
    from threadpoolctl import threadpool_limits

    # One BLAS thread per worker: the workers already fill the cores (and results stay identical).
    _STATE["blas_limit"] = threadpool_limits(limits=1, user_api="blas")
    _STATE.update({name: np.load(path, mmap_mode="r") for name, path in array_paths.items()})
    _STATE.update(settings)


def _svm(cost: float) -> LinearSVC:
    """The reference's classifier (§1.4), with a fixed random_state so every fit is reproducible."""
    from sklearn.svm import LinearSVC

    return LinearSVC(
        C=cost, class_weight=CLASS_WEIGHT, penalty="l2", loss="squared_hinge", dual=True,
        tol=_STATE["tol"], max_iter=_STATE["max_iter"], intercept_scaling=1.0, random_state=_STATE["seed"],
    )


@dataclass
class _WarningTally:
    """liblinear often stops at max_iter (§1.6.3): count those warnings instead of printing each."""

    convergence: int = 0
    other: set[str] = field(default_factory=set)

    def record(self, caught: Iterable[warnings.WarningMessage]) -> None:
        from sklearn.exceptions import ConvergenceWarning

        for w in caught:
            if issubclass(w.category, ConvergenceWarning):
                self.convergence += 1
            else:
                self.other.add(f"{w.category.__name__}: {w.message}")

    def merge(self, other: _WarningTally) -> None:
        self.convergence += other.convergence
        self.other |= other.other


def _counting_warnings(task: Callable[..., Any], *args: Any) -> tuple[Any, _WarningTally]:
    """Run one task. normalise_features already checked the features are finite, so sklearn's own
    check (a full pass over the test matrix on every decision_function) is skipped; values are unchanged."""
    import sklearn

    tally = _WarningTally()
    with warnings.catch_warnings(record=True) as caught, sklearn.config_context(assume_finite=True):
        warnings.simplefilter("always")
        result = task(*args)
    tally.record(caught)
    return result, tally


def _test_ap(model: LinearSVC, c: int) -> float:
    """Score every test row, then drop the difficult ones (§1.5) and take the interpolated AP."""
    scores = model.decision_function(_STATE["test_x"])
    keep = _STATE["test_y"][:, c] != -1
    return interpolated_ap(scores[keep], _STATE["test_y"][keep, c])


def _cross_validate(c: int, cost: float) -> float:
    """§7.2: mean over unshuffled StratifiedKFold folds of sklearn's AP of the decision values.

    The same folds, fits and score as `cross_val_score(clf, X, y, cv=3, scoring="average_precision")`.
    """
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import StratifiedKFold

    x, y = _STATE["train_x"], _STATE["train_signed"][:, c]
    fold_ap = []
    for fit_rows, val_rows in StratifiedKFold(n_splits=_STATE["folds"]).split(np.zeros(len(y)), y):
        model = _svm(cost).fit(x[fit_rows], y[fit_rows])
        fold_ap.append(average_precision_score(y[val_rows], model.decision_function(x[val_rows])))
    return float(np.mean(np.asarray(fold_ap)))


def _refit_and_test(c: int, cost: float) -> float:
    """§7.4: refit on all rows (difficult ones as negatives, §1.4) and test."""
    model = _svm(cost).fit(_STATE["train_x"], _STATE["train_signed"][:, c])
    return _test_ap(model, c)


def _low_shot_fits(c: int, rows: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """§7 low-shot 2: one fit per cost on the sampled rows (ascending, as the reference's np.where)."""
    x, y = _STATE["train_x"][rows], np.where(positive, 1, -1)
    return np.array([_test_ap(_svm(cost).fit(x, y), c) for cost in _STATE["costs"]])


def _cv_task(c: int, j: int) -> tuple[float, _WarningTally]:
    return _counting_warnings(_cross_validate, c, _STATE["costs"][j])


def _refit_task(c: int, j: int) -> tuple[float, _WarningTally]:
    return _counting_warnings(_refit_and_test, c, _STATE["costs"][j])


def _low_shot_task(c: int, rows: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, _WarningTally]:
    return _counting_warnings(_low_shot_fits, c, rows, positive)


# ----------------------------------------------------------------------------------------------
# Parent side: where the features live, and a small scheduler


class _InlineExecutor(Executor):
    """Runs each task at submit time in this process: workers=1 needs no pool and no files."""

    def __init__(self) -> None:
        from threadpoolctl import threadpool_limits

        self._blas = threadpool_limits(limits=1, user_api="blas")  # same BLAS setting as a worker

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))  # an error raises here, inside _drive
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._blas.restore_original_limits()


def _process_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds; elsewhere spawn works because the data travel as files.
    return multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")


def _scratch_dir(needed_bytes: int) -> str:
    """RAM-backed /dev/shm when it has room, else the usual temp folder (its page cache is shared too)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * needed_bytes:
        return str(shm)
    return tempfile.gettempdir()


class _Workspace(AbstractContextManager):
    """The normalised features for one run: in RAM for one worker, else memory-mapped .npy files.

    The reference pickles the whole feature matrix into each of its 380 tasks (§1.4); here each
    worker maps the files once and tasks carry only indices.
    """

    def __init__(self, workers: int, shapes: Iterable[tuple[int, ...]]) -> None:
        self.workers = workers
        self.arrays: dict[str, np.ndarray] = {}
        self.paths: dict[str, str] = {}
        self.folder: str | None = None
        if workers > 1:
            needed = sum(8 * int(np.prod(shape)) for shape in shapes)
            self.folder = tempfile.mkdtemp(prefix="voc_svm_", dir=_scratch_dir(needed))

    def __exit__(self, *exc: object) -> None:
        _STATE.clear()
        self.arrays.clear()
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def add_features(self, name: str, features: np.ndarray) -> None:
        if self.folder:
            path = os.path.join(self.folder, f"{name}.npy")
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=features.shape)
            normalise_features(features, out=out)
            out.flush()
            self.paths[name] = path
        else:
            out = normalise_features(features)
        self.arrays[name] = out

    def executor(self, settings: dict[str, Any]) -> Executor:
        if self.workers == 1:
            _STATE.clear()
            _STATE.update(self.arrays)
            _STATE.update(settings)
            return _InlineExecutor()
        return ProcessPoolExecutor(
            self.workers, mp_context=_process_context(), initializer=_worker_init, initargs=(self.paths, settings)
        )


@dataclass(frozen=True)
class _Task:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    fits: int  # for the progress bar
    key: tuple[int, ...]  # where the result goes


def _drive(
    executor: Executor,
    tasks: Iterable[_Task],
    on_done: Callable[[_Task, Any], list[_Task]],
    bar: tqdm,
    in_flight: int,
    tally: _WarningTally,
) -> None:
    """Keep `in_flight` tasks running; follow-up tasks from `on_done` jump the queue.

    Every task returns (value, warning tally); the tallies are summed into `tally`.

    A bounded queue keeps errors and Ctrl-C prompt; follow-ups first means a class's refit starts
    as soon as its CV is in, not after every other class's CV.
    """
    queue = deque(tasks)
    running: dict[Future, _Task] = {}
    try:
        while queue or running:
            while queue and len(running) < in_flight:
                task = queue.popleft()
                running[executor.submit(task.fn, *task.args)] = task
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                task = running.pop(future)
                value, task_tally = future.result()
                tally.merge(task_tally)
                queue.extendleft(reversed(on_done(task, value)))
                if tally.convergence:
                    bar.set_postfix_str(f"{tally.convergence} not converged", refresh=False)
                bar.update(task.fits)
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise


def _progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="fit", disable=not enabled, dynamic_ncols=True, leave=False)


def _report_other_warnings(tally: _WarningTally) -> list[str]:
    messages = sorted(tally.other)
    for message in messages:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return messages


# ----------------------------------------------------------------------------------------------
# Full SVM


def _require_trainable(train_y: np.ndarray, names: Sequence[str]) -> None:
    for c, name in enumerate(names):
        positives = int((train_y[:, c] == 1).sum())
        if positives == 0 or positives == len(train_y):
            kind = "positive" if positives == 0 else "negative"
            raise SVMInputError(f"class {name!r} has no {kind} training rows, so no SVM can be trained for it")


def train_and_test_svm(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    cfg: SVMConfig | None = None,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
    desc: str = "VOC07 SVM",
) -> dict[str, Any]:
    """The full VOC07 SVM protocol (§7): per class, pick the cost by CV, refit, test; mAP x100.

    Difficult (-1) train rows are negatives, difficult test rows are dropped (§1.4, §1.5). The
    result is the same for any worker count. liblinear's ConvergenceWarnings are counted, not
    shown; other warnings (e.g. sklearn's about a class with fewer positives than folds, which
    the reference also just warns about) are shown once each and listed in the result.
    """
    cfg = cfg or SVMConfig()
    if check_solver(cfg.solver) == "batched":
        from protocols import svm_solver

        return svm_solver.train_and_test_svm_batched(train_x, train_y, test_x, test_y, cfg, progress, class_names,
                                                     desc, device=cfg.device)
    started = time.perf_counter()
    train_y, test_y = _check_inputs(train_x, train_y, test_x, test_y)
    names = _class_names(train_y.shape[1], class_names)
    costs = _check_costs(cfg.costs)
    seed = _check_seed(cfg.seed)
    if cfg.folds < 2:
        raise SVMInputError(f"folds must be >= 2, got {cfg.folds}")
    _require_trainable(train_y, names)
    _require_test_positives(test_y, names)
    n_classes, n_costs = train_y.shape[1], len(costs)
    workers = _resolve_workers(cfg.workers, n_classes * n_costs)

    cv_ap = np.full((n_classes, n_costs), np.nan)
    test_ap = np.full(n_classes, np.nan)
    chosen = np.full(n_classes, -1)
    cv_left = np.full(n_classes, n_costs)
    tally = _WarningTally()

    def on_done(task: _Task, value: float) -> list[_Task]:
        c, j = task.key
        if task.fn is _refit_task:
            test_ap[c] = value
            return []
        cv_ap[c, j] = value
        cv_left[c] -= 1
        if cv_left[c]:
            return []
        chosen[c] = int(np.argmax(cv_ap[c]))  # §7.3: first maximum wins, costs in list order
        return [_Task(_refit_task, (c, int(chosen[c])), 1, (c, int(chosen[c])))]

    cv_tasks = [_Task(_cv_task, (c, j), cfg.folds, (c, j)) for c in range(n_classes) for j in range(n_costs)]
    total_fits = len(cv_tasks) * cfg.folds + n_classes
    settings = {
        # §1.4: 0 -> -1 and the difficult -1 stays -1, so difficult rows train as negatives.
        "train_signed": np.where(train_y == 1, 1, -1).astype(np.int32),
        "test_y": test_y, "costs": costs, "folds": cfg.folds,
        "max_iter": cfg.max_iter, "tol": cfg.tol, "seed": seed,
    }
    with _Workspace(workers, (train_x.shape, test_x.shape)) as space:
        space.add_features("train_x", train_x)
        space.add_features("test_x", test_x)
        prepared = time.perf_counter()
        with space.executor(settings) as executor, _progress_bar(total_fits, desc, progress) as bar:
            _drive(executor, cv_tasks, on_done, bar, 2 * workers, tally)
    finished = time.perf_counter()

    return {
        **full_protocol_scores(test_ap, cv_ap, chosen, names, costs),
        "fits": total_fits,
        "convergence_warnings": tally.convergence,
        "other_warnings": _report_other_warnings(tally),
        "workers": workers,
        "config": asdict(cfg),
        "timings": {"prepare_s": prepared - started, "fit_s": finished - prepared, "total_s": finished - started},
    }


def full_protocol_scores(test_ap: np.ndarray, cv_ap: np.ndarray, chosen: Sequence[int], names: Sequence[str],
                         costs: Sequence[float]) -> dict[str, Any]:
    """The scores every full-protocol result carries, whichever solver fitted it (liblinear or batched)."""
    return {
        "protocol": "voc07_svm",
        "mAP": 100.0 * float(np.mean(test_ap)),
        "ap": {name: 100.0 * float(test_ap[c]) for c, name in enumerate(names)},
        "chosen_cost": {name: costs[chosen[c]] for c, name in enumerate(names)},
        "chosen_cost_index": [int(j) for j in chosen],
        "cv_ap": cv_ap.tolist(),  # classes x costs, sklearn AP (fraction), the selection criterion
        "classes": list(names),
        "costs": list(costs),
    }


# ----------------------------------------------------------------------------------------------
# Low-shot samples


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(int(k) != k or k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise SVMInputError(f"ks must be distinct positive integers, got {ks}")
    return tuple(int(k) for k in ks)


def _check_sample_count(samples: int) -> range:
    if int(samples) != samples or samples < 1:
        raise SVMInputError(f"samples must be a positive integer, got {samples!r}")
    return range(1, int(samples) + 1)


def low_shot_samples(
    train_y: np.ndarray,
    ks: Iterable[int] = LOW_SHOT_KS,
    samples: int = 5,
    seed: int = 0,
    negatives_per_positive: int = NEGATIVES_PER_POSITIVE,
    class_names: Sequence[str] | None = None,
) -> dict[tuple[int, int], np.ndarray]:
    """Seeded low-shot label matrices in FAIR's format, keyed by (sample id 1.., k).

    §1.7: per class independently, k rows labelled 1 become 1 and 19k rows labelled 0 become 0,
    drawn without replacement; every other entry, and every difficult row, is -1. The reference's
    sampler is unseeded; here each (seed, sample, k, class) has its own numpy Generator, so a
    matrix does not depend on which other samples, ks or classes were asked for. A class with
    fewer than k positives (or 19k negatives) is an error rather than a silent cap, because a
    capped sample would no longer be the k-shot task its row in a table claims.
    """
    train_y = _check_labels(train_y, "train labels")
    names = _class_names(train_y.shape[1], class_names)
    seed = _check_seed(seed)
    result = {}
    for s in _check_sample_count(samples):
        for k in _check_ks(ks):
            matrix = np.full(train_y.shape, -1, dtype=np.int32)
            for c, name in enumerate(names):
                rng = np.random.default_rng([seed, s, k, c])
                for value, count in ((1, k), (0, negatives_per_positive * k)):
                    pool = np.flatnonzero(train_y[:, c] == value)
                    if len(pool) < count:
                        kind = "positive" if value == 1 else "negative"
                        raise SVMInputError(
                            f"class {name!r} has {len(pool)} {kind} training rows, fewer than the {count} "
                            f"that k={k} needs (sampling is without replacement)"
                        )
                    matrix[rng.choice(pool, size=count, replace=False), c] = value
            result[(s, k)] = matrix
    return result


def validate_low_shot_sample(
    sample: np.ndarray,
    train_y: np.ndarray,
    k: int,
    negatives_per_positive: int = NEGATIVES_PER_POSITIVE,
    what: str = "sample",
) -> np.ndarray:
    """A FAIR-format k-shot matrix: the train shape, 1/0/-1, k ones and 19k zeros per column,
    ones only on positives and zeros only on negatives (catches a row order that is not sorted ids)."""
    sample = np.asarray(sample)
    if sample.shape != train_y.shape:
        raise SVMInputError(f"{what}: shape {sample.shape}, expected the train labels' {train_y.shape}")
    if not np.issubdtype(sample.dtype, np.integer) or not np.isin(sample, (-1, 0, 1)).all():
        raise SVMInputError(f"{what}: must be integers 1/0/-1, got dtype {sample.dtype}")
    ones, zeros = (sample == 1).sum(axis=0), (sample == 0).sum(axis=0)
    for c in range(sample.shape[1]):
        if ones[c] != k or zeros[c] != negatives_per_positive * k:
            raise SVMInputError(
                f"{what}: column {c} has {ones[c]} ones and {zeros[c]} zeros, "
                f"expected {k} and {negatives_per_positive * k}"
            )
    if (train_y[sample == 1] != 1).any() or (train_y[sample == 0] != 0).any():
        raise SVMInputError(f"{what}: picks rows whose train label disagrees (rows not in sorted image-id order?)")
    return sample.astype(np.int32, copy=False)


def _parse_sample_name(path: Path) -> tuple[int, int] | None:
    """(s, k) from `<anything>_sample{s}_k{k}.npy`; like the reference, only the last two `_` tokens count."""
    tokens = path.stem.split("_")
    match = _SAMPLE_NAME.match("_".join(tokens[-2:])) if len(tokens) >= 2 else None
    return (int(match.group(1)), int(match.group(2))) if match else None


def read_fair_samples(
    sample_dir: str | os.PathLike,
    train_y: np.ndarray,
    ks: Iterable[int] = LOW_SHOT_KS,
    samples: int = 5,
    negatives_per_positive: int = NEGATIVES_PER_POSITIVE,
) -> dict[tuple[int, int], np.ndarray]:
    """Read and validate FAIR's `train_targets_sample{s}_k{k}.npy` files (spec §1.7, §6 fair#36)."""
    folder = Path(sample_dir)
    if not folder.is_dir():
        raise SVMInputError(f"low-shot sample folder not found: {folder}")
    train_y = _check_labels(train_y, "train labels")
    found: dict[tuple[int, int], list[Path]] = {}
    for path in sorted(folder.glob("*.npy")):
        key = _parse_sample_name(path)
        if key is not None:
            found.setdefault(key, []).append(path)
    result = {}
    for s in _check_sample_count(samples):
        for k in _check_ks(ks):
            paths = found.get((s, k), [])
            if len(paths) != 1:
                problem = "no file" if not paths else f"{len(paths)} files ({', '.join(p.name for p in paths)})"
                raise SVMInputError(f"{folder}: {problem} named *_sample{s}_k{k}.npy; expected exactly one")
            sample = load_numpy_file(paths[0], "low-shot sample file",
                                     "rewrite it as an integer .npy array of -1/0/1 targets")
            result[(s, k)] = validate_low_shot_sample(sample, train_y, k, negatives_per_positive, what=str(paths[0]))
    return result


def write_fair_samples(samples: Mapping[tuple[int, int], np.ndarray], out_dir: str | os.PathLike) -> list[Path]:
    """Save matrices as `train_targets_sample{s}_k{k}.npy` (int32), so a run can be repeated exactly."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for (s, k), matrix in sorted(samples.items()):
        path = folder / f"train_targets_sample{s}_k{k}.npy"
        atomic_numpy_save(path, np.asarray(matrix, dtype=np.int32))
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# Low-shot SVM


def _aggregate_low_shot(test_map: np.ndarray, ks: Sequence[int], costs: Sequence[float]) -> list[dict[str, Any]]:
    """§7 low-shot 4: per k, the cost maximising the sample-mean test mAP, and its stats x100."""
    rows = []
    for ki, k in enumerate(ks):
        by_sample = test_map[:, ki, :]  # samples x costs
        mean = by_sample.mean(axis=0)
        j = int(np.argmax(mean))
        rows.append({
            "k": k, "cost": costs[j], "cost_index": j,
            "mean": 100.0 * float(mean[j]),
            "min": 100.0 * float(by_sample.min(axis=0)[j]),
            "max": 100.0 * float(by_sample.max(axis=0)[j]),
            "std": 100.0 * float(by_sample.std(axis=0)[j]),  # population std, ddof=0 (§1.7)
        })
    return rows


def run_low_shot(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    cfg: LowShotConfig | None = None,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
    desc: str = "VOC07 low-shot SVM",
) -> dict[str, Any]:
    """The low-shot protocol (§1.7, §7): no CV; the cost per k is chosen on the test set, as the reference."""
    cfg = cfg or LowShotConfig()
    if check_solver(cfg.solver) == "batched":
        from protocols import svm_solver

        return svm_solver.run_low_shot_batched(train_x, train_y, test_x, test_y, cfg, progress, class_names, desc,
                                               device=cfg.device)
    started = time.perf_counter()
    train_y, test_y = _check_inputs(train_x, train_y, test_x, test_y)
    names = _class_names(train_y.shape[1], class_names)
    costs, ks, seed = _check_costs(cfg.costs), _check_ks(cfg.ks), _check_seed(cfg.seed)
    sample_ids = list(_check_sample_count(cfg.samples))
    _require_test_positives(test_y, names)
    if cfg.sample_dir:
        samples = read_fair_samples(cfg.sample_dir, train_y, ks, cfg.samples, cfg.negatives_per_positive)
        source = f"FAIR-format files in {cfg.sample_dir}"
    else:
        samples = low_shot_samples(train_y, ks, cfg.samples, seed, cfg.negatives_per_positive, names)
        source = f"generated: numpy default_rng([seed={seed}, sample, k, class])"

    n_classes, n_costs = train_y.shape[1], len(costs)
    test_ap = np.full((len(sample_ids), len(ks), n_costs, n_classes), np.nan)
    tally = _WarningTally()
    tasks = []
    for si, s in enumerate(sample_ids):
        for ki, k in enumerate(ks):
            sample = samples[(s, k)]
            for c in range(n_classes):
                rows = np.flatnonzero(sample[:, c] != -1)  # §1.7: train only on the sampled rows
                tasks.append(_Task(_low_shot_task, (c, rows, sample[rows, c] == 1), n_costs, (si, ki, c)))

    def on_done(task: _Task, ap_per_cost: np.ndarray) -> list[_Task]:
        si, ki, c = task.key
        test_ap[si, ki, :, c] = ap_per_cost
        return []

    workers = _resolve_workers(cfg.workers, len(tasks))
    settings = {"test_y": test_y, "costs": costs, "max_iter": cfg.max_iter, "tol": cfg.tol, "seed": seed}
    with _Workspace(workers, (train_x.shape, test_x.shape)) as space:
        space.add_features("train_x", train_x)
        space.add_features("test_x", test_x)
        prepared = time.perf_counter()
        with space.executor(settings) as executor, _progress_bar(len(tasks) * n_costs, desc, progress) as bar:
            _drive(executor, tasks, on_done, bar, 2 * workers, tally)
    finished = time.perf_counter()

    test_map = test_ap.mean(axis=-1)  # §7 low-shot 3: mean over classes -> samples x ks x costs
    config = asdict(cfg)
    return {
        "protocol": "voc07_lowshot",
        "per_k": _aggregate_low_shot(test_map, ks, costs),
        "test_map": test_map.tolist(),  # fractions, samples x ks x costs
        "cost_selection": LOW_SHOT_COST_SELECTION,
        "samples_source": source,
        "sample_ids": sample_ids,
        "ks": list(ks),
        "classes": names,
        "costs": list(costs),
        "fits": len(tasks) * n_costs,
        "convergence_warnings": tally.convergence,
        "other_warnings": _report_other_warnings(tally),
        "workers": workers,
        "config": config,
        "timings": {"prepare_s": prepared - started, "fit_s": finished - prepared, "total_s": finished - started},
    }


# ----------------------------------------------------------------------------------------------
# Several layers


def evaluate_layers(
    features: Mapping[str, tuple[np.ndarray, np.ndarray]],
    train_y: np.ndarray,
    test_y: np.ndarray,
    cfg: SVMConfig | None = None,
    low_shot: LowShotConfig | None = None,
    run_full: bool = True,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the protocols on each layer's (train, test) features and name the best layer.

    The best layer is the one with the highest full-SVM mAP (MMSelfSup's "Best Layer", §1.5);
    with `run_full=False` it is the one with the highest low-shot mean averaged over ks.
    """
    if not features:
        raise SVMInputError("no feature layers given")
    if not run_full and low_shot is None:
        raise SVMInputError("nothing to run: run_full=False and no low-shot config")
    full: dict[str, dict[str, Any]] = {}
    few: dict[str, dict[str, Any]] = {}
    for layer, (train_x, test_x) in features.items():
        if run_full:
            full[layer] = train_and_test_svm(
                train_x, train_y, test_x, test_y, cfg, progress, class_names, desc=f"SVM {layer}"
            )
        if low_shot is not None:
            few[layer] = run_low_shot(
                train_x, train_y, test_x, test_y, low_shot, progress, class_names, desc=f"low-shot {layer}"
            )
    if run_full:
        score = {layer: result["mAP"] for layer, result in full.items()}
        best_by = "full SVM mAP"
    else:
        score = {layer: float(np.mean([row["mean"] for row in result["per_k"]])) for layer, result in few.items()}
        best_by = "low-shot mean mAP averaged over ks"
    best = max(score, key=score.get)  # first layer wins a tie, in the order given
    return {
        "layers": list(features),
        "svm": full,
        "low_shot": few,
        "best_layer": best,
        "best_score": score[best],
        "best_by": best_by,
    }


# ----------------------------------------------------------------------------------------------
# The protocols on a checkpoint: features from images, then the SVMs


@dataclass
class VOCFeatures:
    """Where the features come from (spec §1.1-1.3); shared by the full and the low-shot protocol."""

    layers: tuple[str, ...] = option(("feature5",), "backbone stages to evaluate: comma list of feature1..feature5, "
                                     "or 'all' (the DenseCL scripts' FEAT_LIST is feature5)", parse=layer_list)
    train_split: str = option("trainval", "ImageSets/Main list the SVMs train on")
    test_split: str = option("test", "ImageSets/Main list they are tested on")
    batch_size: int = option(32, "images per feature-extraction batch")
    workers: int = option(2, "data-loading processes for feature extraction")
    device: str = option("auto", "auto, cpu, cuda or cuda:N (feature extraction and the batched solver)")
    cache_dir: str | None = option(None, "feature cache folder (default: $DENSECL_BENCH_CACHE/features)")
    solver: str = option("liblinear", "liblinear: one sklearn LinearSVC per fit (the reference); batched: the exact "
                         "batched solver (protocols.svm_solver)", choices=SOLVERS)
    svm_workers: int | None = option(None, "parallel liblinear fits (default: every core)")


@dataclass
class VOC07SVMConfig(VOCFeatures):
    costs: tuple[float, ...] = option(DEFAULT_COSTS, "SVM costs C (the reference's 19: 1,10,100 and 0.5^4..0.5^19)")
    folds: int = option(3, "cross-validation folds that pick each class's cost")
    max_iter: int = option(2000, "liblinear iteration cap")
    tol: float = option(1e-4, "liblinear tolerance")
    seed: int = option(0, "LinearSVC random_state (the reference leaves it unset, spec §1.6.3)")

    def svm(self) -> SVMConfig:
        return SVMConfig(costs=self.costs, folds=self.folds, max_iter=self.max_iter, tol=self.tol, seed=self.seed,
                         workers=self.svm_workers, solver=self.solver, device=self.device)


@dataclass
class VOC07LowShotConfig(VOCFeatures):
    costs: tuple[float, ...] = option(DEFAULT_COSTS, "SVM costs C (the reference's 19)")
    ks: tuple[int, ...] = option(LOW_SHOT_KS, "positives per class")
    samples: int = option(5, "independent samples per k")
    sample_dir: str | None = option(None, "folder of FAIR-format train_targets_sample{s}_k{k}.npy files instead of "
                                    "seeded sampling")
    negatives_per_positive: int = option(NEGATIVES_PER_POSITIVE, "negatives drawn per positive (spec §1.7: 19)")
    max_iter: int = option(2000, "liblinear iteration cap")
    tol: float = option(1e-4, "liblinear tolerance")
    seed: int = option(0, "seeds the sampler and LinearSVC's random_state")

    def low_shot(self) -> LowShotConfig:
        return LowShotConfig(ks=self.ks, samples=self.samples, costs=self.costs, seed=self.seed,
                             sample_dir=self.sample_dir, negatives_per_positive=self.negatives_per_positive,
                             max_iter=self.max_iter, tol=self.tol, workers=self.svm_workers, solver=self.solver,
                             device=self.device)


def feasible_ks(train_y: np.ndarray, ks: Iterable[int],
                negatives_per_positive: int = NEGATIVES_PER_POSITIVE) -> tuple[int, ...]:
    """The ks for which every class has k positives and 19k negatives (small datasets cannot fit k=96)."""
    positives = int((train_y == 1).sum(axis=0).min())
    negatives = int((train_y == 0).sum(axis=0).min())
    return tuple(k for k in ks if k <= positives and negatives_per_positive * k <= negatives)


def voc07_features(subject, root: str | os.PathLike, cfg: VOCFeatures, progress: bool = True):
    """(layer -> (train, test) arrays, train labels, test labels, dataset summary), cached on disk."""
    from protocols.common import resolve_device
    from protocols.datasets import voc
    from protocols.datasets.classification import LabeledImages
    from protocols.datasets.synthetic import is_synthetic_root
    from protocols.features import cached_features, svm_transform

    root = Path(root)
    features: dict[str, list[np.ndarray]] = {layer: [] for layer in cfg.layers}
    labels, summary = [], {"root": str(root.resolve()), "splits": {}}
    digest = hashlib.sha256()
    for split in (cfg.train_split, cfg.test_split):
        ids, y = voc.classification_labels(root, split)  # rows in sorted id order, aligned explicitly (§1.2)
        paths = [root / "JPEGImages" / f"{image_id}.jpg" for image_id in ids]
        missing = next((p for p in paths if not p.is_file()), None)
        if missing:
            raise SVMInputError(f"image {missing} listed in split {split!r} does not exist")
        for image_id, path in zip(ids, paths, strict=True):
            digest.update(f"{split}/{image_id}\0{path.stat().st_size}\n".encode())
        digest.update(y.tobytes())
        dataset = LabeledImages([(str(p), 0) for p in paths], svm_transform())
        key = {"checkpoint": subject.cache_id, "dataset": digest.hexdigest(), "transform": "resize256-squash224"}
        arrays, _ = cached_features(
            subject.backbone, dataset, split, cfg.layers, "svm", key, y, ids, cache_dir=cfg.cache_dir,
            batch_size=cfg.batch_size, workers=cfg.workers, device=resolve_device(cfg.device), progress=progress,
        )
        for layer in cfg.layers:
            features[layer].append(arrays[layer])
        labels.append(y)
        summary["splits"][split] = len(ids)
    summary["name"] = "synthetic-voc" if is_synthetic_root(root) else root.name
    summary["content_hash"] = digest.hexdigest()
    pairs = {layer: (pair[0], pair[1]) for layer, pair in features.items()}
    return pairs, labels[0], labels[1], summary


def _feasible_low_shot(cfg: VOC07LowShotConfig, train_y: np.ndarray, root: Path) -> LowShotConfig:
    """The low-shot config with the ks the training split cannot supply dropped, with a warning."""
    low_shot = cfg.low_shot()
    if low_shot.sample_dir is not None:
        return low_shot
    usable = feasible_ks(train_y, low_shot.ks, low_shot.negatives_per_positive)
    if not usable:
        raise SVMInputError(f"no low-shot k fits {cfg.train_split} of {root}: some class has too few "
                            "positives or negatives even for k=1")
    if usable != tuple(low_shot.ks):
        dropped = sorted(set(low_shot.ks) - set(usable))
        LOG.warning("k=%s need more images than %s has per class; running k=%s", dropped, cfg.train_split,
                    list(usable))
        low_shot = LowShotConfig(**{**asdict(low_shot), "ks": usable})
    return low_shot


def _run(name: str, subject, root, cfg: VOCFeatures, progress: bool) -> ProtocolResult | None:
    """Features, then the full SVM (voc07_svm) or the low-shot SVMs (voc07_lowshot), per layer.

    Under torchrun the ranks share the feature extraction and rank 0 alone fits the SVMs (CPU work that
    more processes would only slow down); the other ranks return None once the features are written.
    """
    from baselines.distributed import Distributed
    from protocols.common import resolve_device

    started = time.perf_counter()
    root = Path(root)
    features, train_y, test_y, dataset = voc07_features(subject, root, cfg, progress)
    extracted = time.perf_counter()
    if not Distributed(str(resolve_device(cfg.device))).is_main:
        return None
    full = name == "voc07_svm"
    svm = cfg.svm() if full else None
    low_shot = None if full else _feasible_low_shot(cfg, train_y, root)
    results = evaluate_layers(features, train_y, test_y, svm, low_shot, run_full=full, progress=progress,
                              class_names=CLASS_NAMES)
    metrics: dict[str, float] = {}
    for layer, result in results["svm"].items():
        metrics[f"{layer}/mAP"] = result["mAP"]
    for layer, result in results["low_shot"].items():
        for row in result["per_k"]:
            for stat in ("mean", "min", "max", "std"):
                metrics[f"{layer}/k={row['k']}/{stat}"] = row[stat]
    best = results["best_layer"]
    if full:
        metrics["best/mAP"] = results["svm"][best]["mAP"]
    for row in results["low_shot"].get(best, {}).get("per_k", []):
        metrics[f"best/k={row['k']}/mean"] = row["mean"]
    config = {**asdict(cfg), "svm": asdict(svm) if svm else None, "low_shot": asdict(low_shot) if low_shot else None}
    return ProtocolResult(
        protocol=name, metrics=metrics, config=config, dataset=dataset, checkpoint=subject.info,
        timings={"features_s": extracted - started, "svm_s": time.perf_counter() - extracted,
                 "total_s": time.perf_counter() - started},
        details={"best_layer": best, "best_by": results["best_by"],
                 "svm": {layer: to_jsonable(r) for layer, r in results["svm"].items()},
                 "low_shot": {layer: to_jsonable(r) for layer, r in results["low_shot"].items()}},
    )


def run_svm(subject, data, cfg: VOC07SVMConfig, *, work_dir=None, progress: bool = True) -> ProtocolResult | None:
    """The full VOC07 SVM protocol on `subject` (a protocols.common.BackboneUnderTest); work_dir is unused."""
    return _run("voc07_svm", subject, data, cfg, progress)


def run_lowshot(subject, data, cfg: VOC07LowShotConfig, *, work_dir=None,
                progress: bool = True) -> ProtocolResult | None:
    """The VOC07 low-shot SVM protocol on `subject`; work_dir is unused."""
    return _run("voc07_lowshot", subject, data, cfg, progress)


def svm_measurements(result: ProtocolResult) -> list[Reading]:
    """`<layer>/mAP` -> (voc07_svm, layer, mAP); the best-layer summary repeats a layer and is left out."""
    readings = []
    for name, value in result.metrics.items():
        layer, _, metric = name.partition("/")
        if value is not None and layer != "best" and metric == "mAP":
            readings.append(Reading("voc07_svm", "mAP", value, layer=layer))
    return readings


def lowshot_measurements(result: ProtocolResult) -> list[Reading]:
    """`<layer>/k=<k>/mean` -> (voc07_lowshot, layer, k, mAP): the claims are about the mean over samples (§1.7)."""
    readings = []
    for name, value in result.metrics.items():
        parts = name.split("/")
        if value is not None and len(parts) == 3 and parts[0] != "best" and parts[1].startswith("k=") \
                and parts[2] == "mean":
            readings.append(Reading("voc07_lowshot", "mAP", value, layer=parts[0], k=int(parts[1][2:])))
    return readings


VOC07_SVM = Protocol(
    name="voc07_svm", summary="VOC07 linear SVM per layer, cost by 3-fold CV (spec §1.4-1.5)",
    description="VOC07 SVM: features (short side 256, squashed to 224x224, per-layer AvgPool) of trainval and test, "
    "one LinearSVC per (class, cost), cost chosen by 3-fold CV, test AP (all-point interpolated, difficult dropped), "
    "mAP x100 per layer and the best layer. Without --data: the synthetic VOC-layout dataset.",
    metrics=('mAP',), config=VOC07SVMConfig, body=run_svm, measurements=svm_measurements, default_data=synthetic_voc,
    aliases=("voc-svm",), torchrun=True)
VOC07_LOWSHOT = Protocol(
    name="voc07_lowshot", summary="VOC07 low-shot SVM, k positives per class (spec §1.7)",
    description="VOC07 low-shot SVM: for each k, 5 samples of k positives and 19k negatives per class (seeded, or "
    "FAIR's sample files via --sample-dir), no CV; the cost is chosen on the test set as the reference does. Reports "
    "mean/min/max/std over samples. ks the data cannot supply are dropped with a warning.",
    metrics=('mAP',), config=VOC07LowShotConfig, body=run_lowshot, measurements=lowshot_measurements,
    default_data=synthetic_voc, aliases=("voc-lowshot",), torchrun=True)
