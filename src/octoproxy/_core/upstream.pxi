# ---------------------------------------------------------------- upstream

# Retry copies (docs/governance.md): a request that may be executed again
# keeps a copy of its bytes while it is in flight.  Copies of up to RC_SIZE
# bytes live in buffers kept on a free list (at most RC_KEEP of them), so a
# copy costs a memcpy, not an allocation and a free per request; a larger
# request gets a buffer of its own.  The bytes object a retry needs is made
# only when the retry happens.
cdef enum:
    RC_SIZE = 512
    RC_KEEP = 4096

cdef void* _rc_free = NULL     # free buffers of RC_SIZE bytes, linked through their first word
cdef Py_ssize_t _rc_n = 0


cdef inline char* rc_copy(const char* p, Py_ssize_t n) noexcept:
    """A copy of p[0:n] for a retry; NULL when out of memory (no copy is
    kept then: the request is not retried after being written)."""
    global _rc_free, _rc_n
    cdef char* b
    if n <= RC_SIZE and _rc_free != NULL:
        b = <char*>_rc_free
        _rc_free = (<void**>b)[0]
        _rc_n -= 1
    else:
        b = <char*>malloc(RC_SIZE if n <= RC_SIZE else n)
        if b == NULL:
            return NULL
    memcpy(b, p, n)
    return b


cdef inline void rc_release(char* b, Py_ssize_t n) noexcept:
    global _rc_free, _rc_n
    if n <= RC_SIZE and _rc_n < RC_KEEP:
        (<void**>b)[0] = _rc_free
        _rc_free = b
        _rc_n += 1
    else:
        free(b)


cdef inline void up_gov_release(Pending* sl) noexcept:
    """What a finished request counted in its service's governance."""
    cdef ServiceGov g = <ServiceGov>sl.gov
    if sl.gflags & GF_COUNTED:
        g.inflight -= 1
    if sl.gflags & GF_PENDING:
        g.pending -= 1
    if sl.gflags & GF_RETRY:
        g.retries_active -= 1
    sl.gflags = 0
    sl.gov = NULL
    Py_DECREF(g)


cdef inline void up_gov_conn_done(UpstreamConn c) noexcept:
    """The connection is gone: it no longer counts for its service."""
    if c.gov is not None:
        c.gov.connections -= 1
        c.gov = None


cdef int up_clear_pending(UpstreamConn c) except -1:
    """The connection is made (or failed): its requests wait for it no more."""
    cdef int32_t s = c.head
    cdef ServiceGov g
    while s != -1:
        if c.slots[s].gflags & GF_PENDING:
            g = <ServiceGov>c.slots[s].gov
            g.pending -= 1
            c.slots[s].gflags &= ~GF_PENDING
        s = c.slots[s].next
    return 0


cdef bint up_retry_answered(UpstreamConn c, Py_ssize_t s, double now) except -1:
    """The node answered status 4 for a request with a retry copy: send it
    again elsewhere when attempts, budget and deadline allow."""
    cdef ServiceGov g = <ServiceGov>c.slots[s].gov
    cdef OutboundConn app = <OutboundConn>c.slots[s].app
    cdef Node node = <Node>c.slots[s].node
    cdef bytes again
    cdef int64_t orig = c.slots[s].orig_id
    cdef double deadline = c.slots[s].deadline
    cdef int attempt = c.slots[s].attempt
    cdef int protocol = c.slots[s].protocol
    if attempt >= g.max_attempts or deadline - now <= 0.001:
        return False
    if not gv_budget(g):
        g.n_budget_exhausted += 1
        return False
    again = PyBytes_FromStringAndSize(c.slots[s].retry, c.slots[s].retry_len)
    c.up_release(s)
    if app.out_resend(again, orig, deadline, attempt + 1, node, False):
        app.out_error(orig, STATUS_TRANSPORT, f"upstream {c.pool.address} answered status 4 and "
                      f"no other node is left to retry on", False, protocol)
    if not app.in_touched:
        app.in_touched = True
        c.touched.append(app)
    return True


