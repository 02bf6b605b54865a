"""The kernel build: a build killed half-way must not make every later build wait forever, and one ninja builds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mini_claude import kernels

HOLD_LOCK = """
import sys, time
from pathlib import Path
from mini_claude import kernels
with kernels._build_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(30)
"""

TRY_LOCK = """
import fcntl, sys
with open(sys.argv[1], "w") as handle:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("busy")
    else:
        print("free")
"""


def test_a_stale_torch_lock_file_is_removed_under_our_lock(tmp_path: Path) -> None:
    (tmp_path / "lock").write_text("left by a killed build")
    with kernels._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_the_lock_excludes_a_second_builder_and_dies_with_its_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        probe = [sys.executable, "-c", TRY_LOCK, str(tmp_path / ".flock")]
        assert subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip() == "busy"
        holder.kill()  # as `kill -9` of a build would: the kernel releases the flock, no file is left to wait on
        holder.wait(timeout=10)
        assert subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip() == "free"
    finally:
        holder.kill()


def test_each_environment_and_checkout_builds_in_its_own_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    here = kernels.build_dir()
    monkeypatch.setattr(sys, "prefix", sys.prefix + "-another-venv")
    assert kernels.build_dir() != here
    monkeypatch.undo()
    # the same sources in another checkout: torch's build.ninja would name other paths, so another directory
    shutil.copytree(kernels.CSRC, tmp_path / "csrc")
    monkeypatch.setattr(kernels, "CSRC", tmp_path / "csrc")
    assert kernels.build_dir() != here


def test_the_build_runs_this_environment_s_ninja_whatever_path_finds_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # ninja 1.11 and 1.12+ hash commands differently: two ninjas on one build directory rebuilt it in turn
    ours = shutil.which("ninja", path=sysconfig.get_path("scripts"))
    assert ours is not None, "the package depends on pip's ninja"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with kernels._own_ninja():
        assert shutil.which("ninja") == ours
    assert os.environ["PATH"] == "/usr/bin:/bin"
