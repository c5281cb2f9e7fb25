"""The exact batched solver of the VOC07 SVM protocols (issue 11) against liblinear and a direct minimiser."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC

from protocols import svm_solver, voc_svm
from protocols.svm_solver import (
    resolve_solver_device,
    run_low_shot_batched,
    solve_squared_hinge,
    train_and_test_svm_batched,
)
from protocols.voc_svm import LowShotConfig, SVMConfig, SVMInputError, check_solver

COSTS = (1.0, 0.0625, 0.5**10, 10.0)
TIGHT = {"tol": 1e-8, "max_iter": 200000}  # liblinear run to (near) its exact optimum


def tight_liblinear(cost: float, x: np.ndarray, y: np.ndarray) -> LinearSVC:
    """liblinear to dual violation 1e-9: about as exact as it gets in float64 (it must not warn)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, dual=True, tol=1e-9, max_iter=10**6).fit(x, y)


def multilabel(rng: np.random.Generator, rows: int, classes: int, rate: float = 0.3) -> np.ndarray:
    labels = (rng.random((rows, classes)) < rate).astype(np.int32)
    labels[: classes * 4] = np.tile(np.eye(classes, dtype=np.int32), (4, 1))  # >= 4 positives per class
    labels[(labels == 0) & (rng.random((rows, classes)) < 0.05)] = -1  # some difficult rows
    return labels


def features(rng: np.random.Generator, labels: np.ndarray, dims: int, signal: float) -> np.ndarray:
    x = rng.normal(size=(len(labels), dims)) + 0.5  # a common mean, as post-ReLU features have
    x[:, : labels.shape[1]] += signal * (labels == 1)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    train_y, test_y = multilabel(rng, 240, 3), multilabel(rng, 200, 3)
    return features(rng, train_y, 40, 1.5), train_y, features(rng, test_y, 40, 1.5), test_y


def primal_objective(w: np.ndarray, b: float, x: np.ndarray, y: np.ndarray, cost: float, r: np.ndarray) -> float:
    margin = np.maximum(0.0, 1.0 - y * (x @ w + b))
    return 0.5 * (w @ w + b * b) + cost * np.sum(r * np.where(y > 0, 2.0, 1.0) * margin**2)


# ------------------------------------------------------------------------------------ the core solver


def test_core_solver_reaches_the_optimum_of_a_direct_minimiser():
    rng = np.random.default_rng(1)
    x = voc_svm.normalise_features(rng.normal(size=(90, 12)) + 0.3)
    y = np.where(rng.random(90) < 0.3, 1.0, -1.0)
    weights = np.ones((4, 90))
    weights[1, :30] = 0.0  # a "fold": rows dropped from problem 1
    costs = np.array([0.5**12, 0.0625, 1.0, 100.0])
    result = solve_squared_hinge(x, np.tile(y, (4, 1)), costs, weights)
    assert result["converged"].all()
    for p in range(4):
        def f(v, p=p):
            return primal_objective(v[:-1], v[-1], x, y, costs[p], weights[p])

        def grad(v, p=p):
            m = np.maximum(0.0, 1.0 - y * (x @ v[:-1] + v[-1])) * weights[p] * np.where(y > 0, 2.0, 1.0)
            g = -2 * costs[p] * m * y
            return np.concatenate([v[:-1] + x.T @ g, [v[-1] + g.sum()]])

        ref = minimize(f, np.zeros(13), jac=grad, method="L-BFGS-B", options={"gtol": 1e-12, "maxiter": 50000})
        ours = f(np.concatenate([result["w"][p], [result["b"][p]]]))
        assert ours <= ref.fun + 1e-9 * max(1.0, abs(ref.fun))
        assert np.allclose(result["decision"][p], x @ result["w"][p] + result["b"][p], atol=1e-9)
        # the certificate: ||grad f|| bounds the distance to the optimum (1-strong convexity)
        assert result["grad_norm"][p] <= 1e-6 * max(1.0, result["w_norm"][p])
        assert (np.linalg.norm(grad(np.concatenate([result["w"][p], [result["b"][p]]])))
                < 1e-6 * max(1, result["w_norm"][p]))


def test_core_solver_matches_liblinear_run_to_tight_tolerance():
    rng = np.random.default_rng(2)
    x = voc_svm.normalise_features(np.maximum(rng.normal(size=(150, 30)) + 0.2, 0))
    y = np.where(rng.random(150) < 0.2, 1, -1)
    costs = (0.01, 1.0, 4.0)
    result = solve_squared_hinge(x, np.tile(y, (3, 1)), costs)
    for p, cost in enumerate(costs):
        model = tight_liblinear(cost, x, y)
        assert np.abs(model.decision_function(x) - result["decision"][p]).max() < 1e-6
        assert (np.allclose(model.coef_[0], result["w"][p], atol=1e-6)
                and abs(model.intercept_[0] - result["b"][p]) < 1e-6)
        # ... and a wrong answer would be noticed: a 1% smaller cost moves the decision values by more
        assert np.abs(model.decision_function(x)
                      - solve_squared_hinge(x, y[None], [0.99 * cost])["decision"][0]).max() > 1e-4