@cython.final
cdef class UpstreamPool:
    """The multiplexed connections to one remote node (a provider's proxy)."""

    def __cinit__(self, Engine engine, str host, int port):
        self.engine = engine
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.conns = []
        self.rr = 0
        self.retry_at = 0.0
        self.backoff = engine.backoff_base
        self.last_error = None
        self.ans_timeout = [None] * ANSWER_KINDS
        self.ans_unavailable = [None] * ANSWER_KINDS

    cdef UpstreamConn pick(self, ServiceGov g):
        """A connection for the next request, opening one on first use; None
        while connecting is backed off after a failure and none is left.  A
        connection opened for the service `g` counts in its connections; at
        its max_connections no new one is opened (an open one is used; the
        caller refuses when there is none).  The service uses at most its
        node_max_connections of the node's connections (the first ones:
        a pool is shared by every service of the address)."""
        cdef Py_ssize_t n = len(self.conns)
        cdef Py_ssize_t cap = self.engine.conns_per_node
        cdef UpstreamConn c
        if g is not None and 0 < g.node_max_connections < cap:
            cap = g.node_max_connections
        if n < cap and (n == 0 or mono() >= self.retry_at) and (
                g is None or g.max_connections <= 0 or g.connections < g.max_connections):
            if n == 0 and mono() < self.retry_at:
                return None
            c = UpstreamConn(self.engine, self)
            if g is not None:
                c.gov = g
                g.connections += 1
            self.conns.append(c)
            self.n_connects += 1
            self.engine.connector(c, self.host, self.port)
            return c
        if n == 0:
            return None
        self.rr += 1
        return <UpstreamConn>self.conns[self.rr % (n if n < cap else cap)]

    cdef _on_conn_failed(self, UpstreamConn c, str why):
        if c in self.conns:
            self.conns.remove(c)
        self.n_connect_failures += 1
        self._back_off(why)

    cdef _back_off(self, str why):
        cdef double jitter
        self.last_error = why
        # full jitter over the current backoff, doubling up to the maximum
        jitter = _random.random() * self.backoff
        self.retry_at = mono() + jitter
        self.backoff = min(self.backoff * 2, self.engine.backoff_max)

    cdef _on_conn_ok(self):
        self.backoff = self.engine.backoff_base
        self.retry_at = 0.0
        self.last_error = None


