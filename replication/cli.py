"""`densecl-bench`: the command line. A thin layer: parse, resolve configs, call the library."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on cores shared with data-loader workers or other jobs a
# spinning team made the batched SVM solver's small tensor operations ~300x slower (issue 11). It must be
# set before torch is first imported; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from baselines import config as configs
from baselines.infra import Interrupted, UserError, get_logger, setup_logging
from replication.claims import CLAIMS_SUMMARY, add_claims_commands
from replication.eval_commands import EVAL_SUMMARY, add_eval_commands

LOG = get_logger("cli")

# The embedded default pretraining data: a synthetic set disjoint from the evaluation one (seed 0).
DEFAULT_PRETRAIN_DATA = dict(images=512, size=96, seed=1)
DEFAULT_SEEDS = (0, 1, 2, 3, 4)  # the replicate pipelines' paired seeds (docs/small-scale-design.md)
DEFAULT_SOLVER = "batched"  # the exact batched solver; liblinear stays the reference mode of `eval`
PIPELINES = ("replicate-voc", "replicate-dense")  # whose batches `report` names


def _one_line(err: BaseException) -> str:
    """The message a user needs; errors re-raised from a data-loader worker keep only their last line."""
    text = str(err).strip() or type(err).__name__
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0]


class _Parser(argparse.ArgumentParser):
    """Bad flags give one line, not a page of usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from baselines.train import PretrainConfig, pretrain
    from protocols.datasets import synthetic

    cfg = configs.resolve(PretrainConfig, args.config, args)
    if not cfg.data:
        root = synthetic.cached(**DEFAULT_PRETRAIN_DATA)
        cfg.data = str(root / "JPEGImages")
        get_logger("pretrain").info("no --data given: using the synthetic images in %s", cfg.data)
    if not cfg.out:
        cfg.out = str(Path("runs") / f"{cfg.method}-{cfg.arch}")
    backbone = pretrain(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"[pretrain] done: backbone {backbone}, checkpoints in {Path(cfg.out) / 'checkpoints'}")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from protocols.datasets import synthetic

    root = synthetic.generate(args.out, images=args.images, size=args.size, seed=args.seed)
    summary = (root / "dataset.json").read_text()
    print(f"wrote a synthetic VOC-layout dataset to {root}\n{summary}", end="")
    return 0


def _layer_list(text: str) -> tuple[str, ...]:
    from replication.eval_commands import _layers

    return _layers(text)


def _pairs(values: list[str] | None, option: str, example: str) -> dict[str, str]:
    """`KEY=VALUE` options (given several times) as a dict."""
    pairs = {}
    for value in values or []:
        key, sep, path = value.partition("=")
        if not sep or not path:
            raise configs.ConfigError(f"{option} expects {example}, got {value!r}")
        pairs[key] = path
    return pairs


def _given_checkpoints(args: argparse.Namespace) -> dict[str, str]:
    """--checkpoint METHOD=PATH, else $DENSECL_CHECKPOINT / $MOCOV2_CHECKPOINT."""
    checkpoints = _pairs(args.checkpoint, "--checkpoint", "METHOD=PATH (e.g. densecl=densecl_r50.pth)")
    for method, variable in (("densecl", "DENSECL_CHECKPOINT"), ("mocov2", "MOCOV2_CHECKPOINT")):
        if os.environ.get(variable) and method not in checkpoints:
            checkpoints[method] = os.environ[variable]
    return checkpoints


