"""The external provider: see the package's docstring."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from providers.base import (
    DEFAULT_MODE,
    MAX_PATH,
    Fetched,
    FetchError,
    FileSpec,
    Identity,
    Plan,
    check_files,
    check_path,
)
from providers.limits import MAX_FILES, quote
from providers.plugin.client import Connection
from providers.plugin.pb import service_pb2
from providers.plugin.settings import NAME, NAME_RULE, current

log = logging.getLogger(__name__)

TOKENS_KEY = "csi.storage.k8s.io/serviceAccount.tokens"
# A version string longer than this is replaced by its digest (it is part of every status object).
MAX_VERSION = 256
# (volume parameters, identity) pairs whose last object versions are remembered, to send back as
# current_object_version.
MAX_REMEMBERED = 4096
# What upstream requires of a response, said when a provider does not do it.
LEGACY = (
    "returned no file contents: it writes the files to the target path itself (a legacy "
    "provider). secretfs never lets a provider write to disk and serves only the files a "
    "provider returns in its Mount answer ('files'); configure the provider to return them to "
    "the driver (for the AWS provider: driverWritesSecrets: true)"
)


@dataclass(frozen=True)
class PluginAuth:
    """A volume's request parameters. Equal (as part of cache keys) when the parameters and the
    default mode are: only then may two volumes of one identity share what the provider said."""

    digest: str
    parameters: Mapping[str, str] = field(compare=False, repr=False)
    permission: int = field(default=DEFAULT_MODE, compare=False)
    target: str = field(default="", compare=False)


@dataclass(frozen=True)
class _Answer:
    files: tuple[tuple[str, int, bytes], ...] = field(repr=False)
    versions: tuple[tuple[str, str], ...]


def _digest(parameters: Mapping[str, str], mode: int) -> str:
    h = hashlib.sha256(str(mode).encode() + b"\0")
    for k in sorted(parameters):
        h.update(k.encode("utf-8", "surrogatepass") + b"\0")
        h.update(parameters[k].encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def _version(text: str) -> str:
    if len(text) <= MAX_VERSION:
        return text
    return "sha256-" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class PluginProvider:
    """One external provider (``name``), reached over its socket."""

    max_concurrency = 8

    def __init__(self, name: str) -> None:
        if not NAME.fullmatch(name):
            raise ValueError(f"provider name {quote(name)} does not match {NAME_RULE}")
        self.name = name
        self.connection = Connection(name)
        self._lock = threading.Lock()
        self._told: set[str] = set()
        self._seen: OrderedDict[tuple[str, Hashable], tuple[tuple[str, str], ...]] = OrderedDict()

    # --- plan ---------------------------------------------------------------------------------

    def parse(self, parameters: Mapping[str, str], default_mode: int = DEFAULT_MODE) -> Plan:
        auth = PluginAuth(_digest(parameters, default_mode), dict(parameters), default_mode)
        s = current()
        note = (
            f"the files are what the {self.name} provider returns when the volume is mounted "
            f"(its socket {self.name}.sock in {' or '.join(s.dirs)})"
        )
        return Plan(provider=self.name, files=(), auth=auth, notes=(note,))

    def expand_sync(
        self, plan: Plan, identity: Identity, target: str = ""
    ) -> tuple[Plan, dict[Hashable, Fetched]]:
        """One ``Mount``: the volume's files and their values (runs in a worker thread)."""
        auth = self._auth(plan)
        if target:
            auth = replace(auth, target=target)
        answer = self._mount(auth, identity)
        files = tuple(FileSpec(p, mode, p, p) for p, mode, _ in answer.files)
        values: dict[Hashable, Fetched] = {
            p: Fetched(data, self._file_version(p, answer.versions)) for p, _, data in answer.files
        }
        return replace(plan, files=files, auth=auth), values

    def replan(self, plan: Plan, files: Any, target: str = "") -> Plan:
        """The expanded plan of a volume from its recorded ``[[path, mode], ...]`` (a new daemon
        generation rebuilds it without a call); ValueError if the record is not usable."""
        if not isinstance(files, list) or len(files) > MAX_FILES:
            raise ValueError("the recorded files of a plugin volume are not a list")
        specs = []
        for item in files:
            if not (isinstance(item, list | tuple) and len(item) == 2):
                raise ValueError("a recorded file is not [path, mode]")
            path, mode = item
            if (
                not isinstance(path, str)
                or check_path(path, None, "path")
                or not isinstance(mode, int)
                or not 0 <= mode <= 0o777
            ):
                raise ValueError("a recorded file has a bad path or mode")
            specs.append(FileSpec(path, mode, path, path))
        auth = self._auth(plan)
        return replace(plan, files=tuple(specs), auth=replace(auth, target=target or auth.target))

    def _auth(self, plan: Plan) -> PluginAuth:
        if not isinstance(plan.auth, PluginAuth):
            raise FetchError(self.name, "not a plan of a provider plugin", transient=False)
        return plan.auth

    # --- fetch --------------------------------------------------------------------------------

    def fetch_sync(
        self, plan: Plan, identity: Identity, sources: Sequence[Hashable]
    ) -> Mapping[Hashable, Fetched | FetchError]:
        answer = self._mount(self._auth(plan), identity)
        by_path = {p: data for p, _, data in answer.files}
        out: dict[Hashable, Fetched | FetchError] = {}
        for source in sources:
            path = str(source)
            data = by_path.get(path)
            if data is None:
                out[source] = FetchError(
                    path,
                    f"the {self.name} provider no longer returns this file",
                    transient=False,
                    code="NotFound",
                )
            else:
                out[source] = Fetched(data, self._file_version(path, answer.versions))
        extra = len(set(by_path) - {str(s) for s in plan.sources()})
        if extra and self._first_time(plan):
            log.info(
                "provider %s returned %d file(s) the volume did not have when it was mounted; "
                "they appear when it is mounted again",
                self.name,
                extra,
            )
        return out

    def _first_time(self, plan: Plan) -> bool:
        """True once per volume parameters (what is said once, not at every refresh)."""
        digest = self._auth(plan).digest
        with self._lock:
            if digest in self._told:
                return False
            if len(self._told) >= MAX_REMEMBERED:
                self._told.clear()
            self._told.add(digest)
            return True

    def render(self, spec: FileSpec, value: Fetched) -> bytes:
        return value.data

    def release_identity(self, identity_key: Hashable) -> None:
        with self._lock:
            for k in [k for k in self._seen if k[1] == identity_key]:
                del self._seen[k]

    @staticmethod
    def _file_version(path: str, versions: tuple[tuple[str, str], ...]) -> str:
        """A file's version: its object's (the ObjectVersion whose id is the path, or the only
        one); else a digest of every object's version (any of them changing changes it)."""
        for oid, version in versions:
            if oid == path:
                return version
        if len(versions) == 1:
            return versions[0][1]
        h = hashlib.sha256()
        for oid, version in sorted(versions):
            h.update(oid.encode("utf-8", "surrogatepass") + b"\0" + version.encode() + b"\0")
        return "objects-" + h.hexdigest()[:16]

    def _request(self, auth: PluginAuth, identity: Identity) -> tuple[Any, list[str]]:
        attributes = dict(auth.parameters)
        scrub = [v for v in identity.secrets.values()]
        if identity.tokens:
            tokens: dict[str, dict[str, str]] = {}
            for audience, tok in identity.tokens.items():
                entry = {"token": tok.token}
                if tok.expiration:
                    entry["expirationTimestamp"] = tok.expiration
                tokens[audience] = entry
                scrub.append(tok.token)
            attributes[TOKENS_KEY] = json.dumps(tokens)
        with self._lock:
            seen = self._seen.get((auth.digest, identity.key()), ())
        request = service_pb2.MountRequest(
            attributes=json.dumps(attributes),
            secrets=json.dumps(dict(identity.secrets)),
            target_path=auth.target or "/",
            permission=json.dumps(auth.permission),
            current_object_version=[
                service_pb2.ObjectVersion(id=oid, version=v) for oid, v in seen
            ],
        )
        return request, scrub

    def _mount(self, auth: PluginAuth, identity: Identity) -> _Answer:
        request, scrub = self._request(auth, identity)
        response = self.connection.mount(request, current(), scrub)
        answer = self._check(response)
        key = (auth.digest, identity.key())
        with self._lock:
            self._seen[key] = answer.versions
            self._seen.move_to_end(key)
            while len(self._seen) > MAX_REMEMBERED:
                self._seen.popitem(last=False)
        return answer

    def _fail(self, message: str, code: str, transient: bool = False) -> FetchError:
        return FetchError(
            self.name, f"the {self.name} provider {message}", transient=transient, code=code
        )

    def _check(self, response: Any) -> _Answer:
        """The response's files and versions, every untrusted part bounded and checked."""
        code = response.error.code if response.HasField("error") else ""
        if code:
            return self._error_code(code)
        if not response.files:
            raise self._fail(LEGACY, "LegacyProvider")
        if len(response.files) > MAX_FILES:
            raise self._fail(
                f"returned {len(response.files)} files; at most {MAX_FILES} per volume",
                "TooManyFiles",
            )
        if not response.object_version:
            # As upstream, which fails such a mount ("missing object versions").
            raise self._fail("returned files but no object versions", "BadResponse")
        if len(response.object_version) > MAX_FILES:
            raise self._fail(
                f"returned {len(response.object_version)} object versions; at most {MAX_FILES}",
                "BadResponse",
            )
        files: list[tuple[str, int, bytes]] = []
        problems: list[object] = []
        for f in response.files:
            path = f.path if len(f.path) <= MAX_PATH + 1 else f.path[: MAX_PATH + 1]
            problems += check_path(path, path, "path")
            if not 0 <= f.mode <= 0o777:
                problems.append(f"file {quote(path)}: mode {f.mode} is outside 0-511")
            files.append((path, f.mode, f.contents))
        specs = [FileSpec(p, m, p, p) for p, m, _ in files]
        problems += check_files(specs) if not problems else []
        if problems:
            shown = "; ".join(str(p) for p in problems[:5])
            more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
            raise self._fail(f"returned unusable files: {shown}{more}", "BadResponse")
        versions = tuple((_version(ov.id), _version(ov.version)) for ov in response.object_version)
        return _Answer(tuple(files), versions)

    def _error_code(self, code: str) -> _Answer:
        """The response's ``error.code`` (a provider-defined string, e.g. upstream's metric
        ``error_type``): a refusal if its words say so, else a transient failure."""
        low = code.lower()
        if "notfound" in low.replace("_", "").replace(" ", ""):
            kind, transient = "NotFound", False
        elif any(w in low for w in ("denied", "forbidden", "unauthori", "unauthenticated")):
            kind, transient = "PermissionDenied", False
        elif any(w in low for w in ("invalid", "badrequest", "bad_request")):
            kind, transient = "BadRequest", False
        else:
            kind, transient = "ProviderError", True
        raise self._fail(f"answered Mount with error code {quote(code, 80)}", kind, transient)
