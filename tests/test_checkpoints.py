"""Every checkpoint layout of spec pretraining.md §4, built from real models, loads into a Backbone
that computes exactly what the source backbone computes; anything else fails on one line."""

import os
import pickle
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from conftest import tiny_config, with_random_statistics
from torch import nn

from baselines import train
from baselines.backbone import FEATURE_NAMES, create_backbone
from baselines.checkpoints import (
    FORMATS,
    LAYOUTS,
    OUR_TRAINING_FORMAT,
    CheckpointError,
    backbone_state_from_checkpoint,
    check_fits,
    detectron2_to_torchvision_key,
    infer_resnet_arch,
    load_backbone,
    read_backbone_state,
)
from baselines.densecl import DenseCL
from baselines.moco import MoCoV2

pytestmark = pytest.mark.usefixtures("one_thread")


def perturb_key_encoder(model: MoCoV2) -> MoCoV2:
    """A key encoder that differs from the query encoder, so loading the wrong one is caught."""
    with torch.no_grad():
        for p in model.encoder_k.parameters():
            p.add_(0.1)
    return model


@pytest.fixture(scope="module")
def densecl():
    torch.manual_seed(0)
    return perturb_key_encoder(
        DenseCL(with_random_statistics(create_backbone("resnet18"), seed=1), queue_size=8)).eval()


@pytest.fixture(scope="module")
def moco():
    torch.manual_seed(1)
    return perturb_key_encoder(MoCoV2(with_random_statistics(create_backbone("resnet18"), seed=2), queue_size=8)).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def assert_same_features(loaded, source, images):
    assert not loaded.training
    with torch.no_grad():
        got, want = loaded(images), source.eval()(images)
    assert list(got) == list(FEATURE_NAMES)
    for name in FEATURE_NAMES:
        assert torch.equal(got[name], want[name]), name


def save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


# ------------------------------------------------------------------------------ layouts (spec §4)
def prefixed(prefix: str, state: dict) -> dict:
    return {f"{prefix}{k}": v for k, v in state.items()}


def openselfsup_checkpoint(model: MoCoV2) -> dict:
    """mmcv `save_checkpoint` of the official model: its `backbone` attribute aliases `encoder_q[0]`."""
    state = model.state_dict()
    state.update({f"backbone.{k[12:]}": v for k, v in state.items() if k.startswith("encoder_q.0.")})
    meta = {"epoch": 200, "iter": 1000, "mmcv_version": "0.2.16"}
    return {"meta": meta, "state_dict": state, "optimizer": {"state": {}}}


def mmselfsup0_checkpoint(model: MoCoV2) -> dict:
    checkpoint = openselfsup_checkpoint(model)
    checkpoint["state_dict"].update(prefixed("neck.", model.encoder_q[1].state_dict()))
    return checkpoint


def mmselfsup1_checkpoint(model: MoCoV2) -> dict:
    state = {
        **prefixed("backbone.", model.encoder_q[0].state_dict()),
        **prefixed("neck.", model.encoder_q[1].state_dict()),
        "encoder_k.steps": torch.tensor([7.0]),
        **prefixed("encoder_k.module.", model.encoder_k.state_dict()),
        **{k: v for k, v in model.state_dict().items() if k.startswith("queue")},
    }
    return {"meta": {"mmengine_version": "0.10.7"}, "state_dict": state, "message_hub": {}, "optimizer": {"state": {}}}


def extracted_backbone(model: MoCoV2, author: str = "DenseCL") -> dict:
    """What `tools/extract_backbone_weights.py` writes: keys starting with `backbone`, 9 chars stripped."""
    state = openselfsup_checkpoint(model)["state_dict"]
    return {"state_dict": {k[9:]: v for k, v in state.items() if k.startswith("backbone")}, "author": author}


def fb_moco_checkpoint(model: MoCoV2) -> dict:
    """facebookresearch/moco: a torchvision ResNet whose `fc` is the MLP head, under DataParallel."""
    state = {}
    for name, encoder_modules in (("encoder_q", model.encoder_q), ("encoder_k", model.encoder_k)):
        state.update(prefixed(f"module.{name}.", encoder_modules[0].state_dict()))
        mlp = encoder_modules[1].mlp
        state.update({f"module.{name}.fc.{i}.{p}": getattr(mlp[i], p).detach()
                      for i in (0, 2) for p in ("weight", "bias")})
    state.update({"module.queue": model.queue, "module.queue_ptr": model.queue_ptr})
    return {"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": {"state": {}}}


