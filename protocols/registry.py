"""One interface for every evaluation protocol, and the registry that lists them (DESIGN.md, "Interfaces").

A protocol is a `Protocol` object defined in its own module. Its `name` is the claims' `protocol_id`,
used as it is by the CLI (`densecl-bench eval <name>`), the results store and `claims.csv`. It has:
- `config`: a dataclass whose fields become the `eval` flags (defaults and help cannot drift);
- `run(subject, data, cfg, *, work_dir, progress) -> ProtocolResult`;
- `measurements(result) -> [Reading]`: its metrics as the claims name them (protocol_id, layer, k, metric).

`PROTOCOLS` maps a name to "module:attribute" so that nothing heavy is imported until a protocol is used:
a declaration module imports torch (and sklearn, faiss, ...) only inside the functions that run, so
`densecl-bench eval <name> --help` builds its flags without them. Where a protocol's code cannot be
imported lazily (the linear probes subclass torch's Dataset at module level), the declaration lives in
a light module of its own and names its functions with `Lazy("module:function")`.
Adding a protocol is its module plus one line here.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baselines.infra import UserError
from protocols.result import ProtocolResult

PROTOCOLS: dict[str, str] = {
    "voc07_svm": "protocols.voc_svm:VOC07_SVM",
    "voc07_lowshot": "protocols.voc_svm:VOC07_LOWSHOT",
    "knn_in1k": "protocols.knn:KNN_IN1K",
    "linear_in1k": "protocols.linear_protocols:LINEAR_IN1K",
    "linear_in1k_mhead": "protocols.linear_protocols:LINEAR_IN1K_MHEAD",
    "linear_places205_mhead": "protocols.linear_protocols:LINEAR_PLACES205_MHEAD",
    "det_voc_c4": "protocols.detection:DET_VOC_C4",
    "det_coco_mask_fpn": "protocols.detection:DET_COCO_MASK_FPN",
    "seg_voc_fcn": "protocols.segmentation:SEG_VOC_FCN",
    "seg_cityscapes_fcn": "protocols.segmentation:SEG_CITYSCAPES_FCN",
    "pretrain_overhead": "protocols.pretrain_overhead:PRETRAIN_OVERHEAD",
    "seg_voc_dense_probe": "protocols.dense_probe:SEG_VOC_DENSE_PROBE",
}

# Names earlier versions stored runs under; read back as today's protocol.
LEGACY_NAMES = {"knn": "knn_in1k", "det_coco_fpn": "det_coco_mask_fpn"}


class ProtocolError(UserError, ValueError):
    """An unknown protocol name or a protocol used the wrong way; one line."""


@dataclass(frozen=True)
class Lazy:
    """A function named "module:attribute", imported at its first call: a declaration can name a heavy
    module's function without importing that module."""

    target: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)(*args, **kwargs)


@dataclass(frozen=True)
class Reading:
    """One number a run measured, keyed as claims.csv keys it."""

    protocol_id: str
    metric: str
    value: float
    layer: str = ""
    k: int | None = None
    method: str | None = None  # only where one run measures several methods (pretrain_overhead)
    replicate: int | None = None  # pairs readings within one run (pretrain_overhead's timed rounds) instead of seeds


