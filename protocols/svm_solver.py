"""An exact batched solver for the VOC07 linear-SVM protocols (issue 11), a twin of the liblinear path.

Every fit of the protocols (spec protocols.md §1.4, §1.7, §7) is the same strongly convex problem
sklearn's `LinearSVC(C, class_weight={1: 2, -1: 1}, loss='squared_hinge', dual=True,
intercept_scaling=1)` solves. liblinear appends a constant feature 1, so the bias is regularised:

    minimise over w~ = (w, b):  0.5 ||w~||^2 + sum_i C_i max(0, 1 - y_i w~.x~_i)^2,   x~_i = (x_i, 1),

with C_i = C * 2 for y_i = +1 and C for y_i = -1. The minimiser is unique, so any solver that reaches
it reproduces liblinear wherever liblinear converges; where liblinear stops at max_iter its answer is
an approximation of this optimum and the two can differ (the reference itself is not reproducible
there, §1.6.3).

Why it is fast. All the problems of one protocol share the rows X, so the solver works in the dual /
kernel space of the n <= 5011 training rows, whatever the feature size: K~ = X X^T + 1 is computed
once, and every (class, fold, cost) problem is a vector over the rows (w~ = X~^T beta). Rows a
problem does not use (the validation fold, the rows a low-shot sample leaves out) get weight 0,
and their decision values come out of the same products. Two stages:

- Stage A (costs where every used row violates its margin, y o < 1, as at all small costs):
  the optimum is the solution of one linear system (A + sigma_j I) u = b whose matrix differs
  between costs only by the shift sigma_j = 1/(2 C_j). One Lanczos run per (class, fold) solves all
  such costs at once (shifted systems share their Krylov space), with full reorthogonalisation.
- Stage B (the rest): the generalised ("finite") Newton method of the squared hinge. Each Newton
  point is the weighted ridge solution on the current active rows, (K_II + S_I^-1) beta_I = y_I.
  A cost model picks how: Cholesky (padded batches for small sets; for big ones the factor is kept
  and the next Newton steps, whose active sets change by a few rows, are solved exactly by bordering
  it) or Jacobi-scaled CG (well-conditioned systems, loosely while the active set still moves,
  and systems too big to factor). An exact line search on the piecewise-quadratic objective follows.
  A level Stage A reached starts at once from Stage A's all-active solution there; the others start
  from the nearest lower solved cost once every lower level of their family is solved. Every round
  of Newton steps batches all problems that can run, whatever their cost.

Work and parallelism on CPU (issue 11, measured at VOC07 size on 2 cores). A shared K~ of rank
D + 1 < n / 2 is applied through X (4 n D flops a column instead of 2 n^2). Independent groups of
problems (the classes of the full protocol, the low-shot k's) run side by side in Python threads
with one torch thread each: one solve keeps only ~1.35 of 2 cores busy, its small operations and
control flow being serial. glibc is told to keep freed memory while the solver runs
(`_keep_freed_memory`): otherwise every new tensor of a few MB is page-faulted in again. The full
protocol's CV problems of fold f touch only the rows some class fits on in that fold (about 2/3 of
them), so their products are restricted to those rows (`_Gram` row sets): about 10% faster at 9216-d
(K~ products, 2 |rows|^2 flops), and no faster at 2048-d, where the narrower per-fold products run
at a lower rate than the one wide product and eat the flops saved.

Everything is float64 torch, the same code on CPU and CUDA (GPU runs were not possible while this
was written: no GPU was available; there is no fp32 path). On CPU, torch's OpenMP threads spin
while they wait; on cores shared with other work that makes small tensor operations orders of
magnitude slower, so set OMP_WAIT_POLICY=PASSIVE before torch is imported (the benchmark does).

Certificate. The objective is 1-strongly convex in w~, so ||w~ - w~*|| <= ||grad f(w~)||: the
solver stops when ||grad f|| <= tol * max(1, ||w~||), which bounds the relative error of the weights
(and the decision values of unit-norm rows) by tol. ||grad f||^2 = gamma' K gamma costs a Gram
product; the bound tr(K_SS) ||gamma||^2 (S the support of gamma) is free and certifies most optima,
where gamma is rounding noise, so the product is only computed where the bound does not suffice.
The liblinear-style dual projected-gradient violation is reported too (liblinear stops when its
spread is below its tol, 1e-4 by default).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold
from tqdm.auto import tqdm

from baselines.infra import get_logger
from protocols import voc_svm
from protocols.voc_svm import SVMInputError

LOG = get_logger("svm")

RESTRICTED_MIN_WIDTH = 8  # narrower slices of a row-restricted group use the whole Gram matrix (_Gram)
DEFAULT_TOL = 1e-7  # certified relative error of w~ (and of unit-norm rows' decision values)
POSITIVE_WEIGHT = float(voc_svm.CLASS_WEIGHT[1]) / float(voc_svm.CLASS_WEIGHT[-1])
TIE_GAP = 1e-4  # CV scores closer than this make the chosen cost a tie (issue 11)


# ----------------------------------------------------------------------------------------------
# Names, devices and input checks


def resolve_solver_device(name: str | torch.device | None = "cpu") -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' -> a torch.device; asking for CUDA without it is a one-line error."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "cpu").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SVMInputError(f"unknown solver device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SVMInputError(f"solver device {name!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SVMInputError(f"solver device {name!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    elif device.type != "cpu":
        raise SVMInputError(f"unsupported solver device {name!r}; use cpu, cuda, cuda:N or auto")
    return device


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
_HEAP_DEPTH = [0]


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (mallopt and malloc_trim exist there), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def _keep_freed_memory() -> Iterator[None]:
    """While the solver runs, glibc keeps freed memory in its heap instead of unmapping it.

    glibc serves big blocks with fresh mmaps and unmaps them at free, so every new tensor of a few
    MB is page-faulted in again, page by page. The solver allocates such tensors at every step:
    measured 2.8 M minor faults, 9 of 64 CPU-s, in the VOC07 low-shot protocol at 2048-d (issue 11).
    Afterwards the thresholds are set to what glibc's own adaptation reaches after big frees
    (mmap above 32 MiB, trim above 64 MiB) and the heap is trimmed. A no-op without glibc.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    _HEAP_DEPTH[0] += 1
    if _HEAP_DEPTH[0] == 1:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        _HEAP_DEPTH[0] -= 1
        if _HEAP_DEPTH[0] == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
            libc.malloc_trim(0)


def _check_tol(tol: float) -> float:
    tol = float(tol)
    if not math.isfinite(tol) or not 0 < tol < 1:
        raise SVMInputError(f"solver tol must be in (0, 1), got {tol}")
    return tol


# ----------------------------------------------------------------------------------------------
# The engine: problems in families on shared Gram matrices


@dataclass
class SolverSettings:
    """Knobs of the engine; the defaults were chosen by measurement on 2 CPU cores (issue 11). They
    change how fast the optimum is found, not which optimum (except `tol`, the certified accuracy)."""

    tol: float = DEFAULT_TOL
    max_newton: int = 60  # Newton iterations per cost level
    lanczos_steps: int = 60  # Stage A Krylov dimension cap
    cholesky_rows: int = 2200  # Newton systems up to this many active rows are factored, bigger ones use CG
    batched_rows: int = 320  # factored ones up to this size are done in padded batches, without reuse
    settled: float = 0.1  # a Newton step that moved at most this share of the active rows is factored
    cg_kappa: float = 100.0  # Stage A keeps costs past the first invalid one only where 2 C lambda_2 is below this
    matvec_rate: float = 3e10  # flop/s of one Gram product column (batched), for the factor-or-CG choice
    factor_rate: float = 1.5e10  # flop/s of a Cholesky factorisation
    cg_steps: int = 400  # CG iterations per Newton system before falling back to Cholesky
    chunk_bytes: int = 2 << 30  # working-set cap per batch of problems (k = 64 low-shot blocks fit in one)


@dataclass
class Diagnostics:
    """Per-problem convergence facts, flattened over the problems the caller asked for."""

    grad_norm: np.ndarray  # ||grad f(w~)||, bounds ||w~ - w~*||
    w_norm: np.ndarray  # ||w~||
    dual_violation: np.ndarray  # liblinear-style max |projected gradient| of the dual
    newton_iters: np.ndarray  # 0 for a Stage-A (all rows active, one linear system) solution
    stage: np.ndarray  # 1 = Stage A, 2 = Stage B (Newton)
    converged: np.ndarray  # grad_norm <= tol * max(1, w_norm), or exact active set within float rounding

    def summary(self) -> dict[str, Any]:
        rel = self.grad_norm / np.maximum(1.0, self.w_norm)
        return {
            "problems": int(rel.size),
            "max_rel_grad": float(rel.max(initial=0.0)),
            "max_dual_violation": float(self.dual_violation.max(initial=0.0)),
            "max_newton_iters": int(self.newton_iters.max(initial=0)),
            "mean_newton_iters": float(self.newton_iters.mean()) if self.newton_iters.size else 0.0,
            "stage_a_share": float((self.stage == 1).mean()) if self.stage.size else 0.0,
            "not_converged": int((~self.converged).sum()),
        }


def _concat_diagnostics(parts: Sequence[Diagnostics]) -> Diagnostics:
    return Diagnostics(*(np.concatenate([getattr(p, f) for p in parts]) for f in Diagnostics.__dataclass_fields__))


