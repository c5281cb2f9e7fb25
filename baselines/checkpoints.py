"""Read pretraining checkpoints, ours and official ones, into a `Backbone` (spec pretraining.md §4).

Conversion is kept apart from models, as timm does: `read_backbone_state` turns any supported file
into a backbone state dict with torchvision/timm ResNet key names without building a model, and
`load_backbone` builds the `Backbone` and loads that state strictly. Only heads may be dropped on
the way (a classifier `fc.*`, the projection neck/head, the momentum encoder and the queues); any
other missing or unexpected key is a `CheckpointError`, so a wrong or partial file never loads
silently.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import torch

from baselines.backbone import Backbone, create_backbone
from baselines.infra import UserError, torch_file_problem

# What baselines/train.py writes: `Trainer._state()["format"]` and `export_backbone()["author"]`.
OUR_TRAINING_FORMAT = "densecl-bench/pretrain"
OUR_AUTHOR = "densecl-bench"

FORMATS: dict[str, str] = {
    "densecl-bench/pretrain": "densecl-bench training checkpoint (baselines/train.py)",
    "densecl-bench/backbone": "densecl-bench exported backbone (backbone.pth)",
    "openselfsup": "official DenseCL/OpenSelfSup training checkpoint (encoder_q.0.*, backbone.* alias)",
    "mmselfsup-0.x": "MMSelfSup 0.x training checkpoint (OpenSelfSup layout plus neck.*)",
    "mmselfsup-1.x": "MMSelfSup 1.x training checkpoint (backbone.*, neck.*, encoder_k.module.*)",
    "extracted-backbone": "backbone extracted by the official extract_backbone_weights.py",
    "moco": "facebookresearch/moco checkpoint (module.encoder_q.*)",
    "torchvision": "torchvision/timm ResNet state dict",
    "torchvision-ddp": "torchvision/timm state dict saved from (Distributed)DataParallel (module.*)",
    "detectron2": "detectron2 .pkl written by convert-pretrain-to-detectron2.py",
}

_QUEUES = ("queue", "queue_ptr", "queue2", "queue2_ptr")
_TRAINING_HEADS = ("encoder_q.1", "encoder_k", "neck", "head", *_QUEUES)


class CheckpointError(UserError, ValueError):
    """A file that is not a checkpoint, or whose backbone does not fit the architecture asked for."""


class BackboneState(NamedTuple):
    """A backbone state dict with torchvision/timm key names, the detected format and the arch (if known)."""

    state_dict: dict[str, torch.Tensor]
    format: str
    arch: str | None
    pretraining: Mapping[str, Any] = MappingProxyType({})  # method, epochs, data as the file declares them


@dataclass(frozen=True)
class Layout:
    """Where the backbone lives in a format's state dict, and what around it may be dropped.

    `droppable` names keys or key prefixes (a name matches itself and `name.*`). `alias` is a second
    prefix holding the same backbone tensors (OpenSelfSup's `self.backbone = self.encoder_q[0]`,
    spec §4); it must agree with the backbone and is then dropped.
    """

    backbone_prefix: str = ""
    droppable: tuple[str, ...] = ()
    alias: str = ""


LAYOUTS: dict[str, Layout] = {
    "densecl-bench/pretrain": Layout("encoder_q.0", _TRAINING_HEADS),
    "densecl-bench/backbone": Layout(),
    "openselfsup": Layout("encoder_q.0", _TRAINING_HEADS, alias="backbone"),
    "mmselfsup-0.x": Layout("encoder_q.0", _TRAINING_HEADS, alias="backbone"),
    "mmselfsup-1.x": Layout("backbone", ("neck", "head", "encoder_k", *_QUEUES)),
    "extracted-backbone": Layout(),
    "moco": Layout("module.encoder_q", ("module.encoder_k", "module.queue", "module.queue_ptr")),
    "torchvision": Layout(),
    "torchvision-ddp": Layout("module"),
    "detectron2": Layout(),
}

# Block type and blocks per stage of the torchvision ResNets (He et al. 2016, Table 1).
_RESNETS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}


def load_backbone(path: str | os.PathLike, arch: str | None = None, device: str | torch.device = "cpu") -> Backbone:
    """The checkpoint's backbone, loaded strictly, in eval mode, with `.checkpoint_format` set.

    `arch=None` takes the architecture from the checkpoint's metadata or infers a torchvision
    ResNet from its keys and shapes.
    """
    state = read_backbone_state(path)
    arch = arch or state.arch
    if arch is None:
        raise CheckpointError(
            f"{path}: cannot tell the architecture of this {state.format} checkpoint (no 'arch' in its "
            "metadata and not a torchvision ResNet-18/34/50/101/152 layout); pass arch (--arch)"
        )
    check_fits(state, arch, where=str(path))
    backbone = create_backbone(arch)
    backbone.load_state_dict(state.state_dict, strict=True)
    backbone.checkpoint_format = state.format
    backbone.declared_pretraining = dict(state.pretraining)
    return backbone.to(device).eval()


def read_backbone_state(path: str | os.PathLike) -> BackboneState:
    """The backbone part of any supported checkpoint file, without building a model."""
    checkpoint = read_checkpoint_file(path)
    try:
        return backbone_state_from_checkpoint(checkpoint)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None


def backbone_state_from_checkpoint(checkpoint: object) -> BackboneState:
    """`read_backbone_state` for an object already in memory (what `torch.load` returned)."""
    format_name, state = detect_format(checkpoint)
    if format_name == "detectron2":
        state = {detectron2_to_torchvision_key(k): v for k, v in state.items()}
    backbone = extract_backbone(state, LAYOUTS[format_name])
    return BackboneState(backbone, format_name, declared_arch(checkpoint) or infer_resnet_arch(backbone),
                         declared_pretraining(checkpoint))


def read_checkpoint_file(path: str | os.PathLike) -> object:
    """`torch.load(weights_only=True)`, or a numpy-only unpickler for detectron2 `.pkl` files."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path is a directory, not a file: {path}")
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of any non-zip file before failing on it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    except Exception as torch_error:
        detectron2_pickle = None if zipfile.is_zipfile(path) else _read_numpy_pickle(path)
        if isinstance(detectron2_pickle, dict):
            return detectron2_pickle
        raise CheckpointError(f"cannot read {path} as a checkpoint: {torch_file_problem(path, torch_error)}") from None


