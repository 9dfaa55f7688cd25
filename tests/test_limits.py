"""Untrusted SecretProviderClass and pod input is bounded before any expensive work.

One daemon serves the node: a class author or a pod author (volume attributes override class
parameters) must get a clear error naming the limit, fast, and nothing else may happen.
"""

from __future__ import annotations

import pytest
import yaml

from providers import limits
from providers.base import ParameterError, check_path
from secretfs import spc as spc_mod

# Each provider's list parameter, with one well-formed item and the shape around it.
LISTS = {
    "aws": ("objects", '- objectName: "{name}"\n  objectType: secretsmanager\n'),
    "azure": ("objects", 'array:\n  - |\n    objectName: "{name}"\n    objectType: secret\n'),
    "gcp": (
        "secrets",
        '- resourceName: "projects/p/secrets/{name}/versions/1"\n  path: "{name}"\n',
    ),
    "vault": ("objects", '- objectName: "{name}"\n  secretPath: "secret/data/{name}"\n'),
}
BASE = {
    "aws": {"region": "eu-west-1"},
    "azure": {"keyvaultName": "kv-test", "tenantId": "t", "usePodIdentity": "false"},
    "gcp": {},
    "vault": {"roleName": "r", "vaultAddress": "https://vault:8200"},
}


def spc(provider: str, **params: str) -> spc_mod.SecretProviderClass:
    return spc_mod.SecretProviderClass("c", "ns", provider, {**BASE[provider], **params})


def bomb(levels: int = 9) -> str:
    """A "billion laughs" document: a few hundred bytes, 9**9 leaves when expanded."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    lines.append(f"objects: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def refused(s: spc_mod.SecretProviderClass, attributes: dict[str, str] | None = None) -> str:
    with pytest.raises(ParameterError) as info:
        spc_mod.plan(s, attributes)
    message = str(info.value)
    assert len(message) < 2000, "an error message must not echo the input whole"
    return message


@pytest.mark.parametrize("provider", sorted(LISTS))
def test_alias_bomb_is_refused_naming_the_limit(provider: str) -> None:
    field, _ = LISTS[provider]
    text = bomb()
    assert len(text) < 1000
    message = refused(spc(provider, **{field: text}))
    assert f"expands to more than {limits.MAX_YAML_NODES} YAML nodes" in message
    # A pod author can send the same through volumeAttributes, which override the class.
    message = refused(spc(provider), {field: text})
    assert "YAML nodes" in message


@pytest.mark.parametrize("provider", sorted(LISTS))
def test_oversized_and_overdeep_documents_are_refused(provider: str) -> None:
    field, item = LISTS[provider]
    one = item.format(name="x")
    huge = one * (limits.MAX_PARAMETER_BYTES // len(one) + 10)
    assert f"at most {limits.MAX_PARAMETER_BYTES}" in refused(spc(provider, **{field: huge}))
    deep = "[" * 5000 + "]" * 5000
    assert "nested more than" in refused(spc(provider, **{field: deep}))


def test_too_many_parameters_or_bytes_together() -> None:
    many = {f"k{i}": "v" for i in range(limits.MAX_PARAMETERS + 1)}
    assert f"at most {limits.MAX_PARAMETERS}" in refused(spc("aws", **many))
    chunk = "v" * (limits.MAX_PARAMETER_BYTES - 100)
    split = {f"p{i}": chunk for i in range(3)}
    assert f"at most {limits.MAX_PARAMETERS_BYTES}" in refused(spc("aws", **split))


def test_too_many_files() -> None:
    _, item = LISTS["aws"]
    text = "".join(item.format(name=f"s{i}") for i in range(limits.MAX_FILES + 1))
    message = refused(spc("aws", objects=text))
    assert f"at most {limits.MAX_FILES} per volume" in message
    # The limit itself is fine.
    text = "".join(item.format(name=f"s{i}") for i in range(limits.MAX_FILES))
    assert len(spc_mod.plan(spc("aws", objects=text)).files) == limits.MAX_FILES


def test_anchors_within_the_limit_still_work() -> None:
    # Kubernetes' own YAML decoding allows modest aliasing; so do we.
    text = (
        "- &first\n  objectName: one\n  objectType: secretsmanager\n"
        "- objectName: two\n  objectType: secretsmanager\n"
    )
    assert [f.path for f in spc_mod.plan(spc("aws", objects=text)).files] == ["one", "two"]
    assert limits.load_yaml("a: &x [1, 2]\nb: *x\n") == {"a": [1, 2], "b": [1, 2]}


@pytest.mark.parametrize("name", ["two\nlines", "tab\there", "nul\x00", "bell\x07", "del\x7f"])
def test_control_characters_in_file_names_are_refused(name: str) -> None:
    problems = check_path(name, "obj", "objectAlias")
    assert problems and "control character" in str(problems[0])
    assert "\n" not in str(problems[0]) and "\x00" not in str(problems[0])
    text = f'- objectName: "x"\n  objectType: secretsmanager\n  objectAlias: {yaml.dump(name)}'
    assert "control character" in refused(spc("aws", objects=text))


def test_long_names_are_cut_in_messages() -> None:
    name = "n" * 100_000
    text = f"- objectName: {name}\n  objectType: nonsense\n"
    message = refused(spc("aws", objects=text))
    assert "100000 characters" in message and len(message) < 2000


def test_quote_escapes_and_cuts() -> None:
    assert limits.quote("a\nb") == "'a\\nb'"
    long = limits.quote("x" * 500, limit=10)
    assert long.startswith("'xxxxxxxxxx'") and "500 characters" in long


def test_azure_negative_version_history_is_refused() -> None:
    text = (
        "array:\n  - |\n    objectName: s\n    objectType: secret\n    objectVersionHistory: -1\n"
    )
    assert "negative" in refused(spc("azure", objects=text))


# Found by tests/test_properties.py; kept as plain cases.


@pytest.mark.parametrize(
    "text", ["0b_", "!!int x", "!!float ", "!!bool x", "!!timestamp x", "- " + "9" * 4301]
)
@pytest.mark.parametrize("provider", ["aws", "gcp", "vault"])
def test_unreadable_yaml_values_are_parameter_errors(provider: str, text: str) -> None:
    field, _ = LISTS[provider]
    assert "YAML" in refused(spc(provider, **{field: text}))


@pytest.mark.parametrize("history", ["\u00b2", "--1", "9" * 4301])
def test_azure_version_history_that_is_no_number(history: str) -> None:
    text = (
        "array:\n  - |\n    objectName: s\n    objectType: secret\n"
        f"    objectVersionHistory: {history}\n"
    )
    assert "not a number of versions" in refused(spc("azure", objects=text))


def test_vault_address_that_urlsplit_refuses() -> None:
    assert "vaultAddress" in refused(spc("vault", vaultAddress="http://["))


def test_derived_paths_are_checked_too() -> None:
    # Azure appends "/<index>" to each version of a history: the result must still be a path.
    alias = "a/" * 2047 + "a"
    text = (
        "array:\n  - |\n    objectName: s\n    objectType: secret\n"
        f"    objectAlias: {alias}\n    objectVersionHistory: 3\n"
    )
    assert "longer than 4096 bytes" in refused(spc("azure", objects=text))


def test_quote_bounds_the_output_not_only_the_input() -> None:
    shown = limits.quote("\U000e0001" * 300, limit=120)
    assert len(shown) < 200