def replicate_voc_config_from(args: argparse.Namespace):
    """The replicate-voc pipeline config of parsed `replicate voc` arguments."""
    from replication.pipelines import replicate_voc_config

    checkpoints = _given_checkpoints(args)
    return replicate_voc_config(
        seeds=tuple(args.seeds), epochs=args.epochs, voc_root=args.voc_root or os.environ.get("VOC_ROOT") or None,
        checkpoints=checkpoints, arch=args.arch, pretrain_data=args.pretrain_data, pretrain_epochs=args.pretrain_epochs,
        workers=args.workers, device=args.device, runs=args.runs, results=args.results, progress=args.progress,
        samples=args.samples, svm_layers=args.svm_layers, preset=args.preset, pretrain_size=args.pretrain_size,
        require_paper_grid=args.require_paper_grid, random_baseline=args.random_baseline, dense_probe=args.dense_probe,
        solver=args.solver, threads=args.threads,
    )


def cmd_replicate_voc(args: argparse.Namespace) -> int:
    from replication.pipelines import replicate_voc

    cfg = replicate_voc_config_from(args)
    _print_outcome("replicate-voc", replicate_voc(cfg, _launcher(args)), cfg.results)
    return 0


def _launcher(args: argparse.Namespace):
    from replication.launchers import make_launcher

    return make_launcher(args.launcher, jobs=args.jobs, partition=args.partition, gpus_per_job=args.gpus_per_job,
                         cpus_per_job=args.cpus_per_job, time_min=args.time, array_parallelism=args.array_parallelism)


def cmd_replicate_job(args: argparse.Namespace) -> int:
    from replication.pipelines import run_recorded_job

    run_recorded_job(args.runs, args.key)
    return 0


def _print_outcome(pipeline: str, outcome: dict, results: str) -> None:
    report = Path(outcome["report"])
    print(f"[{pipeline}] batch {outcome['batch']}: {len(outcome['runs'])} protocol runs stored under "
          f"{Path(results) / pipeline}")
    from replication.report import summary

    print(summary(report.read_text()))
    print(f"\n[{pipeline}] report:   {report}\n[{pipeline}] verdicts: {report.with_name('verdicts.csv')}\n"
          f"[{pipeline}] plots:    {report.parent / 'plots'}")


def replicate_dense_config_from(args: argparse.Namespace):
    """The replicate-dense pipeline config of parsed `replicate dense` arguments."""
    from replication.pipelines import replicate_dense_config

    checkpoints = _given_checkpoints(args)
    return replicate_dense_config(
        seeds=tuple(args.seeds), tasks=tuple(args.tasks), modes=tuple(args.modes), det_iterations=args.det_iterations,
        seg_iterations=args.seg_iterations, epochs=args.epochs,
        data=_pairs(args.data, "--data", "TASK=ROOT (e.g. voc-fcn=VOCdevkit/VOC2012)"),
        checkpoints=checkpoints, arch=args.arch, pretrain_data=args.pretrain_data, pretrain_epochs=args.pretrain_epochs,
        workers=args.workers, device=args.device, runs=args.runs, pretrain_runs=args.pretrain_runs,
        results=args.results, progress=args.progress, preset=args.preset, pretrain_size=args.pretrain_size,
        require_paper_grid=args.require_paper_grid, random_baseline=args.random_baseline, threads=args.threads)


def cmd_replicate_dense(args: argparse.Namespace) -> int:
    from replication.pipelines import replicate_dense

    cfg = replicate_dense_config_from(args)
    _print_outcome("replicate-dense", replicate_dense(cfg, _launcher(args)), cfg.results)
    return 0


def cmd_regression(args: argparse.Namespace) -> int:
    from replication import regression

    return regression.run(args.update, Path(args.reference), args.progress)


def cmd_report(args: argparse.Namespace) -> int:
    from replication.report import select_runs, write_report
    from replication.results import ResultsStore

    if args.latest and (args.batch or args.runs or args.select):
        raise configs.ConfigError("--latest picks the newest batch itself; give BATCH, --runs or --select instead")
    store = ResultsStore(args.results)
    pipeline = args.pipeline or (_newest_batch_pipeline(store) if args.latest else None) or PIPELINES[0]
    selection = select_runs(store, pipeline=pipeline, batch=args.batch, runs=args.runs, select=args.select)
    path = write_report(store, selection)
    print(path.read_text())
    print(f"report: {path}")
    return 0


