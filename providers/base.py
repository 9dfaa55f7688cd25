"""The provider interface.

A provider turns a SecretProviderClass's ``parameters`` (a flat string map, with provider-owned YAML
inside some keys) into a :class:`Plan`: the files of the volume, each naming the *source* object it
is read from. The daemon then asks the provider to fetch sources, with the caller's
:class:`Identity`, and caches what comes back.

Providers are plain synchronous code: no trio, no FUSE, no gRPC servers (an SDK may use gRPC as its
transport). The daemon calls ``fetch_sync`` in a worker thread under a per-provider concurrency
limit, so every blocking SDK call here must carry its own timeout (cancellation cannot interrupt a
thread).

Nothing raised from here may carry secret bytes or tokens in its message: messages are logged and
shown to users (``FailedMount`` events, the ``mount`` command's error).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from providers.limits import quote

DEFAULT_MODE = 0o644

# SDK-level timeouts shared by every provider, in seconds. A worker thread stuck in a call cannot be
# cancelled, so these bound how long a read or a publish can wait on one backend round trip.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 15.0

# Same limits as the kubelet's AtomicWriter, which upstream uses to write provider files.
MAX_PATH_ELEMENT = 255
MAX_PATH = 4096


@dataclass(frozen=True)
class Problem:
    """One thing wrong in the parameters; ``obj`` is None for a top-level parameter."""

    obj: str | None
    field: str
    message: str

    def __str__(self) -> str:
        # Names and messages may quote what a user wrote: escaped and cut (limits.quote).
        message = self.message if len(self.message) <= 400 else self.message[:400] + "..."
        if self.obj is None:
            return f"parameter {quote(self.field)}: {message}"
        return f"object {quote(self.obj)}: field {quote(self.field)}: {message}"


# Problems listed in one error message; the rest are counted.
MAX_PROBLEMS_SHOWN = 25


class ParameterError(ValueError):
    """The parameters cannot be used; carries every problem found, not just the first."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__(self.summary())

    def summary(self) -> str:
        shown = "; ".join(str(p) for p in self.problems[:MAX_PROBLEMS_SHOWN])
        more = len(self.problems) - MAX_PROBLEMS_SHOWN
        return shown + (f"; and {more} more problem(s)" if more > 0 else "")


class FetchError(Exception):
    """A backend could not deliver an object.

    ``transient`` is True for outages, timeouts and throttling (worth retrying later, and a cached
    value may still be served); False for answers that will not change by themselves (not found,
    access denied, bad version). ``code`` is a short stable reason used in metrics and logs.
    """

    def __init__(self, obj: str, message: str, *, transient: bool, code: str = "ProviderError"):
        self.obj = obj
        self.transient = transient
        self.code = code
        super().__init__(f"object {quote(obj)}: {message}")


@dataclass(frozen=True, slots=True, weakref_slot=True)
class FileSpec:
    """One file of a volume.

    ``source`` names what to fetch in the provider's own terms; it must be hashable and is part of
    the cache key, so two files reading the same source share one fetch. ``select`` is an optional
    provider-defined transformation applied to the fetched bytes (a JMESPath, a JSON key, a
    decoding); the provider applies it in :meth:`Provider.render`. ``dynamic`` sources (Vault
    PUT/POST, database credentials, certificates being issued) are fetched once per volume and never
    shared or re-fetched on a timer.
    """

    path: str
    mode: int
    source: Hashable
    object_name: str
    select: Hashable | None = None
    dynamic: bool = False


@dataclass(frozen=True)
class Plan:
    """A parsed volume: its files and the provider parameters that decide which credentials apply.

    ``auth`` holds the identity-relevant parameters (region, role, tenant, vault address and role,
    ...); it is part of every cache key, so volumes share cached values only when it is equal.
    ``ttl`` is the SecretProviderClass's own TTL in seconds (annotation ``secretfs.io/ttl``, set
    by ``secretfs.spc.plan``, never by a provider); None: the node's default.
    """

    provider: str
    files: tuple[FileSpec, ...]
    auth: Hashable = ()
    ttl: float | None = None
    # What ``secretfs check`` shows as warnings: not errors, but what the volume depends on
    # that only a node knows (e.g. where an AWS region without a ``region`` parameter comes from).
    notes: tuple[str, ...] = field(default=(), compare=False)

    def sources(self) -> list[Hashable]:
        """The distinct sources of the plan, in file order."""
        return list(dict.fromkeys(f.source for f in self.files))


