"""Weighted k-NN (spec protocols.md §3): the FAISS/log-vote implementation against the plain formula."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import subject_of

from baselines.backbone import create_backbone
from protocols import knn
from protocols.knn import KNNConfig, knn_classify


def brute_force(train, train_labels, test, test_labels, k, temperature, num_classes):
    """§3.1 literally, in float64: normalise, cosine top-k, sum exp(s/T) per class, rank the votes."""
    train = train.astype(np.float64)
    test = test.astype(np.float64)
    train /= np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
    test /= np.maximum(np.linalg.norm(test, axis=1, keepdims=True), 1e-12)
    top1 = top5 = 0
    for query, label in zip(test, test_labels, strict=True):
        sims = train @ query
        neighbours = np.argsort(-sims, kind="stable")[:k]
        scores = np.zeros(num_classes)
        for j in neighbours:
            scores[train_labels[j]] += np.exp(sims[j] / temperature)
        order = np.argsort(-scores, kind="stable")  # ties: lower class index first
        top1 += order[0] == label
        top5 += label in order[: min(5, k)] and scores[label] > 0
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


def clustered(rng, rows, classes, dims, centres, noise=1.0):
    labels = rng.integers(0, classes, rows)
    return (centres[labels] + noise * rng.standard_normal((rows, dims))).astype(np.float32), labels


@pytest.fixture(scope="module")
def random_split():
    rng = np.random.default_rng(0)
    classes, dims = 12, 24
    centres = rng.standard_normal((classes, dims)) * 0.8
    train, train_labels = clustered(rng, 600, classes, dims, centres)
    test, test_labels = clustered(rng, 150, classes, dims, centres)
    return train, train_labels, test, test_labels, classes


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_matches_brute_force_formula(random_split, temperature):
    train, train_labels, test, test_labels, classes = random_split
    ks = (1, 3, 10, 20, 100)
    metrics = knn_classify(train, train_labels, test, test_labels, ks=ks, temperature=temperature, num_classes=classes)
    for k in ks:
        top1, top5 = brute_force(train, train_labels, test, test_labels, k, temperature, classes)
        assert metrics[f"top1@k={k}"] == pytest.approx(top1, abs=1e-9), k
        assert metrics[f"top5@k={k}"] == pytest.approx(top5, abs=1e-9), k
    assert 100 / classes < metrics["top1@k=20"] < 100  # informative data, not a degenerate case


def test_no_overflow_where_float32_reference_overflows(random_split):
    train, train_labels, test, test_labels, classes = random_split
    temperature = 0.005  # 1/T = 200: exp(s/T) overflows float32 (max ~exp(88.7)) but not float64
    with np.errstate(over="ignore"):
        assert np.isinf(np.exp(np.float32(0.9) / np.float32(temperature)))
    metrics = knn_classify(train, train_labels, test, test_labels, ks=(5, 20), temperature=temperature,
                           num_classes=classes)
    for k in (5, 20):
        top1, top5 = brute_force(train, train_labels, test, test_labels, k, temperature, classes)
        assert metrics[f"top1@k={k}"] == pytest.approx(top1, abs=1e-9)
        assert metrics[f"top5@k={k}"] == pytest.approx(top5, abs=1e-9)


def test_tiny_temperature_is_finite_nearest_neighbour_vote():
    # At T=1e-4 even float64 exp overflows; the vote must reduce to "class of the nearest neighbour".
    rng = np.random.default_rng(1)
    train = rng.standard_normal((200, 16)).astype(np.float32)
    labels = rng.integers(0, 5, 200)
    test = train[:50] + 1e-3 * rng.standard_normal((50, 16)).astype(np.float32)
    metrics = knn_classify(train, labels, test, labels[:50], ks=(10,), temperature=1e-4, num_classes=5)
    assert metrics["top1@k=10"] == 100.0


def test_top5_counts_only_voted_classes():
    # Two classes in the bank, the query's true class (4) has no neighbour: never a top-5 hit.
    train = np.eye(4, dtype=np.float32)[[0, 0, 1, 1]]
    labels = np.array([0, 0, 1, 1])
    test = np.ones((1, 4), dtype=np.float32)
    metrics = knn_classify(train, labels, test, [4], ks=(4,), num_classes=10)
    assert metrics == {"top1@k=4": 0.0, "top5@k=4": 0.0}
    metrics = knn_classify(train, labels, test, [1], ks=(4,), num_classes=10)
    assert metrics["top5@k=4"] == 100.0


def test_chunked_equals_unchunked(random_split):
    train, train_labels, test, test_labels, classes = random_split
    whole = knn_classify(train, train_labels, test, test_labels, ks=(1, 10, 50), num_classes=classes)
    chunked = knn_classify(train, train_labels, test, test_labels, ks=(1, 10, 50), num_classes=classes,
                           bank_chunk_rows=37, query_chunk_rows=16)
    assert chunked == whole


def test_memmap_bank_is_read_not_copied_or_changed(random_split, tmp_path):
    train, train_labels, test, test_labels, _ = random_split
    bank = np.lib.format.open_memmap(tmp_path / "bank.npy", mode="w+", dtype=np.float32, shape=train.shape)
    bank[:] = train
    bank.flush()
    bank = np.load(tmp_path / "bank.npy", mmap_mode="r")
    assert knn_classify(bank, train_labels, test, test_labels, ks=(10,)) == knn_classify(
        train, train_labels, test, test_labels, ks=(10,))
    np.testing.assert_array_equal(bank, train)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"ks": (10, 600)}, "larger than the bank"),
        ({"ks": (0,)}, "positive"),
        ({"train_labels": np.zeros(5, dtype=int)}, "labels"),
        ({"test_labels": np.zeros(3, dtype=int)}, "labels"),
        ({"train_features": np.zeros((0, 24), np.float32), "train_labels": np.zeros(0, int)}, "empty"),
        ({"test_features": np.zeros((2, 7), np.float32), "test_labels": [0, 1]}, "-d"),
        ({"num_classes": 3}, r"\[0, 3\)"),
    ],
)
def test_bad_inputs_raise_one_line_errors(change, message):
    rng = np.random.default_rng(0)
    args = {
        "train_features": rng.standard_normal((100, 24)).astype(np.float32), "train_labels": rng.integers(0, 5, 100),
        "test_features": rng.standard_normal((10, 24)).astype(np.float32), "test_labels": rng.integers(0, 5, 10),
        "ks": (10,), "temperature": 0.07,
    }
    args.update(change)
    with pytest.raises(ValueError, match=message) as err:
        knn_classify(**args)
    assert "\n" not in str(err.value)


def test_run_end_to_end_on_synthetic_voc(voc_root, tmp_path):
    subject = subject_of(create_backbone("resnet18"))
    cfg = KNNConfig(ks=(1, 5, 10), batch_size=16, workers=0, device="cpu", cache_dir=str(tmp_path / "features"))
    result = knn.run(subject, voc_root, cfg, progress=False)
    assert result.protocol == "knn_in1k"
    assert set(result.metrics) == {f"top{t}@k={k}" for t in (1, 5) for k in (1, 5, 10)}
    assert all(0.0 <= v <= 100.0 for v in result.metrics.values())
    assert result.config["train_split"] == "trainval" and result.config["test_split"] == "test"
    assert result.dataset["splits"] == {"trainval": result.details["bank_rows"], "test": result.details["query_rows"]}
    assert result.details["feature_dim"] == 512
    assert result.checkpoint["format"] == "random-init"
    # The second run reads the cached features and gives the same numbers.
    again = knn.run(subject, voc_root, cfg, progress=False)
    assert again.metrics == result.metrics
    assert again.timings["features_train"] < result.timings["features_train"]
    readings = knn.measurements(result)
    assert {(r.protocol_id, r.metric, r.layer, r.k) for r in readings} == {
        ("knn_in1k", f"top{t}", "feature5", k) for t in (1, 5) for k in (1, 5, 10)}
