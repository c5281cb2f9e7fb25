"""Convert any checkpoint's backbone into the files detectron2, mmdet/mmseg, torchvision and timm load.

Conversion is kept apart from models (as in timm): the source is read and validated strictly by
`read_backbone_state` + `check_fits`, renamed for the target without building the target's model
where names alone decide, written to a temporary file, read back and compared tensor by tensor, and
only then moved into place. So a file that lands at `out` is complete and holds exactly the source's
backbone. Formats and renames: spec pretraining.md §4.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from baselines.checkpoints import (
    OUR_AUTHOR,
    BackboneState,
    CheckpointError,
    backbone_state_from_checkpoint,
    check_fits,
    detectron2_to_torchvision_key,
    read_checkpoint_file,
    summarize_keys,
)
from baselines.convert_cli import TARGETS
from baselines.files import file_sha256
from baselines.infra import atomic_file, naming_write_errors, torch_file_problem

# torchvision's ResNet naming, which mmdet's and timm's ResNets share (spec §4, "timm vs torchvision").
# A deep stem (conv1.0.*, ResNetV1c/resnet50d) or SE/attention modules do not match, on purpose.
_RESNET_KEY = re.compile(
    r"(conv1\.weight|bn1\.\w+"
    r"|layer[1-4]\.\d+\.(conv[1-3]\.weight|bn[1-3]\.\w+|downsample\.0\.weight|downsample\.1\.\w+))"
)
# Our `Backbone` keeps non-ResNet timm feature models whole under this prefix (baselines/backbone.py).
_WRAPPED_TRUNK_PREFIX = "trunk."
# Protocol 4 pickles arrays via numpy's `_reconstruct`: readable by numpy >= 1.26 (which ships
# `numpy._core` stubs for numpy 2 pickles) and by our NumpyOnlyUnpickler.
_PICKLE_PROTOCOL = 4


class ConversionError(CheckpointError):
    """A conversion that cannot be done as asked; the message is one line and names the fix."""


@dataclass(frozen=True)
class Conversion:
    """What `convert_checkpoint` wrote, and from what (printed by the CLI, recorded in metadata)."""

    source: Path
    source_format: str
    source_sha256: str
    arch: str
    target: str
    out: Path
    keys: int
    left_to_target: tuple[str, ...]  # target-model keys the backbone does not provide (its head)

    def summary(self) -> str:
        return (
            f"wrote {self.out}: {self.arch} backbone, {self.keys} tensors, for {self.target} "
            f"(from {self.source}: {self.source_format}, sha256 {self.source_sha256[:12]})"
        )

    def usage(self) -> str:
        """How the target loads the file, with the settings users most often get wrong."""
        if self.target == "detectron2":
            return (
                f"detectron2: MODEL.WEIGHTS {self.out} with INPUT.FORMAT RGB, MODEL.PIXEL_MEAN "
                "[123.675,116.28,103.53], MODEL.PIXEL_STD [58.395,57.12,57.375], MODEL.RESNETS.STRIDE_IN_1X1 False "
                "(spec pretraining.md §4)"
            )
        if self.target in ("mmdet", "mmseg"):
            return (
                f"{self.target}: backbone=dict(type='ResNet', depth=..., style='pytorch', "
                f"init_cfg=dict(type='Pretrained', checkpoint='{self.out}')); the plain 7x7-stem ResNet, "
                "not ResNetV1c"
            )
        left = ", ".join(self.left_to_target) or "nothing"
        return f"{self.target}: load_state_dict(torch.load('{self.out}'), strict=False) leaves only {left} missing"


def convert(
    path: str | os.PathLike, to: str, out: str | os.PathLike, arch: str | None = None, overwrite: bool = False
) -> Path:
    """Write `path`'s backbone as a `to` checkpoint at `out` and return `out`. See `convert_checkpoint`."""
    return convert_checkpoint(path, to, out, arch=arch, overwrite=overwrite).out


