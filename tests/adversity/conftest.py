"""The attack tests use the end-to-end harness (real processes, real sockets)."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _close_peers() -> Iterator[None]:
    """Close the raw peers a test opened (warnings are errors: an unclosed
    socket would fail the test)."""
    from attack import PEERS, Peer

    yield
    while PEERS:
        PEERS.pop().close()
    while Peer.opened:
        Peer.opened.pop().close()
