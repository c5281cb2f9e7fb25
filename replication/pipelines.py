"""`replicate-voc`: pretrain (or take) MoCo-v2 and DenseCL checkpoints, run the VOC07 SVM protocols,
store every result, then judge the paper's claims.

Two modes, chosen by what is given:
- small scale (default, no data needed): synthetic VOC-layout data, resnet18 at 64 px, >= 3 seeds per
  method; judged against the paper's *directional* claims only (DESIGN.md, "Verdicts");
- paper scale: real VOC2007 (`--voc-root` / `$VOC_ROOT`) and real checkpoints (`--checkpoint
  method=PATH`), the full protocol, judged against the absolute numbers within their tolerances.

A pipeline invocation is a *batch*: its state file (`<runs>/pipeline_state.json`) remembers the
batch id, its settings and the runs already stored, so an interrupted pipeline resumes where it stopped
(pretraining resumes from its checkpoints, features come from the cache, finished evaluations are
not redone). A batch is a set of independent jobs, one per pretraining (method, seed) and one per protocol
run (checkpoint, step), run in stages by a launcher (`replication.launchers`: in this process, K local
processes, or Slurm job arrays); the report is written once every job is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from baselines import config as configs
from baselines.infra import UserError, atomic_write_json
from baselines.methods import METHODS as REGISTERED_METHODS
from protocols import voc_svm
from protocols.common import PRETRAIN_NAMES, RANDOM_INIT, backbone_under_test, default_voc_root
from protocols.datasets import synthetic

METHODS = tuple(REGISTERED_METHODS)
# The spec's 19 costs, thinned to 10 for small-scale runs (every cost the reference tries between
# 100 and 2^-19, at about half the density): SVM time halves, and the subset is recorded.
SMALL_SCALE_COSTS: tuple[float, ...] = (1.0, 10.0, 100.0, *(0.5**n for n in (4, 6, 8, 10, 13, 16, 19)))
PRETRAIN_DATA = dict(images=512, size=96, seed=1)  # the embedded pretraining images (`pretrain_size` changes size)
MIN_SEEDS = 2  # a paired interval needs two seeds; the default count comes from the power analysis
DEFAULT_PRESET = "small_grid7"  # the paper's 7x7 dense grid at small scale; why: docs/small-scale-design.md


@dataclass
class ReplicateVOCConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    preset: str = DEFAULT_PRESET  # pretraining preset (name or YAML file) for small scale
    pretrain_images: str = ""  # folder of pretraining images; empty: the synthetic default
    pretrain_size: int = PRETRAIN_DATA["size"]  # side of the synthetic pretraining images
    epochs: int = 0  # 0: the preset's
    random_baseline: bool = True  # small scale: also evaluate a random-init backbone per seed
    require_paper_grid: bool = False  # refuse a DenseCL preset whose dense grid is below 7x7
    voc_root: str = ""  # real VOC2007; empty: the synthetic dataset
    checkpoints: dict[str, str] = field(default_factory=dict)  # method -> checkpoint: skip pretraining
    pretrain_data: str = "imagenet"  # what the given checkpoints were pretrained on (claim matching)
    pretrain_epochs: int = 200
    arch: str = ""  # for given checkpoints when their files do not say
    svm_layers: tuple[str, ...] = ("feature5",)  # the DenseCL scripts' FEAT_LIST; more layers add per-stage bars
    lowshot_layer: str = "feature5"
    costs: tuple[float, ...] = ()  # empty: 10-cost subset at small scale, the spec's 19 at paper scale
    ks: tuple[int, ...] = voc_svm.LOW_SHOT_KS
    samples: int = 5
    dense_probe: bool = True  # the frozen per-location probe (a declared small-scale proxy), small scale only
    probe_input_size: int = 128  # the probe's square input side
    solver: str = "batched"  # SVM solver of both SVM protocols: exact, ~10x faster than liblinear (issue 11)
    threads: int = 0  # torch threads of every job (CPU numbers depend on it); 0: the launcher's default
    workers: int = 2
    device: str = "auto"
    runs: str = "runs/replicate-voc"
    results: str = "results"
    progress: bool = True

    @property
    def scale(self) -> str:
        return "paper" if self.checkpoints and self.voc_root else "small"

    def validate(self) -> None:
        validate_methods(self)
        if self.voc_root and not (Path(self.voc_root) / "ImageSets" / "Main").is_dir():
            raise FileNotFoundError(f"{self.voc_root} is not a VOC2007 root (no ImageSets/Main); "
                                    "point --voc-root at VOCdevkit/VOC2007")


def validate_methods(cfg) -> None:
    """What every pipeline checks: known methods, some seeds, and a readable checkpoint per method if any."""
    unknown = sorted(set(cfg.methods) - set(METHODS)) + sorted(set(cfg.checkpoints) - set(METHODS))
    if unknown:
        raise configs.ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if not cfg.seeds:
        raise configs.ConfigError("no seeds given")
    if not cfg.checkpoints and len(set(cfg.seeds)) < MIN_SEEDS:
        raise configs.ConfigError(f"{len(set(cfg.seeds))} seed(s): a directional verdict needs at least {MIN_SEEDS} "
                                  "paired seeds (--seeds 0 1 ...)")
    if cfg.checkpoints and set(cfg.checkpoints) != set(cfg.methods):
        raise configs.ConfigError(f"give a checkpoint for each of {', '.join(cfg.methods)} "
                                  f"(got {', '.join(sorted(cfg.checkpoints)) or 'none'})")
    for method, path in cfg.checkpoints.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint for {method} not found: {path}")


@dataclass(frozen=True)
class Job:
    """One checkpoint to evaluate: a method, and a seed (small scale) or a given file (paper scale)."""

    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-seed{self.seed}"


def _log(message: str, pipeline: str = "replicate-voc") -> None:
    logging.getLogger(f"densecl_bench.{pipeline}").info(message)


def _config_digest(cfg) -> str:
    values = {k: v for k, v in asdict(cfg).items() if k not in ("workers", "device", "progress", "results", "runs")}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


STATE_FILE = "pipeline_state.json"


class PipelineError(UserError, RuntimeError):
    """A batch that cannot go on as asked (a job key it does not have, a state its jobs cannot read); one line."""


class PipelineState:
    """`<runs>/pipeline_state.json`: the batch id, its settings, and what is finished (each protocol step's
    stored run, each pretraining's backbone).

    Written only by the coordinating process (the pipeline), which marks a job when its result comes back;
    the jobs themselves only read it, to run with their batch's settings (`read`)."""

    def __init__(self, path: Path, digest: str) -> None:
        self.path = path
        state = json.loads(path.read_text()) if path.exists() else {}
        if state.get("config_digest") != digest:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            state = {"config_digest": digest, "batch": f"{stamp}-{digest[:6]}", "done": {}, "report": None}
        state.setdefault("pretrained", {})
        self.state = state

    @staticmethod
    def read(runs: Path) -> dict[str, Any]:
        """A batch's state as a job reads it; a missing file means the job cannot see the coordinator's runs."""
        path = Path(runs) / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise PipelineError(f"no {STATE_FILE} in {runs}: this job cannot reach the batch's runs folder (on a "
                                "cluster it must be on the shared filesystem)") from None
        except (OSError, ValueError) as err:
            raise PipelineError(f"{path} is unreadable ({err})") from None
        if "pipeline" not in state or "config" not in state:
            raise PipelineError(f"{path} records no pipeline settings; start the batch with `densecl-bench "
                                "replicate voc|dense` first")
        return state

    @property
    def batch(self) -> str:
        return self.state["batch"]

    def done(self, step: str) -> str | None:
        return self.state["done"].get(step)

    def mark(self, step: str, run_id: str) -> None:
        self.state["done"][step] = run_id
        self.save()

    def pretrained(self, job: Job) -> str | None:
        """The backbone of a pretraining this batch finished, if its file is still there."""
        path = self.state["pretrained"].get(job.name)
        return path if path and Path(path).is_file() else None

    def mark_pretrained(self, job: Job, backbone: Path) -> None:
        self.state["pretrained"][job.name] = str(backbone)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.state)