def _newest_batch_pipeline(store) -> str | None:
    """The pipeline whose newest batch is the newest stored one (None when no pipeline has run)."""
    from replication.report import REPORT_PROTOCOL

    batches = [r for pipeline in PIPELINES for r in store.load_runs(pipeline)
               if r.batch and r.protocol != REPORT_PROTOCOL]
    return max(batches, key=lambda r: (r.created, r.run_id)).pipeline if batches else None


def cmd_results(args: argparse.Namespace) -> int:
    from replication.results import ResultsError, ResultsStore

    if not Path(args.results).is_dir():
        raise ResultsError(f"no results store at {args.results}")
    if args.results_command == "repair":
        before = ResultsStore(args.results, read_only=True, index_missing=False).check()
        store = ResultsStore(args.results, index_missing=False)
        store.rebuild_index()
        after = store.check()
        fixed = len(before) - len(after)
        print(f"rebuilt {store.index_path} from the run folders ({fixed} problem(s) fixed)")
        for line in after:
            print(f"left as it is: {line}")
        return 0
    problems = ResultsStore(args.results, read_only=True, index_missing=False).check()
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s) in {args.results}" + (f"; fix the index: densecl-bench results repair "
                                                             f"--results {args.results}" if problems else ""))
    return 1 if problems else 0


def _small_scale_arguments(parser: argparse.ArgumentParser, random_baseline: bool) -> None:
    from replication.pipelines import DEFAULT_PRESET, PRETRAIN_DATA

    parser.add_argument("--preset", default=DEFAULT_PRESET,
                        help=f"small-scale pretraining preset, a name in baselines/configs or a YAML file "
                        f"(default: {DEFAULT_PRESET}; small_cpu is the tiny 2x2-grid one CI uses)")
    parser.add_argument("--epochs", type=int,
                        help="pretraining epochs (default: the preset's); give another --runs/--pretrain-runs per "
                        "epoch count, since a finished run is never resumed with other settings")
    parser.add_argument("--pretrain-size", type=int, default=PRETRAIN_DATA["size"],
                        help=f"side of the synthetic pretraining images (default: {PRETRAIN_DATA['size']})")
    parser.add_argument("--require-paper-grid", action="store_true",
                        help="refuse a preset whose DenseCL grid (image size / output stride) is below the paper's 7x7")
    if random_baseline:
        parser.add_argument("--no-random-baseline", dest="random_baseline", action="store_false",
                            help="skip the random-init backbone evaluated beside each seed")
    else:
        parser.add_argument("--random-baseline", action="store_true",
                            help="also evaluate a random-init backbone per seed (a third more time)")


def _launcher_arguments(parser: argparse.ArgumentParser) -> None:
    from replication.launchers import JOBS_DIR, LAUNCHERS, SLURM_DEFAULTS

    group = parser.add_argument_group(
        "jobs", f"The batch runs as jobs (a pretraining per method and seed, then a protocol run per checkpoint and "
        f"step, then the report); each job's log is in RUNS/{JOBS_DIR}/. Finished jobs are skipped on a re-run, "
        "failed ones are retried.")
    group.add_argument("--launcher", choices=LAUNCHERS, default="local",
                       help="local: this machine (default); slurm: a job array per stage through submitit, each job "
                       "under torchrun on its GPUs (pip install 'densecl-bench[slurm]'; RUNS must be on the "
                       "cluster's shared filesystem)")
    group.add_argument("--jobs", type=int, metavar="K",
                       help="local: run K jobs at once as separate processes (default: 1, in this process)")
    group.add_argument("--threads", type=int, metavar="T",
                       help="torch threads of every job (default: this machine's, whatever --jobs; on Slurm "
                       "--cpus-per-job / --gpus-per-job). CPU numbers depend on it, so it is one of the batch's "
                       "settings: any --jobs with the same --threads gives the same numbers")
    group.add_argument("--partition", help="slurm: the partition (default: the cluster's)")
    group.add_argument("--gpus-per-job", type=int, metavar="G",
                       help="GPUs per job, torchrun with G processes when G > 1 (slurm default: "
                       f"{SLURM_DEFAULTS['gpus_per_job']}; local: G of this machine's GPUs for each of the --jobs, "
                       "default one each, shared when the jobs outnumber them)")
    group.add_argument("--cpus-per-job", type=int, metavar="C",
                       help=f"slurm: CPUs per job (default: {SLURM_DEFAULTS['cpus_per_job']})")
    group.add_argument("--time", type=int, metavar="MINUTES",
                       help=f"slurm: time limit per job in minutes (default: {SLURM_DEFAULTS['time']}); a pretraining "
                       "cut short resumes from its last checkpoint on the re-run")
    group.add_argument("--array-parallelism", type=int, metavar="N",
                       help="slurm: at most N jobs of an array at once "
                       f"(default: {SLURM_DEFAULTS['array_parallelism']})")


