"""Bounds on untrusted input, checked before any expensive work.

One daemon serves every volume of a node, so a SecretProviderClass author or a pod author (pod
volume attributes override SPC parameters) must not be able to stall or bloat it. Every string
from them is size-checked before it is parsed; YAML is read with its alias expansion counted (a
"billion laughs" document is a few hundred bytes that expand to billions of nodes) and its
nesting bounded; and whatever is quoted back in an error message or a log line is truncated and
escaped (:func:`quote`). The numbers are documented in the README ("Limits").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

# One parameter value (``objects``, ``secrets``, ...). Kubernetes objects are at most ~1.5 MiB;
# the largest real SPCs are a few KiB.
MAX_PARAMETER_BYTES = 256 * 1024
# All parameters and pod attributes of one volume together, and their number.
MAX_PARAMETERS_BYTES = 512 * 1024
MAX_PARAMETERS = 128
# Files one volume may produce (objects, jmesPath/extracted keys, version histories).
MAX_FILES = 1000
# YAML nodes after alias expansion, and nesting depth of YAML and JSON documents.
MAX_YAML_NODES = 50_000
MAX_DEPTH = 64
# Characters of a user-supplied string quoted in a message.
MAX_QUOTE = 120


class LimitError(ValueError):
    """Input over a limit; the message names the limit."""


def quote(value: object, limit: int = MAX_QUOTE) -> str:
    """``value`` for a message: escaped (control characters, quotes) and cut, so the result is
    at most about ``limit`` characters however many escapes the text needs."""
    text = value if isinstance(value, str) else str(value)
    shown = repr(text[:limit])
    if len(shown) > limit + 2:
        shown = shown[: limit + 1] + "...'"
    if len(text) > limit:
        shown += f"... ({len(text)} characters)"
    return shown


def size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def check_parameters(params: Mapping[str, str]) -> list[tuple[str, str]]:
    """(field, problem) for every bound the parameters break (empty when within bounds)."""
    out: list[tuple[str, str]] = []
    if len(params) > MAX_PARAMETERS:
        out.append(("parameters", f"{len(params)} parameters; at most {MAX_PARAMETERS}"))
    total = 0
    for key, value in params.items():
        n = size(key) + size(value)
        total += n
        if n > MAX_PARAMETER_BYTES:
            out.append((key[:MAX_QUOTE], f"is {n} bytes; at most {MAX_PARAMETER_BYTES}"))
    if total > MAX_PARAMETERS_BYTES and not out:
        out.append(("parameters", f"{total} bytes together; at most {MAX_PARAMETERS_BYTES}"))
    return out


# libyaml's parser where this PyYAML has it: the same documents, several times faster. But it
# holds the GIL for a whole document, which stalls every volume's reads while it runs (measured:
# ~100 ms for 250 KiB); the pure-Python parser lets the FUSE thread in every few milliseconds. So
# libyaml only for documents that parse in a few milliseconds.
FAST_PARSE_BYTES = 16 * 1024
_FAST: dict[type[Any], type[Any]] = (
    {yaml.SafeLoader: yaml.CSafeLoader, yaml.BaseLoader: yaml.CBaseLoader}
    if yaml.__with_libyaml__
    else {}
)


# The other way round, for a loader that is libyaml-based (Vault's).
_SLOW: dict[type[Any], type[Any]] = {}


def slow_twin(fast: type[Any], slow: type[Any]) -> None:
    """Register the pure-Python ``slow`` loader that reads large documents for ``fast``."""
    _SLOW[fast] = slow


def load_yaml(text: str, loader: type[Any] = yaml.SafeLoader) -> Any:
    """``yaml.load`` with bounds: size, nodes after alias expansion, nesting depth.

    The node graph is composed first (anchors stay shared there) and measured as if every alias
    were expanded, before anything is constructed; a document over a bound raises LimitError.
    """
    if size(text) > MAX_PARAMETER_BYTES:
        raise LimitError(f"is {size(text)} bytes; at most {MAX_PARAMETER_BYTES}")
    fast = size(text) <= FAST_PARSE_BYTES
    ld = (_FAST.get(loader, loader) if fast else _SLOW.get(loader, loader))(text)
    try:
        try:
            node = ld.get_single_node()
        except RecursionError:
            raise LimitError(f"is nested more than {MAX_DEPTH} levels deep") from None
        except yaml.YAMLError as exc:
            if "nesting depth" in str(getattr(exc, "problem", "")):  # libyaml's own bound
                raise LimitError(f"is nested more than {MAX_DEPTH} levels deep") from None
            raise
        if node is None:
            return None
        _measure(node)
        try:
            return ld.construct_document(node)
        except (ValueError, IndexError, KeyError, AttributeError, TypeError, OverflowError):
            # PyYAML's constructors raise these for values such as `!!int x`, `0b_`, a date
            # like 2001-13-01 or an integer of more than 4300 digits.
            raise yaml.constructor.ConstructorError(
                None, None, "a value cannot be read (a bad number, date or !!tag)", node.start_mark
            ) from None
    finally:
        ld.dispose()


def _measure(root: yaml.Node) -> None:
    """Nodes of ``root`` with every alias expanded (memoised per node, so linear in the graph)."""
    memo: dict[int, int] = {}

    def count(node: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise LimitError(f"is nested more than {MAX_DEPTH} levels deep")
        known = memo.get(id(node))
        if known is not None:
            return known
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += count(child, depth + 1)
                _check(total)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                total += count(key, depth + 1) + count(value, depth + 1)
                _check(total)
        memo[id(node)] = total
        return total

    count(root, 0)


def _check(total: int) -> None:
    if total > MAX_YAML_NODES:
        raise LimitError(
            f"expands to more than {MAX_YAML_NODES} YAML nodes (anchors and aliases count "
            "once per use)"
        )
