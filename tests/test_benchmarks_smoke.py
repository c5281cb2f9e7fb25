"""`benchmarks/gpu_check.py --device cpu --tiny` runs every section and prints every row (issue 13).

The script is meant for a GPU, but the project never requires one: the tiny CPU run is what keeps it working
where there is none. The det/seg rows must say why they are skipped when the OpenMMLab stack is missing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
from conftest import HANG_GUARD_S, REPO

METHODS = ("MoCo-v2", "DenseCL")
EXPECTED = (
    [("pretrain", name)
     for precision in ("fp32", "bf16")
     for name in [f"{precision} {mode} {what}"
                  for mode in ("compute-only", "end-to-end")
                  for what in ("step time DenseCL/MoCo-v2", *METHODS)]
     + [f"{precision} peak memory {method}" for method in METHODS]]
    + [("svm", "full protocol, one layer"), ("svm", "full protocol fits"), ("knn", "weighted k-NN"),
       ("features", "VOC07 SVM features, 5 layers")]
    + [("detseg", f"{model} training iteration") for model in ("voc-c4", "coco-fpn", "voc-fcn", "cityscapes-fcn")]
)


def mm_stack_present() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("mmcv", "mmdet", "mmseg"))


@pytest.mark.slow
def test_gpu_check_tiny_on_cpu_prints_every_row(tmp_path):
    table = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--json", str(table)], capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.startswith("device cpu") and "\nsettings tiny" in done.stdout
    rows = json.loads(table.read_text())["rows"]
    assert [(r["section"], r["name"]) for r in rows] == EXPECTED
    lines = done.stdout.splitlines()
    for r in rows:
        assert any(line.startswith(r["section"]) and f" {r['name']} " in line for line in lines), r
        skipped = "peak memory" in r["name"] or (r["section"] == "detseg" and not mm_stack_present())
        if skipped:
            assert r["value"] is None and r["note"].startswith("skipped: "), r
        else:
            assert r["value"] is not None and math.isfinite(r["value"]) and r["value"] > 0, r