def test_duplicate_rows_and_both_stages_agree():
    rng = np.random.default_rng(3)
    base = np.maximum(rng.normal(size=(60, 20)), 0)
    x = voc_svm.normalise_features(np.concatenate([base, base[:25]]))  # 25 exact duplicates
    y = np.where(rng.random(60) < 0.3, 1, -1)
    y = np.concatenate([y, y[:25]])
    costs = (0.5**8, 0.0625, 1.0, 100.0)
    default = solve_squared_hinge(x, np.tile(y, (4, 1)), costs)
    newton_only = solve_squared_hinge(x, np.tile(y, (4, 1)), costs, settings=svm_solver.SolverSettings(lanczos_steps=1))
    assert (newton_only["stage"] == 2).all() and (default["stage"] == 1).any()  # the check can tell them apart
    assert np.abs(default["decision"] - newton_only["decision"]).max() < 1e-7
    for p, cost in enumerate(costs):
        model = tight_liblinear(cost, x, y)
        assert np.abs(model.decision_function(x) - default["decision"][p]).max() < 1e-6


def test_cholesky_and_cg_newton_points_agree():
    rng = np.random.default_rng(4)
    x = voc_svm.normalise_features(rng.normal(size=(120, 40)) + 0.4)
    y = np.where(rng.random(120) < 0.4, 1, -1)
    costs = (0.1, 1.0, 10.0)
    kw = {"lanczos_steps": 1}
    factored = solve_squared_hinge(x, np.tile(y, (3, 1)), costs, settings=svm_solver.SolverSettings(**kw))
    iterative = solve_squared_hinge(x, np.tile(y, (3, 1)), costs,
                                    settings=svm_solver.SolverSettings(cholesky_rows=0, batched_rows=0, **kw))
    assert np.abs(factored["decision"] - iterative["decision"]).max() < 1e-6
    assert iterative["converged"].all()


def _families(rng: np.random.Generator, rows: int, dims: int, count: int):
    """A shared Gram matrix (through the features) and `count` families with their own row sets."""
    x = torch.from_numpy(voc_svm.normalise_features(np.maximum(rng.normal(size=(rows, dims)) + 0.3, 0)))
    gram = svm_solver._Gram(svm_solver._gram(x)[None], x)
    y = torch.from_numpy(np.where(rng.random((count, rows)) < 0.3, 1.0, -1.0))
    used = torch.from_numpy((rng.random((count, rows)) < 0.7).astype(np.float64))
    fam = svm_solver._Families(group=torch.zeros(count, dtype=torch.long), y=y,
                               d=svm_solver._class_weights(y) * used, need=torch.ones(count, 5, dtype=torch.bool))
    return x, gram, fam


def test_gram_is_symmetric_and_products_through_the_features_agree():
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.normal(size=(300, 40)))
    k = svm_solver._gram(x, step=64)
    assert torch.equal(k, k.T) and torch.allclose(k, x @ x.T + 1, rtol=0, atol=1e-12)
    through_x = svm_solver._Gram(k[None], x)
    assert through_x.features is not None  # 2 (D + 1) < n: the products go through X
    v = torch.from_numpy(rng.normal(size=(7, 300)))
    group = torch.zeros(7, dtype=torch.long)
    assert torch.allclose(through_x.matvec(v, group), svm_solver._Gram(k[None]).matvec(v, group), rtol=1e-12,
                          atol=1e-10)


