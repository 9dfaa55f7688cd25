"""The AWS provider: parameter parsing units, and fetches through boto3 against a moto server."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import botocore.loaders
import pytest
import yaml
from botocore.config import Config

from providers.aws import auth as aws_auth
from providers.aws.params import AwsAuth, AwsSource, Target
from providers.aws.provider import AwsProvider
from providers.base import (
    AMBIENT,
    Fetched,
    FetchError,
    Identity,
    ParameterError,
    Plan,
    Problem,
    Token,
)

try:  # tests/ may or may not be a package
    from tests.moto_server import aws_env, moto_url
except ImportError:  # pragma: no cover
    from moto_server import aws_env, moto_url  # type: ignore[import-not-found,no-redef]  # noqa: F401

SECRET = "S3cr3t-VALUE-never-log-me"
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6YXBwOmFwcCJ9.c2lnLXRva2Vu"
ROLE = "arn:aws:iam::123456789012:role/app-role"
ARN_SM = "arn:aws:secretsmanager:us-east-1:123456789012:secret:db/prod-AbCdEf"
ARN_SSM = "arn:aws:ssm:us-east-1:123456789012:parameter/app/key"


def objects(*objs: Mapping[str, Any]) -> str:
    return yaml.safe_dump(list(objs), sort_keys=False)


def parse(objs: list[Mapping[str, Any]] | str, **params: str) -> Plan:
    raw = objs if isinstance(objs, str) else objects(*objs)
    return AwsProvider().parse({"objects": raw, "region": "us-east-1", **params})


def problems(objs: list[Mapping[str, Any]] | str, **params: str) -> list[Problem]:
    with pytest.raises(ParameterError) as info:
        parse(objs, **params)
    return list(info.value.problems)


def fields(probs: list[Problem]) -> set[tuple[str | None, str]]:
    return {(p.obj, p.field) for p in probs}


# --- parsing --------------------------------------------------------------------------------------


def test_parse_every_field() -> None:
    plan = parse(
        [
            {
                "objectName": "db/creds",
                "objectType": "secretsmanager",
                "objectAlias": "db.json",
                "objectVersion": "v-1",
                "objectVersionLabel": "AWSCURRENT",
                "filePermission": "0640",
                "jmesPath": [
                    {"path": "username", "objectAlias": "user"},
                    {"path": '"my-key"', "objectAlias": "k", "filePermission": "0400"},
                ],
                "failoverObject": {
                    "objectName": "db/creds-west",
                    "objectVersion": "v-1",
                    "objectVersionLabel": "AWSPREVIOUS",
                },
            },
            {"objectName": "/app/param", "objectType": "ssmparameter", "objectVersion": 3},
        ],
        failoverRegion="us-west-2",
        pathTranslation="-",
        usePodIdentity="false",
        preferredAddressType="ipv6",
    )
    assert plan.provider == "aws"
    assert plan.auth == AwsAuth("us-east-1", "us-west-2", False, "ipv6")
    by_path = {f.path: f for f in plan.files}
    assert list(by_path) == ["db.json", "user", "k", "-app-param"]
    src = by_path["db.json"].source
    assert src == AwsSource(
        "secretsmanager",
        Target("db/creds", "v-1", "AWSCURRENT"),
        Target("db/creds-west", "v-1", "AWSPREVIOUS"),
    )
    assert by_path["db.json"].mode == 0o640
    assert by_path["user"].source == src and by_path["user"].select == ("jmespath", "username")
    assert by_path["user"].mode == 0o640  # jmesPath entries inherit the object's permission
    assert by_path["k"].mode == 0o400 and by_path["k"].select == ("jmespath", '"my-key"')
    ssm = by_path["-app-param"]
    # without failoverObject, the failover region reads the same name and version
    assert ssm.source == AwsSource(
        "ssmparameter", Target("/app/param", "3", None), Target("/app/param", "3", None)
    )
    assert ssm.mode == 0o644 and ssm.object_name == "/app/param"
    assert plan.sources() == [src, ssm.source]
    hash(plan.auth), hash(src)  # part of cache keys


@pytest.mark.parametrize(
    ("params", "name", "alias", "expected"),
    [
        ({}, "/a/b/c", None, "_a_b_c"),
        ({}, "plain", None, "plain"),
        ({}, "x", "dir/file", "dir_file"),  # upstream translates aliases too
        ({"pathTranslation": "+"}, "a/b", None, "a+b"),
        ({"pathTranslation": "False"}, "/a/b/c", None, "a/b/c"),
        ({"pathTranslation": "false"}, "x", "sub/dir/f", "sub/dir/f"),
        # upstream names an aliasless ARN object after the whole ARN
        ({}, ARN_SM, None, "arn:aws:secretsmanager:us-east-1:123456789012:secret:db_prod-AbCdEf"),
    ],
)
def test_file_naming(params: dict[str, str], name: str, alias: str | None, expected: str) -> None:
    obj: dict[str, Any] = {"objectName": name}
    if not name.startswith("arn:"):
        obj["objectType"] = "secretsmanager"
    if alias:
        obj["objectAlias"] = alias
    plan = parse([obj], **params)
    assert [f.path for f in plan.files] == [expected]


def test_arn_implies_type() -> None:
    plan = parse([{"objectName": ARN_SM}, {"objectName": ARN_SSM, "objectAlias": "k"}])
    kinds = [f.source.kind for f in plan.files]  # type: ignore[attr-defined]
    assert kinds == ["secretsmanager", "ssmparameter"]


@pytest.mark.parametrize(
    ("obj", "params", "where"),
    [
        ({"objectType": "secretsmanager"}, {}, ("objects[0]", "objectName")),
        ({"objectName": 123, "objectType": "secretsmanager"}, {}, ("objects[0]", "objectName")),
        ({"objectName": "a"}, {}, ("a", "objectType")),
        ({"objectName": "a", "objectType": "ssm"}, {}, ("a", "objectType")),
        ({"objectName": "a", "objectType": "kms"}, {}, ("a", "objectType")),
        ({"objectName": "a", "objectType": "secretsmanager", "colour": 1}, {}, ("a", "colour")),
        (
            {"objectName": "a", "objectType": "secretsmanager", "objectAlias": 7},
            {},
            ("a", "objectAlias"),
        ),
        (
            {"objectName": "a", "objectType": "secretsmanager", "filePermission": "rw"},
            {},
            ("a", "filePermission"),
        ),
        (
            {
                "objectName": "a",
                "objectType": "ssmparameter",
                "objectVersion": "1",
                "objectVersionLabel": "x",
            },
            {},
            ("a", "objectVersionLabel"),
        ),
        (
            {"objectName": "arn:aws:s3:us-east-1:1:bucket/x"},
            {},
            ("arn:aws:s3:us-east-1:1:bucket/x", "objectName"),
        ),
        ({"objectName": "arn:bogus"}, {}, ("arn:bogus", "objectName")),
        (
            {"objectName": ARN_SM.replace("us-east-1", "eu-west-1")},
            {},
            (ARN_SM.replace("us-east-1", "eu-west-1"), "objectName"),
        ),
        ({"objectName": ARN_SM, "objectType": "ssmparameter"}, {}, (ARN_SM, "objectType")),
        (
            {"objectName": "a", "objectType": "secretsmanager", "jmesPath": "user"},
            {},
            ("a", "jmesPath"),
        ),
        (
            {"objectName": "a", "objectType": "secretsmanager", "jmesPath": [{"path": "u"}]},
            {},
            ("a", "jmesPath[0].objectAlias"),
        ),
        (
            {"objectName": "a", "objectType": "secretsmanager", "jmesPath": [{"objectAlias": "u"}]},
            {},
            ("a", "jmesPath[0].path"),
        ),
        (
            {
                "objectName": "a",
                "objectType": "secretsmanager",
                "jmesPath": [{"path": "a[", "objectAlias": "u"}],
            },
            {},
            ("a", "jmesPath[0].path"),
        ),
        (
            {
                "objectName": "a",
                "objectType": "secretsmanager",
                "jmesPath": [{"path": "a", "objectAlias": "u", "x": 1}],
            },
            {},
            ("a", "jmesPath[0].x"),
        ),
        (
            {
                "objectName": "a",
                "objectType": "secretsmanager",
                "jmesPath": [{"path": "a", "objectAlias": "u", "filePermission": "9"}],
            },
            {},
            ("a", "jmesPath[0].filePermission"),
        ),
        # failover rules
        (
            {
                "objectName": "a",
                "objectType": "secretsmanager",
                "failoverObject": {"objectName": "b"},
            },
            {"failoverRegion": "us-west-2"},
            ("a", "objectAlias"),
        ),
        (
            {
                "objectName": "a",
                "objectType": "secretsmanager",
                "objectAlias": "a",
                "failoverObject": {"objectName": "b"},
            },
            {},
            ("a", "failoverObject"),
        ),
        (
            {
                "objectName": "a",
                "objectType": "secretsmanager",
                "objectAlias": "a",
                "objectVersion": "1",
                "failoverObject": {"objectName": "b", "objectVersion": "2"},
            },
            {"failoverRegion": "us-west-2"},
            ("a", "failoverObject.objectVersion"),
        ),
        (
            {
                "objectName": "a",
                "objectType": "secretsmanager",
                "objectAlias": "a",
                "failoverObject": {"objectVersion": "2"},
            },
            {"failoverRegion": "us-west-2"},
            ("a", "failoverObject.objectName"),
        ),
        (
            {
                "objectName": "a",
                "objectType": "secretsmanager",
                "objectAlias": "a",
                "failoverObject": {"objectName": "b", "stage": "x"},
            },
            {"failoverRegion": "us-west-2"},
            ("a", "failoverObject.stage"),
        ),
        (
            {"objectName": ARN_SM, "objectAlias": "a", "failoverObject": {"objectName": ARN_SM}},
            {"failoverRegion": "us-west-2"},
            (ARN_SM, "failoverObject.objectName"),
        ),
        (
            {
                "objectName": "a",
                "objectType": "ssmparameter",
                "objectAlias": "a",
                "failoverObject": {
                    "objectName": "b",
                    "objectVersionLabel": "l",
                    "objectVersion": "1",
                },
                "objectVersion": "1",
            },
            {"failoverRegion": "us-west-2"},
            ("a", "failoverObject.objectVersionLabel"),
        ),
    ],
)
def test_object_errors_name_object_and_field(
    obj: dict[str, Any], params: dict[str, str], where: tuple[str, str]
) -> None:
    probs = problems([obj], **params)
    assert where in fields(probs), probs
    for p in probs:
        assert str(p).startswith(f"object {p.obj!r}: field {p.field!r}: ")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"failoverRegion": "us-east-1"}, "failoverRegion"),
        ({"failoverRegion": "US EAST"}, "failoverRegion"),
        ({"region": "us_east!"}, "region"),
        ({"pathTranslation": "ab"}, "pathTranslation"),
        ({"usePodIdentity": "yes"}, "usePodIdentity"),
        ({"preferredAddressType": "ipv5"}, "preferredAddressType"),
        ({"regoin": "us-east-1"}, "regoin"),
        ({"objects": ""}, "objects"),
        ({"objects": "- [unclosed"}, "objects"),
        ({"objects": "objectName: a"}, "objects"),
        ({"objects": "[]"}, "objects"),
    ],
)
def test_top_level_errors(params: dict[str, str], field: str) -> None:
    base = {"objects": objects({"objectName": "a", "objectType": "secretsmanager"})}
    base["region"] = "us-east-1"
    with pytest.raises(ParameterError) as info:
        AwsProvider().parse({**base, **params})
    assert (None, field) in fields(list(info.value.problems))


def test_kubelet_and_driver_keys_are_ignored() -> None:
    plan = AwsProvider().parse(
        {
            "objects": objects({"objectName": "a", "objectType": "secretsmanager"}),
            "region": "us-east-1",
            "secretProviderClass": "spc",
            "csi.storage.k8s.io/pod.name": "p",
            "csi.storage.k8s.io/pod.namespace": "ns",
            "csi.storage.k8s.io/serviceAccount.tokens": '{"sts.amazonaws.com": {"token": "x"}}',
            "csi.storage.k8s.io/ephemeral": "true",
            "usePodIdentity": "",
            "preferredAddressType": "",
        }
    )
    assert [f.path for f in plan.files] == ["a"]


def test_region_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    objs = objects({"objectName": "a", "objectType": "secretsmanager"})
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert AwsProvider().parse({"objects": objs}).auth == AwsAuth("eu-west-1")
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    assert AwsProvider().parse({"objects": objs}).auth == AwsAuth("eu-central-1")
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(ParameterError) as info:
        AwsProvider().parse({"objects": objs})
    (p,) = info.value.problems
    assert p.field == "region" and "set parameter 'region'" in p.message


def test_a_wrong_object_type_is_one_problem_not_two() -> None:
    """'nope' is reported as not a type, not also as "objectType required"."""
    probs = problems([{"objectName": "a", "objectType": "nope"}])
    assert [(p.obj, p.field) for p in probs] == [("a", "objectType")]
    assert "'nope' is not one of secretsmanager, ssmparameter" in probs[0].message
    # A full ARN still settles the type when the one given is wrong: still the one problem.
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:db-AbCdEf"
    probs = problems([{"objectName": arn, "objectType": "nope"}], region="us-east-1")
    assert [(p.obj, p.field) for p in probs] == [(arn, "objectType")]


def test_all_problems_are_collected_at_once() -> None:
    probs = problems(
        [
            {"objectName": "a"},
            {"objectName": "b", "objectType": "secretsmanager", "filePermission": "999"},
            {"objectType": "ssmparameter"},
            {"objectName": "c", "objectType": "secretsmanager", "bogus": True},
        ],
        failoverRegion="us-east-1",
        pathTranslation="xx",
    )
    assert fields(probs) >= {
        ("a", "objectType"),
        ("b", "filePermission"),
        ("objects[2]", "objectName"),
        ("c", "bogus"),
        (None, "failoverRegion"),
        (None, "pathTranslation"),
    }


@pytest.mark.parametrize(
    ("obj", "params"),
    [
        ({"objectName": "../../etc/passwd"}, {"pathTranslation": "False"}),
        ({"objectName": "a/../../b"}, {"pathTranslation": "False"}),
        ({"objectName": "x", "objectAlias": "../x"}, {"pathTranslation": "False"}),
        ({"objectName": "x", "objectAlias": "../x"}, {}),  # '.._x' still starts with '..'
        ({"objectName": "..", "objectAlias": None}, {}),
        (
            {"objectName": "x", "jmesPath": [{"path": "a", "objectAlias": "../../a"}]},
            {"pathTranslation": "False"},
        ),
        ({"objectName": "x", "objectAlias": "a//b"}, {"pathTranslation": "False"}),
    ],
)
def test_path_traversal_rejected(obj: dict[str, Any], params: dict[str, str]) -> None:
    obj = {**obj, "objectType": "secretsmanager"}
    probs = problems([obj], **params)
    assert any("'..'" in p.message or "empty" in p.message for p in probs), probs


def test_duplicate_files_rejected() -> None:
    probs = problems(
        [
            {"objectName": "a/b", "objectType": "secretsmanager"},
            {"objectName": "a_b", "objectType": "ssmparameter"},
        ]
    )
    assert ("a_b", "path") in fields(probs)


def test_yaml_int_version() -> None:
    plan = parse("- {objectName: p, objectType: ssmparameter, objectVersion: 2}")
    (f,) = plan.files
    assert f.source == AwsSource("ssmparameter", Target("p", "2", None), None)


@pytest.mark.parametrize(
    ("perm", "mode"),
    [
        # Upstream (sigs.k8s.io/yaml, then ^[0-7]{4}$ and ParseInt base 8): only a quoted
        # four-digit octal string is a mode. An unquoted number becomes its decimal text first.
        ('"0640"', 0o640),
        ('"0500"', 0o500),
        ('""', 0o644),  # empty: the default
        ("500", None),  # upstream: "Invalid File Permission: 500" (never 0764)
        ("0640", None),  # YAML's octal 416: upstream "Invalid File Permission: 416"
        ("0o640", None),
        ('"500"', None),
        ('"0o640"', None),
        ("511", None),
        ("-1", None),
        ("true", None),
        ('"1000"', None),  # upstream takes it (sticky bit); a secret file has no use for it
    ],
)
def test_file_permission_as_upstream_reads_it(perm: str, mode: int | None) -> None:
    text = f"- {{objectName: p, objectType: secretsmanager, filePermission: {perm}}}"
    if mode is None:
        with pytest.raises(ParameterError) as info:
            parse(text)
        assert "filePermission" in str(info.value) and "0640" in str(info.value)
    else:
        assert parse(text).files[0].mode == mode


# --- fetching against moto ------------------------------------------------------------------------


def client(env: Mapping[str, str], service: str, region: str | None = None) -> Any:
    return boto3.client(  # type: ignore[call-overload]
        service, region_name=region or env["region"], endpoint_url=env["endpoint_url"]
    )


def mount(
    provider: AwsProvider, params: Mapping[str, str], identity: Identity = AMBIENT
) -> dict[str, bytes | FetchError]:
    """Parse, fetch and render like the daemon does; errors per file."""
    plan = provider.parse(params)
    got = provider.fetch_sync(plan, identity, plan.sources())
    assert set(got) == set(plan.sources())
    out: dict[str, bytes | FetchError] = {}
    for f in plan.files:
        r = got[f.source]
        if isinstance(r, Fetched):
            try:
                out[f.path] = provider.render(f, r)
            except FetchError as exc:
                out[f.path] = exc
        else:
            out[f.path] = r
    return out


def versions(provider: AwsProvider, params: Mapping[str, str]) -> list[str]:
    plan = provider.parse(params)
    got = provider.fetch_sync(plan, AMBIENT, plan.sources())
    results = [got[s] for s in plan.sources()]
    return [r.version if isinstance(r, Fetched) else "ERR" for r in results]


def test_secretsmanager_string_binary_versions(aws_env: dict[str, str]) -> None:
    sm = client(aws_env, "secretsmanager")
    sm.create_secret(Name="app/text", SecretString="one")
    v2 = sm.put_secret_value(SecretId="app/text", SecretString="two")["VersionId"]
    v1 = next(
        v["VersionId"]
        for v in sm.list_secret_version_ids(SecretId="app/text")["Versions"]
        if "AWSPREVIOUS" in v.get("VersionStages", [])
    )
    sm.create_secret(Name="app/blob", SecretBinary=b"\x00\xffbin")
    params = {
        "objects": objects(
            {"objectName": "app/text", "objectType": "secretsmanager"},
            {
                "objectName": "app/text",
                "objectType": "secretsmanager",
                "objectAlias": "prev",
                "objectVersionLabel": "AWSPREVIOUS",
            },
            {
                "objectName": "app/text",
                "objectType": "secretsmanager",
                "objectAlias": "pinned",
                "objectVersion": v1,
            },
            {"objectName": "app/blob", "objectType": "secretsmanager"},
        ),
    }
    p = AwsProvider()
    files = mount(p, params)
    assert files == {
        "app_text": b"two",
        "prev": b"one",
        "pinned": b"one",
        "app_blob": b"\x00\xffbin",
    }
    assert versions(p, params)[:3] == [v2, v1, v1]


def test_endpoint_data_keeps_only_the_services_it_calls(aws_env: dict[str, str]) -> None:
    """botocore's endpoint data is pruned to the provider's services (6.7 MiB resident
    otherwise), and clients of those services still resolve endpoints and work."""
    from providers.aws import auth

    p = AwsProvider()
    client(aws_env, "secretsmanager").create_secret(Name="pruned", SecretString="still-here")
    got = mount(p, {"objects": objects({"objectName": "pruned", "objectType": "secretsmanager"})})
    assert got == {"pruned": b"still-here"}
    session = p._clients._session
    assert session is not None
    endpoints = session.get_component("data_loader").load_data("endpoints")
    partitions = endpoints["partitions"]
    assert {pt["partition"] for pt in partitions} >= {"aws", "aws-cn", "aws-us-gov"}
    # Decoded by the provider's file loader: plain dicts (botocore's own makes OrderedDicts).
    assert type(endpoints) is dict and all(type(pt["services"]) is dict for pt in partitions)
    for pt in partitions:
        assert set(pt["services"]) <= auth.SERVICES, pt["partition"]
    assert "secretsmanager" in next(pt for pt in partitions if pt["partition"] == "aws")["services"]
    # What only endpoints.json knows still answers: a region's partition and hostname.
    cli = p._clients.client("sts", "cn-north-1", None, unsigned=True)
    assert cli.meta.partition == "aws-cn"


def test_service_models_keep_only_the_operations_it_calls(aws_env: dict[str, str]) -> None:
    """Each service model is pruned to the provider's operations and the shapes they reach (SSM's
    model is 3.8 MiB decoded otherwise); the clients still call, parse and map errors."""
    from providers.aws import auth

    p = AwsProvider()
    ssm = client(aws_env, "ssm")
    ssm.put_parameter(Name="/pruned/p", Value="param-value", Type="SecureString")
    got = mount(
        p,
        {
            "objects": objects(
                {"objectName": "/pruned/p", "objectType": "ssmparameter", "objectAlias": "p"}
            )
        },
    )
    assert got == {"p": b"param-value"}
    # An error answer still maps to its code (the error shapes of the operation are kept).
    missing = mount(p, {"objects": objects({"objectName": "nope", "objectType": "secretsmanager"})})
    err = missing["nope"]
    assert isinstance(err, FetchError) and err.code == "NotFound", err
    for service, wanted in auth.OPERATIONS.items():
        cli = p._clients.client(service, "us-east-1", None, unsigned=service == "sts")
        model = cli.meta.service_model
        assert set(model.operation_names) == wanted, service
        for op in wanted:
            assert model.operation_model(op).input_shape is not None
        # Most shapes are gone (those the kept operations reach stay), and all documentation.
        full = botocore.loaders.Loader().load_service_model(service, "service-2")
        assert len(model.shape_names) < len(full["shapes"]) / 2, service
        assert "'documentation'" not in repr(model._service_description), service
    sm = p._clients.client("secretsmanager", "us-east-1", None)
    assert hasattr(sm, "get_secret_value") and not hasattr(sm, "list_secrets")


def test_secret_by_arn(aws_env: dict[str, str]) -> None:
    arn = client(aws_env, "secretsmanager").create_secret(Name="db/prod", SecretString="x")["ARN"]
    files = mount(AwsProvider(), {"objects": objects({"objectName": arn})})
    assert files == {arn.replace("/", "_"): b"x"}


def test_ssm_string_securestring_versions_labels(aws_env: dict[str, str]) -> None:
    ssm = client(aws_env, "ssm")
    ssm.put_parameter(Name="/app/plain", Value="p1", Type="String")
    ssm.put_parameter(Name="/app/secure", Value="s1", Type="SecureString")
    ssm.put_parameter(Name="/app/secure", Value="s2", Type="SecureString", Overwrite=True)
    ssm.label_parameter_version(Name="/app/secure", ParameterVersion=1, Labels=["old"])
    arn = ssm.get_parameter(Name="/app/plain")["Parameter"]["ARN"]
    params = {
        "objects": objects(
            {"objectName": "/app/plain", "objectType": "ssmparameter"},
            {"objectName": "/app/secure", "objectType": "ssmparameter"},
            {
                "objectName": "/app/secure",
                "objectType": "ssmparameter",
                "objectAlias": "v1",
                "objectVersion": "1",
            },
            {
                "objectName": "/app/secure",
                "objectType": "ssmparameter",
                "objectAlias": "old",
                "objectVersionLabel": "old",
            },
            {"objectName": arn, "objectAlias": "by-arn"},
        )
    }
    p = AwsProvider()
    assert mount(p, params) == {
        "_app_plain": b"p1",
        "_app_secure": b"s2",  # decrypted
        "v1": b"s1",
        "old": b"s1",
        "by-arn": b"p1",
    }
    assert versions(p, params) == ["1", "2", "1", "1", "1"]


def test_ssm_many_parameters_in_batches(aws_env: dict[str, str]) -> None:
    ssm = client(aws_env, "ssm")
    names = [f"/bulk/p{i:02d}" for i in range(23)]
    for n in names:
        ssm.put_parameter(Name=n, Value=f"value-{n}", Type="SecureString")
    calls: list[int] = []
    p = AwsProvider()
    real = p._clients.client

    def spy(service: str, region: str, creds: Any, **kw: Any) -> Any:
        cli = real(service, region, creds, **kw)
        if service == "ssm":
            cli.meta.events.register(
                "provide-client-params.ssm.GetParameters",
                lambda params, **kw: calls.append(len(params["Names"])),
                unique_id="test-spy",
            )
        return cli

    p._clients.client = spy  # type: ignore[method-assign]
    objs = [{"objectName": n, "objectType": "ssmparameter"} for n in names]
    files = mount(p, {"objects": objects(*objs)})
    assert files == {n.replace("/", "_"): f"value-{n}".encode() for n in names}
    assert sorted(calls) == [3, 10, 10]


def test_not_found_is_permanent(aws_env: dict[str, str]) -> None:
    client(aws_env, "ssm").put_parameter(Name="/there", Value="v", Type="String")
    files = mount(
        AwsProvider(),
        {
            "objects": objects(
                {"objectName": "missing-secret", "objectType": "secretsmanager"},
                {"objectName": "/missing", "objectType": "ssmparameter"},
                {
                    "objectName": "/there",
                    "objectType": "ssmparameter",
                    "objectAlias": "v9",
                    "objectVersion": "9",
                },
                {"objectName": "/there", "objectType": "ssmparameter"},
            )
        },
    )
    for path in ("missing-secret", "_missing", "v9"):
        err = files[path]
        assert isinstance(err, FetchError), path
        assert not err.transient and err.code == "NotFound"
        assert "not found in region us-east-1" in str(err)
    assert "version 9" in str(files["v9"])
    assert files["_there"] == b"v"


def test_jmespath_render(aws_env: dict[str, str]) -> None:
    doc = {
        "username": "app",
        "db": {"port": 5432, "hosts": ["a", "b"], "tls": True, "nested": {"deep": "x"}},
        "my-key": "hy",
    }
    sm = client(aws_env, "secretsmanager")
    sm.create_secret(Name="cfg", SecretString=json.dumps(doc))
    sm.create_secret(Name="notjson", SecretString=SECRET)
    jp = [
        {"path": "username", "objectAlias": "user"},
        {"path": "db.nested.deep", "objectAlias": "deep"},
        {"path": "db.port", "objectAlias": "port"},
        {"path": "db.hosts", "objectAlias": "hosts"},
        {"path": "db.tls", "objectAlias": "tls"},
        {"path": "db", "objectAlias": "db"},
        {"path": '"my-key"', "objectAlias": "hy"},
        {"path": "nope.nothing", "objectAlias": "missing"},
    ]
    files = mount(
        AwsProvider(),
        {
            "objects": objects(
                {"objectName": "cfg", "objectType": "secretsmanager", "jmesPath": jp},
                {
                    "objectName": "notjson",
                    "objectType": "secretsmanager",
                    "jmesPath": [{"path": "a", "objectAlias": "a"}],
                },
            )
        },
    )
    assert files["cfg"] == json.dumps(doc).encode()
    assert files["user"] == b"app"
    assert files["deep"] == b"x"
    assert files["port"] == b"5432"
    assert files["hosts"] == b'["a","b"]'
    assert files["tls"] == b"true"
    assert json.loads(files["db"]) == doc["db"]  # type: ignore[arg-type]
    assert files["hy"] == b"hy"
    missing = files["missing"]
    assert isinstance(missing, FetchError) and not missing.transient
    assert "'nope.nothing'" in str(missing) and "'cfg'" in str(missing)
    bad = files["a"]
    assert isinstance(bad, FetchError) and "not valid JSON" in str(bad)
    assert files["notjson"] == SECRET.encode()


# --- failover -------------------------------------------------------------------------------------

WEST = "us-west-2"


class _AwsError(BaseHTTPRequestHandler):
    """Answers every AWS JSON-protocol call with one error (status, __type), as AWS would."""

    status = 503
    kind = "InternalServiceError"

    def _fail(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"__type": self.kind, "message": f"fake {self.kind}"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _fail

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def error_server(status: int, kind: str) -> Iterator[str]:
    handler = type("Handler", (_AwsError,), {"status": status, "kind": kind})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join()


@pytest.fixture
def down_url() -> Iterator[str]:
    """A 127.0.0.1 endpoint answering 503 to everything: an AWS region in an outage."""
    with error_server(503, "InternalServiceError") as url:
        yield url


def route(provider: AwsProvider, region: str, endpoint: str) -> None:
    """Send one region's calls to ``endpoint``; one attempt per call to keep the test fast."""
    real = provider._clients.client

    def routed(service: str, reg: str, creds: Any, **kw: Any) -> Any:
        if reg != region:
            return real(service, reg, creds, **kw)
        cfg = Config(
            connect_timeout=2, read_timeout=2, retries={"mode": "standard", "total_max_attempts": 1}
        )
        return boto3.client(  # type: ignore[call-overload]
            service, region_name=reg, endpoint_url=endpoint, config=cfg
        )

    provider._clients.client = routed  # type: ignore[method-assign,assignment]


