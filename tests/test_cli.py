import json
import shutil

import pytest

from replication.cli import main

TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--queue-size", "32", "--epochs", "1",
        "--workers", "0", "--device", "cpu"]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1
    last = err[-1]
    assert "error:" in last and "Traceback" not in "\n".join(err)
    return last


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--data", "/nonexistent/images"], 1, "pretraining data not found: /nonexistent/images"),
        (["--queue-size", "30"], 2, "queue_size 30 is not divisible by batch_size 8"),
        (["--method", "simclr"], 2, "argument --method: invalid choice: 'simclr'"),
        (["--arch", "resnet5"], 1, "unknown architecture 'resnet5'"),
        (["--epochs", "many"], 2, "argument --epochs: expected int, got 'many'"),
        (["--lerning-rate", "0.1"], 2, "unrecognized arguments: --lerning-rate"),
    ],
)
def test_bad_input_is_one_line_naming_the_problem(extra, code, message, pretrain_images, tmp_path, capsys):
    args = ["pretrain", *TINY, "--data", str(pretrain_images), "--out", str(tmp_path / "run"), *extra]
    assert run(args) == code
    assert message in error_line(capsys)


def run(args: list[str]) -> int:
    """The exit status, whether main returns it or argparse exits with it."""
    try:
        return main(args)
    except SystemExit as exit_:
        return exit_.code


def test_config_typo_suggests_the_key(tmp_path, pretrain_images, capsys):
    (tmp_path / "cfg.yaml").write_text("bach_size: 8\n")
    assert run(["pretrain", "--config", str(tmp_path / "cfg.yaml"), "--data", str(pretrain_images),
                "--out", str(tmp_path / "r")]) == 2
    assert "unknown key 'bach_size' (did you mean 'batch_size'?)" in error_line(capsys)
    assert run(["pretrain", "--config", "no_such_preset"]) == 2
    assert "neither a file nor a preset (presets: densecl_coco_800ep" in error_line(capsys)
    (tmp_path / "bad.yaml").write_text("epochs: ten\n")
    assert run(["pretrain", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "'epochs' must be int, got 'ten'" in error_line(capsys)


def test_empty_folder_and_corrupt_image(tmp_path, pretrain_images, capsys):
    (tmp_path / "empty").mkdir()
    assert run(["pretrain", *TINY, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r1")]) == 1
    assert "no images in folder" in error_line(capsys)

    data = tmp_path / "imgs"
    shutil.copytree(pretrain_images, data)
    (data / "000003.jpg").write_bytes(b"\xff\xd8 truncated")
    args = ["pretrain", *TINY, "--workers", "1", "--data", str(data)]
    assert run([*args, "--out", str(tmp_path / "r2")]) == 1
    assert "cannot read image " + str(data / "000003.jpg") in error_line(capsys)

    assert run([*args, "--out", str(tmp_path / "r3"), "--skip-bad-images"]) == 0
    assert (tmp_path / "r3" / "bad_images.txt").read_text() == str(data / "000003.jpg") + "\n"
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err


def test_pretrain_defaults_to_the_synthetic_images(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(["pretrain", "--config", "small_cpu", *TINY, "--method", "mocov2"]) == 0
    captured = capsys.readouterr()
    assert "using the synthetic images in" in captured.err
    assert (tmp_path / "runs" / "mocov2-resnet18" / "backbone.pth").exists()
    assert "done: backbone" in captured.out


def test_data_synth_writes_the_voc_layout(tmp_path, capsys):
    assert run(["data", "synth", "--out", str(tmp_path / "voc"), "--images", "6", "--size", "40", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "wrote a synthetic VOC-layout dataset" in out
    assert json.loads((tmp_path / "voc" / "dataset.json").read_text())["images"] == 6
    assert len(list((tmp_path / "voc" / "JPEGImages").glob("*.jpg"))) == 6
    assert run(["data", "synth", "--out", str(tmp_path / "voc")]) == 1
    assert "already exists" in error_line(capsys)
