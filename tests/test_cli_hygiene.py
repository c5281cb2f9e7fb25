"""The command line's hygiene: --help without heavy imports, one line for user errors and a traceback for bugs,
choices in the help, logging that a progress bar survives, and a failed command that leaves no results folder."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from baselines.config import ConfigError
from baselines.infra import get_logger, setup_logging
from replication import cli
from replication.cli import COMMANDS, build_parser, is_user_error, main
from replication.results import ResultsStore

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "sklearn", "faiss", "matplotlib", "pandas", "submitit")
# Runs `main(argv)` in a fresh interpreter and prints which heavy modules it imported.
PROBE = """
import json, sys
from replication.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit_:
    code = exit_.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}), file=sys.stderr)
""" % (HEAVY,)  # noqa: UP031 -- the probe is code full of braces; %r keeps it readable


def help_imports(*argv: str) -> tuple[str, list[str]]:
    """(the help text, the heavy modules imported) of `densecl-bench ARGV`; asserts it exited 0."""
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["code"] == 0, done.stderr[-2000:]
    return done.stdout, report["heavy"]


# Any `eval` call builds every protocol's flags, so one `eval <protocol> --help` imports all their declarations.
@pytest.mark.parametrize("argv", [
    ["--help"], ["eval", "--help"], ["eval", "linear_in1k_mhead", "--help"], ["report", "--help"],
    ["results", "check", "--help"], ["claims", "list", "--help"], ["data", "synth", "--help"], ["regression", "--help"],
    ["pretrain", "--help"], ["convert", "--help"], ["replicate", "voc", "--help"], ["replicate", "dense", "--help"],
    ["replicate", "job", "--help"],
])
def test_help_imports_no_heavy_library(argv):
    text, heavy = help_imports(*argv)
    assert "usage: densecl-bench" in text and heavy == []


def test_the_full_parser_builds_and_the_top_help_lists_every_command(capsys):
    build_parser()  # every command in full, as a command's own --help builds it
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    assert all(f"    {name} " in listing for name in COMMANDS)


def test_choices_show_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "knn_in1k", "--help"])
    text = capsys.readouterr().out
    assert "--method {mocov2,densecl," in text and "--layer {feature1,feature2" in text


def test_unexpected_errors_keep_their_traceback(monkeypatch, capsys):
    def broken(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(cli, "cmd_regression", broken)
    assert main(["regression"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: an internal invariant broke" in err
    assert "this is a bug, please report it" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("error, code", [
    (ConfigError("--lr must be positive"), 2), (FileNotFoundError("data /x does not exist"), 1),
    (OSError(28, "No space left on device"), 1),
])
def test_user_errors_are_one_line(error, code, monkeypatch, capsys):
    def failing(args):
        raise error

    monkeypatch.setattr(cli, "cmd_regression", failing)
    assert main(["regression"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("densecl-bench: error: ")


def test_a_worker_error_is_judged_by_its_original_class():
    wrapped = "Caught {} in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n  ...\n{}"
    assert is_user_error(RuntimeError(wrapped.format("X", "baselines.config.ConfigError: bad value")))
    assert not is_user_error(RuntimeError(wrapped.format("KeyError", "KeyError: 'image'")))
    assert not is_user_error(ValueError("a bug"))


def test_a_failed_eval_leaves_no_results_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["eval", "voc07_svm", "--checkpoint", "random", "--data", str(tmp_path / "missing")])
    assert code == 1 and "does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_report_latest_takes_the_pipeline_that_ran_last(tmp_path, capsys):
    store = ResultsStore(tmp_path / "results")
    for pipeline, batch in (("replicate-voc", "b1"), ("replicate-dense", "b2")):
        store.write_run(pipeline, {"protocol": "voc07_svm", "metrics": {}, "config": {"replication": {"batch": batch}}})
    assert cli._newest_batch_pipeline(store) == "replicate-dense"
    assert main(["report", "--latest", "--runs", "x", "--results", str(store.root)]) == 2
    assert "--latest picks the newest batch" in capsys.readouterr().err


def test_log_lines_go_through_tqdm_and_quiet_hides_them(capsys):
    from tqdm import tqdm

    setup_logging(0)
    with tqdm(total=2, file=sys.stderr) as bar:
        get_logger("probe").info("half way")
        bar.update(1)
    err = capsys.readouterr().err
    assert "[probe] half way\n" in err
    setup_logging(-1)
    get_logger("probe").info("hidden")
    get_logger("probe").warning("shown")
    err = capsys.readouterr().err
    assert "hidden" not in err and "[probe] shown" in err
    logging.getLogger("densecl_bench").setLevel(logging.CRITICAL)  # how a library user silences everything
    get_logger("probe").warning("silenced")
    assert "silenced" not in capsys.readouterr().err
    setup_logging(0)
