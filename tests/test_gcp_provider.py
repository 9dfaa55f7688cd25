"""provider: gcp — parameters, and fetches through the real google-cloud-secret-manager gRPC client
and google-auth against the test servers in tests/gcp_server.py (TLS with a trustme CA)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google.auth
import grpc
import pytest
from google.auth import exceptions as auth_exceptions
from google.oauth2 import credentials as oauth2_credentials

import providers
from providers.base import Fetched, FetchError, Identity, ParameterError, Plan, Token
from providers.gcp.params import Extract, location_of
from providers.gcp.provider import GcpProvider
from providers.gcp.settings import GcpSettings
from tests.gcp_server import (
    LOCATION,
    POOL,
    PROJECT,
    STS_AUDIENCE,
    GcpServers,
    pod_principal,
)

DB = f"projects/{PROJECT}/secrets/db"
CFG = f"projects/{PROJECT}/secrets/cfg"
REGIONAL = f"projects/{PROJECT}/locations/{LOCATION}/secrets/reg"
GSA = "app@test-project.iam.gserviceaccount.com"
MARKER = "PAYLOAD-MARKER-s3cr3t"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def gcp(tmp_path: Path) -> Iterator[GcpServers]:
    with GcpServers.start(tmp_path) as servers:
        servers.add_secret(DB, b"db-v1", b"db-v2")
        servers.add_secret(CFG, f'{{"user": "bob", "port": 5432, "pw": "{MARKER}"}}'.encode())
        servers.add_secret(REGIONAL, b"regional-v1")
        yield servers


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def provider(gcp: GcpServers, clock: Clock) -> Iterator[GcpProvider]:
    p = GcpProvider(gcp.settings(), clock=clock)
    yield p
    p.close()


def secrets_param(*items: str) -> dict[str, str]:
    return {"secrets": "\n".join(items)}


def item(name: str, path: str, extra: str = "") -> str:
    return f"- resourceName: {name}\n  path: {path}\n" + "".join(
        f"  {line}\n" for line in extra.splitlines()
    )


def pod(gcp: GcpServers, ns: str = "ns", ksa: str = "app", **ann: str) -> Identity:
    return Identity(
        namespace=ns,
        service_account=ksa,
        pod_name="p",
        tokens={POOL: Token(gcp.pod_token(ns, ksa))},
        sa_annotations=ann,
    )


def fetch_one(p: GcpProvider, plan: Plan, ident: Identity) -> Fetched | FetchError:
    return p.fetch_sync(plan, ident, plan.sources())[plan.sources()[0]]


def ok(result: Fetched | FetchError) -> Fetched:
    assert isinstance(result, Fetched), result
    return result


def err(result: Fetched | FetchError) -> FetchError:
    assert isinstance(result, FetchError), result
    return result


# --- parameters -----------------------------------------------------------------------------------


def test_registry_builds_gcp_provider() -> None:
    assert isinstance(providers.get_provider("gcp"), GcpProvider)


def test_parse_defaults() -> None:
    plan = GcpProvider(GcpSettings()).parse(
        secrets_param(item(f"{DB}/versions/latest", "db")), 0o640
    )
    assert plan.provider == "gcp" and plan.auth == ("pod-adc",)
    (f,) = plan.files
    assert (f.path, f.mode, f.source, f.object_name, f.select) == (
        "db",
        0o640,
        f"{DB}/versions/latest",
        f"{DB}/versions/latest",
        None,
    )


@pytest.mark.parametrize(
    ("extra", "path", "mode"),
    [
        ("fileName: other", "db", 0o644),  # path wins over fileName, as upstream
        ("mode: 0400", "db", 0o400),  # YAML octal int
        ("mode: 256", "db", 0o400),  # decimal, as upstream's int32
        ("mode: 500", "db", 0o764),  # decimal too: upstream reads it so (documented there)
        ("mode: 0o600", "db", 0o600),
        ("mode: 0", "db", 0),
    ],
)
def test_parse_path_and_mode(extra: str, path: str, mode: int) -> None:
    plan = GcpProvider(GcpSettings()).parse(secrets_param(item(f"{DB}/versions/1", "db", extra)))
    assert (plan.files[0].path, plan.files[0].mode) == (path, mode)


@pytest.mark.parametrize(
    "extra",
    # Upstream's *int32 (yaml.v3) refuses a quoted string; -1 and 777 it takes as garbage modes.
    ["mode: '0440'", "mode: '500'", "mode: ''", "mode: true", "mode: -1", "mode: 777"],
)
def test_parse_refuses_modes_upstream_cannot_mean(extra: str) -> None:
    with pytest.raises(ParameterError) as info:
        GcpProvider(GcpSettings()).parse(secrets_param(item(f"{DB}/versions/1", "db", extra)))
    assert "mode" in str(info.value)


def test_parse_file_name_and_auth_and_extract() -> None:
    params = {
        "auth": "provider-adc",
        "secrets": f"- resourceName: {DB}/versions/1\n  fileName: sub/f\n  extractYAMLKey: k\n"
        f"- resourceName: {REGIONAL}/versions/latest\n  path: r\n  extractJSONKey: j\n",
    }
    plan = GcpProvider(GcpSettings()).parse(params)
    assert plan.auth == ("provider-adc",)
    assert [(f.path, f.select) for f in plan.files] == [
        ("sub/f", Extract("YAML", "k")),
        ("r", Extract("JSON", "j")),
    ]
    assert location_of(f"{REGIONAL}/versions/latest") == LOCATION
    assert location_of(f"{DB}/versions/1") is None


def test_parse_reports_every_problem_with_object_and_field() -> None:
    params = {
        "auth": "key-json",
        "secrets": "\n".join(
            [
                "- path: nameless",
                f"- resourceName: {DB}/versions/1",
                "- resourceName: projects/p/secrets/s",
                f"- resourceName: {DB}/versions/2\n  path: /abs",
                f"- resourceName: {DB}/versions/3\n  path: a/../b",
                f"- resourceName: {CFG}/versions/1\n  path: x\n  extractJSONKey: a\n"
                "  extractYAMLKey: b",
                f"- resourceName: {CFG}/versions/2\n  path: y\n  mode: '0999'",
                f"- resourceName: {CFG}/versions/3\n  path: y\n  colour: red",
                f"- resourceName: {CFG}/versions/4\n  path: dup",
                f"- resourceName: {CFG}/versions/5\n  path: dup",
                "- resourceName: projects/p/locations/Bad_Loc/secrets/s/versions/1\n  path: z",
                "- resourceName: projects/p/locations/l/parameters/n/versions/1\n  path: w",
                "- just a string",
            ]
        ),
    }
    with pytest.raises(ParameterError) as info:
        GcpProvider(GcpSettings()).parse(params)
    got = {(p.obj, p.field) for p in info.value.problems}
    assert got >= {
        (None, "auth"),
        ("secrets[0]", "resourceName"),
        (f"{DB}/versions/1", "path"),
        ("projects/p/secrets/s", "resourceName"),
        (f"{DB}/versions/2", "path"),
        (f"{DB}/versions/3", "path"),
        (f"{CFG}/versions/1", "extractYAMLKey"),
        (f"{CFG}/versions/2", "mode"),
        (f"{CFG}/versions/3", "colour"),
        (f"{CFG}/versions/5", "path"),  # same file as versions/4
        ("projects/p/locations/Bad_Loc/secrets/s/versions/1", "resourceName"),
        ("projects/p/locations/l/parameters/n/versions/1", "resourceName"),
        ("secrets[12]", "secrets"),
    }
    text = str(info.value)
    assert "tokenRequests" not in text and "Parameter Manager" in text
    assert "pod-adc, provider-adc" in text


@pytest.mark.parametrize(
    "params",
    [{}, {"secrets": ""}, {"secrets": "a: [b"}, {"secrets": "just text"}, {"secrets": "[]"}],
)
def test_parse_secrets_missing_or_malformed(params: dict[str, str]) -> None:
    with pytest.raises(ParameterError) as info:
        GcpProvider(GcpSettings()).parse(params)
    assert [(p.obj, p.field) for p in info.value.problems] == [(None, "secrets")]


def test_parse_long_location() -> None:
    name = f"projects/p/locations/{'a' * 31}/secrets/s/versions/1"
    with pytest.raises(ParameterError, match="longer than 30"):
        GcpProvider(GcpSettings()).parse(secrets_param(item(name, "f")))


def test_settings_from_env_and_endpoints() -> None:
    s = GcpSettings.from_env({})
    assert s.endpoint_for(None) == "secretmanager.googleapis.com:443"
    assert s.endpoint_for("us-east1") == "secretmanager.us-east1.rep.googleapis.com:443"
    assert s.sts_endpoint == "https://sts.googleapis.com/v1/token"
    assert s.generate_access_token_url(GSA) == (
        "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/"
        f"{GSA}:generateAccessToken"
    )
    s = GcpSettings.from_env(
        {
            "SECRETFS_GCP_SECRETMANAGER_ENDPOINT": "sm.p.googleapis.com:443",
            "SECRETFS_GCP_SECRETMANAGER_REGIONAL_ENDPOINT": "sm-{location}.example:443",
            "SECRETFS_GCP_STS_ENDPOINT": "https://sts.example/v1/token",
            "SECRETFS_GCP_CA_FILE": "/etc/ca.pem",
            "SECRETFS_GCP_PROJECT": "p1",
            "SECRETFS_GCP_STS_AUDIENCE": "//iam.googleapis.com/x",
        }
    )
    assert s.endpoint_for(None) == "sm.p.googleapis.com:443"
    assert s.endpoint_for("eu") == "sm-eu.example:443"
    assert (s.sts_endpoint, s.ca_file, s.project, s.sts_audience) == (
        "https://sts.example/v1/token",
        "/etc/ca.pem",
        "p1",
        "//iam.googleapis.com/x",
    )


# --- pod-adc: exchange, impersonation, caching ----------------------------------------------------


def test_pod_adc_exchange_and_fetch(gcp: GcpServers, provider: GcpProvider) -> None:
    gcp.bind(pod_principal("ns", "app"), DB)
    ident = pod(gcp)
    plan = provider.parse(
        secrets_param(item(f"{DB}/versions/latest", "latest"), item(f"{DB}/versions/1", "one"))
    )
    res = provider.fetch_sync(plan, ident, plan.sources())
    latest, one = ok(res[f"{DB}/versions/latest"]), ok(res[f"{DB}/versions/1"])
    assert (latest.data, latest.version) == (b"db-v2", "projects/123456789/secrets/db/versions/2")
    assert (one.data, one.version) == (b"db-v1", "projects/123456789/secrets/db/versions/1")
    assert provider.render(plan.files[0], latest) == b"db-v2"
    (call,) = gcp.state.sts_calls  # one exchange for both sources
    assert call["audience"] == STS_AUDIENCE
    assert call["subject_token"] == ident.tokens[POOL].token
    assert call["scope"] == "https://www.googleapis.com/auth/cloud-platform"
    assert call["grant_type"] == "urn:ietf:params:oauth:grant-type:token-exchange"
    assert gcp.state.iam_calls == []  # no annotation: the federated token is used directly
    assert sorted(gcp.global_sm.sm_calls) == sorted(str(s) for s in plan.sources())


def test_regional_secret_uses_regional_endpoint(gcp: GcpServers, provider: GcpProvider) -> None:
    gcp.bind(pod_principal("ns", "app"), REGIONAL)
    plan = provider.parse(secrets_param(item(f"{REGIONAL}/versions/latest", "r")))
    got = ok(fetch_one(provider, plan, pod(gcp)))
    assert got.data == b"regional-v1"
    assert got.version == f"projects/123456789/locations/{LOCATION}/secrets/reg/versions/1"
    assert gcp.regional_sm.sm_calls == [f"{REGIONAL}/versions/latest"]
    assert gcp.global_sm.sm_calls == []


def test_exchange_cached_per_identity_until_near_expiry(
    gcp: GcpServers, provider: GcpProvider, clock: Clock
) -> None:
    gcp.bind(pod_principal("ns", "app"), DB)
    plan = provider.parse(secrets_param(item(f"{DB}/versions/1", "db")))
    ok(fetch_one(provider, plan, pod(gcp)))
    ok(fetch_one(provider, plan, pod(gcp)))  # same identity, a newer pod token: cache hit
    assert len(gcp.state.sts_calls) == 1 and provider.broker.exchanges == 1
    # Another service account never gets the first one's token: it is exchanged separately and
    # the backend sees its own principal (which has no grant).
    other = fetch_one(provider, plan, pod(gcp, ksa="other"))
    assert err(other).code == "PermissionDenied"
    assert len(gcp.state.sts_calls) == 2
    clock.now += 3600 - 300 - 1  # still 5 minutes and a second before expiry
    ok(fetch_one(provider, plan, pod(gcp)))
    assert len(gcp.state.sts_calls) == 2
    clock.now += 2
    ok(fetch_one(provider, plan, pod(gcp)))
    assert len(gcp.state.sts_calls) == 3


def test_impersonation_with_delegates_and_cache(gcp: GcpServers, provider: GcpProvider) -> None:
    gcp.allow_impersonation(GSA, "ns", "app")
    gcp.bind(f"serviceAccount:{GSA}", DB)
    ident = pod(
        gcp,
        **{
            "iam.gke.io/gcp-service-account": GSA,
            "iam.gke.io/gcp-service-account-delegates": '["d1@p.iam.gserviceaccount.com"]',
        },
    )
    plan = provider.parse(secrets_param(item(f"{DB}/versions/2", "db")))
    assert ok(fetch_one(provider, plan, ident)).data == b"db-v2"
    ((path, body),) = gcp.state.iam_calls
    assert path == f"/v1/projects/-/serviceAccounts/{GSA}:generateAccessToken"
    assert body["scope"] == ["https://www.googleapis.com/auth/cloud-platform"]
    assert body["delegates"] == ["projects/-/serviceAccounts/d1@p.iam.gserviceaccount.com"]
    ok(fetch_one(provider, plan, ident))
    assert (len(gcp.state.sts_calls), len(gcp.state.iam_calls)) == (1, 1)


def test_impersonation_throttled_then_success(gcp: GcpServers, provider: GcpProvider) -> None:
    gcp.allow_impersonation(GSA, "ns", "app")
    gcp.bind(f"serviceAccount:{GSA}", DB)
    gcp.state.iam_fail = [429, 500]
    plan = provider.parse(secrets_param(item(f"{DB}/versions/1", "db")))
    ok(fetch_one(provider, plan, pod(gcp, **{"iam.gke.io/gcp-service-account": GSA})))
    assert len(gcp.state.iam_calls) == 3 and len(gcp.state.sts_calls) == 1


def test_impersonation_denied(gcp: GcpServers, provider: GcpProvider) -> None:
    ident = pod(gcp, **{"iam.gke.io/gcp-service-account": GSA})
    plan = provider.parse(secrets_param(item(f"{DB}/versions/1", "db")))
    e = err(fetch_one(provider, plan, ident))
    assert (e.code, e.transient, e.obj) == ("AuthFailed", False, f"{DB}/versions/1")
    msg = str(e)
    assert f"impersonating {GSA}" in msg and "HTTP 403" in msg
    assert "iam.serviceAccounts.getAccessToken" in msg
    assert f"roles/iam.workloadIdentityUser on {GSA}" in msg
    assert f"serviceAccount:{POOL}[ns/app]" in msg
    assert "secret-token" not in msg and ident.tokens[POOL].token not in msg


def test_bad_delegates_annotation(gcp: GcpServers, provider: GcpProvider) -> None:
    ident = pod(
        gcp,
        **{
            "iam.gke.io/gcp-service-account": GSA,
            "iam.gke.io/gcp-service-account-delegates": "d1@p",
        },
    )
    plan = provider.parse(secrets_param(item(f"{DB}/versions/1", "db")))
    e = err(fetch_one(provider, plan, ident))
    assert e.code == "BadAnnotation" and "iam.gke.io/gcp-service-account-delegates" in str(e)


def test_missing_pod_token_tells_what_to_add(gcp: GcpServers, provider: GcpProvider) -> None:
    ident = Identity(
        namespace="ns", service_account="app", tokens={"vault": Token(gcp.pod_token("ns", "app"))}
    )
    plan = provider.parse(
        secrets_param(item(f"{DB}/versions/1", "a"), item(f"{CFG}/versions/1", "b"))
    )
    res = provider.fetch_sync(plan, ident, plan.sources())
    for source in plan.sources():
        e = err(res[source])
        assert (e.code, e.transient, e.obj) == ("MissingToken", False, source)
        assert f"add {{audience: {POOL}}} to tokenRequests" in str(e)
        assert str(e).startswith(f"object {source!r}: ")
    assert gcp.state.sts_calls == []


@pytest.mark.parametrize("echo", [False, True])
def test_sts_rejects_subject_token(gcp: GcpServers, provider: GcpProvider, echo: bool) -> None:
    gcp.state.sts_echo_token = echo
    bogus = "forged-k8s-jwt-value"
    ident = Identity(namespace="ns", service_account="app", tokens={POOL: Token(bogus)})
    plan = provider.parse(secrets_param(item(f"{DB}/versions/1", "db")))
    e = err(fetch_one(provider, plan, ident))
    assert (e.code, e.transient) == ("AuthFailed", False)
    msg = str(e)
    assert "token exchange" in msg and "HTTP 400" in msg and "invalid_grant" in msg
    assert "subject token is invalid" in msg
    assert bogus not in msg
    assert ("<redacted>" in msg) == echo


def test_sts_rejects_audience(gcp: GcpServers, provider: GcpProvider) -> None:
    gcp.state.expected_audience = "identitynamespace:elsewhere"
    plan = provider.parse(secrets_param(item(f"{DB}/versions/1", "db")))
    e = err(fetch_one(provider, plan, pod(gcp)))
    assert e.code == "AuthFailed" and "is not a known pool provider" in str(e)


def test_sts_throttled_then_success(gcp: GcpServers, provider: GcpProvider) -> None:
    gcp.bind(pod_principal("ns", "app"), DB)
    gcp.state.sts_fail = [429, 503]
    plan = provider.parse(secrets_param(item(f"{DB}/versions/1", "db")))
    ok(fetch_one(provider, plan, pod(gcp)))
    assert len(gcp.state.sts_calls) == 3


def test_sts_throttled_until_deadline_is_transient(gcp: GcpServers, clock: Clock) -> None:
    gcp.state.sts_fail = [429] * 1000
    p = GcpProvider(gcp.settings(retry_deadline=0.2), clock=clock)
    plan = p.parse(secrets_param(item(f"{DB}/versions/1", "db")))
    e = err(fetch_one(p, plan, pod(gcp)))
    p.close()
    assert (e.code, e.transient) == ("Throttled", True)
    assert "HTTP 429" in str(e) and len(gcp.state.sts_calls) >= 2


def test_sts_unreachable_is_transient(gcp: GcpServers, clock: Clock) -> None:
    p = GcpProvider(
        gcp.settings(sts_endpoint="https://127.0.0.1:9/v1/token", retry_deadline=0.1), clock=clock
    )
    plan = p.parse(secrets_param(item(f"{DB}/versions/1", "db")))
    e = err(fetch_one(p, plan, pod(gcp)))
    p.close()
    assert (e.code, e.transient) == ("AuthUnavailable", True)
    assert "cannot reach the token exchange" in str(e)


def test_missing_ca_file_is_a_config_error(gcp: GcpServers, clock: Clock, tmp_path: Path) -> None:
    p = GcpProvider(gcp.settings(ca_file=str(tmp_path / "nope.pem")), clock=clock)
    plan = p.parse(secrets_param(item(f"{DB}/versions/1", "db")))
    e = err(fetch_one(p, plan, pod(gcp)))
    p.close()
    assert (e.code, e.transient) == ("BadConfig", False) and "SECRETFS_GCP_CA_FILE" in str(e)


def test_pool_from_metadata_server(gcp: GcpServers, clock: Clock) -> None:
    gcp.bind(pod_principal("ns", "app"), DB)
    gcp.bind(pod_principal("ns", "two"), DB)
    p = GcpProvider(
        gcp.settings(project=None, cluster_location=None, cluster_name=None), clock=clock
    )
    plan = p.parse(secrets_param(item(f"{DB}/versions/1", "db")))
    ok(fetch_one(p, plan, pod(gcp)))
    ok(fetch_one(p, plan, pod(gcp, ksa="two")))  # resolved once
    p.close()
    assert gcp.state.sts_calls[0]["audience"] == STS_AUDIENCE
    assert sorted(gcp.state.metadata_calls) == [
        "/computeMetadata/v1/instance/attributes/cluster-location",
        "/computeMetadata/v1/instance/attributes/cluster-name",
        "/computeMetadata/v1/project/project-id",
    ]


def test_pool_unknown_without_metadata_server(gcp: GcpServers, clock: Clock) -> None:
    p = GcpProvider(gcp.settings(project=None, metadata_host="127.0.0.1:9"), clock=clock)
    plan = p.parse(secrets_param(item(f"{DB}/versions/1", "db")))
    e = err(fetch_one(p, plan, pod(gcp)))
    p.close()
    assert e.code == "WorkloadIdentityConfig" and "set SECRETFS_GCP_PROJECT" in str(e)


def test_federated_pool_audience(gcp: GcpServers, clock: Clock) -> None:
    aud = "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k"
    gcp.state.expected_audience = aud
    gcp.bind(pod_principal("ns", "app"), DB)
    p = GcpProvider(gcp.settings(sts_audience=aud, project=None), clock=clock)
    ident = Identity(
        namespace="ns", service_account="app", tokens={aud: Token(gcp.pod_token("ns", "app", aud))}
    )
    plan = p.parse(secrets_param(item(f"{DB}/versions/1", "db")))
    ok(fetch_one(p, plan, ident))
    p.close()
    assert gcp.state.sts_calls[0]["audience"] == aud and gcp.state.metadata_calls == []


# --- provider-adc ---------------------------------------------------------------------------------


def _fake_adc(monkeypatch: pytest.MonkeyPatch, token: str | None) -> list[int]:
    calls: list[int] = []

    def default(scopes: Any = None, **_: Any) -> Any:
        calls.append(1)
        if token is None:
            raise auth_exceptions.DefaultCredentialsError(  # type: ignore[no-untyped-call]
                "Your default credentials were not found"
            )
        creds = oauth2_credentials.Credentials(token=token)  # type: ignore[no-untyped-call]
        return creds, "node-project"

    monkeypatch.setattr(google.auth, "default", default)
    return calls


@pytest.mark.parametrize("mode", ["provider-adc", "ambient"])
def test_provider_adc(
    gcp: GcpServers, provider: GcpProvider, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    calls = _fake_adc(monkeypatch, "adc-access-token")
    gcp.state.access_tokens["adc-access-token"] = "serviceAccount:node@p"
    gcp.bind("serviceAccount:node@p", DB)
    params = secrets_param(item(f"{DB}/versions/1", "db"))
    if mode == "provider-adc":
        params["auth"] = "provider-adc"
        ident = pod(gcp)
    else:
        ident = Identity()
    plan = provider.parse(params)
    ok(fetch_one(provider, plan, ident))
    ok(fetch_one(provider, plan, ident))
    assert gcp.state.sts_calls == [] and calls == [1]


def test_provider_adc_without_credentials(
    provider: GcpProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_adc(monkeypatch, None)
    plan = provider.parse({**secrets_param(item(f"{DB}/versions/1", "db")), "auth": "provider-adc"})
    e = err(fetch_one(provider, plan, Identity()))
    assert (e.code, e.transient) == ("NoCredentials", False)
    assert "no application default credentials" in str(e)


# --- Secret Manager answers -----------------------------------------------------------------------


def test_permission_denied_and_not_found(gcp: GcpServers, provider: GcpProvider) -> None:
    gcp.bind(pod_principal("ns", "app"), DB)
    plan = provider.parse(
        secrets_param(
            item(f"{DB}/versions/9", "missing"),
            item(f"{CFG}/versions/1", "denied"),
            item(f"{DB}/versions/1", "fine"),
        )
    )
    res = provider.fetch_sync(plan, pod(gcp), plan.sources())
    nf, denied = err(res[f"{DB}/versions/9"]), err(res[f"{CFG}/versions/1"])
    assert (nf.code, nf.transient, nf.obj) == ("NotFound", False, f"{DB}/versions/9")
    assert "NOT_FOUND" in str(nf) and "check resourceName" in str(nf)
    assert (denied.code, denied.transient) == ("PermissionDenied", False)
    assert "PERMISSION_DENIED" in str(denied) and "secretmanager.secretAccessor" in str(denied)
    assert MARKER not in str(denied)
    assert ok(res[f"{DB}/versions/1"]).data == b"db-v1"  # one failure leaves the others


@pytest.mark.parametrize(
    "codes",
    [
        [grpc.StatusCode.RESOURCE_EXHAUSTED],
        [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE],
    ],
)
def test_throttling_retried_with_backoff(
    gcp: GcpServers, provider: GcpProvider, codes: list[grpc.StatusCode]
) -> None:
    gcp.bind(pod_principal("ns", "app"), DB)
    gcp.state.sm_fail = list(codes)
    plan = provider.parse(secrets_param(item(f"{DB}/versions/1", "db")))
    assert ok(fetch_one(provider, plan, pod(gcp))).data == b"db-v1"
    assert len(gcp.global_sm.sm_calls) == len(codes) + 1


def test_throttled_past_deadline_is_transient(gcp: GcpServers, clock: Clock) -> None:
    gcp.bind(pod_principal("ns", "app"), DB)
    gcp.state.sm_fail = [grpc.StatusCode.RESOURCE_EXHAUSTED] * 1000
    p = GcpProvider(gcp.settings(retry_deadline=0.2), clock=clock)
    plan = p.parse(secrets_param(item(f"{DB}/versions/1", "db")))
    e = err(fetch_one(p, plan, pod(gcp)))
    p.close()
    assert (e.code, e.transient) == ("Throttled", True)
    assert "RESOURCE_EXHAUSTED" in str(e) and len(gcp.global_sm.sm_calls) >= 2


@pytest.mark.parametrize(
    ("code", "name", "transient"),
    [
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Timeout", True),
        (grpc.StatusCode.INTERNAL, "InternalServerError", True),
        (grpc.StatusCode.FAILED_PRECONDITION, "FailedPrecondition", False),
    ],
)
def test_other_status_codes(
    gcp: GcpServers, provider: GcpProvider, code: grpc.StatusCode, name: str, transient: bool
) -> None:
    gcp.bind(pod_principal("ns", "app"), DB)
    gcp.state.sm_fail = [code]
    plan = provider.parse(secrets_param(item(f"{DB}/versions/1", "db")))
    e = err(fetch_one(provider, plan, pod(gcp)))
    assert (e.code, e.transient) == (name, transient)
    assert len(gcp.global_sm.sm_calls) == 1  # not retried inline


def test_revoked_token_is_exchanged_again(gcp: GcpServers, provider: GcpProvider) -> None:
    gcp.bind(pod_principal("ns", "app"), DB)
    plan = provider.parse(secrets_param(item(f"{DB}/versions/1", "db")))
    ok(fetch_one(provider, plan, pod(gcp)))
    with gcp.state.lock:
        gcp.state.access_tokens.clear()
    e = err(fetch_one(provider, plan, pod(gcp)))
    assert e.code == "Unauthenticated" and "secret-token" not in str(e)
    ok(fetch_one(provider, plan, pod(gcp)))
    assert len(gcp.state.sts_calls) == 2


def test_many_sources_fetched_in_parallel(gcp: GcpServers, provider: GcpProvider) -> None:
    names = [f"projects/{PROJECT}/secrets/s{i}" for i in range(20)]
    for i, n in enumerate(names):
        gcp.add_secret(n, f"value-{i}".encode())
    gcp.bind(pod_principal("ns", "app"), *names)
    plan = provider.parse(
        secrets_param(*(item(f"{n}/versions/1", f"f{i}") for i, n in enumerate(names)))
    )
    res = provider.fetch_sync(plan, pod(gcp), plan.sources())
    assert [ok(res[f"{n}/versions/1"]).data for n in names] == [
        f"value-{i}".encode() for i in range(20)
    ]
    assert provider.fetch_sync(plan, pod(gcp), []) == {}


# --- key extraction -------------------------------------------------------------------------------


def test_extract_json_and_yaml(gcp: GcpServers, provider: GcpProvider) -> None:
    yml = f"projects/{PROJECT}/secrets/yml"
    gcp.add_secret(yml, b"user: alice\nnested:\n  a: 1\n")
    gcp.bind(pod_principal("ns", "app"), CFG, yml)
    plan = provider.parse(
        secrets_param(
            item(f"{CFG}/versions/1", "user", "extractJSONKey: user"),
            item(f"{CFG}/versions/1", "whole"),
            item(f"{yml}/versions/latest", "yuser", "extractYAMLKey: user"),
        )
    )
    res = provider.fetch_sync(plan, pod(gcp), plan.sources())
    rendered = {f.path: provider.render(f, ok(res[f.source])) for f in plan.files}
    assert rendered["user"] == b"bob"
    assert rendered["whole"].startswith(b'{"user": "bob"')
    assert rendered["yuser"] == b"alice"
    assert gcp.global_sm.sm_calls.count(f"{CFG}/versions/1") == 1  # one fetch, two files


@pytest.mark.parametrize(
    ("secret", "extra", "expect"),
    [
        (DB, "extractJSONKey: user", "not valid JSON"),
        (CFG, "extractJSONKey: nope", "key 'nope' not found"),
        (CFG, "extractJSONKey: port", "only string values"),
        (CFG, "extractJSONKey: pw\n", None),  # control: works
        ("LIST", "extractYAMLKey: a", "not a YAML map"),
        ("BADYAML", "extractYAMLKey: a", "not valid YAML"),
    ],
)
def test_extract_errors_name_object_and_key_never_payload(
    gcp: GcpServers, provider: GcpProvider, secret: str, extra: str, expect: str | None
) -> None:
    if secret == "LIST":
        secret = f"projects/{PROJECT}/secrets/list"
        gcp.add_secret(secret, f"- {MARKER}\n".encode())
    elif secret == "BADYAML":
        secret = f"projects/{PROJECT}/secrets/badyaml"
        gcp.add_secret(secret, f"a: [{MARKER}\n".encode())
    elif secret == DB:
        gcp.add_secret(DB, f"not json {MARKER}".encode())
    gcp.bind(pod_principal("ns", "app"), secret)
    version = "latest"
    plan = provider.parse(secrets_param(item(f"{secret}/versions/{version}", "f", extra)))
    result = fetch_one(provider, plan, pod(gcp))
    if expect is None:
        assert provider.render(plan.files[0], ok(result)) == MARKER.encode()
        return
    e = err(result)
    assert (e.code, e.transient, e.obj) == ("ExtractFailed", False, f"{secret}/versions/latest")
    assert expect in str(e) and "extract" in str(e)
    assert MARKER not in str(e) and MARKER not in repr(e)


def test_nothing_secret_in_logs_or_reprs(
    gcp: GcpServers, provider: GcpProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gcp.allow_impersonation(GSA, "ns", "app")
    gcp.bind(f"serviceAccount:{GSA}", CFG)
    ident = pod(gcp, **{"iam.gke.io/gcp-service-account": GSA})
    plan = provider.parse(secrets_param(item(f"{CFG}/versions/1", "f", "extractJSONKey: pw")))
    got = ok(fetch_one(provider, plan, ident))
    assert provider.render(plan.files[0], got) == MARKER.encode()
    secrets = [MARKER, ident.tokens[POOL].token, *gcp.state.access_tokens]
    blob = caplog.text + repr(got) + repr(plan) + repr(ident) + repr(provider.broker._cache)
    for s in secrets:
        assert s not in blob
