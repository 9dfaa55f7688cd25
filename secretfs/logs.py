"""Logging set-up shared by every secretfs process.

Third-party SDK loggers are held at WARNING whatever our own level is: at DEBUG, botocore logs
whole response bodies (secret values included) and other SDKs log headers. Our own modules never
log secret bytes or tokens, so they may go down to DEBUG.

Structured fields: a log call passes ``extra=fields(...)``; the JSON format emits each field in
FIELDS as a top-level key (only those: never arbitrary record attributes, which a library could
fill with anything), the text format appends `` key=value`` for each one present.

The audit trail (``--audit``, one line per open) is written off the FUSE thread: the handler
hands a tuple to :data:`AUDIT` (no formatting, never blocking), a writer thread makes the lines.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import json
import logging
import math
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

THIRD_PARTY = (
    "botocore",
    "boto3",
    "s3transfer",
    "urllib3",
    "requests",
    "azure",
    "msal",
    "google",
    "grpc",
    "hvac",
    "lightkube",
    "httpx2",  # lightkube's HTTP library logs every request at INFO
    "httpcore2",
)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The structured fields, in the order the text format appends them. The audit fields (uid, gid,
# pid of the caller, path, version) are here too: "pid" and "path" are not LogRecord attributes.
FIELDS = (
    "volume",
    "path",
    "pod_namespace",
    "pod_name",
    "pod_uid",
    "provider",
    "object",
    "error_type",
    "duration",
    "uid",
    "gid",
    "pid",
    "version",
)
AUDIT_LOGGER = "secretfs.audit"
# Audit lines waiting for the writer thread; more are dropped (counted, and the count logged).
AUDIT_QUEUE_SIZE = 10000
# The writer logs how many lines were dropped at most once per this many seconds.
AUDIT_DROP_INTERVAL = 10.0
# In standalone mode an open is on behalf of the daemon's own identity, not a pod's.
STANDALONE = "standalone"


def fields(
    vol: Any = None,
    *,
    volume: str | None = None,
    identity: Any = None,
    key: object = None,
    pod_namespace: str | None = None,
    pod_name: str | None = None,
    provider: str | None = None,
    obj: str | None = None,
    error: BaseException | None = None,
    error_type: str | None = None,
    duration: float | None = None,
) -> dict[str, object]:
    """``extra=`` for a log call: the structured fields given, those None or empty left out.

    ``vol`` (a secretfs.volumes.Volume) gives volume, pod namespace and name, and provider;
    ``identity`` (providers.base.Identity) the pod's namespace and name; ``error`` its
    ``error_type`` (a FetchError's code, else the exception's type) and, for a FetchError, the
    ``object`` (``error_type`` and ``obj`` given override them). Never an error's text: it
    belongs in the message, where only FetchError messages (written to be safe) go. ``key`` (a
    cache key: provider, auth, identity key, source, ...; docs/INTERNALS.md) gives the provider
    and the namespace of the identity."""
    out: dict[str, object] = {}
    if isinstance(key, tuple) and len(key) >= 3 and isinstance(key[0], str):
        out["provider"] = key[0]
        ident = key[2]
        if isinstance(ident, tuple) and ident and isinstance(ident[0], str):
            out["pod_namespace"] = ident[0]
    if vol is not None:
        out["volume"] = vol.id
        identity = identity or vol.identity
        out["provider"] = vol.plan.provider
    if identity is not None:
        out["pod_namespace"] = identity.namespace
        out["pod_name"] = identity.pod_name
    if error is not None:
        out["error_type"] = getattr(error, "code", None) or type(error).__name__
        out["object"] = getattr(error, "obj", None)
    for key, value in (
        ("volume", volume),
        ("pod_namespace", pod_namespace),
        ("pod_name", pod_name),
        ("provider", provider),
        ("object", obj),
        ("error_type", error_type),
        ("duration", None if duration is None else round(duration, 6)),
    ):
        if value is not None:
            out[key] = value
    return {k: v for k, v in out.items() if v is not None and v != ""}


def _present(record: logging.LogRecord) -> list[tuple[str, object]]:
    d = record.__dict__
    return [(k, d[k]) for k in FIELDS if k in d]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": _utc_second(int(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _present(record):
            out[key] = value if isinstance(value, (int, float, bool)) else str(value)
        if record.exc_info and record.exc_info[0] is not None:
            # Type and frames only: an exception's message could quote data.
            out["exc_type"] = record.exc_info[0].__name__
        return json.dumps(out)


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, then `` key=value`` for each structured field (on the first line, before any
    traceback); a value with a space, a quote, an ``=`` or a control character, or an empty one,
    is quoted as a JSON string."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        return f"{_local_second(int(record.created))},{int(record.msecs):03d}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        present = _present(record)
        if not present:
            return line
        return line + "".join(f" {k}={_text_value(v)}" for k, v in present)


def _text_value(value: object) -> str:
    if type(value) is int:
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    s = str(value)
    if not s or _NEEDS_QUOTES.search(s):
        return json.dumps(s)
    return s


_NEEDS_QUOTES = re.compile(r'[\s"=\\\x00-\x1f\x7f]')


@functools.lru_cache(maxsize=4)
def _local_second(second: int) -> str:
    """logging's default ``asctime`` of a Unix second, without the milliseconds (cached)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))