def detect_format(checkpoint: object) -> tuple[str, Mapping[str, object]]:
    """The format name (a key of `FORMATS`) and the state dict that holds the backbone."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"not a checkpoint: the file holds a {type(checkpoint).__name__}, not a dict")
    declared = checkpoint.get("format")
    if declared == OUR_TRAINING_FORMAT:
        return OUR_TRAINING_FORMAT, _state_dict_of(checkpoint, "state_dict")
    if isinstance(declared, str) and declared.startswith(OUR_AUTHOR):
        raise CheckpointError(f"unknown densecl-bench format {declared!r} (this code reads {OUR_TRAINING_FORMAT!r})")
    if checkpoint.get("author") == OUR_AUTHOR:
        return "densecl-bench/backbone", _state_dict_of(checkpoint, "state_dict")

    if isinstance(checkpoint.get("state_dict"), Mapping):
        state = _state_dict_of(checkpoint, "state_dict")
    elif isinstance(checkpoint.get("model"), Mapping):
        state = _state_dict_of(checkpoint, "model")
    elif checkpoint and all(_is_array(v) for v in checkpoint.values()):
        state = checkpoint
    else:
        raise CheckpointError(
            f"not a checkpoint: no 'state_dict' or 'model' and not a state dict itself "
            f"(top-level keys: {summarize_keys(map(str, checkpoint))})"
        )

    keys = list(state)
    if _any_under(keys, "encoder_q.0"):
        return ("mmselfsup-0.x" if _any_under(keys, "neck") else "openselfsup"), state
    if _any_under(keys, "module.encoder_q"):
        return "moco", state
    if _any_under(keys, "backbone"):
        return "mmselfsup-1.x", state
    if _any_under(keys, "stem") or any(re.match(r"res[2-5]\.", k) for k in keys):
        return "detectron2", state
    if all(k.startswith("module.") for k in keys):
        return "torchvision-ddp", state
    if "author" in checkpoint:  # {'state_dict', 'author': 'DenseCL' | 'MMSelfSup'} (spec §4)
        return "extracted-backbone", state
    return "torchvision", state


def extract_backbone(state: Mapping[str, object], layout: Layout) -> dict[str, torch.Tensor]:
    """The backbone's tensors with `layout.backbone_prefix` stripped and the classifier `fc.*` dropped.

    Raises on a key that is neither backbone nor droppable, and on an alias that disagrees.
    """
    prefix = f"{layout.backbone_prefix}." if layout.backbone_prefix else ""
    alias_prefix = f"{layout.alias}." if layout.alias else None
    backbone: dict[str, object] = {}
    alias: dict[str, object] = {}
    stray = []
    for key, value in state.items():
        if key.startswith(prefix):
            backbone[key.removeprefix(prefix)] = value
        elif alias_prefix and key.startswith(alias_prefix):
            alias[key.removeprefix(alias_prefix)] = value
        elif not any(_is_under(key, name) for name in layout.droppable):
            stray.append(key)
    if stray:
        raise CheckpointError(f"{summarize_keys(stray, 'unexpected key')} outside the backbone and its heads")
    if not backbone:
        raise CheckpointError(f"no backbone keys ({prefix}*) in the state dict")
    if alias:
        _check_alias_agrees(backbone, alias, layout)
    not_tensors = [k for k, v in backbone.items() if not _is_array(v)]
    if not_tensors:
        raise CheckpointError(f"{summarize_keys(not_tensors, 'backbone entry')} not tensors")
    return {k: _as_tensor(v) for k, v in backbone.items() if not _is_under(k, "fc")}


def detectron2_to_torchvision_key(key: str) -> str:
    """Undo convert-pretrain-to-detectron2.py's renames (spec §4), e.g. `res2.0.shortcut.norm.bias`."""
    key = key.removeprefix("stem.")
    key = re.sub(r"^res(\d)\.", lambda m: f"layer{int(m[1]) - 1}.", key)
    key = re.sub(r"(^|\.)conv(\d)\.norm\.", r"\1bn\2.", key)
    return key.replace("shortcut.norm.", "downsample.1.").replace("shortcut.", "downsample.0.")


