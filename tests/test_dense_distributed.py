"""Detection and segmentation under a real 2-rank torchrun (CPU, gloo) against one process, through the CLI.

Both runs use one intra-op thread (as each torchrun rank does with OMP_NUM_THREADS=1): summation order
alone moves CPU convolutions by ~1e-7 per step. The tolerances below were measured on this 2-core machine
(issue 13); the breaks tried once, by editing the code (each fails both tests):
  A. every rank trains on the whole global batch  -> numerically equal to one process (SyncBN over a
     duplicated batch has the same statistics), caught by `images_trained_per_rank`;
  B. every rank trains on rank 0's share          -> FCN BN running var off by 0.65; C4 head by 9e-4 (within
     C4's tolerance, see below) and its losses by 3.6e-2 (just over theirs), and `trained_samples_checksum`
     differs (tried on its own: caught);
  C. the LR multiplied by the number of ranks     -> FCN weights off by 1e-2, C4 head by 1.2e-2.
`trained_samples_checksum` is an order-free checksum of the (iteration, image file) pairs the model was fed,
summed over the ranks: it must equal one process's.

FCN is equal to one process up to float summation order: SyncBN statistics over both ranks, dropout masks
drawn for the global batch. Measured (this session, issue 13): after 3 iterations the weights differ by 1.2e-5
and the BN running variances by 1.4e-4, and one process at 2 threads differs from one process at 1 thread by
the same (1.3e-5 / 1.4e-4): summation order, amplified by BN's cancelling gradients; iteration 1 agrees to
1.2e-7 and the losses to 5 decimals. (An earlier measurement on other data gave 8e-7.)
C4 detection is not equal, by construction of mmdet's losses: each rank normalises its RPN/RoI losses by its
own number of samples, as the reference's 8 GPUs do. The test removes the other rank-local effects: images
padded to one size (max_size = short side) and RoI/anchor quotas above the candidates, so no sampling is
random (random sampling draws image after image from one stream and differs at any N > 1). What remains was
measured at 1.1e-3 on the trained parameters (one process at 2 threads: 6e-8) and 1e-2 on the first loss;
the trained res5 BN's running variances (up to 2.8e-2) are left out. So the weights catch break C, and
break B (9e-4) is caught by the checksum of the images each rank trained on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

pytest.importorskip("mmcv.ops", reason="the OpenMMLab stack is not installed (tox -e dense)")
pytest.importorskip("mmdet")
pytest.importorskip("mmseg")

from replication import cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # two runs each; ~1-4 min on 2 cores, by load

BATCH = 4
FCN = dict(iterations=3, crop_size=48, scale="128,48")
C4 = dict(iterations=2, mode="frozen", warmup_iters=0, steps="100", train_short_sides="48", max_size=48,
          test_short_side=48, rois_per_image=512, test_proposals=10, test_split="test6")


@pytest.fixture(scope="module")
def checkpoint(random_bn_checkpoint) -> Path:
    return random_bn_checkpoint


def _argv(protocol: str, checkpoint: Path, data: Path, out: Path, settings: dict) -> list[str]:
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
    return ["eval", protocol, "--checkpoint", str(checkpoint), "--data", str(data), "--preset", "small",
            "--batch-size", str(BATCH), "--save-every", "1", "--workers", "0", "--device", "cpu", "--no-progress",
            "--work-dir", str(out / "work"), "--results", str(out / "results"), *flags]


def _one_process(argv: list[str]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)


def _torchrun(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "replication", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=840)


def _run(protocol: str, checkpoint: Path, data: Path, tmp_path: Path, settings: dict):
    """(one process's, two ranks') (saved state, stored result)."""
    one, two = tmp_path / "one", tmp_path / "two"
    _one_process(_argv(protocol, checkpoint, data, one, settings))
    done = _torchrun(_argv(protocol, checkpoint, data, two, settings), tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    runs = []
    for out in (one, two):
        [result] = (out / "results" / "eval").glob("*/result.json")  # rank 0 alone stores the run
        runs.append((torch.load(out / "work" / "state.pt", weights_only=True), json.loads(result.read_text())))
    return runs


def _largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], buffers: bool = True
                        ) -> tuple[float, str]:
    assert a.keys() == b.keys()  # SyncBN keeps BN's state-dict keys
    return max(((x.double() - b[k].double()).abs().max().item(), k) for k, x in a.items()
               if buffers or not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def _check_sharding(result: dict, single: dict, iterations: int) -> None:
    parallel = result["details"]["distributed"]
    assert result["details"]["trained_samples_checksum"] == single["details"]["trained_samples_checksum"] is not None
    assert parallel["world_size"] == 2 and parallel["per_rank_batch"] == BATCH // 2
    assert parallel["images_trained_per_rank"] == [iterations * BATCH // 2] * 2  # each rank its half, no more
    assert parallel["sync_bn_layers"] > 0
    assert not any(line.startswith("norm:") for line in result["details"]["deviations"])  # SyncBN, as the reference


def test_fcn_on_two_ranks_equals_one_process(checkpoint, voc_root, tmp_path):
    (one, single), (two, ranks) = _run("seg_voc_fcn", checkpoint, voc_root, tmp_path, FCN)
    difference, where = _largest_difference(one["model"], two["model"])
    assert difference < 1e-3, where  # measured 1.4e-4 (as 2 threads vs 1); breaks B and C: ~1e-2
    assert [loss for _, loss in two["losses"]] == pytest.approx([loss for _, loss in one["losses"]], abs=1e-4)
    assert ranks["metrics"] == pytest.approx(single["metrics"], abs=1e-6)  # measured: identical
    _check_sharding(ranks, single, FCN["iterations"])
    assert ranks["details"]["distributed"]["global_batch_dropout_layers"] == 2  # decode and auxiliary heads
    assert any(line.startswith("norm: 'BN (one device)'") for line in single["details"]["deviations"])


def test_frozen_c4_on_two_ranks_matches_one_process(checkpoint, voc_root, tmp_path):
    data = tmp_path / "VOC2007"  # the synthetic VOC with a 6-image test list: the C4 test runs res5 per proposal
    data.mkdir()
    for name in ("JPEGImages", "Annotations", "dataset.json"):
        (data / name).symlink_to(voc_root / name)
    (data / "ImageSets" / "Main").mkdir(parents=True)
    for split in ("trainval", "test"):
        (data / "ImageSets" / "Main" / f"{split}.txt").write_text(
            (voc_root / "ImageSets" / "Main" / f"{split}.txt").read_text())
    test_ids = (voc_root / "ImageSets" / "Main" / "test.txt").read_text().split()[:6]
    (data / "ImageSets" / "Main" / "test6.txt").write_text("".join(f"{i}\n" for i in test_ids))

    (one, single), (two, ranks) = _run("det_voc_c4", checkpoint, data, tmp_path, C4)
    difference, where = _largest_difference(one["model"], two["model"], buffers=False)
    assert difference < 5e-3, where  # measured 1.1e-3 (rank-local loss normalisers); break C 1.2e-2
    assert [loss for _, loss in two["losses"]] == pytest.approx([loss for _, loss in one["losses"]], abs=2e-2)
    assert ranks["metrics"] == pytest.approx(single["metrics"], abs=1e-6)
    _check_sharding(ranks, single, C4["iterations"])
    source = torch.load(checkpoint, weights_only=True)["state_dict"]
    for key, value in source.items():  # frozen under DDP: stem..res4 weights and BN statistics untouched
        if not key.startswith(("layer4.", "fc.")):
            assert torch.equal(two["model"][f"backbone.{key}"], value), key
    assert not torch.equal(two["model"]["roi_head.shared_head.layer4.0.conv1.weight"], source["layer4.0.conv1.weight"])