@functools.lru_cache(maxsize=4)
def _utc_second(second: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` of a Unix second (cached: audit lines come many a second)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def setup_logging(level: str = "INFO", fmt: str = "text", audit: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger(AUDIT_LOGGER).setLevel(logging.INFO if audit else logging.WARNING)


def log_unexpected(logger: logging.Logger, message: str, *args: object) -> None:
    """Log the exception being handled with its type and frames, never its message: an SDK's or a
    parser's exception text can quote the data it choked on (a secret, a token)."""
    exc = sys.exc_info()[1]
    if exc is None:
        logger.error(message, *args)
        return
    frames = "".join(traceback.format_tb(exc.__traceback__))
    logger.error(message + ": %s\n%s", *args, type(exc).__name__, frames)


# --- the audit trail ------------------------------------------------------------------------------

# What the FUSE thread hands over per open: (time.time(), volume id, Identity or None, path,
# caller uid, gid, pid, version). The Identity is immutable (a republish replaces it), so the
# writer thread may read it.
AuditItem = tuple[float, str, Any, str, int, int, int, str]
# The writer wakes this often and writes what came meanwhile in one go.
AUDIT_FLUSH_INTERVAL = 0.05
# It formats this many lines between two moments it lets the FUSE thread have the GIL.
AUDIT_CHUNK = 32


class AuditTrail:
    """Audit lines written by a thread of their own, in batches.

    Not the stdlib QueueHandler/QueueListener: QueueHandler wants a LogRecord, built and
    prepared (message formatted) on the caller's thread, a few microseconds per open on the one
    thread serving every request, and each put wakes the listener (a futex and a thread switch
    per open, measured as costly as the open itself). Here the FUSE thread appends a tuple to a
    deque (atomic, no lock, no wake-up; bounded by a length check, lines that do not fit are
    counted), and the writer thread wakes every AUDIT_FLUSH_INTERVAL, builds the records,
    formats them with the formatters of the ``secretfs.audit`` logger's handlers and writes a
    stream handler's lines with one write. It logs the drop count at most once per
    ``drop_interval``."""

    def __init__(
        self,
        maxsize: int = AUDIT_QUEUE_SIZE,
        drop_interval: float = AUDIT_DROP_INTERVAL,
        flush_interval: float = AUDIT_FLUSH_INTERVAL,
    ) -> None:
        self.maxsize = maxsize
        self.drop_interval = drop_interval
        self.flush_interval = flush_interval
        self.dropped = 0  # only the putting thread writes it
        self.reported = 0  # only the writer thread writes it
        self.written = 0
        self._q: collections.deque[AuditItem] = collections.deque()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def put(self, item: AuditItem) -> None:
        """Called on the FUSE thread: never blocks, never formats, never raises."""
        if self._thread is None:
            self.start()
        if len(self._q) >= self.maxsize:
            self.dropped += 1
            return
        self._q.append(item)

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()
            atexit.register(self.stop)

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is queued (for at most ``timeout`` s) and end the writer."""
        t = self._thread
        if t is None or not t.is_alive():
            return
        self._stop.set()
        t.join(timeout)

    def _run(self) -> None:
        logger = logging.getLogger(AUDIT_LOGGER)
        last_report = -math.inf
        while True:
            stopping = self._stop.wait(self.flush_interval)
            now = time.monotonic()
            if self.dropped != self.reported and now - last_report >= self.drop_interval:
                n, self.reported = self.dropped - self.reported, self.dropped
                last_report = now
                logger.warning(
                    "audit: %d line(s) dropped: the writer fell behind (queue of %d full)",
                    n,
                    self.maxsize,
                )
            while self._q:
                batch: list[AuditItem] = []
                while self._q and len(batch) < AUDIT_CHUNK:
                    batch.append(self._q.popleft())
                try:
                    self._write(logger, batch)
                except Exception:
                    log_unexpected(logger, "audit: writing lines failed")
                time.sleep(0)  # let the FUSE thread have the GIL between chunks
            if stopping:
                return

    def _write(self, logger: logging.Logger, batch: list[AuditItem]) -> None:
        records: list[logging.LogRecord] | None = None
        for h in _handlers(logger):
            if type(h) is logging.StreamHandler:
                # Handler.handle per record, but one write and one flush for the batch. Our own
                # formatters' lines are built straight from the items (no LogRecord): the same
                # text (tests/test_logs.py compares them) for a third of the CPU, which this
                # thread would otherwise take from the FUSE thread under the GIL.
                line = _AUDIT_LINES.get(type(h.formatter))
                if line is not None:
                    text = "".join(line(item) + h.terminator for item in batch)
                else:
                    records = records or [_audit_record(item) for item in batch]
                    text = "".join(h.format(r) + h.terminator for r in records)
                with h.lock or contextlib.nullcontext():
                    h.stream.write(text)
                    h.flush()
            else:
                records = records or [_audit_record(item) for item in batch]
                for r in records:
                    if r.levelno >= h.level:
                        h.handle(r)
        self.written += len(batch)


def _handlers(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers a record of ``logger`` reaches (Logger.callHandlers' walk)."""
    out: list[logging.Handler] = []
    c: logging.Logger | None = logger
    while c is not None:
        out += c.handlers
        c = c.parent if c.propagate else None
    return out


def _audit_fields(item: AuditItem) -> list[tuple[str, object]]:
    """An audit line's structured fields, in FIELDS order, as ``_audit_record`` sets them."""
    _, volume, identity, path, uid, gid, pid, version = item
    if identity is None or identity.namespace is None:
        pod = [("pod_namespace", STANDALONE), ("pod_name", STANDALONE)]
    else:
        pod = [
            ("pod_namespace", identity.namespace),
            ("pod_name", identity.pod_name or ""),
            ("pod_uid", identity.pod_uid or ""),
        ]
    return [
        ("volume", volume),
        ("path", path),
        *pod,
        ("uid", uid),
        ("gid", gid),
        ("pid", pid),
        ("version", version),
    ]


def _audit_json(item: AuditItem) -> str:
    """JsonFormatter's line for an audit item: json.dumps' text (its separators, ASCII escapes),
    built from the C string encoder without a dict."""
    created = item[0]
    ts = _utc_second(int(created)) + f".{int((created - int(created)) * 1000):03d}Z"
    parts = [f'{{"ts": "{ts}", "level": "info", "logger": "{AUDIT_LOGGER}", "msg": "open"']
    for key, value in _audit_fields(item):
        if type(value) is int:
            parts.append(f', "{key}": {value}')
        else:
            parts.append(f', "{key}": {_json_string(str(value))}')
    parts.append("}")
    return "".join(parts)


_json_string: Callable[[str], str] = (
    getattr(json.encoder, "c_encode_basestring_ascii", None)
    or json.encoder.py_encode_basestring_ascii
)


def _audit_text(item: AuditItem) -> str:
    """TextFormatter's line for an audit item."""
    created = item[0]
    head = f"{_local_second(int(created))},{int((created - int(created)) * 1000):03d}"
    tail = "".join(f" {k}={_text_value(v)}" for k, v in _audit_fields(item))
    return f"{head} INFO {AUDIT_LOGGER}: open{tail}"


_AUDIT_LINES: dict[type, Callable[[AuditItem], str]] = {
    JsonFormatter: _audit_json,
    TextFormatter: _audit_text,
}


def _audit_record(item: AuditItem) -> logging.LogRecord:
    created, volume, identity, path, uid, gid, pid, version = item
    # A copy of one record's attributes: LogRecord() costs more than formatting the line.
    record = logging.LogRecord.__new__(logging.LogRecord)
    record.__dict__.update(_audit_template())
    record.created = created
    record.msecs = (created - int(created)) * 1000
    d = record.__dict__
    d["volume"] = volume
    d["path"] = path
    if identity is None or identity.namespace is None:
        d["pod_namespace"] = d["pod_name"] = STANDALONE
    else:
        d["pod_namespace"] = identity.namespace
        d["pod_name"] = identity.pod_name or ""
        d["pod_uid"] = identity.pod_uid or ""
    d["uid"], d["gid"], d["pid"], d["version"] = uid, gid, pid, version
    return record


@functools.lru_cache(maxsize=1)
def _audit_template() -> dict[str, Any]:
    return dict(
        logging.LogRecord(AUDIT_LOGGER, logging.INFO, __file__, 0, "open", (), None).__dict__
    )


AUDIT = AuditTrail()

__all__ = [
    "AUDIT",
    "FIELDS",
    "AuditTrail",
    "JsonFormatter",
    "TextFormatter",
    "fields",
    "log_unexpected",
    "setup_logging",
]