@pytest.mark.parametrize("through_features", [True, False], ids=["through-x", "through-gram"])
def test_row_restricted_products_agree_on_their_rows_and_are_completed_off_them(through_features):
    """The full protocol's fold groups: on its rows a group's product is the whole one, for slices wider and
    narrower than RESTRICTED_MIN_WIDTH, and `off_rows` fills in the rest exactly."""
    rng = np.random.default_rng(9)
    n = 300
    x = torch.from_numpy(rng.normal(size=(n, 40 if through_features else 200)))
    k = svm_solver._gram(x)
    row_sets = [torch.from_numpy(np.flatnonzero(rng.random(n) < share)) for share in (0.6, 0.7)] + [None]
    restricted = svm_solver._Gram(k[None], x, row_sets=row_sets)
    whole = svm_solver._Gram(k[None], x)
    assert (restricted.features is not None) == through_features
    widths = (svm_solver.RESTRICTED_MIN_WIDTH + 3, svm_solver.RESTRICTED_MIN_WIDTH - 1, 2)
    group = torch.cat([torch.full((w,), g) for g, w in enumerate(widths)])
    v = torch.from_numpy(rng.normal(size=(len(group), n)))
    for g, rows in enumerate(row_sets[:2]):  # a group's vectors live on its rows
        mask = torch.zeros(n, dtype=torch.bool)
        mask[rows] = True
        v[group == g] *= mask
    got, want = restricted.matvec(v, group), whole.matvec(v, group)
    for g, rows in enumerate(row_sets):
        sel = group == g
        on = slice(None) if rows is None else rows
        assert torch.allclose(got[sel][:, on], want[sel][:, on], rtol=1e-12, atol=1e-10)
    beta = v[:, None, :].repeat(1, 2, 1)  # (F, J, n)
    out = got[:, None, :].repeat(1, 2, 1)
    restricted.off_rows(beta, out, group)
    assert torch.allclose(out, want[:, None, :].expand_as(out), rtol=1e-12, atol=1e-10)
    assert torch.equal(restricted.diag, k.diagonal()[None].expand(3, n))


def test_full_protocol_with_every_fold_product_restricted_matches_liblinear(data, monkeypatch):
    """The small problems above mostly take the whole-matrix path (few families per fold): here every
    fold slice goes through its own rows, the VOC07-size path."""
    monkeypatch.setattr(svm_solver, "RESTRICTED_MIN_WIDTH", 1)
    cfg = SVMConfig(costs=COSTS, workers=1, **TIGHT)
    ref = voc_svm.train_and_test_svm(*data, cfg, progress=False)
    ours = train_and_test_svm_batched(*data, cfg, progress=False)
    assert ours["chosen_cost_index"] == ref["chosen_cost_index"]
    assert np.abs(np.array(ours["cv_ap"]) - np.array(ref["cv_ap"])).max() < 1e-6
    assert abs(ours["mAP"] - ref["mAP"]) < 1e-6 and ours["convergence_warnings"] == 0


def test_gradient_bound_is_an_upper_bound():
    rng = np.random.default_rng(7)
    _, gram, fam = _families(rng, 200, 30, 6)
    beta = torch.from_numpy(rng.normal(size=(6, 200))) * (fam.d > 0)
    out = gram.matvec(beta, fam.group)
    s = 2 * 0.5 * fam.d
    bound, wn, _ = svm_solver._gradient_norms(gram, beta, out, fam.y, s, fam.group, torch.zeros(6, dtype=torch.bool),
                                              1e-7)
    exact, wn2, _ = svm_solver._gradient_norms(gram, beta, out, fam.y, s, fam.group, torch.ones(6, dtype=torch.bool),
                                               1e-7)
    assert (bound >= exact * (1 - 1e-12)).all() and torch.equal(wn, wn2) and (exact > 0).all()