@dataclass(frozen=True)
class NodeInfo:
    """What the csi process read about the node a volume is published on, for the providers that
    take defaults from it (:class:`NodeAware`); the ``add`` request carries it as ``node``.

    ``region``: the Node's ``topology.kubernetes.io/region`` label ("" if unknown); ``problem``
    says why it is unknown (label missing, Node unreadable). ``offline`` is ``secretfs check``:
    no node yet, so a provider notes where such a default will come from instead of failing.
    """

    name: str = ""
    region: str = ""
    problem: str = ""
    offline: bool = False


OFFLINE = NodeInfo(offline=True)


@dataclass(frozen=True)
class Lease:
    """A backend lease on dynamic material (Vault database credentials, PKI certificates)."""

    lease_id: str = field(repr=False)
    duration: float  # seconds from the fetch
    renewable: bool


@dataclass(frozen=True)
class Fetched:
    """Bytes of one source and the version the backend reported for them."""

    data: bytes = field(repr=False)
    version: str
    lease: Lease | None = None


@dataclass(frozen=True)
class Token:
    """A service-account token the kubelet issued for one audience."""

    token: str = field(repr=False)
    expiration: str | None = None


@dataclass(frozen=True)
class Identity:
    """Who a fetch is for.

    In CSI mode: the pod's namespace and service account, its tokens and the volume's
    ``nodePublishSecretRef`` data. In standalone mode: nothing, meaning the daemon's own ambient
    credentials. :meth:`key` is what the cache uses; it never contains token or secret bytes, only a
    digest of the secret-ref data (two pods with different credentials must not share values).
    """

    namespace: str | None = None
    service_account: str | None = None
    pod_name: str | None = None
    pod_uid: str | None = None
    tokens: Mapping[str, Token] = field(default_factory=dict, repr=False, compare=False)
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    sa_annotations: Mapping[str, str] = field(default_factory=dict, compare=False)

    def key(self) -> Hashable:
        digest = ""
        if self.secrets:
            h = hashlib.sha256()
            for k in sorted(self.secrets):
                h.update(k.encode() + b"\0" + self.secrets[k].encode() + b"\0")
            digest = h.hexdigest()
        return (
            self.namespace,
            self.service_account,
            tuple(sorted(self.sa_annotations.items())),
            digest,
        )

    @property
    def ambient(self) -> bool:
        return self.namespace is None

    def token_for(self, audience: str, obj: str) -> str:
        """The pod's token for ``audience``, or a FetchError telling the operator what to add."""
        tok = self.tokens.get(audience)
        if tok is None:
            have = ", ".join(sorted(repr(a) for a in self.tokens)) or "none"
            raise FetchError(
                obj,
                f"no service-account token for audience {quote(audience)} (have: {have}); add "
                f"{{audience: {audience}}} to tokenRequests of the CSIDriver "
                "secrets-store.csi.k8s.io",
                transient=False,
                code="MissingToken",
            )
        return tok.token


AMBIENT = Identity()


class Provider(Protocol):
    """What every backend module offers; see the module docstring."""

    name: str
    # How many fetch_sync calls may run at once for this provider (threads).
    max_concurrency: int

    def parse(self, parameters: Mapping[str, str], default_mode: int = DEFAULT_MODE) -> Plan:
        """Validate ``parameters`` and plan the files, raising ParameterError with every problem."""
        ...

    def fetch_sync(
        self, plan: Plan, identity: Identity, sources: Sequence[Hashable]
    ) -> Mapping[Hashable, Fetched | FetchError]:
        """Fetch ``sources`` (a subset of ``plan.sources()``); one result per source.

        Runs in a worker thread. A failure of one source is returned as its FetchError so the others
        still arrive; an exception raised instead fails all of them.
        """
        ...

    def render(self, spec: FileSpec, value: Fetched) -> bytes:
        """The file's content from its source's value (applies ``spec.select``)."""
        ...


