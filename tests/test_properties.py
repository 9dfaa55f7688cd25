"""Property-based tests (Hypothesis) of the parsers that take untrusted input.

Whatever a SecretProviderClass author, a pod author or the kubelet sends, the parsers answer with
a plan (or a validated request) or with the one documented error that names the problem; never
with another exception, which would surface as an internal error instead of a clear message.

Runs are reproducible (``derandomize``: the same examples every run, for a given Hypothesis and
code) and keep no example database. Hypothesis itself still caches some derived data under
``.hypothesis/``, a directory it creates with its own ``.gitignore``. The tests use no network.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, NamedTuple

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from csi.node import TOKENS_KEY, publish_request
from csi.pb import csi_pb2
from csi.publish import Publish
from csi.server import CsiError
from providers import limits
from providers.aws.params import OBJECT_FIELDS
from providers.azure.params import _FIELDS as AZURE_OBJECT_FIELDS
from providers.base import ParameterError, Plan, Problem, check_path
from providers.vault.config import _Loader as VaultLoader
from secretfs import spc as spc_mod

_DUMPER = yaml.CSafeDumper if yaml.__with_libyaml__ else yaml.SafeDumper

COMMON = {
    "derandomize": True,
    "database": None,
    "deadline": None,
    "print_blob": False,
    "report_multiple_bugs": False,  # one minimal failure per test keeps a failing run short
    # No "explain" phase: it reruns failing cases many times, doubling the time of a failure.
    "phases": [Phase.explicit, Phase.generate, Phase.target, Phase.shrink],
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # the autouse log check of conftest.py
    ],
}


def dump(value: Any, *, flow: bool = False) -> str:
    return yaml.dump(
        value, Dumper=_DUMPER, default_flow_style=flow, width=1 << 30, allow_unicode=True
    )


# --- building blocks --------------------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, chosen by weight (``st.one_of`` flattens nested alternatives into
    one uniform choice, which would drown a few important branches in many unimportant ones).
    Shrinks towards the first choice."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]

    @st.composite
    def pick(draw: st.DrawFn) -> Any:
        return draw(pool[draw(st.integers(0, len(pool) - 1))])

    return pick()


def repeated(parts: st.SearchStrategy[str], lo: int, hi: int) -> st.SearchStrategy[str]:
    """Long strings, cheaply: a short piece repeated ``lo``..``hi`` times."""
    return st.builds(lambda s, n: s * n, parts, st.integers(lo, hi))


# Digits that are not ASCII ("²", Arabic-Indic three, NKo two) next to signs, '_' and radix marks.
NUMERIC_TEXT = st.text(alphabet="0123456789+-_.:xobe \u00b2\u0663\u07c2", max_size=8)
CONTROL_TEXT = st.text(alphabet="a\x00\n\t\r\x1b\x7f\x85\u2028\ufeff/.", max_size=8)
PATHISH = weighted(
    (4, st.text(alphabet="abc/._-", min_size=1, max_size=10)),
    (1, st.sampled_from(["db", "a/b", "/abs", "..", "a/../b", ".", "a//b", "x\ny", "x\x00y"])),
    (1, repeated(st.sampled_from(["a", "a/", "\u00e9", "ab/", "\U0001f600"]), 60, 2100)),
    # Around the limits of check_path: 4096 bytes in all, 255 per element.
    (1, st.integers(2040, 2048).map(lambda k: "a/" * k + "a")),
    (1, st.integers(250, 256).map(lambda k: "a" * k)),
)
SHORT_LONG = repeated(st.text(min_size=1, max_size=3), 50, 3000)
HUGE = repeated(st.text(min_size=1, max_size=4), 10_000, 140_000)
BIG_INTS = st.sampled_from([2**63, -(2**63) - 1, 10**30, 0o7777, 0o1000, 511, 512, -1, 0])


def scalars(realistic: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return weighted(
        (12, realistic),
        (1, st.text(max_size=20)),
        (1, st.integers(-(2**70), 2**70) | BIG_INTS),
        (1, st.booleans() | st.none()),
        (1, st.floats()),
        (1, NUMERIC_TEXT),
        (1, CONTROL_TEXT),
        (1, SHORT_LONG),
    )


def keys(fields: tuple[str, ...]) -> st.SearchStrategy[str]:
    variants = [f.lower() for f in fields] + [f.upper() for f in fields]
    return weighted(
        (6, st.sampled_from(fields)), (1, st.sampled_from(variants)), (1, st.text(max_size=12))
    )


def values(fields: tuple[str, ...], realistic: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Scalars, lists and mappings (keys mostly ``fields``), nested."""
    field_keys = keys(fields)
    return st.recursive(
        scalars(realistic),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(field_keys, inner, max_size=3)
        ),
        max_leaves=8,
    )


