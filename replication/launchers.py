"""Where a pipeline batch's jobs run: in this process, as K processes on this machine, or as Slurm job arrays.

A job is one pretraining (`pretrain/<method>-seed<N>`) or one protocol run (`<method>-seed<N>/<step>`). Every
launcher but the in-process one runs a job as the command a user could type themselves,

    densecl-bench replicate job <runs> <key>          (one process; `python -m replication ...`)
    torchrun --standalone --nproc_per_node G -m replication replicate job <runs> <key>   (G GPUs)

which reads the batch's settings from `<runs>/pipeline_state.json`, so a job can never run with settings other
than its batch's. Launchers only run commands and say which ones failed; the coordinating process (the
pipeline) is the one writer of the pipeline state, and marks each job as its result comes back.

This module imports neither torch nor submitit: `--help` stays light, and submitit is needed only for Slurm.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from baselines.config import ConfigError
from baselines.infra import Interrupted, StopRequest, UserError, get_logger

LOG = get_logger("launch")
LAUNCHERS = ("local", "slurm")
JOBS_DIR = "jobs"  # under the batch's runs folder: per-job logs and submitit's files
SLURM_DEFAULTS = dict(gpus_per_job=1, cpus_per_job=10, time=240, array_parallelism=64)
LOCAL_POLL_S = 0.5
SLURM_POLL_S = 30.0
# How a job process ends when a signal stopped it: 130 after saving its state (replication.cli.main), or killed by
# the signal itself when it came before Python's handlers were installed.
STOPPED_EXITS = (130, -signal.SIGINT, -signal.SIGTERM)


OnDone = Callable[[str, "str | None"], None]  # (job key, its run id when the launcher knows it)


class LauncherError(UserError):
    """A launcher that cannot run here (submitit missing, a bad flag); one line."""


@dataclass(frozen=True)
class Failure:
    """A job that did not finish: its key, the log to read, and why (the log's last line, or submitit's)."""

    key: str
    log: Path
    reason: str


class JobsFailed(UserError, RuntimeError):
    """Some jobs failed; the finished ones are stored, and a re-run of the same command runs only the rest."""

    def __init__(self, failures: Sequence[Failure], total: int) -> None:
        self.failures = list(failures)
        listed = "; ".join(f"{f.key} (log {f.log})" for f in self.failures)
        super().__init__(f"{len(self.failures)} of {total} job(s) failed: {listed}; finished jobs are stored, and "
                         "running the same command again runs only the failed ones and those waiting on them")


@dataclass(frozen=True)
class BatchJobs:
    """What a launcher needs to know about a batch: where its runs folder is and how to run a job in-process."""

    runs: Path  # holds pipeline_state.json; the jobs folder is inside it
    run_here: Callable[[str], str | None]  # runs one job in this process; a protocol job returns its run id
    threads: int  # torch (OpenMP) threads of every job: a batch setting, since CPU numbers depend on it

    @property
    def folder(self) -> Path:
        return self.runs / JOBS_DIR

    def log_path(self, key: str) -> Path:
        """`<runs>/jobs/logs/<key with / as __>.log`: one file per job, appended by every attempt."""
        return self.folder / "logs" / (key.replace("/", "__") + ".log")


def job_command(runs: Path, key: str, gpus: int = 0, python: str = sys.executable) -> list[str]:
    """The command that runs job `key` of the batch in `runs`: torchrun with G processes when G > 1 GPUs.

    `--standalone` lets torchrun pick a free port, so two jobs on one node do not collide."""
    args = ["-m", "replication", "replicate", "job", str(Path(runs).resolve()), key]
    if gpus > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *args]
    return [python, *args]


def last_line(log: Path) -> str:
    """The last non-empty line of a log (where our one-line errors go), or '' when there is none."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def machine_threads() -> int:
    """This machine's default: what torch uses here (its cores, or $OMP_NUM_THREADS)."""
    import torch

    return torch.get_num_threads()


