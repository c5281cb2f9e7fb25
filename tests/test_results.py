"""Results store: round trip, unique ids, concurrent writers, crash safety, index rebuild, bad input."""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from baselines import infra
from baselines.infra import git_state
from protocols.result import ProtocolResult
from replication import results
from replication.results import (
    INDEX_COLUMNS,
    ResultsError,
    ResultsStore,
    read_run,
    runs_frame,
    to_jsonable,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_result(protocol: str = "voc07_svm", value: float = 81.5, seed: int = 0) -> ProtocolResult:
    return ProtocolResult(
        protocol=protocol,
        metrics={"feature5/mAP": value, "best/mAP": np.float64(value + 1), "n_layers": np.int64(2)},
        config={"seed": seed, "layers": ("feature4", "feature5"), "costs": np.array([0.1, 1.0]),
                "cache_dir": Path("/tmp/cache"), "svm": {"workers": 1}},
        dataset={"name": "synthetic-voc", "root": Path("/data/VOC2007"), "splits": {"trainval": 24, "test": 24},
                 "content_hash": "ab" * 32},
        checkpoint={"path": "/ckpt/densecl.pth", "sha256": "cd" * 32, "format": "densecl-bench"},
        timings={"features": 1.25, "svm": np.float32(0.5)},
        details={"best_layer": "feature5"},
        pretraining={"method": "densecl", "pretrain_data": "in1k", "epochs": 200, "arch": "resnet50", "seed": None},
        scale="paper",
    )


@pytest.fixture
def store(tmp_path) -> ResultsStore:
    return ResultsStore(tmp_path / "results")


@pytest.fixture(scope="module")
def figure():
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([1, 2, 4], [10, 20, 30])
    yield fig
    plt.close(fig)


class ExplodingFigure:
    """Stands in for a Figure whose rendering dies halfway through a run's write."""

    def savefig(self, path, **kwargs):
        Path(path).write_bytes(PNG_MAGIC)
        raise RuntimeError("renderer crashed")


def test_round_trip_keeps_every_field(store, figure, tmp_path):
    log = tmp_path / "train.log"
    log.write_text("epoch 1 loss 3.2\n")
    written = store.write_run("eval", make_result(seed=3), plots={"lowshot": figure},
                              extra_files={"logs/train.log": log, "notes.txt": "hello"}, command=["densecl-bench", "x"])
    [loaded] = store.load_runs()
    assert loaded.result == written.result
    data = json.loads((loaded.path / "result.json").read_text())
    assert data["schema"] == "densecl-bench/result" and data["schema_version"] == 2
    assert data["pretraining"] == {"method": "densecl", "pretrain_data": "in1k", "epochs": 200, "arch": "resnet50",
                                   "seed": None}
    assert data["scale"] == "paper" and loaded.scale == "paper" and loaded.pretraining["epochs"] == 200
    assert data["run_id"] == loaded.path.name and loaded.path.parent.name == "eval"
    assert data["protocol"] == "voc07_svm" and data["seed"] == 3
    assert data["metrics"] == {"feature5/mAP": 81.5, "best/mAP": 82.5, "n_layers": 2.0}
    assert data["config"]["layers"] == ["feature4", "feature5"]
    assert data["config"]["costs"] == [0.1, 1.0] and data["config"]["cache_dir"] == "/tmp/cache"
    assert data["dataset"] == {"name": "synthetic-voc", "root": "/data/VOC2007",
                               "splits": {"trainval": 24, "test": 24}, "content_hash": "ab" * 32}
    assert data["checkpoint"]["sha256"] == "cd" * 32 and data["checkpoint"]["format"] == "densecl-bench"
    assert data["timings"] == {"features": 1.25, "svm": 0.5}
    assert data["details"] == {"best_layer": "feature5"}
    assert data["command"] == ["densecl-bench", "x"]
    assert set(data["packages"]) >= {"python", "torch", "torchvision", "timm", "numpy", "sklearn", "faiss", "pandas"}
    assert data["packages"]["numpy"] == np.__version__
    assert data["device"]["cpu"] and isinstance(data["device"]["cuda"], list)
    assert set(data["git"]) == {"commit", "dirty"}
    assert pd.Timestamp(data["created"]).tzname() == "UTC"

    with open(loaded.metrics_csv, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["metric", "value"], ["feature5/mAP", "81.5"], ["best/mAP", "82.5"], ["n_layers", "2.0"]]
    [plot] = loaded.plots
    assert plot == loaded.path / "plots" / "lowshot.png"
    assert plot.read_bytes().startswith(PNG_MAGIC) and plot.stat().st_size > 500
    assert (loaded.path / "logs" / "train.log").read_text() == "epoch 1 loss 3.2\n"
    assert (loaded.path / "notes.txt").read_text() == "hello"

    [row] = store.read_index().to_dict("records")
    assert list(store.read_index().columns) == list(INDEX_COLUMNS)
    assert row["run_id"] == loaded.run_id and row["protocol"] == "voc07_svm" and row["seed"] == "3"
    assert row["checkpoint_sha256"] == "cd" * 6 and row["dataset"] == "synthetic-voc"
    assert json.loads(row["metrics"])["best/mAP"] == 82.5
    assert row["path"] == f"eval/{loaded.run_id}"


def test_dict_results_and_filters(store):
    store.write_run("eval", {"protocol": "knn", "metrics": {"top1": 40.0}, "config": {"seed": 1}})
    store.write_run("eval", make_result("voc07_svm"))
    store.write_run("replicate-voc", {"protocol": "voc07_svm", "metrics": {"best/mAP": 50.0}})
    assert [r.protocol for r in store.load_runs(pipeline="eval")] == ["knn", "voc07_svm"]
    assert [r.pipeline for r in store.load_runs(protocol="voc07_svm")] == ["eval", "replicate-voc"]
    assert store.latest(protocol="voc07_svm").pipeline == "replicate-voc"
    assert store.latest(protocol="linear") is None
    assert store.load_runs(pipeline="eval")[0].seed == 1


def test_ids_unique_and_sortable_within_one_second(store, monkeypatch):
    frozen = results._utc_now()
    monkeypatch.setattr(results, "_utc_now", lambda: frozen)
    records = [store.write_run("eval", {"protocol": "knn", "metrics": {"top1": i}}) for i in range(40)]
    ids = [r.run_id for r in records]
    assert len(set(ids)) == 40
    assert all(i.startswith(frozen.strftime("%Y%m%dT%H%M%SZ") + "-knn-") for i in ids)
    assert len(store.load_runs()) == 40 and len(store.read_index()) == 40


def test_id_collision_picks_another_and_explicit_id_never_overwrites(store, monkeypatch):
    first = store.write_run("eval", make_result(), run_id="fixed-id")
    with pytest.raises(ResultsError, match="never overwritten"):
        store.write_run("eval", make_result(value=1.0), run_id="fixed-id")
    ids = iter(["taken", "taken", "fresh"])
    store.write_run("eval", make_result(), run_id="taken")
    monkeypatch.setattr(results, "new_run_id", lambda protocol, when=None: next(ids))
    assert store.write_run("eval", make_result()).run_id == "fresh"
    assert read_run(first.path).metrics["feature5/mAP"] == 81.5


def _write_runs(root: str, worker: int, count: int) -> None:
    store = ResultsStore(root)
    for i in range(count):
        store.write_run("concurrent", {"protocol": "knn", "metrics": {"top1": worker * 100 + i}}, seed=worker)


def test_concurrent_writers_keep_index_complete(store):
    workers, per_worker = 4, 5
    infra.device_info()  # warm the cache so forked children do not probe devices
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_runs, args=(str(store.root), w, per_worker)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * workers
    index = store.read_index()
    assert len(index) == workers * per_worker and index["run_id"].is_unique
    assert sorted(json.loads(m)["top1"] for m in index["metrics"]) == sorted(
        float(w * 100 + i) for w in range(workers) for i in range(per_worker))
    scan = store.scan_runs()
    assert len(scan.records) == workers * per_worker and scan.skipped == []
    assert all((r.path / "metrics.csv").is_file() for r in scan.records)
    assert not [p for p in (store.root / "concurrent").iterdir() if p.name.startswith(".")]


def test_crash_mid_write_leaves_no_run_and_is_reported(store, figure):
    store.write_run("eval", make_result())
    with pytest.raises(ResultsError, match="renderer crashed") as info:
        store.write_run("eval", make_result(value=1.0), plots={"ok": figure, "boom": ExplodingFigure()})
    assert "partial output left in" in str(info.value) and "\n" not in str(info.value)
    folders = sorted(p.name for p in (store.root / "eval").iterdir())
    [partial] = [f for f in folders if f.startswith(".")]
    assert partial.endswith(".partial") and len(folders) == 2
    assert len(store.read_index()) == 1
    with pytest.warns(UserWarning, match="skipped 1 incomplete"):
        records = store.load_runs()
    assert [r.metrics["feature5/mAP"] for r in records] == [81.5]
    [skipped] = store.scan_runs().skipped
    assert skipped.path.name == partial and "unfinished" in skipped.reason


def test_folder_without_valid_result_is_skipped(store):
    good = store.write_run("eval", make_result())
    broken = store.root / "eval" / "20200101T000000Z-knn-aaaaaa"
    broken.mkdir()
    (broken / "result.json").write_text('{"schema": "densecl-bench/result", "sche')
    empty = store.root / "eval" / "20200101T000000Z-knn-bbbbbb"
    empty.mkdir()
    scan = store.scan_runs()
    assert [r.run_id for r in scan.records] == [good.run_id]
    assert {s.path for s in scan.skipped} == {broken, empty}
    assert any("missing" in s.reason for s in scan.skipped)


def test_unknown_schema_version_names_the_file(store):
    record = store.write_run("eval", make_result())
    file = record.path / "result.json"
    data = json.loads(file.read_text())
    data["schema_version"] = 99
    file.write_text(json.dumps(data))
    with pytest.raises(ResultsError, match=f"{file}: unknown schema_version 99"):
        store.load_runs()


def test_schema_1_runs_read_their_pretraining_from_the_pipeline_config(store):
    """Runs stored before schema 2 kept method, seed and scale under config.replication; they stay judgeable."""
    record = store.write_run("replicate-voc", {**make_result().to_dict(), "pretraining": {}, "scale": "",
                                               "config": {"replication": {"method": "mocov2", "seed": 2,
                                                                          "scale": "small", "pretrain_epochs": 10,
                                                                          "pretrain_data": "synthetic-voc",
                                                                          "arch": "resnet18", "batch": "b1"}}})
    file = record.path / "result.json"
    data = json.loads(file.read_text())
    data["schema_version"] = 1
    for key in ("pretraining", "scale"):
        data.pop(key)
    file.write_text(json.dumps(data))
    [old] = store.load_runs()
    assert old.scale == "small" and old.batch == "b1"
    assert old.pretraining == {"method": "mocov2", "pretrain_data": "synthetic-voc", "epochs": 10, "arch": "resnet18",
                               "seed": 2, "log": None}
    assert old.as_result().pretraining["method"] == "mocov2"


def test_rebuild_index_reproduces_it(store, figure):
    for seed in range(3):
        store.write_run("eval", make_result(seed=seed), plots={"p": figure} if seed == 0 else None)
    store.write_run("replicate-voc", {"protocol": "voc07_lowshot", "metrics": {"k=1/mAP": 12.0}})
    before = store.read_index().sort_values("run_id").reset_index(drop=True)
    store.index_path.unlink()
    store.rebuild_index()
    after = store.read_index().sort_values("run_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)
    store.index_path.write_text("garbage,\n\"unterminated")
    store.rebuild_index()
    assert len(store.read_index()) == 4


def test_runs_frame_has_one_row_per_run_and_metric(store):
    store.write_run("eval", make_result(seed=1))
    store.write_run("eval", {"protocol": "knn", "metrics": {"top1": float("nan")}, "config": {"arch": "resnet18"}})
    frame = runs_frame(store.load_runs(), config_keys=["arch", "svm.workers"])
    assert len(frame) == 4
    assert set(frame["metric"]) == {"feature5/mAP", "best/mAP", "n_layers", "top1"}
    knn = frame[frame["protocol"] == "knn"].iloc[0]
    assert np.isnan(knn["value"]) and knn["arch"] == "resnet18" and pd.isna(knn["svm.workers"])
    assert frame[frame["metric"] == "best/mAP"]["svm.workers"].item() == 1
    assert list(runs_frame([]).columns)[-3:] == ["metric", "value", "path"]


def test_unwritable_root_fails_at_creation(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    root = blocker / "results"
    with pytest.raises(ResultsError, match=f"results folder {root} is not writable") as info:
        ResultsStore(root)
    assert "\n" not in str(info.value)
    with pytest.raises(ResultsError, match=f"cannot list {root}"):
        ResultsStore(root, read_only=True).load_runs()
    assert ResultsStore(tmp_path / "missing", read_only=True).load_runs() == []


def test_read_only_directory_fails_at_creation(tmp_path):
    root = tmp_path / "locked"
    root.mkdir()
    root.chmod(0o500)
    try:
        probe = root / "probe"
        try:
            probe.write_text("")
            probe.unlink()
            pytest.skip("this user can write into a read-only directory (root)")
        except OSError:
            pass
        assert not os.access(root, os.W_OK)
        with pytest.raises(ResultsError, match="not writable"):
            ResultsStore(root)
    finally:
        root.chmod(0o700)


def test_bad_values_are_converted_or_named(store):
    assert to_jsonable({"a": (1, np.int32(2)), Path("k"): np.array([[1.5]]), 3: {np.bool_(True)}}) == {
        "a": [1, 2], "k": [[1.5]], "3": [True]}
    assert to_jsonable(float("inf")) is None
    with pytest.raises(ResultsError, match=r"config\.model: cannot store a object"):
        store.write_run("eval", {"protocol": "knn", "metrics": {}, "config": {"model": object()}})
    with pytest.raises(ResultsError, match=r"metrics\.top1: expected a number"):
        store.write_run("eval", {"protocol": "knn", "metrics": {"top1": "high"}})
    with pytest.raises(ResultsError, match="unknown field"):
        store.write_run("eval", {"protocol": "knn", "metrics": {}, "environment": {}})
    with pytest.raises(ResultsError, match="pipeline"):
        store.write_run("../escape", make_result())
    with pytest.raises(ResultsError, match="extra file name"):
        store.write_run("eval", make_result(), extra_files={"../x": "y"})
    assert not (store.root / "eval").exists() and not store.index_path.exists()


def test_git_info_outside_a_repository_is_unknown(tmp_path, monkeypatch):
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert git_state(outside) == {"commit": "unknown", "dirty": "unknown"}
    record = ResultsStore(tmp_path / "results", source_dir=outside).write_run("eval", make_result())
    assert record.git == {"commit": "unknown", "dirty": "unknown"}
    assert store_row(record.path.parents[1])["git_commit"] == "unknown"
    monkeypatch.setenv("PATH", "")
    assert git_state() == {"commit": "unknown", "dirty": "unknown"}


def test_git_info_inside_this_repository():
    if shutil.which("git") is None or git_state()["commit"] == "unknown":
        pytest.skip("the code is not in a git checkout here")
    state = git_state()
    assert len(state["commit"]) == 40 and isinstance(state["dirty"], bool)


def test_only_code_changes_make_the_tree_dirty(tmp_path):
    """The store rewrites the tracked results/index.csv itself: that must not mark its own runs dirty."""
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("no git")
    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")
    (repo / "results" / "index.csv").write_text("run_id\n")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "init"]):
        subprocess.run(["git", *command], cwd=repo, check=True, env=env)
    (repo / "results" / "index.csv").write_text("run_id\nnew\n")
    assert git_state(repo)["dirty"] is False
    (repo / "code.py").write_text("x = 2\n")
    assert git_state(repo)["dirty"] is True


def store_row(root: Path) -> dict[str, str]:
    [row] = ResultsStore(root, read_only=True).read_index().to_dict("records")
    return row


@pytest.fixture
def results_log():
    """The records `densecl_bench.results` logs, whatever handlers the CLI set up earlier in the session."""
    records: list = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("densecl_bench.results")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_a_writer_killed_between_rename_and_index_append_loses_no_run(store, monkeypatch, results_log):
    kept = store.write_run("eval", make_result(value=1.0))

    def killed(self, rows):
        raise SystemExit("killed between the rename and the index append")

    monkeypatch.setattr(ResultsStore, "_append_index_rows", killed)
    with pytest.raises(SystemExit):
        store.write_run("eval", make_result(value=2.0))
    monkeypatch.undo()
    [orphan] = [r for r in store.scan_runs().records if r.run_id != kept.run_id]
    assert list(store.read_index()["run_id"]) == [kept.run_id]

    reopened = ResultsStore(store.root)
    assert sorted(reopened.read_index()["run_id"]) == sorted([kept.run_id, orphan.run_id])
    [warning] = [r for r in results_log if r.levelno == logging.WARNING]
    assert f"eval/{orphan.run_id}" in warning.getMessage() and "added them" in warning.getMessage()
    assert reopened.check() == []
    ResultsStore(store.root)  # a second open finds nothing more to add
    assert len(ResultsStore(store.root, read_only=True).read_index()) == 2


def test_a_read_only_store_reports_unindexed_runs_without_writing(store, results_log):
    record = store.write_run("eval", make_result())
    store.index_path.write_text(",".join(INDEX_COLUMNS) + "\n")
    ResultsStore(store.root, read_only=True)
    [warning] = [r for r in results_log if r.levelno == logging.WARNING]
    assert f"eval/{record.run_id}" in warning.getMessage() and "results repair" in warning.getMessage()
    assert store.index_path.read_text() == ",".join(INDEX_COLUMNS) + "\n"


def test_check_names_each_problem_and_repair_rebuilds_the_index(store, capsys):
    from replication.cli import main

    first = store.write_run("eval", make_result(value=1.0))
    second = store.write_run("eval", make_result(value=2.0))
    rows = store.index_path.read_text().splitlines()
    store.index_path.write_text("\n".join([rows[0], rows[1], rows[1]]) + "\n")  # second's row lost, first's twice
    ghost = store.root / "eval" / ".20200101T000000Z-knn-abcdef.partial"
    ghost.mkdir()
    problems = ResultsStore(store.root, read_only=True).check()
    assert any(str(second.path) in p and "missing from" in p for p in problems)
    assert any(f"eval/{first.run_id} is listed 2 times" in p for p in problems)
    assert any(str(ghost) in p and "not a complete run" in p for p in problems)

    assert main(["results", "check", "--results", str(store.root)]) == 1
    out = capsys.readouterr().out
    assert "3 problem(s)" in out and "densecl-bench results repair" in out
    assert main(["results", "repair", "--results", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "2 problem(s) fixed" in out and f"left as it is: {ghost}" in out
    assert sorted(store.read_index()["run_id"]) == sorted([first.run_id, second.run_id])
    ghost.rmdir()
    assert main(["results", "check", "--results", str(store.root)]) == 0


def test_nothing_is_created_until_a_run_is_written(tmp_path):
    root = tmp_path / "deep" / "results"
    store = ResultsStore(root)
    assert not (tmp_path / "deep").exists() and store.load_runs() == [] and store.check() == []
    assert list(tmp_path.iterdir()) == []  # the writability probe leaves nothing behind
    store.write_run("eval", make_result())
    assert len(store.read_index()) == 1
