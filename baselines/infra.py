"""The infrastructure every loop and writer shares, written once (DESIGN.md, "Interfaces").

- atomic writes: `atomic_file` and its wrappers write a hidden temporary sibling, fsync it and
  rename it over the target, so a reader sees the old file or the new one, never half of one;
- seeds: `derived_seed` (one 63-bit seed per tuple of keys) and `seed_everything`;
- provenance: git state, package versions and device, recorded with every checkpoint and result;
- JSON conversion: `to_jsonable`, the one converter from numpy/torch/dataclass values;
- stop handling: `StopRequest` turns SIGINT/SIGTERM into a flag that a loop checks between
  iterations, so it can save consistent state before raising `Interrupted`.

`baselines` sits at the bottom of the import graph, so `protocols` and `replication` use these
from here and nothing else re-implements them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import functools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import numpy as np

UNKNOWN = "unknown"
TEMP_SUFFIX = ".tmp"
SOURCE_DIR = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------- atomic writes


def temp_path(path: Path) -> Path:
    """`.<name>.<pid>.tmp` beside `path`: hidden, on the same filesystem (so the rename is atomic), per process."""
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """A file to write `path` through: renamed over it when the block ends, removed if the block raises."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(value, str(path)), indent=indent, allow_nan=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_file(path, "wb") as handle:
        torch.save(obj, handle)


def atomic_numpy_save(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_file(path, "wb") as handle:
        np.save(handle, array)


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Point `dst` at `src`'s content atomically (a hard link where the filesystem allows, else a copy)."""
    dst = Path(dst)
    tmp = temp_path(dst)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.tmp$")


def remove_stale_temp_files(folder: str | os.PathLike) -> tuple[int, int]:
    """Delete the `.<name>.<pid>.tmp` files a killed writer left in `folder` (not a live process's own);
    returns (files, bytes) removed. Other names are never touched."""
    count = size = 0
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return 0, 0
    for path in entries:
        match = _TEMP_NAME.match(path.name)
        if not match or not path.is_file() or _pid_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            length = path.stat().st_size
            path.unlink()
            count, size = count + 1, size + length
    return count, size


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or new entry in `folder` durable; harmless where directories cannot be fsynced."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------- seeds


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key (numpy's SeedSequence hashing): one stream per (seed, epoch, index)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) from one integer."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- paths


def cache_root() -> Path:
    """Where generated datasets, feature caches and built wheels live: $DENSECL_BENCH_CACHE, else ~/.cache."""
    return Path(os.environ.get("DENSECL_BENCH_CACHE") or Path.home() / ".cache" / "densecl-bench")


# ---------------------------------------------------------------------------------------------- provenance

PACKAGES = {  # reported name -> distribution names to try, in order
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "timm": ("timm",),
    "numpy": ("numpy",),
    "sklearn": ("scikit-learn",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss"),
    "pandas": ("pandas",),
}


def git_state(directory: str | os.PathLike = SOURCE_DIR) -> dict[str, Any]:
    """Commit and dirty flag of the repository holding `directory`; "unknown" outside git.

    Untracked files do not make the tree dirty (results and runs folders would always do so), and neither
    do changes under the repository's `results/`: the store itself updates the tracked `results/index.csv`.
    """
    commit = _git(directory, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": UNKNOWN, "dirty": UNKNOWN}
    status = _git(directory, "status", "--porcelain", "--untracked-files=no", "--", ":(top,exclude)results")
    return {"commit": commit, "dirty": UNKNOWN if status is None else bool(status)}


def _git(directory: str | os.PathLike, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def package_versions() -> dict[str, str | None]:
    """Installed versions (None when absent), read from package metadata so nothing is imported."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name, distributions in PACKAGES.items():
        versions[name] = next(filter(None, (_distribution_version(d) for d in distributions)), None)
    return versions


def _distribution_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def device_info() -> dict[str, Any]:
    """CPU model, core count and CUDA devices, so timings and numerics can be put in context."""
    return {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(), "cuda": _cuda_devices()}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or UNKNOWN


def _cuda_devices() -> list[str]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def provenance(directory: str | os.PathLike = SOURCE_DIR) -> dict[str, Any]:
    """What produced a file: when, from which commit (and whether the tree was dirty), with which packages, where."""
    return {"created": utc_now().isoformat(timespec="seconds"), "git": git_state(directory),
            "packages": package_versions(), "device": device_info()}


# ---------------------------------------------------------------------------------------------- JSON


class NotJSONable(ValueError):
    """A value that has no faithful JSON form; the message says where it sits."""


def to_jsonable(value: Any, where: str = "value") -> Any:
    """Plain JSON types from numpy scalars/arrays, tensors, Paths, tuples, sets, dataclasses, enums.

    Non-finite floats become null (strict JSON has no NaN). Anything else raises `NotJSONable`
    naming where it sits, rather than storing an unreadable `repr`.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {_json_key(k, where): to_jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return sorted((to_jsonable(v, f"{where}[]") for v in value), key=repr)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, where)
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value), where)
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return to_jsonable(value.tolist(), where)
    if hasattr(value, "item"):
        return to_jsonable(value.item(), where)
    raise NotJSONable(f"{where}: cannot store a {type(value).__qualname__} as JSON; "
                      "convert it to numbers, strings, lists or dicts first")


def _json_key(key: Any, where: str) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, (int, float, bool)) or key is None or hasattr(key, "item"):
        return str(to_jsonable(key, where))
    if isinstance(key, os.PathLike):
        return os.fspath(key)
    raise NotJSONable(f"{where}: cannot store a {type(key).__qualname__} as a JSON key")


# ---------------------------------------------------------------------------------------------- stopping


class Interrupted(RuntimeError):
    """A run stopped on SIGINT/SIGTERM after saving its state; the message says how to resume (exit code 130)."""


class StopRequest:
    """SIGINT/SIGTERM set `requested` (and `signal`) for the block; the loop saves and stops at the next boundary.

    A second signal raises KeyboardInterrupt at once, for a user who does not want to wait. Handlers are
    installed only in the main thread (Python allows nothing else) and restored when the block ends.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