class Launcher(Protocol):
    description: str

    def default_threads(self) -> int:
        """Threads per job when the batch does not set them."""
        ...

    def run(self, stage: str, keys: Sequence[str], batch: BatchJobs,
            on_done: OnDone) -> list[Failure]:
        """Run `keys`; call `on_done` in this thread as each finishes well; return the ones that failed."""
        ...


class InProcess:
    """Today's behaviour: jobs one after another in this process; an error stops the batch with its message."""

    description = "in this process"

    def default_threads(self) -> int:
        return machine_threads()

    def run(self, stage: str, keys: Sequence[str], batch: BatchJobs,
            on_done: OnDone) -> list[Failure]:
        for key in keys:
            on_done(key, batch.run_here(key))
        return []


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The GPUs this process may hand out: those in $CUDA_VISIBLE_DEVICES, else every device torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


class LocalProcesses:
    """K jobs at once on this machine, each in its own process, on its own GPUs when there are some.

    Each job gets the batch's thread count, by default this machine's, whatever K: the numbers of a CPU run
    depend on its thread count (parallel float sums), and a batch must not depend on how it was scheduled.
    K jobs of T threads each on fewer than K * T cores share them (OpenMP threads sleep when idle, see cli.py);
    `--threads` splits the cores instead, for a batch whose numbers then differ slightly."""

    def __init__(self, jobs: int, gpus_per_job: int | None = None, poll_s: float = LOCAL_POLL_S) -> None:
        self.jobs, self.gpus_per_job, self.poll_s = jobs, gpus_per_job, poll_s
        self.description = f"{jobs} at a time as local processes"
        if gpus_per_job is not None:
            self.description += f" on {gpus_per_job} GPU(s) each"

    def default_threads(self) -> int:
        return machine_threads()

    def gpu_slots(self) -> list[dict[str, str]]:
        """Per slot (one running job each), the GPUs it sees: G of its own with --gpus-per-job G, else one per
        job, shared round-robin when the jobs outnumber the GPUs; no change without GPUs."""
        gpus = visible_gpus()
        per = self.gpus_per_job
        if per is None:
            return [{"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]} if gpus else {} for slot in range(self.jobs)]
        if per * self.jobs > len(gpus):
            raise LauncherError(f"--jobs {self.jobs} with --gpus-per-job {per} needs {per * self.jobs} GPUs; "
                                f"{len(gpus)} visible here")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[slot * per:(slot + 1) * per])} for slot in range(self.jobs)]

    def run(self, stage: str, keys: Sequence[str], batch: BatchJobs,
            on_done: OnDone) -> list[Failure]:
        if not keys:
            return []
        env = {**os.environ, "OMP_NUM_THREADS": str(batch.threads)}
        slots = self.gpu_slots()
        if min(self.jobs, len(keys)) * batch.threads > usable_cores():
            LOG.info("%s: %d jobs at once with %d thread(s) each share %d cores (--threads splits them, for slightly "
                     "different numbers)", stage, min(self.jobs, len(keys)), batch.threads, usable_cores())
        queue, free, running, failures = list(keys), list(range(self.jobs)), {}, []
        stopped_by = ""  # why no more jobs start: the coordinator was signalled, or a job was stopped
        try:
            with StopRequest() as stop:
                while running or (queue and not stopped_by):
                    if stop.requested and not stopped_by:
                        stopped_by = f"signal {stop.signal}"
                        self._stop(running, stop.signal)
                    while queue and free and not stopped_by:
                        key, slot = queue.pop(0), free.pop(0)
                        running[key] = (self._start(key, batch, {**env, **slots[slot]}, self.gpus_per_job or 0),
                                        slot, time.monotonic())
                    finished = [key for key, (process, _, _) in running.items() if process.poll() is not None]
                    for key in finished:
                        process, slot, started = running.pop(key)
                        free.append(slot)
                        log = batch.log_path(key)
                        if process.returncode == 0:
                            LOG.info("%s: done in %.0f s", key, time.monotonic() - started)
                            on_done(key, None)
                        elif process.returncode in STOPPED_EXITS:
                            LOG.warning("%s: stopped (exit code %d); log %s", key, process.returncode, log)
                            if not stopped_by:  # someone stopped a job: the batch stops, it does not go on
                                stopped_by = f"{key} was stopped"
                                self._stop(running, signal.SIGINT)
                        else:
                            failures.append(Failure(key, log, last_line(log) or f"exit code {process.returncode}"))
                            LOG.error("%s: failed (exit code %d): %s; log %s", key, process.returncode,
                                      failures[-1].reason, log)
                    if not finished:
                        time.sleep(self.poll_s)
        finally:
            for process, _, _ in running.values():  # an error or a second signal: stop what still runs
                with contextlib.suppress(OSError):
                    process.terminate()
            for process, _, _ in running.values():
                process.wait()
        if stopped_by:
            raise Interrupted(f"{stage}: stopped ({stopped_by}); {len(queue)} job(s) not started, the running ones "
                              "saved their state; finished jobs are stored, and running the same command again "
                              "resumes the rest")
        return failures

    @staticmethod
    def _stop(running: dict, signum: int) -> None:
        """Pass one stop signal to every running job: each saves its state and exits 130. The jobs are in their
        own sessions, so a terminal's Ctrl-C reaches only this process and no job gets it twice (a second signal
        means "do not wait" to a job)."""
        for key, (process, _, _) in running.items():
            LOG.info("%s: stopping (signal %d)", key, signum)
            with contextlib.suppress(OSError):
                process.send_signal(signum)

    @staticmethod
    def _start(key: str, batch: BatchJobs, env: dict[str, str], gpus: int) -> subprocess.Popen:
        log = batch.log_path(key)
        log.parent.mkdir(parents=True, exist_ok=True)
        command = job_command(batch.runs, key, gpus)
        with open(log, "ab") as out:
            shown = f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} " if "CUDA_VISIBLE_DEVICES" in env else ""
            out.write(f"$ {shown}OMP_NUM_THREADS={env['OMP_NUM_THREADS']} {shlex.join(command)}\n".encode())
            out.flush()
            LOG.info("%s: started; log %s", key, log)
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                                    stdin=subprocess.DEVNULL, start_new_session=True)


