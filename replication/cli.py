"""`densecl-bench`: the command line. A thin layer: parse, resolve configs, call the library."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from baselines import config as configs
from replication.eval_commands import add_eval_commands

# The embedded default pretraining data: a synthetic set disjoint from the evaluation one (seed 0).
DEFAULT_PRETRAIN_DATA = dict(images=512, size=96, seed=1)


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
        print(f"[pretrain] no --data given: using the synthetic images in {cfg.data}", file=sys.stderr)
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


def build_parser() -> argparse.ArgumentParser:
    from baselines.train import PretrainConfig

    parser = _Parser(
        prog="densecl-bench",
        description="Pretrain MoCo-v2 and DenseCL, evaluate any checkpoint under the paper's protocols, "
        "and check the paper's numbers.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pretrain = commands.add_parser(
        "pretrain",
        help="pretrain MoCo-v2 or DenseCL (one process, or under torchrun)",
        description="Pretrain MoCo-v2 or DenseCL. Settings: defaults (the official DenseCL ImageNet "
        "recipe) < --config (a YAML file or preset: densecl_imagenet_200ep, densecl_coco_800ep, "
        "mocov2_imagenet_200ep, mocov2_coco_800ep, small_cpu) < flags. Without --data it trains on "
        "the synthetic images. Multi-GPU: torchrun --nproc_per_node 8 -m replication pretrain ...",
    )
    pretrain.add_argument("--config", help="YAML file or preset name")
    configs.add_arguments(pretrain, PretrainConfig)
    pretrain.set_defaults(func=cmd_pretrain)

    data = commands.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True, metavar="ACTION")
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

    add_eval_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from baselines.data import BadImageError
    from baselines.train import NonFiniteLossError, TrainingInterrupted

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    try:
        return args.func(args)
    except TrainingInterrupted as err:
        print(f"densecl-bench: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("densecl-bench: interrupted", file=sys.stderr)
        return 130
    except (configs.ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError,
            BadImageError, NonFiniteLossError) as err:
        print(f"densecl-bench: error: {_one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, configs.ConfigError) else 1
    except RuntimeError as err:
        if "BadImageError" in str(err) or "Original Traceback" in str(err):
            print(f"densecl-bench: error: {_one_line(err)}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