def declared_arch(checkpoint: object) -> str | None:
    """The architecture a checkpoint names: top-level `arch` (ours, FB MoCo), `config.arch`, `meta.arch`."""
    if not isinstance(checkpoint, dict):
        return None
    candidates = [checkpoint.get("arch")]
    for section in ("config", "meta"):
        if isinstance(checkpoint.get(section), Mapping):
            candidates.append(checkpoint[section].get("arch"))
    return next((c for c in candidates if isinstance(c, str) and c), None)


def declared_pretraining(checkpoint: object) -> dict[str, Any]:
    """Method, epochs, pretraining data and seed where our own files record them (training config or export
    meta). The seed pairs an `eval` run with the other method's run of the same seed (replication/verdicts.py)."""
    if not isinstance(checkpoint, dict):
        return {}
    found: dict[str, Any] = {}
    for section in (checkpoint.get("config"), checkpoint.get("meta"), checkpoint):
        if not isinstance(section, Mapping):
            continue
        for key in ("method", "epochs", "pretrain_data", "seed"):
            value = section.get(key)
            if key not in found and isinstance(value, (str, int)) and not isinstance(value, bool) and value != "":
                found[key] = value
    return found


def infer_resnet_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """resnet18/34/50/101/152 from the block type, blocks per stage, stem and width, else None.

    Wide ResNets and ResNeXts (other widths or grouped convs) and deep-stem variants give None.
    Other keys are not looked at: `check_fits` reports them against the architecture.
    """
    if "layer1.0.conv3.weight" in state:
        block, plain_conv = "bottleneck", "layer1.0.conv2.weight"
    elif "layer1.0.conv2.weight" in state:
        block, plain_conv = "basic", "layer1.0.conv1.weight"
    else:
        return None
    if _shape(state, "conv1.weight") != (64, 3, 7, 7) or _shape(state, plain_conv) != (64, 64, 3, 3):
        return None
    blocks = tuple(
        len({m[1] for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}) for stage in (1, 2, 3, 4)
    )
    return _RESNETS.get((block, blocks))