class RunCommand:
    """What a Slurm task executes: the job's command, with its output in the task's submitit log.

    A plain class at module level so that it pickles; it raises on a non-zero exit, which submitit records as
    the job's failure."""

    def __init__(self, command: list[str], cwd: str, threads: int) -> None:
        self.command, self.cwd, self.threads = command, cwd, threads

    def __call__(self) -> None:
        print(f"$ {shlex.join(self.command)}", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        code = subprocess.run(self.command, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, check=False).returncode
        if code:
            raise RuntimeError(f"{shlex.join(self.command)} exited with code {code}")


class Slurm:
    """A submitit job array per stage; each task runs one job's command on `gpus_per_job` GPUs of one node.

    `cluster` is submitit's: "slurm" here, "local" runs the same submission on this machine (the tests)."""

    def __init__(self, partition: str | None = None, gpus_per_job: int = SLURM_DEFAULTS["gpus_per_job"],
                 cpus_per_job: int = SLURM_DEFAULTS["cpus_per_job"], time_min: int = SLURM_DEFAULTS["time"],
                 array_parallelism: int = SLURM_DEFAULTS["array_parallelism"], cluster: str = "slurm",
                 poll_s: float = SLURM_POLL_S) -> None:
        if cluster == "slurm" and shutil.which("srun") is None:
            raise LauncherError("--launcher slurm: no srun here; run the pipeline on a Slurm login node")
        self.partition, self.gpus, self.cpus, self.time_min = partition, gpus_per_job, cpus_per_job, time_min
        self.array_parallelism, self.cluster, self.poll_s = array_parallelism, cluster, poll_s
        self.description = (f"Slurm job arrays ({cluster}): partition {partition or 'default'}, {gpus_per_job} GPU(s) "
                            f"and {cpus_per_job} CPUs per job, {time_min} min, at most {array_parallelism} at once")

    def default_threads(self) -> int:
        return max(1, self.cpus // max(1, self.gpus))  # per torchrun process

    def executor(self, folder: Path, stage: str):
        """The submitit executor of one stage's array (parameters named as AutoExecutor's, slurm_* for Slurm)."""
        submitit = import_submitit()
        executor = submitit.AutoExecutor(folder=folder, cluster=self.cluster)
        executor.update_parameters(
            name=f"densecl-{stage}", nodes=1, tasks_per_node=1, gpus_per_node=self.gpus, cpus_per_task=self.cpus,
            timeout_min=self.time_min, slurm_partition=self.partition, slurm_array_parallelism=self.array_parallelism)
        return executor

    def submit(self, stage: str, keys: Sequence[str], batch: BatchJobs) -> dict[str, object]:
        """Submit `keys` as one array; returns key -> submitit job."""
        if not keys:
            return {}
        executor = self.executor(batch.folder / "submitit", stage)
        functions = [RunCommand(job_command(batch.runs, key, self.gpus), os.getcwd(), batch.threads) for key in keys]
        with executor.batch():
            jobs = [executor.submit(function) for function in functions]
        for key, job in zip(keys, jobs, strict=True):
            LOG.info("%s: submitted as %s; log %s", key, job.job_id, job.paths.stderr)
        return dict(zip(keys, jobs, strict=True))

    def run(self, stage: str, keys: Sequence[str], batch: BatchJobs,
            on_done: OnDone) -> list[Failure]:
        pending, failures = self.submit(stage, keys, batch), []
        try:
            while pending:
                for key, job in list(pending.items()):
                    if not job.done():
                        continue
                    del pending[key]
                    error = job.exception()
                    if error is None:
                        LOG.info("%s: done (%s)", key, job.job_id)
                        on_done(key, None)
                        continue
                    log = Path(job.paths.stderr)
                    reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
                    failures.append(Failure(key, log, reason))
                    LOG.error("%s: failed (%s): %s; log %s", key, job.job_id, reason, log)
                if pending:
                    time.sleep(self.poll_s)
        finally:
            for job in pending.values():  # the coordinator was stopped: do not leave its jobs running unwatched
                with contextlib.suppress(Exception):
                    job.cancel(check=False)
        return failures


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise LauncherError("--launcher slurm needs submitit: pip install 'densecl-bench[slurm]' "
                            "(or pip install submitit)") from None
    return submitit


def make_launcher(launcher: str = "local", jobs: int | None = None, partition: str | None = None,
                  gpus_per_job: int | None = None, cpus_per_job: int | None = None, time_min: int | None = None,
                  array_parallelism: int | None = None) -> Launcher:
    """The launcher the flags ask for; flags of the other launcher are refused rather than ignored."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {launcher!r}; choose from {', '.join(LAUNCHERS)}")
    if gpus_per_job is not None and gpus_per_job < 0:
        raise ConfigError(f"--gpus-per-job must be at least 0, got {gpus_per_job}")
    slurm_flags = {"--partition": partition, "--cpus-per-job": cpus_per_job, "--time": time_min,
                   "--array-parallelism": array_parallelism}
    if launcher == "local":
        given = [flag for flag, value in slurm_flags.items() if value is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise ConfigError(f"{', '.join(given)} {verb} to --launcher slurm only")
        if jobs is not None and jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, got {jobs}")
        if (jobs or 1) == 1 and gpus_per_job is None:
            return InProcess()
        return LocalProcesses(jobs or 1, gpus_per_job)
    if jobs is not None:
        raise ConfigError("--jobs applies to --launcher local; on Slurm --array-parallelism caps the jobs at once")
    for flag, value, least in (("--cpus-per-job", cpus_per_job, 1), ("--time", time_min, 1),
                               ("--array-parallelism", array_parallelism, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} must be at least {least}, got {value}")
    import_submitit()
    values = dict(gpus_per_job=gpus_per_job, cpus_per_job=cpus_per_job, time_min=time_min,
                  array_parallelism=array_parallelism)
    return Slurm(partition, **{k: v for k, v in values.items() if v is not None})