def items(
    valid: st.SearchStrategy[dict[str, Any]],
    fields: tuple[str, ...],
    anything: st.SearchStrategy[Any],
) -> st.SearchStrategy[Any]:
    """One list entry: usually a valid item, often with fields replaced or added, else anything."""
    extra = weighted((1, st.just({})), (1, st.dictionaries(keys(fields), anything, max_size=3)))
    merged = st.builds(lambda v, e: {**v, **e}, weighted((4, valid), (1, st.just({}))), extra)
    return weighted((9, merged), (1, anything))


# Raw YAML: pieces that exercise the scanner, tags, anchors, merge keys and implicit types.
_SCANNER = ["- ", ": ", "\n", "  ", "a", "0", "1", "9", "-", "_", ".", "b", "x", "e", "+", ":"]
_STRUCTURE = ["&a ", "*a", "*b", "<<: ", "[", "]", "{", "}", ", ", "'", '"', "#", "? ", "|", ">"]
_TAGS = "!!str !!int !!float !!bool !!null !!binary !!timestamp !!set !!omap !!map !!seq !x"
_OTHER = ["!!python/object:os.system ", "%YAML 1.1\n", "---\n", "...\n", "\t", "\x00", "\ufeff"]
_WORDS = "2001-12-14 ~ yes on 0x 0o 0b objectName secretPath resourceName objectType"
YAML_TOKENS = st.sampled_from(
    [*_SCANNER, *_STRUCTURE, *(t + " " for t in _TAGS.split()), *_OTHER, *_WORDS.split()]
)
TOKEN_SOUP = st.lists(YAML_TOKENS, max_size=25).map("".join)
# Line by line: mostly well-formed documents, so that scalars reach the constructors.
YAML_SCALARS = weighted(
    (1, st.sampled_from(["0b_", "0x_", "0o8", "1_000", "1:30", ".inf", "-.nan", "0.", "+1", "~"])),
    (1, st.sampled_from(["2001-12-14", "2001-13-01", "2001-2-30 1:2:3", "yes", "'q'", '"\\x00"'])),
    (1, st.sampled_from(["[a, b]", "{a: b}", "*a", "&a x", "!!binary aGk=", "!!binary %%", "x"])),
    (2, st.text(alphabet="0123456789-:._ +boxeT", max_size=12)),
    (1, repeated(st.just("9"), 4300, 5000)),
    (1, NUMERIC_TEXT),
)
YAML_TAGS = st.sampled_from(["", "", "", *(t + " " for t in _TAGS.split())])
YAML_LINE = st.tuples(
    st.sampled_from(["", "", "  ", "    "]),
    st.sampled_from(["", "- ", "- "]),
    st.sampled_from(["", "a: ", "objectName: ", "path: ", "<<: ", "? "]),
    YAML_TAGS,
    YAML_SCALARS,
).map("".join)
LINES_YAML = st.lists(YAML_LINE, min_size=1, max_size=6).map("\n".join)
RAW_YAML = weighted((1, TOKEN_SOUP), (3, LINES_YAML))


ALIAS_LINES = st.sampled_from(
    [
        "- *a",
        "- <<: *a\n  objectAlias: other",
        "- {<<: *a, path: other, objectName: other}",
        "- *undefined",
        "- &r [*r]",
        "- &a again",
        "- [*a, *a, *a, *a]",
    ]
)