@dataclass(frozen=True)
class DefaultData:
    """What a protocol runs on when no data is given: a path (or paths) plus config values that go with it."""

    data: Any
    overrides: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Protocol:
    name: str  # the claims' protocol_id
    summary: str  # one line for `eval --help`
    description: str  # the `eval <name> --help` text
    config: type  # dataclass; its fields are the protocol's settings
    body: Callable[..., ProtocolResult]  # (subject, data, cfg, *, work_dir, progress): the protocol itself
    measurements: Callable[[ProtocolResult], list[Reading]]
    default_data: Callable[[bool], DefaultData]  # progress -> the synthetic default
    metrics: tuple[str, ...] = ()  # the claims metrics its readings carry
    produces: tuple[str, ...] = ()  # further claims protocol_ids its readings (or derived quantities) carry
    fixed: Mapping[str, Any] = field(default_factory=dict)  # config values that define this protocol
    configure: Callable[..., Any] | None = None  # (overrides, synthetic) -> cfg, where presets apply
    needs: str = ""  # an optional stack ("mmdet", "mmseg") checked before the run
    subject: str = "backbone"  # "backbone": a checkpoint to load; "none": the protocol needs no weights
    resumable: bool = False  # trains something: its state lives in `work_dir`, and the same call resumes it
    torchrun: bool = False  # shares its work over the ranks of a torchrun job (else it refuses to run under one)
    aliases: tuple[str, ...] = ()  # extra CLI names
    derived: Callable[[list[Any]], list[Any]] | None = None  # cross-run quantities, e.g. frozen minus fine-tuned

    def run(self, subject: Any, data: Any = None, cfg: Any = None, *, work_dir: str | Path | None = None,
            progress: bool = True) -> ProtocolResult | None:
        """Run the protocol on `subject` (a `protocols.common.BackboneUnderTest`; None where `subject="none"`).

        `data=None` takes the protocol's synthetic default, and `cfg=None` its config for that data. The
        result records what the verdicts need: the pretraining metadata of the subject and the run's scale.
        Under torchrun a rank other than 0 may get None: its share is done and rank 0 finishes alone (the SVMs).
        """
        from protocols.common import run_scale

        if data is None:
            default = self.default_data(progress)
            data, synthetic = default.data, True
            cfg = cfg if cfg is not None else self.make_config(default.overrides, synthetic=True)
        else:
            synthetic = is_synthetic(data)
            cfg = cfg if cfg is not None else self.make_config({}, synthetic=synthetic)
        if self.subject == "backbone" and subject is None:
            raise ProtocolError(f"{self.name} needs a backbone to evaluate (a checkpoint, or 'random')")
        if self.needs:
            from protocols.transfer import require_mm_stack

            require_mm_stack(self.needs)
        result = self.body(subject, data, cfg, work_dir=work_dir, progress=progress)
        if result is None:
            return None
        if result.protocol != self.name:
            raise ProtocolError(f"{self.name}'s run returned a result named {result.protocol!r}")
        result.pretraining = {**(subject.pretraining if subject is not None else {}), **result.pretraining}
        result.scale = run_scale(synthetic, result.pretraining, getattr(cfg, "preset", None))
        return result

    def make_config(self, overrides: Mapping[str, Any] | None = None, synthetic: bool = False):
        """The protocol's config: its defaults, its fixed values, then `overrides` (None values ignored)."""
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        clash = sorted(k for k in given if k in self.fixed and given[k] != self.fixed[k])
        if clash:
            raise ProtocolError(f"{self.name}: {', '.join(clash)} is fixed by the protocol "
                                f"({', '.join(f'{k}={self.fixed[k]!r}' for k in clash)})")
        values = {**self.fixed, **given}
        if self.configure is not None:
            return self.configure(values, synthetic)
        names = {f.name for f in dataclasses.fields(self.config)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ProtocolError(f"{self.name}: unknown setting(s) {', '.join(unknown)}")
        return self.config(**values)

    @property
    def flag_fields(self) -> list[dataclasses.Field]:
        """The config fields a user may set (the fixed ones define the protocol)."""
        return [f for f in dataclasses.fields(self.config) if f.name not in self.fixed and not f.name.startswith("_")]


def protocol_names() -> tuple[str, ...]:
    return tuple(PROTOCOLS)


def get_protocol(name: str) -> Protocol:
    """The registered protocol called `name` (or a legacy name of it)."""
    name = LEGACY_NAMES.get(name, name)
    if name not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    module, attribute = PROTOCOLS[name].split(":")
    protocol = getattr(importlib.import_module(module), attribute)
    if protocol.name != name:
        raise ProtocolError(f"registry entry {name!r} points at a protocol named {protocol.name!r}")
    return protocol


def all_protocols() -> Iterator[Protocol]:
    for name in PROTOCOLS:
        yield get_protocol(name)


def produced_protocol_ids() -> dict[str, str]:
    """claims protocol_id -> the registered protocol whose runs measure it."""
    return {pid: protocol.name for protocol in all_protocols() for pid in (protocol.name, *protocol.produces)}


def synthetic_voc(progress: bool = True) -> DefaultData:
    """The embedded evaluation data: synthetic VOC scenes, disjoint from the pretraining default."""
    from protocols.common import default_voc_root

    root = default_voc_root(progress=progress)
    return DefaultData(root, {}, f"the synthetic VOC-layout dataset in {root}")


def is_synthetic(data: Any) -> bool:
    """True when `data` (a root or a list of roots) was written by our generator (its `dataset.json` says so)."""
    from protocols.datasets.synthetic import is_synthetic_root

    roots = data if isinstance(data, (list, tuple)) else [data]
    return any(root is not None and is_synthetic_root(Path(root)) for root in roots)
