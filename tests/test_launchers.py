"""Job fan-out of the replicate pipelines: K local processes and Slurm job arrays (submitit) give the batch the
sequential run gives, a failed job is reported with its log and retried alone, and bad launcher input is one line.

Each job is a fresh `densecl-bench replicate job` process, so these tests run real subprocesses at tiny scale."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from protocols.datasets import synthetic
from replication.cli import main
from replication.launchers import (
    BatchJobs,
    JobsFailed,
    LauncherError,
    LocalProcesses,
    Slurm,
    job_command,
    make_launcher,
)
from replication.pipelines import STATE_FILE, ReplicateVOCConfig, replicate_voc
from replication.results import ResultsStore

TINY = dict(arch="resnet18", image_size=32, epochs=1, batch_size=8, lr=0.03, queue_size=16, epoch_order="halves",
            workers=0, save_every=1, log_every=2)
# The SVM protocols at their smallest: two costs, low-shot k in {1, 2} twice.
SVM = dict(costs=(1.0, 0.01), ks=(1, 2), samples=2, workers=0, device="cpu", progress=False)


@pytest.fixture(scope="module")
def svm_voc(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("svm-voc") / "VOC2007", images=160, size=64, seed=0,
                              progress=False)


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("preset") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return str(path)


@pytest.fixture(autouse=True)
def job_bytecode(tmp_path_factory, monkeypatch):
    """Where bytecode is not written (PYTHONDONTWRITEBYTECODE), every job process compiles torch and timm again
    (~10 CPU-seconds each); a private bytecode cache makes that once per test session."""
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        monkeypatch.delenv("PYTHONDONTWRITEBYTECODE")
        monkeypatch.setenv("PYTHONPYCACHEPREFIX", str(tmp_path_factory.getbasetemp() / "job-bytecode"))


def stored(results: Path) -> dict[str, dict]:
    """`<job>/<step>` -> result.json of every protocol run in the store."""
    runs = {}
    for record in ResultsStore(results, read_only=True).load_runs("replicate-voc"):
        info = record.config.get("replication")
        if info:
            runs[f"{info['job']}/{info['step']}"] = record.result
    return runs


# ---------------------------------------------------------------------------------------------- the same batch


@pytest.mark.slow
@pytest.mark.timeout(900)  # 4 pretrainings and 8 protocol runs twice, 12 of them as processes: ~3-5 min busy
def test_two_local_jobs_at_once_give_the_sequential_report(svm_voc, pretrain_images, tiny_preset, tmp_path,
                                                           monkeypatch):
    def batch(name: str, launcher) -> dict:
        monkeypatch.setenv("DENSECL_BENCH_CACHE", str(tmp_path / name / "cache"))  # features computed again
        cfg = ReplicateVOCConfig(preset=tiny_preset, pretrain_images=str(pretrain_images), voc_root=str(svm_voc),
                                 seeds=(0, 1), random_baseline=False, dense_probe=False, threads=1,
                                 runs=str(tmp_path / name / "runs"), results=str(tmp_path / name / "results"), **SVM)
        return replicate_voc(cfg, launcher)

    sequential = batch("sequential", make_launcher("local"))
    parallel = batch("parallel", make_launcher("local", jobs=2))
    assert isinstance(make_launcher("local", jobs=2), LocalProcesses)

    # Everything but the batch id in the title: tables, verdicts, intervals, reasons.
    report = [p["report"].read_text().splitlines() for p in (sequential, parallel)]
    assert report[0][0] != report[1][0] and report[0][1:] == report[1][1:]
    text = "\n".join(report[0])
    assert "## Claims these runs could judge" in text and "dir.voc07_svm.map.densecl-vs-mocov2.f5" in text
    verdicts = [p["report"].with_name("verdicts.csv").read_text() for p in (sequential, parallel)]
    assert verdicts[0] == verdicts[1]
    # Every metric of every run, at full precision, and the same checkpoints.
    runs = [stored(tmp_path / name / "results") for name in ("sequential", "parallel")]
    assert sorted(runs[0]) == sorted(runs[1]) and len(runs[0]) == 8
    for key, result in runs[0].items():
        assert result["metrics"] == runs[1][key]["metrics"], key
        assert result["config"]["replication"]["threads"] == 1
    for method in ("mocov2", "densecl"):  # pretrained in separate processes, bit-identical weights
        import torch

        weights = [torch.load(tmp_path / name / "runs" / "tiny" / f"{method}-seed1" / "backbone.pth",
                              weights_only=True)["state_dict"] for name in ("sequential", "parallel")]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    logs = sorted(p.name for p in (tmp_path / "parallel" / "runs" / "jobs" / "logs").iterdir())
    assert len(logs) == 12 and "pretrain__densecl-seed0.log" in logs and "mocov2-seed1__voc07_lowshot.log" in logs
    state = json.loads((tmp_path / "parallel" / "runs" / STATE_FILE).read_text())
    assert state["done"] == parallel["runs"] and len(state["pretrained"]) == 4 and state["config"]["threads"] == 1


# ---------------------------------------------------------------------------------------------- failures


@pytest.fixture
def checkpoints(tmp_path) -> dict[str, Path]:
    """Two resnet18 files in the torchvision layout, as a user would give them (paper-scale mode)."""
    import torch

    from baselines.backbone import create_backbone

    paths = {}
    for seed, method in enumerate(("densecl", "mocov2")):
        torch.manual_seed(seed)
        paths[method] = tmp_path / f"{method}.pth"
        torch.save(create_backbone("resnet18").state_dict(), paths[method])
    return paths


def slurm_here() -> Slurm:
    """The Slurm launcher with submitit's local executor: the same submission, run on this machine."""
    return Slurm(gpus_per_job=0, cpus_per_job=1, time_min=10, cluster="local", poll_s=0.5)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("launcher", [lambda: LocalProcesses(2), slurm_here], ids=["local-jobs-2", "submitit-local"])