@st.composite
def anchored(draw: st.DrawFn, entries: st.SearchStrategy[Any]) -> str:
    """A YAML list whose entries share an anchored entry through aliases and merge keys."""
    first = dump(draw(entries), flow=True).strip().replace("\n", " ")
    lines = [f"- &a {first}"]
    lines.extend(draw(st.lists(ALIAS_LINES, max_size=5)))
    return "\n".join(lines) + "\n"


def list_parameter(
    entries: st.SearchStrategy[Any], anything: st.SearchStrategy[Any]
) -> st.SearchStrategy[str]:
    lists = st.lists(entries, min_size=1, max_size=5)
    return weighted(
        (12, lists.map(dump)),
        (2, lists.map(lambda x: dump(x, flow=True))),
        (2, anchored(entries)),
        (1, anything.map(dump)),
        (3, RAW_YAML),
        (1, st.text(max_size=40) | CONTROL_TEXT),
        (1, HUGE),
        (1, st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)),
        (1, st.integers(4300, 5000).map(lambda n: "- " + "9" * n)),  # past int()'s digit limit
    )


def azure_list_parameter(
    entries: st.SearchStrategy[Any], anything: st.SearchStrategy[Any]
) -> st.SearchStrategy[str]:
    """Upstream's ``array:`` of YAML strings (sometimes of mappings, anchors or junk)."""
    element = weighted(
        (12, entries.map(dump)),
        (2, entries),
        (1, anchored(entries)),
        (1, RAW_YAML),
        (1, anything),
    )
    arrays = st.lists(element, min_size=1, max_size=5).map(lambda x: dump({"array": x}))
    return weighted((4, arrays), (1, list_parameter(entries, anything)))


# --- the providers' schemas -------------------------------------------------------------------

# The providers' own field lists: a field added there is fuzzed here too.
AWS_FIELDS = (*OBJECT_FIELDS, "path")
AWS_REAL = st.one_of(
    st.sampled_from(
        [
            "secretsmanager",
            "ssmparameter",
            "ssm",
            "arn:aws:secretsmanager:eu-west-1:123456789012:secret:db-AbCdEf",
            "arn:aws:ssm:eu-west-1:123456789012:parameter/app/db",
            "arn:aws:secretsmanager:us-east-1:1:secret:x",
            "arn:aws:s3:eu-west-1:1:x",
            "arn::::",
            "0640",
            "0400",
            "7777",
            "640",
            416,
            "AWSCURRENT",
            "username",
            '"my-key"',
            "a.b[0]",
            "foo[?bar > `1`]",
        ]
    ),
    st.text(alphabet="ab.[]()*@&|!`'\"?:0-,{}=<>", max_size=12),  # JMESPath-ish
    PATHISH,
    st.lists(
        st.fixed_dictionaries(
            {"path": st.sampled_from(["username", "password", "a.b"]), "objectAlias": PATHISH}
        ),
        max_size=3,
    ),
    st.fixed_dictionaries({"objectName": PATHISH}),
)
AWS_VALID = st.fixed_dictionaries(
    {"objectName": PATHISH, "objectType": st.sampled_from(["secretsmanager", "ssmparameter"])},
    optional={
        "objectAlias": PATHISH,
        "filePermission": st.sampled_from(["0640", "0400", "0777"]),
        "jmesPath": st.lists(
            st.fixed_dictionaries(
                {"path": st.sampled_from(["username", "password"]), "objectAlias": PATHISH}
            ),
            max_size=3,
        ),
    },
)
AWS_TOP = (
    "objects",
    "region",
    "failoverRegion",
    "pathTranslation",
    "usePodIdentity",
    "preferredAddressType",
    "secretProviderClass",
    "csi.storage.k8s.io/pod.name",
)
AWS_TOP_VALUES = st.sampled_from(
    [
        "eu-west-1",
        "us-east-1",
        "EU",
        "False",
        "false",
        "_",
        "-",
        ".",
        "ab",
        "true",
        "1",
        "yes",
        "ipv4",
        "IPV6",
        "auto",
        "both",
        "",
        "\x00",
    ]
)

