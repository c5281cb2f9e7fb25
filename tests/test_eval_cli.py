"""`densecl-bench eval <protocol>` end to end on checkpoints in several layouts."""

import json

import pytest
import torch

from baselines.backbone import create_backbone
from protocols.datasets import synthetic
from replication.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def svm_voc(tmp_path_factory):
    """160 images: every class has positives in both trainval and test."""
    return synthetic.generate(tmp_path_factory.mktemp("svmvoc") / "VOC2007", images=160, size=64, seed=0,
                              progress=False)


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(3)
    return create_backbone("resnet18").state_dict()


def save_layouts(weights, folder):
    """The same backbone weights as a torchvision state dict, an official DenseCL file and a MoCo file."""
    head = {"mlp.0.weight": torch.randn(512, 512), "mlp.0.bias": torch.zeros(512),
            "mlp.2.weight": torch.randn(128, 512), "mlp.2.bias": torch.zeros(128)}
    layouts = {
        "torchvision": {**weights, "fc.weight": torch.randn(1000, 512), "fc.bias": torch.zeros(1000)},
        "openselfsup": {"state_dict": {**{f"encoder_q.0.{k}": v for k, v in weights.items()},
                                       **{f"backbone.{k}": v for k, v in weights.items()},
                                       **{f"encoder_q.1.{k}": v for k, v in head.items()},
                                       "queue": torch.randn(128, 64), "queue_ptr": torch.zeros(1, dtype=torch.long)}},
        "moco": {"arch": "resnet18", "state_dict": {**{f"module.encoder_q.{k}": v for k, v in weights.items()},
                                                    "module.encoder_q.fc.0.weight": torch.randn(512, 512),
                                                    "module.encoder_q.fc.0.bias": torch.zeros(512)}},
    }
    paths = {}
    for name, obj in layouts.items():
        paths[name] = folder / f"{name}.pth"
        torch.save(obj, paths[name])
    return paths


