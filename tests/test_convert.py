"""Every conversion target round-trips: the written file, loaded by what consumes it, computes exactly
what the source backbone computes; the detectron2 `.pkl` holds nothing but numpy arrays; bad requests
fail on one line without leaving files behind (spec pretraining.md §4)."""

import argparse
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from conftest import with_random_statistics
from torch import nn

from baselines.backbone import FEATURE_NAMES, create_backbone
from baselines.checkpoints import OUR_TRAINING_FORMAT, CheckpointError, detectron2_to_torchvision_key, load_backbone
from baselines.convert import (
    TARGETS,
    ConversionError,
    convert,
    convert_checkpoint,
    default_out_path,
    file_sha256,
    torchvision_to_detectron2_key,
)
from baselines.convert_cli import add_convert_command
from baselines.densecl import DenseCL

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "resnet18"


@pytest.fixture(scope="module")
def source_backbone():
    torch.manual_seed(0)
    return with_random_statistics(create_backbone(ARCH), seed=1)


@pytest.fixture(scope="module")
def source_checkpoint(source_backbone, tmp_path_factory) -> Path:
    """Our exported-backbone layout (what `densecl-bench pretrain` writes as backbone.pth)."""
    path = tmp_path_factory.mktemp("source") / "backbone.pth"
    torch.save({"state_dict": source_backbone.state_dict(), "author": "densecl-bench", "meta": {"arch": ARCH}}, path)
    return path


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def features(backbone: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return backbone.eval()(images)


def assert_same_features(loaded: nn.Module, source: nn.Module, images: torch.Tensor) -> None:
    got, want = features(loaded, images), features(source, images)
    assert list(got) == list(FEATURE_NAMES)
    for name in FEATURE_NAMES:
        assert torch.equal(got[name], want[name]), name


class RecordingUnpickler(pickle.Unpickler):
    """A plain unpickler that notes every global the pickle asks for."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.named: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str):
        self.named.add((module, name))
        return super().find_class(module, name)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("target", ["detectron2", "mmdet", "mmseg", "torchvision", "timm"])
def test_every_target_loads_back_as_the_same_backbone(target, source_checkpoint, source_backbone, images, tmp_path):
    out = convert(source_checkpoint, target, tmp_path / f"converted{'.pkl' if target == 'detectron2' else '.pth'}")
    assert files_in(tmp_path) == [out.name]  # no temporary file left behind
    loaded = load_backbone(out)
    assert loaded.name == ARCH
    assert_same_features(loaded, source_backbone, images)


def test_detectron2_pkl_is_the_official_layout_of_numpy_arrays(source_checkpoint, source_backbone, tmp_path):
    out = convert(source_checkpoint, "detectron2", tmp_path / "r18.pkl")
    with open(out, "rb") as f:
        written = pickle.load(f, encoding="latin1")  # exactly how DetectionCheckpointer reads a .pkl
    assert written["matching_heuristics"] is True
    assert written["__author__"] == "densecl-bench"
    source_state = source_backbone.state_dict()
    assert list(written["model"]) == [torchvision_to_detectron2_key(k) for k in source_state]
    for key, value in written["model"].items():
        assert isinstance(value, np.ndarray)
        assert torch.equal(torch.from_numpy(value), source_state[detectron2_to_torchvision_key(key)])
    assert "stem.conv1.norm.running_var" in written["model"]
    assert "res5.1.conv2.norm.num_batches_tracked" in written["model"]  # kept, as the official script does
    meta = written["meta"]
    assert (meta["arch"], meta["source_format"], meta["source_sha256"]) == (
        ARCH, "densecl-bench/backbone", file_sha256(source_checkpoint))

    # Only numpy's array constructors are named in the pickle: loading it cannot run other code.
    with open(out, "rb") as f:
        recorder = RecordingUnpickler(f, encoding="latin1")
        recorder.load()
    named = {(module.replace("numpy._core", "numpy.core"), name) for module, name in recorder.named}
    assert named == {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}

def test_detectron2_renames_are_the_official_ones_for_every_resnet50_key():
    """Spec §4's table, and every ResNet-50 key renaming back to itself (318 keys, meta device)."""
    for original, renamed in [
        ("conv1.weight", "stem.conv1.weight"), ("bn1.running_mean", "stem.conv1.norm.running_mean"),
        ("layer1.0.conv2.weight", "res2.0.conv2.weight"), ("layer1.0.bn3.bias", "res2.0.conv3.norm.bias"),
        ("layer1.0.downsample.0.weight", "res2.0.shortcut.weight"),
        ("layer1.0.downsample.1.weight", "res2.0.shortcut.norm.weight"),
        ("layer4.2.bn3.num_batches_tracked", "res5.2.conv3.norm.num_batches_tracked"),
    ]:
        assert torchvision_to_detectron2_key(original) == renamed
    with torch.device("meta"):
        keys = list(create_backbone("resnet50").state_dict())
    assert len(keys) == 318
    assert all(detectron2_to_torchvision_key(torchvision_to_detectron2_key(k)) == k for k in keys)


def test_mmdet_file_is_state_dict_plus_provenance(source_checkpoint, source_backbone, tmp_path):
    out = convert(source_checkpoint, "mmdet", tmp_path / "r18_mmdet.pth")
    written = torch.load(out, map_location="cpu", weights_only=True)
    assert set(written) == {"state_dict", "meta"}
    assert list(written["state_dict"]) == list(source_backbone.state_dict())
    assert written["meta"]["source_sha256"] == file_sha256(source_checkpoint)
    assert written["meta"]["source_format"] == "densecl-bench/backbone"
    assert (written["meta"]["target"], written["meta"]["arch"]) == ("mmdet", ARCH)


def test_torchvision_and_timm_models_load_the_files_missing_only_fc(source_checkpoint, source_backbone, images,
                                                                    tmp_path):
    want = features(source_backbone, images)["feature5"]

    conversion = convert_checkpoint(source_checkpoint, "torchvision", tmp_path / "tv.pth")
    assert conversion.left_to_target == ("fc.weight", "fc.bias")
    model = torchvision.models.resnet18()
    result = model.load_state_dict(torch.load(conversion.out, weights_only=True), strict=False)
    assert (sorted(result.missing_keys), result.unexpected_keys) == (["fc.bias", "fc.weight"], [])
    trunk = nn.Sequential(*list(model.children())[:-2]).eval()  # everything before avgpool and fc
    with torch.no_grad():
        assert torch.equal(trunk(images), want)

    conversion = convert_checkpoint(source_checkpoint, "timm", tmp_path / "timm.pth")
    model = timm.create_model(ARCH, pretrained=False)
    result = model.load_state_dict(torch.load(conversion.out, weights_only=True), strict=False)
    assert (sorted(result.missing_keys), result.unexpected_keys) == (["fc.bias", "fc.weight"], [])
    with torch.no_grad():
        assert torch.equal(model.eval().forward_features(images), want)


def test_timm_target_unwraps_non_resnet_trunks(tmp_path):
    """Our Backbone keeps other timm feature models under `trunk.`; timm's own model has no such prefix."""
    source = create_backbone("mobilenetv3_small_050")
    path = tmp_path / "mobilenet.pth"
    torch.save({"state_dict": source.state_dict(), "author": "densecl-bench",
                "meta": {"arch": "mobilenetv3_small_050"}}, path)
    conversion = convert_checkpoint(path, "timm", tmp_path / "mobilenet_timm.pth")
    model = timm.create_model("mobilenetv3_small_050", pretrained=False)
    result = model.load_state_dict(torch.load(conversion.out, weights_only=True), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(conversion.left_to_target)
    assert all(k.startswith(("conv_head.", "classifier.")) for k in result.missing_keys)

    with pytest.raises(ConversionError, match=r"detectron2 conversion needs a ResNet with torchvision key names"):
        convert(path, "detectron2", tmp_path / "mobilenet.pkl")
    with pytest.raises(ConversionError, match=r"mmdet conversion needs a ResNet"):
        convert(path, "mmdet", tmp_path / "mobilenet_mmdet.pth")
    assert files_in(tmp_path) == ["mobilenet.pth", "mobilenet_timm.pth"]


def test_any_readable_checkpoint_converts_and_conversions_chain(source_backbone, images, tmp_path):
    """A DenseCL training checkpoint -> detectron2 .pkl -> mmdet -> timm: the query backbone throughout."""
    torch.manual_seed(3)
    model = DenseCL(with_random_statistics(create_backbone(ARCH), seed=4), queue_size=8)
    with torch.no_grad():
        for p in model.encoder_k.parameters():
            p.add_(0.1)  # a key encoder that differs, so converting the wrong encoder is caught
    training = tmp_path / "last.pth"
    torch.save({"format": OUR_TRAINING_FORMAT, "arch": ARCH, "state_dict": model.state_dict()}, training)

    pkl = convert(training, "detectron2", tmp_path / "last.pkl")
    mmdet = convert(pkl, "mmdet", tmp_path / "last_mmdet.pth")
    conversion = convert_checkpoint(mmdet, "timm", tmp_path / "last_timm.pth")
    assert conversion.source_format == "torchvision"  # {'state_dict', 'meta'} reads as a plain state dict
    for path in (pkl, mmdet, conversion.out):
        assert_same_features(load_backbone(path), model.backbone, images)


class MkdirWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_crafted_pkl_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    crafted = tmp_path / "crafted.pkl"
    with open(crafted, "wb") as f:
        payload = {"stem.conv1.weight": MkdirWhenUnpickled(marker)}
        pickle.dump({"model": payload, "__author__": "x", "matching_heuristics": True}, f)
    with pytest.raises(CheckpointError, match="cannot read") as error:
        convert(crafted, "mmdet", tmp_path / "out.pth")
    assert "\n" not in str(error.value)
    assert not marker.exists()
    assert files_in(tmp_path) == ["crafted.pkl"]


def test_bad_requests_fail_on_one_line_and_write_nothing(source_checkpoint, tmp_path):
    cases = [
        (lambda: convert(source_checkpoint, "onnx", tmp_path / "x.pth"), "unknown conversion target 'onnx'"),
        (lambda: convert(tmp_path / "missing.pth", "mmdet", tmp_path / "x.pth"), "checkpoint not found"),
        (lambda: convert(source_checkpoint, "detectron2", tmp_path / "x.pth"), "must end in .pkl"),
        (lambda: convert(source_checkpoint, "torchvision", tmp_path / "x.pth", arch="resnet34"),
         "does not fit resnet34"),
        (lambda: convert(source_checkpoint, "mmdet", tmp_path), "is a directory"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
    assert files_in(tmp_path) == []


def test_existing_output_is_kept_unless_overwrite(source_checkpoint, tmp_path):
    out = tmp_path / "r18.pkl"
    out.write_bytes(b"precious")
    with pytest.raises(ConversionError, match="already exists; pass overwrite=True"):
        convert(source_checkpoint, "detectron2", out)
    assert out.read_bytes() == b"precious"
    convert(source_checkpoint, "detectron2", out, overwrite=True)
    assert load_backbone(out).checkpoint_format == "detectron2"
    assert files_in(tmp_path) == ["r18.pkl"]


def test_cli_command_converts_with_a_default_output_name(source_checkpoint, tmp_path, capsys):
    source = tmp_path / source_checkpoint.name
    source.write_bytes(source_checkpoint.read_bytes())
    parser = argparse.ArgumentParser(prog="densecl-bench")
    add_convert_command(parser.add_subparsers(dest="command", required=True))

    args = parser.parse_args(["convert", "--checkpoint", str(source), "--to", "detectron2"])
    assert args.func(args) == 0
    out = default_out_path(source, "detectron2")
    assert out == tmp_path / "backbone_detectron2.pkl" and out.exists()
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "INPUT.FORMAT RGB" in printed

    args = parser.parse_args(["convert", "--checkpoint", str(source), "--to", "detectron2"])
    with pytest.raises(ConversionError, match="--overwrite"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "--checkpoint", str(source), "--to", "caffe2"])
    assert set(TARGETS) == {"detectron2", "mmdet", "mmseg", "torchvision", "timm"}
