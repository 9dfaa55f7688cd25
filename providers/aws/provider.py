"""AWS Secrets Manager and SSM Parameter Store, with the upstream AWS provider's parameters.

Parameters (see providers/aws/params.py): ``objects`` (YAML list), ``region``, ``failoverRegion``,
``pathTranslation``, ``usePodIdentity``, ``preferredAddressType``. Without ``region``: AWS_REGION
of the daemon, else the node's ``topology.kubernetes.io/region`` label, which csi reads from its
Node and passes in the ``add`` request (:meth:`AwsProvider.parse_on_node`). Sources are
:class:`providers.aws.params.AwsSource` tuples; jmesPath files share their object's source and
carry ``select=("jmespath", path)``, applied in :meth:`AwsProvider.render`.

Failover, as upstream: with ``failoverRegion`` every object is read in both regions; the primary's
value wins; a definite refusal (not found, denied, bad request) from either region fails the
object; an outage (5xx, throttling, connection error, timeout) in one region falls back to the
other.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jmespath

from providers.aws.auth import ClientCache
from providers.aws.fetch import Result, fetch_region
from providers.aws.params import AwsAuth, AwsSource, parse_parameters
from providers.base import (
    DEFAULT_MODE,
    Fetched,
    FetchError,
    FileSpec,
    Identity,
    NodeInfo,
    ParameterError,
    Plan,
    Problem,
)

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=256)
def _compiled(path: str) -> Any:
    return jmespath.compile(path)


def combine(src: AwsSource, primary: Result, failover: Result, regions: Sequence[str]) -> Result:
    """Upstream's failover rule for one object read in two regions."""
    for r in (primary, failover):
        if isinstance(r, FetchError) and not r.transient:
            return r
    if isinstance(primary, Fetched):
        return primary
    if isinstance(failover, Fetched):
        log.warning(
            "object %r: primary region %s unavailable (%s); serving failover region %s",
            src.name,
            regions[0],
            primary.code,
            regions[1],
        )
        return failover
    p = str(primary).removeprefix(f"object {src.name!r}: ")
    f = str(failover).removeprefix(f"object {src.name!r}: ")
    return FetchError(
        src.name,
        f"unavailable in both regions: {regions[0]}: {p}; {regions[1]}: {f}",
        transient=True,
        code=primary.code,
    )


class AwsProvider:
    name = "aws"
    max_concurrency = 8

    def __init__(self) -> None:
        self._clients = ClientCache()

    def parse(self, parameters: Mapping[str, str], default_mode: int = DEFAULT_MODE) -> Plan:
        return self._parse(parameters, default_mode, None)

    def parse_on_node(
        self, parameters: Mapping[str, str], default_mode: int, node: NodeInfo
    ) -> Plan:
        """``parse`` on a node: without a ``region`` parameter or AWS_REGION, the node's
        topology.kubernetes.io/region label (base.NodeAware)."""
        return self._parse(parameters, default_mode, node)

    def _parse(
        self, parameters: Mapping[str, str], default_mode: int, node: NodeInfo | None
    ) -> Plan:
        auth, files, problems, notes = parse_parameters(parameters, default_mode, node)
        if problems:
            raise ParameterError(problems)
        return Plan(self.name, tuple(files), auth, notes=tuple(notes))

    def release_identity(self, identity_key: Hashable) -> None:
        self._clients.forget_identity(identity_key)

    def fetch_sync(
        self, plan: Plan, identity: Identity, sources: Sequence[Hashable]
    ) -> Mapping[Hashable, Fetched | FetchError]:
        auth = plan.auth
        if not isinstance(auth, AwsAuth):
            raise ParameterError([Problem(None, "plan", "not a plan of the aws provider")])
        wanted = [s for s in sources if isinstance(s, AwsSource)]
        out: dict[Hashable, Fetched | FetchError] = {}
        for s in sources:
            if not isinstance(s, AwsSource):
                out[s] = FetchError(str(s), "not an aws source", transient=False, code="BadSource")
        primary = fetch_region(self._clients, auth, identity, auth.region, False, wanted)
        if auth.failover_region is None:
            out.update(primary.items())
        else:
            second = fetch_region(self._clients, auth, identity, auth.failover_region, True, wanted)
            for s in wanted:
                out[s] = combine(s, primary[s], second[s], auth.regions)
        return {s: out[s] for s in sources}

    def render(self, spec: FileSpec, value: Fetched) -> bytes:
        if spec.select is None:
            return value.data
        sel = spec.select
        if not (isinstance(sel, tuple) and len(sel) == 2 and sel[0] == "jmespath"):
            raise FetchError(spec.object_name, f"unknown selection {sel!r}", transient=False)
        path = str(sel[1])
        try:
            doc = json.loads(value.data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise FetchError(
                spec.object_name,
                f"value is not valid JSON, so jmesPath {path!r} (file {spec.path!r}) cannot apply",
                transient=False,
                code="JmesPath",
            ) from None
        found = _compiled(path).search(doc)
        if found is None:
            raise FetchError(
                spec.object_name,
                f"jmesPath {path!r} (file {spec.path!r}) selects nothing in the value's JSON",
                transient=False,
                code="JmesPath",
            )
        if isinstance(found, str):
            return found.encode()
        return json.dumps(found, ensure_ascii=False, separators=(",", ":")).encode()