def run_eval(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return captured


def stored(captured) -> dict:
    """The result.json whose path the command printed."""
    [path] = [line.removeprefix("result: ") for line in captured.out.splitlines() if line.startswith("result: ")]
    return json.loads(open(path).read())


def test_voc_svm_gives_the_same_map_for_every_layout_of_the_same_weights(svm_voc, weights, tmp_path, capsys):
    paths = save_layouts(weights, tmp_path)
    results = {}
    for name, path in paths.items():
        captured = run_eval(["eval", "voc-svm", "--checkpoint", str(path), "--arch", "resnet18", "--data", str(svm_voc),
                             "--costs", "1,0.01", "--layers", "feature4,feature5", "--workers", "0",
                             "--svm-workers", "1",
                             "--device", "cpu", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
                             "--results", str(tmp_path / "results")],
                            capsys)
        assert "feature5/mAP" in captured.out and "best/mAP" in captured.out
        results[name] = stored(captured)
    maps = {name: r["metrics"]["feature5/mAP"] for name, r in results.items()}
    assert len(set(maps.values())) == 1, maps
    assert 0 < maps["torchvision"] <= 100
    for name, r in results.items():
        assert r["checkpoint"]["format"] == name
        assert len(r["checkpoint"]["sha256"]) == 64
        assert r["protocol"] == "voc07_svm" and r["command"][:3] == ["densecl-bench", "eval", "voc-svm"]
        assert r["dataset"]["splits"] == {"trainval": 91, "test": 69}
        assert r["config"]["svm"]["costs"] == [1.0, 0.01]
        assert r["details"]["best_layer"] in ("feature4", "feature5")
        assert set(r["details"]["svm"]["feature5"]["chosen_cost"].values()) <= {1.0, 0.01}


def test_voc_lowshot_on_a_pretrained_checkpoint(svm_voc, pretrain_images, tmp_path, capsys):
    from conftest import tiny_config

    from baselines.train import pretrain

    pretrain(tiny_config(pretrain_images, tmp_path / "run", epochs=1, progress=False))
    captured = run_eval(["eval", "voc-lowshot", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "last.pth"),
                         "--data", str(svm_voc), "--costs", "1,0.01", "--ks", "1,2,64", "--samples", "2",
                         "--workers", "0", "--svm-workers", "1", "--device", "cpu", "--no-progress",
                         "--cache-dir", str(tmp_path / "cache"), "--results", str(tmp_path / "results")], capsys)
    assert "k=[64] need more images" in captured.err
    result = stored(captured)
    assert result["checkpoint"]["format"] == "densecl-bench/pretrain"
    assert result["config"]["low_shot"]["ks"] == [1, 2]
    for k in (1, 2):
        stats = [result["metrics"][f"feature5/k={k}/{s}"] for s in ("min", "mean", "max")]
        assert stats == sorted(stats)
    assert "test set" in result["details"]["low_shot"]["feature5"]["cost_selection"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpoint", "/nonexistent.pth"], "not found"),
        (["--checkpoint", "random", "--layers", "res5"], "unknown layer"),
        (["--checkpoint", "random", "--costs", "1,a"], "comma-separated float values"),
        (["--checkpoint", "random", "--arch", "resnet18", "--data", "/nonexistent/VOC2007"], "does not exist"),
        (["--checkpoint", "random", "--arch", "resnet18", "--solver", "libliner"], "invalid choice: 'libliner'"),
        (["--checkpoint", "random", "--arch", "resnet18", "--costs", "1,0"], "costs must be a non-empty list of "
         "positive numbers"),
    ],
)
def test_bad_input_is_one_line(argv, message, capsys):
    try:
        code = main(["eval", "voc-svm", *argv, "--device", "cpu"])
    except SystemExit as exit:  # argparse errors
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and message in err[-1] and "Traceback" not in "\n".join(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(capsys, tmp_path):
    code = main(["eval", "voc07_svm", "--checkpoint", "random", "--arch", "resnet18", "--solver", "batched",
                 "--device", "cuda", "--results", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "CUDA is not available on this machine" in err[0]


def test_wrong_architecture_names_both(weights, tmp_path, capsys):
    path = tmp_path / "r18.pth"
    torch.save(weights, path)
    code = main(["eval", "voc-svm", "--checkpoint", str(path), "--arch", "resnet50", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and "resnet18" in err and "resnet50" in err


def test_knn_and_linear_commands_run_on_a_random_init_baseline(voc_root, tmp_path, capsys):
    common = ["--checkpoint", "random", "--arch", "resnet18", "--data", str(voc_root), "--workers", "0",
              "--device", "cpu", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    captured = run_eval(["eval", "knn", *common, "--ks", "1,5", "--results", str(tmp_path / "results")], capsys)
    assert "top1@k=5" in captured.out
    knn = stored(captured)
    assert knn["checkpoint"]["format"] == "random-init" and knn["protocol"] == "knn_in1k"
    assert knn["pretraining"]["method"] == "random" and knn["scale"] == "small"
    assert 0 <= knn["metrics"]["top1@k=1"] <= knn["metrics"]["top5@k=1"] <= 100

    captured = run_eval(["eval", "linear_in1k_mhead", *common[:-2], "--probe-epochs", "1", "--image-size", "32",
                         "--batch-size", "8", "--layers", "feature5", "--work-dir", str(tmp_path / "state"),
                         "--results", str(tmp_path / "results")], capsys)
    linear = stored(captured)
    assert linear["schema"] == "densecl-bench/result" and linear["pipeline"] == "eval"
    assert linear["protocol"] == "linear_in1k_mhead" and linear["config"]["variant"] == "mhead"
    assert linear["config"]["probe_epochs"] == 1 and "feature5/top1" in linear["metrics"]
    assert (tmp_path / "state" / "linear_state.pt").is_file()


def test_dense_commands_name_the_install_when_the_mm_stack_is_missing(tmp_path, capsys):
    import importlib.util

    from protocols.transfer import MMStackMissing, require_mm_stack

    with pytest.raises(MMStackMissing, match=r"scripts/install_mm_stack.py"):
        require_mm_stack("densecl_bench_no_such_package")
    if importlib.util.find_spec("mmdet") is not None:
        pytest.skip("the OpenMMLab stack is installed here; the CLI path is covered without it (tox -e py)")
    code = main(["eval", "det_voc_c4", "--checkpoint", "random", "--arch", "resnet18", "--results", str(tmp_path),
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "install_mm_stack.py" in err[0] and "pip install -e '.[dense]'" in err[0]