@contextlib.contextmanager
def coordinator_lock(runs: Path) -> Iterator[None]:
    """One coordinating process per runs folder: a second one would write the same state and run the same jobs.
    (A filesystem without locks only loses this guard.)"""
    runs.mkdir(parents=True, exist_ok=True)
    fd = os.open(runs / ".pipeline.lock", os.O_RDWR | os.O_CREAT, 0o644)
    locked = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise PipelineError(f"another pipeline is running on {runs}; wait for it, or use another --runs") from None
        except OSError as err:
            logging.getLogger("densecl_bench.pipeline").debug("no lock on %s (%s)", runs, err)
        yield
    finally:
        if locked:  # explicitly: a forked child still alive (a loader or pool worker) shares the lock until it exits
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def pretrain_images(cfg) -> str:
    """The pipeline's pretraining images: the given folder, else the embedded synthetic set at `pretrain_size`."""
    if cfg.pretrain_images:
        return cfg.pretrain_images
    data = {**PRETRAIN_DATA, "size": cfg.pretrain_size}
    return str(synthetic.cached(**data, progress=cfg.progress) / "JPEGImages")


def job_folder(runs: str, preset: str, job: Job) -> Path:
    """`<runs>/<preset>/<method>-seed<N>`: each preset keeps its own checkpoints, so designs never collide."""
    return Path(runs) / Path(preset).stem / job.name