def _add_pretrain(commands, summary: str) -> None:
    from baselines.pretrain_config import PretrainConfig

    pretrain = commands.add_parser(
        "pretrain", help=summary,
        description="Pretrain MoCo-v2 or DenseCL. Settings: defaults (the official DenseCL ImageNet "
        "recipe) < --config (a YAML file or preset: densecl_imagenet_200ep, densecl_coco_800ep, "
        "mocov2_imagenet_200ep, mocov2_coco_800ep, small_cpu) < flags. Without --data it trains on "
        "the synthetic images. Multi-GPU: torchrun --nproc_per_node 8 -m replication pretrain ...",
    )
    pretrain.add_argument("--config", help="YAML file or preset name")
    configs.add_arguments(pretrain, PretrainConfig)
    pretrain.set_defaults(func=cmd_pretrain)


def _add_data(commands, summary: str) -> None:
    data = commands.add_parser("data", help=summary).add_subparsers(dest="data_command", required=True,
                                                                    metavar="ACTION")
    synth = data.add_parser(
        "synth",
        help="write a synthetic multi-object dataset in the PASCAL VOC layout",
        description="Write a deterministic synthetic dataset (20 VOC classes, boxes, masks) in the "
        "VOC2007 folder layout. The same --seed always gives the same files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    synth.add_argument("--out", required=True, help="folder to create (must not exist)")
    synth.add_argument("--images", type=int, default=512, help="number of images")
    synth.add_argument("--size", type=int, default=96, help="long side of each image, pixels")
    synth.add_argument("--seed", type=int, default=0, help="generator seed")
    synth.set_defaults(func=cmd_data_synth)


def _add_convert(commands, summary: str) -> None:
    from baselines.convert_cli import add_convert_command

    add_convert_command(commands)


def _add_replicate(commands, summary: str) -> None:
    replicate = commands.add_parser("replicate", help=summary).add_subparsers(
        dest="pipeline", required=True, metavar="PIPELINE")
    voc = replicate.add_parser(
        "voc", help="VOC07 SVM + low-shot on MoCo-v2 and DenseCL, judged against the paper's claims",
        description="Small scale (default, no data needed): synthetic VOC-layout data, MoCo-v2 and DenseCL "
        "pretrained with --preset (default small_grid7) for each seed, VOC07 SVM, low-shot (feature5) and the "
        "dense probe, "
        "judged against the directional claims. Paper scale: --voc-root (or $VOC_ROOT) plus --checkpoint "
        "densecl=PATH --checkpoint mocov2=PATH (or $DENSECL_CHECKPOINT, $MOCOV2_CHECKPOINT): the full protocol, "
        "judged against the absolute numbers. Interrupted runs resume where they stopped.",
    )
    voc.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                     help=f"paired pretraining seeds (default: {' '.join(map(str, DEFAULT_SEEDS))})")
    voc.add_argument("--samples", type=int, help="low-shot samples per k (default: 5)")
    voc.add_argument("--svm-layers", type=_layer_list, help="SVM layers, comma list or 'all' (default: feature5)")
    voc.add_argument("--voc-root", help="real VOCdevkit/VOC2007 (default: $VOC_ROOT, else synthetic)")
    voc.add_argument("--checkpoint", action="append", metavar="METHOD=PATH",
                     help="evaluate this checkpoint instead of pretraining (densecl=..., mocov2=...)")
    voc.add_argument("--arch", help="architecture of the given checkpoints when their files do not say")
    voc.add_argument("--pretrain-data", default="imagenet",
                     help="what the given checkpoints were trained on (imagenet, coco)")
    voc.add_argument("--pretrain-epochs", type=int, default=200, help="their pretraining epochs (default: 200)")
    voc.add_argument("--workers", type=int, default=2, help="data-loading processes (default: 2)")
    voc.add_argument("--device", default="auto", help="auto, cpu, cuda")
    voc.add_argument("--runs", default="runs/replicate-voc", help="pretraining runs and pipeline state")
    voc.add_argument("--results", default="results", help="results store (default: results)")
    voc.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    _small_scale_arguments(voc, random_baseline=True)
    voc.add_argument("--no-dense-probe", dest="dense_probe", action="store_false",
                     help="skip the frozen per-location probe (a declared small-scale proxy)")
    voc.add_argument("--solver", choices=("liblinear", "batched"), default=DEFAULT_SOLVER,
                     help=f"SVM solver of both SVM protocols (default: {DEFAULT_SOLVER})")
    _launcher_arguments(voc)
    voc.set_defaults(func=cmd_replicate_voc)

    dense = replicate.add_parser(
        "dense", help="detection and segmentation transfer, fine-tuned and frozen, judged against the claims",
        description="Small scale (default, no data needed): the replicate-voc checkpoints of each seed (reused from "
        "--pretrain-runs, else pretrained the same way) fine-tuned and with a frozen backbone on the synthetic scenes "
        "(Faster R-CNN C4 and FCN-D8 by default; --tasks adds coco-fpn and cityscapes-fcn), judged against the "
        "directional claims (DenseCL >= MoCo-v2, larger gaps when frozen). Paper scale: --data TASK=ROOT for each "
        "task and --checkpoint METHOD=PATH: the reference protocols, judged against the absolute numbers. "
        "Needs the OpenMMLab stack (README 'Dense protocols'). Interrupted runs resume where they stopped.")
    dense.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                       help=f"paired seeds (default: {' '.join(map(str, DEFAULT_SEEDS))})")
    dense.add_argument("--tasks", nargs="+", default=["voc-c4", "voc-fcn"],
                       choices=("voc-c4", "coco-fpn", "voc-fcn", "cityscapes-fcn"), help="default: voc-c4 voc-fcn")
    dense.add_argument("--modes", nargs="+", default=["finetune", "frozen"], choices=("finetune", "frozen"))
    dense.add_argument("--det-iterations", type=int,
                       help="small-scale detection iterations (default: 120; the LR steps keep their fractions of it)")
    dense.add_argument("--seg-iterations", type=int, help="small-scale segmentation iterations (default: 150)")
    dense.add_argument("--data", action="append", metavar="TASK=ROOT",
                       help="real dataset per task (voc-c4=VOC2007,VOC2012 for 07+12; coco-fpn=coco; ...)")
    dense.add_argument("--checkpoint", action="append", metavar="METHOD=PATH",
                       help="evaluate this checkpoint instead of pretraining (densecl=..., mocov2=...)")
    dense.add_argument("--arch", help="architecture of the given checkpoints when their files do not say")
    dense.add_argument("--pretrain-data", default="imagenet", help="what the given checkpoints were trained on")
    dense.add_argument("--pretrain-epochs", type=int, default=200, help="their pretraining epochs (default: 200)")
    dense.add_argument("--workers", type=int, default=2, help="data-loading processes (default: 2)")
    dense.add_argument("--device", default="auto", help="auto, cpu, cuda")
    dense.add_argument("--runs", default="runs/replicate-dense", help="training state and pipeline state")
    dense.add_argument("--pretrain-runs", default="runs/replicate-voc",
                       help="where the small-scale checkpoints live (default: replicate-voc's)")
    dense.add_argument("--results", default="results", help="results store (default: results)")
    dense.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    _small_scale_arguments(dense, random_baseline=False)
    _launcher_arguments(dense)
    dense.set_defaults(func=cmd_replicate_dense)

    job = replicate.add_parser(
        "job", help="run one job of a started batch (what --jobs K and --launcher slurm run for each job)",
        description="Run one job of the batch whose state is RUNS/pipeline_state.json, with that batch's settings, "
        "in the folder the batch was started from; a protocol job already stored is skipped. Under torchrun it "
        "runs on every rank and rank 0 stores the result: torchrun --standalone --nproc_per_node G -m replication "
        "replicate job RUNS KEY.")
    job.add_argument("runs", help="the batch's runs folder (--runs of replicate voc|dense)")
    job.add_argument("key", help="pretrain/METHOD-seedN, or METHOD-seedN/STEP (e.g. densecl-seed0/voc07_svm; "
                     "replicate-dense: densecl-seed0/voc-c4/finetune)")
    job.set_defaults(func=cmd_replicate_job)