AZURE_FIELDS = AZURE_OBJECT_FIELDS
AZURE_NAMES = st.text(alphabet="ab-0", min_size=1, max_size=8)
DIGITS = st.text(alphabet="0123456789-+ \u00b2\u0663", min_size=1, max_size=5)
AZURE_REAL = st.one_of(
    st.sampled_from(
        [
            "secret",
            "key",
            "cert",
            "SECRET",
            "pem",
            "pfx",
            "utf-8",
            "base64",
            "hex",
            "latest",
            "0640",
            "640",
            "7777",
            "0",
            "1",
            "2",
            "500",
            "501",
            "-1",
            "a1",
        ]
    ),
    AZURE_NAMES,
    PATHISH,
    NUMERIC_TEXT,
    DIGITS,
)
AZURE_VALID = st.fixed_dictionaries(
    {"objectName": AZURE_NAMES, "objectType": st.sampled_from(["secret", "key", "cert"])},
    optional={
        "objectAlias": PATHISH,
        "objectVersionHistory": st.integers(0, 4) | DIGITS,
        "filePermission": st.sampled_from(["0640", "644"]),
        "objectEncoding": st.sampled_from(["utf-8", "base64", "hex"]),
    },
)
AZURE_TOP = (
    "objects",
    "keyvaultName",
    "tenantID",
    "tenantId",
    "cloudName",
    "cloudEnvFileName",
    "clientID",
    "usePodIdentity",
    "useVMManagedIdentity",
    "useAzureTokenProxy",
)
AZURE_TOP_VALUES = st.sampled_from(
    [
        "kv-test",
        "kv",
        "t",
        "tenant.example.com",
        "AzurePublicCloud",
        "azurechinacloud",
        "AzureStackCloud",
        "Mars",
        "/etc/kubernetes/missing.json",
        "/tmp/x.json",
        "relative",
        "true",
        "false",
        "TRUE",
        "maybe",
        "c-1",
        "/etc/kubernetes/\x00",
    ]
)

GCP_FIELDS = ("resourceName", "path", "fileName", "mode", "extractJSONKey", "extractYAMLKey")
GCP_RESOURCES = weighted(
    (
        3,
        st.sampled_from(
            [
                "projects/p/secrets/s/versions/1",
                "projects/p/secrets/s/versions/latest",
                "projects/p/locations/us-central1/secrets/s/versions/latest",
                "projects/p/locations/US/secrets/s/versions/1",
                "projects/p/locations/" + "a" * 31 + "/secrets/s/versions/1",
                "projects/p/locations/l/parameters/x/versions/1",
            ]
        ),
    ),
    (
        1,
        st.builds(
            "projects/{}/locations/{}/secrets/{}/versions/{}".format,
            *[st.text(alphabet="a-/0", min_size=0, max_size=4)] * 4,
        ),
    ),
)
GCP_REAL = st.one_of(
    GCP_RESOURCES, PATHISH, st.sampled_from([0o640, 420, "0o640", "0640", 512, -1, "key"])
)
GCP_VALID = st.fixed_dictionaries(
    {"resourceName": GCP_RESOURCES, "path": PATHISH},
    optional={
        "mode": st.sampled_from([0o640, 0o400, 420]),
        "extractJSONKey": st.sampled_from(["user", "k"]),
    },
)
GCP_TOP = ("secrets", "auth", "csi.storage.k8s.io/pod.namespace")
GCP_TOP_VALUES = st.sampled_from(["pod-adc", "provider-adc", "", "other"])

