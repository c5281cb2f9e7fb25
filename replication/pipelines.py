"""`replicate-voc`: pretrain (or take) MoCo-v2 and DenseCL checkpoints, run the VOC07 SVM protocols,
store every result, then judge the paper's claims.

Two modes, chosen by what is given:
- small scale (default, no data needed): synthetic VOC-layout data, resnet18 at 64 px, >= 3 seeds per
  method; judged against the paper's *directional* claims only (DESIGN.md, "Verdicts");
- paper scale: real VOC2007 (`--voc-root` / `$VOC_ROOT`) and real checkpoints (`--checkpoint
  method=PATH`), the full protocol, judged against the absolute numbers within their tolerances.

A pipeline invocation is a *batch*: its state file (`<runs>/pipeline_state.json`) remembers the
batch id and the runs already stored, so an interrupted pipeline resumes where it stopped
(pretraining resumes from its checkpoints, features come from the cache, finished evaluations are
not redone).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from baselines import config as configs
from baselines.infra import atomic_write_json
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


class PipelineState:
    """`<runs>/pipeline_state.json`: the batch id and the stored run of each finished step."""

    def __init__(self, path: Path, digest: str) -> None:
        self.path = path
        state = json.loads(path.read_text()) if path.exists() else {}
        if state.get("config_digest") != digest:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            state = {"config_digest": digest, "batch": f"{stamp}-{digest[:6]}", "done": {}, "report": None}
        self.state = state

    @property
    def batch(self) -> str:
        return self.state["batch"]

    def done(self, step: str) -> str | None:
        return self.state["done"].get(step)

    def mark(self, step: str, run_id: str) -> None:
        self.state["done"][step] = run_id
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.state)


def pretrain_images(cfg) -> str:
    """The pipeline's pretraining images: the given folder, else the embedded synthetic set at `pretrain_size`."""
    if cfg.pretrain_images:
        return cfg.pretrain_images
    data = {**PRETRAIN_DATA, "size": cfg.pretrain_size}
    return str(synthetic.cached(**data, progress=cfg.progress) / "JPEGImages")


def job_folder(runs: str, preset: str, job: Job) -> Path:
    """`<runs>/<preset>/<method>-seed<N>`: each preset keeps its own checkpoints, so designs never collide."""
    return Path(runs) / Path(preset).stem / job.name


def pretrain_checkpoint(job: Job, cfg, runs: str) -> tuple[Path, dict[str, Any]]:
    """Train (or resume, or reuse) the job's small-scale checkpoint in `job_folder`; returns the backbone path
    and its recipe. `cfg` is a pipeline config (preset, epochs, pretrain_images, workers, device, progress)."""
    overrides: dict[str, Any] = {"method": job.method, "seed": job.seed, "workers": cfg.workers, "device": cfg.device,
                                 "data": pretrain_images(cfg), "out": str(job_folder(runs, cfg.preset, job)),
                                 "resume": "auto", "progress": cfg.progress,
                                 "require_paper_grid": cfg.require_paper_grid}
    if cfg.epochs:
        overrides["epochs"] = cfg.epochs
    from baselines.train import PretrainConfig, pretrain  # torch: loaded when a pipeline runs, not for --help

    pretrain_cfg = configs.resolve(PretrainConfig, cfg.preset, overrides)
    backbone = pretrain(pretrain_cfg)
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


def checkpoint_jobs(cfg, pipeline: str, runs: str) -> list[tuple[Job, Path | str, dict[str, Any]]]:
    """(job, checkpoint, recipe) per method: the given checkpoints, or per seed the small-scale pretraining in
    `<runs>/<method>-seed<N>` (trained, resumed, or reused when already finished)."""
    if cfg.checkpoints:
        return [(Job(method, cfg.seeds[0]), cfg.checkpoints[method],
                 {"epochs": cfg.pretrain_epochs, "checkpoint": cfg.checkpoints[method]}) for method in cfg.methods]
    jobs = []
    for seed in cfg.seeds:
        for method in cfg.methods:
            job = Job(method, seed)
            _log(f"pretraining {job.name} ({cfg.preset}) in {job_folder(runs, cfg.preset, job)} (reused when "
                 "finished)", pipeline)
            backbone, recipe = pretrain_checkpoint(job, cfg, runs)
            if not recipe["learning"].get("learned", True):
                learning = recipe["learning"]
                _log(f"warning: {job.name} did not learn: global loss {learning['last_loss_global']:.3f} against "
                     f"chance {learning['chance_loss']:.3f}", pipeline)
            jobs.append((job, backbone, recipe))
        if getattr(cfg, "random_baseline", False):
            from baselines.pretrain_config import PretrainConfig

            arch = configs.resolve(PretrainConfig, cfg.preset, {"data": "-", "out": "-"}).arch
            jobs.append((Job("random", seed), RANDOM_INIT, {"epochs": 0, "arch": arch, "preset": "random init"}))
    return jobs


@dataclass(frozen=True)
class Step:
    """One protocol run of a job: the state key's suffix, the registered protocol, its data and settings."""

    name: str
    protocol: str
    data: Any  # root(s), or None for the protocol's synthetic default
    settings: dict[str, Any]
    work_dir: Path | None = None


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


