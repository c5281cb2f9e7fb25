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


def cmd_eval(args: argparse.Namespace) -> int:
    from protocols.common import backbone_under_test, resolve_device
    from protocols.registry import get_protocol
    from replication.results import ResultsStore

    protocol = get_protocol(args.protocol_name)
    if protocol.needs:
        from protocols.transfer import require_mm_stack

        require_mm_stack(protocol.needs)  # before any data is generated or weights loaded
    given = {f.name: getattr(args, f.name) for f in protocol.flag_fields if hasattr(args, f.name)}
    if "device" in given:
        resolve_device(given["device"])  # a device this machine lacks fails before any work
    store = ResultsStore(args.results)  # checked writable before any work, so nothing computed is lost
    data, overrides, synthetic = _data(args, protocol)
    cfg = protocol.make_config({**overrides, **given}, synthetic=synthetic)
    subject = None
    if protocol.subject == "backbone":
        subject = backbone_under_test(args.checkpoint, args.arch, getattr(cfg, "seed", 0),
                                      resolve_device(getattr(cfg, "device", "auto")), method=args.method,
                                      pretrain_data=args.pretrain_data, epochs=args.pretrain_epochs,
                                      pretrain_seed=args.pretrain_seed)
        LOG.info("checkpoint %s: %s, %s, pretraining %s", args.checkpoint, subject.info["format"],
                 subject.backbone.name, {k: v for k, v in subject.pretraining.items() if v is not None})
    work_dir = _work_dir(args, protocol, subject, cfg)
    if work_dir is not None:
        LOG.info("%s: resumable state in %s", protocol.name, work_dir)
    with _deviations_as_lines():
        result = protocol.run(subject, data, cfg, work_dir=work_dir, progress=args.progress)
    if os.environ.get("RANK", "0") != "0":  # under torchrun every rank ran the protocol; rank 0 stores the run
        return 0
    _print_metrics(f"{protocol.name} ({result.scale} scale; {result.dataset.get('name', '')}, "
                   f"{result.dataset.get('splits', '')})", result.metrics)
    record = store.write_run("eval", result, seed=getattr(cfg, "seed", None), command=["densecl-bench", *args.argv])
    print(f"result: {record.path / 'result.json'}\nrun id: {record.run_id}  (judge it: densecl-bench report --runs "
          f"{record.run_id})")
    return 0
