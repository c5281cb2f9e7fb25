"""Fast checks of scripts/install_mm_stack.py: everything except the 13-minute build itself."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install_mm_stack.py"

FAKE_SETUP_PY = """\
if platform.system() != 'Windows':
    if parse_version(torch.__version__) <= parse_version('1.12.1'):
        extra_compile_args['cxx'] = ['-std=c++14']
    else:
        extra_compile_args['cxx'] = ['-std=c++17']
extra_compile_args['nvcc'] += ['-std=c++17']
"""


def load_script():
    """The script is not a package module: load it from its path, registered so dataclasses can resolve it."""
    spec = importlib.util.spec_from_file_location("install_mm_stack", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mm = load_script()


def test_setup_patch_raises_every_cxx17_flag_to_cxx20_and_changes_nothing_else():
    patched = mm.patch_setup_for_cxx20(FAKE_SETUP_PY)
    assert "c++17" not in patched
    assert patched.count("'-std=c++20'") == 2
    assert patched.replace("c++20", "c++17") == FAKE_SETUP_PY


def test_setup_patch_refuses_a_setup_py_without_the_cxx17_flag():
    with pytest.raises(mm.StackError) as error:
        mm.patch_setup_for_cxx20(FAKE_SETUP_PY.replace("c++17", "c++20"))
    message = str(error.value)
    assert "'-std=c++17'" in message and "mmcv 2.1.0" in message and "\n" not in message


def test_cache_key_separates_torch_builds_and_is_one_safe_path_component():
    key = mm.cache_key("2.1.0", "2.14.1+cu130", "cp311", "linux-x86_64", "cpu")
    assert key == "mmcv-2.1.0_torch-2.14.1+cu130_cp311_linux-x86_64_cpu-ops"
    assert key == mm.cache_key("2.1.0", "2.14.1+cu130", "cp311", "linux-x86_64", "cpu")
    others = {
        mm.cache_key("2.1.0", "2.13.0+cpu", "cp311", "linux-x86_64", "cpu"),
        mm.cache_key("2.1.0", "2.14.1+cu130", "cp312", "linux-x86_64", "cpu"),
        mm.cache_key("2.1.0", "2.14.1+cu130", "cp311", "macosx-11.0-arm64", "cpu"),
        mm.cache_key("2.1.0", "2.14.1+cu130", "cp311", "linux-x86_64", "cuda"),
    }
    assert key not in others and len(others) == 4
    assert all(re.fullmatch(r"[A-Za-z0-9._+-]+", k) for k in others | {key})


def test_cache_finds_only_finished_wheels_and_replaces_old_ones(tmp_path):
    entry = tmp_path / "entry"
    assert mm.find_cached_wheel(entry) is None
    built = tmp_path / "mmcv-2.1.0-cp311-cp311-linux_x86_64.whl"
    built.write_bytes(b"new")
    entry.mkdir()
    (entry / ".mmcv-2.1.0-cp311-cp311-linux_x86_64.whl.123.partial").write_bytes(b"half")
    assert mm.find_cached_wheel(entry) is None
    (entry / "mmcv-2.1.0-cp311-cp311-linux_x86_64_old.whl").write_bytes(b"old")
    stored = mm.store_atomically(built, entry)
    assert stored == entry / built.name and stored.read_bytes() == b"new"
    assert mm.find_cached_wheel(entry) == stored
    assert sorted(p.name for p in entry.glob("*.whl")) == [built.name]


def test_build_environment_hides_gpus_unless_cuda_and_keeps_optimisation_when_stripping(tmp_path):
    python_cflags = "-DNDEBUG -g -fwrapv -O3 -Wall"
    cpu = mm.build_environment({"PATH": "/usr/bin"}, tmp_path, 2, cuda=False, keep_debug_info=False,
                               python_cflags=python_cflags)
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["FORCE_CUDA"] == "0"
    assert cpu["MMCV_WITH_OPS"] == "1" and cpu["MAX_JOBS"] == "2"
    assert cpu["CFLAGS"] == python_cflags + " -g0"
    assert cpu["PYTHONPATH"] == str(tmp_path) and cpu["PATH"].startswith(str(tmp_path / "bin"))
    cuda = mm.build_environment({"CUDA_VISIBLE_DEVICES": "0"}, tmp_path, 4, cuda=True, keep_debug_info=True,
                                python_cflags=python_cflags)
    assert cuda["CUDA_VISIBLE_DEVICES"] == "0" and cuda["FORCE_CUDA"] == "1" and "CFLAGS" not in cuda


def test_install_reinstalls_mmcv_from_the_wheel_without_touching_torch(tmp_path):
    wheel = tmp_path / "mmcv-2.1.0-cp311-cp311-linux_x86_64.whl"
    with_uv = mm.Installer(python=Path("/venv/bin/python"), uv="/usr/bin/uv")
    assert with_uv.install_wheel_commands(wheel, ["mmdet==3.3.0"]) == [
        ["/usr/bin/uv", "pip", "install", "--python", "/venv/bin/python", "--reinstall-package", "mmcv",
         str(wheel), "mmdet==3.3.0"]]
    with_pip = mm.Installer(python=Path("/venv/bin/python"), uv=None)
    force, resolve = with_pip.install_wheel_commands(wheel, ["mmdet==3.3.0"])
    assert force[-3:] == ["--force-reinstall", "--no-deps", str(wheel)]
    assert resolve[-2:] == [str(wheel), "mmdet==3.3.0"] and "--force-reinstall" not in resolve


def test_installer_says_how_to_get_pip_when_there_is_neither_uv_nor_pip(monkeypatch):
    monkeypatch.setattr(mm.shutil, "which", lambda name: None)
    with pytest.raises(mm.StackError, match="ensurepip"):
        mm.Installer.for_target(Path("/venv/bin/python"), has_pip=False)


def test_dense_extra_pins_the_mm_stack_and_leaves_mmcv_to_the_script():
    requirements = mm.dense_requirements(SCRIPT.parent.parent / "pyproject.toml")
    assert {"mmengine==0.10.7", "mmdet==3.3.0", "mmsegmentation==1.2.2"} <= set(requirements)
    assert any(r.startswith("ftfy") for r in requirements) and any(r.startswith("regex") for r in requirements)
    assert not any(r.startswith("mmcv") for r in requirements)


def test_build_log_gives_progress_and_the_first_compiler_error(tmp_path):
    log = tmp_path / "build.log"
    log.write_text("running build_ext\n  [1/77] c++ a.cpp\n  [2/77] c++ b.cpp\n"
                   "b.cpp:3:1: error: 'foo' was not declared\nc.cpp:9:9: error: echo\nninja: build stopped\n")
    assert mm.build_progress(log) == "2/77 compile steps done"
    assert mm.first_compile_error(log) == "b.cpp:3:1: error: 'foo' was not declared"


def test_missing_interpreter_is_a_one_line_error(tmp_path, capsys):
    assert mm.main(["--python", str(tmp_path / "no" / "python"), "--cache", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no interpreter at" in err[0] and "--python" in err[0]
    assert not (tmp_path / "cache").exists()


def test_help_explains_the_options():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for option in ("--python", "--cache", "--jobs", "--force-build", "--cuda", "--skip-extra"):
        assert option in result.stdout
    assert "setuptools<81" in result.stdout and "C++20" in result.stdout