def test_families_solved_side_by_side_match_one_solve():
    rng = np.random.default_rng(8)
    _, gram, fam = _families(rng, 400, 60, 7)
    costs = torch.tensor([0.5**10, 0.0625, 1.0, 10.0, 100.0], dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parts = svm_solver._solve_in_parts(gram, fam, costs, svm_solver.SolverSettings(), None, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    whole = svm_solver._solve_families(gram, fam, costs, svm_solver.SolverSettings())
    assert parts.converged.all() and whole.converged.all() and (parts.stage == 2).any()
    scale = whole.out.abs().max()
    assert (parts.out - whole.out).abs().max() <= 1e-10 * scale
    assert torch.equal(parts.stage, whole.stage)


# ----------------------------------------------------------------------------------- full protocol


def test_full_protocol_matches_liblinear(data):
    cfg = SVMConfig(costs=COSTS, workers=1, **TIGHT)
    ref = voc_svm.train_and_test_svm(*data, cfg, progress=False)
    ours = train_and_test_svm_batched(*data, cfg, progress=False)
    assert set(ref) <= set(ours) and ours["solver"] == "batched" and ours["device"] == "cpu"
    assert ours["chosen_cost_index"] == ref["chosen_cost_index"]
    assert np.abs(np.array(ours["cv_ap"]) - np.array(ref["cv_ap"])).max() < 1e-6
    for name in ref["ap"]:
        assert abs(ours["ap"][name] - ref["ap"][name]) < 1e-6
    assert abs(ours["mAP"] - ref["mAP"]) < 1e-6
    assert ours["fits"] == ref["fits"] and ours["convergence_warnings"] == 0
    assert ours["solver_diagnostics"]["max_rel_grad"] <= svm_solver.DEFAULT_TOL * 1e3
    assert all({"class", "costs", "cv_ap"} <= set(t) for t in ours["ties"])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_class_without_positives_in_a_validation_fold(data):
    train_x, train_y, test_x, test_y = data
    train_y = train_y.copy()
    train_y[:, 2] = np.where(train_y[:, 2] == 1, 0, train_y[:, 2])
    train_y[[7, 100], 2] = 1  # two positives, three folds: one validation fold has none (sklearn warns)
    cfg = SVMConfig(costs=(1.0, 0.0625), workers=1, **TIGHT)
    ref = voc_svm.train_and_test_svm(train_x, train_y, test_x, test_y, cfg, progress=False)
    ours = train_and_test_svm_batched(train_x, train_y, test_x, test_y, cfg, progress=False)
    assert np.allclose(np.array(ours["cv_ap"]), np.array(ref["cv_ap"]), atol=1e-6, equal_nan=True)
    assert ours["chosen_cost_index"] == ref["chosen_cost_index"]
    assert abs(ours["mAP"] - ref["mAP"]) < 1e-6
    assert ours["other_warnings"] == ref["other_warnings"] and ours["other_warnings"]

    train_y[100, 2] = 0  # one positive: the fold that validates on it trains without; liblinear cannot, nor do we
    with pytest.raises(ValueError, match="at least 2 classes"):
        voc_svm.train_and_test_svm(train_x, train_y, test_x, test_y, cfg, progress=False)
    with pytest.raises(SVMInputError, match=r"class 'class2': CV fold \d of 3 trains on one label only"):
        train_and_test_svm_batched(train_x, train_y, test_x, test_y, cfg, progress=False)


def test_ties_are_reported():
    cv = np.array([[0.5, 0.50005, 0.1], [0.9, 0.2, 0.3]])
    ties = svm_solver._ties(cv, ["a", "b"], (1.0, 10.0, 100.0))
    assert ties == [{"class": "a", "costs": [10.0, 1.0], "cv_ap": [0.50005, 0.5]}]


# ------------------------------------------------------------------------------------------ low-shot


def test_low_shot_matches_liblinear(data):
    cfg = LowShotConfig(ks=(1, 2), samples=2, costs=(1.0, 0.0625, 10.0), seed=3, workers=1, **TIGHT)
    ref = voc_svm.run_low_shot(*data, cfg, progress=False)
    ours = run_low_shot_batched(*data, cfg, progress=False)
    assert set(ref) <= set(ours) and ours["solver"] == "batched"
    assert np.abs(np.array(ours["test_map"]) - np.array(ref["test_map"])).max() < 1e-6
    for a, b in zip(ours["per_k"], ref["per_k"], strict=True):
        assert a["cost_index"] == b["cost_index"]
        for stat in ("mean", "min", "max", "std"):
            assert a[stat] == pytest.approx(b[stat], abs=1e-6)


def test_low_shot_shared_gram_path_matches_blocks(data, monkeypatch):
    cfg = LowShotConfig(ks=(2,), samples=1, costs=(1.0, 0.0625), seed=1, workers=1)
    blocks = run_low_shot_batched(*data, cfg, progress=False)
    monkeypatch.setattr(svm_solver, "_use_blocks", lambda rows, total: False)
    shared = run_low_shot_batched(*data, cfg, progress=False)
    assert np.abs(np.array(blocks["test_map"]) - np.array(shared["test_map"])).max() < 1e-9


# --------------------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_error(data):
    train_x, train_y, test_x, test_y = data
    broken = train_x.copy()
    broken[3, 4] = np.nan
    cases = [
        (lambda: train_and_test_svm_batched(broken, train_y, test_x, test_y, SVMConfig(costs=(1.0,)), False),
         "NaN or infinity"),
        (lambda: train_and_test_svm_batched(*data, SVMConfig(costs=(1.0, 0.0)), False), "positive numbers"),
        (lambda: run_low_shot_batched(*data, LowShotConfig(ks=(1,), samples=1, costs=(-1.0,)), False),
         "positive numbers"),
        (lambda: check_solver("libliner"), "unknown SVM solver 'libliner'"),
        (lambda: resolve_solver_device("tpu"), "unsupported solver device|unknown solver device"),
        (lambda: solve_squared_hinge(np.ones((3, 2)), np.array([[1, -1, 2]]), [1.0]), "labels in"),
    ]
    for call, message in cases:
        with pytest.raises(SVMInputError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
    assert check_solver("liblinear") == "liblinear" and check_solver("batched") == "batched"
    assert resolve_solver_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line_error(data):
    with pytest.raises(SVMInputError, match="CUDA is not available") as error:
        train_and_test_svm_batched(*data, SVMConfig(costs=(1.0,)), False, device="cuda")
    assert "\n" not in str(error.value)