def ours_training_checkpoint(model: MoCoV2) -> dict:
    return {"format": OUR_TRAINING_FORMAT, "version": 1, "method": "densecl", "arch": "resnet18",
            "config": {"arch": "resnet18"}, "state_dict": model.state_dict(), "optimizer": {"state": {}}}


def ours_exported_backbone(model: MoCoV2) -> dict:
    return {"state_dict": model.backbone.state_dict(), "author": "densecl-bench", "meta": {"arch": "resnet18"}}


def to_detectron2_key(key: str) -> str:
    """convert-pretrain-to-detectron2.py's renames, in the spec's order (§4)."""
    if "layer" not in key:
        key = "stem." + key
    for stage in (1, 2, 3, 4):
        key = key.replace(f"layer{stage}", f"res{stage + 1}")
    for i in (1, 2, 3):
        key = key.replace(f"bn{i}", f"conv{i}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def detectron2_pickle(state: dict, path: Path, author: str = "OpenSelfSup") -> Path:
    model = {to_detectron2_key(k): v.numpy() for k, v in state.items()}
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": author, "matching_heuristics": True}, f)
    return path


# Ours from a real training run: test_real_training_run_and_its_export_load_the_same_backbone.
SOURCE_LAYOUTS = {
    "ours-exported": ("densecl", ours_exported_backbone, "densecl-bench/backbone"),
    "openselfsup-densecl": ("densecl", openselfsup_checkpoint, "openselfsup"),
    "openselfsup-moco": ("moco", openselfsup_checkpoint, "openselfsup"),
    "mmselfsup0-moco": ("moco", mmselfsup0_checkpoint, "mmselfsup-0.x"),
    "mmselfsup1-densecl": ("densecl", mmselfsup1_checkpoint, "mmselfsup-1.x"),
    "extracted-densecl": ("densecl", extracted_backbone, "extracted-backbone"),
    "fb-moco": ("moco", fb_moco_checkpoint, "moco"),
}


@pytest.mark.parametrize("layout", list(SOURCE_LAYOUTS))
def test_each_layout_loads_the_query_backbone_exactly(layout, request, images, tmp_path):
    model_name, build, expected_format = SOURCE_LAYOUTS[layout]
    model = request.getfixturevalue(model_name)
    path = save(build(model), tmp_path / "checkpoint.pth")
    loaded = load_backbone(path)
    assert (loaded.checkpoint_format, loaded.name) == (expected_format, "resnet18")
    assert_same_features(loaded, model.backbone, images)


def test_read_backbone_state_needs_no_model(moco, tmp_path):
    state = read_backbone_state(save(extracted_backbone(moco, author="MMSelfSup"), tmp_path / "mmselfsup.pth"))
    assert (state.format, state.arch) == ("extracted-backbone", "resnet18")
    expected = moco.backbone.state_dict()
    assert list(state.state_dict) == list(expected)
    assert all(torch.equal(state.state_dict[k], v) for k, v in expected.items())


def test_official_extraction_of_densecl_is_318_keys_in_torchvision_order():
    """Spec §4, at ResNet-50 scale on the meta device: 974 keys in, 318 torchvision keys out."""
    with torch.device("meta"):
        model = DenseCL(create_backbone("resnet50"), queue_size=65536)
        reference = torchvision.models.resnet50().state_dict()
    checkpoint = openselfsup_checkpoint(model)
    assert len(checkpoint["state_dict"]) == 974
    state = backbone_state_from_checkpoint(checkpoint)
    assert (state.format, state.arch) == ("openselfsup", "resnet50")
    assert list(state.state_dict) == [k for k in reference if not k.startswith("fc.")]
    check_fits(state, "resnet50")


def test_torchvision_and_timm_classifiers_drop_fc_and_match_their_trunks(images, tmp_path):
    tv = with_random_statistics(torchvision.models.resnet18(), seed=4).eval()
    loaded = load_backbone(save(tv.state_dict(), tmp_path / "tv.pth"))
    assert loaded.checkpoint_format == "torchvision"
    with torch.no_grad():
        trunk = nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool, tv.layer1, tv.layer2, tv.layer3, tv.layer4)
        assert torch.equal(loaded(images)["feature5"], trunk(images))

    tm = with_random_statistics(timm.create_model("resnet18", pretrained=False), seed=5).eval()
    loaded = load_backbone(save(tm.state_dict(), tmp_path / "timm.pth"))
    with torch.no_grad():
        assert torch.equal(loaded(images)["feature5"], tm.forward_features(images))


