"""An in-process provider for unit tests of the daemon (cache, volumes, FUSE handlers).

Parameters: ``objects``, a YAML list of ``{name, path?, mode?, dynamic?}``. Values live in
``FakeProvider.values`` (name -> bytes); ``fail`` maps a name to a FetchError to return instead.
Every fetch is counted in ``calls``. Register it with the ``fake_provider`` fixture.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import yaml

from providers.base import (
    DEFAULT_MODE,
    Fetched,
    FetchError,
    FileSpec,
    Identity,
    ParameterError,
    Plan,
    Problem,
    check_files,
    check_path,
    parse_mode,
)


class FakeProvider:
    name = "fake"
    max_concurrency = 4

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.versions: Counter[str] = Counter()
        self.fail: dict[str, FetchError] = {}
        self.calls: Counter[str] = Counter()
        self.identities: list[Identity] = []
        self.lock = threading.Lock()
        self.gate: threading.Event | None = None  # when set, fetches wait for it
        self.released: list[Hashable] = []  # identity keys release_identity was called with

    def set(self, name: str, value: bytes) -> None:
        with self.lock:
            self.values[name] = value
            self.versions[name] += 1

    def parse(self, parameters: Mapping[str, str], default_mode: int = DEFAULT_MODE) -> Plan:
        problems: list[Problem] = []
        objs = yaml.safe_load(parameters.get("objects", "")) or []
        files = []
        for o in objs:
            name = o["name"]
            path = o.get("path", name)
            problems += check_path(path, name, "path")
            mode = parse_mode(o.get("mode", default_mode), name, "mode", problems)
            files.append(
                FileSpec(path, mode or 0, ("fake", name), name, None, bool(o.get("dynamic")))
            )
        problems += check_files(files)
        if problems:
            raise ParameterError(problems)
        return Plan("fake", tuple(files), ("fake-auth", parameters.get("auth", "")))

    def fetch_sync(
        self, plan: Plan, identity: Identity, sources: Sequence[Hashable]
    ) -> Mapping[Hashable, Fetched | FetchError]:
        if self.gate is not None:
            self.gate.wait(10)
        out: dict[Hashable, Fetched | FetchError] = {}
        with self.lock:
            self.identities.append(identity)
            for src in sources:
                assert isinstance(src, tuple)
                name = src[1]
                self.calls[name] += 1
                if name in self.fail:
                    out[src] = self.fail[name]
                elif name not in self.values:
                    out[src] = FetchError(name, "not found", transient=False, code="NotFound")
                else:
                    out[src] = Fetched(self.values[name], f"v{self.versions[name]}")
        return out

    def release_identity(self, identity_key: Hashable) -> None:
        self.released.append(identity_key)

    def render(self, spec: FileSpec, value: Fetched) -> bytes:
        return value.data