def pretraining_config(job: Job, cfg, runs: str):
    """The resolved pretraining config of `job` (preset < the pipeline's overrides), training in `job_folder`.
    `cfg` is a pipeline config (preset, epochs, pretrain_images, workers, device, progress)."""
    from baselines.pretrain_config import PretrainConfig

    overrides: dict[str, Any] = {"method": job.method, "seed": job.seed, "workers": cfg.workers, "device": cfg.device,
                                 "data": pretrain_images(cfg), "out": str(job_folder(runs, cfg.preset, job)),
                                 "resume": "auto", "progress": cfg.progress,
                                 "require_paper_grid": cfg.require_paper_grid}
    if cfg.epochs:
        overrides["epochs"] = cfg.epochs
    return configs.resolve(PretrainConfig, cfg.preset, overrides)


def pretrain_checkpoint(job: Job, cfg, runs: str) -> Path:
    """Train (or resume, or reuse) the job's small-scale checkpoint in `job_folder`; returns the backbone path."""
    from baselines.train import pretrain  # torch: loaded when a pipeline runs, not for --help

    return pretrain(pretraining_config(job, cfg, runs))


def trained_checkpoint(job: Job, cfg, runs: str) -> tuple[Path, dict[str, Any]]:
    """The backbone of the job's finished pretraining and its recipe, read from `job_folder` (no training)."""
    pretrain_cfg = pretraining_config(job, cfg, runs)
    backbone = Path(pretrain_cfg.out) / "backbone.pth"
    if not backbone.is_file():
        raise PipelineError(f"{job.name} has no finished pretraining in {pretrain_cfg.out} (no backbone.pth); "
                            f"run its pretraining job first (pretrain/{job.name})")
    log = Path(pretrain_cfg.out) / "log.jsonl"
    recipe = {**configs.to_dict(pretrain_cfg), "preset": cfg.preset, "log": str(log),
              "learning": learning_summary(log, pretrain_cfg.queue_size)}
    return backbone, recipe


def learning_summary(log: Path, queue_size: int) -> dict[str, Any]:
    """Did contrastive learning happen? The global loss and top-1 at the end against their chance levels.

    With K negatives the InfoNCE loss of a network that cannot tell the positive from the negatives is
    ln(K + 1), and its top-1 is 100 / (K + 1) percent (spec pretraining.md §2.4).
    """
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    if not records:
        return {}
    chance_loss, chance_acc = math.log(queue_size + 1), 100.0 / (queue_size + 1)
    last = records[-1]
    loss = float(last.get("loss_global", last["loss"]))
    acc = float(last.get("acc_global", math.nan))
    learned = loss < chance_loss - 0.1 and (math.isnan(acc) or acc > 2 * chance_acc)
    return {"first_loss_global": float(records[0].get("loss_global", records[0]["loss"])), "last_loss_global": loss,
            "chance_loss": chance_loss, "last_acc_global": acc, "chance_acc": chance_acc, "learned": learned}


def pretrain_jobs(cfg) -> list[Job]:
    """One pretraining per (seed, method) at small scale; none when the checkpoints are given."""
    return [] if cfg.checkpoints else [Job(method, seed) for seed in cfg.seeds for method in cfg.methods]


def checkpoint_jobs(cfg) -> list[Job]:
    """Every checkpoint the protocols evaluate: the pretrained (or given) ones, and per seed the random-init
    baseline when asked for."""
    if cfg.checkpoints:
        return [Job(method, cfg.seeds[0]) for method in cfg.methods]
    jobs = []
    for seed in cfg.seeds:
        jobs += [Job(method, seed) for method in cfg.methods]
        if getattr(cfg, "random_baseline", False):
            jobs.append(Job("random", seed))
    return jobs