class _Gram:
    """K~ of the rows each group of problems uses: one matrix for every group (`shared`) or one per group.

    Families (problems that differ only in their cost) are kept sorted by group so a product with
    per-group matrices is a loop over contiguous slices. With `row_sets` the groups share the one
    matrix but each uses only some rows (the CV folds of the full protocol): a group's products are
    restricted to its rows, where its problems live, and their values off those rows are unspecified
    (every solver step masks them by the row weights; `off_rows` computes them once at the end).
    """

    def __init__(self, blocks: torch.Tensor, features: torch.Tensor | None = None,
                 row_sets: Sequence[torch.Tensor | None] | None = None) -> None:
        self.blocks = blocks  # (G, n, n), symmetric
        self.n = blocks.shape[-1]
        # A shared K~ = X X^T + 1 of rank <= D + 1 < n / 2 is applied through X: 4 n D flops per
        # vector instead of 2 n^2 (the factorisations still gather from `blocks`).
        self.features = features if blocks.shape[0] == 1 and features is not None \
            and 2 * (features.shape[1] + 1) < self.n else None
        self.row_sets = list(row_sets) if row_sets is not None else None
        if self.row_sets is not None and blocks.shape[0] != 1:
            raise ValueError("row sets restrict one shared Gram matrix")
        groups = len(self.row_sets) if self.row_sets is not None else blocks.shape[0]
        self.block_of = torch.zeros(groups, dtype=torch.long, device=blocks.device) if self.row_sets is not None \
            else torch.arange(groups, device=blocks.device)  # group -> its index in `blocks`
        self.diag = blocks.diagonal(dim1=-2, dim2=-1)[self.block_of]  # (groups, n): K_ii, for the gradient bound
        # Each restricted group's own operand, contiguous: its rows of X, or its block of K~.
        self.restricted = [None if rows is None else self._restrict(rows) for rows in (self.row_sets or [])]
        # flops of one product column, for the factor-or-CG cost model
        self.product_flops = 4.0 * self.n * (self.features.shape[1] + 1) if self.features is not None \
            else 2.0 * self.n ** 2

    def _restrict(self, rows: torch.Tensor) -> torch.Tensor:
        if self.features is not None:
            return self.features.index_select(0, rows)
        return self._submatrix(rows, rows)

    def _submatrix(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """K~[rows, cols] of the shared matrix, contiguous."""
        return self.blocks[0].index_select(0, rows).index_select(1, cols)

    def _apply(self, v: torch.Tensor, operand: torch.Tensor | None = None) -> torch.Tensor:
        """v times K~ through the whole operand (None) or a group's restricted one."""
        if self.features is not None:
            x = self.features if operand is None else operand
            return (v @ x) @ x.T + v.sum(-1, keepdim=True)
        return v @ (self.blocks[0] if operand is None else operand)

    def matvec(self, v: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """Rows of `v` (P, n) times the Gram matrix of their group."""
        if self.row_sets is not None:
            return self._restricted_matvec(v, group)
        if self.blocks.shape[0] == 1:
            return self._apply(v)
        out = torch.empty_like(v)
        bounds = _group_bounds(group)
        for g, start, stop in bounds:
            out[start:stop] = v[start:stop] @ self.blocks[g]
        return out

    def _restricted_matvec(self, v: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """Each group's slice through its own rows; slices narrower than RESTRICTED_MIN_WIDTH go together
        through the whole matrix instead: a product of a few vectors is memory-bound, and one pass over
        all of X is cheaper than one over two thirds of it per group (issue 11, CG's tail)."""
        out = torch.zeros_like(v)
        whole = []
        for g, start, stop in _group_bounds(group):
            rows = self.row_sets[g]
            if rows is None or stop - start < RESTRICTED_MIN_WIDTH:
                whole.append(torch.arange(start, stop, device=v.device))
                continue
            part = v[start:stop].index_select(1, rows)
            out[start:stop].index_copy_(1, rows, self._apply(part, self.restricted[g]))
        if whole:
            idx = torch.cat(whole)
            out[idx] = self._apply(v[idx])
        return out

    def off_rows(self, beta: torch.Tensor, out: torch.Tensor, group: torch.Tensor) -> None:
        """Complete `out` = K~ beta (F, J, n) off each restricted group's rows, in place: there the
        products left it unspecified. beta is zero off the rows, so K~[rest, rows] is all it needs."""
        if self.row_sets is None:
            return
        for g, start, stop in _group_bounds(group):
            rows = self.row_sets[g]
            if rows is None:
                continue
            off = torch.ones(self.n, dtype=torch.bool, device=beta.device)
            off[rows] = False
            rest = torch.nonzero(off).flatten()
            out[start:stop, :, rest] = beta[start:stop].index_select(-1, rows) @ self._submatrix(rows, rest)


def _group_bounds(group: torch.Tensor) -> list[tuple[int, int, int]]:
    """(group, start, stop) of each run of equal values in a sorted group vector."""
    if group.numel() == 0:
        return []
    values, counts = torch.unique_consecutive(group.cpu(), return_counts=True)
    stops = torch.cumsum(counts, 0).tolist()
    starts = [0, *stops[:-1]]
    return list(zip(values.tolist(), starts, stops, strict=True))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


def _objective(beta: torch.Tensor, out: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """0.5 ||w~||^2 + 0.5 sum s max(0, 1 - y o)^2, with ||w~||^2 = beta . K beta = beta . o."""
    margin = torch.clamp(1.0 - y * out, min=0.0)
    return 0.5 * _rowdot(beta, out) + 0.5 * _rowdot(s, margin * margin)


def _line_search(beta, out, dbeta, dout, y, s) -> torch.Tensor:
    """Exact minimiser over t >= 0 of the convex piecewise-quadratic f(beta + t dbeta), per row.

    f'(t) = a0 + a1 t - sum_i s_i c_i max(0, m_i - t c_i) (m = 1 - y o, c = y do) is piecewise
    linear and nondecreasing; its pieces change where a row enters or leaves the active set, at
    t_i = m_i / c_i. Sorting those events gives every piece, and the root is on the first piece
    whose right end has f' >= 0.
    """
    a0, a1 = _rowdot(dbeta, out), _rowdot(dbeta, dout)
    m, c = 1.0 - y * out, y * dout
    used = (s > 0) & (c != 0)
    on = used & (m > 0)
    sc = s * c
    base_a = a0 - _rowdot(torch.where(on, sc, 0.0), m)
    base_b = a1 + _rowdot(torch.where(on, sc, 0.0), c)
    turn_off = on & (c > 0)  # leaves the active set at m / c > 0
    turn_on = used & (m <= 0) & (c < 0)  # joins it at m / c >= 0
    event = turn_off | turn_on
    tau = torch.where(event, m / torch.where(c != 0, c, 1.0), torch.inf)
    sign = 2.0 * turn_off.to(s.dtype) - 1.0
    da = torch.where(event, sign * sc * m, 0.0)
    db = torch.where(event, -sign * sc * c, 0.0)
    tau, order = torch.sort(tau, dim=-1)
    da, db = torch.gather(da, 1, order), torch.gather(db, 1, order)
    zero = torch.zeros_like(a0)[:, None]
    ca = torch.cat([zero, torch.cumsum(da, -1)], -1) + base_a[:, None]  # piece k: f' = ca_k + cb_k t
    cb = torch.cat([zero, torch.cumsum(db, -1)], -1) + base_b[:, None]
    right = torch.cat([tau, torch.full_like(zero, torch.inf)], -1)  # right end of piece k
    left = torch.cat([zero, tau], -1)
    at_right = torch.where(torch.isfinite(right), ca + cb * torch.where(torch.isfinite(right), right, 0.0), torch.inf)
    k = torch.argmax((at_right >= 0).to(torch.int8), dim=-1)  # first piece whose right end has f' >= 0
    a_k, b_k = ca.gather(1, k[:, None])[:, 0], cb.gather(1, k[:, None])[:, 0]
    lo, hi = left.gather(1, k[:, None])[:, 0], right.gather(1, k[:, None])[:, 0]
    t = torch.where(b_k > 0, -a_k / torch.where(b_k > 0, b_k, 1.0), lo)
    return torch.clamp(torch.minimum(torch.maximum(t, lo), hi), min=0.0)


@dataclass
class _Families:
    """F families on a _Gram: each is one (rows, labels) problem to be solved at several costs."""

    group: torch.Tensor  # (F,) long, sorted
    y: torch.Tensor  # (F, n) +-1 (anything where d == 0)
    d: torch.Tensor  # (F, n) class weight x row weight; 0 = the row is not in the problem
    need: torch.Tensor  # (F, J) bool: which (family, cost) solutions are wanted

    def take(self, part: slice) -> _Families:
        return _Families(self.group[part], self.y[part], self.d[part], self.need[part])


@dataclass
class _Solution:
    beta: torch.Tensor  # (F, J, n)
    out: torch.Tensor  # (F, J, n) decision values on every row of the Gram, used or not
    grad_norm: torch.Tensor  # (F, J)
    w_norm: torch.Tensor
    dual_violation: torch.Tensor
    newton: torch.Tensor  # (F, J) long
    stage: torch.Tensor  # (F, J) long, 0 = not solved
    converged: torch.Tensor  # (F, J) bool
    lmax: torch.Tensor  # (F,) largest eigenvalue of D^1/2 K D^1/2 (Lanczos estimate)
    lambda2: torch.Tensor  # (F,) its second largest (the top of the bulk under the bias/mean outlier)
    tried: torch.Tensor  # (F, J) bool: Stage A reached this cost (its solution is valid or a warm start)


def _dual_violation(beta, out, y, s) -> torch.Tensor:
    """liblinear's stopping measure for the dual of problem p: max_i |PG_i| with alpha_i = y_i beta_i.

    G_i = y_i o_i - 1 + alpha_i / s_i (s_i = 2 C_i); PG_i = G_i if alpha_i > 0 else min(G_i, 0).
    """
    used = s > 0
    alpha = y * beta
    grad = y * out - 1.0 + torch.where(used, alpha / torch.where(used, s, 1.0), 0.0)
    pg = torch.where(alpha > 0, grad, torch.clamp(grad, max=0.0))
    return torch.where(used, pg.abs(), 0.0).amax(-1)


def _stage_a(gram: _Gram, fam: _Families, costs: torch.Tensor, st: SolverSettings, sol: _Solution) -> None:
    """All-rows-active solutions for every cost from one Lanczos run per family (shifted systems).

    With every used row active, the optimum solves (A + sigma I) u = b, A = D^1/2 K D^1/2, b = D^1/2 y,
    beta = D^1/2 u, sigma = 1/(2C) (D = 2C-free row weights). It is the optimum iff every used row
    still has y o < 1 there; otherwise Stage B starts from it.
    """
    fcount, n = fam.y.shape
    dtype, device = fam.y.dtype, fam.y.device
    root = torch.sqrt(fam.d)
    b = root * fam.y
    bnorm = torch.linalg.vector_norm(b, dim=-1)
    sigma = 0.5 / costs  # (J,)
    steps = max(1, min(st.lanczos_steps, n))
    basis = torch.zeros(fcount, steps + 1, n, dtype=dtype, device=device)
    images = torch.zeros(fcount, steps, n, dtype=dtype, device=device)  # K D^1/2 v_k on every row
    alphas = torch.zeros(fcount, steps, dtype=dtype, device=device)
    betas = torch.zeros(fcount, steps + 1, dtype=dtype, device=device)
    basis[:, 0] = b / torch.clamp(bnorm, min=1e-300)[:, None]
    live = torch.ones(fcount, dtype=torch.bool, device=device)  # families still iterating
    arange_j = torch.arange(len(costs), device=device)
    top = torch.where(fam.need, arange_j[None, :], -1).amax(-1)
    wanted = arange_j[None, :] <= top[:, None]  # the whole path below a wanted cost: warm starts for Stage B
    done = torch.zeros_like(fam.need)
    checked = torch.zeros_like(fam.need)
    invalid = torch.zeros_like(fam.need)
    store = torch.zeros(fcount, len(costs), steps, dtype=dtype, device=device)  # Krylov coefficients per cost
    eye = torch.eye(steps, dtype=dtype, device=device)

    def shift_solutions(k: int, rows: torch.Tensor):
        """Coefficients (len(rows), J, k) of the k-step solutions and their residual sizes."""
        t = (torch.diag_embed(alphas[rows, :k]) + torch.diag_embed(betas[rows, 1:k], 1)
             + torch.diag_embed(betas[rows, 1:k], -1))
        mat = t[:, None] + sigma[None, :, None, None] * eye[:k, :k]
        rhs = torch.zeros(len(rows), len(costs), k, 1, dtype=dtype, device=device)
        rhs[:, :, 0, 0] = bnorm[rows, None]
        coef = torch.linalg.solve(mat, rhs)[..., 0]
        return coef, betas[rows, k, None] * coef[..., -1].abs()

    exhausted = torch.zeros(fcount, dtype=torch.bool, device=device)
    for k in range(steps):
        grow_idx = torch.nonzero(live & ~exhausted).flatten()
        if grow_idx.numel():
            grow = slice(None) if grow_idx.numel() == fcount else grow_idx  # views, not copies, when all grow
            v = basis[grow, k]
            z = gram.matvec(root[grow] * v, fam.group[grow])
            images[grow, k] = z
            w = root[grow] * z
            a = _rowdot(w, v)
            alphas[grow, k] = a
            w = w - a[:, None] * v
            if k > 0:
                w = w - betas[grow, k, None] * basis[grow, k - 1]
            prev = basis[grow, : k + 1]
            for _ in range(2):  # full reorthogonalisation, twice (the Gram spectra have big outliers)
                w = w - torch.bmm(torch.bmm(prev, w[:, :, None]).transpose(1, 2), prev)[:, 0]
            nb = torch.linalg.vector_norm(w, dim=-1)
            betas[grow, k + 1] = nb
            basis[grow, k + 1] = w / torch.clamp(nb, min=1e-300)[:, None]
        rows = torch.nonzero(live).flatten()
        if k < 1 or rows.numel() == 0:
            if rows.numel() == 0:
                break
            continue
        # The k-step solution u = V_k c has residual -beta_k c_k v_k, so with alpha_k = v_k' A v_k
        # known, ||grad f|| = 2C ||D^1/2 r||_K = 2C beta_k |c_k| sqrt(alpha_k) exactly.
        coef, res = shift_solutions(k, rows)
        a_k = torch.where(exhausted[rows], 0.0, alphas[rows, k])
        grad = 2 * costs[None, :] * res * torch.sqrt(torch.clamp(a_k, min=0.0))[:, None]
        t = (torch.diag_embed(alphas[rows, :k]) + torch.diag_embed(betas[rows, 1:k], 1)
             + torch.diag_embed(betas[rows, 1:k], -1))
        wnorm = torch.sqrt(torch.clamp(torch.einsum("fjk,fkl,fjl->fj", coef, t, coef), min=0.0))
        ok = (grad <= st.tol * torch.clamp(wnorm, min=1.0)) | exhausted[rows, None]
        fresh = ok & wanted[rows] & ~done[rows]
        if bool(fresh.any()):
            hit = fresh.any(-1)
            frows, fmask = rows[hit], fresh[hit]
            store[frows, :, :k] = torch.where(fmask[..., None], coef[hit], store[frows, :, :k])
            sol.grad_norm[frows] = torch.where(fmask, grad[hit], sol.grad_norm[frows])
            sol.w_norm[frows] = torch.where(fmask, wnorm[hit], sol.w_norm[frows])
            done[frows] |= fmask
        live[rows] = (wanted[rows] & ~done[rows]).any(-1) & ~exhausted[rows]
        exhausted |= live & (betas[:, k + 1] <= 1e-12 * torch.clamp(bnorm, min=1e-300))
        if k % 4 == 3 or not bool(live.any()) or k == steps - 1:
            # Validity: every used row must still violate its margin. The first invalid cost of a
            # family makes all larger costs Stage B's, so its Lanczos run can stop early.
            check = done & ~checked
            fams = torch.nonzero(check.any(-1)).flatten()
            for part in torch.split(fams, max(1, (256 << 20) // (8 * len(costs) * n))):
                out = torch.bmm(store[part, :, :k + 1], images[part, :k + 1])
                bad = ((fam.y[part, None] * out > 1.0) & (fam.d[part, None] > 0)).any(-1) & check[part]
                invalid[part] |= bad
                first_bad = torch.where(invalid[part], arange_j[None, :], len(costs)).amin(-1)
                # Past the first invalid cost only the wanted costs that are still well conditioned
                # are worth the Krylov steps (as warm starts for Stage B).
                kk = k + 1
                tri = (torch.diag_embed(alphas[part, :kk]) + torch.diag_embed(betas[part, 1:kk], 1)
                       + torch.diag_embed(betas[part, 1:kk], -1))
                ritz = torch.linalg.eigvalsh(tri)
                lam2 = ritz[:, -2] if kk > 1 else ritz[:, -1]
                cheap = 2 * costs[None, :] * lam2[:, None] <= st.cg_kappa
                wanted[part] &= ~(arange_j[None, :] > first_bad[:, None]) | (fam.need[part] & cheap)
            checked |= check
            live &= (wanted & ~done).any(-1)
    good = done & ~invalid
    for part in torch.split(torch.arange(fcount, device=device), max(1, (256 << 20) // (8 * len(costs) * n))):
        width = steps
        sol.beta[part] = torch.where(done[part, :, None],
                                     root[part, None] * torch.bmm(store[part], basis[part, :width]),
                                     sol.beta[part])
        sol.out[part] = torch.where(done[part, :, None], torch.bmm(store[part], images[part, :width]), sol.out[part])
    sol.stage[good] = 1
    sol.converged |= good
    sol.tried |= done
    # Largest Ritz value of the final tridiagonal matrix: the top eigenvalue of A, for CG targets.
    steps_done = int(torch.count_nonzero(alphas, dim=0).gt(0).sum())
    tri = torch.diag_embed(alphas[:, :steps_done]) + torch.diag_embed(betas[:, 1:steps_done], 1) \
        + torch.diag_embed(betas[:, 1:steps_done], -1)
    ritz = torch.linalg.eigvalsh(tri) if steps_done else torch.ones(fcount, 1, dtype=dtype, device=device)
    sol.lmax.copy_(ritz[:, -1])
    sol.lambda2.copy_(ritz[:, -2] if ritz.shape[1] > 1 else ritz[:, -1])
    # Families whose Krylov space ran out keep their unconverged costs for Stage B (from scratch).


def _cholesky_points(gram: _Gram, group, y, s, act) -> torch.Tensor:
    """Newton points beta_I = (K_II + S_I^-1)^-1 y_I by Cholesky, problems bucketed by active size."""
    p, n = y.shape
    result = torch.zeros_like(y)
    sizes = act.sum(-1)
    order = torch.argsort(sizes)
    sizes_sorted = sizes[order].tolist()
    start = 0
    while start < p:
        top = max(1, sizes_sorted[start])
        stop = start + 1
        limit = max(1, int((64 << 20) // (8 * top * top)))  # at most ~64 MB of padded matrices per call
        while stop < p and stop - start < limit and sizes_sorted[stop] <= max(1.15 * top, top + 16):
            stop += 1
        idx = order[start:stop]
        m = max(1, sizes_sorted[stop - 1])
        a_mask = act[idx]
        # Active row indices first, padded with index 0 (masked out below).
        keys = torch.where(a_mask, torch.arange(n, device=y.device)[None, :],
                           n + torch.arange(n, device=y.device)[None, :])
        cols = torch.sort(keys, dim=-1).values[:, :m]
        valid = cols < n
        cols = torch.where(valid, cols, 0)
        grp = group[idx]
        mats = gram.blocks[gram.block_of[grp][:, None, None], cols[:, :, None], cols[:, None, :]]
        pair = valid[:, :, None] & valid[:, None, :]
        mats = torch.where(pair, mats, 0.0)
        s_sel = torch.gather(s[idx], 1, cols)
        diag = torch.where(valid, 1.0 / torch.where(valid, s_sel, 1.0), 1.0)
        mats.diagonal(dim1=-2, dim2=-1).add_(diag)
        rhs = torch.where(valid, torch.gather(y[idx], 1, cols), 0.0)
        chol, info = torch.linalg.cholesky_ex(mats)
        if bool((info != 0).any()):  # cannot happen for s > 0 in exact arithmetic; be loud if it does
            raise FloatingPointError("Newton system not positive definite (non-finite features?)")
        x = torch.cholesky_solve(rhs[..., None], chol)[..., 0]
        x = torch.where(valid, x, 0.0)
        res = torch.zeros(len(idx), n, dtype=y.dtype, device=y.device)
        res.scatter_add_(1, cols, x)  # padded entries carry 0 and point at column 0
        result[idx] = torch.where(a_mask, res, 0.0)
        start = stop
    return result


class _FactorCache:
    """Exact Newton points for big active sets, reusing a Cholesky factor across Newton iterations.

    After the first Newton step of a cost the active set changes by a few rows per step. With the
    factor L0 of M0 = K_00 + S_0^-1 on an earlier set I0, the system on I' = (I0 - R) + A is solved
    exactly by bordering: the added rows A through a Schur complement of size |A|, the removed rows
    R through |R| Lagrange multipliers (rows of M_J^-1 restricted to R). That costs O(|I0|^2 (|A| + |R|))
    instead of O(|I'|^3 / 3) for a new factor; a new factor is made when the change gets large.
    """

    def __init__(self, gram: _Gram, refresh: float = 0.125) -> None:
        self.gram = gram
        self.refresh = refresh
        self.base: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.factorised_rows3 = 0.0  # sum of |I|^3 / 3 over new factors, for the log

    def _factor(self, key: int, kmat: torch.Tensor, rows: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        m = kmat[rows[:, None], rows[None, :]]
        m.diagonal().add_(1.0 / s[rows])
        chol, info = torch.linalg.cholesky_ex(m)
        if int(info):
            raise FloatingPointError("Newton system not positive definite (non-finite features?)")
        self.base[key] = (rows, chol)
        self.factorised_rows3 += len(rows) ** 3 / 3.0
        return chol

    def point(self, key: int, group: int, y: torch.Tensor, s: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """beta with beta_I = (K_II + S_I^-1)^-1 y_I on the active rows I, zero elsewhere."""
        kmat = self.gram.blocks[self.gram.block_of[group]]
        rows = torch.nonzero(act).flatten()
        beta = torch.zeros_like(y)
        if rows.numel() == 0:
            return beta
        old = self.base.get(key)
        if old is not None:
            base_rows, chol = old
            keep = act[base_rows]
            in_base = torch.zeros_like(act)
            in_base[base_rows] = True
            added = torch.nonzero(act & ~in_base).flatten()
            removed = base_rows[~keep]
            if len(added) + len(removed) <= self.refresh * len(base_rows):
                beta[:] = self._bordered(kmat, base_rows, chol, added, removed, y, s)
                return beta
        chol = self._factor(key, kmat, rows, s)
        beta[rows] = torch.cholesky_solve(y[rows, None], chol)[:, 0]
        return beta

    def _bordered(self, kmat, base_rows, chol, added, removed, y, s) -> torch.Tensor:
        n0 = len(base_rows)
        joint = torch.cat([base_rows, added])
        if len(added):
            cross = kmat[base_rows[:, None], added[None, :]]
            z = torch.linalg.solve_triangular(chol, cross, upper=False)
            corner = kmat[added[:, None], added[None, :]]
            corner.diagonal().add_(1.0 / s[added])
            schur = corner - z.T @ z
            schur_chol, info = torch.linalg.cholesky_ex(schur)
            if int(info):
                raise FloatingPointError("bordered Newton system not positive definite")

        def solve(rhs: torch.Tensor) -> torch.Tensor:  # M_J^-1 rhs, rhs (|J|, m)
            g0 = torch.linalg.solve_triangular(chol, rhs[:n0], upper=False)
            if not len(added):
                return torch.linalg.solve_triangular(chol.T, g0, upper=True)
            za = torch.cholesky_solve(rhs[n0:] - z.T @ g0, schur_chol)
            z0 = torch.linalg.solve_triangular(chol.T, g0 - z @ za, upper=True)
            return torch.cat([z0, za])

        rhs = y[joint].clone()
        if len(removed):
            at = torch.nonzero(torch.isin(base_rows, removed)).flatten()  # positions of R in J
            rhs[at] = 0.0
            unit = torch.zeros(len(joint), len(removed), dtype=y.dtype, device=y.device)
            unit[at, torch.arange(len(removed), device=y.device)] = 1.0
            both = solve(torch.cat([rhs[:, None], unit], 1))
            x, w = both[:, 0], both[:, 1:]
            lam = torch.linalg.solve(w[at], -x[at])
            x = x + w @ lam
            x[at] = 0.0
        else:
            x = solve(rhs[:, None])[:, 0]
        beta = torch.zeros_like(y)
        beta[joint] = x
        return beta


def _cg_points(gram: _Gram, group, y, s, d, cost, act, beta0, target, steps) -> tuple[torch.Tensor, torch.Tensor]:
    """Newton points by Jacobi-scaled CG on (D^1/2 K_II D^1/2 + sigma I) u = D^1/2 y_I, warm-started.

    A problem leaves the batch once it reaches its target, so the products are spent on the ones
    still iterating only. Returns (beta, converged flag per problem).
    """
    root = torch.sqrt(d) * act
    sigma = (0.5 / cost)[:, None]
    x = torch.where(act, beta0 / torch.where(act, root, 1.0), 0.0)
    r = root * y - (root * gram.matvec(root * x, group) + sigma * x * act)
    rr = _rowdot(r, r)
    # No gradient known yet (first Newton step): a loose solve, 1/5 of the initial residual.
    target = torch.where(torch.isfinite(target), target, 0.2 * torch.sqrt(rr))
    ok = torch.sqrt(rr) <= target
    live = torch.nonzero(~ok).flatten()
    xl, rl, pl, rrl = x[live], r[live], r[live].clone(), rr[live]
    rootl, sigmal, actl, groupl, targetl = root[live], sigma[live], act[live], group[live], target[live]
    for _ in range(steps):
        if live.numel() == 0:
            break
        q = rootl * gram.matvec(rootl * pl, groupl) + sigmal * pl * actl
        alpha = rrl / torch.clamp(_rowdot(pl, q), min=1e-300)
        xl = xl + alpha[:, None] * pl
        rl = rl - alpha[:, None] * q
        rr_new = _rowdot(rl, rl)
        pl = rl + (rr_new / torch.clamp(rrl, min=1e-300))[:, None] * pl
        rrl = rr_new
        reached = torch.sqrt(rr_new) <= targetl
        if bool(reached.any()):
            x[live[reached]] = xl[reached]
            ok[live[reached]] = True
            go = ~reached
            live, xl, rl, pl, rrl = live[go], xl[go], rl[go], pl[go], rrl[go]
            rootl, sigmal, actl, groupl, targetl = rootl[go], sigmal[go], actl[go], groupl[go], targetl[go]
    x[live] = xl
    return root * x, ok


@dataclass
class _NewtonRows:
    """The (family, level) problems Stage B is iterating on, one row each."""

    fam: torch.Tensor  # (P,) long
    level: torch.Tensor  # (P,) long
    beta: torch.Tensor  # (P, n)
    out: torch.Tensor  # (P, n)
    iters: torch.Tensor  # (P,) long: Newton points computed
    exact: torch.Tensor  # (P,) bool: the last point was factored and kept its active set, i.e. the optimum
    factored: torch.Tensor  # (P,) bool: the last point was factored (exact for its active set)
    last_act: torch.Tensor  # (P, n) bool: the active set the last point was computed on

    def take(self, keep: torch.Tensor) -> _NewtonRows:
        return _NewtonRows(*(getattr(self, name)[keep] for name in _NewtonRows.__dataclass_fields__))

    def join(self, other: _NewtonRows) -> _NewtonRows:
        return _NewtonRows(*(torch.cat([getattr(self, name), getattr(other, name)])
                             for name in _NewtonRows.__dataclass_fields__))


def _stage_b_levels(fam: _Families, sol: _Solution) -> torch.Tensor:
    """(F, J) bool: the cost levels Stage B solves, per family. Every wanted level Stage A did not
    settle; a level nobody asked for only as a warm start for the next wanted one, where Stage A
    left no all-active solution at that next level to start from."""
    jcount = fam.need.shape[1]
    jidx = torch.arange(jcount, device=fam.need.device)
    top = torch.where(fam.need, jidx[None, :], -1).amax(-1)  # highest wanted level per family
    later = fam.need[:, None, :] & (jidx[None, None, :] > jidx[None, :, None])  # (F, level, later level)
    nxt = torch.where(later, jidx[None, None, :], jcount).amin(-1).clamp(max=jcount - 1)
    has_start = sol.tried.gather(1, nxt)
    return (jidx[None, :] <= top[:, None]) & (sol.stage == 0) & (fam.need | ~has_start)


def _warm_start(sol: _Solution, fams: torch.Tensor, level: torch.Tensor, costs: torch.Tensor, y: torch.Tensor,
                s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(beta, out) to start Newton from, per (family, level) row: the lower-objective candidate of
    Stage A's (invalid) all-active solution at the level and the solution at the nearest solved
    lower level, or 0 if neither beats it.

    Not the log-C extrapolation of the path (tried before issue 11's second round): at C = 10 and 100
    it often has the lowest objective but an active set of a few dozen rows where the optimum has
    hundreds, so its Newton steps were cut to t ~ 0.05 by the line search (measured at VOC07 size,
    2048-d: 9 Newton iterations per problem at C = 100 with it, 4-5 without).
    """
    jidx = torch.arange(costs.numel(), device=fams.device)
    solved = (sol.stage[fams] > 0) & (jidx[None, :] < level[:, None])
    prev = torch.where(solved, jidx[None, :], -1).amax(-1)
    has_prev, safe = (prev >= 0)[:, None], torch.clamp(prev, min=0)
    beta, out = torch.zeros_like(y), torch.zeros_like(y)
    best = _objective(beta, out, y, s)
    candidates = [(sol.beta[fams, level], sol.out[fams, level]),
                  (torch.where(has_prev, sol.beta[fams, safe], 0.0), torch.where(has_prev, sol.out[fams, safe], 0.0))]
    for cb, co in candidates:
        f = _objective(cb, co, y, s)
        better = f < best
        beta = torch.where(better[:, None], cb, beta)
        out = torch.where(better[:, None], co, out)
        best = torch.where(better, f, best)
    return beta, out


def _gradient_norms(gram: _Gram, beta: torch.Tensor, out: torch.Tensor, y: torch.Tensor, s: torch.Tensor,
                    group: torch.Tensor, exact: torch.Tensor, tol: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(||grad f||, ||w~||, certified) per row; grad f = X~^T gamma with gamma = beta - s (y - o)_+.

    gamma' K gamma <= tr(K_SS) ||gamma||^2 on the support S of gamma (K_SS is PSD). At an optimum
    gamma is rounding noise, so this free bound certifies most optima; the exact norm costs a Gram
    product and is computed only where the bound fails and `exact` asks for it (elsewhere the bound
    is returned, an upper bound).
    """
    act = (1.0 - y * out > 0) & (s > 0)
    gamma = beta - torch.where(act, s * (y - out), 0.0)
    wn = torch.sqrt(torch.clamp(_rowdot(beta, out), min=0.0))
    trace = torch.where(gamma != 0, gram.diag[group], 0.0).sum(-1)
    gn = torch.sqrt(trace * _rowdot(gamma, gamma))
    goal = tol * torch.clamp(wn, min=1.0)
    redo = torch.nonzero(exact & (gn > goal)).flatten()
    if redo.numel():
        g = gamma[redo]
        gn[redo] = torch.sqrt(torch.clamp(_rowdot(g, gram.matvec(g, group[redo])), min=0.0))
    return gn, wn, gn <= goal


def _stage_b(gram: _Gram, fam: _Families, costs: torch.Tensor, st: SolverSettings, sol: _Solution,
             bar: tqdm | None) -> None:
    """Finite Newton for every (family, level) of `_stage_b_levels`, all families at once.

    A level Stage A reached (its all-active solution, slightly invalid, is the warm start; measured:
    it is the best start there nearly always) starts at once; any other level starts when every
    lower level of its family is solved, from the path below it. So each round of Newton steps
    batches every problem that can run, whatever its level, and the Gram products stay wide: on
    CPU a product with a few vectors costs several times more per vector than one with ~100 (issue 11).
    """
    device = fam.y.device
    todo = _stage_b_levels(fam, sol)
    jcount = todo.shape[1]
    started = torch.zeros_like(todo)
    counts = {"cholesky": 0, "cg": 0, "cg_fallback": 0}
    cache = _FactorCache(gram)
    cpu = time.process_time()

    def start() -> _NewtonRows:
        """Rows for the levels that can start now."""
        open_levels = (todo & (sol.stage == 0)).long()
        open_below = torch.cumsum(open_levels, -1) - open_levels
        ready = todo & ~started & (sol.tried | (open_below == 0))
        started.__ior__(ready)
        f, j = torch.nonzero(ready, as_tuple=True)
        y, s = fam.y[f], 2 * costs[j, None] * fam.d[f]
        beta, out = _warm_start(sol, f, j, costs, y, s)
        no = torch.zeros(len(f), dtype=torch.bool, device=device)
        return _NewtonRows(f, j, beta, out, torch.zeros_like(f), no, no.clone(), torch.zeros_like(y, dtype=torch.bool))

    rows = start()
    while rows.fam.numel():
        y, d, group = fam.y[rows.fam], fam.d[rows.fam], fam.group[rows.fam]
        s = 2 * costs[rows.level, None] * d
        # An exact Newton point that kept the active set it was computed on IS the optimum up to
        # rounding. One that changed it is not (its gradient lives on the rows that flipped): there
        # only the free bound is tried, to stop rows flickering at the margin. Warm starts and CG
        # points get the exact gradient norm where the bound fails.
        gn, wn, conv = _gradient_norms(gram, rows.beta, rows.out, y, s, group, ~rows.factored, st.tol)
        conv |= rows.exact | (rows.iters >= st.max_newton)
        if bool(conv.any()):
            done = rows.take(conv)
            _finish(gram, fam, sol, done, costs, st, bar)
            for key in (done.fam * jcount + done.level).tolist():
                cache.base.pop(key, None)
            keep = ~conv
            rows, y, d, group, s, gn, wn = rows.take(keep), y[keep], d[keep], group[keep], s[keep], gn[keep], wn[keep]
        if rows.fam.numel():
            _newton_step(gram, sol, rows, y, d, s, group, costs[rows.level], gn, wn, st, cache, counts, jcount)
        if bool(conv.any()):
            rows = rows.join(start())  # checked in the next round
    LOG.debug("stage B: %d problems, Newton iterations max %d mean %.2f, %s, new factors %.1f GFLOP, %.1f CPU-s",
              int(todo.sum()), int(sol.newton[todo].max()) if bool(todo.any()) else 0,
              float(sol.newton[todo].double().mean()) if bool(todo.any()) else 0.0, counts,
              cache.factorised_rows3 / 1e9, time.process_time() - cpu)


def _finish(gram: _Gram, fam: _Families, sol: _Solution, done: _NewtonRows, costs: torch.Tensor,
            st: SolverSettings, bar: tqdm | None) -> None:
    """Certify and store the solutions of finished rows: ||grad f|| and ||w~|| at the final point."""
    f, j = done.fam, done.level
    y, group = fam.y[f], fam.group[f]
    s = 2 * costs[j, None] * fam.d[f]
    exact = torch.ones_like(f, dtype=torch.bool)
    gnorm, wnorm, certified = _gradient_norms(gram, done.beta, done.out, y, s, group, exact, st.tol)
    sol.beta[f, j], sol.out[f, j] = done.beta, done.out
    sol.grad_norm[f, j], sol.w_norm[f, j] = gnorm, wnorm
    sol.newton[f, j] = done.iters
    sol.stage[f, j] = 2
    # "exact" stops are at the float-rounding floor of the factorisation; accept them within 1e3 x tol.
    sol.converged[f, j] = certified | (gnorm <= 1e3 * st.tol * torch.clamp(wnorm, min=1.0))
    if bar is not None:
        bar.update(int(fam.need[f, j].sum()))


def _newton_step(gram: _Gram, sol: _Solution, rows: _NewtonRows, y: torch.Tensor, d: torch.Tensor,
                 s: torch.Tensor, group: torch.Tensor, cost: torch.Tensor, gn: torch.Tensor, wn: torch.Tensor,
                 st: SolverSettings, cache: _FactorCache, counts: dict[str, int], jcount: int) -> None:
    """One generalised Newton step on every row, in place: the Newton point of the current active set
    (factored, or by CG), then the exact line search (or the whole step, where it keeps the set)."""
    act = (1.0 - y * rows.out > 0) & (s > 0)
    rows.iters += 1
    sizes = act.sum(-1)
    # Factor (exactly) once the active set has settled; while it still moves a lot, a loose CG
    # step finds the next one as well, at a fraction of the cost of a factorisation.
    settled = (act != rows.last_act).sum(-1) <= st.settled * torch.clamp(sizes, min=1)
    rows.last_act = act
    # Factor or CG, whichever the cost model says is cheaper: CG needs about 12 sqrt(kappa)
    # products for 1e-10 (a quarter of that while the active set still moves), kappa ~ 1 + 2 C
    # lambda_2 after the Jacobi scaling; a factor costs |I|^3 / 3.
    kappa = 1 + 2 * cost * sol.lambda2[rows.fam]
    steps = 12 * torch.sqrt(kappa) * torch.where(settled, 1.0, 0.25)
    cg_cost = steps * gram.product_flops / st.matvec_rate
    factor_cost = sizes.double() ** 3 / 3 / st.factor_rate
    small = (sizes <= st.batched_rows) | ((factor_cost <= cg_cost) & (sizes <= st.cholesky_rows))
    point = torch.zeros_like(rows.beta)
    exact = torch.zeros_like(small)
    if bool((~small).any()):
        big = torch.nonzero(~small).flatten()
        loose = torch.where(settled[big], 0.05, 0.2)
        goal = torch.maximum(0.3 * st.tol * torch.clamp(wn[big], min=1.0), loose * gn[big])
        gain = 2 * cost[big] * torch.sqrt(torch.clamp(sol.lmax[rows.fam[big]], min=1e-300))  # ||grad|| <= gain ||r||
        pts, ok = _cg_points(gram, group[big], y[big], s[big], d[big], cost[big], act[big], rows.beta[big],
                             goal / gain, st.cg_steps)
        point[big] = pts
        small[big[~ok]] = True  # CG too slow for these: factor them instead
        counts["cg"] += int(ok.sum())
        counts["cg_fallback"] += int((~ok).sum())
    if bool(small.any()):
        sm = torch.nonzero(small).flatten()
        tiny = sizes[sm] <= st.batched_rows
        if bool(tiny.any()):
            tm = sm[tiny]
            point[tm] = _cholesky_points(gram, group[tm], y[tm], s[tm], act[tm])
        for i in sm[~tiny].tolist():
            point[i] = cache.point(int(rows.fam[i]) * jcount + int(rows.level[i]), int(group[i]), y[i], s[i], act[i])
        exact[sm] = True
        counts["cholesky"] += len(sm)
    dbeta = point - rows.beta
    dout = gram.matvec(dbeta, group)
    # An exact Newton point that keeps its active set is the optimum: take it whole.
    same = exact & (((1.0 - y * (rows.out + dout) > 0) & (s > 0)) == act).all(-1)
    t = torch.where(same, 1.0, _line_search(rows.beta, rows.out, dbeta, dout, y, s))
    rows.beta = rows.beta + t[:, None] * dbeta
    rows.out = rows.out + t[:, None] * dout
    rows.exact, rows.factored = same, exact


def _solve_families(gram: _Gram, fam: _Families, costs: torch.Tensor, st: SolverSettings,
                    bar: tqdm | None = None) -> _Solution:
    """Every wanted (family, cost): Stage A for the all-active ones, Stage B for the rest (costs ascending)."""
    fcount, n = fam.y.shape
    jcount = len(costs)
    if bool((costs[1:] < costs[:-1]).any()):
        raise ValueError("costs must be ascending")
    kw = {"dtype": fam.y.dtype, "device": fam.y.device}
    sol = _Solution(
        beta=torch.zeros(fcount, jcount, n, **kw), out=torch.zeros(fcount, jcount, n, **kw),
        grad_norm=torch.zeros(fcount, jcount, **kw), w_norm=torch.zeros(fcount, jcount, **kw),
        dual_violation=torch.zeros(fcount, jcount, **kw),
        newton=torch.zeros(fcount, jcount, dtype=torch.long, device=fam.y.device),
        stage=torch.zeros(fcount, jcount, dtype=torch.long, device=fam.y.device),
        converged=torch.zeros(fcount, jcount, dtype=torch.bool, device=fam.y.device),
        lmax=torch.zeros(fcount, **kw), lambda2=torch.zeros(fcount, **kw),
        tried=torch.zeros(fcount, jcount, dtype=torch.bool, device=fam.y.device),
    )
    cpu = time.process_time()
    _stage_a(gram, fam, costs, st, sol)
    LOG.debug("stage A: %d families, %.1f CPU-s, %d of %d wanted problems settled", fcount, time.process_time() - cpu,
              int((fam.need & (sol.stage == 1)).sum()), int(fam.need.sum()))
    if bar is not None:
        bar.update(int((fam.need & (sol.stage == 1)).sum()))
    _stage_b(gram, fam, costs, st, sol, bar)
    for j in range(jcount):  # liblinear's own stopping measure, for the record
        sol.dual_violation[:, j] = _dual_violation(sol.beta[:, j], sol.out[:, j], fam.y, 2 * costs[j] * fam.d)
    return sol


def _solve_in_parts(gram: _Gram, fam: _Families, costs: torch.Tensor, st: SolverSettings, bar: tqdm | None,
                    device: torch.device) -> _Solution:
    """`_solve_families`, the families split into one part per CPU core, solved side by side.

    Families are independent problems, so the parts' solutions are theirs alone (`_run_tasks`).
    """
    fcount = fam.y.shape[0]
    parts = min(fcount, torch.get_num_threads()) if device.type == "cpu" else 1
    bounds = np.linspace(0, fcount, parts + 1).round().astype(int)
    tasks = [functools.partial(_solve_families, gram, fam.take(slice(a, b)), costs, st, bar)
             for a, b in itertools.pairwise(bounds)]
    solutions = _run_tasks(tasks, device)
    if len(solutions) == 1:
        return solutions[0]
    return _Solution(*(torch.cat([getattr(sol, name) for sol in solutions]) for name in _Solution.__dataclass_fields__))


# ----------------------------------------------------------------------------------------------
# The public core: many problems on one X


@_keep_freed_memory()
def solve_squared_hinge(
    x: np.ndarray,
    y: np.ndarray,
    costs: Sequence[float] | np.ndarray,
    row_weights: np.ndarray | None = None,
    positive_weight: float = POSITIVE_WEIGHT,
    device: str | torch.device = "cpu",
    settings: SolverSettings | None = None,
) -> dict[str, np.ndarray]:
    """Exact solutions of P problems that share the rows x (N x D, used as given):

        minimise 0.5 (||w||^2 + b^2) + C_p sum_i r_pi c_pi max(0, 1 - y_pi (w . x_i + b))^2,

    c_pi = positive_weight where y_pi = +1 else 1, r_pi = row_weights (0 drops row i from problem p,
    e.g. a CV validation fold). This is LinearSVC(C_p, class_weight={1: positive_weight, -1: 1},
    loss='squared_hinge', dual=True, intercept_scaling=1) on the rows with r_pi = 1 (liblinear
    regularises the bias). Problems with the same (y, r) row are solved together along their costs.

    Returns w (P x D), b (P,), decision values on every row (P x N) and the per-problem diagnostics
    (grad_norm bounds ||(w, b) - optimum||; see the module docstring).
    """
    st = settings or SolverSettings()
    _check_tol(st.tol)
    x = np.asarray(x)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise SVMInputError(f"x must be a numeric N x D matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise SVMInputError("features contain NaN or infinity")
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    if y.shape[1] != x.shape[0] or not np.isin(y, (-1.0, 1.0)).all():
        raise SVMInputError(f"y must be P x {x.shape[0]} labels in {{-1, +1}}, got shape {y.shape}")
    cost_arr = np.asarray(voc_svm._check_costs(np.ravel(costs)), dtype=np.float64)
    if cost_arr.size != y.shape[0]:
        raise SVMInputError(f"got {cost_arr.size} costs for {y.shape[0]} problems")
    r = np.ones_like(y) if row_weights is None else np.atleast_2d(np.asarray(row_weights, dtype=np.float64))
    if r.shape != y.shape or not np.isfinite(r).all() or (r < 0).any():
        raise SVMInputError(f"row_weights must be finite, >= 0 and shaped like y {y.shape}, got {r.shape}")
    if not (r > 0).any(axis=1).all():
        raise SVMInputError("every problem needs at least one row with a positive weight")
    if not math.isfinite(positive_weight) or positive_weight <= 0:
        raise SVMInputError(f"positive_weight must be a positive number, got {positive_weight}")
    dev = resolve_solver_device(device)
    keys, family = np.unique(np.concatenate([y, r], axis=1), axis=0, return_inverse=True)
    family = family.ravel()
    ascending, level = np.unique(cost_arr, return_inverse=True)
    need = np.zeros((len(keys), len(ascending)), dtype=bool)
    need[family, level] = True
    xt = _to_device(x, dev)
    gram = _Gram(_gram(xt)[None], xt)
    fy = _to_device(keys[:, : x.shape[0]], dev)
    weight = torch.where(fy > 0, torch.full_like(fy, float(positive_weight)), torch.ones_like(fy))
    fam = _Families(group=torch.zeros(len(keys), dtype=torch.long, device=dev), y=fy,
                    d=weight * _to_device(keys[:, x.shape[0]:], dev), need=torch.from_numpy(need).to(dev))
    sol = _solve_families(gram, fam, torch.from_numpy(ascending).to(dev), st)
    f_t, j_t = torch.from_numpy(family).to(dev), torch.from_numpy(level).to(dev)
    beta = sol.beta[f_t, j_t]
    return {
        "w": (beta @ xt).cpu().numpy(),
        "b": beta.sum(-1).cpu().numpy(),
        "decision": sol.out[f_t, j_t].cpu().numpy(),
        "grad_norm": sol.grad_norm[f_t, j_t].cpu().numpy(),
        "w_norm": sol.w_norm[f_t, j_t].cpu().numpy(),
        "dual_violation": sol.dual_violation[f_t, j_t].cpu().numpy(),
        "newton_iters": sol.newton[f_t, j_t].cpu().numpy(),
        "stage": sol.stage[f_t, j_t].cpu().numpy(),
        "converged": sol.converged[f_t, j_t].cpu().numpy(),
    }


# ----------------------------------------------------------------------------------------------
# Shared pieces of the protocol twins


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=torch.float64)


def _gram(x: torch.Tensor, step: int = 1024) -> torch.Tensor:
    """K~ = X X^T + 1 (liblinear's bias feature, intercept_scaling = 1), exactly symmetric.

    Block columns of the lower triangle are multiplied and mirrored: half the flops of X @ X.T
    (measured: 30% less CPU at 5011 x 2048 and 5011 x 9216).
    """
    n = x.shape[0]
    k = torch.empty(n, n, dtype=x.dtype, device=x.device)
    for a in range(0, n, step):
        b = min(n, a + step)
        column = x[a:] @ x[a:b].T  # rows a.., columns a..b
        diagonal = column[:b - a]
        column[:b - a] = (diagonal + diagonal.T) / 2  # BLAS need not give (i, j) and (j, i) the same rounding
        k[a:, a:b] = column
        k[a:b, b:] = column[b - a:].T
    k += 1.0
    return k


def _class_weights(y: torch.Tensor) -> torch.Tensor:
    """Per-row class weight of class_weight={1: 2, -1: 1}, in y's dtype (float64: no float32 scalars)."""
    return torch.where(y > 0, torch.full_like(y, POSITIVE_WEIGHT), torch.ones_like(y))


def _cost_order(costs: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Ascending unique costs and, per cost of the list, its index among them."""
    unique, position = np.unique(np.asarray(costs, dtype=np.float64), return_inverse=True)
    return unique, position


def _ties(cv: np.ndarray, names: Sequence[str], costs: Sequence[float]) -> list[dict[str, Any]]:
    """Classes whose two best CV scores are closer than TIE_GAP: their chosen cost is fragile."""
    ties = []
    for c, name in enumerate(names):
        order = np.argsort(-cv[c], kind="stable")
        if len(order) > 1 and cv[c, order[0]] - cv[c, order[1]] < TIE_GAP:
            ties.append({"class": name, "costs": [costs[order[0]], costs[order[1]]],
                         "cv_ap": [float(cv[c, order[0]]), float(cv[c, order[1]])]})
    return ties


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="fit", disable=not enabled, dynamic_ncols=True, leave=False)


def _diagnostics(sol: _Solution, mask: torch.Tensor) -> Diagnostics:
    pick = mask.nonzero(as_tuple=True)
    as_np = {name: getattr(sol, name)[pick].cpu().numpy() for name in
             ("grad_norm", "w_norm", "dual_violation", "newton", "stage", "converged")}
    return Diagnostics(as_np["grad_norm"], as_np["w_norm"], as_np["dual_violation"], as_np["newton"],
                       as_np["stage"], as_np["converged"])


def _warn_unconverged(diag: Diagnostics, what: str) -> None:
    missing = int((~diag.converged).sum())
    if missing:
        LOG.warning("%s: %d of %d problems did not reach the solver tolerance (max relative gradient %.2e)",
                    what, missing, diag.converged.size, diag.summary()["max_rel_grad"])


def _run_tasks(tasks: Sequence[Callable[[], Any]], device: torch.device) -> list[Any]:
    """Results of independent solver tasks, in order; on CPU, one task per core at a time.

    Each task runs in its own Python thread with torch's intra-op parallelism off (torch releases
    the GIL inside its kernels). The solver's many small operations and its Python control flow
    keep a single task from using two cores (measured: 1.35 busy cores of 2 when the machine was
    idle), independent tasks side by side use both.
    """
    workers = min(len(tasks), torch.get_num_threads()) if device.type == "cpu" else 1
    if workers <= 1:
        return [task() for task in tasks]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda task: task(), tasks))
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# Full protocol


@_keep_freed_memory()
def train_and_test_svm_batched(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    cfg: voc_svm.SVMConfig | None = None,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
    desc: str = "VOC07 SVM (batched)",
    device: str | torch.device = "cpu",
    settings: SolverSettings | None = None,
) -> dict[str, Any]:
    """Twin of `voc_svm.train_and_test_svm` (§7): the same CV folds, scores, selection and test AP,
    with every fit solved exactly by the batched solver. cfg.max_iter / cfg.tol / cfg.seed / cfg.workers
    are liblinear's and do not apply (the solver's own tolerance is `settings.tol`)."""
    cfg = cfg or voc_svm.SVMConfig()
    st = settings or SolverSettings()
    _check_tol(st.tol)
    started, cpu_started = time.perf_counter(), time.process_time()
    train_y, test_y = voc_svm._check_inputs(train_x, train_y, test_x, test_y)
    names = voc_svm._class_names(train_y.shape[1], class_names)
    costs = voc_svm._check_costs(cfg.costs)
    if cfg.folds < 2:
        raise SVMInputError(f"folds must be >= 2, got {cfg.folds}")
    voc_svm._require_trainable(train_y, names)
    voc_svm._require_test_positives(test_y, names)
    dev = resolve_solver_device(device)
    n_classes, n_costs, n = train_y.shape[1], len(costs), train_y.shape[0]
    ascending, position = _cost_order(costs)

    other_warnings: set[str] = set()
    signed = np.where(train_y == 1, 1, -1).astype(np.int32)  # §1.4: difficult rows train as negatives
    splits = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for c in range(n_classes):  # §7.2: unshuffled StratifiedKFold over the class's +-1 labels
            splits.append(list(StratifiedKFold(n_splits=cfg.folds).split(np.zeros(n), signed[:, c])))
    other_warnings |= {f"{w.category.__name__}: {w.message}" for w in caught}
    for c, name in enumerate(names):
        for f, (fit_rows, _) in enumerate(splits[c]):
            if len(np.unique(signed[fit_rows, c])) < 2:  # liblinear (sklearn) refuses such a fold too
                raise SVMInputError(f"class {name!r}: CV fold {f + 1} of {cfg.folds} trains on one label only "
                                    "(too few positives for the folds)")

    x = _to_device(voc_svm.normalise_features(train_x), dev)
    x_test = _to_device(voc_svm.normalise_features(test_x), dev)
    # Group f: the CV fits of fold f, restricted to the rows any class fits on in that fold (about
    # 2/3 of them: the folds are per class, §7.2, but nearly aligned); the last group, the refits, uses all.
    fold_rows = []
    for f in range(cfg.folds):
        used = np.zeros(n, dtype=bool)
        for c in range(n_classes):
            used[splits[c][f][0]] = True
        fold_rows.append(torch.from_numpy(np.flatnonzero(used)).to(dev))
    gram = _Gram(_gram(x)[None], x, row_sets=[*fold_rows, None])
    prepared = time.perf_counter()

    y_all = _to_device(signed.T.astype(np.float64), dev)  # (classes, n)
    weight = _class_weights(y_all)
    fam_class, fam_fold, d_rows = [], [], []
    for f in range(cfg.folds):  # families sorted by group (_Gram)
        for c in range(n_classes):
            mask = torch.zeros(n, dtype=torch.float64, device=dev)
            mask[torch.from_numpy(splits[c][f][0]).to(dev)] = 1.0
            fam_class.append(c)
            fam_fold.append(f)
            d_rows.append(weight[c] * mask)
    fam_class_t = torch.tensor(fam_class, device=dev)
    fam = _Families(group=torch.tensor(fam_fold, dtype=torch.long, device=dev), y=y_all[fam_class_t],
                    d=torch.stack(d_rows),
                    need=torch.ones(len(fam_class), len(ascending), dtype=torch.bool, device=dev))
    total_fits = len(fam_class) * n_costs + n_classes
    with _progress(total_fits, desc, progress) as bar:
        cv_sol = _solve_in_parts(gram, fam, torch.from_numpy(ascending).to(dev), st, bar, dev)
        gram.off_rows(cv_sol.beta, cv_sol.out, fam.group)  # the validation rows outside the fold's rows
        cv_ap = np.full((n_classes, n_costs), np.nan)
        fold_ap = np.zeros((n_classes, cfg.folds, len(ascending)))
        out = cv_sol.out.cpu().numpy()  # decision values on every row: the validation rows' are the CV scores
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i, (c, f) in enumerate(zip(fam_class, fam_fold, strict=True)):
                val = splits[c][f][1]
                for j in range(len(ascending)):
                    ap = voc_svm.cv_average_precision(signed[val, c], out[i, j, val])
                    # no positive in this fold: sklearn's own definition and warning
                    fold_ap[c, f, j] = average_precision_score(signed[val, c], out[i, j, val]) if ap is None else ap
        other_warnings |= {f"{w.category.__name__}: {w.message}" for w in caught}
        cv_ap[:] = fold_ap.mean(axis=1)[:, position]
        chosen = np.argmax(cv_ap, axis=1)  # §7.3: first maximum wins, costs in list order

        need = torch.zeros(n_classes, len(ascending), dtype=torch.bool, device=dev)
        need[torch.arange(n_classes), torch.from_numpy(position[chosen]).to(dev)] = True
        refit = _Families(group=torch.full((n_classes,), cfg.folds, dtype=torch.long, device=dev), y=y_all,
                          d=weight.clone(), need=need)
        fit_sol = _solve_in_parts(gram, refit, torch.from_numpy(ascending).to(dev), st, bar, dev)
    idx = torch.arange(n_classes, device=dev)
    beta = fit_sol.beta[idx, torch.from_numpy(position[chosen]).to(dev)]  # (classes, n)
    w = beta @ x  # w~ = X~^T beta: weights and bias
    bias = beta.sum(-1)
    scores = (x_test @ w.T + bias).cpu().numpy()
    test_ap = np.full(n_classes, np.nan)
    for c in range(n_classes):
        keep = test_y[:, c] != -1  # §1.5: difficult test rows are dropped
        test_ap[c] = voc_svm.interpolated_ap(scores[keep, c], test_y[keep, c])
    finished = time.perf_counter()

    diag = _concat_diagnostics([_diagnostics(cv_sol, fam.need), _diagnostics(fit_sol, need)])
    _warn_unconverged(diag, desc)
    messages = sorted(other_warnings)
    for message in messages:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return {
        **voc_svm.full_protocol_scores(test_ap, cv_ap, chosen, names, costs),
        "fits": total_fits,
        "convergence_warnings": int((~diag.converged).sum()),
        "other_warnings": messages,
        "workers": 1,
        "config": asdict(cfg),
        "timings": {"prepare_s": prepared - started, "fit_s": finished - prepared, "total_s": finished - started,
                    "cpu_s": time.process_time() - cpu_started},
        "solver": "batched",
        "device": str(dev),
        "ties": _ties(cv_ap, names, costs),
        "solver_diagnostics": {**diag.summary(), "tol": st.tol, "settings": asdict(st)},
    }


# ----------------------------------------------------------------------------------------------
# Low-shot protocol


def _use_blocks(n_rows: int, n_all: int) -> bool:
    """Per-family Gram blocks (memory-bound products) beat masked products with the whole Gram
    matrix (compute-bound) for small row sets. Measured at VOC07 size, 2048-d: blocks at k = 64
    (1280 of 5011 rows, 16 vs 19 CPU-s), the whole matrix at k = 96 (1920 rows, 25 vs 31 CPU-s)."""
    return n_rows * 3 <= n_all


@_keep_freed_memory()
def run_low_shot_batched(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    cfg: voc_svm.LowShotConfig | None = None,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
    desc: str = "VOC07 low-shot SVM (batched)",
    device: str | torch.device = "cpu",
    settings: SolverSettings | None = None,
) -> dict[str, Any]:
    """Twin of `voc_svm.run_low_shot` (§1.7, §7 low-shot): same samples, fits on the sampled rows
    only, test AP per cost, same aggregation; every fit solved exactly by the batched solver."""
    cfg = cfg or voc_svm.LowShotConfig()
    st = settings or SolverSettings()
    _check_tol(st.tol)
    started, cpu_started = time.perf_counter(), time.process_time()
    train_y, test_y = voc_svm._check_inputs(train_x, train_y, test_x, test_y)
    names = voc_svm._class_names(train_y.shape[1], class_names)
    costs = voc_svm._check_costs(cfg.costs)
    ks, seed = voc_svm._check_ks(cfg.ks), voc_svm._check_seed(cfg.seed)
    sample_ids = list(voc_svm._check_sample_count(cfg.samples))
    voc_svm._require_test_positives(test_y, names)
    dev = resolve_solver_device(device)
    if cfg.sample_dir:
        samples = voc_svm.read_fair_samples(cfg.sample_dir, train_y, ks, cfg.samples, cfg.negatives_per_positive)
        source = f"FAIR-format files in {cfg.sample_dir}"
    else:
        samples = voc_svm.low_shot_samples(train_y, ks, cfg.samples, seed, cfg.negatives_per_positive, names)
        source = f"generated: numpy default_rng([seed={seed}, sample, k, class])"

    x = _to_device(voc_svm.normalise_features(train_x), dev)
    x_test = _to_device(voc_svm.normalise_features(test_x), dev)
    n, n_classes, n_costs = x.shape[0], train_y.shape[1], len(costs)
    shared = _Gram(_gram(x)[None], x)
    test_gram = x @ x_test.T  # (train rows, test rows); + 1 for the bias is added per product
    test_gram += 1.0
    del x, x_test
    ascending, position = _cost_order(costs)
    cost_t = torch.from_numpy(ascending).to(dev)
    test_keep = (test_y != -1).T  # (classes, test rows)
    prepared = time.perf_counter()
    LOG.debug("low-shot: features and Gram matrices %.1f s", prepared - started)

    test_ap = np.full((len(sample_ids), len(ks), n_costs, n_classes), np.nan)
    diags: list[Diagnostics] = []
    total = len(sample_ids) * len(ks) * n_classes * n_costs
    with _progress(total, desc, progress) as bar:
        tasks = []
        for ki, k in enumerate(ks):
            keys = [(si, c) for si in range(len(sample_ids)) for c in range(n_classes)]
            rows = [np.flatnonzero(samples[(sample_ids[si], k)][:, c] != -1) for si, c in keys]
            size = max(len(r) for r in rows)
            blocks = _use_blocks(size, n)
            per_family = (8 * size * size) if blocks else 0
            per_family += 8 * n_costs * (n if not blocks else size) * 4
            step = max(1, int(st.chunk_bytes // max(1, per_family)))
            for start in range(0, len(keys), step):
                part = range(start, min(len(keys), start + step))
                tasks.append((size * len(part), functools.partial(
                    _low_shot_chunk, [keys[i] for i in part], [rows[i] for i in part], samples, sample_ids, k, ki,
                    blocks, shared, test_gram, test_y, test_keep, cost_t, position, test_ap, st, bar, dev)))
        tasks.sort(key=lambda task: -task[0])  # biggest first: the cores finish together
        diags = _run_tasks([task for _, task in tasks], dev)
    finished = time.perf_counter()
    diag = _concat_diagnostics(diags)
    _warn_unconverged(diag, desc)
    test_map = test_ap.mean(axis=-1)  # §7 low-shot 3: mean over classes -> samples x ks x costs
    return {
        "protocol": "voc07_lowshot",
        "per_k": voc_svm._aggregate_low_shot(test_map, ks, costs),
        "test_map": test_map.tolist(),
        "cost_selection": voc_svm.LOW_SHOT_COST_SELECTION,
        "samples_source": source,
        "sample_ids": sample_ids,
        "ks": list(ks),
        "classes": names,
        "costs": list(costs),
        "fits": total,
        "convergence_warnings": int((~diag.converged).sum()),
        "other_warnings": [],
        "workers": 1,
        "config": asdict(cfg),
        "timings": {"prepare_s": prepared - started, "fit_s": finished - prepared, "total_s": finished - started,
                    "cpu_s": time.process_time() - cpu_started},
        "solver": "batched",
        "device": str(dev),
        "solver_diagnostics": {**diag.summary(), "tol": st.tol, "settings": asdict(st)},
    }


def _low_shot_chunk(keys, rows, samples, sample_ids, k, ki, blocks, shared, test_gram, test_labels, test_keep,
                    cost_t, position, test_ap, st, bar, dev) -> Diagnostics:
    """Solve one chunk of (sample, class) families of one k at every cost and record their test APs."""
    n = shared.n
    fcount, jcount = len(keys), len(cost_t)
    idx = [torch.from_numpy(r).to(dev) for r in rows]
    signs = []
    for (si, c), r in zip(keys, rows, strict=True):
        signs.append(np.where(samples[(sample_ids[si], k)][r, c] == 1, 1.0, -1.0))
    if blocks:
        m = len(rows[0])
        if any(len(r) != m for r in rows):
            raise SVMInputError(f"low-shot samples for k={k} have different sizes; expected 20k rows each")
        index = torch.stack(idx)  # (F, m)
        gram_all = shared.blocks[0]
        gram = _Gram(gram_all[index[:, :, None], index[:, None, :]])
        y = torch.from_numpy(np.stack(signs)).to(dev)
        d = _class_weights(y)
        group = torch.arange(fcount, device=dev)
    else:
        gram = shared
        y = torch.ones(fcount, n, dtype=torch.float64, device=dev)
        d = torch.zeros(fcount, n, dtype=torch.float64, device=dev)
        for f, (i, sg) in enumerate(zip(idx, signs, strict=True)):
            y[f, i] = torch.from_numpy(sg).to(dev)
            d[f, i] = _class_weights(y[f, i])
        group = torch.zeros(fcount, dtype=torch.long, device=dev)
    fam = _Families(group=group, y=y, d=d, need=torch.ones(fcount, jcount, dtype=torch.bool, device=dev))
    cpu = time.process_time()
    sol = _solve_families(gram, fam, cost_t, st, bar)
    solved = time.process_time()
    if blocks:  # small row sets: gather their rows of the test Gram matrix
        scores = torch.empty(fcount, jcount, test_gram.shape[1], dtype=torch.float64, device=dev)
        for f, i in enumerate(idx):
            scores[f] = sol.beta[f] @ test_gram.index_select(0, i)  # decision values on every test row
    else:  # beta is zero off the sampled rows: one product with the whole test Gram matrix
        scores = (sol.beta.reshape(fcount * jcount, n) @ test_gram).reshape(fcount, jcount, -1)
    scores_np = scores.cpu().numpy()
    for f, (si, c) in enumerate(keys):
        keep = test_keep[c]  # §1.5: difficult test rows are dropped; numpy's AP is the reference's, ties too
        ap = np.array([voc_svm.interpolated_ap(scores_np[f, j, keep], test_labels[keep, c]) for j in range(jcount)])
        test_ap[si, ki, :, c] = ap[position]
    LOG.debug("low-shot k=%d: %d families (%s), solve %.1f CPU-s, test scores and AP %.1f CPU-s", k, fcount,
              "blocks" if blocks else "shared Gram", solved - cpu, time.process_time() - solved)
    return _diagnostics(sol, fam.need)