def check_fits(state: BackboneState, arch: str, where: str = "checkpoint") -> None:
    """Raise a one-line CheckpointError unless `state` has exactly `arch`'s backbone keys and shapes."""
    try:
        expected = expected_shapes(arch)
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from None
    problems = _shape_problems(state.state_dict, expected)
    if not problems:
        return
    inferred = infer_resnet_arch(state.state_dict)
    origin = f" of a {state.arch}" if state.arch and state.arch != arch else ""
    if inferred and inferred not in (arch, state.arch):
        origin += f" (keys look like {inferred})"
    raise CheckpointError(f"{where}: {state.format} checkpoint{origin} does not fit {arch}: " + "; ".join(problems))


@functools.lru_cache(maxsize=16)
def expected_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """`create_backbone(arch)`'s state-dict shapes, from a model on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = create_backbone(arch)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def summarize_keys(keys: Iterable[str], noun: str = "", shown: int = 5) -> str:
    """'3 missing keys: a, b, c' or 'a, b, ... (12 in all)': keeps error messages on one line."""
    keys = list(keys)
    listed = ", ".join(keys[:shown]) + (f", ... ({len(keys)} in all)" if len(keys) > shown else "")
    if not noun:
        return listed
    return f"{len(keys)} {noun}{'s' if len(keys) != 1 else ''}: {listed}"


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Plain containers and numpy arrays only, so reading a detectron2 `.pkl` cannot run code."""

    _NUMPY_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
    })

    def find_class(self, module: str, name: str):
        canonical = re.sub(r"^numpy\._?core\b", "numpy.core", module)
        if (canonical, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(canonical.replace("numpy.core", self._NUMPY_CORE, 1), name)


def _shape_problems(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {list(state[k].shape)} vs {list(shape)}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(summarize_keys(missing, "missing key"))
    if unexpected:
        problems.append(summarize_keys(unexpected, "unexpected key"))
    if mismatched:
        problems.append(summarize_keys(mismatched, "shape mismatch") + " (checkpoint vs model)")
    return problems


def _check_alias_agrees(backbone: Mapping[str, object], alias: Mapping[str, object], layout: Layout) -> None:
    """The alias is the same module saved twice (spec §4): same keys, identical tensors."""
    where = f"{layout.alias}.* and {layout.backbone_prefix}.*"
    if set(alias) != set(backbone):
        differing = sorted(set(alias) ^ set(backbone))
        raise CheckpointError(f"{where} should alias one module but differ in {summarize_keys(differing, 'key')}")
    unequal = [k for k, v in alias.items() if not (v is backbone[k] or _same_array(v, backbone[k]))]
    if unequal:
        raise CheckpointError(f"{where} should alias one module but hold other values: {summarize_keys(unequal)}")


def _state_dict_of(checkpoint: dict, key: str) -> Mapping[str, object]:
    state = checkpoint.get(key)
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"checkpoint has no {key!r} dict of tensors")
    return state


def _read_numpy_pickle(path: str | os.PathLike) -> object:
    """The unpickled object, or None where the file is no pickle of containers and numpy arrays."""
    try:
        with open(path, "rb") as f:
            return NumpyOnlyUnpickler(f, encoding="latin1").load()
    except Exception:
        return None


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...] | None:
    return tuple(state[key].shape) if key in state else None


def _is_under(key: str, name: str) -> bool:
    return key == name or key.startswith(f"{name}.")


def _any_under(keys: Iterable[str], name: str) -> bool:
    return any(_is_under(k, name) for k in keys)


def _is_array(value: object) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _as_tensor(value: torch.Tensor | np.ndarray) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(value)


def _same_array(a: object, b: object) -> bool:
    if not (_is_array(a) and _is_array(b)):
        return False
    a, b = _as_tensor(a), _as_tensor(b)
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