def checkpoint_of(job: Job, cfg, runs: str) -> tuple[Path | str, dict[str, Any]]:
    """(checkpoint, recipe) of a job: the given file, the random-init baseline, or the finished pretraining."""
    if cfg.checkpoints:
        return cfg.checkpoints[job.method], {"epochs": cfg.pretrain_epochs, "checkpoint": cfg.checkpoints[job.method]}
    if job.method == "random":
        from baselines.pretrain_config import PretrainConfig

        arch = configs.resolve(PretrainConfig, cfg.preset, {"data": "-", "out": "-"}).arch
        return RANDOM_INIT, {"epochs": 0, "arch": arch, "preset": "random init"}
    return trained_checkpoint(job, cfg, runs)


@dataclass(frozen=True)
class Step:
    """One protocol run of a job: the state key's suffix, the registered protocol, its data and settings."""

    name: str
    protocol: str
    data: Any  # root(s), or None for the protocol's synthetic default
    settings: dict[str, Any]
    work_dir: Path | None = None
    # Never runs beside the checkpoint's other exclusive steps: the SVM protocols of one checkpoint fill the same
    # feature cache entry, whose writer is not safe for two concurrent writers (protocols/features.py).
    exclusive: bool = False


def _subject(job: Job, checkpoint: Path | str, recipe: dict[str, Any], cfg):
    """The job's weights, labelled with what the verdicts match on (given checkpoints: what the user says)."""
    if job.method == "random":
        return backbone_under_test(RANDOM_INIT, recipe["arch"], seed=job.seed)
    small = not cfg.checkpoints
    subject = backbone_under_test(
        checkpoint, cfg.arch or None, seed=job.seed, method=job.method,
        pretrain_data="synthetic-voc" if small else PRETRAIN_NAMES.get(cfg.pretrain_data, cfg.pretrain_data),
        epochs=recipe.get("epochs", cfg.pretrain_epochs), pretrain_seed=job.seed if small else None)
    subject.pretraining.update(preset=recipe.get("preset"), log=recipe.get("log"), learning=recipe.get("learning"))
    return subject


def run_step(job: Job, step: Step, cfg, batch: str, store, pipeline: str, runs: str) -> str | None:
    """Run one protocol step of `job` and store its result; returns the run id (None on torchrun ranks > 0,
    which take part in the run but leave the writing to rank 0)."""
    import warnings

    import torch

    from protocols.registry import get_protocol, is_synthetic
    from protocols.transfer import ProtocolDeviation

    key = f"{job.name}/{step.name}"
    checkpoint, recipe = checkpoint_of(job, cfg, runs)
    subject = _subject(job, checkpoint, recipe, cfg)
    protocol = get_protocol(step.protocol)
    data, overrides = step.data, {}
    if data is None:
        default = protocol.default_data(cfg.progress)
        data, overrides = default.data, dict(default.overrides)
    run_cfg = protocol.make_config({**overrides, **step.settings}, synthetic=is_synthetic(data))
    _log(f"{key}: {protocol.name} on {data} ({torch.get_num_threads()} thread(s))", pipeline)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProtocolDeviation)  # recorded in the result
        result = protocol.run(subject, data, run_cfg, work_dir=step.work_dir, progress=cfg.progress)
    result.config["replication"] = {"batch": batch, "pipeline": pipeline, "job": job.name, "step": step.name,
                                    "recipe": recipe, "threads": torch.get_num_threads()}
    if os.environ.get("RANK", "0") != "0":
        return None
    record = store.write_run(pipeline, result, seed=job.seed,
                             command=["densecl-bench", *sys.argv[1:]] if sys.argv[1:] else None)
    headline = ", ".join(f"{k} {v:.2f}" for k, v in result.metrics.items()
                         if k in ("AP", "bbox_AP", "mIoU", "best/mAP") and v is not None)
    _log(f"{key}: {headline + '; ' if headline else ''}stored {record.path}", pipeline)
    return record.run_id


def stored_steps(store, pipeline: str, batch: str) -> dict[str, str]:
    """`<job>/<step>` -> run id of every protocol run of `batch` in the store (the oldest, if one ran twice)."""
    found: dict[str, str] = {}
    for record in store.scan_runs(pipeline).records:  # jobs writing right now leave partial folders: not news
        info = record.config.get("replication", {})
        if info.get("batch") == batch and info.get("job") and info.get("step"):
            found.setdefault(f"{info['job']}/{info['step']}", record.run_id)
    return found