def test_failed_jobs_are_reported_with_their_log_and_only_they_run_again(launcher, svm_voc, checkpoints, tmp_path,
                                                                          bench_log):
    good = checkpoints["mocov2"].read_bytes()
    checkpoints["mocov2"].write_bytes(b"this is not a checkpoint\n")  # a real bad input: its 2 jobs fail
    cfg = ReplicateVOCConfig(voc_root=str(svm_voc), checkpoints={k: str(v) for k, v in checkpoints.items()},
                             arch="resnet18", runs=str(tmp_path / "runs"), results=str(tmp_path / "results"), **SVM)
    with pytest.raises(JobsFailed) as failed:
        replicate_voc(cfg, launcher())
    assert sorted(f.key for f in failed.value.failures) == ["mocov2-seed0/voc07_lowshot", "mocov2-seed0/voc07_svm"]
    message = str(failed.value)
    assert "\n" not in message and message.startswith("2 of 4 job(s) failed") and "runs only the failed" in message
    for failure in failed.value.failures:
        assert f"{failure.key} (log {failure.log})" in message
        assert str(checkpoints["mocov2"]) in failure.log.read_text()  # the log says what was wrong with it
    first = stored(tmp_path / "results")
    assert sorted(first) == ["densecl-seed0/voc07_lowshot", "densecl-seed0/voc07_svm"]
    assert not list((tmp_path / "results" / "replicate-voc").glob("*-report-*"))  # the report waits

    checkpoints["mocov2"].write_bytes(good)  # fixed: the same command retries only the two failed jobs
    bench_log.clear()
    outcome = replicate_voc(cfg, launcher())
    again = stored(tmp_path / "results")
    assert len(again) == 4 and all(again[key]["run_id"] == first[key]["run_id"] for key in first)
    launched = [line for line in bench_log.text.splitlines() if ": started" in line or ": submitted" in line]
    assert sorted(line.split(": ")[0].split()[-1] for line in launched) == [
        "mocov2-seed0/voc07_lowshot", "mocov2-seed0/voc07_svm"]
    assert bench_log.text.count("already stored") == 2 and outcome["report"].is_file()


