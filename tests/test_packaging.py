"""The distribution: one version everywhere, an SPDX licence with its file, and an sdist that
carries everything its own test suite and front-door commands need (and whose tests run)."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import secretfs
from tests.mounting import ROOT, is_mounted, needs_fuse, needs_sources, wait_for

DIST = "secretfs-csi"
# Where the three packages are imported from: the checkout, or the installed wheel
# (scripts/test-wheel.sh), whose code the import checks then read.
CODE = Path(secretfs.__file__).resolve().parents[1]


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


@needs_sources
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


@needs_sources
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
    # The command is the program entry (run), not the library call (main): see secretfs/cli.py.
    assert "secretfs = secretfs.cli:run" in entry_points
    # Every module of the three packages, generated stubs included, is in the wheel.
    for package in ("secretfs", "csi", "providers"):
        for path in (ROOT / package).rglob("*.py"):
            if "__pycache__" not in path.parts:
                assert str(path.relative_to(ROOT)) in names, f"{path} is not in the wheel"


@needs_sources
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


def _site_packages_mib(venv: Path) -> float:
    """Site-packages of ``venv`` less pip and setuptools, as bench/install_footprint.sh counts."""
    (site,) = venv.glob("lib/python3*/site-packages")
    tools = {"pip", "setuptools", "pkg_resources", "_distutils_hack"}
    total = sum(
        f.stat().st_size
        for f in site.rglob("*")
        if f.is_file() and not f.is_symlink() and f.relative_to(site).parts[0] not in tools
    )
    return total / 2**20


@needs_sources
@needs_fuse
@pytest.mark.slow
def test_a_fresh_aws_install_is_small_and_mounts(
    wheel: Path, tmp_path: Path, aws_env: dict[str, str]
) -> None:
    """What a standalone AWS user installs, in a fresh venv: the bare wheel names the extra to
    add; with ``[aws]`` it is at most 80 MiB of site-packages and mounts the seed example. pyfuse3
    comes from SECRETFS_WHEELHOUSE (secretfs's build, which `make test` points at), the rest from
    the package index."""
    house = os.environ.get("SECRETFS_WHEELHOUSE")
    if not house or not list(Path(house).glob("pyfuse3-*.whl")):
        pytest.skip("SECRETFS_WHEELHOUSE names no folder with a pyfuse3 wheel (make test sets it)")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    pip += ["--find-links", house]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True, timeout=600)
    work = tmp_path / "work"
    (work / "mnt").mkdir(parents=True)
    shutil.copy(ROOT / "examples/aws-seed.yaml", work)
    # Nothing of this checkout on the path: the venv's own files serve every command.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    secretfs_cmd = str(venv / "bin/secretfs")

    bare = subprocess.run(
        [secretfs_cmd, "check", "aws-seed.yaml"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bare.returncode == 1, bare.stderr
    assert "install the aws extra: pip install 'secretfs-csi[aws]'" in bare.stderr
    assert "Traceback" not in bare.stderr

    subprocess.run([*pip, f"{wheel}[aws]"], check=True, capture_output=True, timeout=600)
    size = _site_packages_mib(venv)
    assert size <= 80, f"[aws] is {size:.1f} MiB of site-packages"
    boto3 = pytest.importorskip("boto3")
    sm = boto3.client("secretsmanager", endpoint_url=aws_env["endpoint_url"])
    sm.create_secret(Name="MyDatabasePassword", SecretString="fresh-venv")
    done = subprocess.run(
        [secretfs_cmd, "mount", "aws-seed.yaml", "mnt", "--log-level", "WARNING"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert done.returncode == 0, done.stderr
        assert (work / "mnt/MyDatabasePassword").read_bytes() == b"fresh-venv"
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(work / "mnt")], check=False)
    assert wait_for(lambda: not is_mounted(work / "mnt"))


@needs_sources
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
    for path in sorted((CODE / package).rglob("*.py")):
        if "/gen/" in str(path):
            continue
        tops = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops.add(node.module.split(".")[0])
        out[str(path.relative_to(CODE))] = tops
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
    return [ln for ln in (CODE / path).read_text().splitlines() if "import" in ln]


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


def test_an_attaching_daemon_does_not_import_trio_testing() -> None:
    """Every daemon of a CSI node attaches to the keeper's connection, which waits for trio's
    tasks to block; taking that wait from ``trio.testing`` cost ~1 MiB resident in each daemon,
    and imported pytest (4 MiB) wherever it is installed."""
    code = (
        "import sys, trio\n"
        "from secretfs.takeover import _wait_all_tasks_blocked\n"
        "wait = _wait_all_tasks_blocked()\n"
        "trio.run(wait)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pytest', '_pytest')"
        " or m.startswith('trio.testing')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
