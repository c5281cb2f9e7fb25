"""`densecl-bench eval <protocol>`: load any checkpoint, run one protocol, print a table, store the run.

A thin layer over `protocols.registry`: one sub-command per registered protocol, named by its claims
`protocol_id` (plus the short aliases earlier versions used), whose flags are generated from the
protocol's config dataclass, so defaults and help cannot drift from the code. `--method`,
`--pretrain-data` and `--epochs` say what the checkpoint is (read from our own checkpoints), which is
what lets `densecl-bench report` judge the stored run against the paper's claims.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from pathlib import Path

from baselines import config as configs
from baselines.infra import get_logger

LOG = get_logger("eval")


def _subject_arguments(parser: argparse.ArgumentParser) -> None:
    from baselines.methods import evaluable_methods

    group = parser.add_argument_group("the checkpoint under test")
    group.add_argument("--checkpoint", required=True,
                       help="checkpoint in any supported layout (ours, official DenseCL/OpenSelfSup, MMSelfSup, MoCo, "
                       "torchvision/timm, detectron2 .pkl), or 'random' for a random-init baseline")
    group.add_argument("--arch", help="backbone architecture (default: from the checkpoint; resnet50 for 'random')")
    group.add_argument("--method", choices=evaluable_methods(),
                       help="how the checkpoint was pretrained (read from our checkpoints; give it for foreign ones)")
    group.add_argument("--pretrain-data", help="what it was pretrained on: in1k (imagenet) or coco (read from ours)")
    group.add_argument("--epochs", type=int, dest="pretrain_epochs", help="its pretraining epochs (read from ours)")
    group.add_argument("--pretrain-seed", type=int,
                       help="its pretraining seed: runs of one seed are paired across methods (read from ours)")


def _run_arguments(parser: argparse.ArgumentParser, resumable: bool) -> None:
    group = parser.add_argument_group("where things go")
    group.add_argument("--data", nargs="+", metavar="ROOT",
                       help="dataset root(s) (default: the protocol's synthetic dataset, generated on demand)")
    if resumable:
        group.add_argument("--work-dir", help="resumable training state (default: runs/eval/<protocol>/<weights>-"
                           "<config hash>, so the same command resumes)")
    group.add_argument("--results", default="results",
                       help="results store: the run goes to RESULTS/eval/<run-id>/ and a row to RESULTS/index.csv "
                       "(default: results)")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


EVAL_SUMMARY = "evaluate any checkpoint under one of the paper's protocols"


def add_eval_commands(commands) -> None:
    """`eval <protocol>` for every registered protocol; their declarations import nothing heavy (no torch)."""
    from protocols.registry import all_protocols

    evaluate = commands.add_parser(
        "eval", help=EVAL_SUMMARY,
        description="Run one protocol on one checkpoint and store the run, with what the checkpoint is "
        "(--method, --pretrain-data, --epochs), so `densecl-bench report --runs RUN_ID` can judge it against the "
        "paper's claims. Protocol names are the claims' protocol ids.")
    protocols = evaluate.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    for protocol in all_protocols():
        sub = protocols.add_parser(protocol.name, aliases=list(protocol.aliases), help=protocol.summary,
                                   description=protocol.description)
        if protocol.subject == "backbone":
            _subject_arguments(sub)
        _run_arguments(sub, protocol.resumable)
        settings = sub.add_argument_group(f"{protocol.name} settings")
        configs.add_arguments(settings, protocol.config, skip=tuple(protocol.fixed))
        sub.set_defaults(func=cmd_eval, protocol_name=protocol.name)


def _data(args: argparse.Namespace, protocol):
    """(data, config overrides that go with it, synthetic?) from --data or the protocol's default."""
    from protocols.registry import is_synthetic

    if args.data:
        for root in args.data:
            if not Path(root).exists():
                raise FileNotFoundError(f"data {root} does not exist")
        data = args.data[0] if len(args.data) == 1 else [Path(p) for p in args.data]
        return data, {}, is_synthetic(data)
    default = protocol.default_data(args.progress)
    LOG.info("no --data given: using %s", default.note)
    return default.data, dict(default.overrides), True


def _work_dir(args: argparse.Namespace, protocol, subject, cfg) -> Path | None:
    """--work-dir, else one folder per (weights, resolved config): re-running a command resumes it, changing
    a setting starts a new run instead of colliding with the old state."""
    from protocols.transfer import config_digest

    if not protocol.resumable:
        return None
    if args.work_dir:
        return Path(args.work_dir)
    weights = (subject.info.get("sha256") or "")[:16] or f"random-{subject.info['arch']}-seed{subject.info['seed']}"
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("workers", "device", "save_every")}
    return Path("runs") / "eval" / protocol.name / f"{weights}-{config_digest(settings)[:8]}"