@pytest.fixture
def closed_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens here afterwards


def failover_params() -> dict[str, str]:
    return {
        "failoverRegion": WEST,
        "objects": objects(
            {"objectName": "s", "objectType": "secretsmanager", "objectAlias": "s"},
            {"objectName": "p", "objectType": "ssmparameter", "objectAlias": "p"},
            {
                "objectName": "s",
                "objectType": "secretsmanager",
                "objectAlias": "other",
                "failoverObject": {"objectName": "s-west"},
            },
        ),
    }


def seed(env: Mapping[str, str], region: str, suffix: str, west_name: bool = False) -> None:
    client(env, "secretsmanager", region).create_secret(Name="s", SecretString=f"s-{suffix}")
    client(env, "ssm", region).put_parameter(Name="p", Value=f"p-{suffix}", Type="SecureString")
    if west_name:
        client(env, "secretsmanager", region).create_secret(Name="s-west", SecretString="sw")


def test_failover_primary_wins(aws_env: dict[str, str]) -> None:
    seed(aws_env, "us-east-1", "east")
    seed(aws_env, WEST, "west", west_name=True)
    files = mount(AwsProvider(), {**failover_params()})
    assert files == {"s": b"s-east", "p": b"p-east", "other": b"s-east"}


@pytest.mark.parametrize("outage", ["down_url", "closed_url"])
def test_failover_when_primary_is_down(
    aws_env: dict[str, str], outage: str, request: pytest.FixtureRequest, caplog: Any
) -> None:
    seed(aws_env, WEST, "west", west_name=True)
    p = AwsProvider()
    route(p, "us-east-1", request.getfixturevalue(outage))
    with caplog.at_level(logging.WARNING, logger="providers"):
        files = mount(p, failover_params())
    assert files == {"s": b"s-west", "p": b"p-west", "other": b"sw"}
    assert "serving failover region us-west-2" in caplog.text