VAULT_FIELDS = (
    "objectName",
    "secretPath",
    "secretKey",
    "method",
    "encoding",
    "secretArgs",
    "filePermission",
    "dynamic",
)
VAULT_PATHS = weighted(
    (
        3,
        st.sampled_from(
            [
                "secret/data/app",
                "/v1/secret/data/app?version=1&a=b",
                "database/creds/app",
                "pki/issue/web",
                "gcp/roleset/r/token",
                "v1",
                "?q=1",
                "a/../b",
                "../x",
                "/",
            ]
        ),
    ),
    (1, st.text(alphabet="ab/.?=&%v1", max_size=12)),
)
VAULT_REAL = st.one_of(
    VAULT_PATHS,
    PATHISH,
    st.sampled_from(["GET", "list", "PUT", "POST", "DELETE", "utf-8", "base64", "hex", "HEX"]),
    st.sampled_from([0o640, 420, 0, "0640", "0o640", True, False, "true"]),
    st.dictionaries(st.text(max_size=4), st.integers() | st.text(max_size=4), max_size=3),
)
VAULT_VALID = st.fixed_dictionaries(
    {"objectName": PATHISH, "secretPath": VAULT_PATHS},
    optional={
        "secretKey": st.sampled_from(["password", "data"]),
        "method": st.sampled_from(["GET", "PUT"]),
        "encoding": st.sampled_from(["utf-8", "base64", "hex"]),
        "filePermission": st.sampled_from([0o640, 0o400]),
        "dynamic": st.booleans(),
        "secretArgs": st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
    },
)
VAULT_TOP = (
    "objects",
    "roleName",
    "vaultAddress",
    "vaultNamespace",
    "vaultKubernetesMountPath",
    "vaultAuthMountPath",
    "audience",
    "vaultSkipTLSVerify",
    "vaultCACertPath",
    "vaultCADirectory",
    "vaultTLSServerName",
    "vaultTLSClientCertPath",
    "vaultTLSClientKeyPath",
)
VAULT_TOP_VALUES = st.one_of(
    st.sampled_from(
        [
            "https://vault:8200",
            "http://127.0.0.1:8200/",
            "http://[::1]:8200",
            "vault:8200",
            "r",
            "kubernetes",
            "/k8s/",
            "true",
            "false",
            "maybe",
            "/etc/ca.pem",
            "ns1/",
        ]
    ),
    st.builds(
        "{}://{}{}".format,
        st.sampled_from(["http", "https", "ftp", ""]),
        st.sampled_from(["vault", "[::1]", "[", "]", "[x]", "[::1", "a@b", "1.2.3.4:99999", ""]),
        st.text(alphabet="ab:[]@.0123456789/%", max_size=6),
    ),
)

BASE = {
    "aws": {"region": "eu-west-1"},
    "azure": {"keyvaultName": "kv-test", "tenantId": "t", "usePodIdentity": "false"},
    "gcp": {},
    "vault": {"roleName": "r", "vaultAddress": "https://vault:8200"},
}


class Schema(NamedTuple):
    """What the parameters of one provider are made of (precomputed strategies)."""

    base: dict[str, str]
    top: tuple[str, ...]
    top_values: st.SearchStrategy[str]
    list_key: str
    list_param: st.SearchStrategy[str]


def schema(
    provider: str,
    valid: st.SearchStrategy[dict[str, Any]],
    fields: tuple[str, ...],
    realistic: st.SearchStrategy[Any],
    top: tuple[str, ...],
    top_values: st.SearchStrategy[str],
) -> Schema:
    anything = values(fields, realistic)
    entries = items(valid, fields, anything)
    if provider == "azure":
        lp = azure_list_parameter(entries, anything)
    else:
        lp = list_parameter(entries, anything)
    text_values = weighted((6, top_values), (1, st.text(max_size=20)), (1, CONTROL_TEXT), (1, HUGE))
    list_key = "secrets" if provider == "gcp" else "objects"
    return Schema(BASE[provider], top, text_values, list_key, lp)


SCHEMAS = {
    "aws": schema("aws", AWS_VALID, AWS_FIELDS, AWS_REAL, AWS_TOP, AWS_TOP_VALUES),
    "azure": schema("azure", AZURE_VALID, AZURE_FIELDS, AZURE_REAL, AZURE_TOP, AZURE_TOP_VALUES),
    "gcp": schema("gcp", GCP_VALID, GCP_FIELDS, GCP_REAL, GCP_TOP, GCP_TOP_VALUES),
    "vault": schema("vault", VAULT_VALID, VAULT_FIELDS, VAULT_REAL, VAULT_TOP, VAULT_TOP_VALUES),
}
OTHER_KEYS = st.text(max_size=12)