def _add_report(commands, summary: str) -> None:
    report = commands.add_parser(
        "report", help=summary,
        description="Judge every claim against a set of stored runs and store the report (report.md, verdicts.csv, "
        "plots). The set is a pipeline batch (BATCH, default the latest of --pipeline), --runs RUN_ID..., or "
        "--select KEY=VALUE,... over every stored run (keys: protocol, pipeline, method, seed, scale, dataset, "
        "checkpoint [sha256 prefix or path part], run [id prefix]). Re-running it on the same runs reuses the "
        "stored report.")
    report.add_argument("batch", nargs="?", help="pipeline batch id (default: the latest batch of --pipeline)")
    report.add_argument("--latest", action="store_true",
                        help="the newest batch of any pipeline (of --pipeline when given)")
    report.add_argument("--pipeline", choices=PIPELINES,
                        help=f"whose batches BATCH and --latest name (default: {PIPELINES[0]}; with --latest: "
                        "the pipeline that ran last)")
    report.add_argument("--runs", nargs="+", metavar="RUN_ID", help="exactly these stored runs (any pipeline)")
    report.add_argument("--select", metavar="KEY=VALUE,...",
                        help="every stored run matching all the filters, e.g. 'protocol=knn_in1k,method=densecl'")
    report.add_argument("--results", default="results", help="results store (default: results)")
    report.set_defaults(func=cmd_report)