# A coordinator in its own process, as a user starts one: the batch with one job at a time (so one is running
# when the signal comes and the others wait), 130 and the message on a stop, as replication.cli.main does.
COORDINATOR = """
import json, sys
from baselines.infra import Interrupted, setup_logging
from replication.launchers import LocalProcesses
from replication.pipelines import ReplicateVOCConfig, replicate_voc
setup_logging(0)
try:
    replicate_voc(ReplicateVOCConfig(**json.loads(sys.argv[1])), LocalProcesses(1))
except Interrupted as err:
    print(f"densecl-bench: {err}", file=sys.stderr)
    sys.exit(130)
"""


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat_file.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the job process in /proc")
@pytest.mark.parametrize("target", ["coordinator-sigterm", "job-sigint"])
def test_a_stopped_batch_starts_no_more_jobs_and_resumes(target, svm_voc, checkpoints, tmp_path, bench_log):
    """SIGTERM to the coordinator (scancel, kill, a closing terminal) stops its running job and starts no other;
    a job stopped on its own (exit 130) stops the batch instead of counting as a failure and starting the next."""
    cfg = dict(voc_root=str(svm_voc), checkpoints={k: str(v) for k, v in checkpoints.items()}, arch="resnet18",
               runs=str(tmp_path / "runs"), results=str(tmp_path / "results"), **{**SVM, "costs": list(SVM["costs"]),
                                                                                 "ks": list(SVM["ks"])})
    err_path = tmp_path / "coordinator.err"
    with open(err_path, "wb") as err:
        coordinator = subprocess.Popen([sys.executable, "-c", COORDINATOR, json.dumps(cfg)], stderr=err,
                                       stdin=subprocess.DEVNULL, cwd=os.getcwd())
    deadline = time.monotonic() + 300
    while not children(coordinator.pid) and coordinator.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    (job,) = children(coordinator.pid)
    time.sleep(2)  # the job is importing or computing: either way it must stop and say so
    if target == "coordinator-sigterm":
        coordinator.send_signal(signal.SIGTERM)
    else:
        os.kill(job, signal.SIGINT)
    coordinator.wait(timeout=120)
    lines = err_path.read_text().splitlines()
    assert coordinator.returncode == 130 and lines[-1].startswith("densecl-bench: protocol-1: stopped ("), lines[-3:]
    assert "running the same command again resumes the rest" in lines[-1]
    assert not alive(job), "the job outlived its coordinator"
    assert sum(": started" in line for line in lines) == 1, "a job started after the stop"
    assert not any("failed" in line for line in lines) and stored(tmp_path / "results") == {}

    if target == "job-sigint":  # the same batch, run again, runs all four jobs
        bench_log.clear()
        replicate_voc(ReplicateVOCConfig(**{**cfg, "costs": SVM["costs"], "ks": SVM["ks"]}), LocalProcesses(2))
        assert len(stored(tmp_path / "results")) == 4


# ---------------------------------------------------------------------------------------------- Slurm arrays