@st.composite
def parameters(draw: st.DrawFn, provider: str) -> dict[str, str]:
    """A provider's parameters: half the time its base and list only, else also any top-level
    keys (known or not) with realistic or odd values. Takes the provider's name, not its
    strategies, so that its repr stays short."""
    sc = SCHEMAS[provider]
    if draw(st.booleans()):
        return {**sc.base, sc.list_key: draw(sc.list_param)}
    params: dict[str, str] = dict(sc.base) if draw(st.integers(0, 3)) else {}
    for key in sc.top:
        if draw(st.integers(0, 5)) == 0:
            params[key] = draw(sc.top_values)
    params.update(draw(st.dictionaries(OTHER_KEYS, sc.top_values, max_size=2)))
    if draw(st.integers(0, 9)):
        params[sc.list_key] = draw(sc.list_param)
    return params


SMALL_OVERRIDES = st.none() | st.dictionaries(
    st.sampled_from(["objects", "secrets", "region", "vaultAddress", "keyvaultName", "x"]),
    st.text(max_size=10),
    max_size=2,
)


# --- 1. spc.plan: a Plan or a ParameterError --------------------------------------------------


def check_plan(provider: str, plan: Plan) -> None:
    assert plan.provider == provider
    assert len(plan.files) <= limits.MAX_FILES
    paths = [f.path for f in plan.files]
    assert len(set(paths)) == len(paths), f"duplicate file paths: {paths}"
    for f in plan.files:
        assert check_path(f.path, None, "path") == [], f"unusable file path {f.path!r}"
        assert 0 <= f.mode <= 0o777, f"mode {f.mode:o} of {f.path!r}"
        hash(f.source)  # part of the cache key


def check_parameter_error(exc: ParameterError) -> None:
    message = str(exc)
    assert message
    assert len(message) < 20000, f"error message of {len(message)} characters"
    assert exc.problems
    for p in exc.problems:
        assert isinstance(p, Problem)
        assert p.message


@pytest.mark.parametrize("provider", sorted(BASE))
@settings(max_examples=300, **COMMON)
@given(data=st.data())
def test_plan_returns_a_plan_or_a_parameter_error(provider: str, data: st.DataObject) -> None:
    params = data.draw(parameters(provider), label="parameters")
    overrides = data.draw(SMALL_OVERRIDES, label="overrides")
    spc = spc_mod.SecretProviderClass("c", "ns", provider, params)
    try:
        plan = spc_mod.plan(spc, overrides)
    except ParameterError as exc:
        check_parameter_error(exc)
    else:
        check_plan(provider, plan)


# --- 2. csi.node.publish_request: a Publish or INVALID_ARGUMENT -------------------------------

VALID_CONTEXT = {
    "secretProviderClass": "spc",
    "csi.storage.k8s.io/pod.name": "p",
    "csi.storage.k8s.io/pod.namespace": "ns",
    "csi.storage.k8s.io/pod.uid": "u",
    "csi.storage.k8s.io/serviceAccount.name": "sa",
    TOKENS_KEY: json.dumps({"vault": {"token": "ctx-token", "expirationTimestamp": "x"}}),
    "region": "eu-west-1",
}
VALID_TARGET = "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/v/mount"

