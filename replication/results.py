"""Versioned, append-only results store: `results/<pipeline>/<run-id>/` plus `results/index.csv`.

Every protocol run and pipeline lands here with the provenance needed to trust its numbers later
(git state, package versions, device, seed, resolved config, checkpoint and dataset hashes). The
folders are the source of truth; `index.csv` is a convenience that `rebuild_index()` regenerates.

Guarantees, because verdicts are computed from whatever is on disk:
- a run never overwrites another: its folder name is reserved by an exclusive `mkdir`;
- a run appears whole or not at all: it is written into `.<run-id>.partial/` and renamed once
  complete, so a crash leaves only a hidden partial folder, which readers skip and report;
- concurrent writers never lose or corrupt index rows: the rename that completes a run and the
  append of its row both happen under `fcntl.flock` on `results/.index.lock`;
- an acknowledged run is never lost from the index: a writer killed between its rename and its
  append leaves a complete folder without a row, and the next `ResultsStore` opened on the root
  appends the missing rows (with a warning naming them; a read-only store only warns);
  `densecl-bench results check|repair` report and rebuild the index;
- nothing is created until a run is written: a command that fails on its input leaves no `results/`.

Layout of one run folder: `result.json` (see `SCHEMA`/`SCHEMA_VERSION`), `metrics.csv`
(`metric,value`), `plots/<name>.png`, and any extra files the caller hands over.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import errno
import fcntl
import io
import json
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from baselines import infra
from baselines.infra import atomic_file, fsync_dir, get_logger
from protocols.result import ProtocolResult

SCHEMA = "densecl-bench/result"
SCHEMA_VERSION = 2  # 2: `pretraining` and `scale` at the top level
READABLE_VERSIONS = (1, 2)
RESULT_FILE = "result.json"
METRICS_FILE = "metrics.csv"
PLOTS_DIR = "plots"
INDEX_FILE = "index.csv"
INDEX_LOCK = ".index.lock"
PARTIAL_SUFFIX = ".partial"
SHORT_SHA = 12
UNKNOWN = infra.UNKNOWN

INDEX_COLUMNS = (
    "run_id", "pipeline", "protocol", "created", "git_commit", "dirty", "seed",
    "checkpoint_sha256", "checkpoint_format", "dataset", "metrics", "path",
)
FRAME_COLUMNS = (
    "run_id", "pipeline", "protocol", "created", "seed", "dataset", "checkpoint_sha256",
    "checkpoint_format", "git_commit", "dirty", "metric", "value", "path",
)
# Folders directly under the root that are not pipelines: committed CI references are a store of
# their own (`ResultsStore("results/reference")`), and `_scratch` is git-ignored working space.
NOT_PIPELINES = frozenset({"reference"})
SOURCE_DIR = Path(__file__).resolve().parent
RESULT_FIELDS = tuple(f.name for f in dataclasses.fields(ProtocolResult))
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_ID_ATTEMPTS = 100
LOG = get_logger("results")


class ResultsError(infra.UserError):
    """A results-store problem the user can act on; the message is one line naming the path."""


class UnknownSchemaError(ResultsError):
    """A result written by another version of this code: never silently skipped."""


# ---------------------------------------------------------------------------------------------
# Records read back from disk


@dataclass(frozen=True)
class RunRecord:
    """One complete run folder and its parsed `result.json`."""

    path: Path
    result: dict[str, Any]

    @property
    def run_id(self) -> str:
        return self.result["run_id"]

    @property
    def pipeline(self) -> str:
        return self.result["pipeline"]

    @property
    def protocol(self) -> str:
        return self.result["protocol"]

    @property
    def created(self) -> str:
        return self.result["created"]

    @property
    def pretraining(self) -> dict[str, Any]:
        """Method, pretraining data, epochs, arch and seed of the weights the run evaluated.

        Schema 1 runs kept them in `config.replication` (only pipeline runs had them).
        """
        if self.result.get("pretraining"):
            return dict(self.result["pretraining"])
        legacy = self.config.get("replication", {})
        if not legacy:
            return {}
        return {"method": legacy.get("method"), "pretrain_data": legacy.get("pretrain_data"),
                "epochs": legacy.get("pretrain_epochs"), "arch": legacy.get("arch"), "seed": legacy.get("seed"),
                "log": legacy.get("pretrain", {}).get("log")}

    @property
    def scale(self) -> str:
        return self.result.get("scale") or self.config.get("replication", {}).get("scale") or ""

    @property
    def batch(self) -> str | None:
        """The pipeline batch the run belongs to, if any."""
        return self.config.get("replication", {}).get("batch")

    def as_result(self) -> ProtocolResult:
        """The stored run as the ProtocolResult its protocol's `measurements` reads (legacy names mapped)."""
        from protocols.registry import LEGACY_NAMES

        return ProtocolResult(protocol=LEGACY_NAMES.get(self.protocol, self.protocol), metrics=dict(self.metrics),
                              config=self.config, dataset=self.dataset, checkpoint=self.checkpoint,
                              timings=self.timings, details=self.details, pretraining=self.pretraining,
                              scale=self.scale)

    @property
    def seed(self) -> int | None:
        return self.result.get("seed")

    @property
    def metrics(self) -> dict[str, float | None]:
        return self.result["metrics"]

    @property
    def config(self) -> dict[str, Any]:
        return self.result.get("config", {})

    @property
    def dataset(self) -> dict[str, Any]:
        return self.result.get("dataset", {})

    @property
    def checkpoint(self) -> dict[str, Any]:
        return self.result.get("checkpoint", {})

    @property
    def timings(self) -> dict[str, float]:
        return self.result.get("timings", {})

    @property
    def details(self) -> dict[str, Any]:
        return self.result.get("details", {})

    @property
    def git(self) -> dict[str, Any]:
        return self.result.get("git", {})

    @property
    def metrics_csv(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def plots(self) -> list[Path]:
        return [self.path / name for name in self.result.get("files", {}).get("plots", [])]


@dataclass(frozen=True)
class SkippedRun:
    """A folder that looks like a run but is not a complete one (crash, foreign file, ...)."""

    path: Path
    reason: str


@dataclass
class RunScan:
    """What a scan of the store found: complete runs, oldest first, and what it had to skip."""

    records: list[RunRecord] = field(default_factory=list)
    skipped: list[SkippedRun] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Provenance: git, packages, device


def to_jsonable(value: Any, where: str = "result") -> Any:
    """`infra.to_jsonable`, failing as a one-line `ResultsError` that names where in the result the value sits."""
    try:
        return infra.to_jsonable(value, where)
    except infra.NotJSONable as exc:
        raise ResultsError(str(exc).replace("as JSON", f"in {RESULT_FILE}")) from None


def _metric_value(name: str, value: Any) -> float | None:
    """Metrics must be numbers: the report does arithmetic on them."""
    plain = to_jsonable(value, f"metrics.{name}")
    if plain is None:
        return None
    if isinstance(plain, bool) or not isinstance(plain, (int, float)):
        raise ResultsError(f"metrics.{name}: expected a number, got {type(value).__qualname__} {value!r}")
    return float(plain) if math.isfinite(plain) else None


# ---------------------------------------------------------------------------------------------
# Reading one run


def read_run(path: str | os.PathLike) -> RunRecord:
    """The run stored in folder `path`; `ResultsError` if it is not a complete, readable run."""
    folder = Path(path)
    file = folder / RESULT_FILE
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{file}: missing; the run folder is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{file}: unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ResultsError(f"{file}: not a {SCHEMA} file")
    version = data.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise UnknownSchemaError(f"{file}: unknown schema_version {version!r} (this code reads {READABLE_VERSIONS}); "
                                 "upgrade densecl-bench to read it")
    missing = [key for key in ("run_id", "pipeline", "protocol", "created", "metrics") if key not in data]
    if missing:
        raise ResultsError(f"{file}: missing {', '.join(missing)}")
    return RunRecord(folder, data)


# ---------------------------------------------------------------------------------------------
# The store


class ResultsStore:
    """`results/<pipeline>/<run-id>/` folders plus `results/index.csv`, written atomically.

    A writing store checks at creation that its root could be written (without creating it), so an
    unusable results folder fails before hours of training rather than after, and indexes any complete
    run a killed writer left without a row; pass `read_only=True` to only read (missing rows are then
    only warned about), `index_missing=False` to leave the index alone (`results check|repair` report it).
    """

    def __init__(self, root: str | os.PathLike = "results", *, read_only: bool = False,
                 source_dir: str | os.PathLike = SOURCE_DIR, index_missing: bool = True) -> None:
        self.root = Path(root)
        self.read_only = read_only
        self.source_dir = Path(source_dir)
        if not read_only:
            self.check_writable()
        if index_missing:
            self._index_unindexed_runs()

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.root)!r}, read_only={self.read_only})"

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_FILE

    def check_writable(self) -> None:
        """Prove a file can be written in the root, or, while there is no root yet, in the folder that would
        hold it: the root itself is only created when a run is written."""
        folder = self.root
        while not folder.exists() and folder.parent != folder:
            folder = folder.parent
        try:
            if not folder.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
                pass
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ResultsError(f"results folder {self.root} is not writable: {reason}") from None

    # -- writing ---------------------------------------------------------------------------------

    def write_run(self, pipeline: str, result: ProtocolResult | Mapping[str, Any], *, run_id: str | None = None,
                  seed: int | None = None, plots: Mapping[str, Any] | None = None,
                  extra_files: Mapping[str, Any] | Sequence[str | os.PathLike] | None = None,
                  command: Sequence[str] | None = None) -> RunRecord:
        """Store one run and index it; returns the record as read back from disk.

        `plots` maps a name to a matplotlib Figure (saved as `plots/<name>.png`) or an image file
        (copied). `extra_files` maps a relative name to a file to copy (Path) or content to write
        (str/bytes); a sequence of paths keeps their base names. `seed` defaults to the config's
        `seed`, `command` to `sys.argv`. If anything fails, the hidden partial folder is left for
        inspection, nothing is indexed, and readers report it as skipped.
        """
        if self.read_only:
            raise ResultsError(f"results folder {self.root} was opened read-only")
        _check_name("pipeline", pipeline)
        if pipeline in NOT_PIPELINES or pipeline.startswith("_"):
            raise ResultsError(f"pipeline name {pipeline!r} is reserved under {self.root}")
        fields = _result_fields(result)
        extras = _extra_files(extra_files)
        plot_files = _plot_files(plots or {})
        created = _utc_now()
        payload = self._payload(pipeline, fields, created, seed, command, plot_files, extras)
        pipeline_dir = self.root / pipeline
        try:
            pipeline_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ResultsError(f"cannot create {pipeline_dir}: {exc.strerror or exc}") from None
        run_id, partial = _reserve_run(pipeline_dir, fields["protocol"], created, run_id)
        payload["run_id"] = run_id
        final = pipeline_dir / run_id
        try:
            _write_run_folder(partial, payload, plots or {}, plot_files, extras)
        except Exception as exc:
            raise _not_stored(run_id, partial, exc) from exc
        with self._index_lock():  # a reader repairing the index never sees a live writer's run half-published
            try:
                os.rename(partial, final)
                fsync_dir(pipeline_dir)
            except OSError as exc:
                raise _not_stored(run_id, partial, exc) from exc
            record = read_run(final)
            self._append_index_rows([index_row(record, self.root)])
        return record

    def _payload(self, pipeline: str, fields: dict[str, Any], created: datetime.datetime, seed: int | None,
                 command: Sequence[str] | None, plot_files: dict[str, str],
                 extras: dict[str, Any]) -> dict[str, Any]:
        """result.json minus the run id, built first so bad values fail before any folder exists."""
        config = fields["config"]
        if seed is None and isinstance(config, Mapping):
            seed = config.get("seed")
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "run_id": None,
            "pipeline": pipeline,
            "protocol": fields["protocol"],
            "created": created.isoformat(timespec="microseconds"),
            "command": list(sys.argv if command is None else command),
            "seed": to_jsonable(seed, "seed"),
            "git": infra.git_state(self.source_dir),
            "packages": infra.package_versions(),
            "device": infra.device_info(),
            "metrics": {str(name): _metric_value(str(name), v) for name, v in fields["metrics"].items()},
            "config": to_jsonable(config, "config"),
            "dataset": to_jsonable(fields["dataset"], "dataset"),
            "checkpoint": to_jsonable(fields["checkpoint"], "checkpoint"),
            "timings": to_jsonable(fields["timings"], "timings"),
            "details": to_jsonable(fields["details"], "details"),
            "pretraining": to_jsonable(fields.get("pretraining") or {}, "pretraining"),
            "scale": fields.get("scale") or "",
            "files": {
                "metrics": METRICS_FILE,
                "plots": sorted(plot_files.values()),
                "extra": sorted(extras),
            },
        }

    # -- reading ---------------------------------------------------------------------------------

    def scan_runs(self, pipeline: str | None = None, protocol: str | None = None) -> RunScan:
        """Complete runs (oldest first) and the folders skipped as incomplete, from the folders.

        A result written by an unknown schema version raises instead of being skipped: it is a
        real run this code cannot read, and dropping it would change verdicts silently.
        """
        scan = RunScan()
        for folder in self._run_folders(pipeline):
            if folder.name.startswith("."):
                scan.skipped.append(SkippedRun(folder, "unfinished write (crashed or still in progress)"))
                continue
            try:
                record = read_run(folder)
            except UnknownSchemaError:
                raise
            except ResultsError as exc:
                scan.skipped.append(SkippedRun(folder, str(exc)))
                continue
            if record.run_id != folder.name or record.pipeline != folder.parent.name:
                scan.skipped.append(SkippedRun(folder, f"{RESULT_FILE} names run {record.pipeline}/{record.run_id}"))
                continue
            if protocol is None or record.protocol == protocol:
                scan.records.append(record)
        scan.records.sort(key=lambda r: (r.created, r.run_id))
        return scan

    def load_runs(self, pipeline: str | None = None, protocol: str | None = None) -> list[RunRecord]:
        """Complete runs, oldest first; incomplete folders are left out with one warning."""
        scan = self.scan_runs(pipeline, protocol)
        if scan.skipped:
            listing = "; ".join(f"{s.path} ({s.reason})" for s in scan.skipped)
            warnings.warn(f"skipped {len(scan.skipped)} incomplete run folder(s): {listing}", stacklevel=2)
        return scan.records

    def latest(self, pipeline: str | None = None, protocol: str | None = None) -> RunRecord | None:
        """The most recent complete run matching the filters, or None."""
        records = self.load_runs(pipeline, protocol)
        return records[-1] if records else None

    def _run_folders(self, pipeline: str | None) -> Iterator[Path]:
        if pipeline is not None:
            _check_name("pipeline", pipeline)
            pipelines = [self.root / pipeline]
        else:
            pipelines = [p for p in _sorted_dirs(self.root) if _is_pipeline_dir(p.name)]
        for pipeline_dir in pipelines:
            for folder in _sorted_dirs(pipeline_dir):
                if not folder.name.startswith(".") or folder.name.endswith(PARTIAL_SUFFIX):
                    yield folder

    # -- index -------------------------------------------------------------------------------------

    def rebuild_index(self) -> Path:
        """Regenerate `index.csv` from the run folders (the source of truth), atomically."""
        if self.read_only:
            raise ResultsError(f"results folder {self.root} was opened read-only")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ResultsError(f"cannot create {self.root}: {exc.strerror or exc}") from None
        with self._index_lock():
            records = self.scan_runs().records
            with atomic_file(self.index_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=INDEX_COLUMNS)
                writer.writeheader()
                writer.writerows(index_row(r, self.root) for r in records)
            fsync_dir(self.root)
        return self.index_path

    def check(self) -> list[str]:
        """Every problem of the store, one line each naming the path: complete runs the index lacks, index rows
        without a run or listed twice, and folders that are not complete runs (a crashed or running writer)."""
        scan = self.scan_runs()
        problems = [f"{s.path}: not a complete run ({s.reason})" for s in scan.skipped]
        try:
            rows = self._index_rows()
        except ResultsError as exc:
            return [*problems, str(exc)]
        indexed = {_row_key(row) for row in rows}
        problems += [f"{r.path}: complete run missing from {self.index_path}" for r in scan.records
                     if (r.pipeline, r.run_id) not in indexed]
        stored = {(r.pipeline, r.run_id) for r in scan.records}
        counts: dict[tuple[str, str], int] = {}
        for row in rows:
            counts[_row_key(row)] = counts.get(_row_key(row), 0) + 1
        for (pipeline, run_id), count in counts.items():
            if (pipeline, run_id) not in stored:
                problems.append(f"{self.index_path}: row of {pipeline}/{run_id} has no complete run folder")
            if count > 1:
                problems.append(f"{self.index_path}: {pipeline}/{run_id} is listed {count} times")
        return problems

    def _index_rows(self) -> list[dict[str, str]]:
        """The rows of `index.csv` (none when there is no index yet); an unreadable index is a ResultsError."""
        try:
            with open(self.index_path, newline="") as f:
                rows = list(csv.DictReader(f))
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ResultsError(f"{self.index_path}: unreadable ({exc}); rebuild it: densecl-bench results repair "
                               f"--results {self.root}") from None
        if rows and not {"pipeline", "run_id"} <= set(rows[0]):
            raise ResultsError(f"{self.index_path}: no pipeline/run_id columns; rebuild it: densecl-bench results "
                               f"repair --results {self.root}")
        return rows

    def _index_unindexed_runs(self) -> None:
        """Append the rows of complete runs the index lacks: a writer killed between the rename that completes
        its run and the append of its row leaves exactly that. A read-only store only warns."""
        if not self.index_path.parent.is_dir():
            return
        if self.read_only:
            missing = self._unindexed()
        else:
            with self._index_lock():
                missing = self._unindexed()
                if missing:
                    self._append_index_rows([index_row(r, self.root) for r in missing])
        if missing:
            names = ", ".join(f"{r.pipeline}/{r.run_id}" for r in missing)
            action = (f"run `densecl-bench results repair --results {self.root}` to add them" if self.read_only
                      else "added them")
            LOG.warning("%s lacked %d complete run(s) (a writer stopped between storing and indexing them): %s; %s",
                        self.index_path, len(missing), names, action)

    def _unindexed(self) -> list[RunRecord]:
        """Complete runs without an index row; none when the store cannot be read (the first real read says why)."""
        try:
            indexed = {_row_key(row) for row in self._index_rows()}
            records = self.scan_runs().records
        except ResultsError as exc:
            LOG.warning("%s", exc)
            return []
        return [r for r in records if (r.pipeline, r.run_id) not in indexed]

    def read_index(self) -> pd.DataFrame:
        """`index.csv` as a DataFrame (empty, with the index columns, when there is none yet)."""
        if not self.index_path.exists():
            return pd.DataFrame(columns=list(INDEX_COLUMNS))
        return pd.read_csv(self.index_path, dtype=str, keep_default_na=False)

    @contextlib.contextmanager
    def _index_lock(self) -> Iterator[None]:
        fd = os.open(self.root / INDEX_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _append_index_rows(self, rows: list[dict[str, str]]) -> None:
        """Append under the lock; the header goes in when the file is new or empty."""
        with open(self.index_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=INDEX_COLUMNS)
            if f.tell() == 0:
                writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# Index rows and frames


def _row_key(row: Mapping[str, str]) -> tuple[str, str]:
    return row.get("pipeline") or "", row.get("run_id") or ""


def index_row(record: RunRecord, root: Path) -> dict[str, str]:
    """The index.csv row of a run, derived from its result.json alone (so rebuilds match)."""
    checkpoint = record.checkpoint
    sha = checkpoint.get("sha256") or ""
    return {
        "run_id": record.run_id,
        "pipeline": record.pipeline,
        "protocol": record.protocol,
        "created": record.created,
        "git_commit": str(record.git.get("commit", UNKNOWN)),
        "dirty": str(record.git.get("dirty", UNKNOWN)),
        "seed": "" if record.seed is None else str(record.seed),
        "checkpoint_sha256": sha[:SHORT_SHA],
        "checkpoint_format": str(checkpoint.get("format") or ""),
        "dataset": str(record.dataset.get("name") or ""),
        "metrics": json.dumps(record.metrics, sort_keys=True),
        "path": _relative(record.path, root),
    }


def runs_frame(records: Sequence[RunRecord], config_keys: Sequence[str] = ()) -> pd.DataFrame:
    """One row per (run, metric), with run provenance as columns, for tables and verdicts.

    `config_keys` adds config values as columns (dotted paths such as "svm.costs" reach into
    nested dicts; a missing key gives None).
    """
    rows = []
    for record in records:
        run = {
            "run_id": record.run_id,
            "pipeline": record.pipeline,
            "protocol": record.protocol,
            "created": pd.Timestamp(record.created),
            "seed": record.seed,
            "dataset": record.dataset.get("name"),
            "checkpoint_sha256": record.checkpoint.get("sha256"),
            "checkpoint_format": record.checkpoint.get("format"),
            "git_commit": record.git.get("commit"),
            "dirty": record.git.get("dirty"),
            **{key: _dotted(record.config, key) for key in config_keys},
        }
        for metric, value in record.metrics.items():
            value = math.nan if value is None else value
            rows.append({**run, "metric": metric, "value": value, "path": str(record.path)})
    columns = [*FRAME_COLUMNS[:-3], *config_keys, *FRAME_COLUMNS[-3:]]
    return pd.DataFrame(rows, columns=columns)


def _dotted(config: Mapping[str, Any], key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


# ---------------------------------------------------------------------------------------------
# Writing helpers


def _result_fields(result: ProtocolResult | Mapping[str, Any]) -> dict[str, Any]:
    """ProtocolResult fields from a dataclass or a dict, checked before any file is written."""
    if isinstance(result, ProtocolResult):
        fields = result.to_dict()
    elif isinstance(result, Mapping):
        unknown = sorted(set(result) - set(RESULT_FIELDS))
        if unknown:
            raise ResultsError(f"result has unknown field(s) {', '.join(map(str, unknown))}; "
                               f"expected {', '.join(RESULT_FIELDS)}")
        fields = dict(result)
    else:
        raise ResultsError(f"result must be a ProtocolResult or a dict, got {type(result).__qualname__}")
    protocol = fields.get("protocol")
    if not isinstance(protocol, str) or not protocol:
        raise ResultsError(f"result.protocol must be a non-empty string, got {protocol!r}")
    metrics = fields.get("metrics")
    if not isinstance(metrics, Mapping):
        raise ResultsError(f"result.metrics must be a dict of name -> number, got {type(metrics).__qualname__}")
    for name in ("config", "dataset", "checkpoint", "timings", "details", "pretraining"):
        fields[name] = fields.get(name) or {}
    return fields


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ResultsError(f"{what} {name!r} must be letters, digits, '_', '.', '-' and start with a letter or digit")


def _is_pipeline_dir(name: str) -> bool:
    return not name.startswith((".", "_")) and name not in NOT_PIPELINES


def _sorted_dirs(folder: Path) -> list[Path]:
    """Sub-folders by name; a missing folder holds no runs, an unreadable one is an error."""
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ResultsError(f"cannot list {folder}: {exc.strerror or exc}") from None


def _plot_files(plots: Mapping[str, Any]) -> dict[str, str]:
    """Plot name -> `plots/<file>` in the run folder; Figures become PNG, files keep their suffix."""
    names = {}
    for name, plot in plots.items():
        _check_name("plot name", name)
        if isinstance(plot, os.PathLike | str):
            source = Path(plot)
            if not source.is_file():
                raise ResultsError(f"plot {name!r}: {source} is not a file")
            names[name] = f"{PLOTS_DIR}/{name}{source.suffix or '.png'}"
        elif hasattr(plot, "savefig"):
            names[name] = f"{PLOTS_DIR}/{name}.png"
        else:
            raise ResultsError(f"plot {name!r}: expected a matplotlib Figure or an image path, "
                               f"got {type(plot).__qualname__}")
    return names


def _extra_files(extra: Mapping[str, Any] | Sequence[str | os.PathLike] | None) -> dict[str, Any]:
    """Relative name -> Path (to copy) or str/bytes (to write), checked before any writing."""
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        extra = {Path(p).name: Path(p) for p in extra}
    reserved = {RESULT_FILE, METRICS_FILE, PLOTS_DIR}
    checked = {}
    for name, content in extra.items():
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or parts[0] in reserved:
            raise ResultsError(f"extra file name {name!r} must be a relative path outside "
                               f"{', '.join(sorted(reserved))}")
        if isinstance(content, os.PathLike):
            if not Path(content).is_file():
                raise ResultsError(f"extra file {name!r}: {content} is not a file")
        elif not isinstance(content, (str, bytes)):
            raise ResultsError(f"extra file {name!r}: expected a Path, str or bytes, got {type(content).__qualname__}")
        checked[Path(name).as_posix()] = content
    return checked


def _reserve_run(pipeline_dir: Path, protocol: str, created: datetime.datetime,
                 run_id: str | None) -> tuple[str, Path]:
    """Claim a run id by creating its partial folder exclusively; no final folder may exist yet.

    The partial name is held until the atomic rename, so two writers can never finish the same id.
    """
    if run_id is not None:
        _check_name("run_id", run_id)
        if not _try_reserve(pipeline_dir, run_id):
            raise ResultsError(f"run {pipeline_dir / run_id} already exists (or is being written); "
                               "runs are never overwritten")
        return run_id, _partial_path(pipeline_dir, run_id)
    for _ in range(MAX_ID_ATTEMPTS):
        candidate = new_run_id(protocol, created)
        if _try_reserve(pipeline_dir, candidate):
            return candidate, _partial_path(pipeline_dir, candidate)
    raise ResultsError(f"could not find a free run id in {pipeline_dir} after {MAX_ID_ATTEMPTS} attempts")


def _try_reserve(pipeline_dir: Path, run_id: str) -> bool:
    partial = _partial_path(pipeline_dir, run_id)
    try:
        partial.mkdir()
    except FileExistsError:
        return False
    except OSError as exc:
        raise ResultsError(f"cannot create {partial}: {exc.strerror or exc}") from None
    if (pipeline_dir / run_id).exists():
        partial.rmdir()
        return False
    return True


def _not_stored(run_id: str, partial: Path, exc: BaseException) -> ResultsError:
    reason = " ".join(str(exc).split())
    return ResultsError(f"run {run_id} was not stored ({type(exc).__name__}: {reason}); "
                        f"partial output left in {partial}")


def _partial_path(pipeline_dir: Path, run_id: str) -> Path:
    return pipeline_dir / f".{run_id}{PARTIAL_SUFFIX}"


def new_run_id(protocol: str, when: datetime.datetime | None = None) -> str:
    """`<UTC second>-<protocol>-<6 hex>`: sorts by time, the random suffix keeps it unique."""
    stamp = (when or _utc_now()).astimezone(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", protocol).strip("-") or "run"
    return f"{stamp}-{slug}-{secrets.token_hex(3)}"


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_run_folder(folder: Path, payload: dict[str, Any], plots: Mapping[str, Any], plot_files: dict[str, str],
                      extras: dict[str, Any]) -> None:
    """Everything but result.json first, so a result.json always means the rest is there."""
    _write_bytes(folder / METRICS_FILE, _metrics_csv(payload["metrics"]).encode())
    if plots:
        (folder / PLOTS_DIR).mkdir()
    for name, plot in plots.items():
        _save_plot(plot, folder / plot_files[name])
    for name, content in extras.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, os.PathLike):
            shutil.copyfile(content, target)
        else:
            _write_bytes(target, content.encode() if isinstance(content, str) else content)
    text = json.dumps(payload, indent=1, allow_nan=False) + "\n"
    _write_bytes(folder / RESULT_FILE, text.encode())
    fsync_dir(folder)


def _save_plot(plot: Any, target: Path) -> None:
    if isinstance(plot, os.PathLike | str):
        shutil.copyfile(plot, target)
    else:
        plot.savefig(target, format="png")


def _metrics_csv(metrics: Mapping[str, float | None]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["metric", "value"])
    writer.writerows([name, "" if value is None else repr(value)] for name, value in metrics.items())
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
