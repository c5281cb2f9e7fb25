"""Feature extraction, k-NN, the VOC07 SVM and the linear probe under a real 2-process torchrun (gloo, CPU),
each compared with the same command in one process (issue 13).

The one-process runs use one intra-op thread, as every torchrun rank does (OMP_NUM_THREADS=1): CPU convolutions
and FAISS's BLAS sum in another order with more threads, which alone changes the last bits.

- Features and k-NN are bit-identical by construction: the one-process batches (and k-NN query units) are dealt
  out whole to the ranks and gathered back in order, so the cached `.npy` files must match byte for byte.
  Broken once each, by editing the code: every rank extracting rank 0's batches fails the k-NN test (metrics
  68.97 against 100.0 top-5), and every rank searching rank 0's query units fails it too (the gathered units
  no longer cover the queries).
- The linear probe trains the same heads on the same batches with DDP and SyncBN over the ranks
  (`protocols.data_parallel`), which sums in another order: measured here, after 8 steps, heads within 3e-8
  (relative 4e-7), BN running variances within relative 1.1e-7 and epoch losses within 2e-6 (with the
  float64 global-batch BN this module had before the dense protocols' SyncBN replaced it; that one passes
  the same tolerances). The test allows rtol 1e-5 / atol 1e-6 on every tensor of the
  saved state and 1e-4 on the losses. A per-rank BN moves the running variances by ~30%, dropping the
  uneven last batch's weighting moves the weights by ~7e-2 (relative), so both fail it by orders of magnitude.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from torch import nn

from baselines.distributed import Distributed, RankMismatch, TorchrunError
from protocols import linear
from protocols.datasets import synthetic
from protocols.knn import _search, l2_normalise, query_units
from replication.cli import main

RANDOM_RESNET18 = ["--checkpoint", "random", "--arch", "resnet18", "--workers", "0", "--device", "cpu", "--no-progress"]


@contextlib.contextmanager
def one_thread():
    """torch and FAISS on one thread, as each torchrun rank runs."""
    import faiss

    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(faiss_threads)


def stored_result(stdout: str) -> dict:
    """The result.json whose path the command printed (rank 0 alone prints it)."""
    [path] = [line.removeprefix("result: ") for line in stdout.splitlines() if line.startswith("result: ")]
    return json.loads(Path(path).read_text())


def one_process(argv: list[str], capsys) -> dict:
    with one_thread():
        code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return stored_result(captured.out)


def two_ranks(argv: list[str], cwd: Path) -> tuple[dict, str]:
    """The stored result of `torchrun --nproc_per_node 2 -m replication ARGV`, and what the ranks logged."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "replication",
           *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("result: ") == 1  # rank 0 alone stores and prints the result
    result = stored_result(done.stdout)
    assert result["command"][:4] == ["torchrun", "--nproc_per_node", "2", "-m"]
    return result, done.stderr


def interrupt_extraction(cache: Path, split: str, layer: str, done: int) -> None:
    """The cache as an extraction killed after flushing `done` rows leaves it: a partial file (later rows still
    zero) and the resume marker, from the finished features of another run."""
    [features] = cache.glob(f"*/{split}_{layer}.npy")
    rows = np.load(features)
    rows[done:] = 0
    with open(features.with_name(features.name + ".partial"), "wb") as partial:  # np.save(path) would add .npy
        np.save(partial, rows)  # the .npy format open_memmap writes
    features.unlink()
    (features.parent / f"{split}.progress.json").write_text(json.dumps({"layers": [layer], "rows": len(rows),
                                                                        "done": done}))


def cache_files(root: Path) -> dict[str, Path]:
    """The feature cache's files by name (the key folders are the same in both runs: one per split here)."""
    return {p.name: p for folder in root.iterdir() for p in folder.iterdir()}