def voc_steps(job: Job, cfg: ReplicateVOCConfig) -> list[Step]:
    root = Path(cfg.voc_root) if cfg.voc_root else default_voc_root(progress=cfg.progress)
    costs = cfg.costs or (voc_svm.DEFAULT_COSTS if cfg.scale == "paper" else SMALL_SCALE_COSTS)
    common = dict(costs=costs, seed=job.seed, workers=cfg.workers, device=cfg.device, solver=cfg.solver)
    steps = [Step("voc07_svm", "voc07_svm", root, dict(common, layers=tuple(cfg.svm_layers)), exclusive=True),
             Step("voc07_lowshot", "voc07_lowshot", root,
                  dict(common, layers=(cfg.lowshot_layer,), ks=tuple(cfg.ks), samples=cfg.samples), exclusive=True)]
    if cfg.dense_probe and cfg.scale == "small":
        steps.append(Step("seg_voc_dense_probe", "seg_voc_dense_probe", root,
                          dict(train_split="trainval", test_split="test", device=cfg.device,
                               input_size=cfg.probe_input_size)))
    return steps


def replicate_voc(cfg: ReplicateVOCConfig, launcher=None) -> dict[str, Any]:
    """Run the pipeline; returns {"batch", "runs": [...], "report": path of the verdict report}."""
    return run_batch(PIPELINES["replicate-voc"], cfg, launcher)


def replicate_voc_config(**values) -> ReplicateVOCConfig:
    """A config from keyword values (CLI), ignoring None."""
    fields = {f.name for f in dataclasses.fields(ReplicateVOCConfig)}
    return ReplicateVOCConfig(**{k: v for k, v in values.items() if k in fields and v is not None})


# ---------------------------------------------------------------------------------------------- replicate-dense

DENSE_TASKS = ("voc-c4", "coco-fpn", "voc-fcn", "cityscapes-fcn")
# A 256-scene prefix of the evaluation set (image i depends only on (seed, i)): ~128 train / ~128 test images.
DENSE_DATA = dict(images=256, size=96, seed=0)
SMALL_DENSE_ITERATIONS = {"det": 120, "seg": 150}  # ~29 min on 2 cores for 2 tasks x 2 modes x 6 checkpoints


@dataclass
class ReplicateDenseConfig:
    """Small scale by default: the replicate-voc checkpoints (reused, or pretrained the same way) fine-tuned
    and frozen on the synthetic scenes; paper scale with `checkpoints` and a real root per task in `data`."""

    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    tasks: tuple[str, ...] = ("voc-c4", "voc-fcn")  # CPU-sized default; add coco-fpn, cityscapes-fcn
    modes: tuple[str, ...] = ("finetune", "frozen")
    det_iterations: int | None = None  # None: 120 at small scale, the reference's at paper scale
    seg_iterations: int | None = None  # None: 150 at small scale, the reference's at paper scale
    synthetic_images: int = DENSE_DATA["images"]  # small scale: scenes generated (half train, half test)
    preset: str = DEFAULT_PRESET
    pretrain_images: str = ""
    epochs: int = 0
    pretrain_runs: str = "runs/replicate-voc"  # where replicate-voc keeps its checkpoints (reused when finished)
    pretrain_size: int = PRETRAIN_DATA["size"]
    random_baseline: bool = False  # also fine-tune a random-init backbone per seed (a third more time)
    require_paper_grid: bool = False
    data: dict[str, str] = field(default_factory=dict)  # task -> real dataset root (paper scale)
    checkpoints: dict[str, str] = field(default_factory=dict)
    pretrain_data: str = "imagenet"
    pretrain_epochs: int = 200
    arch: str = ""
    threads: int = 0  # torch threads of every job (CPU numbers depend on it); 0: the launcher's default
    workers: int = 2
    device: str = "auto"
    runs: str = "runs/replicate-dense"
    results: str = "results"
    progress: bool = True

    @property
    def scale(self) -> str:
        return "paper" if self.checkpoints and self.data else "small"

    def validate(self) -> None:
        validate_methods(self)
        bad_tasks = sorted(set(self.tasks) - set(DENSE_TASKS)) + sorted(set(self.data) - set(DENSE_TASKS))
        if bad_tasks:
            raise configs.ConfigError(f"unknown task(s) {bad_tasks}; choose from {', '.join(DENSE_TASKS)}")
        bad_modes = sorted(set(self.modes) - {"finetune", "frozen"})
        if bad_modes or not self.modes:
            raise configs.ConfigError(f"modes must be finetune and/or frozen, got {list(self.modes)}")
        if self.data and set(self.data) != set(self.tasks):
            raise configs.ConfigError(f"give a dataset root for each task ({', '.join(self.tasks)}) or none")
        for task, roots in self.data.items():
            for root in roots.split(","):
                if not Path(root).is_dir():
                    raise FileNotFoundError(f"dataset root for {task} not found: {root}")


