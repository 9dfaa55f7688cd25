"""Shared fixtures. Backend test servers live in their own modules (tests/*_server.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests.moto_server import aws_env, moto_url  # noqa: F401  (fixtures for every test module)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "expect_errors: the test deliberately makes the code log errors"
    )


@pytest.fixture(autouse=True)
def _no_unexpected_errors(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    """A test fails if our code logs an error it did not declare (``expect_errors`` marker)."""
    caplog.set_level(logging.INFO)
    yield
    if request.node.get_closest_marker("expect_errors"):
        return
    ours = ("secretfs", "providers", "csi")
    bad = [
        r
        for r in caplog.get_records("call")
        if r.levelno >= logging.ERROR and r.name.split(".")[0] in ours
    ]
    assert not bad, "unexpected error logs: " + "; ".join(r.getMessage() for r in bad)