def test_primary_serves_when_failover_is_down(aws_env: dict[str, str], down_url: str) -> None:
    seed(aws_env, "us-east-1", "east")
    p = AwsProvider()
    route(p, WEST, down_url)
    assert mount(p, failover_params()) == {"s": b"s-east", "p": b"p-east", "other": b"s-east"}


def test_not_found_in_either_region_fails(aws_env: dict[str, str]) -> None:
    seed(aws_env, WEST, "west", west_name=True)  # nothing in the primary region
    files = mount(AwsProvider(), failover_params())
    for err in files.values():
        assert isinstance(err, FetchError) and not err.transient and err.code == "NotFound"
        assert "us-east-1" in str(err)
    seed(aws_env, "us-east-1", "east")
    client(aws_env, "secretsmanager", WEST).delete_secret(
        SecretId="s", ForceDeleteWithoutRecovery=True
    )
    files = mount(AwsProvider(), failover_params())
    assert files["p"] == b"p-east" and files["other"] == b"s-east"
    err = files["s"]  # missing in the failover region: a 4xx there fails it, as upstream
    assert isinstance(err, FetchError) and err.code == "NotFound" and WEST in str(err)


def test_both_regions_down_is_transient(aws_env: dict[str, str], down_url: str) -> None:
    p = AwsProvider()
    route(p, "us-east-1", down_url)
    route(p, WEST, down_url)
    for err in mount(p, failover_params()).values():
        assert isinstance(err, FetchError) and err.transient
        assert "us-east-1" in str(err) and WEST in str(err)