def _add_results(commands, summary: str) -> None:
    results = commands.add_parser(
        "results", help=summary,
        description="The run folders are the store's source of truth and index.csv a summary of them. `check` "
        "lists every problem (complete runs the index lacks, index rows without a run, duplicated rows, folders "
        "that are not complete runs) and exits 1 if there is any; `repair` rebuilds index.csv from the folders "
        "and leaves the folders themselves as they are.")
    actions = results.add_subparsers(dest="results_command", required=True, metavar="ACTION")
    for name, text in (("check", "list the store's problems (exit 1 if any)"),
                       ("repair", "rebuild index.csv from the run folders")):
        action = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        action.add_argument("--results", default="results", help="results store (default: results)")
        action.set_defaults(func=cmd_results)


def _add_regression(commands, summary: str) -> None:
    regression = commands.add_parser(
        "regression", help=summary,
        description="Pretrain MoCo-v2 and DenseCL for 2 epochs on the synthetic images, run the VOC07 SVM and "
        "low-shot protocols on a few costs, and compare every metric with results/reference/regression.json "
        "within its band (exit 1 if any leaves it). --update rewrites the reference instead.",
    )
    regression.add_argument("--update", action="store_true", help="write a new reference (deliberate; commit it)")
    regression.add_argument("--reference", default=str(Path("results") / "reference" / "regression.json"))
    regression.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    regression.set_defaults(func=cmd_regression)


