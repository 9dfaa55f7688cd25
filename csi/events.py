"""Kubernetes Events on pods (and SecretProviderClasses), recorded as client-go's recorder does.

Identical events (same object, reason and message) are aggregated into one Event object whose
``count`` and ``lastTimestamp`` grow; at most one API write per object and reason every
``interval`` seconds (later occurrences are folded into the next write). Writes run on the
``Writer`` thread (csi/status.py): recording never blocks. Messages are built from texts that
carry no secret or token (FetchError messages, names); they are cut to ``MAX_MESSAGE``.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx2
import lightkube
from lightkube.resources.core_v1 import Event
from lightkube.types import PatchType

from secretfs.spc import SECRET_OBJECTS

if TYPE_CHECKING:
    from csi.kube import Kube
    from csi.status import Writer

log = logging.getLogger(__name__)

# The source of our Events (``kubectl describe`` shows it).
COMPONENT = "secretfs-csi"
WARNING = "Warning"
NORMAL = "Normal"
# The reason of the Event on a pod whose class has secretObjects (secret sync is not offered).
SECRET_OBJECTS_NOT_SYNCED = "SecretObjectsNotSynced"
SECRET_OBJECTS_MESSAGE = SECRET_OBJECTS
# At most one write per object and reason this often (seconds).
EVENT_INTERVAL = 60.0
MAX_MESSAGE = 1024
# Aggregates kept (oldest forgotten first): memory stays bounded whatever happens.
MAX_AGGREGATES = 4096


def ref(
    kind: str, namespace: str, name: str, uid: str = "", api_version: str = "v1"
) -> dict[str, str]:
    """An ``involvedObject`` reference."""
    out = {"apiVersion": api_version, "kind": kind, "namespace": namespace, "name": name}
    if uid:
        out["uid"] = uid
    return out


def _create(api: lightkube.Client, namespace: str, body: dict[str, Any]) -> None:
    event = Event.from_dict(body)  # the client takes its model
    assert isinstance(event, Event)
    api.create(event, namespace=namespace)


def _patch(api: lightkube.Client, namespace: str, name: str, count: int, last: float) -> None:
    patch = {"count": count, "lastTimestamp": _timestamp(last)}
    api.patch(Event, name, patch, namespace=namespace, patch_type=PatchType.MERGE)


def _timestamp(wall: float) -> str:
    return datetime.datetime.fromtimestamp(wall, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Aggregate:
    involved: dict[str, str]
    reason: str
    message: str
    type: str
    name: str  # the Event object's name: <object>.<hex nanoseconds>, as client-go names them
    first: float  # wall clock
    last: float
    count: int = 0
    written: int = 0  # the count the API has
    created: bool = False


class Recorder:
    def __init__(
        self,
        kube: Kube,
        writer: Writer,
        node_id: str,
        interval: float = EVENT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._kube = kube
        self._writer = writer
        self.node_id = node_id
        self.interval = interval
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._aggregates: OrderedDict[tuple[str, ...], _Aggregate] = OrderedDict()
        # (object, reason) -> when the next write for it may happen (monotonic clock)
        self._next_write: dict[tuple[str, ...], float] = {}

    def record(
        self, involved: dict[str, str], reason: str, message: str, type: str = WARNING
    ) -> None:
        message = message[:MAX_MESSAGE]
        obj = (involved["namespace"], involved["kind"], involved["name"], involved.get("uid", ""))
        key = (*obj, reason, type, message)
        wall = self._wall()
        with self._lock:
            agg = self._aggregates.get(key)
            if agg is None:
                name = f"{involved['name']}.{time.time_ns():x}"
                agg = _Aggregate(involved, reason, message, type, name, wall, wall)
                self._aggregates[key] = agg
                while len(self._aggregates) > MAX_AGGREGATES:
                    self._aggregates.popitem(last=False)
            else:
                self._aggregates.move_to_end(key)
            agg.count += 1
            agg.last = wall
            delay = max(0.0, self._next_write.get((*obj, reason), 0.0) - self._clock())
        self._writer.submit(("event", *key), lambda: self._write(key), delay=delay)

    def _write(self, key: tuple[str, ...]) -> None:
        """Run on the writer thread: create the Event, or patch its count and lastTimestamp."""
        limit = (*key[:4], key[4])
        with self._lock:
            agg = self._aggregates.get(key)
            if agg is None or agg.written == agg.count:
                return
            wait = self._next_write.get(limit, 0.0) - self._clock()
            if wait > 0:  # another message of this reason was written a moment ago
                self._writer.submit(("event", *key), lambda: self._write(key), delay=wait)
                return
            self._next_write[limit] = self._clock() + self.interval
            if len(self._next_write) > MAX_AGGREGATES:
                now = self._clock()
                for k in [k for k, t in self._next_write.items() if t < now]:
                    del self._next_write[k]
            count, last, created = agg.count, agg.last, agg.created
            namespace = agg.involved["namespace"]
            body = self._body(agg, count, last)
        api = self._kube._client()
        if created:
            try:
                _patch(api, namespace, body["metadata"]["name"], count, last)
            except httpx2.HTTPStatusError as exc:
                if exc.response.status_code != 404:
                    raise
                # Expired (the API keeps Events an hour): a new one carries on the count.
                with self._lock:
                    agg.name = f"{agg.involved['name']}.{time.time_ns():x}"
                    body = self._body(agg, count, last)
                _create(api, namespace, body)
        else:
            try:
                _create(api, namespace, body)
            except httpx2.HTTPStatusError as exc:
                if exc.response.status_code != 409:
                    raise
                _patch(api, namespace, body["metadata"]["name"], count, last)
        with self._lock:
            agg.created = True
            agg.written = max(agg.written, count)

    def _body(self, agg: _Aggregate, count: int, last: float) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": agg.name, "namespace": agg.involved["namespace"]},
            "involvedObject": agg.involved,
            "reason": agg.reason,
            "message": agg.message,
            "type": agg.type,
            "count": count,
            "firstTimestamp": _timestamp(agg.first),
            "lastTimestamp": _timestamp(last),
            "source": {"component": COMPONENT, "host": self.node_id},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.node_id,
        }
