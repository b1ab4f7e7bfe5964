# ---------------------------------------------------------------- Engine

@cython.final
cdef class Engine(Stats):
    """Shared state of one proxy process's data path: the route table, the
    upstream pools and the limits; what it counts is its base, Stats
    (stats.pxi)."""

    def __cinit__(self):
        self.pools = {}
        self.timed = set()
        self.outbounds = set()
        self.inbounds = set()
        self.tick_handle = None
        self.flushq = []
        self.flushq_spare = []
        self.flush_armed = False
        self.flush_cb = self._flush_all
        self.flush_ctx = _contextvars.Context()
        self.ans_restart = [None] * ANSWER_KINDS
        self.ans_overload = [None] * ANSWER_KINDS
        self.ans_route = [None] * ROUTE_SLOTS

    def __init__(self, RouteTable table, loop, connector, log, limits, upstream):
        """`limits`, `upstream`: the config's sections (config.Limits,
        config.Upstream), where every default is; read once, here."""
        self.table = table
        self.loop = loop
        self.connector = connector
        self.log = log
        self.max_frame = limits.max_frame_bytes
        self.max_header = limits.max_header_bytes
        self.max_in_flight = limits.max_inflight_per_connection
        self.max_connections = limits.max_connections
        self.read_buffer = limits.read_buffer_bytes
        self.high_water = limits.write_high_water
        self.low_water = limits.write_low_water
        self.max_unread = limits.max_unread_bytes
        self.max_in_flight_total = limits.max_inflight_total
        self.frame_timeout = limits.frame_timeout_s
        self.conn_idle_timeout = limits.idle_timeout_s
        self.max_buffered = limits.max_buffered_bytes
        self.max_gctx = limits.max_global_context_bytes
        self.max_lctx = limits.max_local_context_bytes
        self.default_timeout = upstream.default_timeout_ms / 1000
        self.max_timeout = upstream.max_timeout_ms / 1000
        self.conns_per_node = upstream.connections_per_node
        self.backoff_base = upstream.reconnect_backoff_base_ms / 1000
        self.backoff_max = upstream.reconnect_backoff_max_ms / 1000
        self.idle_timeout = upstream.idle_timeout_s
        self.connect_timeout = upstream.connect_timeout_ms / 1000
        self.min_life = upstream.min_connection_life_ms / 1000
        self.budget_msg = ("overload: the proxy's receive-buffer budget (limits.max_buffered_bytes "
                           "= %d) cannot hold this frame of {total} bytes now; retry"
                           % self.max_buffered)
        self.too_large_msg = ("frame of {total} bytes exceeds the limit of %d bytes "
                              "(limits.max_frame_bytes)" % self.max_frame)

    cdef UpstreamPool get_pool(self, Node node):
        cdef UpstreamPool pool = self.pools.get(node.address)
        if pool is None:
            pool = UpstreamPool(self, node.host, node.port)
            self.pools[node.address] = pool
        node.upstream = pool
        return pool

    cdef int arm_timer(self) except -1:
        if self.tick_handle is None and self.timed:
            self.tick_handle = self.loop.call_later(TICK, self._on_tick)
        return 0

    cdef int fold_route_errors(self) except -1:
        """Add the counts kept on the cached route-error answers to route_errors."""
        cdef Answer a
        for a in self.ans_route:
            if a is not None and a.count:
                key = (a.name or "", a.status)
                self.route_errors[key] = self.route_errors.get(key, 0) + a.count
                a.count = 0
        return 0

    cdef Answer route_answer(self, const char* p, const FrameInfo* fi, int err, int kind):
        """The answer to a request the route table found no node for (unknown
        service, no service named, no node in the Set cell, no healthy node):
        encoded once per (error, kind, name, cell), kept in a small hashed
        table; each use counts toward route_errors (added on scrape)."""
        cdef Py_ssize_t noff = fi.appkey_off, nlen = fi.appkey_len
        cdef Py_ssize_t coff = 0, clen = -1
        cdef uint64_t h
        cdef Answer a
        cdef int status
        cdef Py_ssize_t slot
        if nlen <= 0:
            noff, nlen = fi.service_off, fi.service_len  # the name is `appkey or serviceName`
        if err == RT_SET_NO_NODE:
            coff, clen = fi.set_off, fi.set_len
        h = fnv(14695981039346656037ULL ^ <uint64_t>(err * ANSWER_KINDS + kind),
                p + noff, nlen if nlen > 0 else 0)
        h = fnv(h ^ <uint64_t>(nlen < 0), p + coff, clen if clen > 0 else 0)
        slot = <Py_ssize_t>((h ^ (h >> 29)) & (ROUTE_SLOTS - 1))
        a = <Answer>self.ans_route[slot]
        if a is not None and a.k1 == err and a.k2 == kind \
                and same_bytes(a.name_key, p + noff, nlen) \
                and same_bytes(a.cell_key, p + coff, clen) \
                and (err != RT_SET_NO_NODE or clen >= 0 or a.k3 is self.table.labels.set):
            return a
        # the first of its kind (or its slot was taken): encode it
        if a is not None and a.count:
            key = (a.name or "", a.status)
            self.route_errors[key] = self.route_errors.get(key, 0) + a.count
        name = str_replacing(p, noff, nlen)
        cell_src = None
        if err == RT_UNKNOWN_SERVICE:
            status = STATUS_SERVICE
            msg = (f"unknown service {name!r}: no route (not in the route table; subscribe "
                   f"to it first)")
        elif err == RT_NO_SERVICE_KEY:
            status = STATUS_SERVICE
            msg = "request names no service: neither octo-remote-appkey nor serviceName is set"
        elif err == RT_SET_NO_NODE:
            status = STATUS_TRANSPORT
            cell = str_replacing(p, coff, clen)
            if cell is None:
                cell = cell_src = self.table.labels.set
            msg = f"no node of service {name!r} in Set cell {cell!r} (Set routing does not fall back)"
        else:
            status = STATUS_TRANSPORT
            msg = f"no healthy node for service {name!r}"
        a = make_answer(status, msg, False, kind)
        a.k1 = err
        a.k2 = kind
        a.k3 = cell_src
        a.name_key = p[noff:noff + nlen] if nlen >= 0 else None
        a.cell_key = p[coff:coff + clen] if clen >= 0 else None
        a.name = name
        self.ans_route[slot] = a
        return a

    cdef bint read_solo(self) noexcept:
        """Asked once by each read that has output: send it at once (True)
        or join this iteration's batch (False).  Batching costs a call_soon
        per iteration, which buys nothing when each iteration has a single
        read (1 connection x 1 in flight); so after SOLO_STREAK batched
        iterations of one read each, the next SOLO_RUN reads send at once,
        then one iteration is batched again to look: a second read in it
        goes back to batching."""
        if self.flush_armed:
            self.iter_reads += 1
            return False
        if self.solo_left > 0:
            self.solo_left -= 1
            return True
        self.iter_reads = 1
        return False

    cdef int defer(self, Conn c) except -1:
        """Send c's staged output once, after every read of this loop
        iteration.  The first one schedules the flush: call_soon runs before
        the loop polls again, so nothing staged waits past the iteration (and
        the reads of one iteration share one write per destination)."""
        if not c.queued:
            c.queued = True
            self.flushq.append(c)
            if not self.flush_armed:
                self.flush_armed = True
                self.loop.call_soon(self.flush_cb, context=self.flush_ctx)
        return 0

    def _flush_all(self):
        cdef Conn c
        cdef list q = self.flushq
        self.flush_armed = False
        if self.iter_reads <= 1:
            self.single_streak += 1
            if self.single_streak >= SOLO_STREAK:
                self.solo_left = SOLO_RUN
        else:
            self.single_streak = 0
        self.iter_reads = 0
        self.flushq = self.flushq_spare
        for c in q:
            c.queued = False
            c.flush_now()
        q.clear()
        self.flushq_spare = q

    def _on_tick(self):
        cdef UpstreamConn c
        cdef double now = mono()
        self.tick_handle = None
        for c in list(self.timed):
            c.up_sweep(now)
        self.arm_timer()

    # -- Python-side API (per connection / per config change / per scrape)

    def outbound(self, Signer signer=None):
        """Protocol factory for an outbound (app) listener; `signer`: the
        appkeys its requests are signed for (docs/auth.md)."""
        cdef OutboundConn c = OutboundConn(self)
        c.signer = signer
        return c

    def inbound(self, str provider_path, ServiceGov gov=None, *, Verifier verifier=None):
        """Protocol factory for an inbound listener that forwards to
        `provider_path`; `gov`: the provider-side limits of its service;
        `verifier`: its service authentication (docs/auth.md)."""
        cdef InboundConn c = InboundConn(self, provider_path)
        c.gov = gov
        c.verifier = verifier
        return c

    def idle_sweep(self):
        """Close upstream connections idle for longer than idle_timeout."""
        cdef UpstreamPool pool
        cdef UpstreamConn c
        cdef double now = mono()
        for pool in list(self.pools.values()):
            for c in list(pool.conns):
                if c.in_flight == 0 and c.state == CONN_OPEN and now - c.last_active > self.idle_timeout:
                    pool.conns.remove(c)
                    c.state = CONN_DRAINING
                    if c.transport is not None:
                        c.transport.close()

    def start_drain(self):
        """Hot restart: from now on every new app request is answered at once
        with the restart flag (STATUS_RPC) so the SDK retries on the new
        process.  App connections that asked for it (octo-restart-notice: 1
        in a heartbeat) also get a ProxyRestart frame, so that idle ones move
        too; no other app connection gets anything it did not ask for
        (docs/protocol.md 7.5).  Inbound connections of legacy clients (that
        sent requests and never announced a proxy) are read no more and end
        once nothing read on them is owed (InboundConn.in_end_when_idle)."""
        cdef OutboundConn d
        cdef InboundConn ic
        self.draining = True
        for ic in list(self.inbounds):
            if ic.served and not ic.is_proxy:
                ic.in_end_when_idle()
        for d in list(self.outbounds):
            if not d.closed and d.wants_notice and d.transport is not None:
                self.count.restart_notices += 1
                d.out_flush()  # what is staged goes first
                d.via_transport = True
                d._write(fr_proxy_restart())

    def start_shutdown(self):
        """SIGTERM: new requests (both directions) are answered at once with
        status 6 ("shutting down") instead of being taken on; what is in
        flight goes on."""
        self.stopping = True

    def fail_in_flight(self, str why):
        """The end of a shutdown or drain: answer every request still in
        flight upstream (status 4, `why`) so that nothing read goes
        unanswered; returns how many were."""
        cdef UpstreamConn c
        cdef Py_ssize_t n = 0
        for c in list(self.timed):
            n += c.in_flight
            self.count.shutdown_answers += c.in_flight
            c.up_fail_all(STATUS_TRANSPORT, why)
        return n

    def conn_sweep(self):
        """Once a second (server.py): close stalled partial frames and idle
        connections, and stop counting inbound requests whose callers'
        deadlines have all passed."""
        cdef OutboundConn d
        cdef InboundConn ic
        cdef double now = mono()
        for d in list(self.outbounds):
            d.sweep_check(now, d.in_flight)
        for ic in list(self.inbounds):
            ic.in_expire(now)
            ic.sweep_check(now, ic.in_flight)

    def send_proxy_restarts(self):
        """ProxyRestart on every inbound connection from a client-side proxy
        that has not had one; returns how many were sent."""
        cdef InboundConn ic
        cdef int n = 0
        for ic in list(self.inbounds):
            if ic.is_proxy and not ic.restart_sent and not ic.closed:
                ic.send_proxy_restart()
                n += 1
        return n

    def in_flight(self):
        """Requests this process still owes an answer for (both directions)."""
        cdef UpstreamConn c
        cdef InboundConn ic
        cdef Py_ssize_t n = 0
        cdef double now = mono()
        for c in self.timed:   # every upstream connection with requests in flight
            n += c.in_flight
        for ic in self.inbounds:
            ic.in_expire(now)  # those whose callers gave up are not owed any more
            n += ic.in_flight
        return n

    def inbound_conns(self):
        return list(self.inbounds)

    def outbound_conns(self):
        return list(self.outbounds)

    def pool_stats(self):
        cdef UpstreamPool pool
        cdef UpstreamConn c
        out = {}
        for addr, pool in self.pools.items():
            out[addr] = {
                "connections": len(pool.conns),
                "in_flight": sum([c.in_flight for c in pool.conns]),
                "connects": pool.n_connects,
                "connect_failures": pool.n_connect_failures,
                "last_error": pool.last_error,
            }
        return out

    def close_clients(self):
        """Take nothing more from any app or inbound connection, for good,
        and end our side of each once its queued answers are written (FIN,
        Conn.end_stream).  Called once nothing is in flight (a drained
        generation, a stop): a request read after that check would be
        executed and its answer lost when the process exits; legacy clients
        on the inbound ports get no restart notice and keep sending until
        their connection ends.  Not a close: closing a socket with unread
        bytes sends a reset, which drops answers not yet acknowledged; what a
        client sends after this is read and discarded, never executed, it
        learns so from the end of stream, and its own close is seen.
        Returns how many connections it ended."""
        cdef Conn c
        cdef int n = 0
        if self.flush_armed:
            # answers staged by this loop iteration's reads go out first: a
            # FIN before them would lose them (its send after it fails)
            self._flush_all()
        for c in [*self.outbounds, *self.inbounds]:
            if not c.closed and c.transport is not None:
                c.end_stream()
                n += 1
        return n

    def close_all(self):
        cdef UpstreamPool pool
        cdef UpstreamConn c
        for pool in list(self.pools.values()):
            for c in list(pool.conns):
                if c.transport is not None:
                    c.transport.close()
        if self.tick_handle is not None:
            self.tick_handle.cancel()
            self.tick_handle = None