@dataclass(frozen=True)
class _Command:
    summary: str  # the line `densecl-bench --help` shows
    add: Callable[..., None]  # (sub-parsers, summary): adds the command's parser, importing what its flags need


# Only the command a call names gets its full parser, so `densecl-bench --help` and every command's `--help`
# import no more than that command's flags need (no torch for most of them).
COMMANDS: dict[str, _Command] = {
    "pretrain": _Command("pretrain MoCo-v2 or DenseCL (one process, or under torchrun)", _add_pretrain),
    "data": _Command("dataset tools", _add_data),
    "eval": _Command(EVAL_SUMMARY, lambda commands, summary: add_eval_commands(commands)),
    "convert": _Command("write a checkpoint's backbone for detectron2, mmdet/mmseg, torchvision or timm",
                        _add_convert),
    "claims": _Command(CLAIMS_SUMMARY, lambda commands, summary: add_claims_commands(commands)),
    "replicate": _Command("replication pipelines", _add_replicate),
    "report": _Command("verdicts, tables and plots for any stored runs: a pipeline batch, run ids, or a selection",
                       _add_report),
    "results": _Command("check or repair the results store's index", _add_results),
    "regression": _Command("CI regression: a tiny deterministic pipeline vs the committed reference",
                           _add_regression),
}


def _command_word(argv: list[str]) -> str | None:
    """The command `argv` names: its first word that is not an option (the global options take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: every command listed, only the one `argv` names built in full (all when None)."""
    parser = _Parser(
        prog="densecl-bench",
        description="Pretrain MoCo-v2 and DenseCL, evaluate any checkpoint under the paper's protocols, "
        "and check the paper's numbers.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more messages (debug)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else _command_word(argv)
    for name, command in COMMANDS.items():
        if argv is None or name == chosen:
            command.add(commands, command.summary)
        else:
            commands.add_parser(name, help=command.summary)
    return parser


# Errors a user can act on, besides `UserError`: files that are missing, in the way or not allowed, a full or
# read-only disk. Their message names the path, so it is all the user needs.
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
def _user_error_names() -> set[str]:
    """Class names of every user-facing error, to recognise one re-raised from a data-loader worker."""
    names, todo = set(), [UserError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def is_user_error(err: BaseException) -> bool:
    """True for errors whose one-line message is the whole story; everything else is a bug worth its traceback."""
    if isinstance(err, (UserError, *USER_OS_ERRORS)):
        return True
    if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
        return True
    text = str(err)
    if isinstance(err, RuntimeError) and "Original Traceback" in text:  # a worker's error torch could not rebuild
        last = text.strip().splitlines()[-1]
        return last.split(":", 1)[0].rsplit(".", 1)[-1] in _user_error_names()
    return False


def main(argv: list[str] | None = None) -> int:
    """Run one command: 0 on success, 1 on an error in the input or the machine (one line), 2 on a bad setting,
    130 when interrupted; an unexpected error prints its traceback and asks to be reported (1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    args.argv = argv
    setup_logging(args.verbose - args.quiet)
    try:
        return args.func(args)
    except Interrupted as err:
        print(f"densecl-bench: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("densecl-bench: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not is_user_error(err):
            traceback.print_exc()
            print(f"densecl-bench: internal error ({type(err).__name__}); this is a bug, please report it with the "
                  "command line and the traceback above", file=sys.stderr)
            return 1
        print(f"densecl-bench: error: {_one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, configs.ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
