"""The `convert` command's flags and targets, importable without torch so that `convert --help` is instant.

The conversion itself lives in `baselines.convert` and is imported only when the command runs.
"""

from __future__ import annotations

import argparse

TARGETS: dict[str, str] = {
    "detectron2": "detectron2 .pkl (convert-pretrain-to-detectron2.py renames, matching_heuristics)",
    "mmdet": "mmdet/mmcv {'state_dict', 'meta'} with torchvision ResNet keys",
    "mmseg": "the mmdet file: mmseg's ResNet reads the same keys",
    "torchvision": "plain torchvision ResNet state dict (no fc)",
    "timm": "plain timm state dict (no classifier)",
}


def add_convert_command(commands) -> None:
    """Add `densecl-bench convert` to the CLI's sub-command parsers."""
    parser = commands.add_parser(
        "convert",
        help="write a checkpoint's backbone for detectron2, mmdet/mmseg, torchvision or timm",
        description="Read any supported checkpoint (ours, official DenseCL/OpenSelfSup, MMSelfSup, MoCo, "
        "torchvision/timm, detectron2 .pkl), check its backbone strictly, and write it for the target: "
        "detectron2 .pkl with the official renames and matching_heuristics, mmdet/mmseg {'state_dict', 'meta'}, "
        "or a plain torchvision/timm state dict without the classifier. The written file is read back and "
        "compared with the source before it replaces anything.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint to convert")
    parser.add_argument("--to", required=True, choices=tuple(TARGETS), help="target library")
    parser.add_argument("--out", help="output file (default: <checkpoint stem>_<target>.pkl/.pth beside it)")
    parser.add_argument("--arch", help="backbone architecture (default: from the checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from baselines.convert import cmd_convert

    return cmd_convert(args)
