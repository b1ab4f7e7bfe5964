"""The bundled xDS control plane: ADS (SotW and delta) over grpc.aio, fed by a file.

Each client gets only the resources it subscribed to: octo-proxy asks for
CDS, EDS and TRDS (Thrift RouteConfigurations: shunting rules per appkey and
``octo/global``, served like EDS); a proxyless gRPC client (``xds:///<appkey>``) for LDS, RDS, CDS
and EDS, served per appkey from the same file.  SotW: CDS and LDS responses
carry every subscribed resource that exists (absent = does not exist), EDS
and RDS responses carry only what changed.  Delta: only changed resources,
and removed_resources for subscribed names that are gone or do not exist.
A type it does not serve is answered at once (an empty SotW response, or
every name in removed_resources) so clients do not wait for a timeout.
Nonces are per stream; resource versions are content hashes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from octoproxy.controlplane.store import SERVED, FileError, Store
from octoproxy.xds.resources import CLUSTER_TYPE, LISTENER_TYPE

log = logging.getLogger("octoproxy.controlplane")

TYPES = SERVED
FULL_STATE = (CLUSTER_TYPE, LISTENER_TYPE)  # SotW responses carry every subscribed one
_CHANGED = object()
_END = object()


@dataclass
class Nack:
    node_id: str
    type_url: str
    message: str


@dataclass
class _TypeState:
    names: set[str] = field(default_factory=set)
    wildcard: bool = False
    sent: dict[str, str | None] = field(
        default_factory=dict
    )  # name -> version (None: told missing)


class _Stream:
    """One proxy's ADS stream."""

    _ids = itertools.count(1)

    def __init__(self, store: Store, delta: bool) -> None:
        self.id = next(self._ids)
        self.store = store
        self.delta = delta
        self.node = base_pb2.Node()
        self.types: dict[str, _TypeState] = {}
        self._nonce = itertools.count(1)
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self._change_pending = False

    def on_change(self) -> None:
        if not self._change_pending:
            self._change_pending = True
            self.queue.put_nowait(_CHANGED)

    def targets(self, t: str) -> set[str]:
        st = self.types[t]
        return set(self.store.snapshot.resources.get(t, {})) if st.wildcard else st.names

    # --- SotW ---

    def sotw_response(self, t: str, force: bool) -> discovery_pb2.DiscoveryResponse | None:
        st = self.types.get(t)
        if st is None:
            return None
        snap = self.store.snapshot
        have = snap.resources.get(t, {})
        present = {n: have[n] for n in self.targets(t) if n in have}
        if t in FULL_STATE:
            if not force and st.sent == {n: r.version for n, r in present.items()}:
                return None
            send = list(present.values())
            st.sent = {n: r.version for n, r in present.items()}
        else:
            st.sent = {n: v for n, v in st.sent.items() if n in present}
            send = [r for n, r in present.items() if st.sent.get(n) != r.version]
            if not send and not force:
                return None
            for r in send:
                st.sent[r.name] = r.version
        return discovery_pb2.DiscoveryResponse(
            version_info=str(snap.version),
            resources=[r.to_any() for r in send],
            type_url=t,
            nonce=str(next(self._nonce)),
        )

    def sotw_request(self, req: discovery_pb2.DiscoveryRequest) -> list[Any]:
        t = req.type_url
        if t not in TYPES and t not in self.types:
            log.info("node %s asked for %s, not served: answered empty", self.node.id, t)
        names = set(req.resource_names)
        first = t not in self.types
        st = self.types.setdefault(t, _TypeState())
        wildcard = "*" in names or (first and not names)
        names.discard("*")
        if not first and names == st.names and wildcard == st.wildcard:
            return []  # an ACK or NACK: nothing new to send
        st.names, st.wildcard = names, wildcard
        resp = self.sotw_response(t, force=first or t in FULL_STATE or t not in TYPES)
        return [resp] if resp is not None else []

    # --- delta ---

    def delta_response(self, t: str) -> discovery_pb2.DeltaDiscoveryResponse | None:
        st = self.types.get(t)
        if st is None:
            return None
        have = self.store.snapshot.resources.get(t, {})
        targets = self.targets(t)
        resp = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=str(self.store.snapshot.version), type_url=t
        )
        for n in sorted(targets):
            r = have.get(n)
            if r is not None:
                if st.sent.get(n, "") != r.version:
                    st.sent[n] = r.version
                    res = resp.resources.add(name=n, version=r.version)
                    res.resource.CopyFrom(r.to_any())
            elif n not in st.sent or st.sent[n] is not None:
                st.sent[n] = None
                resp.removed_resources.append(n)
        if st.wildcard:
            for n in [n for n, v in st.sent.items() if v is not None and n not in have]:
                st.sent[n] = None
                resp.removed_resources.append(n)
        if not resp.resources and not resp.removed_resources:
            return None
        resp.nonce = str(next(self._nonce))
        return resp

    def delta_request(self, req: discovery_pb2.DeltaDiscoveryRequest) -> list[Any]:
        t = req.type_url
        if t not in TYPES and t not in self.types:
            log.info("node %s asked for %s, not served: every name removed", self.node.id, t)
        first = t not in self.types
        st = self.types.setdefault(t, _TypeState())
        sub = set(req.resource_names_subscribe)
        unsub = set(req.resource_names_unsubscribe)
        if first:
            st.sent.update(req.initial_resource_versions)
            if not sub:
                st.wildcard = True
        if "*" in sub:
            st.wildcard = True
        if "*" in unsub:
            st.wildcard = False
        sub.discard("*")
        unsub.discard("*")
        st.names |= sub
        st.names -= unsub
        for n in unsub:
            st.sent.pop(n, None)
        if not first and not sub and not unsub:
            return []
        resp = self.delta_response(t)
        return [resp] if resp is not None else []


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]  # untyped protos
    """The ADS service over a `Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.streams: dict[int, _Stream] = {}
        self.nacks: list[Nack] = []

    def _nack(self, s: _Stream, t: str, status: Any) -> None:
        self.nacks.append(Nack(s.node.id, t, status.message))
        del self.nacks[:-100]
        log.error("node %s rejected %s: %s", s.node.id, t, status.message)

    async def _serve(self, request_iterator: AsyncIterator[Any], delta: bool) -> AsyncIterator[Any]:
        s = _Stream(self.store, delta)
        self.streams[s.id] = s
        unlisten = self.store.listen(s.on_change)

        async def reader() -> None:
            try:
                async for req in request_iterator:
                    s.queue.put_nowait(req)
            finally:
                s.queue.put_nowait(_END)

        task = asyncio.get_running_loop().create_task(reader())
        try:
            while True:
                item = await s.queue.get()
                if item is _END:
                    break
                if item is _CHANGED:
                    s._change_pending = False
                    for t in TYPES:
                        r = s.delta_response(t) if delta else s.sotw_response(t, force=False)
                        if r is not None:
                            yield r
                    continue
                if item.HasField("node") and not s.node.id:
                    s.node.CopyFrom(item.node)
                    log.info("node %s connected (%s)", s.node.id, "delta" if delta else "sotw")
                if item.HasField("error_detail"):
                    self._nack(s, item.type_url, item.error_detail)
                for r in s.delta_request(item) if delta else s.sotw_request(item):
                    yield r
        finally:
            unlisten()
            self.streams.pop(s.id, None)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        async for r in self._serve(request_iterator, delta=False):
            yield r

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        async for r in self._serve(request_iterator, delta=True):
            yield r


class ControlPlane:
    """A store watching the file plus the gRPC server; `port` is the bound port."""

    def __init__(
        self, endpoints_file: str, host: str = "127.0.0.1", port: int = 18000, poll_s: float = 0.1,
        tokens_file: str | None = None,
    ) -> None:
        self.store = Store(endpoints_file, poll_s=poll_s, tokens_path=tokens_file)
        self.ads = AdsServer(self.store)
        self.host = host
        self.port = port
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        """Loads the file (FileError if it is bad), binds, serves and watches the file."""
        self.store.load()
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
                # proxies ping every 20 s (xds/client.py); gRPC's default
                # (one ping per 5 minutes while no data is sent, GOAWAY
                # "too_many_pings" after 2 strikes) closed every idle stream
                # after 2-4 minutes.  The minimum interval alone is not used
                # by gRPC 1.85 for a stream's pings (tested): no strikes
                ("grpc.http2.max_ping_strikes", 0),
            ]
        )
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.ads, server)
        bound = server.add_insecure_port(f"{self.host}:{self.port}")
        if bound == 0:
            raise OSError(f"cannot listen on {self.host}:{self.port}")
        self.port = bound
        await server.start()
        self._server = server
        self.store.start()
        log.info("xDS control plane on %s:%d serving %s", self.host, self.port, self.store.path)

    async def stop(self, grace: float | None = None) -> None:
        await self.store.stop()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None


async def run_control_plane(
    endpoints_file: str, host: str = "127.0.0.1", port: int = 18000,
    tokens_file: str | None = None,
) -> None:
    """Serve until cancelled."""
    cp = ControlPlane(endpoints_file, host, port, tokens_file=tokens_file)
    await cp.start()
    print(f"octo-proxy control plane listening on {cp.host}:{cp.port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await cp.stop()


def _listen(v: str) -> tuple[str, int]:
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {v!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: Sequence[str] | None = None) -> int:
    """``octo-proxy control-plane --endpoints FILE [--tokens FILE] [--listen HOST:PORT]``"""
    p = argparse.ArgumentParser(prog="octo-proxy control-plane", description=__doc__)
    p.add_argument("--endpoints", required=True, help="services/endpoints file (YAML or .json)")
    p.add_argument("--tokens", default=None,
                   help="token file served as SDS secrets (mode 0600/0400; docs/auth.md)")
    p.add_argument("--listen", type=_listen, default=("127.0.0.1", 18000), help="HOST:PORT")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    a = p.parse_args(argv)
    logging.basicConfig(
        level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    host, port = a.listen
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        runner(run_control_plane(a.endpoints, host, port, tokens_file=a.tokens))
    except FileError as e:
        print(f"octo-proxy control-plane: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"octo-proxy control-plane: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
