import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml
from conftest import REPO, tiny_config

from baselines.backbone import create_backbone
from baselines.config import ConfigError
from baselines.infra import Interrupted
from baselines.train import NonFiniteLossError, PretrainConfig, cosine_lr, pretrain


def final_state(out):
    return torch.load(out / "checkpoints" / "last.pth", weights_only=True)


def assert_same_weights(a, b):
    assert a["position"] == b["position"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


@pytest.fixture(scope="module")
def reference_run(pretrain_images, tmp_path_factory):
    """One uninterrupted run: 2 epochs x 6 iterations, ghost BN so that the key shuffle draws RNG."""
    out = tmp_path_factory.mktemp("reference")
    backbone_path = pretrain(tiny_config(pretrain_images, out, bn_group_size=4))
    return out, backbone_path


def test_run_writes_checkpoints_log_config_and_backbone(reference_run):
    out, backbone_path = reference_run
    state = final_state(out)
    assert state["position"] == {"epoch": 2, "iteration": 0, "global_step": 12}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001.pth", "epoch_0002.pth", "last.pth"]
    assert int(state["state_dict"]["queue_ptr"]) == (12 * 8) % 32
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    assert {"loss", "loss_global", "loss_dense", "acc_global", "acc_dense", "lr", "images_per_s"} <= set(records[0])
    assert [r["lr"] for r in records] == [0.03] * 3 + [pytest.approx(0.015)] * 3  # cosine, per epoch
    assert yaml.safe_load((out / "config.yaml").read_text())["queue_size"] == 32
    exported = torch.load(backbone_path, weights_only=True)
    backbone = create_backbone("resnet18")
    backbone.load_state_dict(exported["state_dict"], strict=True)
    for key, value in exported["state_dict"].items():
        assert torch.equal(value, state["state_dict"][f"encoder_q.0.{key}"])


def test_cosine_schedule_per_epoch_without_warmup():
    assert cosine_lr(0.3, 0, 800) == 0.3
    assert cosine_lr(0.3, 799, 800) == pytest.approx(1.157e-06, rel=1e-3)  # the official log's last epoch
    assert cosine_lr(0.03, 100, 200) == pytest.approx(0.015)


def test_interrupt_mid_epoch_then_resume_is_bit_identical(reference_run, pretrain_images, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(pretrain_images, out, workers=1, bn_group_size=4)

    def interrupt_after_first_log():
        log = out / "log.jsonl"
        while not (log.exists() and log.read_text().strip()):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_after_first_log, daemon=True).start()
    with pytest.raises(Interrupted, match="continue with --resume auto"):
        pretrain(cfg)
    stopped = final_state(out)["position"]
    assert stopped["global_step"] < 12 and stopped["iteration"] > 0  # stopped inside an epoch
    pretrain(tiny_config(pretrain_images, out, resume="auto", bn_group_size=4))
    assert_same_weights(final_state(out), final_state(reference_run[0]))
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12]  # no duplicated or lost records


def test_kill_then_resume_is_bit_identical(reference_run, pretrain_images, tmp_path):
    """SIGKILL leaves only the last epoch checkpoint; resuming from it reproduces the run exactly."""
    out = tmp_path / "run"
    args = ["--config", str(tmp_path / "cfg.yaml")]
    cfg = tiny_config(pretrain_images, out, bn_group_size=4)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({k: v for k, v in vars(cfg).items()}))
    proc = subprocess.Popen([sys.executable, "-m", "replication", "pretrain", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "checkpoints" / "epoch_0001.pth"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert first.exists(), proc.stderr.read().decode()[-2000:]
    assert final_state(out)["position"]["epoch"] == 1
    pretrain(tiny_config(pretrain_images, out, resume="auto", bn_group_size=4))
    assert_same_weights(final_state(out), final_state(reference_run[0]))


def test_reusing_a_finished_run_keeps_its_backbone_file(reference_run, pretrain_images):
    """Every pipeline batch that reuses a finished pretraining calls pretrain(); its backbone.pth must keep its
    bytes, or the sha256 that earlier results and resumable dense runs recorded stops matching (found when an
    interrupted C4 run refused to resume after another batch had reused its checkpoints)."""
    out, backbone_path = reference_run
    before = hashlib.sha256(backbone_path.read_bytes()).hexdigest(), backbone_path.stat().st_ino
    assert pretrain(tiny_config(pretrain_images, out, resume="auto", bn_group_size=4)) == backbone_path
    # the inode too: an atomic re-export replaces the file, even where its provenance bytes come out the same
    assert (hashlib.sha256(backbone_path.read_bytes()).hexdigest(), backbone_path.stat().st_ino) == before


def test_resume_refuses_changed_settings_and_existing_runs(reference_run, pretrain_images):
    out = reference_run[0]
    with pytest.raises(ConfigError, match="already holds a run"):
        pretrain(tiny_config(pretrain_images, out, bn_group_size=4))
    with pytest.raises(ConfigError, match=r"different settings \(lr: 0.03 -> 0.1\)"):
        pretrain(tiny_config(pretrain_images, out, resume="auto", lr=0.1, bn_group_size=4))


def test_non_finite_loss_stops_with_the_last_good_checkpoint_intact(pretrain_images, tmp_path):
    cfg = tiny_config(pretrain_images, tmp_path, lr=1e30, save_every_iters=1, epochs=1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 1, iteration 2 \(step 2\); "
                                                 r"the last good checkpoint is"):
        pretrain(cfg)
    state = final_state(tmp_path)
    assert state["position"]["global_step"] == 1
    assert not (tmp_path / "backbone.pth").exists()


def test_ghost_bn_bf16_and_channels_last_options_run(pretrain_images, tmp_path):
    cfg = tiny_config(pretrain_images, tmp_path, method="mocov2", epochs=1, bn_group_size=4, amp="bf16",
                      channels_last=True, lambda_warmup_iters=2)
    pretrain(cfg)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records) and "loss_dense" not in records[0]


def test_validation_names_every_problem(pretrain_images, tmp_path):
    with pytest.raises(ConfigError, match="queue_size 30 is not divisible by batch_size 8"):
        tiny_config(pretrain_images, tmp_path, queue_size=30).validate()
    with pytest.raises(ConfigError, match="unknown method 'simclr'"):
        tiny_config(pretrain_images, tmp_path, method="simclr").validate()
    with pytest.raises(ConfigError, match="does not split into ghost-BN groups of 3"):
        tiny_config(pretrain_images, tmp_path, bn_group_size=3).validate()
    with pytest.raises(ConfigError, match="no pretraining data"):
        PretrainConfig(out=str(tmp_path)).validate()


def test_halves_order_refuses_a_queue_that_would_hold_own_keys(pretrain_images, tmp_path):
    with pytest.raises(ConfigError, match=r"at most N/2 - B = 16 for 48 images"):
        pretrain(tiny_config(pretrain_images, tmp_path / "run", epoch_order="halves", queue_size=32))