@pytest.mark.slow
def test_knn_and_its_feature_cache_are_bit_identical_to_one_process(voc_root, tmp_path, capsys):
    # The queries are the bank (each finds itself first, so a misplaced neighbour list shows in top-1 at k=1);
    # 29 images in batches of 4 and query units of 4 give each rank several batches and units, one of them short.
    argv = ["eval", "knn_in1k", *RANDOM_RESNET18, "--data", str(voc_root), "--train-split", "trainval",
            "--test-split", "trainval", "--ks", "1,3,5", "--batch-size", "4", "--query-chunk-rows", "4"]
    single = one_process([*argv, "--cache-dir", str(tmp_path / "one"), "--results", str(tmp_path / "r1")], capsys)
    # The ranks resume an extraction that one process left after 2 batches: rows 8..28 are theirs to compute.
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    interrupt_extraction(tmp_path / "two", "trainval", "feature5", done=8)
    ranks, log = two_ranks([*argv, "--cache-dir", str(tmp_path / "two"), "--results", str(tmp_path / "r2")],
                           tmp_path)
    assert "trainval: resuming an interrupted feature extraction at image 8 of 29" in log
    assert single["metrics"]["top1@k=1"] == 100.0
    assert ranks["metrics"] == single["metrics"]
    one, two = cache_files(tmp_path / "one"), cache_files(tmp_path / "two")
    assert sorted(one) == sorted(two) == ["meta.json", "trainval_feature5.npy", "trainval_ids.json",
                                          "trainval_labels.npy"]  # nothing partial left behind
    for name, path in one.items():
        assert filecmp.cmp(path, two[name], shallow=False), name


@pytest.fixture(scope="module")
def svm_voc(tmp_path_factory):
    """64 images: every class has positives in both trainval (40 images) and test (24)."""
    return synthetic.generate(tmp_path_factory.mktemp("svmvoc") / "VOC2007", images=64, size=64, seed=0,
                              progress=False)


@pytest.mark.slow
def test_voc07_svm_on_features_extracted_by_two_ranks_matches_one_process(svm_voc, tmp_path, capsys):
    argv = ["eval", "voc07_svm", *RANDOM_RESNET18, "--data", str(svm_voc), "--costs", "1.0,0.0625", "--batch-size",
            "16", "--svm-workers", "1"]
    single = one_process([*argv, "--cache-dir", str(tmp_path / "one"), "--results", str(tmp_path / "r1")], capsys)
    ranks, _ = two_ranks([*argv, "--cache-dir", str(tmp_path / "two"), "--results", str(tmp_path / "r2")], tmp_path)
    assert ranks["metrics"] == single["metrics"]
    untimed = [{k: v for k, v in run["details"]["svm"]["feature5"].items() if k != "timings"}
               for run in (single, ranks)]
    assert untimed[0] == untimed[1]  # every class's AP, chosen cost and CV table
    one, two = cache_files(tmp_path / "one"), cache_files(tmp_path / "two")
    assert sorted(one) == sorted(two) and {"trainval_feature5.npy", "test_feature5.npy"} <= set(one)
    for name, path in one.items():
        assert filecmp.cmp(path, two[name], shallow=False), name


@pytest.mark.slow
def test_linear_probe_with_ddp_matches_one_process(voc_root, tmp_path, capsys):
    # 29 images in batches of 8: three batches of 4 + 4 images per rank, and a last one of 5 split 2 + 3.
    argv = ["eval", "linear_in1k_mhead", *RANDOM_RESNET18, "--data", str(voc_root), "--test-split", "trainval",
            "--image-size", "32", "--probe-epochs", "2", "--batch-size", "8", "--lr", "0.01"]
    single = one_process([*argv, "--work-dir", str(tmp_path / "one"), "--results", str(tmp_path / "r1")], capsys)
    ranks, _ = two_ranks([*argv, "--work-dir", str(tmp_path / "two"), "--results", str(tmp_path / "r2")], tmp_path)
    # Top-k hits on 29 images: a logit moved by ~1e-6 could at most flip a near tie, i.e. one image.
    for name, value in single["metrics"].items():
        assert abs(ranks["metrics"][name] - value) <= 100.0 / 29 + 1e-9, name
    one, two = (torch.load(tmp_path / run / "linear_state.pt", weights_only=False) for run in ("one", "two"))
    assert one["state"]["epoch"] == two["state"]["epoch"] == 2
    for name, tensor in one["heads"].items():
        assert torch.allclose(two["heads"][name].double(), tensor.double(), rtol=1e-5, atol=1e-6), name
    for a, b in zip(one["state"]["history"], two["state"]["history"], strict=True):
        assert a["lr"] == b["lr"] and a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["linear_state.pt"]  # rank 0's, no temp files


# ------------------------------------------------------------------------------------------------ in one process


