"""botocore clients and credentials for the AWS provider.

botocore directly, not boto3: boto3's session adds nothing clients need, and importing it costs
about as much again as botocore (it pulls in s3transfer); start-up time matters to
``secretfs mount`` (bench/startup.py).

Ambient identity (standalone mode) uses botocore's default credential chain. A pod identity uses
IRSA: the pod's token for audience ``sts.amazonaws.com`` and the role in its service account's
``eks.amazonaws.com/role-arn`` annotation go to STS AssumeRoleWithWebIdentity; or, with
``usePodIdentity: "true"``, EKS Pod Identity: the pod's ``pods.eks.amazonaws.com`` token goes to the
node's Pod Identity Agent. Temporary credentials are cached until 5 minutes before they expire.

Endpoints and ambient credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, profiles, IMDS, ...), read when a client is first created.

Thread-safety: botocore clients are thread-safe, a Session is not, so the one shared Session is
only touched under ``_lock``. One Session (not one per identity) keeps a single copy of the parsed
service models in memory; per-identity credentials are passed to ``Session.create_client``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import botocore.loaders
import botocore.session
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    DataNotFoundError,
    MetadataRetrievalError,
)
from botocore.httpsession import URLLib3Session
from botocore.utils import ContainerMetadataFetcher
from cachetools import LRUCache

from providers.aws.errors import map_error, redact
from providers.aws.params import AwsAuth
from providers.base import CONNECT_TIMEOUT, READ_TIMEOUT, FetchError, Identity

log = logging.getLogger(__name__)


def _no_debug(record: logging.LogRecord) -> bool:
    return record.levelno > logging.DEBUG


# At DEBUG these botocore loggers print request and response bodies and signed headers: secret
# values, web identity tokens, session tokens. Whatever level the daemon configures, their debug
# records are dropped where they are made (a filter on the logger itself, not on a handler).
WIRE_LOGGERS = (
    "botocore.endpoint",
    "botocore.parsers",
    "botocore.auth",
    "botocore.awsrequest",
    "botocore.httpsession",
    "botocore.utils",
    "botocore.credentials",
)
for _name in WIRE_LOGGERS:
    logging.getLogger(_name).addFilter(_no_debug)

IRSA_AUDIENCE = "sts.amazonaws.com"
IRSA_ROLE_ANNOTATION = "eks.amazonaws.com/role-arn"
POD_IDENTITY_AUDIENCE = "pods.eks.amazonaws.com"
# The EKS Pod Identity Agent's link-local addresses (as upstream); tests point these elsewhere.
POD_IDENTITY_ENDPOINTS = {
    "ipv4": "http://169.254.170.23/v1/credentials",
    "ipv6": "http://[fd00:ec2::23]/v1/credentials",
}
REFRESH_MARGIN = 300.0  # seconds before expiry at which cached credentials are renewed

CLIENT_CONFIG = Config(
    connect_timeout=CONNECT_TIMEOUT,
    read_timeout=READ_TIMEOUT,
    retries={"mode": "standard", "max_attempts": 3},
    user_agent_extra="secretfs",
)
# AssumeRoleWithWebIdentity is authenticated by the token alone; unsigned, botocore does not
# look for (or wait on IMDS for) node credentials the pod must never borrow anyway.
UNSIGNED_CONFIG = CLIENT_CONFIG.merge(Config(signature_version=UNSIGNED))


# The operations this provider calls, per service. botocore's endpoint data (endpoints.json: every
# partition x every AWS service) takes 6.7 MiB once decoded, kept for the process's life, and only
# these services' entries are ever read. Each service model keeps every operation and shape with
# its documentation: SSM's alone is 3.8 MiB decoded, 0.2 MiB with only GetParameters (tracemalloc,
# one client of each service: 5.5 -> 1.1 MiB in all).
OPERATIONS: dict[str, frozenset[str]] = {
    "secretsmanager": frozenset({"GetSecretValue"}),
    "ssm": frozenset({"GetParameters"}),
    "sts": frozenset({"AssumeRoleWithWebIdentity"}),
}
SERVICES = frozenset(OPERATIONS)


def _prune_model(model: dict[str, Any], keep: frozenset[str]) -> None:
    """Keep, in place, only the operations ``keep`` of a service model and the shapes they reach
    (inputs, outputs, errors, their members). Documentation is already gone (``_lean``)."""
    operations = model.get("operations")
    shapes = model.get("shapes")
    if not isinstance(operations, dict) or not isinstance(shapes, dict):
        return
    ops = {name: op for name, op in operations.items() if name in keep}
    todo = [
        ref["shape"]
        for op in ops.values()
        for ref in [op.get("input"), op.get("output"), *op.get("errors", ())]
        if isinstance(ref, dict) and "shape" in ref
    ]
    reached: set[str] = set()
    while todo:
        name = todo.pop()
        if name in reached or name not in shapes:
            continue
        reached.add(name)
        shape = shapes[name]
        refs = [shape.get(k) for k in ("member", "key", "value")]
        refs += list((shape.get("members") or {}).values())
        todo += [r["shape"] for r in refs if isinstance(r, dict) and "shape" in r]
    model["operations"] = ops
    model["shapes"] = {name: shapes[name] for name in reached}


def _lean(obj: dict[str, Any]) -> dict[str, Any]:
    """A JSON object of botocore's data as a plain dict (botocore decodes into OrderedDict, about
    twice the size), without documentation strings, and, for the endpoint data's per-partition
    service tables (many entries, each with its "endpoints"), only SERVICES. Decoding drops them
    as it goes, so the whole file is never held decoded at once: the daemon locks its memory, and
    every page such a peak touches stays resident (8.1 -> 4.4 MiB peak, tracemalloc, the three
    clients' data). An ``object_hook`` that edits the dict the decoder built costs less CPU than
    building a new one from its pairs (endpoints.json 35 -> 32 ms, SSM's model 21 -> 12 ms)."""
    if len(obj) > 20 and all(isinstance(v, dict) and "endpoints" in v for v in obj.values()):
        return {k: v for k, v in obj.items() if k in SERVICES}
    if isinstance(obj.get("documentation"), str):
        del obj["documentation"]
    return obj


class _FileLoader(botocore.loaders.JSONFileLoader):
    """botocore's JSON file loader, decoding with ``_lean``."""

    def _load_file(self, full_path: str, open_method: Any) -> Any:
        if not os.path.isfile(full_path):
            return None
        with open_method(full_path, "rb") as fp:
            payload = fp.read().decode("utf-8")
        return json.loads(payload, object_hook=_lean)


class _Loader(botocore.loaders.Loader):
    """botocore's data loader, knowing only SERVICES, keeping only their part of the endpoint data
    it loads and only the OPERATIONS of their service models (a client of a pruned model has only
    those methods)."""

    def load_service_model(
        self, service_name: str, type_name: str, api_version: str | None = None
    ) -> Any:
        model = super().load_service_model(service_name, type_name, api_version)
        keep = OPERATIONS.get(service_name)
        if type_name == "service-2" and keep is not None and isinstance(model, dict):
            _prune_model(model, keep)  # in place: the loader caches this very object
        return model

    @botocore.loaders.instance_cache
    def list_available_services(self, type_name: str) -> list[str]:
        """Which of SERVICES have ``type_name`` data: ``load_service_model`` checks the name it
        loads against this list. botocore's own walks every service's directory (~420; ~1,800
        stat and listdir calls, ~15 ms of CPU per type; a first client loads two types)."""
        found = []
        for service in sorted(SERVICES):
            try:
                self.list_api_versions(service, type_name)  # cached for load_service_model
            except DataNotFoundError:
                continue
            found.append(service)
        return found

    def load_data_with_path(self, name: str) -> Any:
        data, path = super().load_data_with_path(name)
        if name == "endpoints" and isinstance(data, dict):
            for partition in data.get("partitions") or ():
                services = partition.get("services") if isinstance(partition, dict) else None
                if isinstance(services, dict):
                    for service in [s for s in services if s not in SERVICES]:
                        del services[service]  # in place: the loader caches this very object
        return data, path


def _session() -> botocore.session.Session:
    session = botocore.session.get_session()
    # What botocore.loaders.create_loader does, with the loader above (AWS_DATA_PATH honoured).
    paths = session.get_config_variable("data_path")
    extra = (
        [os.path.expanduser(os.path.expandvars(p)) for p in paths.split(os.pathsep)]
        if paths
        else []
    )
    session.register_component(
        "data_loader", _Loader(extra_search_paths=extra, file_loader=_FileLoader())
    )
    return session


@dataclass(frozen=True)
class Creds:
    """Temporary credentials; ``expires`` is a time.time() value."""

    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    token: str = field(repr=False)
    expires: float


class _AgentFetcher(ContainerMetadataFetcher):
    # botocore retries every failure, 4xx included; fewer and shorter waits keep a denied
    # request from holding a worker thread for long.
    RETRY_ATTEMPTS = 2
    SLEEP_TIME = 0


def _session_name(identity: Identity) -> str:
    raw = f"secretfs-{identity.namespace or ''}-{identity.service_account or ''}"
    return re.sub(r"[^\w+=,.@-]", "-", raw)[:64]


def _expiry(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


class ClientCache:
    """Shared Session, clients per (service, region, credentials), credentials per identity."""

    def __init__(self, clock: Any = time.time) -> None:
        self._lock = threading.Lock()
        self._session: botocore.session.Session | None = None
        self._clients: LRUCache[Hashable, Any] = LRUCache(maxsize=256)
        self._creds: LRUCache[Hashable, Creds] = LRUCache(maxsize=1024)
        self._flights: dict[Hashable, threading.Lock] = {}
        self._clock = clock

    def client(
        self, service: str, region: str, creds: Creds | None, *, unsigned: bool = False
    ) -> Any:
        """A client; ``creds`` None means the ambient chain, ``unsigned`` means no credentials."""
        key = (service, region, creds, unsigned)
        with self._lock:
            cli = self._clients.get(key)
            if cli is None:
                if self._session is None:
                    self._session = _session()
                kwargs: dict[str, Any] = {}
                if creds is not None:
                    kwargs = {
                        "aws_access_key_id": creds.access_key,
                        "aws_secret_access_key": creds.secret_key,
                        "aws_session_token": creds.token,
                    }
                cli = self._session.create_client(
                    service,
                    region_name=region,
                    config=UNSIGNED_CONFIG if unsigned else CLIENT_CONFIG,
                    **kwargs,
                )
                self._clients[key] = cli
            return cli

    def forget_identity(self, identity_key: Hashable) -> int:
        """Drop the credentials of an identity and the clients built on them; how many."""
        with self._lock:
            gone = [k for k in self._creds if isinstance(k, tuple) and k[0] == identity_key]
            creds = {self._creds.pop(k) for k in gone}
            clients = [k for k in self._clients if isinstance(k, tuple) and k[2] in creds]
            for k in clients:
                self._clients.pop(k, None)
        return len(gone) + len(clients)

    def credentials(self, auth: AwsAuth, identity: Identity, region: str, obj: str) -> Creds | None:
        """Credentials for ``identity`` in ``region``; None means the ambient default chain.

        Raises FetchError (missing token or role annotation, STS or agent refusal or outage)."""
        if identity.ambient:
            return None
        if auth.use_pod_identity:
            token = identity.token_for(POD_IDENTITY_AUDIENCE, obj)
            key: Hashable = (identity.key(), "pod-identity", auth.preferred_address_type)
            return self._cached(key, lambda: self._pod_identity(auth, token, obj))
        token = identity.token_for(IRSA_AUDIENCE, obj)
        role = identity.sa_annotations.get(IRSA_ROLE_ANNOTATION, "").strip()
        if not role:
            raise FetchError(
                obj,
                f"service account {identity.namespace}/{identity.service_account} has no "
                f"annotation {IRSA_ROLE_ANNOTATION}; annotate it with the ARN of the IAM role to "
                'assume (IRSA), or set usePodIdentity: "true" for EKS Pod Identity',
                transient=False,
                code="MissingRole",
            )
        key = (identity.key(), region, role)
        return self._cached(key, lambda: self._irsa(identity, token, role, region, obj))

    def _cached(self, key: Hashable, make: Any) -> Creds:
        with self._lock:
            flight = self._flights.setdefault(key, threading.Lock())
        with flight:  # one STS/agent call per key at a time; the others reuse its result
            with self._lock:
                creds = self._creds.get(key)
            if creds is not None and creds.expires - REFRESH_MARGIN > self._clock():
                return creds
            try:
                new: Creds = make()
            finally:
                with self._lock:
                    self._flights.pop(key, None)
            with self._lock:
                self._creds[key] = new
            return new

    def _irsa(self, identity: Identity, token: str, role: str, region: str, obj: str) -> Creds:
        sts = self.client("sts", region, None, unsigned=True)
        try:
            rsp = sts.assume_role_with_web_identity(
                RoleArn=role, RoleSessionName=_session_name(identity), WebIdentityToken=token
            )
        except (ClientError, BotoCoreError) as exc:
            raise map_error(
                exc, obj, region, f"AssumeRoleWithWebIdentity for role {role}", hide=(token,)
            ) from None
        c = rsp["Credentials"]
        log.debug("assumed role %s in %s for %s", role, region, _session_name(identity))
        return Creds(
            c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"], _expiry(c["Expiration"])
        )

    def _pod_identity(self, auth: AwsAuth, token: str, obj: str) -> Creds:
        order = {"ipv4": ["ipv4"], "ipv6": ["ipv6"]}.get(
            auth.preferred_address_type, ["ipv4", "ipv6"]
        )
        timeouts: Any = (CONNECT_TIMEOUT, READ_TIMEOUT)  # botocore accepts (connect, read)
        fetcher = _AgentFetcher(session=URLLib3Session(timeout=timeouts))
        failure = FetchError(obj, "no Pod Identity Agent endpoint", transient=True)
        for kind in order:
            url = POD_IDENTITY_ENDPOINTS[kind]
            try:
                data = fetcher.retrieve_full_uri(url, headers={"Authorization": token})
                return Creds(
                    data["AccessKeyId"],
                    data["SecretAccessKey"],
                    data["Token"],
                    _expiry(data["Expiration"]),
                )
            except MetadataRetrievalError as exc:
                msg = redact(str(exc), (token,))[:300]
                status = re.search(r"non 200 response (\d{3})", msg)
                denied = status is not None and status.group(1).startswith("4")
                failure = FetchError(
                    obj,
                    f"EKS Pod Identity Agent at {url} refused or failed: {msg}",
                    transient=not denied,
                    code="AccessDenied" if denied else "Unavailable",
                )
                if denied:
                    break
            except (KeyError, ValueError, TypeError):
                failure = FetchError(
                    obj,
                    f"EKS Pod Identity Agent at {url} sent no usable credentials",
                    transient=True,
                    code="Unavailable",
                )
        raise failure
