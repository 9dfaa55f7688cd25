"""Reading SecretProviderClass files and the offline `secretfs check` command."""

from __future__ import annotations

from pathlib import Path

import pytest

from providers.base import ParameterError
from secretfs import spc as spc_mod
from secretfs.cli import main

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spc.yaml"
    p.write_text(text)
    return p


def test_the_seed_example_loads_as_kubernetes_would() -> None:
    spc = spc_mod.load(ROOT / "examples" / "aws-seed.yaml")
    assert spc.provider == "aws" and spc.name == "aws-secrets"
    assert "MyDatabasePassword" in spc.parameters["objects"]


def test_picks_the_spc_out_of_a_multi_document_file(tmp_path: Path) -> None:
    text = """\
apiVersion: v1
kind: Pod
metadata: {name: p}
---
apiVersion: secrets-store.csi.x-k8s.io/v1alpha1
kind: SecretProviderClass
metadata: {name: old-style, namespace: team}
spec:
  provider: aws
  parameters: {objects: "[]"}
"""
    spc = spc_mod.load(write(tmp_path, text))
    assert (spc.name, spc.namespace, spc.provider) == ("old-style", "team", "aws")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("apiVersion: v1\nkind: ConfigMap\n", "kind is 'ConfigMap'"),
        (
            "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nspec: {}\n",
            "spec.provider is required",
        ),
        (
            "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\n"
            "spec: {provider: aws}\n",
            "spec.parameters is required",
        ),
        (
            "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\n"
            "spec: {provider: aws, parameters: {region: 5}}\n",
            "spec.parameters.region must be a string",
        ),
        ("{not yaml", "not valid YAML"),
    ],
)
def test_bad_documents_say_what_to_fix(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(spc_mod.SpcError, match=message):
        spc_mod.load(write(tmp_path, text))


def test_a_provider_name_upstream_refuses_is_a_parameter_problem(tmp_path: Path) -> None:
    # Other names are external providers (tests/test_plugin_provider.py).
    p = write(
        tmp_path,
        "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\n"
        "spec: {provider: akeyless.io, parameters: {a: b}}\n",
    )
    with pytest.raises(ParameterError, match=r"invalid provider name 'akeyless.io'.*aws"):
        spc_mod.plan(spc_mod.load(p))


def test_volume_attributes_override_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    spc = spc_mod.load(ROOT / "examples" / "aws-seed.yaml")
    objects = '- objectName: "Other"\n  objectType: "secretsmanager"\n'
    plan = spc_mod.plan(spc, {"objects": objects, "region": "eu-west-1"})
    assert [f.path for f in plan.files] == ["Other"]


def test_check_prints_the_files(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_REGION", "us-east-1")  # offline check ignores it (tests/test_region.py)
    assert main(["check", str(ROOT / "examples" / "aws-seed.yaml")]) == 0
    out = capsys.readouterr().out
    assert "MyDatabasePassword" in out and "-rw-r--r--" in out and "provider aws" in out


def test_check_lists_every_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(
        tmp_path,
        """\
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata: {name: bad}
spec:
  provider: aws
  parameters:
    region: us-east-1
    objects: |
      - objectName: "a"
        objectType: "secretsmanager"
        objectAlias: "../escape"
      - objectName: "b"
        objectType: "nosuchtype"
      - objectName: "c"
        objectType: "secretsmanager"
        filePermission: "0999"
""",
    )
    assert main(["check", str(p)]) == 1
    err = capsys.readouterr().err
    assert "3 error(s)" in err or err.count("object '") >= 3
    for name, field in [("a", "objectAlias"), ("b", "objectType"), ("c", "filePermission")]:
        assert f"object '{name}'" in err and field in err, err


def test_check_reports_unreadable_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err
