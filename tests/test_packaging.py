"""The distribution: one version everywhere, an SPDX licence with its file, and an sdist that
carries everything its own test suite and front-door commands need (and whose tests run)."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import secretfs
from tests.mounting import ROOT

DIST = "secretfs"


def test_one_version_everywhere() -> None:
    version = importlib.metadata.version(DIST)
    assert secretfs.__version__ == version  # pyproject.toml and the package agree
    out = subprocess.run(
        [sys.executable, "-m", "secretfs", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"secretfs {version}"


def _build(kind: str, out: Path) -> Path:
    """Build with the project's own PEP 517 backend (setuptools, from the venv: no download)."""
    code = f"from setuptools import build_meta as b; print(b.build_{kind}({str(out)!r}))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build("sdist", tmp_path_factory.mktemp("sdist"))


def _tracked() -> list[str] | None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None  # not a checkout (this suite running from an unpacked sdist)
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.split() if out.returncode == 0 else None


def test_sdist_has_every_tracked_file_and_the_licence(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        meta = tar.extractfile(f"{top}/PKG-INFO")
        assert meta is not None
        pkg_info = meta.read().decode()
    assert "License-Expression: Apache-2.0" in pkg_info
    assert "LICENSE" in names and "Apache License" in (ROOT / "LICENSE").read_text()
    tracked = _tracked()
    if tracked is None:
        pytest.skip("not a git checkout: nothing to compare the sdist with")
    missing = sorted(set(tracked) - names - {".gitignore"})
    assert not missing, f"the sdist lacks {missing[:20]}: add them to MANIFEST.in"


def test_wheel_metadata(tmp_path: Path) -> None:
    wheel = _build("wheel", tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    assert "License-Expression: Apache-2.0" in text
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith("tests/") for n in names)  # tests ship in the sdist only
    for package in ("secretfs/", "csi/", "providers/"):
        assert any(n.startswith(package) for n in names), package


def test_the_sdists_own_tests_run(sdist: Path, tmp_path: Path) -> None:
    """An unpacked sdist runs its tests (a fast, FUSE-free part) against its own sources."""
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    src = next(tmp_path.iterdir())
    which = subprocess.run(
        [sys.executable, "-c", "import secretfs; print(secretfs.__file__)"],
        cwd=src,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(which.stdout.strip()).is_relative_to(src)  # its own code, not this checkout's
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_spc_and_check.py",
            "tests/test_limits.py",
        ],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1]