def run_steps(job: Job, checkpoint: Path | str, recipe: dict[str, Any], steps: list[Step], cfg, state: PipelineState,
              store, pipeline: str) -> None:
    """Run every step of `job` not yet stored in this batch; each result goes to the store as it finishes."""
    import warnings

    from protocols.registry import get_protocol, is_synthetic
    from protocols.transfer import ProtocolDeviation

    subject = None
    for step in steps:
        key = f"{job.name}/{step.name}"
        if state.done(key):
            _log(f"{key}: already stored as {state.done(key)}", pipeline)
            continue
        if subject is None:
            subject = _subject(job, checkpoint, recipe, cfg)
        protocol = get_protocol(step.protocol)
        data, overrides = step.data, {}
        if data is None:
            default = protocol.default_data(cfg.progress)
            data, overrides = default.data, dict(default.overrides)
        run_cfg = protocol.make_config({**overrides, **step.settings}, synthetic=is_synthetic(data))
        _log(f"{key}: {protocol.name} on {data}", pipeline)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ProtocolDeviation)  # recorded in the result
            result = protocol.run(subject, data, run_cfg, work_dir=step.work_dir, progress=cfg.progress)
        result.config["replication"] = {"batch": state.batch, "pipeline": pipeline, "job": job.name, "step": step.name,
                                        "recipe": recipe}
        record = store.write_run(pipeline, result, seed=job.seed,
                                 command=["densecl-bench", *sys.argv[1:]] if sys.argv[1:] else None)
        state.mark(key, record.run_id)
        headline = ", ".join(f"{k} {v:.2f}" for k, v in result.metrics.items()
                             if k in ("AP", "bbox_AP", "mIoU", "best/mAP") and v is not None)
        _log(f"{key}: {headline + '; ' if headline else ''}stored {record.path}", pipeline)


def voc_steps(job: Job, cfg: ReplicateVOCConfig) -> list[Step]:
    root = Path(cfg.voc_root) if cfg.voc_root else default_voc_root(progress=cfg.progress)
    costs = cfg.costs or (voc_svm.DEFAULT_COSTS if cfg.scale == "paper" else SMALL_SCALE_COSTS)
    common = dict(costs=costs, seed=job.seed, workers=cfg.workers, device=cfg.device, solver=cfg.solver)
    steps = [Step("voc07_svm", "voc07_svm", root, dict(common, layers=tuple(cfg.svm_layers))),
             Step("voc07_lowshot", "voc07_lowshot", root,
                  dict(common, layers=(cfg.lowshot_layer,), ks=tuple(cfg.ks), samples=cfg.samples))]
    if cfg.dense_probe and cfg.scale == "small":
        steps.append(Step("seg_voc_dense_probe", "seg_voc_dense_probe", root,
                          dict(train_split="trainval", test_split="test", device=cfg.device,
                               input_size=cfg.probe_input_size)))
    return steps


def replicate_voc(cfg: ReplicateVOCConfig) -> dict[str, Any]:
    """Run the pipeline; returns {"batch", "runs": [...], "report": path of the verdict report}."""
    from replication.report import select_runs, write_report
    from replication.results import ResultsStore

    cfg.validate()
    store = ResultsStore(cfg.results)
    state = PipelineState(Path(cfg.runs) / "pipeline_state.json", _config_digest(cfg))
    state.save()
    started = time.perf_counter()
    _log(f"batch {state.batch}: {cfg.scale} scale, methods {', '.join(cfg.methods)}"
         + (f", seeds {', '.join(map(str, cfg.seeds))}" if cfg.scale == "small" else ""))
    for job, checkpoint, recipe in checkpoint_jobs(cfg, "replicate-voc", cfg.runs):
        run_steps(job, checkpoint, recipe, voc_steps(job, cfg), cfg, state, store, "replicate-voc")
    report = write_report(store, select_runs(store, "replicate-voc", state.batch))
    state.state["report"] = str(report)
    state.save()
    _log(f"done in {time.perf_counter() - started:.0f} s")
    return {"batch": state.batch, "report": report, "runs": dict(state.state["done"])}


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


def replicate_dense(cfg: ReplicateDenseConfig) -> dict[str, Any]:
    """Run the dense pipeline; returns {"batch", "runs", "report"} like `replicate_voc`."""
    from protocols.transfer import require_mm_stack
    from replication.report import select_runs, write_report
    from replication.results import ResultsStore

    cfg.validate()
    if any(t.endswith("-fcn") for t in cfg.tasks):
        require_mm_stack("mmseg")
    if any(not t.endswith("-fcn") for t in cfg.tasks):
        require_mm_stack("mmdet")
    store = ResultsStore(cfg.results)
    state = PipelineState(Path(cfg.runs) / "pipeline_state.json", _config_digest(cfg))
    state.save()
    started = time.perf_counter()
    _log(f"batch {state.batch}: {cfg.scale} scale, tasks {', '.join(cfg.tasks)}, modes {', '.join(cfg.modes)}",
         "replicate-dense")
    for job, checkpoint, recipe in checkpoint_jobs(cfg, "replicate-dense", cfg.pretrain_runs):
        run_steps(job, checkpoint, recipe, dense_steps(job, cfg), cfg, state, store, "replicate-dense")
    report = write_report(store, select_runs(store, "replicate-dense", state.batch))
    state.state["report"] = str(report)
    state.save()
    _log(f"done in {time.perf_counter() - started:.0f} s", "replicate-dense")
    return {"batch": state.batch, "report": report, "runs": dict(state.state["done"])}


def replicate_dense_config(**values) -> ReplicateDenseConfig:
    """A config from keyword values (CLI), ignoring None."""
    fields = {f.name for f in dataclasses.fields(ReplicateDenseConfig)}
    return ReplicateDenseConfig(**{k: v for k, v in values.items() if k in fields and v is not None})
