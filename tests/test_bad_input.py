"""Every bad input of issue 14 through the real command line: one line naming the file or setting, exit code != 0."""

from __future__ import annotations

import builtins
import datetime
import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from baselines.backbone import create_backbone
from replication.cli import main

TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--queue-size", "32", "--epochs", "2",
        "--workers", "0", "--device", "cpu", "--no-progress"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def one_line(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and the only stderr line of `densecl-bench -q ARGV` (-q: no progress information)."""
    try:
        code = main(["-q", *argv])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return code, lines[0]


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def damaged(kind: str) -> bytes:
    """A file of our own kind cut off, emptied, replaced by text, or holding an object weights_only refuses."""
    good = torch_bytes({"format": "densecl-bench/pretrain", "state_dict": {"w": torch.zeros(64, 64)}})
    return {"truncated": good[: len(good) // 2], "empty": b"", "text": b"not a checkpoint\n",
            "objects": torch_bytes({"format": "densecl-bench/pretrain", "when": datetime.datetime(2026, 1, 1)})}[kind]


REASONS = {"truncated": "a damaged or truncated torch file", "empty": "the file is empty (a write was cut off)",
           "text": "a text file, not a torch file", "objects": "it holds Python objects, which are never unpickled"}


# ------------------------------------------------------------------------------------------- pretraining data


@pytest.mark.parametrize("present", [0, 40], ids=["all-missing", "some-missing"])
def test_list_file_with_missing_images_names_them(present, pretrain_images, tmp_path, capsys):
    """Used to say "2 images cannot fill one global batch of 16" or "queue_size 16 must be at most N/2 - B = -6"."""
    real = sorted(p.name for p in pretrain_images.iterdir())[:present]
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"{name} 0\n" for name in [*real, "gone/a.jpg", "gone/b.jpg"]))
    code, line = one_line(["pretrain", *TINY, "--data", str(listing), "--data-root", str(pretrain_images),
                           "--out", str(tmp_path / "run")], capsys)
    assert code == 1
    assert f"list file {listing}: 2 of {present + 2} listed images do not exist" in line
    assert str(pretrain_images / "gone" / "a.jpg") in line and "--data-root" in line


def test_missing_listed_images_are_skipped_when_asked(pretrain_images, tmp_path, capsys):
    """--skip-bad-images keeps a list with a few missing images going, says so, and lists them."""
    listing = tmp_path / "train.txt"
    real = sorted(p.name for p in pretrain_images.iterdir())[:14]
    listing.write_text("".join(f"{name}\n" for name in [*real, "gone/a.jpg", "gone/b.jpg"]))
    out = tmp_path / "run"
    code = main(["-q", "pretrain", *TINY, "--epochs", "1", "--queue-size", "8", "--data", str(listing),
                 "--data-root", str(pretrain_images), "--out", str(out), "--skip-bad-images"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "2 of 16 listed images do not exist" in err and "skipped as unreadable" in err
    assert sorted((out / "bad_images.txt").read_text().split()) == [str(pretrain_images / "gone" / n)
                                                                     for n in ("a.jpg", "b.jpg")]


def test_an_image_given_as_data_is_named_as_an_image(pretrain_images, tmp_path, capsys):
    """Used to say "'utf-8' codec can't decode byte 0xff"."""
    image = next(pretrain_images.glob("*.jpg"))
    code, line = one_line(["pretrain", *TINY, "--data", str(image), "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    assert f"data {image} is an image, not a folder of images or a list file" in line


# ------------------------------------------------------------------------------------------- resuming


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_resume_auto_with_no_readable_checkpoint_names_the_file(kind, pretrain_images, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    for name in ("last.pth", "epoch_0001.pth"):
        (out / "checkpoints" / name).write_bytes(damaged(kind))
    code, line = one_line(["pretrain", *TINY, "--data", str(pretrain_images), "--out", str(out),
                           "--resume", "auto"], capsys)
    assert code == 2
    assert f"cannot read checkpoint {out / 'checkpoints' / 'last.pth'}: {REASONS[kind]}" in line
    assert "no kept epoch checkpoint" in line and "start a new --out" in line


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_resume_from_an_unreadable_checkpoint_names_the_file(kind, pretrain_images, tmp_path, capsys):
    path = tmp_path / "given.pth"
    path.write_bytes(damaged(kind))
    code, line = one_line(["pretrain", *TINY, "--data", str(pretrain_images), "--out", str(tmp_path / "run"),
                           "--resume", str(path)], capsys)
    assert code == 2
    assert f"cannot read checkpoint {path}: {REASONS[kind]}; resume from another checkpoint" in line


# ------------------------------------------------------------------------------------------- devices


@NO_CUDA
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_pretrain_on_cuda_without_cuda(device, pretrain_images, tmp_path, capsys):
    code, line = one_line(["pretrain", *TINY, "--device", device, "--data", str(pretrain_images),
                           "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and f"device {device}: CUDA is not available on this machine; use --device cpu" in line
    assert not (tmp_path / "run").exists()


@NO_CUDA
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_eval_on_cuda_without_cuda(device, voc_root, tmp_path, capsys):
    code, line = one_line(["eval", "linear_in1k_mhead", "--checkpoint", "random", "--arch", "resnet18", "--data",
                           str(voc_root), "--device", device, "--results", str(tmp_path / "results")], capsys)
    assert code != 0 and f"--device {device}: CUDA is not available on this machine" in line


def test_a_device_that_is_not_one(pretrain_images, tmp_path, capsys):
    code, line = one_line(["pretrain", *TINY, "--device", "gpu", "--data", str(pretrain_images),
                           "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "device 'gpu' is not a device: use auto, cpu, cuda or cuda:N" in line


# ------------------------------------------------------------------------------------------- convert


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("source") / "r18.pth"
    torch.save(create_backbone("resnet18").state_dict(), path)
    return path


@pytest.fixture
def read_only_folder(tmp_path, monkeypatch) -> Path:
    """A folder nothing can be written in: chmod where that binds, else (as root) the OS refusal simulated."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    real_open = builtins.open

    def refusing_open(file, mode="r", *args, **kwargs):
        if any(m in mode for m in "wax+") and Path(os.fsdecode(file)).resolve().parent == folder.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    monkeypatch.setattr(io, "open", refusing_open)  # pathlib opens through io.open
    yield folder


def test_convert_into_a_read_only_folder(backbone_file, read_only_folder, capsys):
    out = read_only_folder / "r18_tv.pth"
    code, line = one_line(["convert", "--checkpoint", str(backbone_file), "--to", "torchvision", "--out", str(out)],
                          capsys)
    assert code == 1
    assert f"cannot write {out}: folder {read_only_folder} is not writable (Permission denied)" in line
    assert "choose another --out" in line and not list(read_only_folder.iterdir())


@pytest.mark.parametrize("kind", ["truncated", "empty", "text"])
def test_convert_of_a_corrupt_checkpoint(kind, tmp_path, capsys):
    source = tmp_path / "source.pth"
    source.write_bytes(damaged(kind))
    out = tmp_path / "out.pth"
    code, line = one_line(["convert", "--checkpoint", str(source), "--to", "torchvision", "--out", str(out)], capsys)
    assert code == 1
    assert f"cannot read {source}: {REASONS[kind]}; convert a PyTorch checkpoint or a detectron2 .pkl" in line
    assert not out.exists()


# ------------------------------------------------------------------------------------------- eval state files


@pytest.mark.parametrize("kind", ["truncated", "text", "objects"])
def test_eval_linear_with_a_corrupt_state(kind, voc_root, tmp_path, capsys):
    work = tmp_path / "state"
    work.mkdir()
    (work / "linear_state.pt").write_bytes(damaged(kind))
    code, line = one_line(["eval", "linear_in1k_mhead", "--checkpoint", "random", "--arch", "resnet18",
                           "--data", str(voc_root), "--workers", "0", "--device", "cpu", "--no-progress",
                           "--probe-epochs", "1", "--image-size", "32", "--batch-size", "8", "--layers", "feature5",
                           "--work-dir", str(work), "--results", str(tmp_path / "results")], capsys)
    assert code == 2
    assert f"cannot read linear-probe state {work / 'linear_state.pt'}: {REASONS[kind]}" in line
    assert "delete it to start the probe afresh, or give another --work-dir" in line


@pytest.fixture(scope="module")
def svm_voc(tmp_path_factory) -> Path:
    """160 images: every class has positives in both trainval and test (the SVM protocols require it)."""
    from protocols.datasets import synthetic

    return synthetic.generate(tmp_path_factory.mktemp("svmvoc") / "VOC2007", images=160, size=64, seed=0,
                              progress=False)


def test_low_shot_sample_file_holding_objects_is_named(svm_voc, tmp_path, capsys):
    """Used to say "Object arrays cannot be loaded when allow_pickle=False" without the file."""
    samples = tmp_path / "samples"
    samples.mkdir()
    path = samples / "train_targets_sample1_k1.npy"
    np.save(path, np.array([{"not": "labels"}], dtype=object), allow_pickle=True)
    code, line = one_line(["eval", "voc07_lowshot", "--checkpoint", "random", "--arch", "resnet18",
                           "--data", str(svm_voc), "--sample-dir", str(samples), "--ks", "1", "--samples", "1",
                           "--costs", "1", "--workers", "0", "--svm-workers", "1", "--device", "cpu",
                           "--no-progress", "--cache-dir", str(tmp_path / "cache"),
                           "--results", str(tmp_path / "results")], capsys)
    assert code != 0 and f"{path}" in line and "Python objects" in line

