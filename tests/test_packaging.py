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

DIST = "secretfs-csi"


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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build("wheel", tmp_path_factory.mktemp("wheel"))


def test_wheel_metadata_and_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
        entry_points = z.read(meta.replace("METADATA", "entry_points.txt")).decode()
    assert "License-Expression: Apache-2.0" in text
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith("tests/") for n in names)  # tests ship in the sdist only
    assert "[secretfs.commands]" in entry_points and "csi = csi.app:command" in entry_points
    # Every module of the three packages, generated stubs included, is in the wheel.
    for package in ("secretfs", "csi", "providers"):
        for path in (ROOT / package).rglob("*.py"):
            if "__pycache__" not in path.parts:
                assert str(path.relative_to(ROOT)) in names, f"{path} is not in the wheel"


def test_the_installed_wheel_runs_on_its_own(wheel: Path, tmp_path: Path) -> None:
    """The wheel's files, not this checkout's, serve `secretfs --version`, `check` and the
    imports of every command (the dependencies come from this venv)."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "examples/aws-seed.yaml", work)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "AWS_REGION": "us-east-1"}

    def run(code: str) -> str:
        # -P: not the current directory; -s: not the user's site; cwd holds no sources.
        done = subprocess.run(
            [sys.executable, "-P", "-s", "-c", code],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    where = run(
        "import secretfs, csi.app, providers.plugin.provider, providers.aws.provider\n"
        "for m in (secretfs, csi.app, providers.plugin.provider, providers.aws.provider):\n"
        "    print(m.__file__)"
    )
    files = where.split()
    assert len(files) == 4 and all(Path(f).is_relative_to(target) for f in files), files
    out = run(
        "import sys\nfrom secretfs.cli import main, plugged_command\n"
        "assert plugged_command('csi') is not None\n"
        "sys.exit(main(['check', 'aws-seed.yaml']))"
    )
    assert "provider aws, 1 file(s)" in out


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


def _imports(package: str) -> dict[str, set[str]]:
    """{file: top-level packages it imports} for every module of ``package`` (an AST walk: the
    code as written, lazy imports inside functions included)."""
    import ast

    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        if "/gen/" in str(path):
            continue
        tops = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = tops
    return out


def test_dependency_arrows_go_one_way() -> None:
    """csi -> secretfs -> providers: the daemon never imports csi (its command comes through an
    entry point), providers import neither."""
    for path, tops in _imports("secretfs").items():
        assert "csi" not in tops, path
    for path, tops in _imports("providers").items():
        assert not tops & {"csi", "secretfs"}, path
    # One provider's subpackage never imports another's (the registry and base are shared).
    for path in _imports("providers"):
        parts = path.split("/")
        if len(parts) < 3:
            continue
        for other in {"aws", "azure", "gcp", "vault", "plugin"} - {parts[1]}:
            assert not any(f"providers.{other}" in line for line in _lines(path)), path


def _lines(path: str) -> list[str]:
    return [ln for ln in (ROOT / path).read_text().splitlines() if "import" in ln]


def _without(module: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """``secretfs argv`` in a process where ``module`` cannot be imported (as without its extra)."""
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from secretfs.cli import main\n"
        f"sys.exit(main({list(argv)!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_a_missing_extra_is_named() -> None:
    out = _without("botocore", "check", "examples/aws-seed.yaml")
    assert out.returncode == 1, out.stderr
    assert "provider 'aws' is not installed on this node" in out.stderr
    assert "pip install 'secretfs-csi[aws]'" in out.stderr and "Traceback" not in out.stderr
    out = _without("hvac", "check", "examples/vault-spc.yaml")
    assert out.returncode == 1 and "pip install 'secretfs-csi[vault]'" in out.stderr
    out = _without("grpc", "csi", "--nodeid", "n", "--endpoint", "unix:///nonexistent/csi.sock")
    assert out.returncode == 1
    assert "the csi command needs grpc" in out.stderr
    assert "pip install 'secretfs-csi[csi]'" in out.stderr and "Traceback" not in out.stderr


def test_every_extra_is_declared_and_all_has_them() -> None:
    import tomllib

    import providers

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert project["name"] == providers.DISTRIBUTION
    for extra, _ in providers.EXTRAS.values():
        assert extra in extras, extra
    assert extras["all"] == [f"{DIST}[aws,vault,azure,gcp,plugin,csi]"]
    core = {d.split(">")[0].split("=")[0].lower() for d in project["dependencies"]}
    assert not core & {"boto3", "hvac", "kubernetes", "grpcio", "azure-identity"}