def test_dataparallel_prefix_as_moco_main_lincls_saves_it(densecl, images, tmp_path):
    classifier = {"module.fc.weight": torch.zeros(10, 512), "module.fc.bias": torch.zeros(10)}
    state = {**prefixed("module.", densecl.backbone.state_dict()), **classifier}
    loaded = load_backbone(save({"epoch": 100, "arch": "resnet18", "state_dict": state}, tmp_path / "lincls.pth"))
    assert loaded.checkpoint_format == "torchvision-ddp"
    assert_same_features(loaded, densecl.backbone, images)


def test_detectron2_pickles_round_trip_the_spec_renames(densecl, moco, images, tmp_path):
    for original, renamed in [
        ("conv1.weight", "stem.conv1.weight"), ("bn1.running_mean", "stem.conv1.norm.running_mean"),
        ("layer1.0.conv2.weight", "res2.0.conv2.weight"), ("layer1.0.bn3.bias", "res2.0.conv3.norm.bias"),
        ("layer1.0.downsample.0.weight", "res2.0.shortcut.weight"),
        ("layer1.0.downsample.1.weight", "res2.0.shortcut.norm.weight"),
    ]:
        assert to_detectron2_key(original) == renamed
        assert detectron2_to_torchvision_key(renamed) == original

    path = detectron2_pickle(extracted_backbone(densecl)["state_dict"], tmp_path / "densecl.pkl")
    loaded = load_backbone(path)
    assert loaded.checkpoint_format == "detectron2"
    assert_same_features(loaded, densecl.backbone, images)

    # FB's converter keeps the MLP head as stem.fc.* (spec §4 quirk); it is dropped like any fc.
    moco_encoder_q = {k.removeprefix("module.encoder_q."): v for k, v in fb_moco_checkpoint(moco)["state_dict"].items()
                      if k.startswith("module.encoder_q.")}
    path = detectron2_pickle(moco_encoder_q, tmp_path / "moco.pkl", author="MOCO")
    assert_same_features(load_backbone(path), moco.backbone, images)


def test_metadata_arch_is_used_where_keys_cannot_tell(tmp_path, images):
    source = create_backbone("mobilenetv3_small_050").eval()
    exported = {"state_dict": source.state_dict(), "author": "densecl-bench", "meta": {"arch": "mobilenetv3_small_050"}}
    assert_same_features(load_backbone(save(exported, tmp_path / "ours.pth")), source, images)
    with pytest.raises(CheckpointError, match=r"cannot tell the architecture .* pass arch \(--arch\)"):
        load_backbone(save(source.state_dict(), tmp_path / "plain.pth"))
    assert_same_features(load_backbone(tmp_path / "plain.pth", arch="mobilenetv3_small_050"), source, images)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_infers_torchvision_resnets(arch):
    with torch.device("meta"):
        state = getattr(torchvision.models, arch)().state_dict()
    assert infer_resnet_arch({k: v for k, v in state.items() if not k.startswith("fc.")}) == arch


@pytest.mark.parametrize("arch", ["wide_resnet50_2", "resnext50_32x4d"])
def test_resnet_lookalikes_are_not_inferred(arch):
    with torch.device("meta"):
        state = getattr(torchvision.models, arch)().state_dict()
    assert infer_resnet_arch(state) is None


# ------------------------------------------------------------------------------ strict failures
def one_line_error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as err:
        load_backbone(path, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unexpected_backbone_key_fails(densecl, tmp_path):
    checkpoint = extracted_backbone(densecl)
    checkpoint["state_dict"]["layer1.0.extra.weight"] = torch.zeros(3)
    assert "1 unexpected key: layer1.0.extra.weight" in one_line_error(save(checkpoint, tmp_path / "x.pth"))


def test_unknown_key_beside_the_heads_fails(densecl, tmp_path):
    checkpoint = ours_training_checkpoint(densecl)
    checkpoint["state_dict"] = {**checkpoint["state_dict"], "predictor.weight": torch.zeros(3)}
    message = one_line_error(save(checkpoint, tmp_path / "x.pth"))
    assert "1 unexpected key: predictor.weight outside the backbone" in message


def test_training_checkpoint_without_a_backbone_fails(densecl):
    checkpoint = ours_training_checkpoint(densecl)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("queue")}
    with pytest.raises(CheckpointError, match=r"no backbone keys \(encoder_q\.0\.\*\)"):
        backbone_state_from_checkpoint(checkpoint)


