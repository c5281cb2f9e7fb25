"""The CI regression against known-bad changes (issue 14): each mutation must make it fail.

Each test copies the code (baselines/, protocols/, replication/ and the committed reference) into a
temporary folder, applies one plausible fidelity bug as a one-line text replacement (the original
text must occur exactly once, so a test fails loudly when the code moves), and runs
`python -m replication.regression` on the copy in a subprocess. A mutant is run with `--cross-stack`:
the exact digests, which any change upsets on the reference's own machine, are ignored, so the bug
must push a *banded* metric out of its band, as it would on any other machine. `--fail-fast` stops
at the first phase with a metric out of band: the same verdict as a full run, sooner. The unmutated
copy must pass a full run (with the digests too, on the reference's stack).

These runs take minutes, so the module only runs when asked: `-m slow` on the command line
(`.ci/run` does `tox -e py -- -m slow tests/test_regression_mutations.py`), or DENSECL_BENCH_MUTATIONS=1.
No assertion depends on wall time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

# name -> (file, original text, mutated text). Each is one plausible bug, one line.
MUTATIONS: dict[str, tuple[str, str, str]] = {
    # the two of issue 14
    "densecl_correspondence_reversed": (
        "baselines/densecl.py", "return similarity.max(dim=2).indices", "return similarity.max(dim=1).indices"),
    "svm_class_weight_equal": (
        "protocols/voc_svm.py", "CLASS_WEIGHT = {1: 2, -1: 1}", "CLASS_WEIGHT = {1: 1, -1: 1}"),
    # the pretraining algorithm
    "densecl_loss_not_convex": (
        "baselines/densecl.py", "loss = (1 - lam) * loss_global + lam * loss_dense",
        "loss = loss_global + lam * loss_dense"),
    "densecl_dense_queue_gets_global_keys": (
        "baselines/densecl.py", "dequeue_and_enqueue(self.queue2, self.queue2_ptr, k2)",
        "dequeue_and_enqueue(self.queue2, self.queue2_ptr, k)"),
    "moco_momentum_m_for_1_minus_m": (
        "baselines/moco.py", "momentum_update(self.encoder_q, self.encoder_k, self.momentum)",
        "momentum_update(self.encoder_q, self.encoder_k, 1.0 - self.momentum)"),
    "moco_enqueues_queries": (
        "baselines/moco.py", "dequeue_and_enqueue(self.queue, self.queue_ptr, k)  # after the loss",
        "dequeue_and_enqueue(self.queue, self.queue_ptr, q.detach())  # after the loss"),
    # the augmentations
    "crop_scale_moco_v1": (
        "baselines/augment.py", "transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0))",
        "transforms.RandomResizedCrop(image_size, scale=(0.08, 1.0))"),
    "grayscale_probability": (
        "baselines/augment.py", "transforms.RandomGrayscale(p=0.2)", "transforms.RandomGrayscale(p=0.1)"),
    # the backbone set-up (timm's fan_out instead of the official fan_in). Not zero_init_last=True: the official
    # re-init sets every BN weight to 1 afterwards, so that mutant changes nothing (bit-identical weights).
    "conv_init_fan_out": (
        "baselines/backbone.py", 'nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")',
        'nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")'),
    # the SVM protocols' feature extraction: squashed to 224 px straight, without the reference's Resize(256) first
    "svm_transform_without_resize_256": (
        "protocols/features.py", "T.Compose([T.Resize(256), T.Resize((224, 224)),", "T.Compose([T.Resize((224, 224)),"),
    # the SVM protocol: difficult training rows as positives instead of negatives (the batched solver's labels)
    "svm_difficult_rows_positive": (
        "protocols/svm_solver.py", "signed = np.where(train_y == 1, 1, -1).astype(np.int32)",
        "signed = np.where(train_y != 0, 1, -1).astype(np.int32)"),
}
PACKAGES = ("baselines", "protocols", "replication")
OUT_OF_BAND = re.compile(r"^(\S+)\s.*OUT OF BAND$", re.MULTILINE)


def _asked(config: pytest.Config) -> bool:
    expression = config.getoption("markexpr") or ""
    return ("slow" in expression and "not slow" not in expression) or os.environ.get("DENSECL_BENCH_MUTATIONS") == "1"


pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # a hang guard only: a run takes 1-4 minutes


@pytest.fixture(autouse=True)
def _only_when_asked(request):
    if not _asked(request.config):
        pytest.skip("minutes per test: run with `-m slow tests/test_regression_mutations.py` "
                    "or DENSECL_BENCH_MUTATIONS=1")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """The code and the committed reference, as the working tree has them."""
    root = tmp_path_factory.mktemp("code")
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "results" / "reference").mkdir(parents=True)
    shutil.copy2(REPO / "results" / "reference" / "regression.json", root / "results" / "reference")
    return root


def mutate(pristine: Path, target: Path, file: str, original: str, mutated: str) -> Path:
    shutil.copytree(pristine, target)
    path = target / file
    text = path.read_text()
    count = text.count(original)
    assert count == 1, f"{file}: the text to mutate occurs {count} times, not once (has the code moved?): {original!r}"
    path.write_text(text.replace(original, mutated))
    return target


def regression(code: Path, *flags: str) -> subprocess.CompletedProcess:
    """`python -m replication.regression` on a copy of the code (its own reference, the session's data cache)."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    return subprocess.run([sys.executable, "-m", "replication.regression", "--no-progress", *flags], cwd=code,
                          env=env, capture_output=True, text=True)


def test_unmutated_copy_passes(pristine):
    result = regression(pristine)
    assert result.returncode == 0, f"the unmutated regression failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    assert "OUT OF BAND" not in result.stdout


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_regression_catches_mutation(name, pristine, tmp_path):
    code = mutate(pristine, tmp_path / "code", *MUTATIONS[name])
    result = regression(code, "--cross-stack", "--fail-fast")
    caught = OUT_OF_BAND.findall(result.stdout)
    print(f"{name}: exit {result.returncode}, {len(caught)} metric(s) out of band: {', '.join(caught[:8])}")
    print(result.stdout)
    assert result.returncode != 0, f"{name} was not caught:\n{result.stdout}"
    assert caught, f"{name}: the regression failed without naming a metric out of band:\n{result.stderr[-3000:]}"