@cython.final
cdef class UpstreamConn(Conn):
    """One multiplexed TCP connection to a remote proxy; requests from many
    app connections share it under sequence ids of its own."""

    def __cinit__(self, Engine engine, UpstreamPool pool):
        cdef Py_ssize_t i
        self.pool = pool
        self.state = CONN_CONNECTING
        self.backlog = []
        self.waiters = []
        self.touched = []
        self.cap = FIRST_SLOTS
        self.slots = <Pending*>malloc(self.cap * sizeof(Pending))
        if self.slots == NULL:
            raise MemoryError()
        for i in range(self.cap):
            self.slots[i].id = -1
        self.in_flight = 0
        self.head = self.tail = -1
        self.next_id = 1 + <int64_t>(_random.getrandbits(20))
        self.last_active = mono()
        self.hb_id = 0

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.slots != NULL:
            for i in range(self.cap):
                if self.slots[i].id != -1:
                    Py_DECREF(<object>self.slots[i].app)
                    Py_DECREF(<object>self.slots[i].node)
                    if self.slots[i].method != NULL:
                        Py_DECREF(<object>self.slots[i].method)
                    if self.slots[i].gov != NULL:
                        Py_DECREF(<object>self.slots[i].gov)
                    if self.slots[i].retry != NULL:
                        rc_release(self.slots[i].retry, self.slots[i].retry_len)
                    if self.slots[i].shunt != NULL:
                        Py_DECREF(<object>self.slots[i].shunt)
            free(self.slots)
            self.slots = NULL

    # -- pending table: id & mask is the slot; at most half full, so the
    #    next free id is found in about one probe and a grow never collides.

    cdef Py_ssize_t up_alloc(self, double deadline) except -1:
        cdef int64_t sid
        cdef Py_ssize_t s, t
        if (self.in_flight + 1) * 2 > self.cap:
            self.up_grow()
        while True:
            sid = self.next_id
            self.next_id = sid + 1 if sid < MAX_ID else 1
            s = sid & (self.cap - 1)
            if self.slots[s].id == -1:
                break
        self.slots[s].id = sid
        self.slots[s].deadline = deadline
        self.slots[s].attempt = 1
        self.slots[s].gflags = 0
        self.slots[s].gov = NULL
        self.slots[s].retry = NULL
        self.slots[s].shunt = NULL
        # insert into the deadline list from the tail: usually O(1) since
        # most requests share the default timeout
        t = self.tail
        while t != -1 and self.slots[t].deadline > deadline:
            t = self.slots[t].prev
        self.slots[s].prev = <int32_t>t
        if t == -1:
            self.slots[s].next = self.head
            if self.head != -1:
                self.slots[self.head].prev = <int32_t>s
            self.head = <int32_t>s
        else:
            self.slots[s].next = self.slots[t].next
            if self.slots[t].next != -1:
                self.slots[self.slots[t].next].prev = <int32_t>s
            self.slots[t].next = <int32_t>s
        if self.slots[s].next == -1:
            self.tail = <int32_t>s
        self.in_flight += 1
        if self.in_flight == 1:
            self.engine.timed.add(self)
            self.engine.arm_timer()
        if OCTOPROXY_DEBUG:
            self.up_check()
        return s

    cdef int up_grow(self) except -1:
        cdef Py_ssize_t ncap = self.cap * 2
        cdef Pending* ns = <Pending*>malloc(ncap * sizeof(Pending))
        cdef Py_ssize_t i, s, prev_new = -1
        cdef int32_t old = self.head
        if ns == NULL:
            raise MemoryError()
        for i in range(ncap):
            ns[i].id = -1
        # re-place every live entry at id & newmask, keeping deadline order
        self.head = -1
        while old != -1:
            s = self.slots[old].id & (ncap - 1)
            ns[s] = self.slots[old]
            ns[s].prev = <int32_t>prev_new
            ns[s].next = -1
            if prev_new == -1:
                self.head = <int32_t>s
            else:
                ns[prev_new].next = <int32_t>s
            prev_new = s
            old = self.slots[old].next
        self.tail = <int32_t>prev_new
        free(self.slots)
        self.slots = ns
        self.cap = ncap
        if OCTOPROXY_DEBUG:
            self.up_check()
        return 0

    cdef void up_unlink(self, Py_ssize_t s) noexcept:
        cdef int32_t p = self.slots[s].prev
        cdef int32_t n = self.slots[s].next
        if p != -1:
            self.slots[p].next = n
        else:
            self.head = n
        if n != -1:
            self.slots[n].prev = p
        else:
            self.tail = p

    cdef int up_release(self, Py_ssize_t s) except -1:
        cdef object app = <object>self.slots[s].app
        cdef object node = <object>self.slots[s].node
        self.up_unlink(s)
        self.slots[s].id = -1
        self.in_flight -= 1
        if not self.slots[s].oneway:
            self.engine.total_in_flight -= 1
            (<OutboundConn>app).in_flight -= 1
            lb_on_done(<Node>node)
        if self.slots[s].method != NULL:
            Py_DECREF(<object>self.slots[s].method)
            self.slots[s].method = NULL
        if self.slots[s].gov != NULL:
            up_gov_release(&self.slots[s])
        if self.slots[s].retry != NULL:
            rc_release(self.slots[s].retry, self.slots[s].retry_len)
            self.slots[s].retry = NULL
        if self.slots[s].shunt != NULL:
            Py_DECREF(<object>self.slots[s].shunt)
            self.slots[s].shunt = NULL
        Py_DECREF(app)
        Py_DECREF(node)
        if self.in_flight == 0:
            self.engine.timed.discard(self)
        if OCTOPROXY_DEBUG:
            self.up_check()
        return 0

    cdef int up_answer(self, OutboundConn app, Py_ssize_t s, Answer a) except -1:
        """The local answer a to slot s's request, with the method name and
        body seqid kept for its Thrift EXCEPTION body (docs/protocol.md 11)."""
        cdef PyObject* m = self.slots[s].method
        if m == NULL:
            return app.out_answer(a, self.slots[s].orig_id, NULL, 0, 0, 0)
        return app.out_answer(a, self.slots[s].orig_id,
                              <const uint8_t*>PyBytes_AS_STRING(<object>m), 0,
                              PyBytes_GET_SIZE(<object>m), self.slots[s].body_seq)
    cdef int up_check(self) except -1:
        """The pending table's invariants (compiled into OCTOPROXY_DEBUG=1
        builds after every change; _check_pending() runs them in any build):
        every live slot sits at id & mask, is on the deadline list exactly
        once, the list is ordered by deadline with consistent links, and the
        live count is in_flight, at most half the capacity."""
        cdef Py_ssize_t i, live = 0, linked = 0
        cdef int32_t s = self.head, prev = -1
        cdef double last = -1.0
        for i in range(self.cap):
            if self.slots[i].id != -1:
                live += 1
                if (self.slots[i].id & (self.cap - 1)) != i:
                    raise AssertionError(f"pending: slot {i} holds id {self.slots[i].id}")
        while s != -1:
            if s < 0 or s >= self.cap or self.slots[s].id == -1:
                raise AssertionError(f"pending: deadline list reaches free slot {s}")
            if self.slots[s].prev != prev:
                raise AssertionError(f"pending: slot {s} links back to {self.slots[s].prev}, not {prev}")
            if self.slots[s].deadline < last:
                raise AssertionError(f"pending: deadline list out of order at slot {s}")
            linked += 1
            if linked > live:
                raise AssertionError("pending: deadline list has a cycle")
            last = self.slots[s].deadline
            prev = s
            s = self.slots[s].next
        if self.tail != prev:
            raise AssertionError(f"pending: tail is {self.tail}, the list ends at {prev}")
        if not (live == linked == self.in_flight) or live * 2 > self.cap:
            raise AssertionError(f"pending: {live} live, {linked} linked, in_flight "
                                 f"{self.in_flight}, capacity {self.cap}")
        return 0

    def _check_pending(self):
        """Run the pending table's invariant checks now (tests)."""
        self.up_check()

    cdef int up_fail_all(self, int status, str why, dict unsent=None) except -1:
        """Answer every request in flight here with an error, at once, or
        send it again to another node when that is safe (docs/governance.md):
        `unsent` maps the upstream ids of requests never written (the
        connection was never made) to their bytes; a written request goes
        again only with a retry copy (an idempotent method), within its
        service's retry budget and its own deadline."""
        cdef Py_ssize_t s
        cdef OutboundConn app
        cdef double now = mono()
        cdef list answers = [None] * ANSWER_KINDS    # `why` encoded once per kind
        cdef Answer a
        cdef int kind
        cdef Node node
        cdef ServiceGov g
        cdef bytes again
        cdef bint never
        cdef int64_t orig
        cdef double deadline
        cdef int attempt, protocol
        while self.head != -1:
            s = self.head
            app = <OutboundConn>self.slots[s].app
            node = <Node>self.slots[s].node
            count_answer(self.engine, node, status, self.slots[s].sent_at, now, self.slots[s].shunt)
            again = None
            never = False
            if not app.closed and not self.slots[s].oneway and self.slots[s].deadline - now > 0.001:
                if unsent is not None:
                    again = unsent.get(self.slots[s].id)
                    never = again is not None
                if again is None and self.slots[s].retry != NULL:
                    g = <ServiceGov>self.slots[s].gov
                    if self.slots[s].attempt < g.max_attempts and gv_budget(g):
                        again = PyBytes_FromStringAndSize(self.slots[s].retry,
                                                          self.slots[s].retry_len)
                    elif self.slots[s].attempt < g.max_attempts:
                        g.n_budget_exhausted += 1
            if never and self.slots[s].attempt >= MAX_UNSENT_TRIES:
                again = None  # bounced off enough failed connects
            if again is not None:
                orig = self.slots[s].orig_id
                deadline = self.slots[s].deadline
                attempt = self.slots[s].attempt
                protocol = self.slots[s].protocol
                self.up_release(s)
                if app.out_resend(again, orig, deadline, attempt + 1, node, never):
                    app.out_error(orig, status, why, False, protocol)  # no other node
                if not app.closed and not app.in_touched:
                    app.in_touched = True
                    self.touched.append(app)
                continue
            if not app.closed:
                kind = akey(self.slots[s].protocol, self.slots[s].method != NULL)
                a = <Answer>answers[kind]
                if a is None:
                    a = answers[kind] = make_answer(status, why, False, kind)
                self.up_answer(app, s, a)
                if not app.in_touched:
                    app.in_touched = True
                    self.touched.append(app)
            self.up_release(s)
        self.up_flush_touched()
        return 0

    cdef dict up_unsent(self):
        """The requests still in the connect backlog (never written): upstream
        id -> a copy of the frame."""
        cdef dict out = {}
        cdef bytes chunk
        cdef const uint8_t* b
        cdef Py_ssize_t n, pos, r
        cdef FrameInfo fi
        for chunk in self.backlog:
            b = <const uint8_t*>PyBytes_AS_STRING(chunk)
            n = PyBytes_GET_SIZE(chunk)
            pos = 0
            while pos < n:
                r = fr_scan(b + pos, n - pos, self.engine.max_frame, self.engine.max_header, &fi)
                if r <= 0:
                    break
                if fi.flags & FF_REQUEST and fi.seq_off >= 0:
                    out[fi.seq_id] = PyBytes_FromStringAndSize(<const char*>(b + pos), r)
                pos += r
        return out

    cdef int up_sweep(self, double now) except -1:
        cdef Py_ssize_t s
        cdef OutboundConn app
        cdef Answer a
        cdef int kind
        cdef float tm
        cdef uint32_t tm_bits
        cdef UpstreamPool pool = self.pool
        while self.head != -1 and self.slots[self.head].deadline <= now:
            s = self.head
            app = <OutboundConn>self.slots[s].app
            if self.slots[s].oneway:
                # no answer came for a one-way call: none is owed (docs/protocol.md 6.2)
                self.engine.count.oneway_unanswered += 1
                self.up_release(s)
                continue
            self.engine.count.timeouts += 1
            count_answer(self.engine, <Node>self.slots[s].node, STATUS_TRANSPORT,
                         self.slots[s].sent_at, now, self.slots[s].shunt)
            if not app.closed:
                # one encoding per timeout value (the message names it)
                kind = akey(self.slots[s].protocol, self.slots[s].method != NULL)
                tm = self.slots[s].timeout_ms
                memcpy(&tm_bits, &tm, 4)  # the float's bits: exactly this timeout
                a = <Answer>pool.ans_timeout[kind]
                if a is None or a.k1 != tm_bits:
                    a = make_answer(STATUS_TRANSPORT, f"timeout: no answer from {pool.address} "
                                    f"within {tm:.0f} ms", False, kind)
                    a.k1 = tm_bits
                    pool.ans_timeout[kind] = a
                self.up_answer(app, s, a)
                if not app.in_touched:
                    app.in_touched = True
                    self.touched.append(app)
            self.up_release(s)
        self.up_flush_touched()
        if self.state == CONN_DRAINING and self.in_flight == 0 and self.transport is not None:
            self.transport.close()
        return 0

    cdef int up_flush(self) except -1:
        if self.out.len == 0:
            return 0
        if self.state == CONN_CONNECTING:
            # queued until connected: as much backpressure as a full write buffer
            self.backlog_bytes += self.out.len
            self.backlog.append(ob_take(&self.out))
            if self.backlog_bytes > self.engine.high_water:
                self.paused = True
        elif self.state != CONN_CLOSED and self.transport is not None:
            self.send_ob(&self.out)
        else:
            self.out.len = 0
        return 0

    cdef int flush_now(self) except -1:
        return self.up_flush()

    cdef int up_flush_touched(self) except -1:
        cdef OutboundConn d
        if not self.touched:
            return 0
        for d in self.touched:
            d.in_touched = False
            d.out_flush()
        self.touched.clear()
        return 0

    cdef int refuse_frame(self, FrameInfo* fi, int status, str why) except -1:
        # an answer too large for this side: its request is answered with the
        # reason instead, the connection and the other requests stay
        cdef Py_ssize_t s
        cdef OutboundConn app
        if not (fi.flags & FF_RESPONSE) or fi.seq_off < 0 or fi.seq_id < 0:
            return 0
        s = fi.seq_id & (self.cap - 1)
        if self.slots[s].id != fi.seq_id:
            return 0
        app = <OutboundConn>self.slots[s].app
        count_answer(self.engine, <Node>self.slots[s].node, status, self.slots[s].sent_at, mono(),
                     self.slots[s].shunt)
        if not app.closed:
            app.out_error(self.slots[s].orig_id, status, "the answer was refused: " + why, False,
                          self.slots[s].protocol)
            app.out_flush()
        self.up_release(s)
        return 0

    cdef int up_process(self) except -1:
        cdef FrameInfo fi
        cdef int k
        cdef Py_ssize_t r, s
        cdef uint8_t* p
        cdef OutboundConn app
        cdef Engine eng = self.engine
        cdef double now = self.last_active  # this read's time (buffer_updated): one clock read
        cdef int mode = 0                   # 1: send at once (touched), 2: batch (defer); 0: not asked
        while True:
            r = self.rb_next(&fi, &p)
            if r == 0:
                break
            if r < 0:
                if r == FE_TOO_LARGE:
                    k = self.rb_oversized(p)
                    if k == 1:
                        continue  # that request answered with status 5, the answer skipped
                    if k == 0:
                        break
                    self.up_flush_touched()
                    return 0
                self.up_flush_touched()
                self.malformed(r, "upstream")
                return 0
            if fi.msg_type == MT_HEARTBEAT or fi.msg_type == MT_SCANNER_HEARTBEAT:
                if not (fi.flags & FF_RESPONSE):
                    self.answer_heartbeat(&fi, &self.out)
                continue  # else: the answer to our own announce
            if fi.msg_type == MT_PROXY_RESTART:
                self._on_proxy_restart()
                continue
            if not (fi.flags & FF_RESPONSE) or fi.seq_off < 0:
                continue  # nothing a client side expects; ignore
            s = fi.seq_id & (self.cap - 1)
            if fi.seq_id < 0 or self.slots[s].id != fi.seq_id:
                continue  # late (timed out) or unknown: dropped
            app = <OutboundConn>self.slots[s].app
            if not self.proven:
                self.proven = True  # the peer serves: connecting to it is healthy again
                self.pool._on_conn_ok()
            count_answer(eng, <Node>self.slots[s].node, fi.status if fi.status >= 0 else STATUS_SUCCESS,
                         self.slots[s].sent_at, now, self.slots[s].shunt)
            if (fi.status == STATUS_TRANSPORT and self.slots[s].retry != NULL and not app.closed
                    and up_retry_answered(self, s, now)):
                continue  # an idempotent request the node could not deliver: sent again
            if not app.closed:
                fr_set_seq_id(p, &fi, self.slots[s].orig_id)
                ob_append(&app.out, <char*>p, r)
                if mode == 0:
                    mode = 1 if eng.read_solo() else 2
                if mode == 1:
                    if not app.in_touched:
                        app.in_touched = True
                        self.touched.append(app)
                elif not app.queued:
                    eng.defer(app)  # one write per app per loop iteration, whichever reads fed it
                eng.count.outbound_answers += 1
            self.up_release(s)
        if mode == 1:
            self.up_flush_touched()
        if self.state == CONN_DRAINING and self.in_flight == 0 and self.transport is not None:
            self.up_flush()
            self.transport.close()  # after ProxyRestart: nothing more is owed here
        elif self.out.len:
            eng.defer(self)
        return 0

    def _on_proxy_restart(self):
        # docs/protocol.md 7.3: out of the pool at once, keep reading what is owed
        if self.state == CONN_OPEN or self.state == CONN_CONNECTING:
            self.state = CONN_DRAINING
            if self in self.pool.conns:
                self.pool.conns.remove(self)
            self.engine.timed.add(self)  # keeps it swept and closed when empty
            self.engine.arm_timer()
            if self.in_flight == 0 and self.transport is not None:
                self.transport.close()

    # -- asyncio protocol

    def connection_made(self, transport):
        cdef list backlog
        self.set_transport(transport)
        if self.state == CONN_CONNECTING:
            self.state = CONN_OPEN
        self.made_at = mono()
        up_clear_pending(self)
        # the backoff is reset once the peer answers (up_process) or once the
        # connection has lived min_connection_life: a peer that accepts and
        # closes at once is backed off like one that refuses
        self.hb_id += 1
        backlog = self.backlog
        self.backlog = []
        self.backlog_bytes = 0
        self.paused = False
        transport.writelines([fr_proxy_announce(self.hb_id)] + backlog)
        if not self.paused:  # else: released by resume_writing
            self._release_waiters()

    def connect_failed(self, str why):
        """Called by the connector when the connection could not be made."""
        cdef dict unsent
        if self.out.len:
            self.backlog.append(ob_take(&self.out))  # staged this iteration: never written either
        unsent = self.up_unsent() if self.in_flight else None
        self.state = CONN_CLOSED
        self.closed = True
        self.backlog = []
        self.pool._on_conn_failed(self, why)
        up_gov_conn_done(self)
        up_clear_pending(self)
        # nothing here was ever written: each request goes to another node if there is one
        self.up_fail_all(STATUS_TRANSPORT, f"upstream {self.pool.address} unavailable: connect failed: {why}",
                         unsent)
        self._release_waiters()

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef double now = mono()
        cdef bint was_empty = self.rend == self.rstart
        cdef Py_ssize_t start
        self.rb_read(nbytes, now)
        self.last_active = now
        start = self.rstart
        self.up_process()
        self.rb_done(start, was_empty, now)

    def connection_lost(self, exc):
        cdef double lived = mono() - self.made_at
        was = self.state
        self.state = CONN_CLOSED
        self.closed = True
        if self in self.pool.conns:
            self.pool.conns.remove(self)
        up_gov_conn_done(self)
        self.engine.timed.discard(self)
        if self.made_at > 0 and was == CONN_OPEN and not self.proven:
            if lived < self.engine.min_life:
                # died young, closed by the peer: a failed connect (backoff)
                self.engine.count.early_closes += 1
                self.pool.n_early_closes += 1
                self.pool._back_off(f"the peer closed the connection {lived * 1000:.0f} ms "
                                    "after it was made")
            else:
                self.pool._on_conn_ok()
        if self.in_flight:
            self.up_fail_all(STATUS_TRANSPORT, f"upstream connection to {self.pool.address} closed"
                             + (f": {exc}" if exc else ""))
        self._release_waiters()
        self.rb_release()
        self.transport = None
        self._write = None
        self.fd = -1

    def _on_pause_writing(self):
        self.paused = True

    def _on_resume_writing(self):
        self.paused = False
        self._release_waiters()

    def _release_waiters(self):
        cdef OutboundConn d
        waiters = self.waiters
        self.waiters = []
        for d in waiters:
            d.resume(PAUSE_UPSTREAM)
