"""Shared fixtures: small synthetic data made once per session, and a private data cache."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does: busy cores are the norm here (issue 11)

import pytest
import torch
from torch import nn

from baselines.train import PretrainConfig
from protocols.datasets import synthetic

REPO = Path(__file__).resolve().parents[1]
# A hang guard for subprocesses, not a speed check: far above the slowest tiny run on a 2-core machine that runs
# other CPU-bound work beside the suite (issue 14). A run that hangs never ends; one that is slow still passes.
HANG_GUARD_S = 1200


def pytest_configure(config):
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Generated datasets go to a per-session cache, never the user's ~/.cache."""
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("DENSECL_BENCH_CACHE")
    os.environ["DENSECL_BENCH_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("DENSECL_BENCH_CACHE", None)
    else:
        os.environ["DENSECL_BENCH_CACHE"] = old


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory) -> Path:
    """A 48-image synthetic VOC2007-layout dataset."""
    return synthetic.generate(tmp_path_factory.mktemp("voc") / "VOC2007", images=48, size=64, seed=0, progress=False)


@pytest.fixture(scope="session")
def pretrain_images(voc_root) -> Path:
    return voc_root / "JPEGImages"


@pytest.fixture
def bench_log(caplog):
    """Records of the `densecl_bench` loggers (which the CLI keeps from propagating to the root logger)."""
    import logging

    logger = logging.getLogger("densecl_bench")
    attach = not logger.propagate  # else the records reach caplog through the root logger already
    if attach:
        logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="densecl_bench")
    yield caplog
    if attach:
        logger.removeHandler(caplog.handler)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny forwards gain nothing from threads and crawl when the shared cores are busy (request per module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(data: Path, out: Path, **overrides) -> PretrainConfig:
    """resnet18 at 32 px, 4 iterations of 8 images per epoch: seconds per run on 2 cores."""
    values = dict(
        method="densecl", arch="resnet18", data=str(data), out=str(out), image_size=32, epochs=2,
        batch_size=8, lr=0.03, queue_size=32, workers=0, seed=0, device="cpu", save_every=1, log_every=2,
    )
    values.update(overrides)
    return PretrainConfig(**values)


def subject_of(backbone: nn.Module, seed: int = 0):
    """A backbone in memory as the subject a protocol runs on (random-init provenance, keyed by arch and seed)."""
    from protocols.common import BackboneUnderTest

    info = {"path": None, "sha256": None, "format": "random-init", "arch": backbone.name, "seed": seed}
    return BackboneUnderTest(backbone, info, {"method": "random", "seed": seed, "arch": backbone.name})


def with_random_statistics(backbone: nn.Module, seed: int) -> nn.Module:
    """Random BN affine parameters and running statistics: a swapped or dropped tensor changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=generator)))
    return backbone.eval()


@pytest.fixture(scope="session")
def random_bn_checkpoint(tmp_path_factory) -> Path:
    """A resnet18 backbone file as we export it, with random BN statistics: a dropped or misplaced tensor shows."""
    from baselines.backbone import create_backbone

    torch.manual_seed(0)
    backbone = with_random_statistics(create_backbone("resnet18"), seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "backbone.pth"
    torch.save({"state_dict": backbone.state_dict(), "author": "densecl-bench", "meta": {"arch": "resnet18"}}, path)
    return path