@contextlib.contextmanager
def _deviations_as_lines():
    """Each way a dense run differs from the reference becomes one '[eval] differs from the reference' line;
    the OpenMMLab libraries' own API notices are hidden (the deviations are also recorded in the result)."""
    import warnings

    from protocols.transfer import ProtocolDeviation

    with warnings.catch_warnings():
        warnings.simplefilter("always", ProtocolDeviation)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"mm(cv|det|engine|seg)\.")
        default_show = warnings.showwarning

        def show(message, category, *rest, **kwargs) -> None:
            if issubclass(category, ProtocolDeviation):
                LOG.warning("differs from the reference: %s", message)
            else:
                default_show(message, category, *rest, **kwargs)

        warnings.showwarning = show
        yield


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
    print(title)
    width = max((len(name) for name in metrics), default=10)
    for name, value in metrics.items():
        print(f"  {name:{width}s} {value:9.3f}" if value is not None else f"  {name:{width}s}       n/a")


def _torchrun_ranks(protocol, given: dict):
    """The torchrun job this command is one rank of (a world of one without torchrun), on the rank's device.

    Ranks other than 0 log warnings only, so each line shows once.
    """
    import logging

    from baselines.distributed import Distributed, TorchrunError
    from baselines.infra import LOGGER_ROOT

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not protocol.torchrun:  # before joining the process group
        raise TorchrunError(f"{protocol.name} does not run under torchrun yet; run it as one process")
    device_field = any(f.name == "device" for f in dataclasses.fields(protocol.config))
    ranks = Distributed(given.get("device", "auto") if device_field else "cpu")
    if not ranks.is_main:
        logging.getLogger(LOGGER_ROOT).setLevel(logging.WARNING)
    return ranks


def _torchrun_command(world_size: int) -> list[str]:
    """How this job was launched, for the stored command line: torchrun's ranks per node and nodes."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    nodes = ["--nnodes", str(world_size // per_node)] if per_node != world_size else []
    return ["torchrun", *nodes, "--nproc_per_node", str(per_node), "-m", "replication"]


def cmd_eval(args: argparse.Namespace) -> int:
    """One protocol on one checkpoint; under torchrun every rank runs this and rank 0 alone stores the result."""
    from protocols.registry import get_protocol

    protocol = get_protocol(args.protocol_name)
    if protocol.needs:
        from protocols.transfer import require_mm_stack

        require_mm_stack(protocol.needs)  # before any data is generated or weights loaded
    given = {f.name: getattr(args, f.name) for f in protocol.flag_fields if hasattr(args, f.name)}
    if "device" in given:
        from protocols.common import resolve_device

        resolve_device(given["device"])  # a device this machine lacks fails before any work
    ranks = _torchrun_ranks(protocol, given)
    try:
        return _evaluate(args, protocol, given, ranks)
    finally:
        ranks.close()


def _evaluate(args: argparse.Namespace, protocol, given: dict, ranks) -> int:
    from protocols.common import backbone_under_test, resolve_device
    from replication.results import ResultsStore

    # Checked writable before any work, so nothing computed is lost; only rank 0 writes there.
    store = ResultsStore(args.results) if ranks.is_main else None
    data, overrides, synthetic = _data(args, protocol)
    cfg = protocol.make_config({**overrides, **given}, synthetic=synthetic)
    if ranks.world_size > 1 and hasattr(cfg, "device"):
        cfg = dataclasses.replace(cfg, device=str(ranks.device))  # each rank on its own GPU (cuda:LOCAL_RANK)
    progress = args.progress and ranks.is_main
    subject = None
    if protocol.subject == "backbone":
        subject = backbone_under_test(args.checkpoint, args.arch, getattr(cfg, "seed", 0),
                                      resolve_device(getattr(cfg, "device", "auto")), method=args.method,
                                      pretrain_data=args.pretrain_data, epochs=args.pretrain_epochs,
                                      pretrain_seed=args.pretrain_seed)
        ranks.check_same(subject.cache_id, "checkpoints (sha256)")
        LOG.info("checkpoint %s: %s, %s, pretraining %s", args.checkpoint, subject.info["format"],
                 subject.backbone.name, {k: v for k, v in subject.pretraining.items() if v is not None})
    work_dir = _work_dir(args, protocol, subject, cfg)
    if work_dir is not None:
        LOG.info("%s: resumable state in %s", protocol.name, work_dir)
    if ranks.world_size > 1:
        LOG.info("%s: %d torchrun ranks on %s; rank 0 writes the result", protocol.name, ranks.world_size,
                 ranks.device.type)
    with _deviations_as_lines():
        result = protocol.run(subject, data, cfg, work_dir=work_dir, progress=progress)
    if not ranks.is_main:
        return 0
    _print_metrics(f"{protocol.name} ({result.scale} scale; {result.dataset.get('name', '')}, "
                   f"{result.dataset.get('splits', '')})", result.metrics)
    command = [*(_torchrun_command(ranks.world_size) if ranks.world_size > 1 else ["densecl-bench"]), *args.argv]
    record = store.write_run("eval", result, seed=getattr(cfg, "seed", None), command=command)
    print(f"result: {record.path / 'result.json'}\nrun id: {record.run_id}  (judge it: densecl-bench report --runs "
          f"{record.run_id})")
    return 0