def _dense_data(task: str, cfg: ReplicateDenseConfig) -> tuple[list[Path], dict[str, Any]]:
    """(roots, config overrides) of `task`: the given root, or the synthetic scenes in the task's layout."""
    from protocols.datasets import dense

    if cfg.data:
        return [Path(p) for p in cfg.data[task].split(",")], {}
    root, splits = dense.synthetic_for_task(
        task, synthetic.cached(**{**DENSE_DATA, "images": cfg.synthetic_images}, progress=cfg.progress))
    return [root], splits


def dense_steps(job: Job, cfg: ReplicateDenseConfig) -> list[Step]:
    from protocols import detection, segmentation

    paper = cfg.scale == "paper"
    steps = []
    for task in cfg.tasks:
        detecting = task in detection.TASKS
        protocol = (detection.PROTOCOL_OF_TASK if detecting else segmentation.PROTOCOL_OF_TASK)[task]
        roots, overrides = _dense_data(task, cfg)
        iterations = cfg.det_iterations if detecting else cfg.seg_iterations
        if iterations is None and not paper:
            iterations = SMALL_DENSE_ITERATIONS["det" if detecting else "seg"]
        for mode in cfg.modes:
            settings = dict(overrides, mode=mode, seed=job.seed, workers=cfg.workers, device=cfg.device,
                            iterations=iterations, preset="reference" if paper else "small")
            steps.append(Step(f"{task}/{mode}", protocol, roots if detecting else roots[0], settings,
                              Path(cfg.runs) / "work" / job.name / f"{task}-{mode}"))
    return steps


def _dense_prerequisites(cfg: ReplicateDenseConfig) -> None:
    from protocols.transfer import require_mm_stack

    if any(t.endswith("-fcn") for t in cfg.tasks):
        require_mm_stack("mmseg")
    if any(not t.endswith("-fcn") for t in cfg.tasks):
        require_mm_stack("mmdet")


def replicate_dense(cfg: ReplicateDenseConfig, launcher=None) -> dict[str, Any]:
    """Run the dense pipeline; returns {"batch", "runs", "report"} like `replicate_voc`."""
    return run_batch(PIPELINES["replicate-dense"], cfg, launcher)


def replicate_dense_config(**values) -> ReplicateDenseConfig:
    """A config from keyword values (CLI), ignoring None."""
    fields = {f.name for f in dataclasses.fields(ReplicateDenseConfig)}
    return ReplicateDenseConfig(**{k: v for k, v in values.items() if k in fields and v is not None})


# ---------------------------------------------------------------------------------------------- batches of jobs


@dataclass(frozen=True)
class PipelineSpec:
    """What differs between the pipelines; the batch (stages, jobs, state, report) is the same for both."""

    name: str
    config_type: type
    steps: Callable[[Job, Any], list[Step]]  # the protocol steps of one checkpoint
    pretrain_runs: Callable[[Any], str]  # where its pretrainings live
    check: Callable[[Any], None] = lambda cfg: None  # prerequisites, before any work


PIPELINES: dict[str, PipelineSpec] = {
    "replicate-voc": PipelineSpec("replicate-voc", ReplicateVOCConfig, voc_steps, lambda cfg: cfg.runs),
    "replicate-dense": PipelineSpec("replicate-dense", ReplicateDenseConfig, dense_steps,
                                    lambda cfg: cfg.pretrain_runs, _dense_prerequisites),
}


def protocol_steps(spec: PipelineSpec, cfg) -> dict[str, tuple[Job, Step]]:
    """`<job>/<step>` -> (job, step), step by step across the checkpoints: jobs running side by side then
    evaluate different checkpoints."""
    per_job = [(job, spec.steps(job, cfg)) for job in checkpoint_jobs(cfg)]
    table: dict[str, tuple[Job, Step]] = {}
    for index in range(max((len(steps) for _, steps in per_job), default=0)):
        for job, steps in per_job:
            if index < len(steps):
                table[f"{job.name}/{steps[index].name}"] = (job, steps[index])
    return table


