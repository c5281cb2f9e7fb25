"""A pretraining run stopped by a full disk or a double Ctrl-C exits, with its data-loading workers (issue 14).

Workers ignore SIGTERM and persist between epochs; an error that escaped used to leave Python's exit handler
joining them forever (seen with the disk full during a save at 2 workers, and with a double Ctrl-C during a
checkpoint write). Each run is a real `densecl-bench pretrain` in a subprocess whose OS is made to fail:
a preloaded module makes torch.save raise ENOSPC, or sends the process two SIGINTs, at the first checkpoint
write. The subprocess timeout only guards against the hang; nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S, REPO

pytestmark = pytest.mark.slow

TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--queue-size", "32", "--epochs", "1",
        "--workers", "2", "--device", "cpu", "--no-progress"]

# Loaded before the CLI: the first torch.save into checkpoints/ meets a full disk, or a user who presses
# Ctrl-C twice while it writes. Between the two signals the handler of the first runs (a loop is a point
# where CPython runs pending handlers).
FAILING_OS = textwrap.dedent('''
    import errno, os, signal
    import torch

    _save = torch.save

    def _let_signal_handlers_run():
        for _ in range(1000):
            pass

    def save(obj, f, *args, **kwargs):
        if "checkpoints" in str(getattr(f, "name", f)):
            if os.environ["FAILING_OS"] == "disk-full":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.kill(os.getpid(), signal.SIGINT)
            _let_signal_handlers_run()
            os.kill(os.getpid(), signal.SIGINT)
            _let_signal_handlers_run()
        return _save(obj, f, *args, **kwargs)

    torch.save = save
''')


def pretrain_on_a_failing_os(failure: str, data: Path, out: Path, preload: Path) -> subprocess.CompletedProcess:
    preload.mkdir(exist_ok=True)
    (preload / "failing_os.py").write_text(FAILING_OS)
    env = {**os.environ, "FAILING_OS": failure, "PYTHONPATH": os.pathsep.join([str(preload), str(REPO)]),
           "OMP_WAIT_POLICY": "PASSIVE"}
    code = "import failing_os, sys; from replication.cli import main; sys.exit(main(sys.argv[1:]))"
    try:
        return subprocess.run([sys.executable, "-c", code, "-q", "pretrain", *TINY, "--data", str(data),
                               "--out", str(out)], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"pretrain did not exit within {HANG_GUARD_S} s after the {failure}; stderr: "
                    f"{(hung.stderr or b'')[-2000:]!r}")


def test_a_full_disk_during_a_save_exits_with_one_line_at_two_workers(pretrain_images, tmp_path):
    out = tmp_path / "run"
    done = pretrain_on_a_failing_os("disk-full", pretrain_images, out, tmp_path / "preload")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr[-3000:]
    assert len(lines) == 1, lines
    assert f"cannot write checkpoint {out / 'checkpoints' / 'epoch_0001.pth'}: No space left on device" in lines[0]
    assert "--resume auto" in lines[0]
    assert not list((out / "checkpoints").iterdir())  # nothing half-written, no temporary file


def test_a_double_ctrl_c_during_a_checkpoint_write_exits_at_two_workers(pretrain_images, tmp_path):
    out = tmp_path / "run"
    done = pretrain_on_a_failing_os("double-ctrl-c", pretrain_images, out, tmp_path / "preload")
    assert done.returncode == 130, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == ["densecl-bench: interrupted"]
    assert not list((out / "checkpoints").iterdir())  # the cut-off write left no temporary file