def convert_checkpoint(
    path: str | os.PathLike, to: str, out: str | os.PathLike, arch: str | None = None, overwrite: bool = False
) -> Conversion:
    """Read any supported checkpoint, check it fits `arch` strictly, write it for `to` atomically.

    Refuses to replace an existing `out` unless `overwrite`. `arch=None` takes the architecture from
    the checkpoint (metadata, else the ResNet its keys describe).
    """
    target = _check_target(to)
    out = Path(out)
    _check_out(out, target, overwrite)
    source = _read_source(path)
    arch = arch or source.arch
    if arch is None:
        raise ConversionError(
            f"{path}: cannot tell the architecture of this {source.format} checkpoint; pass arch (--arch)"
        )
    check_fits(source, arch, where=str(path))
    sha256 = file_sha256(path)
    metadata = {
        "arch": arch,
        "target": target,
        "source_file": Path(path).name,
        "source_format": source.format,
        "source_sha256": sha256,
        "converted_by": f"densecl-bench {_version()}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    state = {k: v.detach().clone() for k, v in source.state_dict.items()}
    payload, written_state, left_to_target = _BUILDERS[target](state, arch, metadata)
    _write_verified(payload, out, target, expected=written_state)
    return Conversion(Path(path), source.format, sha256, arch, target, out, len(state), left_to_target)


def torchvision_to_detectron2_key(key: str) -> str:
    """convert-pretrain-to-detectron2.py's renames, in its order (spec §4).

    `conv1.weight` -> `stem.conv1.weight`, `layer1.0.bn3.bias` -> `res2.0.conv3.norm.bias`,
    `layer1.0.downsample.1.weight` -> `res2.0.shortcut.norm.weight`.
    """
    if "layer" not in key:
        key = f"stem.{key}"
    key = re.sub(r"layer(\d)", lambda m: f"res{int(m[1]) + 1}", key)
    key = re.sub(r"bn([123])", r"conv\1.norm", key)
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def default_out_path(path: str | os.PathLike, to: str) -> Path:
    """`<source stem>_<target>.pkl` for detectron2, `.pth` otherwise, next to the source."""
    target = _check_target(to)
    path = Path(path)
    return path.with_name(f"{path.stem}_{target}{'.pkl' if target == 'detectron2' else '.pth'}")


# --------------------------------------------------------------------------- one builder per target
# Each returns (what to save, its state dict under the target's key names, target-model keys left out).
Built = tuple[object, dict[str, torch.Tensor], tuple[str, ...]]


def _for_detectron2(state: dict[str, torch.Tensor], arch: str, metadata: dict) -> Built:
    """`{'model': numpy arrays, '__author__', 'matching_heuristics': True}` as the official script writes it.

    detectron2 keeps the other top-level keys it does not know, so `meta` (source sha256, format,
    arch) travels along; `num_batches_tracked` is kept like the official script does (§4). The author
    is ours, never "Caffe2", the one name that makes detectron2 apply its Caffe2 renames.
    """
    _require_resnet_keys(state, arch, "detectron2")
    renamed = {}
    for key, tensor in state.items():
        new_key = torchvision_to_detectron2_key(key)
        if detectron2_to_torchvision_key(new_key) != key:
            raise ConversionError(f"{key} -> {new_key} does not rename back; refusing to write an ambiguous .pkl")
        renamed[new_key] = tensor
    model = {k: v.cpu().numpy() for k, v in renamed.items()}
    payload = {"model": model, "__author__": OUR_AUTHOR, "matching_heuristics": True, "meta": metadata}
    return payload, renamed, ()


def _for_mmdet(state: dict[str, torch.Tensor], arch: str, metadata: dict) -> Built:
    """mmcv/mmengine `load_checkpoint` takes `checkpoint['state_dict']`; mmdet's ResNet uses torchvision names."""
    _require_resnet_keys(state, arch, metadata["target"])
    return {"state_dict": state, "meta": metadata}, state, ()


def _for_torchvision(state: dict[str, torch.Tensor], arch: str, metadata: dict) -> Built:
    _require_resnet_keys(state, arch, "torchvision")
    left = _keys_left_to_model(state, _torchvision_shapes(arch), f"torchvision's {arch}")
    return state, state, left


def _for_timm(state: dict[str, torch.Tensor], arch: str, metadata: dict) -> Built:
    """ResNet keys are timm's already (§4); other timm models drop our `trunk.` wrapper prefix."""
    import timm

    renamed = {k.removeprefix(_WRAPPED_TRUNK_PREFIX): v for k, v in state.items()}
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    left = _keys_left_to_model(renamed, {k: tuple(v.shape) for k, v in model.state_dict().items()}, f"timm's {arch}")
    return renamed, renamed, left


_BUILDERS: dict[str, Callable[[dict[str, torch.Tensor], str, dict], Built]] = {
    "detectron2": _for_detectron2,
    "mmdet": _for_mmdet,
    "mmseg": _for_mmdet,
    "torchvision": _for_torchvision,
    "timm": _for_timm,
}




def _state_in_file(target: str, loaded: object) -> Mapping[str, object]:
    """Where each target's loader finds the tensors in the file it reads."""
    if target == "detectron2":
        return loaded["model"]
    if target in ("mmdet", "mmseg"):
        return loaded["state_dict"]
    return loaded


# --------------------------------------------------------------------------- checks and writing
def _check_target(to: str) -> str:
    if to not in TARGETS:
        raise ConversionError(f"unknown conversion target {to!r}: choose one of {', '.join(TARGETS)}")
    return to


def _check_out(out: Path, target: str, overwrite: bool) -> None:
    """Every reason the output cannot be written, before the source is read."""
    if out.is_dir():
        raise ConversionError(f"output {out} is a directory; give a file name")
    if out.exists() and not overwrite:
        raise ConversionError(f"output {out} already exists; pass overwrite=True (--overwrite) to replace it")
    if target == "detectron2" and out.suffix != ".pkl":
        # DetectionCheckpointer unpickles only names ending in .pkl; anything else goes to torch.load.
        raise ConversionError(f"detectron2 output {out} must end in .pkl, or detectron2 reads it with torch.load")
    _check_writable(out)


def _check_writable(out: Path) -> None:
    """A file can be created where `out` goes: its folder, or the nearest existing folder above it, takes a probe."""
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConversionError(f"cannot write {out}: {folder} is a file, not a folder; choose another --out")
    probe = folder / f".write-check.{os.getpid()}.tmp"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConversionError(f"cannot write {out}: folder {folder} is not writable ({err.strerror or err}); "
                              "choose another --out") from None


def _read_source(path: str | os.PathLike) -> BackboneState:
    """The source's backbone; a damaged file is told from its bytes (torch words a text file like a pickle of
    objects)."""
    try:
        checkpoint = read_checkpoint_file(path)
    except CheckpointError as err:
        if not os.path.isfile(path):
            raise
        raise ConversionError(f"cannot read {path}: {torch_file_problem(path, err)}; convert a PyTorch checkpoint "
                              "or a detectron2 .pkl") from None
    try:
        return backbone_state_from_checkpoint(checkpoint)
    except CheckpointError as err:
        raise ConversionError(f"{path}: {err}") from None


def _require_resnet_keys(state: Mapping[str, torch.Tensor], arch: str, target: str) -> None:
    """The target's ResNet consumes torchvision's key names; anything else would load nothing."""
    foreign = [k for k in state if not _RESNET_KEY.fullmatch(k)]
    if foreign:
        raise ConversionError(
            f"{target} conversion needs a ResNet with torchvision key names (conv1, bn1, layer1-4); "
            f"{arch} has {summarize_keys(foreign, 'other key')}"
        )


def _torchvision_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ConversionError(f"torchvision has no classification model {arch!r}; convert --to timm instead")
    with torch.device("meta"):
        model = torchvision.models.get_model(arch)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _keys_left_to_model(
    state: Mapping[str, torch.Tensor], model_shapes: Mapping[str, tuple[int, ...]], model_name: str
) -> tuple[str, ...]:
    """The model keys `state` leaves to the model (its head), after checking every key of `state` fits it."""
    unknown = [k for k in state if k not in model_shapes]
    mismatched = [f"{k} {list(v.shape)} vs {list(model_shapes[k])}" for k, v in state.items()
                  if k in model_shapes and tuple(v.shape) != model_shapes[k]]
    if unknown or mismatched:
        problems = [summarize_keys(unknown, "unknown key")] if unknown else []
        problems += [summarize_keys(mismatched, "shape mismatch")] if mismatched else []
        raise ConversionError(f"the backbone does not fit {model_name}: {'; '.join(problems)}")
    return tuple(k for k in model_shapes if k not in state)


def _write_verified(payload: object, out: Path, target: str, expected: Mapping[str, torch.Tensor]) -> None:
    """Save to a temporary file beside `out`, read it back safely and compare, then rename into place."""
    with naming_write_errors(out, "converted checkpoint", "free space there or choose another --out"):
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out) as f:
            if target == "detectron2":
                # Plain pickle of containers and numpy arrays, as the official script writes (§4).
                pickle.dump(payload, f, protocol=_PICKLE_PROTOCOL)
            else:
                torch.save(payload, f)
            f.flush()
            _check_reads_back(Path(f.name), target, expected)  # the temporary file, before it replaces anything


def _check_reads_back(path: Path, target: str, expected: Mapping[str, torch.Tensor]) -> None:
    """The file, read with torch.load(weights_only) or the numpy-only unpickler, holds exactly `expected`."""
    read = {k: torch.as_tensor(v) for k, v in _state_in_file(target, read_checkpoint_file(path)).items()}
    if list(read) != list(expected):
        differing = sorted(set(read) ^ set(expected)) or ["(key order)"]
        raise ConversionError(f"written file reads back with other keys: {summarize_keys(differing)}")
    unequal = [k for k, v in expected.items() if read[k].dtype != v.dtype or not torch.equal(read[k], v)]
    if unequal:
        raise ConversionError(f"written file reads back with other values: {summarize_keys(unequal)}")


def _version() -> str:
    try:
        return importlib.metadata.version("densecl-bench")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- command line
def cmd_convert(args: argparse.Namespace) -> int:
    out = args.out or default_out_path(args.checkpoint, args.to)
    conversion = convert_checkpoint(args.checkpoint, args.to, out, arch=args.arch, overwrite=args.overwrite)
    print(conversion.summary())
    print(conversion.usage())
    return 0