def waves(steps: dict[str, tuple[Job, Step]]) -> list[list[str]]:
    """The protocol jobs in waves that run one after the other, each holding at most one exclusive step per
    checkpoint: replicate-voc's SVM steps in two waves (the dense probe in the first), replicate-dense's in one."""
    placed: dict[str, int] = {}
    grouped: list[list[str]] = []
    for key, (job, step) in steps.items():
        index = placed.get(job.name, 0) if step.exclusive else 0
        if step.exclusive:
            placed[job.name] = index + 1
        grouped += [[] for _ in range(index + 1 - len(grouped))]
        grouped[index].append(key)
    return grouped


def run_job(spec: PipelineSpec, cfg, batch: str, store, key: str) -> str | None:
    """Run one job of a batch here: `pretrain/<job>` trains (or resumes) a checkpoint, `<job>/<step>` runs and
    stores one protocol step (returns its run id). What the in-process launcher and `densecl-bench replicate
    job` both call."""
    if key.startswith("pretrain/"):
        jobs = {f"pretrain/{job.name}": job for job in pretrain_jobs(cfg)}
        if key not in jobs:
            raise PipelineError(f"batch {batch} has no job {key}; its pretraining jobs: {', '.join(jobs) or 'none'}")
        runs = spec.pretrain_runs(cfg)
        _log(f"{key}: {cfg.preset} in {job_folder(runs, cfg.preset, jobs[key])} (resumed or reused when it has "
             "checkpoints)", spec.name)
        pretrain_checkpoint(jobs[key], cfg, runs)
        return None
    steps = protocol_steps(spec, cfg)
    if key not in steps:
        raise PipelineError(f"batch {batch} has no job {key}; its protocol jobs look like {next(iter(steps), '-')}")
    job, step = steps[key]
    return run_step(job, step, cfg, batch, store, spec.name, spec.pretrain_runs(cfg))


