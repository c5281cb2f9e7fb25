#!/usr/bin/env python3
"""Install mmcv 2.1.0 with its compiled ops, plus the `dense` extra, into a Python environment.

mmdet 3.3.0 and mmsegmentation 1.2.2 need mmcv>=2.0,<2.2 with its compiled ops (RoIAlign, NMS),
and the package index has only mmcv's source for torch 2.14. That source builds after three
fixes (shared/STACK.md): no build isolation (setup.py imports torch), setuptools<81 (setup.py
imports pkg_resources) and C++20 instead of C++17 (torch 2.14's headers). The build takes about
7 minutes on 2 cores (13 with debug info) and the wheel only fits the torch it was built against,
so it is cached per mmcv, torch, Python, platform and ops: a second install takes seconds.

    python scripts/install_mm_stack.py                             # this interpreter's environment
    python scripts/install_mm_stack.py --python .venv/bin/python   # another environment
    python scripts/install_mm_stack.py --force-build --jobs 4      # ignore the cached wheel

The build tools (pip, setuptools<81, wheel, ninja if missing) go into a temporary directory on
PYTHONPATH, so the target environment keeps its own setuptools. Ops are built for the CPU only,
even where a GPU and nvcc are present, unless --cuda is given. POSIX only.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

MMCV_VERSION = "2.1.0"
CXX17_FLAG = "'-std=c++17'"
CXX20_FLAG = "'-std=c++20'"
BUILD_TOOLS = ("pip", "setuptools<81", "wheel")
HEARTBEAT_SECONDS = 30.0
REPO_ROOT = Path(__file__).resolve().parent.parent

PROBE_TARGET = r"""
import json, sys, sysconfig
from importlib import metadata, util

def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None

try:
    import torch
    torch_version = torch.__version__
except ImportError:
    torch_version = None
implementation = {"cpython": "cp", "pypy": "pp"}.get(sys.implementation.name, sys.implementation.name)
print(json.dumps({
    "python_tag": f"{implementation}{sys.version_info.major}{sys.version_info.minor}",
    "platform": sysconfig.get_platform(),
    "cflags": sysconfig.get_config_var("CFLAGS") or "",
    "torch_version": torch_version,
    "has_pip": util.find_spec("pip") is not None,
    "mmcv_lite": installed("mmcv-lite"),
}))
"""

VERIFY_OPS = r"""
import sys, torch, mmcv
from mmcv.ops import RoIAlign, nms
boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
_, keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
assert keep.tolist() == [0, 2], f"nms kept {keep.tolist()}, expected [0, 2]"
pooled = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=2)(
    torch.arange(64.0).reshape(1, 1, 8, 8), torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]]))
assert pooled.shape == (1, 1, 2, 2), f"RoIAlign gave shape {tuple(pooled.shape)}"
versions = [f"mmcv {mmcv.__version__}"]
if "--with-dense" in sys.argv:
    import mmdet, mmdet.models, mmseg, mmseg.models
    versions += [f"mmdet {mmdet.__version__}", f"mmseg {mmseg.__version__}"]
print(", ".join(versions) + ": nms and RoIAlign run on the CPU")
"""


class StackError(RuntimeError):
    """A failure the user can fix; main() prints it as one line that names the fix."""


@dataclass(frozen=True)
class Target:
    """What decides which mmcv binary fits an environment, read from its own interpreter."""

    python: Path
    python_tag: str
    platform: str
    cflags: str
    torch_version: str
    has_pip: bool
    mmcv_lite: str | None


@dataclass
class Timings:
    """Seconds per step, printed at the end so a slow install says where the time went."""

    steps: list[tuple[str, float]] = field(default_factory=list)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"==> {name}", flush=True)
        start = time.monotonic()
        try:
            yield
        finally:
            self.steps.append((name, time.monotonic() - start))

    def report(self) -> str:
        lines = [f"  {seconds:8.1f} s  {name}" for name, seconds in self.steps]
        lines.append(f"  {sum(s for _, s in self.steps):8.1f} s  total")
        return "\n".join(lines)


def default_cache_dir() -> Path:
    """Next to the project's other caches, so one DENSECL_BENCH_CACHE setting moves them all."""
    root = os.environ.get("DENSECL_BENCH_CACHE") or Path.home() / ".cache" / "densecl-bench"
    return Path(root) / "wheels"


