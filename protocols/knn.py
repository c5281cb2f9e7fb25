"""Weighted k-NN classification on frozen global-average-pooled features (spec protocols.md §3).

The reference (InstDisc -> DINO -> MMSelfSup) votes with `exp(s/T)` in float32, which overflows
for T below ~0.0113, and its top-5 depends on zero-vote padding classes (§3.3). Here the vote of
each class is kept as a log-sum-exp in float64, so the ranking equals the reference wherever the
reference is finite and stays exact where it overflows; top-5 only counts classes that received
a vote, which is what the reference does at `num_classes=1000`.

Memory: the bank is streamed through FAISS in row chunks (each chunk L2-normalised on the fly,
searched with `faiss.knn`, the exhaustive inner-product search behind `IndexFlatIP`) and the
partial top-k lists are merged in a `faiss.ResultHeap`. No full copy of the bank is ever made, so
a 1.28M x 2048 float32 bank (10.5 GB) that lives on disk as the feature cache's memmap needs well
under 1 GB of RAM besides the page cache.

Under torchrun the ranks share the feature extraction and the queries (`query_units`), and gather the
neighbour lists back in query order, so the result has the same bits as one process's.

FAISS, torch and the datasets are imported by the functions that use them, so the declaration below
(and `densecl-bench eval knn_in1k --help`) needs none of them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from baselines.backbone_names import FEATURE_NAMES
from baselines.config import ConfigError, option
from protocols.registry import Protocol, Reading, synthetic_voc
from protocols.result import ProtocolResult

if TYPE_CHECKING:
    from baselines.distributed import Distributed
    from protocols.datasets.classification import ClassificationSplit

DEFAULT_KS = (10, 20, 100, 200)
NORM_EPS = 1e-12  # F.normalize's eps (§3.1)


def l2_normalise(rows: np.ndarray) -> np.ndarray:
    """`f / max(||f||, 1e-12)` as a new float32 array (the input, often a memmap, is left alone)."""
    rows = np.array(rows, dtype=np.float32, copy=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    rows /= np.maximum(norms, NORM_EPS)
    return rows


def _check_inputs(train_features, train_labels, test_features, test_labels, ks, temperature) -> list[int]:
    if not temperature > 0:
        raise ConfigError(f"k-NN temperature must be > 0, got {temperature}")
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(f"features must be 2-d (rows, dims); got bank {train_features.shape}, "
                         f"queries {test_features.shape}")
    if len(train_features) == 0:
        raise ValueError("the k-NN bank (train features) is empty")
    if len(test_features) == 0:
        raise ValueError("there are no k-NN queries (test features)")
    if len(train_features) != len(train_labels):
        raise ValueError(f"bank has {len(train_features)} rows but {len(train_labels)} labels")
    if len(test_features) != len(test_labels):
        raise ValueError(f"queries have {len(test_features)} rows but {len(test_labels)} labels")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"bank has {train_features.shape[1]}-d features but queries {test_features.shape[1]}-d")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ConfigError(f"k values must be positive integers, got {ks}")
    if ks[-1] > len(train_features):
        raise ConfigError(f"k={ks[-1]} is larger than the bank ({len(train_features)} rows)")
    return ks


def query_units(queries: int, chunk_rows: int, world_size: int, block_rows: int) -> list[tuple[int, int]]:
    """The (start, stop) query ranges searched in one FAISS call each, in query order.

    One process searches whole chunks of `chunk_rows`. Under torchrun each chunk is cut further, at multiples of
    FAISS's own query block (`block_rows`, its BLAS block) from the chunk's start, with the tail shorter than a
    block kept in the last piece: FAISS then runs the very same BLAS calls for every query as on the whole chunk,
    so each query's neighbours and similarities have the same bits (tests/test_knn.py checks this).
    """
    units = []
    for c0 in range(0, queries, chunk_rows):
        c1 = min(c0 + chunk_rows, queries)
        if world_size == 1:
            units.append((c0, c1))
            continue
        cuts = list(range(c0, c1 - block_rows + 1, block_rows)) or [c0]
        units.extend(zip(cuts, [*cuts[1:], c1], strict=True))
    return units


def _search(train_features: np.ndarray, queries: np.ndarray, k: int, bank_chunk_rows: int,
            bar) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of already normalised `queries` over the whole bank, streamed in chunks: (rows, k) each."""
    import faiss

    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for b0 in range(0, len(train_features), bank_chunk_rows):
        bank = l2_normalise(train_features[b0 : b0 + bank_chunk_rows])
        # Same kernel as IndexFlatIP.search, without copying the chunk into an index.
        sims, ids = faiss.knn(queries, bank, min(k, len(bank)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(sims, ids + b0)
        del bank
        bar.update()
    heap.finalize()  # sorts each row best first
    return heap.D, heap.I


def nearest_neighbours(
    train_features: np.ndarray,
    test_features: np.ndarray,
    k: int,
    bank_chunk_rows: int = 32768,
    query_chunk_rows: int = 65536,
    progress: bool = False,
    ranks: Distributed | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and bank indices of the top-k neighbours, best first: (Q, k) each.

    With `ranks` (torchrun), the query units are dealt out in turn (unit i to rank i mod N) and gathered back
    in query order on every rank.
    """
    import faiss
    from tqdm.auto import tqdm

    world, rank = (ranks.world_size, ranks.rank) if ranks is not None else (1, 0)
    n, q = len(train_features), len(test_features)
    units = query_units(q, query_chunk_rows, world, faiss.cvar.distance_compute_blas_query_bs)
    mine = units[rank::world]
    bar = tqdm(total=len(range(0, n, bank_chunk_rows)) * len(mine), desc="k-NN search", unit="chunk",
               disable=not progress, dynamic_ncols=True)
    found = [_search(train_features, l2_normalise(test_features[start:stop]), k, bank_chunk_rows, bar)
             for start, stop in mine]
    bar.close()
    parts = ranks.all_gather_object(found) if ranks is not None else [found]
    similarities = np.empty((q, k), dtype=np.float32)
    indices = np.empty((q, k), dtype=np.int64)
    for i, (start, stop) in enumerate(units):  # unit i was rank (i mod N)'s (i div N)-th
        similarities[start:stop], indices[start:stop] = parts[i % world][i // world]
    return similarities, indices


def class_log_votes(similarities: np.ndarray, neighbour_labels: np.ndarray, temperature: float,
                    num_classes: int) -> np.ndarray:
    """log score(c) = log sum_{j in N, y_j = c} exp(s_j / T), per query; -inf where c got no vote.

    Each class's own largest s/T is factored out before exp (float64), so no term overflows and
    the largest term of every voted class is exactly 1: a class with a neighbour always has a
    finite, positive vote, as in exact arithmetic (§3.1 formula, §3.3 overflow quirk).
    """
    q, k = similarities.shape
    logits = similarities.astype(np.float64) / temperature
    rows = np.repeat(np.arange(q), k)
    cols = neighbour_labels.reshape(-1)
    class_max = np.full((q, num_classes), -np.inf)
    np.maximum.at(class_max, (rows, cols), logits.reshape(-1))
    weights = np.exp(logits.reshape(-1) - class_max[rows, cols])
    sums = np.bincount(rows * num_classes + cols, weights=weights, minlength=q * num_classes).reshape(q, num_classes)
    with np.errstate(divide="ignore"):
        return class_max + np.log(sums)


def label_ranks(log_votes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each true label in its query's vote order; ties go to the lower class index."""
    true = log_votes[np.arange(len(labels)), labels][:, None]
    classes = np.arange(log_votes.shape[1])[None, :]
    ahead = (log_votes > true) | ((log_votes == true) & (classes < labels[:, None]))
    return ahead.sum(axis=1)


def knn_classify(
    train_features: np.ndarray,
    train_labels: Sequence[int] | np.ndarray,
    test_features: np.ndarray,
    test_labels: Sequence[int] | np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    bank_chunk_rows: int = 32768,
    query_chunk_rows: int = 65536,
    progress: bool = False,
    ranks: Distributed | None = None,
) -> dict[str, float]:
    """Weighted k-NN top-1/top-5 (x100) for every k: `{"top1@k=20": ..., "top5@k=20": ...}`.

    One search at the largest k; smaller k reuse the first columns of its sorted neighbour lists. Under
    torchrun (`ranks`) the queries are shared out and every rank computes the same metrics from all of them.
    """
    ks = _check_inputs(train_features, train_labels, test_features, test_labels, ks, temperature)
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    lowest, highest = int(min(train_labels.min(), test_labels.min())), int(max(train_labels.max(), test_labels.max()))
    num_classes = highest + 1 if num_classes is None else int(num_classes)
    if lowest < 0 or highest >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}); got {lowest}..{highest}")
    if bank_chunk_rows < 1 or query_chunk_rows < 1:
        raise ValueError("chunk sizes must be positive")
    similarities, indices = nearest_neighbours(train_features, test_features, ks[-1], bank_chunk_rows,
                                               query_chunk_rows, progress, ranks)
    neighbour_labels = train_labels[indices]
    top1 = {k: 0 for k in ks}
    top5 = {k: 0 for k in ks}
    vote_rows = max(1, (1 << 24) // num_classes)  # bounds the (rows, classes) float64 vote matrix
    for r0 in range(0, len(test_labels), vote_rows):
        rows = slice(r0, r0 + vote_rows)
        for k in ks:
            log_votes = class_log_votes(similarities[rows, :k], neighbour_labels[rows, :k], temperature, num_classes)
            ranks = label_ranks(log_votes, test_labels[rows])
            voted = np.isfinite(log_votes[np.arange(len(ranks)), test_labels[rows]])
            top1[k] += int((ranks == 0).sum())
            top5[k] += int(((ranks < min(5, k)) & voted).sum())  # §3.3: only classes with a vote count
    n = len(test_labels)
    metrics = {}
    for k in ks:
        metrics[f"top1@k={k}"] = 100.0 * top1[k] / n
        metrics[f"top5@k={k}"] = 100.0 * top5[k] / n
    return metrics


@dataclass
class KNNConfig:
    ks: tuple[int, ...] = option(DEFAULT_KS, "neighbour counts")
    temperature: float = option(0.07, "T of the vote exp(s/T)")
    train_split: str | None = option(None, "bank split (default: train, or trainval on a VOC root)")
    test_split: str | None = option(None, "query split (default: val, or test on a VOC root)")
    layer: str = option("feature5", "stage whose global-average-pooled features are compared", choices=FEATURE_NAMES)
    batch_size: int = option(256, "images per feature-extraction batch")
    workers: int = option(2, "data-loading processes")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    bank_chunk_rows: int = option(32768, "bank rows searched at once (bounds memory)")
    query_chunk_rows: int = option(65536, "queries searched at once")
    cache_dir: str | None = option(None, "feature cache folder (default: $DENSECL_BENCH_CACHE/features)")


def split_features(subject, split: ClassificationSplit, layer: str, cfg: KNNConfig, progress: bool) -> np.ndarray:
    from protocols.common import resolve_device
    from protocols.datasets.classification import LabeledImages
    from protocols.features import cached_features, center_crop_transform

    root = Path(split.root)
    ids = [os.path.relpath(path, root) for path, _ in split.samples]
    key = {"weights": subject.cache_id, "dataset": split.fingerprint(), "transform": "resize256-centercrop224"}
    features, _ = cached_features(
        subject.backbone, LabeledImages(split.samples, center_crop_transform()), split.name, [layer], "gap", key,
        np.asarray(split.labels, dtype=np.int64), ids, cache_dir=cfg.cache_dir, batch_size=cfg.batch_size,
        workers=cfg.workers, device=resolve_device(cfg.device), progress=progress,
    )
    return features[layer]


def run(subject, data: str | os.PathLike, cfg: KNNConfig, *, work_dir=None, progress: bool = True) -> ProtocolResult:
    """Bank = GAP `cfg.layer` features of the train split, queries = the test split (§3.1); work_dir is unused.

    Under torchrun the ranks share the feature extraction and the queries; every rank returns the same result.
    """
    from baselines.distributed import Distributed
    from protocols.common import resolve_device
    from protocols.datasets.classification import check_same_classes, dataset_info, default_splits, load_split

    default_train, default_test = default_splits(data)
    resolved = KNNConfig(**{**asdict(cfg), "train_split": cfg.train_split or default_train,
                            "test_split": cfg.test_split or default_test, "ks": tuple(cfg.ks)})
    train = load_split(data, resolved.train_split)
    test = load_split(data, resolved.test_split)
    check_same_classes(train, test)
    timings = {}
    start = time.perf_counter()
    bank = split_features(subject, train, resolved.layer, resolved, progress)
    timings["features_train"] = time.perf_counter() - start
    start = time.perf_counter()
    queries = split_features(subject, test, resolved.layer, resolved, progress)
    timings["features_test"] = time.perf_counter() - start
    start = time.perf_counter()
    metrics = knn_classify(
        bank, train.labels, queries, test.labels, ks=resolved.ks, temperature=resolved.temperature,
        num_classes=len(train.classes), bank_chunk_rows=resolved.bank_chunk_rows,
        query_chunk_rows=resolved.query_chunk_rows, progress=progress,
        ranks=Distributed(str(resolve_device(resolved.device))),
    )
    timings["knn"] = time.perf_counter() - start
    config = {**asdict(resolved), "arch": subject.backbone.name, "pooling": "gap", "num_classes": len(train.classes),
              "transform": "Resize(256) + CenterCrop(224) + ImageNet normalisation"}
    return ProtocolResult(
        protocol="knn_in1k", metrics=metrics, config=config, dataset=dataset_info(data, [train, test]),
        checkpoint=subject.info, timings=timings,
        details={"bank_rows": len(train), "query_rows": len(test), "feature_dim": int(bank.shape[1]),
                 "tie_break": "lower class index first", "top5": "only classes with a positive vote"},
    )


def measurements(result: ProtocolResult) -> list[Reading]:
    """`top1@k=K` -> (knn_in1k, layer, k=K, top1), and top5 likewise."""
    readings = []
    layer = result.config.get("layer", "feature5")
    for name, value in result.metrics.items():
        metric, _, k = name.partition("@k=")
        if value is not None and metric in ("top1", "top5") and k.isdigit():
            readings.append(Reading("knn_in1k", metric, value, layer=layer, k=int(k)))
    return readings


KNN_IN1K = Protocol(
    name="knn_in1k", summary="weighted k-NN on global-average-pooled res5 features via FAISS (spec §3)",
    description="Weighted k-NN: L2-normalised GAP features of the last stage (Resize 256, CenterCrop 224), FAISS "
    "inner-product search over the train split, votes sum exp(s/T) (computed without overflow), top-1/top-5 on the "
    "val split. Data: an ImageNet-style folder (train/<class>/*, val/<class>/*), meta/{train,val}_labeled.txt list "
    "files, or a VOC root (each image labelled by its largest object). Without --data: the synthetic VOC set.",
    metrics=('top1', 'top5'), config=KNNConfig, body=run, measurements=measurements, default_data=synthetic_voc,
    aliases=("knn",), torchrun=True)