def test_query_units_give_faiss_the_same_blas_calls_as_whole_chunks():
    """Under torchrun a chunk is cut at FAISS's query-block multiples, the short tail kept with the last piece:
    every query's similarities keep their bits (a cut elsewhere, e.g. a 200-row tail searched alone, does not)."""
    import faiss

    rng = np.random.default_rng(0)
    bank = rng.standard_normal((3000, 64)).astype(np.float32)
    block = faiss.cvar.distance_compute_blas_query_bs
    for rows, chunk in ((2 * block + 13, 65536), (2 * block + 200, 65536), (5 * block - 7, 2 * block)):
        queries = rng.standard_normal((rows, 64)).astype(np.float32)
        whole, cut = (np.concatenate([_search(bank, l2_normalise(queries[a:b]), 10, 1000, _NoBar())[0]
                                      for a, b in query_units(rows, chunk, world, block)]) for world in (1, 2))
        assert len(query_units(rows, chunk, 2, block)) > len(query_units(rows, chunk, 1, block))
        assert np.array_equal(whole, cut), (rows, chunk)


class _NoBar:
    def update(self) -> None:
        pass


def test_rank_batches_together_are_the_one_process_batches():
    order = linear.EpochOrder(29, seed=3, epoch=1)
    one = list(linear.RankBatches(order, batch_size=8))
    assert [len(b) for b in one] == [8, 8, 8, 5] and one[0] == list(order)[:8]
    for world in (2, 4):
        parts = [list(linear.RankBatches(order, 8, rank, world, start=1)) for rank in range(world)]
        assert [[key for piece in part for key in piece] for part in zip(*parts, strict=True)] == one[1:]
        assert [len(part[0]) for part in parts] == [8 // world] * world


def test_batch_that_does_not_split_over_the_ranks_is_one_line():
    cfg = linear.LinearConfig(batch_size=8)
    linear.check_ranks(cfg, 29, 2)
    with pytest.raises(linear.ConfigError, match="batch_size 8 does not split over 3 ranks"):
        linear.check_ranks(cfg, 29, 3)
    with pytest.raises(linear.ConfigError, match="last batch of each epoch"):
        linear.check_ranks(cfg, 25, 4)  # one image for four ranks


def test_cross_rank_batch_norm_is_batch_norm_over_the_whole_batch(monkeypatch):
    """The heads' SyncBN on the CPU: with the sums of every rank (here one rank, all_reduce the identity) it
    equals BatchNorm2d in output, gradient and running statistics; in eval it is BatchNorm2d."""
    from protocols import data_parallel

    torch.manual_seed(0)
    reference = nn.BatchNorm2d(16, affine=False, momentum=0.1)
    norm = nn.Sequential(nn.BatchNorm2d(16, affine=False, momentum=0.1))
    assert data_parallel.to_sync_batchnorm(norm, "cpu") == 1
    assert isinstance(norm[0], data_parallel.CrossRankBatchNorm)
    monkeypatch.setattr(data_parallel.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(data_parallel.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(data_parallel.dist, "all_reduce", lambda tensor: None)
    for _ in range(3):
        x = (torch.randn(8, 16, 3, 3) * 3 + 1).requires_grad_()
        ours, theirs = norm(x), reference(x)
        assert torch.allclose(ours, theirs, atol=1e-5)
        weights = torch.randn_like(ours)
        assert torch.allclose(*(torch.autograd.grad((out * weights).sum(), x)[0] for out in (ours, theirs)),
                              atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(norm[0], name).double(), getattr(reference, name).double(), atol=1e-6), name
    norm.eval()
    reference.eval()
    x = torch.randn(4, 16, 3, 3)
    assert torch.allclose(norm(x), reference(x), atol=1e-6)


def test_ranks_that_disagree_on_the_checkpoint_are_one_line(monkeypatch):
    ranks = Distributed("cpu")
    monkeypatch.setattr(ranks, "all_gather_object", lambda value: ["ab12", "cd34"])
    with pytest.raises(RankMismatch, match="rank 0: ab12, rank 1: cd34"):
        ranks.check_same("ab12", "checkpoints (sha256)")


def test_one_gpu_index_for_every_rank_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(TorchrunError, match="cuda:0 under torchrun"):
        Distributed("cuda:0")


def test_a_protocol_that_does_not_share_its_work_refuses_torchrun(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["-q", "eval", "seg_voc_dense_probe", "--checkpoint", "random", "--results", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "does not run under torchrun" in lines[0]