class IdentityReleaser(Protocol):
    """Optional extra of a provider that caches per identity (credentials, clients, tokens):
    the daemon calls it, in a worker thread, when the last volume of an identity goes, so memory
    follows what is mounted. ``identity_key`` is :meth:`Identity.key`."""

    def release_identity(self, identity_key: Hashable) -> None: ...


class NodeAware(Protocol):
    """Optional extra of a provider whose parameters may default to facts of the node (the AWS
    region from the node's label, as upstream): ``secretfs.spc.plan`` calls this instead of
    ``parse`` when it has a :class:`NodeInfo`. Other providers never see node facts."""

    def parse_on_node(
        self, parameters: Mapping[str, str], default_mode: int, node: NodeInfo
    ) -> Plan: ...


class Expanding(Protocol):
    """Optional extra of a provider whose files are only known from its answer (external provider
    plugins: upstream's Mount returns the whole volume). ``parse`` plans no files; the daemon
    calls ``expand_sync`` (in a worker thread) when the volume is added, for the plan with its
    files and their first values by source, sending ``target`` (where the volume is published).
    ``replan`` rebuilds that plan from its recorded ``[[path, mode], ...]`` without a call (a new
    daemon generation restoring a volume); ValueError if the record is unusable."""

    def expand_sync(
        self, plan: Plan, identity: Identity, target: str
    ) -> tuple[Plan, dict[Hashable, Fetched]]: ...

    def replan(self, plan: Plan, files: object, target: str) -> Plan: ...


class LeaseManager(Protocol):
    """Optional extra of a provider whose dynamic sources carry leases (see :class:`Lease`).

    The daemon renews a renewable lease while the volume that holds it is mounted and, when the
    operator enables it, revokes it when the volume goes away. Both run in a worker thread.
    """

    def renew_sync(self, plan: Plan, identity: Identity, lease: Lease) -> Lease: ...

    def revoke_sync(self, plan: Plan, identity: Identity, lease: Lease) -> None: ...


# --- helpers shared by the provider modules -------------------------------------------------------


def check_path(path: str, obj: str | None, fld: str) -> list[Problem]:
    """Problems with a file path a user chose (alias, file name): relative, no '..', sane length."""
    problems: list[Problem] = []

    def bad(msg: str) -> None:
        problems.append(Problem(obj, fld, msg))

    if not path:
        bad("file path is empty")
        return problems
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        bad(f"file path {quote(path)} contains a control character (newline, tab, NUL, ...)")
    if path.startswith("/"):
        bad(f"file path {quote(path)} must be relative (no leading '/')")
    parts = path.split("/")
    if any(p == ".." for p in parts):
        bad(f"file path {quote(path)} must not contain a '..' element")
    elif path.startswith(".."):
        bad(f"file path {quote(path)} must not start with '..'")
    if any(p in ("", ".") for p in parts) and not path.startswith("/"):
        bad(f"file path {quote(path)} has an empty or '.' element")
    if len(path.encode()) > MAX_PATH:
        bad(f"file path is longer than {MAX_PATH} bytes")
    if any(len(p.encode()) > MAX_PATH_ELEMENT for p in parts):
        bad(f"a path element is longer than {MAX_PATH_ELEMENT} bytes")
    return problems


_OCTAL = re.compile(r"^0?[0-7]{3}$|^0o[0-7]{3}$")
_OCTAL4 = re.compile(r"^[0-7]{4}$")
_OCTAL_DIGITS = re.compile(r"^[0-7]{1,4}$")
_OCTAL_0O = re.compile(r"^0o[0-7]{1,3}$")
_SPECIAL_BITS = "has set-uid, set-gid or sticky bits; a secret file takes 0000-0777 (e.g. 0640)"


