"""Linear probes (spec protocols.md §2.1 mhead, §2.3 avgpool) at tiny scale on the synthetic data."""

from __future__ import annotations

import os
import signal
from dataclasses import replace

import pytest
import torch
from conftest import subject_of
from torch import nn

from baselines.backbone import create_backbone
from baselines.infra import Interrupted
from protocols import linear
from protocols.common import scale_milestones
from protocols.linear import Lighting, LinearConfig, build_heads, head_dims, lr_at, resolve_config

SMALL = {"image_size": 64, "probe_epochs": 4, "batch_size": 8, "lr": 0.003, "workers": 0, "device": "cpu"}


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return create_backbone("resnet18")


@pytest.fixture(scope="module")
def small_run(resnet18, voc_root):
    """One short mhead run; the test split is the training split, so accuracy shows learning."""
    before = snapshot(resnet18)
    result = linear.run(subject_of(resnet18), voc_root, LinearConfig(**SMALL, test_split="trainval"), progress=False)
    return result, before


def test_resnet50_head_dims_match_spec():
    backbone = create_backbone("resnet50")
    heads = build_heads(backbone, "mhead", num_classes=1000)
    spec_dims = {"feature1": 9216, "feature2": 9216, "feature3": 8192, "feature4": 9216, "feature5": 8192}
    assert head_dims(heads) == spec_dims
    head = heads["feature4"]
    assert isinstance(head[1], nn.BatchNorm2d) and not head[1].affine and head[1].momentum == 0.1
    assert head[-1].bias.abs().max() == 0 and abs(head[-1].weight.std().item() - 0.01) < 5e-4
    # Small runs adapt the pools but keep the §1.3 grids, hence the same dims.
    assert head_dims(build_heads(backbone, "mhead", 1000, image_size=64)) == head_dims(heads)
    assert head_dims(build_heads(backbone, "avgpool", 1000)) == {"feature5": 2048}
    with torch.no_grad():
        features = backbone(torch.zeros(2, 3, 224, 224))
        assert heads["feature1"](features["feature1"]).shape == (2, 1000)


def test_milestones_scale_with_epochs():
    assert scale_milestones((30, 60), 90, 90) == (30, 60)
    assert scale_milestones((30, 60), 90, 9) == (3, 6)
    assert scale_milestones((30, 60), 90, 10) == (3, 7)
    assert scale_milestones((60, 80), 100, 10) == (6, 8)
    assert scale_milestones((30, 60), 90, 1) == ()
    lrs = [lr_at(e, 0.01, (30, 60)) for e in (0, 29, 30, 59, 60, 89)]
    assert lrs == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4])


def test_resolved_config_records_the_recipe(voc_root):
    cfg, derivation = resolve_config(LinearConfig(), voc_root)
    recipe = (cfg.probe_epochs, cfg.milestones, cfg.lr, cfg.batch_size, cfg.weight_decay, cfg.nesterov)
    assert recipe == (90, (30, 60), 0.01, 256, 1e-4, True)
    assert (cfg.train_split, cfg.test_split) == ("trainval", "test")
    assert len(cfg.layers) == 5
    cfg, derivation = resolve_config(LinearConfig(variant="avgpool", probe_epochs=10, batch_size=64, scale_lr=True),
                                     voc_root)
    recipe = (cfg.milestones, cfg.lr, cfg.weight_decay, cfg.nesterov, cfg.layers)
    assert recipe == ((6, 8), 7.5, 0.0, False, ("feature5",))
    assert derivation["base_lr"] == 30.0 and derivation["lr_scaled_by"] == 0.25
    with pytest.raises(ValueError, match="variant"):
        resolve_config(LinearConfig(variant="svm"), voc_root)
    # §2.2 Places205: the mhead model, 28 epochs with steps 7/14/21, no colour augmentation.
    cfg, _ = resolve_config(LinearConfig(variant="places205"), voc_root)
    assert (cfg.probe_epochs, cfg.milestones, cfg.lr, cfg.nesterov, len(cfg.layers)) == (28, (7, 14, 21), 0.01, True, 5)
    augment = repr(linear.train_transform("places205"))
    assert "RandomCrop(size=(224, 224)" in augment and "ColorJitter" not in augment and "Lighting" not in augment


