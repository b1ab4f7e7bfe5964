"""Fixtures shared by the e2e modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness import RedisServer


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A real redis-server for the test, stopped after it."""
    r = RedisServer()
    try:
        yield r
    finally:
        r.stop()