# --- identities -----------------------------------------------------------------------------------


def pod(tokens: Mapping[str, str], annotations: Mapping[str, str] | None = None) -> Identity:
    return Identity(
        namespace="app",
        service_account="app-sa",
        pod_name="app-0",
        pod_uid="uid-1",
        tokens={k: Token(v) for k, v in tokens.items()},
        sa_annotations=dict(annotations or {}),
    )


def spy_creds(p: AwsProvider) -> list[tuple[str, str, Any]]:
    seen: list[tuple[str, str, Any]] = []
    real = p._clients.client

    def spy(service: str, region: str, creds: Any, **kw: Any) -> Any:
        seen.append((service, region, creds))
        return real(service, region, creds, **kw)

    p._clients.client = spy  # type: ignore[method-assign]
    return seen


def test_irsa_assume_role_with_web_identity(
    aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client(aws_env, "secretsmanager").create_secret(Name="s", SecretString="v")
    # the driver's own credentials are neither needed nor used for a pod
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    now = [1_000.0]
    p = AwsProvider()
    p._clients = aws_auth.ClientCache(clock=lambda: now[0])
    seen = spy_creds(p)
    ident = pod({"sts.amazonaws.com": JWT}, {aws_auth.IRSA_ROLE_ANNOTATION: ROLE})
    params = {"objects": objects({"objectName": "s", "objectType": "secretsmanager"})}
    assert mount(p, params, ident) == {"s": b"v"}
    assert seen[0][:2] == ("sts", "us-east-1") and seen[0][2] is None
    sm_creds = [c for s, _, c in seen if s == "secretsmanager"]
    assert sm_creds[0] is not None and sm_creds[0].access_key.startswith("ASIA")
    assert JWT not in repr(sm_creds[0])
    # cached: no second STS call while the credentials are fresh
    mount(p, params, ident)
    assert [s for s, _, _ in seen].count("sts") == 1
    # renewed 5 minutes before expiry
    now[0] = sm_creds[0].expires - 200
    mount(p, params, ident)
    assert [s for s, _, _ in seen].count("sts") == 2


def test_release_identity_drops_its_credentials_and_clients(
    aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Memory follows what is mounted: when the last volume of an identity goes, the daemon
    # releases it, and its STS credentials and the clients built on them go with it.
    client(aws_env, "secretsmanager").create_secret(Name="s", SecretString="v")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    p = AwsProvider()
    params = {"objects": objects({"objectName": "s", "objectType": "secretsmanager"})}
    one = pod({"sts.amazonaws.com": JWT}, {aws_auth.IRSA_ROLE_ANNOTATION: ROLE})
    two = dataclasses.replace(one, service_account="other-sa")
    assert mount(p, params, one) == {"s": b"v"} and mount(p, params, two) == {"s": b"v"}
    cache = p._clients
    assert len(cache._creds) == 2 and len(cache._clients) == 3  # sts + one per identity
    p.release_identity(one.key())
    assert len(cache._creds) == 1 and len(cache._clients) == 2
    assert next(iter(cache._creds))[0] == two.key()
    p.release_identity(one.key())  # twice: nothing left to drop
    assert mount(p, params, one) == {"s": b"v"}  # and it can come back


def test_irsa_missing_token(aws_env: dict[str, str]) -> None:
    files = mount(
        AwsProvider(),
        {"objects": objects({"objectName": "s", "objectType": "secretsmanager"})},
        pod({"vault": JWT}, {aws_auth.IRSA_ROLE_ANNOTATION: ROLE}),
    )
    err = files["s"]
    assert isinstance(err, FetchError) and err.code == "MissingToken" and not err.transient
    assert "tokenRequests" in str(err) and "sts.amazonaws.com" in str(err)
    assert JWT not in str(err)


def test_irsa_missing_role_annotation(aws_env: dict[str, str]) -> None:
    files = mount(
        AwsProvider(),
        {"objects": objects({"objectName": "s", "objectType": "secretsmanager"})},
        pod({"sts.amazonaws.com": JWT}),
    )
    err = files["s"]
    assert isinstance(err, FetchError) and err.code == "MissingRole" and not err.transient
    assert aws_auth.IRSA_ROLE_ANNOTATION in str(err) and "app/app-sa" in str(err)


class _Agent(BaseHTTPRequestHandler):
    """The EKS Pod Identity Agent's credentials endpoint, as far as the provider uses it."""

    token = JWT

    def do_GET(self) -> None:
        if self.path != "/v1/credentials" or self.headers.get("Authorization") != self.token:
            body, status = b'{"message": "invalid token"}', 400
        else:
            body = json.dumps(
                {
                    "AccessKeyId": "ASIAPODIDENTITY00001",
                    "SecretAccessKey": "pod-identity-secret",
                    "Token": "pod-identity-session",
                    "AccountId": "123456789012",
                    "Expiration": "2999-01-01T00:00:00Z",
                }
            ).encode()
            status = 200
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def agent_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Agent)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1/credentials"
    monkeypatch.setitem(aws_auth.POD_IDENTITY_ENDPOINTS, "ipv4", url)
    monkeypatch.setitem(aws_auth.POD_IDENTITY_ENDPOINTS, "ipv6", url)
    yield url
    srv.shutdown()
    srv.server_close()
    t.join()


def test_eks_pod_identity(aws_env: dict[str, str], agent_url: str) -> None:
    client(aws_env, "ssm").put_parameter(Name="p", Value="v", Type="SecureString")
    p = AwsProvider()
    seen = spy_creds(p)
    params = {
        "usePodIdentity": "true",
        "preferredAddressType": "ipv4",
        "objects": objects({"objectName": "p", "objectType": "ssmparameter"}),
    }
    assert p.parse(params).auth == AwsAuth("us-east-1", None, True, "ipv4")
    assert mount(p, params, pod({"pods.eks.amazonaws.com": JWT})) == {"p": b"v"}
    ((svc, _, creds),) = seen
    assert svc == "ssm" and creds.access_key == "ASIAPODIDENTITY00001"
    # a token the agent refuses: permanent, and the token is not repeated back
    bad = "eyJ.bad-token.sig"
    err = mount(AwsProvider(), params, pod({"pods.eks.amazonaws.com": bad}))["p"]
    assert isinstance(err, FetchError) and not err.transient and err.code == "AccessDenied"
    assert bad not in str(err)
    err = mount(AwsProvider(), params, pod({"sts.amazonaws.com": JWT}))["p"]
    assert isinstance(err, FetchError) and err.code == "MissingToken"
    assert "pods.eks.amazonaws.com" in str(err)


# --- no secret material in messages or logs -------------------------------------------------------


def test_secret_never_in_errors_or_logs(
    aws_env: dict[str, str], down_url: str, caplog: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    sm = client(aws_env, "secretsmanager")
    sm.create_secret(Name="json", SecretString=json.dumps({"password": SECRET, "n": 1}))
    sm.create_secret(Name="raw", SecretString=SECRET)
    binary = base64.b64encode(SECRET.encode())
    sm.create_secret(Name="bin", SecretBinary=binary)
    client(aws_env, "ssm").put_parameter(Name="p", Value=SECRET, Type="SecureString")
    jp = [{"path": "missing", "objectAlias": "m"}, {"path": "n.deeper", "objectAlias": "d"}]
    objs = objects(
        {"objectName": "json", "objectType": "secretsmanager", "jmesPath": jp},
        {
            "objectName": "raw",
            "objectType": "secretsmanager",
            "jmesPath": [{"path": "x", "objectAlias": "x"}],
        },
        {
            "objectName": "bin",
            "objectType": "secretsmanager",
            "jmesPath": [{"path": "x", "objectAlias": "bx"}],
        },
        {
            "objectName": "p",
            "objectType": "ssmparameter",
            "jmesPath": [{"path": "x", "objectAlias": "px"}],
        },
        {"objectName": "absent", "objectType": "secretsmanager"},
    )
    texts: list[str] = []
    codes: set[str] = set()
    failover = {"objects": objs, "failoverRegion": WEST}
    runs: list[tuple[dict[str, str], Identity, str | None]] = [
        ({"objects": objs}, AMBIENT, None),
        (failover, AMBIENT, None),  # 4xx from the failover region for everything
        (failover, AMBIENT, WEST),  # failover region down: primary serves, some fail
        ({"objects": objs}, pod({"sts.amazonaws.com": SECRET}), None),
        ({"objects": objs}, pod({"pods.eks.amazonaws.com": SECRET}), None),
    ]
    for params, ident, down in runs:
        p = AwsProvider()
        if down:
            route(p, down, down_url)
        if "pods.eks.amazonaws.com" in ident.tokens:
            params = {**params, "usePodIdentity": "true", "preferredAddressType": "ipv4"}
            monkeypatch.setitem(aws_auth.POD_IDENTITY_ENDPOINTS, "ipv4", down_url + "/v1/creds")
        for v in mount(p, params, ident).values():
            if isinstance(v, FetchError):
                texts += [str(v), repr(v)]
                codes.add(v.code)
    plan = AwsProvider().parse({"objects": objs})
    got = AwsProvider().fetch_sync(plan, AMBIENT, plan.sources())
    texts += [repr(v) for v in got.values()]
    assert any("'missing'" in t for t in texts)  # the failure paths above did run
    assert any("not valid JSON" in t for t in texts)
    assert {"NotFound", "JmesPath", "MissingRole", "Unavailable"} <= codes
    for blob in [*texts, caplog.text]:
        assert SECRET not in blob
        assert binary.decode() not in blob


@pytest.mark.parametrize(
    ("status", "kind", "code", "transient"),
    [
        (400, "AccessDeniedException", "AccessDenied", False),
        (400, "UnrecognizedClientException", "AccessDenied", False),
        (400, "ExpiredTokenException", "AccessDenied", False),
        (400, "ThrottlingException", "Throttled", True),
        (429, "TooManyRequestsException", "Throttled", True),
        (500, "InternalServiceError", "Unavailable", True),
        (400, "ValidationException", "BadRequest", False),
    ],
)
def test_aws_errors_are_classified(
    aws_env: dict[str, str], status: int, kind: str, code: str, transient: bool
) -> None:
    params = {
        "objects": objects(
            {"objectName": "s", "objectType": "secretsmanager"},
            {"objectName": "p", "objectType": "ssmparameter"},
        )
    }
    with error_server(status, kind) as url:
        p = AwsProvider()
        route(p, "us-east-1", url)
        files = mount(p, params)
    for err in files.values():
        assert isinstance(err, FetchError)
        assert (err.code, err.transient) == (code, transient), err
        assert kind in str(err) and "us-east-1" in str(err)


def test_connection_refused_is_transient(aws_env: dict[str, str], closed_url: str) -> None:
    p = AwsProvider()
    route(p, "us-east-1", closed_url)
    files = mount(p, {"objects": objects({"objectName": "s", "objectType": "secretsmanager"})})
    err = files["s"]
    assert isinstance(err, FetchError) and err.transient and err.code == "Unavailable"


def test_concurrent_fetches_share_clients_and_one_sts_call(aws_env: dict[str, str]) -> None:
    sm = client(aws_env, "secretsmanager")
    for i in range(8):
        sm.create_secret(Name=f"s{i}", SecretString=f"v{i}")
    p = AwsProvider()
    seen = spy_creds(p)
    ident = pod({"sts.amazonaws.com": JWT}, {aws_auth.IRSA_ROLE_ANNOTATION: ROLE})
    results: dict[int, dict[str, bytes | FetchError]] = {}
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        objs = objects({"objectName": f"s{i}", "objectType": "secretsmanager"})
        results[i] = mount(p, {"objects": objs}, ident)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: {f"s{i}": f"v{i}".encode()} for i in range(8)}
    assert [s for s, _, _ in seen].count("sts") == 1
    creds = {c for s, _, c in seen if s == "secretsmanager"}
    assert len(creds) == 1 and None not in creds
    assert len(p._clients._clients) == 2  # one STS client, one Secrets Manager client


def test_ambient_without_credentials(
    aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    files = mount(
        AwsProvider(), {"objects": objects({"objectName": "s", "objectType": "secretsmanager"})}
    )
    err = files["s"]
    assert isinstance(err, FetchError) and err.code == "NoCredentials" and not err.transient