def test_missing_key_fails(densecl, tmp_path):
    checkpoint = extracted_backbone(densecl)
    del checkpoint["state_dict"]["layer4.1.bn2.running_var"]
    assert "1 missing key: layer4.1.bn2.running_var" in one_line_error(save(checkpoint, tmp_path / "x.pth"))


def test_other_architecture_names_both(densecl, tmp_path):
    path = save(extracted_backbone(densecl), tmp_path / "r18.pth")
    message = one_line_error(path, arch="resnet50")
    assert "checkpoint of a resnet18 does not fit resnet50" in message
    assert "shape mismatch" in message and "missing key" in message

    message = one_line_error(save(ours_exported_backbone(densecl), tmp_path / "ours.pth"), arch="resnet34")
    assert "checkpoint of a resnet18 does not fit resnet34" in message


def test_alias_that_disagrees_with_encoder_q_fails(densecl, tmp_path):
    checkpoint = openselfsup_checkpoint(densecl)
    checkpoint["state_dict"]["backbone.conv1.weight"] = checkpoint["state_dict"]["backbone.conv1.weight"] + 1
    message = one_line_error(save(checkpoint, tmp_path / "x.pth"))
    assert "backbone.* and encoder_q.0.* should alias one module" in message and "conv1.weight" in message


def test_files_that_are_not_checkpoints(tmp_path):
    assert "checkpoint not found" in one_line_error(tmp_path / "missing.pth")
    assert "is a directory" in one_line_error(tmp_path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint\n" * 10)
    assert "cannot read" in one_line_error(tmp_path / "junk.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "cannot read" in one_line_error(tmp_path / "empty.pth")
    assert "holds a list" in one_line_error(save([1, 2], tmp_path / "list.pth"))
    assert "not a checkpoint" in one_line_error(save({"epoch": 3}, tmp_path / "dict.pth"))


class MkdirOnUnpickle:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickles_cannot_run_code(tmp_path):
    marker = tmp_path / "marker"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"conv1.weight": MkdirOnUnpickle(marker)}}, f)
    assert "cannot read" in one_line_error(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_format_registry_and_trainer_constants_agree():
    assert set(FORMATS) == set(LAYOUTS)
    assert OUR_TRAINING_FORMAT == train.CHECKPOINT_FORMAT


@pytest.mark.slow
def test_real_training_run_and_its_export_load_the_same_backbone(pretrain_images, tmp_path, images):
    image_list = tmp_path / "images.txt"  # one iteration of 8 images is enough to write both files
    image_list.write_text("\n".join(str(p) for p in sorted(pretrain_images.iterdir())[:8]))
    exported = train.pretrain(tiny_config(image_list, tmp_path / "run", epochs=1))
    from_export = load_backbone(exported)
    from_training = load_backbone(tmp_path / "run" / "checkpoints" / "last.pth")
    assert from_export.checkpoint_format == "densecl-bench/backbone"
    assert from_training.checkpoint_format == "densecl-bench/pretrain"
    assert_same_features(from_training, from_export, images)
    trained = torch.load(tmp_path / "run" / "checkpoints" / "last.pth", weights_only=True)["state_dict"]
    for key, value in from_training.state_dict().items():
        assert torch.equal(value, trained[f"encoder_q.0.{key}"]), key


def test_our_exported_backbone_declares_its_pretraining_seed(tmp_path):
    """`eval` of our backbone.pth pairs by seed without --pretrain-seed: the export's meta carries it."""
    from protocols.common import backbone_under_test

    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": create_backbone("resnet18").state_dict(), "author": "densecl-bench",
                "meta": {"method": "densecl", "arch": "resnet18", "epochs": 10, "pretrain_data": "synthetic-voc",
                         "seed": 3}}, path)
    pretraining = backbone_under_test(path).pretraining
    assert (pretraining["method"], pretraining["epochs"], pretraining["seed"]) == ("densecl", 10, 3)


def test_random_init_pretrain_seed_is_its_init_seed():
    """`eval --checkpoint random --pretrain-seed 3` is the seed-3 random baseline, not a conflict with seed 0."""
    from protocols.common import backbone_under_test

    three = backbone_under_test("random", "resnet18", pretrain_seed=3)
    assert three.pretraining["seed"] == 3 and three.cache_id.endswith("seed3")
    same = backbone_under_test("random", "resnet18", seed=3)
    first = next(iter(three.backbone.state_dict().values()))
    assert torch.equal(first, next(iter(same.backbone.state_dict().values())))
