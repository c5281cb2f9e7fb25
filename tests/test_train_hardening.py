"""Pretraining under bad settings, broken files and blow-ups: one line, never a bad checkpoint (issue 14)."""

from __future__ import annotations

import datetime
import io
import json
import os

import pytest
import torch
from conftest import tiny_config

from baselines.config import ConfigError
from baselines.train import NonFiniteLossError, non_finite_tensors, pretrain

TIME_FIELDS = ("images_per_s", "time")


@pytest.mark.parametrize("setting, message", [
    (dict(lr=0.0), "lr must be a finite number > 0, got 0.0; a run at lr 0 cannot learn"),
    (dict(lr=float("nan")), "lr must be a finite number > 0, got nan"),
    (dict(temperature=float("nan")), "temperature must be a finite number > 0, got nan"),
    (dict(moco_momentum=1.0), r"moco_momentum must lie in \[0, 1\)"),
])
def test_bad_numbers_are_refused_before_any_work(setting, message, pretrain_images, tmp_path):
    with pytest.raises(ConfigError, match=message):
        tiny_config(pretrain_images, tmp_path / "run", **setting).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_setting_error(pretrain_images, tmp_path):
    with pytest.raises(ConfigError, match="device cuda:0: CUDA is not available on this machine"):
        pretrain(tiny_config(pretrain_images, tmp_path / "run", device="cuda:0"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.fixture(scope="module")
def finished(pretrain_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    pretrain(tiny_config(pretrain_images, out, progress=False))
    return out


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "objects"])
def test_resume_auto_falls_back_from_an_unreadable_last_checkpoint(damage, finished, pretrain_images, tmp_path,
                                                                   bench_log):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    last = out / "checkpoints" / "last.pth"
    data = last.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "empty": b"", "text": b"not a checkpoint\n",
               "objects": _torch_bytes({"format": "densecl-bench/pretrain", "when": datetime.datetime(2026, 1, 1)})}
    for name in ("last.pth", "epoch_0002.pth"):  # last.pth is a hard link to epoch_0002.pth: damage both
        (out / "checkpoints" / name).unlink()
        (out / "checkpoints" / name).write_bytes(damaged[damage])
    pretrain(tiny_config(pretrain_images, out, resume="auto", progress=False))
    err = bench_log.text
    reason = {"truncated": "a damaged or truncated torch file", "empty": "the file is empty",
              "text": "a text file, not a torch file", "objects": "it holds Python objects"}[damage]
    assert f"cannot read checkpoint {last}: {reason}" in err and "epoch_0001.pth instead" in err
    assert "resuming" in err and "at epoch 2" in err
    assert torch.load(last, weights_only=True)["position"]["epoch"] == 2


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_resume_with_no_readable_checkpoint_is_one_line(finished, pretrain_images, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for path in (out / "checkpoints").iterdir():
        path.unlink()
        path.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"the file is empty .* no kept epoch checkpoint .* is readable") as err:
        pretrain(tiny_config(pretrain_images, out, resume="auto", progress=False))
    assert "\n" not in str(err.value)


def test_a_blow_up_never_writes_non_finite_weights(pretrain_images, tmp_path):
    """lr 1e6 used to stop with inf in a BN running_var of the 'last good' checkpoint."""
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"the last good checkpoint is|no checkpoint was written yet"):
        pretrain(tiny_config(pretrain_images, out, lr=1e6, save_every_iters=1, epochs=2, progress=False))
    for path in (out / "checkpoints").glob("*.pth"):
        state = torch.load(path, weights_only=True)
        assert non_finite_tensors({"model": state["state_dict"], "optimizer": state["optimizer"]["state"]}) == [], path


def _dead_pid() -> int:
    for pid in range(4_000_000, 4_100_000):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    pytest.skip("no free process id found")


def test_temp_files_of_killed_writes_are_removed_at_the_next_start(pretrain_images, tmp_path, bench_log):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    dead = _dead_pid()
    stale = [out / "checkpoints" / f".last.pth.{dead}.tmp", out / "checkpoints" / f".epoch_0001.pth.{dead}.tmp"]
    for path in stale:
        path.write_bytes(b"x" * 2048)
    keep = out / "checkpoints" / "notes.tmp"  # not our naming pattern: never touched
    keep.write_text("mine")
    pretrain(tiny_config(pretrain_images, out, epochs=1, progress=False))
    assert not any(p.exists() for p in stale) and keep.exists()
    assert "removed 2 temporary file(s) of interrupted writes" in bench_log.text


def test_log_after_a_resume_equals_the_uninterrupted_log(pretrain_images, tmp_path):
    """The averaging window is part of the checkpoint, so the resumed run's records match (times aside)."""
    import signal
    import threading
    import time

    from baselines.infra import Interrupted

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain(tiny_config(pretrain_images, straight, log_every=4, progress=False))

    def interrupt_after_first_record():
        log = resumed / "log.jsonl"
        while not (log.exists() and log.read_text().strip()):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_after_first_record, daemon=True).start()
    with pytest.raises(Interrupted):
        pretrain(tiny_config(pretrain_images, resumed, log_every=4, progress=False))
    stopped = torch.load(resumed / "checkpoints" / "last.pth", weights_only=True)
    assert stopped["position"]["global_step"] % 4 != 0 and stopped["log_window"]  # stopped inside a window
    pretrain(tiny_config(pretrain_images, resumed, log_every=4, resume="auto", progress=False))

    def records(out):
        return [{k: v for k, v in json.loads(line).items() if k not in TIME_FIELDS}
                for line in (out / "log.jsonl").read_text().splitlines()]

    assert records(resumed) == records(straight)