def parse_mode(value: object, obj: str | None, fld: str, problems: list[Problem]) -> int | None:
    """A file mode given as an octal string ("0640", "640", "0o640") or a YAML int (decimal 0-511,
    which is also what YAML makes of an unquoted 0640). Lenient: for test providers; each real
    provider reads its mode field exactly as its upstream does (the functions below)."""
    if isinstance(value, bool):
        problems.append(Problem(obj, fld, 'must be an octal mode such as "0640"'))
        return None
    if isinstance(value, int):
        if 0 <= value <= 0o777:
            return value
        problems.append(Problem(obj, fld, f"mode {value} is outside 0-0777"))
        return None
    if isinstance(value, str) and _OCTAL.match(value.strip()):
        return int(value.strip().removeprefix("0o"), 8)
    problems.append(Problem(obj, fld, f'{quote(value)} is not an octal mode such as "0640"'))
    return None


def parse_mode_four_octal(
    value: object, obj: str | None, fld: str, problems: list[Problem]
) -> int | None:
    """AWS's ``filePermission``: a string of exactly four octal digits. Upstream decodes YAML with
    sigs.k8s.io/yaml, which turns an unquoted number into its decimal text (``0640`` -> "416",
    ``500`` -> "500") and then refuses it; so do we, saying why."""
    if isinstance(value, str) and _OCTAL4.match(value):
        mode = int(value, 8)
        if mode > 0o777:
            problems.append(Problem(obj, fld, f"{quote(value)} {_SPECIAL_BITS}"))
            return None
        return mode
    hint = ""
    shown = quote(value)
    if isinstance(value, int) and not isinstance(value, bool):
        shown = str(value)
        hint = (
            f" (unquoted, YAML reads it as the number {value}, which is not an octal mode; "
            "quote it)"
        )
    problems.append(
        Problem(obj, fld, f'{shown} must be a quoted four-digit octal mode such as "0640"' + hint)
    )
    return None


def parse_mode_octal_text(
    value: object, obj: str | None, fld: str, problems: list[Problem]
) -> int | None:
    """Azure's ``filePermission``: the text as written (quoted or not), read as octal digits."""
    text = str(value).strip()
    if not _OCTAL_DIGITS.match(text):
        problems.append(Problem(obj, fld, f'{quote(value)} is not an octal mode such as "0640"'))
        return None
    mode = int(text, 8)
    if mode > 0o777:
        problems.append(Problem(obj, fld, f"{quote(value)} {_SPECIAL_BITS}"))
        return None
    return mode


def parse_mode_number(
    value: object, obj: str | None, fld: str, problems: list[Problem]
) -> int | None:
    """GCP's ``mode`` and Vault's ``filePermission``: a YAML number, as upstream's int fields take
    it: ``0640`` (leading 0) and ``0o640`` are octal, ``416`` is decimal (so ``500`` is 0764, as
    upstream reads it), a quoted string is refused."""
    if isinstance(value, str) and _OCTAL_0O.match(value.strip()):
        value = int(value.strip()[2:], 8)  # yaml.v3 reads 0o640 as a number; PyYAML does not
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(
            Problem(
                obj,
                fld,
                f"{quote(value)} must be an unquoted number: 0640 (octal, leading 0) or 416 "
                "(decimal)",
            )
        )
        return None
    if not 0 <= value <= 0o777:
        problems.append(Problem(obj, fld, f"mode {value} is outside 0-0777 (0-511 decimal)"))
        return None
    return value


def check_files(files: Iterable[FileSpec]) -> list[Problem]:
    """Problems across files: duplicate paths, and a path that is both a file and a directory."""
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for f in files:
        if len(f.path) > MAX_PATH:
            continue  # check_path reported it; its prefixes would cost time quadratic in depth
        if f.path in seen:
            problems.append(
                Problem(
                    f.object_name,
                    "path",
                    f"file {quote(f.path)} is also produced by object {quote(seen[f.path])}; "
                    "give one of them a different alias",
                )
            )
        else:
            seen[f.path] = f.object_name
    for path, obj in seen.items():
        parts = path.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in seen:
                problems.append(
                    Problem(
                        obj,
                        "path",
                        f"file {quote(path)} needs directory {quote(prefix)}, which is a file "
                        f"of object {quote(seen[prefix])}",
                    )
                )
    return problems
