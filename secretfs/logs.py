"""Logging set-up shared by every secretfs process.

Third-party SDK loggers are held at WARNING whatever our own level is: at DEBUG, botocore logs
whole response bodies (secret values included) and other SDKs log headers. Our own modules never
log secret bytes or tokens, so they may go down to DEBUG.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback

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
    "kubernetes",
)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            # Type and frames only: an exception's message could quote data.
            out["exc_type"] = record.exc_info[0].__name__
        return json.dumps(out)


def setup_logging(level: str = "INFO", fmt: str = "text", audit: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("secretfs.audit").setLevel(logging.INFO if audit else logging.WARNING)


def log_unexpected(logger: logging.Logger, message: str, *args: object) -> None:
    """Log the exception being handled with its type and frames, never its message: an SDK's or a
    parser's exception text can quote the data it choked on (a secret, a token)."""
    exc = sys.exc_info()[1]
    if exc is None:
        logger.error(message, *args)
        return
    frames = "".join(traceback.format_tb(exc.__traceback__))
    logger.error(message + ": %s\n%s", *args, type(exc).__name__, frames)
