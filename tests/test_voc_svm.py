"""VOC07 SVM protocols (spec protocols.md §1.4-§1.7, §7) on small feature arrays."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score
from sklearn.model_selection import cross_val_score
from sklearn.svm import LinearSVC

from protocols import voc_svm
from protocols.voc_svm import (
    DEFAULT_COSTS,
    LowShotConfig,
    SVMConfig,
    SVMInputError,
    evaluate_layers,
    interpolated_ap,
    low_shot_samples,
    read_fair_samples,
    run_low_shot,
    train_and_test_svm,
    write_fair_samples,
)

FEW_COSTS = (1.0, 0.0625, 100.0)


def eleven_point_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """VOC2007's 11-point AP, only to show the protocol's AP is a different formula."""
    order = np.argsort(scores)[::-1]
    tp = np.cumsum(labels[order] > 0)
    precision, recall = tp / np.arange(1, len(tp) + 1), tp / tp[-1]
    return float(np.mean([precision[recall >= t].max(initial=0.0) for t in np.linspace(0, 1, 11)]))


def literal_reference_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """§1.5 step by step with explicit loops."""
    order = np.argsort(scores)[::-1]
    tp = (labels[order] > 0).astype(float)
    fp = 1 - tp
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    mrec = [0.0, *(tp / tp[-1]), 1.0]
    mpre = [0.0, *(tp / (tp + fp)), 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def multilabel(rng: np.random.Generator, rows: int, classes: int, difficult: float = 0.05) -> np.ndarray:
    labels = (rng.random((rows, classes)) < 0.3).astype(np.int32)
    labels[:classes * 3] = np.tile(np.eye(classes, dtype=np.int32), (3, 1))  # >= 3 positives per class
    labels[(labels == 0) & (rng.random((rows, classes)) < difficult)] = -1
    return labels


def features_for(rng: np.random.Generator, labels: np.ndarray, dims: int, signal: float) -> np.ndarray:
    """Noise plus `signal` on dim c for the rows where class c is present."""
    x = rng.normal(size=(len(labels), dims))
    x[:, : labels.shape[1]] += signal * (labels == 1)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def separable():
    rng = np.random.default_rng(0)
    train_y, test_y = multilabel(rng, 200, 3), multilabel(rng, 200, 3)
    return features_for(rng, train_y, 32, 8.0), train_y, features_for(rng, test_y, 32, 8.0), test_y


@pytest.fixture(scope="module")
def noisy():
    rng = np.random.default_rng(1)
    train_y, test_y = multilabel(rng, 200, 3), multilabel(rng, 200, 3)
    return features_for(rng, train_y, 32, 0.7), train_y, features_for(rng, test_y, 32, 0.7), test_y


# ----------------------------------------------------------------------------------------------- AP


def test_ap_hand_worked():
    # P = 1, 1/2, 2/3, 1/2 at R = 1/2, 1/2, 1, 1 -> 1/2 * 1 + 1/2 * 2/3
    assert interpolated_ap(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    assert interpolated_ap(np.array([3.0, 2.0, 1.0]), np.array([1, 1, 0])) == 1.0


def test_ap_interpolates_precision_unlike_sklearn():
    scores, labels = np.array([0.9, 0.8, 0.7]), np.array([0, 1, 1])
    # envelope precision 2/3 over the whole recall range; sklearn's step sum gives 1/2*1/2 + 1/2*2/3
    assert interpolated_ap(scores, labels) == pytest.approx(2 / 3)
    assert average_precision_score(labels, scores) == pytest.approx(7 / 12)


def test_ap_differs_from_11_point():
    scores, labels = np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 0, 1])
    assert interpolated_ap(scores, labels) == pytest.approx(0.75)  # 1/2 * 1 + 1/2 * 1/2
    assert eleven_point_ap(scores, labels) == pytest.approx(8.5 / 11)  # 6 points at 1, 5 at 1/2


def test_ap_ties_follow_reversed_argsort():
    tied = np.array([0.5, 0.5])
    # argsort([.5, .5]) = [0, 1]; reversed, row 1 ranks first
    assert interpolated_ap(tied, np.array([1, 0])) == pytest.approx(0.5)
    assert interpolated_ap(tied, np.array([0, 1])) == 1.0
    rng = np.random.default_rng(3)
    scores, labels = rng.integers(0, 4, 300).astype(float), rng.integers(0, 2, 300)
    assert interpolated_ap(scores, labels) == pytest.approx(literal_reference_ap(scores, labels), abs=1e-15)


def test_ap_without_positives_is_nan_and_minus_one_counts_as_negative():
    assert np.isnan(interpolated_ap(np.array([0.3, 0.1]), np.array([0, 0])))
    assert np.isnan(interpolated_ap(np.array([]), np.array([])))
    assert interpolated_ap(np.array([0.9, 0.1]), np.array([-1, 1])) == 0.5


def test_cv_average_precision_is_sklearns_bit_for_bit():
    rng = np.random.default_rng(5)
    for trial in range(400):
        n = int(rng.integers(2, 300))
        labels = np.where(rng.random(n) < rng.random(), 1, -1)
        scores = rng.normal(size=n)
        if trial % 3 == 0:
            scores = np.round(scores, 1)  # ties, grouped into one threshold by sklearn
        if trial % 11 == 0:
            scores[:] = 0.25
        ours = voc_svm.cv_average_precision(labels, scores)
        if not (labels == 1).any():
            assert ours is None  # sklearn warns and defines that case itself
            continue
        assert ours == average_precision_score(labels, scores)


def test_ap_rejects_bad_input():
    with pytest.raises(SVMInputError, match="one label per score"):
        interpolated_ap(np.zeros(3), np.zeros(2))
    with pytest.raises(SVMInputError, match="non-finite"):
        interpolated_ap(np.array([np.nan, 1.0]), np.array([1, 0]))


# ----------------------------------------------------------------------------------------- full SVM


def test_reference_cost_list():
    assert len(DEFAULT_COSTS) == 19
    assert DEFAULT_COSTS[:4] == (1.0, 10.0, 100.0, 0.0625) and DEFAULT_COSTS[-1] == 0.5**19


def test_separable_data_gives_map_100_and_tables(separable):
    result = train_and_test_svm(*separable, SVMConfig(costs=FEW_COSTS, workers=1), progress=False)
    assert result["mAP"] == 100.0 and all(ap == 100.0 for ap in result["ap"].values())
    assert result["classes"] == ["class0", "class1", "class2"]
    assert np.array(result["cv_ap"]).shape == (3, len(FEW_COSTS))
    assert len(result["chosen_cost_index"]) == 3
    for c, name in enumerate(result["classes"]):
        j = result["chosen_cost_index"][c]
        assert result["chosen_cost"][name] == FEW_COSTS[j]
        assert j == int(np.argmax(result["cv_ap"][c]))  # first maximum wins
    assert result["fits"] == 3 * len(FEW_COSTS) * 3 + 3


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # from the plain loop below
def test_same_numbers_as_the_reference_loop_and_for_any_worker_count(noisy):
    train_x, train_y, test_x, test_y = noisy
    one = train_and_test_svm(*noisy, SVMConfig(costs=FEW_COSTS, workers=1, seed=5), progress=False)
    two = train_and_test_svm(*noisy, SVMConfig(costs=FEW_COSTS, workers=2, seed=5), progress=False)
    assert one["workers"] == 1 and two["workers"] == 2
    for key in ("mAP", "ap", "cv_ap", "chosen_cost", "convergence_warnings"):
        assert one[key] == two[key], key

    # §7 with plain sklearn: cross_val_score picks the cost, difficult rows train as negatives
    # and are dropped at test.
    x_train, x_test = (voc_svm.normalise_features(x) for x in (train_x, test_x))
    c = 1
    y = np.where(train_y[:, c] == 1, 1, -1)
    def make(cost: float) -> LinearSVC:
        return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, dual=True, tol=1e-4, max_iter=2000, random_state=5)

    cv = [cross_val_score(make(cost), x_train, y, cv=3, scoring="average_precision").mean() for cost in FEW_COSTS]
    assert one["cv_ap"][c] == cv
    best = FEW_COSTS[int(np.argmax(cv))]
    scores = make(best).fit(x_train, y).decision_function(x_test)
    keep = test_y[:, c] != -1
    assert one["ap"]["class1"] == 100 * interpolated_ap(scores[keep], test_y[keep, c])


def test_difficult_rows_are_dropped_at_test(separable):
    train_x, train_y, test_x, test_y = separable
    test_x, test_y = test_x.copy(), test_y.copy()
    absent = np.flatnonzero(test_y[:, 0] == 0)[:10]
    test_x[absent, 0] += 8.0  # look like positives ...
    test_y[absent, 0] = -1  # ... but are difficult: ignored, so the ranking stays perfect
    result = train_and_test_svm(train_x, train_y, test_x, test_y, SVMConfig(costs=(1.0,), workers=1), progress=False)
    assert result["ap"]["class0"] == 100.0
    test_y[absent, 0] = 0  # as plain negatives they would cost AP
    result = train_and_test_svm(train_x, train_y, test_x, test_y, SVMConfig(costs=(1.0,), workers=1), progress=False)
    assert result["ap"]["class0"] < 100.0


def test_difficult_rows_train_as_negatives(separable):
    train_x, train_y, test_x, test_y = separable
    train_y = train_y.copy()
    train_y[np.flatnonzero(train_y[:, 0] == 0)[:30], 0] = -1
    result = train_and_test_svm(train_x, train_y, test_x, test_y, SVMConfig(costs=(1.0,), workers=1), progress=False)
    x_train, x_test = (voc_svm.normalise_features(x) for x in (train_x, test_x))
    model = LinearSVC(C=1.0, class_weight={1: 2, -1: 1}, dual=True, max_iter=2000, random_state=0)
    model.fit(x_train, np.where(train_y[:, 0] == 1, 1, -1))  # all rows, -1 stays negative
    keep = test_y[:, 0] != -1
    assert result["ap"]["class0"] == 100 * interpolated_ap(model.decision_function(x_test)[keep], test_y[keep, 0])


def test_convergence_warnings_are_counted_not_shown(noisy):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = SVMConfig(costs=(100.0,), max_iter=1, workers=1)
        result = train_and_test_svm(*noisy, cfg, progress=False)
    assert result["convergence_warnings"] == 3 * 4  # every fit of 3 classes x (3 folds + refit)
    assert not caught


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(train_x=d["train_x"][:-1]), "train features have 199 rows but train labels 200"),
        (lambda d: d.update(test_x=d["test_x"][:, :5]), "train features have 32 dims but test features 5"),
        (lambda d: d["train_y"].__setitem__((slice(None), 2), 0), "class 'class2' has no positive training rows"),
        (lambda d: d["test_y"].__setitem__((slice(None), 1), 0), "class 'class1' has no positive test rows"),
        (lambda d: d["train_y"].__setitem__((0, 0), 2), "may only hold 1"),
        (lambda d: d.update(train_y=d["train_y"][:, :2]), "2 classes but test labels 3"),
    ],
)
def test_bad_input_is_one_line_error(separable, change, message):
    data = dict(zip(("train_x", "train_y", "test_x", "test_y"), (a.copy() for a in separable), strict=True))
    change(data)
    with pytest.raises(SVMInputError, match=message) as error:
        train_and_test_svm(**data, cfg=SVMConfig(costs=(1.0,), workers=1), progress=False)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------- low-shot


def test_low_shot_sampler_invariants(noisy):
    train_y = noisy[1]
    samples = low_shot_samples(train_y, ks=(1, 2, 4), samples=2, seed=7)
    assert sorted(samples) == [(s, k) for s in (1, 2) for k in (1, 2, 4)]
    for (_, k), matrix in samples.items():
        assert matrix.shape == train_y.shape and matrix.dtype == np.int32
        assert ((matrix == 1).sum(axis=0) == k).all() and ((matrix == 0).sum(axis=0) == 19 * k).all()
        assert (train_y[matrix == 1] == 1).all() and (train_y[matrix == 0] == 0).all()  # never a difficult row
    again = low_shot_samples(train_y, ks=(4,), samples=2, seed=7)
    assert all(np.array_equal(again[key], samples[key]) for key in again)  # seeded, subset-independent
    other = low_shot_samples(train_y, ks=(4,), samples=2, seed=8)
    assert not np.array_equal(other[(1, 4)], samples[(1, 4)])
    assert not np.array_equal(samples[(1, 4)], samples[(2, 4)])


def test_low_shot_sampler_refuses_too_few_positives(noisy):
    train_y = noisy[1].copy()
    train_y[7:, 0] = np.where(train_y[7:, 0] == 1, 0, train_y[7:, 0])  # class0 keeps rows 0, 3, 6
    with pytest.raises(SVMInputError, match="class 'class0' has 3 positive training rows, fewer than the 4"):
        low_shot_samples(train_y, ks=(2, 4), samples=1)


def test_fair_sample_files_round_trip_and_validation(noisy, tmp_path):
    train_y = noisy[1]
    samples = low_shot_samples(train_y, ks=(1, 2), samples=2, seed=0)
    paths = write_fair_samples(samples, tmp_path)
    assert paths[0].name == "train_targets_sample1_k1.npy"
    (tmp_path / "notes_v2.npy").write_bytes(b"")  # not a sample name: ignored
    loaded = read_fair_samples(tmp_path, train_y, ks=(1, 2), samples=2)
    assert all(np.array_equal(loaded[key], samples[key]) for key in samples)

    with pytest.raises(SVMInputError, match=r"no file named \*_sample3_k1.npy"):
        read_fair_samples(tmp_path, train_y, ks=(1,), samples=3)
    np.save(tmp_path / "test_targets_sample1_k1.npy", samples[(1, 1)])
    with pytest.raises(SVMInputError, match="2 files"):
        read_fair_samples(tmp_path, train_y, ks=(1,), samples=1)
    (tmp_path / "test_targets_sample1_k1.npy").unlink()
    np.save(tmp_path / "train_targets_sample1_k1.npy", samples[(1, 1)][:-1])
    with pytest.raises(SVMInputError, match="shape"):
        read_fair_samples(tmp_path, train_y, ks=(1,), samples=1)
    np.save(tmp_path / "train_targets_sample1_k1.npy", samples[(1, 2)])
    with pytest.raises(SVMInputError, match="expected 1 and 19"):
        read_fair_samples(tmp_path, train_y, ks=(1,), samples=1)
    np.save(tmp_path / "train_targets_sample1_k1.npy", samples[(1, 1)][::-1])
    with pytest.raises(SVMInputError, match="sorted image-id order"):
        read_fair_samples(tmp_path, train_y, ks=(1,), samples=1)


def test_low_shot_run_matches_plain_fits_files_and_worker_counts(noisy, tmp_path):
    train_x, train_y, test_x, test_y = noisy
    costs = (1.0, 0.0625)
    cfg = LowShotConfig(ks=(1, 2), samples=2, costs=costs, seed=3, workers=1)
    one = run_low_shot(*noisy, cfg, progress=False)
    write_fair_samples(low_shot_samples(train_y, (1, 2), 2, seed=3), tmp_path)
    two = run_low_shot(*noisy, LowShotConfig(ks=(1, 2), samples=2, costs=costs, seed=3, workers=2,
                                             sample_dir=str(tmp_path)), progress=False)
    assert one["test_map"] == two["test_map"] and one["per_k"] == two["per_k"]
    assert "oracle" in one["cost_selection"] and "files" in two["samples_source"]
    test_map = np.array(one["test_map"])
    assert test_map.shape == (2, 2, 2) and one["fits"] == 2 * 2 * 3 * 2

    # sample 2, k=2, cost 0.0625 by hand: fit on the sampled rows only, mean AP over classes
    sample = low_shot_samples(train_y, (2,), 2, seed=3)[(2, 2)]
    x_train, x_test = (voc_svm.normalise_features(x) for x in (train_x, test_x))
    aps = []
    for c in range(3):
        rows = np.flatnonzero(sample[:, c] != -1)
        model = LinearSVC(C=0.0625, class_weight={1: 2, -1: 1}, dual=True, max_iter=2000, random_state=3)
        scores = model.fit(x_train[rows], np.where(sample[rows, c] == 1, 1, -1)).decision_function(x_test)
        keep = test_y[:, c] != -1
        aps.append(interpolated_ap(scores[keep], test_y[keep, c]))
    assert test_map[1, 1, 1] == np.mean(aps)

    for ki, row in enumerate(one["per_k"]):
        by_sample = test_map[:, ki, :]
        j = int(np.argmax(by_sample.mean(axis=0)))
        assert row["cost_index"] == j and row["cost"] == costs[j]
        assert row["mean"] == pytest.approx(100 * by_sample[:, j].mean())
        assert row["std"] == pytest.approx(100 * np.std(by_sample[:, j]))  # ddof=0
        assert row["min"] <= row["mean"] <= row["max"]


# ------------------------------------------------------------------------------------------- layers


def test_evaluate_layers_names_the_best(separable):
    train_x, train_y, test_x, test_y = separable
    rng = np.random.default_rng(9)
    noise = (rng.normal(size=train_x.shape).astype(np.float32), rng.normal(size=test_x.shape).astype(np.float32))
    features = {"feature4": noise, "feature5": (train_x, test_x)}
    result = evaluate_layers(features, train_y, test_y, SVMConfig(costs=(1.0,), workers=1),
                             LowShotConfig(ks=(1,), samples=1, costs=(1.0,), workers=1), progress=False)
    assert result["layers"] == ["feature4", "feature5"]
    assert result["best_layer"] == "feature5" and result["best_score"] == 100.0
    assert set(result["low_shot"]) == {"feature4", "feature5"}
    assert result["svm"]["feature4"]["mAP"] < 100.0