ODD_TEXT = st.one_of(
    st.text(max_size=20),
    NUMERIC_TEXT,
    CONTROL_TEXT,
    SHORT_LONG,
    repeated(st.characters(), 100, 600),
    st.sampled_from(["", "\u00b2", "\x00", "\n", "9" * 5000, "4294967295", "4294967294", "-1"]),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
TOKENS = st.one_of(
    st.just(VALID_CONTEXT[TOKENS_KEY]),
    st.dictionaries(
        st.text(max_size=8),
        st.fixed_dictionaries({"token": st.text(max_size=8)}) | JSON_VALUES,
        max_size=3,
    ).map(json.dumps),
    JSON_VALUES.map(json.dumps),
    st.integers(1, 5000).map(lambda n: "[" * n + "]" * n),
    st.just("1" * 5000),
    repeated(st.just('{"a": {"token": "x"}, '), 3500, 3500).map(lambda s: "{" + s + "}"),
    ODD_TEXT,
)
CONTEXT_KEYS = st.sampled_from(sorted(VALID_CONTEXT)) | st.text(max_size=12)
GROUPS = st.one_of(
    st.sampled_from(["", "2000", "0", "4294967294", "4294967295", "\u00b2", "\u0663", "9" * 5000]),
    st.text(alphabet="0123456789", max_size=12),
    repeated(st.just("9"), 4300, 5000),
    ODD_TEXT,
)


ODD_CONTEXT = st.dictionaries(CONTEXT_KEYS, ODD_TEXT, max_size=2)
ODD_SECRETS = st.dictionaries(st.sampled_from([TOKENS_KEY, "k"]) | st.text(max_size=6), TOKENS)
ODD_KINDS = st.sampled_from(["mount", "block", "both", "none"])
ODD_VOLUME_IDS = ODD_TEXT | st.sampled_from([".", "..", "a" * 129])
ODD_TARGETS = st.one_of(
    ODD_TEXT.map(lambda rest: "/var/lib/kubelet/pods/" + rest),
    st.sampled_from(["/var/lib/kubelet/pods/../x", "/var/lib/kubelet/pods", "x"]),
    ODD_TEXT,
)
ODD_ROOTS = st.sampled_from(["/var/lib/kubelet/", "/"])
DROPPED_KEYS = st.lists(st.sampled_from(sorted(VALID_CONTEXT)), max_size=3)


@st.composite
def publish_requests(draw: st.DrawFn) -> tuple[Any, str]:
    """Each field is usually valid (so that later checks are reached), else odd."""

    def usually(valid: Any, odd: st.SearchStrategy[Any]) -> Any:
        return valid if draw(st.integers(0, 4)) else draw(odd)

    ctx = dict(VALID_CONTEXT)
    if not draw(st.integers(0, 4)):
        for k in draw(DROPPED_KEYS):
            ctx.pop(k, None)
    ctx.update(draw(ODD_CONTEXT))
    if draw(st.booleans()):
        ctx[TOKENS_KEY] = draw(TOKENS)
    secrets = usually({"clientsecret": "s3cr3t"}, ODD_SECRETS)
    kind = usually("mount", ODD_KINDS)
    cap = csi_pb2.VolumeCapability()
    if kind in ("mount", "both"):
        cap.mount.volume_mount_group = draw(GROUPS)
    if kind in ("block", "both"):
        cap.block.SetInParent()  # a oneof: with "both", the block wins
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id=usually("csi-abc", ODD_VOLUME_IDS),
        target_path=usually(VALID_TARGET, ODD_TARGETS),
        readonly=usually(True, st.booleans()),
        volume_context=ctx,
        secrets=secrets,
    )
    if kind != "none":
        req.volume_capability.CopyFrom(cap)
    root = usually("/var/lib/kubelet", ODD_ROOTS)
    return req, root


@settings(max_examples=600, **COMMON)
@given(publish_requests())
def test_publish_request_returns_a_publish_or_invalid_argument(case: tuple[Any, str]) -> None:
    req, root = case
    try:
        out = publish_request(req, root)
    except CsiError as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT, exc.code
        assert exc.message
        assert len(exc.message) < 2000, f"message of {len(exc.message)} characters"
    else:
        assert isinstance(out, Publish)
        assert out.volume_id == req.volume_id
        assert 0 <= out.gid <= 0xFFFFFFFE
        assert TOKENS_KEY not in out.attributes and TOKENS_KEY not in out.secrets


# --- 3. limits.load_yaml: a value, a LimitError or a YAMLError --------------------------------

YAML_TEXT = st.one_of(
    LINES_YAML,
    LINES_YAML,
    LINES_YAML,
    TOKEN_SOUP,
    st.text(),
    CONTROL_TEXT,
    NUMERIC_TEXT,
    values(AWS_FIELDS, AWS_REAL).map(dump),
    anchored(values(VAULT_FIELDS, VAULT_REAL)),
    HUGE,
    st.integers(1, 3000).map(lambda n: "- " * n + "x"),
)


@settings(max_examples=500, **COMMON)
@given(
    text=YAML_TEXT,
    loader=st.sampled_from([yaml.SafeLoader, yaml.BaseLoader, VaultLoader]),
)
def test_load_yaml_returns_or_raises_limit_or_yaml_errors(text: str, loader: Any) -> None:
    with contextlib.suppress(limits.LimitError, yaml.YAMLError):
        limits.load_yaml(text, loader)