def default_jobs() -> int:
    """Every core this process may use: the build is CPU-bound (about 1-2 GB of RAM per job)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", type=Path, default=Path(sys.executable),
                        help="interpreter of the environment to install into (default: this one, %(default)s)")
    parser.add_argument("--cache", type=Path, default=default_cache_dir(),
                        help="wheel cache and build logs (default: $DENSECL_BENCH_CACHE/wheels, "
                             "else ~/.cache/densecl-bench/wheels; now %(default)s)")
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help="parallel compiler jobs, MAX_JOBS (default: usable cores, %(default)s)")
    parser.add_argument("--force-build", action="store_true",
                        help="build even if a cached wheel fits, and replace it")
    parser.add_argument("--cuda", action="store_true",
                        help="also build the CUDA ops (needs nvcc; cached separately from the CPU build)")
    parser.add_argument("--keep-debug-info", action="store_true",
                        help="compile with debug info (-g): a 32 MB wheel instead of 1.4 MB, and twice the build time")
    parser.add_argument("--skip-extra", action="store_true",
                        help="install mmcv only, not the `dense` extra of pyproject.toml (mmdet, mmseg, ...)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    return args


def patch_setup_for_cxx20(setup_py: str) -> str:
    """torch 2.14's headers need C++20 and mmcv 2.1.0's setup.py asks for C++17.

    Refuses when the flag is missing: a different setup.py means a different mmcv, and building
    it unpatched would fail 10 minutes later or produce something nobody tested.
    """
    if CXX17_FLAG not in setup_py:
        raise StackError(f"mmcv's setup.py has no {CXX17_FLAG} to raise to C++20: this script knows "
                         f"mmcv {MMCV_VERSION} only; check the sdist is mmcv {MMCV_VERSION}")
    return setup_py.replace(CXX17_FLAG, CXX20_FLAG)


def cache_key(mmcv_version: str, torch_version: str, python_tag: str, platform: str, ops: str) -> str:
    """One cache entry per input that changes the binary: a wheel built against one torch fails to load with another."""
    raw = f"mmcv-{mmcv_version}_torch-{torch_version}_{python_tag}_{platform}_{ops}-ops"
    return re.sub(r"[^A-Za-z0-9.+-]", "_", raw)


def find_cached_wheel(entry_dir: Path) -> Path | None:
    """The finished wheel of a cache entry; partial copies are hidden dot-files and never match."""
    wheels = sorted(entry_dir.glob("mmcv-*.whl"))
    return wheels[-1] if wheels else None


def store_atomically(wheel: Path, entry_dir: Path) -> Path:
    """Copy then rename, so an interrupted copy never looks like a cached wheel."""
    entry_dir.mkdir(parents=True, exist_ok=True)
    for stale in entry_dir.glob("mmcv-*.whl"):
        stale.unlink()
    partial = entry_dir / f".{wheel.name}.{os.getpid()}.partial"
    shutil.copyfile(wheel, partial)
    final = entry_dir / wheel.name
    os.replace(partial, final)
    return final


@contextmanager
def build_lock(entry_dir: Path) -> Iterator[None]:
    """Two installs at once (parallel tox envs) build the wheel once: the second waits, then finds it cached."""
    entry_dir.mkdir(parents=True, exist_ok=True)
    with (entry_dir / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"    another install is building this wheel ({entry_dir}); waiting for it", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_environment(base: Mapping[str, str], tools_dir: Path, jobs: int, cuda: bool,
                      keep_debug_info: bool, python_cflags: str) -> dict[str, str]:
    """The variables mmcv's setup.py reads, and the build tools put in front of the target's own.

    Debug info goes by appending -g0 to Python's own CFLAGS: a CFLAGS variable replaces them
    (setuptools' customize_compiler), and -g0 alone would also drop -O3 and -DNDEBUG.
    """
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tools_dir), base.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join(p for p in (str(tools_dir / "bin"), base.get("PATH", "")) if p)
    env.update(MMCV_WITH_OPS="1", MAX_JOBS=str(jobs), FORCE_CUDA="1" if cuda else "0")
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # setup.py builds CUDA ops whenever torch sees a GPU
    if not keep_debug_info:
        env["CFLAGS"] = f"{base.get('CFLAGS') or python_cflags} -g0".strip()
    return env


@dataclass(frozen=True)
class Installer:
    """uv when present (fast, and it serves venvs that uv made without pip), else the target's own pip."""

    python: Path
    uv: str | None

    @classmethod
    def for_target(cls, python: Path, has_pip: bool) -> Installer:
        uv = shutil.which("uv")
        if uv is None and not has_pip:
            raise StackError(f"{python} has no pip and uv is not on PATH: "
                             f"run `{python} -m ensurepip` or `pip install uv`")
        return cls(python=python, uv=uv)

    def command(self, action: str) -> list[str]:
        if self.uv:
            return [self.uv, "pip", action, "--python", str(self.python)]
        return [str(self.python), "-m", "pip", action] + (["--yes"] if action == "uninstall" else [])

    def install_wheel_commands(self, wheel: Path, requirements: list[str]) -> list[list[str]]:
        """Reinstall mmcv from this wheel even when some mmcv 2.1.0 is installed, without reinstalling torch."""
        install = self.command("install")
        if self.uv:
            return [[*install, "--reinstall-package", "mmcv", str(wheel), *requirements]]
        return [[*install, "--force-reinstall", "--no-deps", str(wheel)], [*install, str(wheel), *requirements]]


def dense_requirements(pyproject: Path) -> list[str]:
    """The `dense` extra, read from pyproject.toml so the script and the extra never drift apart."""
    try:
        import tomllib
    except ModuleNotFoundError as error:
        raise StackError(f"Python {sys.version_info.major}.{sys.version_info.minor} has no tomllib: run this "
                         "script with Python 3.11+, or pass --skip-extra and `pip install -e '.[dense]'`") from error
    extras = tomllib.loads(pyproject.read_text())["project"].get("optional-dependencies", {})
    if "dense" not in extras:
        raise StackError(f"{pyproject} has no `dense` extra: pass --skip-extra to install mmcv only")
    return list(extras["dense"])


def last_words(output: str) -> str:
    """The line of a tool's output that says what went wrong, for a one-line error."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"\berror\b", line, re.IGNORECASE)]
    return (errors or lines or ["(no output)"])[-1][:300]


def run(cmd: list[str], what: str, fix: str, env: Mapping[str, str] | None = None) -> str:
    """Run a short step quietly; on failure, one line with its last error and the fix."""
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        cause = last_words(result.stdout + result.stderr)
        raise StackError(f"{what} failed (exit {result.returncode}): {cause}; {fix}")
    return result.stdout


def probe_target(python: Path) -> Target:
    if not python.exists():
        raise StackError(f"no interpreter at {python}: pass --python path/to/venv/bin/python")
    facts = json.loads(run([str(python), "-c", PROBE_TARGET], f"probing {python}", "is it a working Python?"))
    if facts["torch_version"] is None:
        raise StackError(f"torch is not installed in {python}'s environment: install the project first "
                         "(pip install -e . or uv sync)")
    return Target(python=python, **facts)


def build_progress(log_path: Path) -> str:
    """ninja prints [done/total] per compiled file: the last one says how far the build is."""
    with log_path.open("rb") as log:
        log.seek(max(0, log_path.stat().st_size - 65536))
        tail = log.read().decode(errors="replace")
    steps = re.findall(r"^\s*\[(\d+)/(\d+)\]", tail, re.MULTILINE)
    return f"{steps[-1][0]}/{steps[-1][1]} compile steps done" if steps else "preparing"


def first_compile_error(log_path: Path) -> str:
    """The first compiler error is the cause; the later ones are usually its echoes."""
    text = log_path.read_text(errors="replace")
    match = re.search(r"^.*\berror:.*$", text, re.MULTILINE)
    return match.group(0).strip()[:300] if match else last_words(text)


@contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit, so the clean-up below runs instead of the process just vanishing."""
    def raise_system_exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, raise_system_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_logged_with_heartbeat(cmd: list[str], env: Mapping[str, str], log_path: Path) -> None:
    """The build is silent for minutes: send its output to a log and say every 30 s that it is alive.

    The build runs in its own process group, so Ctrl-C or a CI timeout's SIGTERM stops ninja and
    its compilers too, not only pip, and the build directory is removed.
    """
    start = time.monotonic()
    with log_path.open("wb") as log, exit_on_sigterm():
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                try:
                    returncode = process.wait(timeout=HEARTBEAT_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    minutes, seconds = divmod(int(time.monotonic() - start), 60)
                    print(f"    building: {minutes}m{seconds:02d}s, {build_progress(log_path)}", flush=True)
        except BaseException:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            print(f"install_mm_stack: build interrupted, nothing cached (log: {log_path})", file=sys.stderr)
            raise
    if returncode != 0:
        raise StackError(f"mmcv build failed (exit {returncode}): {first_compile_error(log_path)}; "
                         f"full log: {log_path}")


def install_build_tools(installer: Installer, tools_dir: Path) -> None:
    """pip, setuptools<81 and wheel in a side directory: mmcv needs an old setuptools, the target keeps its own."""
    tools = [*BUILD_TOOLS] + ([] if shutil.which("ninja") else ["ninja"])
    run([*installer.command("install"), "--target", str(tools_dir), *tools],
        "installing the build tools " + " ".join(tools), "check that the package index is reachable")


def download_sdist(python: Path, env: Mapping[str, str], dest: Path) -> Path:
    """Source only, from the configured index; pip needs no isolation since it runs setup.py to read metadata."""
    run([str(python), "-m", "pip", "download", "--no-build-isolation", "--no-binary", ":all:", "--no-deps",
         f"mmcv=={MMCV_VERSION}", "--dest", str(dest)],
        f"downloading the mmcv {MMCV_VERSION} source", "check that the package index is reachable", env=env)
    archives = sorted(dest.glob(f"mmcv-{MMCV_VERSION}.tar.gz"))
    if not archives:
        raise StackError(f"pip downloaded no mmcv-{MMCV_VERSION}.tar.gz into {dest}: "
                         "the index may serve another archive format")
    return archives[0]


def unpack_and_patch(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
    source = dest / f"mmcv-{MMCV_VERSION}"
    setup_py = source / "setup.py"
    if not setup_py.is_file():
        raise StackError(f"{archive.name} has no mmcv-{MMCV_VERSION}/setup.py: the download is not the mmcv source")
    setup_py.write_text(patch_setup_for_cxx20(setup_py.read_text()))
    return source


def build_wheel(target: Target, args: argparse.Namespace, entry_dir: Path, timings: Timings) -> Path:
    """Download, patch, compile and cache; the compiler's output goes to a log in the cache."""
    if args.cuda and not (shutil.which("nvcc") or os.environ.get("CUDA_HOME")):
        raise StackError("--cuda needs the CUDA toolkit: nvcc is not on PATH and CUDA_HOME is unset; "
                         "install it, or drop --cuda for the CPU ops")
    installer = Installer.for_target(target.python, target.has_pip)
    with tempfile.TemporaryDirectory(prefix="mmcv-build-") as scratch:
        work = Path(scratch)
        with timings.step("build tools (pip, setuptools<81, wheel) into a side directory"):
            install_build_tools(installer, work / "tools")
        env = build_environment(os.environ, work / "tools", args.jobs, args.cuda, args.keep_debug_info, target.cflags)
        with timings.step(f"download and patch the mmcv {MMCV_VERSION} source (C++17 -> C++20)"):
            source = unpack_and_patch(download_sdist(target.python, env, work / "sdist"), work / "src")
        log_path = args.cache / "logs" / f"{entry_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        ops = "CPU and CUDA" if args.cuda else "CPU"
        with timings.step(f"compile mmcv {MMCV_VERSION} with {ops} ops, {args.jobs} jobs (about 7 min on 2 cores)"):
            print(f"    compiler output: {log_path}", flush=True)
            run_logged_with_heartbeat(
                [str(target.python), "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps",
                 "--wheel-dir", str(work / "dist"), str(source)], env, log_path)
        built = sorted((work / "dist").glob("mmcv-*.whl"))
        if not built:
            raise StackError(f"the build finished but left no mmcv wheel: see {log_path}")
        return store_atomically(built[0], entry_dir)


def obtain_wheel(target: Target, args: argparse.Namespace, timings: Timings) -> Path:
    ops = "cuda" if args.cuda else "cpu"
    entry_dir = args.cache / cache_key(MMCV_VERSION, target.torch_version, target.python_tag, target.platform, ops)
    with build_lock(entry_dir):
        cached = None if args.force_build else find_cached_wheel(entry_dir)
        if cached:
            print(f"    cached wheel: {cached}", flush=True)
            return cached
        return build_wheel(target, args, entry_dir, timings)


def install_stack(target: Target, wheel: Path, requirements: list[str], timings: Timings) -> None:
    installer = Installer.for_target(target.python, target.has_pip)
    if target.mmcv_lite:
        with timings.step(f"remove mmcv-lite {target.mmcv_lite} (same module name, no ops)"):
            run([*installer.command("uninstall"), "mmcv-lite"], "removing mmcv-lite",
                f"uninstall it by hand from {target.python}'s environment")
    names = ", ".join(["mmcv"] + [re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] for r in requirements])
    with timings.step(f"install {names}"):
        for command in installer.install_wheel_commands(wheel, requirements):
            run(command, "installing the mm stack", "fix the conflict and rerun: the wheel stays cached")


def verify(target: Target, with_dense: bool, timings: Timings) -> str:
    with timings.step("verify: import mmcv.ops, mmdet and mmseg; run nms and RoIAlign on the CPU"):
        flags = ["--with-dense"] if with_dense else []
        return run([str(target.python), "-c", VERIFY_OPS, *flags], "the import check",
                   "rerun with --force-build to rebuild the wheel").strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    timings = Timings()
    try:
        requirements = [] if args.skip_extra else dense_requirements(REPO_ROOT / "pyproject.toml")
        with timings.step(f"inspect {args.python}"):
            target = probe_target(args.python)
            print(f"    torch {target.torch_version}, {target.python_tag}, {target.platform}", flush=True)
        wheel = obtain_wheel(target, args, timings)
        install_stack(target, wheel, requirements, timings)
        summary = verify(target, with_dense=not args.skip_extra, timings=timings)
    except StackError as error:
        print(f"install_mm_stack: error: {error}", file=sys.stderr)
        return 1
    print(f"\n{summary}\nwheel: {wheel} ({wheel.stat().st_size / 1e6:.1f} MB)\n{timings.report()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