def config_from(spec: PipelineSpec, values: dict[str, Any]):
    """The pipeline config a state file recorded (JSON lists back to the tuples the fields hold)."""
    names = {f.name for f in dataclasses.fields(spec.config_type)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise PipelineError(f"the batch's settings name unknown field(s) {unknown}: it was started by another "
                            "version of densecl-bench")
    return spec.config_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def run_recorded_job(runs: str, key: str) -> None:
    """`densecl-bench replicate job RUNS KEY`: one job of the batch in RUNS, with the batch's own settings, in the
    folder the batch was started from (its relative paths mean the same there). A job already stored is
    skipped, so a job that runs twice stores one result."""
    from replication.results import ResultsStore

    state = PipelineState.read(Path(runs))
    spec = PIPELINES.get(state["pipeline"])
    if spec is None:
        raise PipelineError(f"{Path(runs) / STATE_FILE} names an unknown pipeline {state['pipeline']!r}")
    folder = Path(runs).resolve()
    try:
        os.chdir(state.get("cwd") or ".")
    except OSError as err:
        raise PipelineError(f"the batch was started in {state.get('cwd')}, which this job cannot reach "
                            f"({err.strerror}); start it from a folder on the shared filesystem") from None
    cfg = dataclasses.replace(config_from(spec, state["config"]), progress=False)  # logs, not bars
    if _config_digest(cfg) != state["config_digest"]:
        raise PipelineError(f"the settings in {folder / STATE_FILE} do not match its digest; start the batch again")
    if Path(cfg.runs).resolve() != folder:
        raise PipelineError(f"{folder / STATE_FILE} belongs to the runs folder {Path(cfg.runs).resolve()}; "
                            "give that folder")
    store = ResultsStore(cfg.results)
    if not key.startswith("pretrain/") and key in stored_steps(store, spec.name, state["batch"]):
        _log(f"{key}: already stored in batch {state['batch']}", spec.name)
        return
    with torch_threads(cfg.threads):
        run_job(spec, cfg, state["batch"], store, key)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with the batch's torch thread count (its CPU numbers depend on it), then restore the caller's."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_batch(spec: PipelineSpec, cfg, launcher=None) -> dict[str, Any]:
    """A batch in stages: every pretraining job, then every protocol job, then the report. Finished jobs (in the
    state or the store) are skipped; failed ones are reported with their logs, and the report waits for them.

    This process is the one writer of the state: it marks each job as the launcher says it finished."""
    from replication.launchers import BatchJobs, InProcess, JobsFailed
    from replication.report import select_runs, write_report
    from replication.results import ResultsStore

    cfg.validate()
    spec.check(cfg)
    launcher = launcher or InProcess()
    if cfg.threads < 0:
        raise configs.ConfigError(f"--threads must be at least 1 (0: the default), got {cfg.threads}")
    cfg = dataclasses.replace(cfg, threads=cfg.threads or launcher.default_threads())  # part of the batch's settings
    store = ResultsStore(cfg.results)
    runs = Path(cfg.runs)
    with coordinator_lock(runs), torch_threads(cfg.threads):
        state = PipelineState(runs / STATE_FILE, _config_digest(cfg))
        state.state.update(pipeline=spec.name, config=asdict(cfg), cwd=os.getcwd())
        state.save()
        started = time.perf_counter()
        scope = (f"methods {', '.join(cfg.methods)}, seeds {', '.join(map(str, cfg.seeds))}" if cfg.scale == "small"
                 else f"methods {', '.join(cfg.methods)}")
        _log(f"batch {state.batch}: {cfg.scale} scale, {scope}; jobs run {launcher.description}, {cfg.threads} "
             "thread(s) each", spec.name)
        batch = BatchJobs(runs.resolve(), lambda key: run_job(spec, cfg, state.batch, store, key), cfg.threads)
        failures = pretraining_stage(spec, cfg, state, launcher, batch)
        waiting = {f.key.removeprefix("pretrain/") for f in failures}
        failures += protocol_stage(spec, cfg, state, store, launcher, batch, waiting)
        if failures:
            raise JobsFailed(failures, len(pretrain_jobs(cfg)) + len(protocol_steps(spec, cfg)))
        report = write_report(store, select_runs(store, spec.name, state.batch))
        state.state["report"] = str(report)
        state.save()
        _log(f"done in {time.perf_counter() - started:.0f} s", spec.name)
        return {"batch": state.batch, "report": report, "runs": dict(state.state["done"])}


def pretraining_stage(spec: PipelineSpec, cfg, state: PipelineState, launcher, batch) -> list:
    """Every pretraining the batch has not finished; each is marked (and its learning checked) as it ends."""
    pretraining = {f"pretrain/{job.name}": job for job in pretrain_jobs(cfg)}
    for key, job in pretraining.items():
        if state.pretrained(job):
            _log(f"{key}: finished ({state.pretrained(job)})", spec.name)
    todo = [key for key, job in pretraining.items() if not state.pretrained(job)]
    if todo:
        pretrain_images(cfg)  # the shared data, made once here rather than by the jobs at the same time

    def finished(key: str, _: str | None) -> None:
        job = pretraining[key]
        backbone, recipe = trained_checkpoint(job, cfg, spec.pretrain_runs(cfg))
        state.mark_pretrained(job, backbone)
        learning = recipe["learning"]
        if not learning.get("learned", True):
            _log(f"warning: {job.name} did not learn: global loss {learning['last_loss_global']:.3f} against "
                 f"chance {learning['chance_loss']:.3f}", spec.name)

    return launcher.run("pretrain", todo, batch, finished)


def protocol_stage(spec: PipelineSpec, cfg, state: PipelineState, store, launcher, batch, waiting: set[str]) -> list:
    """Every protocol step not stored yet, but those of checkpoints whose pretraining failed (`waiting`)."""
    from replication.launchers import Failure

    steps = protocol_steps(spec, cfg)  # also makes the evaluation data, here, before the jobs start
    for key, run_id in stored_steps(store, spec.name, state.batch).items():
        if key in steps and not state.done(key):  # stored by a job whose coordinator stopped before marking it
            state.state["done"][key] = run_id
    state.save()
    for key in steps:
        if state.done(key):
            _log(f"{key}: already stored as {state.done(key)}", spec.name)
    todo = [key for key, (job, _) in steps.items() if not state.done(key) and job.name not in waiting]

    def finished(key: str, run_id: str | None) -> None:
        run_id = run_id or stored_steps(store, spec.name, state.batch).get(key)  # a job process: find it
        if run_id is not None:
            state.mark(key, run_id)

    failures = []
    for index, wave in enumerate(waves({key: steps[key] for key in todo})):
        failures += launcher.run(f"protocol-{index + 1}", wave, batch, finished)
    failed = {f.key for f in failures}
    failures += [Failure(key, batch.log_path(key), "it finished without storing a result")
                 for key in todo if not state.done(key) and key not in failed]
    blocked = sum(1 for key, (job, _) in steps.items() if job.name in waiting and not state.done(key))
    if blocked:
        _log(f"{blocked} protocol job(s) wait for the failed pretraining", spec.name)
    return failures