def test_a_slurm_stage_is_one_array_of_the_job_commands(tmp_path, monkeypatch):
    """sbatch replaced by a script that records what it was given: the array's #SBATCH lines and each task's
    pickled command are what the flags ask for (no job runs)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in (("sbatch", f"cp \"$1\" {tmp_path / 'submitted.sh'}\necho 'Submitted batch job 4242'"),
                         ("srun", "exit 1")):  # submitit wants srun on the machine that submits
        (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    runs = tmp_path / "runs"
    keys = ["densecl-seed0/voc07_svm", "mocov2-seed0/voc07_svm", "random-seed0/voc07_svm"]
    launcher = make_launcher("slurm", partition="gpu", gpus_per_job=2, cpus_per_job=16, time_min=90,
                             array_parallelism=2)
    jobs = launcher.submit("protocol", keys, BatchJobs(runs, lambda key: None, threads=8))

    script = (tmp_path / "submitted.sh").read_text().splitlines()
    for line in ("--array=0-2%2", "--partition=gpu", "--gpus-per-node=2", "--cpus-per-task=16", "--time=90",
                 "--nodes=1", "--ntasks-per-node=1", "--job-name=densecl-protocol"):
        assert f"#SBATCH {line}" in script, line
    assert [job.job_id for job in jobs.values()] == ["4242_0", "4242_1", "4242_2"]
    for key, job in jobs.items():
        with open(job.paths.submitted_pickle, "rb") as f:
            task = pickle.load(f).function
        assert task.command == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                "-m", "replication", "replicate", "job", str(runs.resolve()), key]
        assert task.threads == 8 and task.cwd == os.getcwd()


def test_job_commands_are_the_cli_and_torchrun_only_for_several_gpus(tmp_path):
    one = job_command(tmp_path, "pretrain/densecl-seed0", gpus=1)
    assert one == [sys.executable, "-m", "replication", "replicate", "job", str(tmp_path.resolve()),
                   "pretrain/densecl-seed0"]
    assert job_command(tmp_path, "k", gpus=0) == job_command(tmp_path, "k", gpus=1)
    assert job_command(tmp_path, "k", gpus=4)[1:5] == ["-m", "torch.distributed.run", "--standalone",
                                                       "--nproc_per_node=4"]


def test_local_jobs_get_their_own_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert [slot["CUDA_VISIBLE_DEVICES"] for slot in LocalProcesses(2, gpus_per_job=2).gpu_slots()] == ["0,1", "2,3"]
    assert [slot["CUDA_VISIBLE_DEVICES"] for slot in LocalProcesses(6).gpu_slots()] == ["0", "1", "2", "3", "0", "1"]
    with pytest.raises(LauncherError, match="--jobs 3 with --gpus-per-job 2 needs 6 GPUs; 4 visible"):
        LocalProcesses(3, gpus_per_job=2).gpu_slots()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert LocalProcesses(2).gpu_slots() == [{}, {}]  # no GPUs: the jobs run on the CPU as they would anyway


def test_the_svm_steps_of_a_checkpoint_never_run_at_the_same_time():
    """They fill the same feature cache entry; the dense probe and other checkpoints run beside them."""
    from replication.pipelines import PIPELINES, protocol_steps, waves

    cfg = ReplicateVOCConfig(voc_root=".", seeds=(0, 1), random_baseline=False)
    grouped = waves(protocol_steps(PIPELINES["replicate-voc"], cfg))
    assert [sorted({key.split("/")[1] for key in wave}) for wave in grouped] == [
        ["seg_voc_dense_probe", "voc07_svm"], ["voc07_lowshot"]]
    assert all(len(wave) == 8 if "densecl-seed0/voc07_svm" in wave else len(wave) == 4 for wave in grouped)


def test_a_second_coordinator_on_the_same_runs_is_refused(tmp_path):
    from replication.pipelines import PipelineError, coordinator_lock

    cfg = ReplicateVOCConfig(runs=str(tmp_path / "runs"), results=str(tmp_path / "results"), progress=False)
    with coordinator_lock(tmp_path / "runs"), pytest.raises(PipelineError, match="another pipeline is running"):
        replicate_voc(cfg)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("flags, code, message", [
    (["--jobs", "0"], 2, "--jobs must be at least 1, got 0"),
    (["--partition", "gpu"], 2, "--partition applies to --launcher slurm only"),
    (["--launcher", "slurm", "--jobs", "2"], 2, "--jobs applies to --launcher local"),
    (["--launcher", "slurm", "--gpus-per-job", "-1"], 2, "--gpus-per-job must be at least 0"),
])
def test_bad_launcher_flags_are_one_line(flags, code, message, tmp_path, capsys):
    assert main(["replicate", "voc", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
                 *flags]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "runs").exists()


def test_slurm_without_submitit_or_srun_is_one_line(monkeypatch, tmp_path, capsys):
    command = ["replicate", "dense", "--launcher", "slurm", "--runs", str(tmp_path / "runs")]
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun: not a Slurm machine
    assert main(command) == 1
    assert "no srun here" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "submitit", None)  # what `import submitit` meets where it is not installed
    assert main(command) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'densecl-bench[slurm]'" in err[0]


def test_a_job_that_cannot_reach_its_batch_is_one_line(tmp_path, capsys):
    assert main(["replicate", "job", str(tmp_path / "elsewhere"), "densecl-seed0/voc07_svm"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the batch's runs folder" in err[0] and "shared filesystem" in err[0]
