"""The infrastructure every loop and writer shares, written once (DESIGN.md, "Interfaces").

- atomic writes: `atomic_file` and its wrappers write a hidden temporary sibling, fsync it and
  rename it over the target, so a reader sees the old file or the new one, never half of one;
- seeds: `derived_seed` (one 63-bit seed per tuple of keys) and `seed_everything`;
- provenance: git state, package versions and device, recorded with every checkpoint and result;
- JSON conversion: `to_jsonable`, the one converter from numpy/torch/dataclass values;
- logging: `get_logger(name)` gives `densecl_bench.<name>`; `setup_logging` is the command line's handler
  (tqdm-safe), so a library user configures or silences the `densecl_bench` logger like any other;
- errors: `UserError` marks a message meant for the user (one line at the command line, no traceback);
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
import logging
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy is imported where it is used: the command line's --help needs none of it
    import numpy as np

UNKNOWN = "unknown"
TEMP_SUFFIX = ".tmp"
SOURCE_DIR = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------- logging

LOGGER_ROOT = "densecl_bench"


def get_logger(name: str) -> logging.Logger:
    """`densecl_bench.<name>`: one hierarchy, so a library user silences or redirects all of it at its root."""
    return logging.getLogger(f"{LOGGER_ROOT}.{name}")


class _ShortNames(logging.Formatter):
    """`[eval] message`: the logger's last name only, as the tool's own prefixes read."""

    def format(self, record: logging.LogRecord) -> str:
        record.short = record.name.rsplit(".", 1)[-1]
        return super().format(record)


class TqdmHandler(logging.StreamHandler):
    """Writes to the current `sys.stderr` (tests and tqdm replace it), through `tqdm.write` when tqdm is loaded,
    so a message printed during a progress bar does not break the bar."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> IO:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = sys.modules.get("tqdm")  # no bar can be open unless tqdm was imported
        if tqdm is None:
            super().emit(record)
            return
        try:
            tqdm.tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(verbosity: int = 0) -> None:
    """The command line's handler on the `densecl_bench` root: info by default, -v debug, -q warnings only.

    A library user who never calls this gets Python's default (warnings and errors on stderr) and can
    configure `logging.getLogger("densecl_bench")` like any other logger.
    """
    logger = logging.getLogger(LOGGER_ROOT)
    if not any(isinstance(h, TqdmHandler) for h in logger.handlers):
        handler = TqdmHandler()
        handler.setFormatter(_ShortNames("[%(short)s] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO)


# ---------------------------------------------------------------------------------------------- errors


class UserError(Exception):
    """An error in what the user gave (a file, a flag, a setting) or in their machine (a missing device):
    the command line prints its message as one line, without a traceback. Anything else is a bug and
    keeps its traceback. Subclasses also derive from the builtin they refine (ValueError, RuntimeError)."""


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
    import numpy as np

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
    import numpy as np

    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) from one integer."""
    import numpy as np
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
    from importlib import metadata  # here: importing it costs the command line's --help a tenth of a second

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


# ---------------------------------------------------------------------------------------------- user-facing file errors


class StorageError(UserError, OSError):
    """A file that could not be written (disk full, read-only, no permission): one line naming it and the fix."""


@contextlib.contextmanager
def naming_write_errors(path: str | os.PathLike, what: str, fix: str) -> Iterator[None]:
    """Turn an OSError of the block into a StorageError naming `path`, not the hidden temporary file the OS saw."""
    try:
        yield
    except StorageError:
        raise
    except OSError as err:
        error = StorageError(f"cannot write {what} {path}: {err.strerror or err}; {fix}")
        error.errno = err.errno
        raise error from None


def load_torch_file(path: str | os.PathLike, what: str, fix: str = "", map_location: Any = "cpu") -> Any:
    """`torch.load(weights_only=True)`, with every way the file can be unreadable a one-line error naming it.

    Damaged files are a `ConfigError` (the user's input); `fix` says what to do and ends the message.
    """
    import torch

    from baselines.config import ConfigError  # baselines.config imports this module

    path = Path(path)
    tail = f"; {fix}" if fix else ""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not a file{tail}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise PermissionError(f"cannot read {what} {path}: permission denied") from None
    except _unreadable_errors() as err:
        raise ConfigError(f"cannot read {what} {path}: {torch_file_problem(path, err)}{tail}") from None


def _unreadable_errors() -> tuple[type[BaseException], ...]:
    """What torch.load raises on a damaged or foreign file: its unpicklers and zip reader raise any of these."""
    import pickle
    import struct

    return (OSError, EOFError, RuntimeError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            ImportError, pickle.UnpicklingError, struct.error)


def torch_file_problem(path: str | os.PathLike, error: BaseException) -> str:
    """Why torch.load refused `path`, told from its error and the file's first bytes (torch words a text file
    and a pickle of objects alike)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError as err:
        return err.strerror or str(err)
    refused_objects = "Unsupported global" in str(error)
    if not head:
        return "the file is empty (a write was cut off)"
    if head.startswith(b"PK\x03\x04"):
        return ("it holds Python objects, which are never unpickled" if refused_objects
                else "a damaged or truncated torch file")
    if head[0] == 0x80:  # a pickle protocol marker: the legacy format or a plain pickle
        return ("it holds Python objects, which are never unpickled" if refused_objects
                else "a damaged or truncated pickle")
    if _looks_like_text(head):
        return "a text file, not a torch file"
    return "not a torch file (another kind of file)"


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not just a character cut at the end of the sample
            return False
        text = head[: err.start].decode("utf-8")
    return all(char.isprintable() or char in "\t\n\r" for char in text)


def load_numpy_file(path: str | os.PathLike, what: str, fix: str = "") -> np.ndarray:
    """`np.load(allow_pickle=False)` of one `.npy` array, with every way it can be unreadable one line naming it."""
    import numpy as np

    from baselines.config import ConfigError  # baselines.config imports this module

    tail = f"; {fix}" if fix else ""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except PermissionError:
        raise PermissionError(f"cannot read {what} {path}: permission denied") from None
    except (OSError, ValueError, EOFError) as err:
        text = str(err)
        reason = ("it holds Python objects, which are never unpickled" if "allow_pickle" in text
                  else f"not a complete .npy array ({text.strip().splitlines()[0] if text.strip() else 'empty'})")
        raise ConfigError(f"cannot read {what} {path}: {reason}{tail}") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise ConfigError(f"cannot read {what} {path}: an .npz archive, not one .npy array{tail}")
    return array