def test_lighting_adds_one_colour_shift_per_image():
    image = torch.rand(3, 8, 8)
    torch.manual_seed(0)
    shifted = Lighting(0.1)(image)
    shift = (shifted - image).flatten(1)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-6) and shift.abs().max() > 0
    torch.manual_seed(0)
    assert torch.equal(Lighting(0.1)(image), shifted)
    assert torch.equal(Lighting(0.0)(image), image)


def test_heads_learn_on_synthetic_data(small_run):
    result, _ = small_run
    history = result.details["history"]
    assert len(history) == 4 and [h["lr"] for h in history] == pytest.approx([3e-3, 3e-4, 3e-4, 3e-5])
    for layer in ("feature1", "feature2", "feature3", "feature4", "feature5"):
        assert history[-1]["loss"][layer] < history[0]["loss"][layer], layer
    chance = 100.0 / 20
    assert result.metrics["best/top1"] > 3 * chance
    assert set(result.metrics) == {f"feature{i}/top{t}" for i in range(1, 6) for t in (1, 5)} | {"best/top1"}
    assert result.config["milestones"] == (1, 3) and result.config["image_size"] == 64
    assert result.config["pooling"] == "adaptive to the §1.3 grid"


def test_backbone_is_frozen_and_untouched(small_run, resnet18):
    _, before = small_run
    assert_same_tensors(before, snapshot(resnet18))  # weights and BN running stats / counters
    assert all(p.requires_grad for p in resnet18.parameters())  # the caller's flags come back


def test_interrupted_run_resumes_exactly_with_any_workers(small_run, resnet18, voc_root, tmp_path, monkeypatch):
    result, _ = small_run
    cfg = LinearConfig(**SMALL, test_split="trainval")
    calls = []
    step = linear.train_step

    def interrupted_step(backbone, *args, **kwargs):
        assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
        calls.append(1)
        losses = step(backbone, *args, **kwargs)
        if len(calls) == 6:  # mid-epoch 2 (4 iterations per epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return losses

    monkeypatch.setattr(linear, "train_step", interrupted_step)
    with pytest.raises(Interrupted, match="epoch 1 iteration 2"):
        linear.run(subject_of(resnet18), voc_root, cfg, work_dir=tmp_path, progress=False)
    monkeypatch.setattr(linear, "train_step", step)
    # Same seed, another process layout (a loader worker) and a mid-epoch restart: the same numbers.
    resumed = linear.run(subject_of(resnet18), voc_root, replace(cfg, workers=1), work_dir=tmp_path, progress=False)
    assert resumed.details["resumed_from"] == {"epoch": 1, "iteration": 2}
    assert resumed.metrics == result.metrics
    assert resumed.details["history"] == result.details["history"]
    # A finished state only re-evaluates; another config refuses to resume from it.
    assert linear.run(subject_of(resnet18), voc_root, cfg, work_dir=tmp_path, progress=False).metrics == result.metrics
    with pytest.raises(ValueError, match="another lr"):
        linear.run(subject_of(resnet18), voc_root, LinearConfig(**{**SMALL, "lr": 0.1}, test_split="trainval"),
                   work_dir=tmp_path, progress=False)


def test_avgpool_variant_is_deterministic(resnet18, voc_root):
    cfg = LinearConfig(variant="avgpool", image_size=32, probe_epochs=2, batch_size=16, workers=0, device="cpu")
    result = linear.run(subject_of(resnet18), voc_root, cfg, progress=False)
    assert result.protocol == "linear_in1k"
    assert set(result.metrics) == {"feature5/top1", "feature5/top5", "best/top1"}
    assert result.details["head_dims"] == {"feature5": 512}
    assert result.config["lr"] == 30.0 and result.config["milestones"] == (1,)
    again = linear.run(subject_of(resnet18), voc_root, cfg, progress=False)
    assert again.metrics == result.metrics and again.details["history"] == result.details["history"]
    other_seed = linear.run(subject_of(resnet18), voc_root, replace(cfg, seed=1), progress=False)
    assert other_seed.details["history"] != result.details["history"]
