# ---------------------------------------------------------------- downstream

@cython.final
cdef class OutboundConn(Conn):
    """An app's connection to the outbound UDS listener."""

    def __cinit__(self, Engine engine):
        self.dests = []
        self.in_flight = 0

    cdef int out_error(self, int64_t seq_id, int status, str message, bint restart,
                       int protocol, object method=None, int32_t body_seq=0) except -1:
        """A local answer encoded on the spot (cold paths; see answer.pxi for
        the pre-encoded ones): a Thrift EXCEPTION body when a method is given,
        the request's checksum and compression bits kept (docs/protocol.md 11)."""
        self.engine.n_errors[status & (STATUS_SLOTS - 1)] += 1
        ob_append_bytes(&self.out, fr_error_answer(seq_id, status, message, restart, protocol,
                                                   method, body_seq))
        return 0

    cdef object out_method(self, const uint8_t* p, Py_ssize_t moff, Py_ssize_t mlen):
        """p[moff:moff + mlen] as bytes, the previous object when it is the
        same name: a connection calling one method makes none per request."""
        cdef bytes last = self.last_method
        if last is not None and PyBytes_GET_SIZE(last) == mlen \
                and memcmp(PyBytes_AS_STRING(last), p + moff, mlen) == 0:
            return last
        self.last_method = PyBytes_FromStringAndSize(<const char*>p + moff, mlen)
        return self.last_method

    cdef int out_answer(self, Answer a, int64_t seq_id, const uint8_t* p, Py_ssize_t moff,
                        Py_ssize_t mlen, int32_t body_seq) except -1:
        """A pre-encoded local answer (answer.pxi) with this request's ids."""
        self.engine.n_errors[a.status & (STATUS_SLOTS - 1)] += 1
        answer_into(&self.out, a, seq_id, <const char*>p + moff, mlen, body_seq)
        return 0

    cdef int out_flush(self) except -1:
        if self.out.len and not self.closed and self.transport is not None:
            self.send_ob(&self.out)
            if self.pause_mask & PAUSE_SELF:
                self.out_check_unread()
        else:
            self.out.len = 0
        return 0

    cdef int flush_now(self) except -1:
        return self.out_flush()

    cdef int out_check_unread(self) except -1:
        """Only while the app is not reading (paused): cut it off when what it
        leaves unread passes the hard limit, so it cannot grow the proxy."""
        cdef Py_ssize_t n = self.transport.get_write_buffer_size()
        if n > self.engine.max_unread:
            self.engine.n_slow_consumers += 1
            self.engine.log.warning(
                "closing app connection: it leaves %d bytes of answers unread "
                "(limits.max_unread_bytes = %d)", n, self.engine.max_unread)
            self.closed = True
            self.transport.abort()
        return 0

    cdef int out_process(self) except -1:
        cdef FrameInfo fi
        cdef Py_ssize_t r, s
        cdef uint8_t* p
        cdef int err = 0
        cdef Node node
        cdef UpstreamPool pool
        cdef UpstreamConn conn
        cdef Engine eng = self.engine
        cdef RouteTable table = eng.table
        cdef double now = mono()
        cdef double timeout
        cdef Pending* slot
        cdef Answer a
        cdef int kind
        cdef Py_ssize_t moff, mlen
        cdef int32_t body_seq
        eng.read_seq += 1
        while True:
            r = self.rb_next(&fi, &p)
            if r == 0:
                break
            if r < 0:
                self.out_flush_dests()
                if r == FE_TOO_LARGE:
                    self._answer_too_large(p, self.rend - self.rstart)
                self.out_flush()
                self.malformed(r, "app")
                return 0
            if fi.kind == FK_OCTO and fi.flags & (FF_GZIP | FF_SNAPPY) \
                    and self._answer_compressed(p, r, &fi):
                continue
            if fi.kind != FK_OCTO or fi.flags & (FF_GZIP | FF_SNAPPY):
                # nothing to route by and no sequence id to answer with
                # (docs/protocol.md 9, 10): close, never answer with an id the
                # app did not use
                self.out_flush_dests()
                self.out_flush()
                self.engine.log.warning(
                    "closing app connection: %s frames cannot be routed (no readable OCTO header); "
                    "see docs/protocol.md", "compressed" if fi.kind == FK_OCTO else "native Thrift")
                self.engine.n_malformed += 1
                self.transport.abort()
                return 0
            if fi.msg_type == MT_HEARTBEAT or fi.msg_type == MT_SCANNER_HEARTBEAT:
                if not (fi.flags & FF_RESPONSE):
                    self.answer_heartbeat(&fi, &self.out)
                continue
            if not (fi.flags & FF_REQUEST):
                continue  # apps send requests; anything else is ignored
            # local answers: pre-encoded per reason (answer.pxi), the request's
            # sequence id (and method, for a Thrift body) written in
            if eng.draining:
                eng.n_restart_answers += 1
                kind = answer_kind(p, &fi, &moff, &mlen, &body_seq)
                a = <Answer>eng.ans_restart[kind]
                if a is None:
                    a = make_answer(STATUS_RPC, "octo-proxy is hot-restarting: reconnect and retry",
                                    True, kind)
                    eng.ans_restart[kind] = a
                self.out_answer(a, fi.seq_id, p, moff, mlen, body_seq)
                continue
            if self.rejected:
                kind = answer_kind(p, &fi, &moff, &mlen, &body_seq)
                a = <Answer>eng.ans_conn_limit[kind]
                if a is None or a.k1 != eng.max_connections:
                    a = make_answer(STATUS_DEGRADE, f"overload: connection limit of "
                                    f"{eng.max_connections} app connections reached", False, kind)
                    a.k1 = eng.max_connections
                    eng.ans_conn_limit[kind] = a
                self.out_answer(a, fi.seq_id, p, moff, mlen, body_seq)
                continue
            if fi.call_type != CALL_ONEWAY and self.in_flight >= eng.max_in_flight:
                kind = answer_kind(p, &fi, &moff, &mlen, &body_seq)
                a = <Answer>eng.ans_overload[kind]
                if a is None or a.k1 != self.in_flight or a.k2 != eng.max_in_flight:
                    a = make_answer(STATUS_DEGRADE, f"overload: {self.in_flight} requests in "
                                    f"flight on this connection (limit {eng.max_in_flight})",
                                    False, kind)
                    a.k1 = self.in_flight
                    a.k2 = eng.max_in_flight
                    eng.ans_overload[kind] = a
                self.out_answer(a, fi.seq_id, p, moff, mlen, body_seq)
                continue
            node = table.rt_route(
                p + fi.appkey_off, fi.appkey_len, p + fi.service_off, fi.service_len,
                p + fi.liteset_off, fi.liteset_len, p + fi.set_off, fi.set_len,
                p + fi.swimlane_off, fi.swimlane_len, p + fi.hashkey_off, fi.hashkey_len, &err)
            if node is None:
                kind = answer_kind(p, &fi, &moff, &mlen, &body_seq)
                a = eng.route_answer(<const char*>p, &fi, err, kind)
                a.count += 1
                self.out_answer(a, fi.seq_id, p, moff, mlen, body_seq)
                continue
            pool = <UpstreamPool>node.upstream
            if pool is None:
                pool = eng.get_pool(node)
            conn = pool.pick()
            if conn is None:
                node.answers[<int>STATUS_TRANSPORT] += 1
                kind = answer_kind(p, &fi, &moff, &mlen, &body_seq)
                a = <Answer>pool.ans_unavailable[kind]
                if a is None or a.k3 is not pool.last_error:
                    a = make_answer(STATUS_TRANSPORT, f"upstream {pool.address} unavailable: "
                                    f"{pool.last_error}", False, kind)
                    a.k3 = pool.last_error
                    pool.ans_unavailable[kind] = a
                self.out_answer(a, fi.seq_id, p, moff, mlen, body_seq)
                continue
            if conn.fed_by != eng.read_seq:
                conn.fed_by = eng.read_seq
                self.dests.append(conn)
            timeout = eng.default_timeout if fi.timeout <= 0 else fi.timeout * 0.001
            if timeout > eng.max_timeout:
                timeout = eng.max_timeout
            s = conn.up_alloc(now + timeout)
            slot = &conn.slots[s]
            slot.orig_id = fi.seq_id
            slot.timeout_ms = <float>(timeout * 1000.0)
            slot.protocol = <uint8_t>fi.protocol
            slot.sent_at = now
            Py_INCREF(self)
            slot.app = <PyObject*>self
            Py_INCREF(node)
            slot.node = <PyObject*>node
            # kept for an error answer's Thrift EXCEPTION body (docs/protocol.md 11)
            moff = fr_error_call(p, &fi, &mlen, &body_seq)
            if moff < 0:
                slot.method = NULL
                slot.body_seq = 0
            else:
                method = self.out_method(p, moff, mlen)
                Py_INCREF(method)
                slot.method = <PyObject*>method
                slot.body_seq = body_seq
            # one-way (callType 1): tracked under an id of its own, so that an
            # answer, if the provider sends one (Dorado's do), reaches this
            # request and no other; it expires silently (docs/protocol.md 6.2)
            slot.oneway = fi.call_type == CALL_ONEWAY
            fr_set_seq_id(p, &fi, slot.id)
            ob_append(&conn.out, <char*>p, r)
            if slot.oneway:
                eng.n_oneway += 1
            else:
                self.in_flight += 1
                lb_on_send(node)
                eng.n_requests += 1
        if not self.dests and not self.out.len:
            return 0
        if eng.read_solo():
            self.out_flush_dests()
            self.out_flush()
            return 0
        if self.dests:
            # sent at the end of the loop iteration, with what other reads stage there;
            # an upstream connection already over its high mark pauses this app now
            for conn in self.dests:
                eng.defer(conn)
                if conn.paused and not conn.closed:
                    self.pause(PAUSE_UPSTREAM)
                    conn.waiters.append(self)
            self.dests.clear()
        if self.out.len:
            eng.defer(self)
        return 0

    cdef int out_flush_dests(self) except -1:
        """Now (before an error closes this connection): the upstream
        connections this read fed."""
        cdef UpstreamConn c
        if not self.dests:
            return 0
        for c in self.dests:
            c.up_flush()
            if c.paused and not c.closed:
                self.pause(PAUSE_UPSTREAM)
                c.waiters.append(self)
        self.dests.clear()
        return 0

    cdef bint _answer_compressed(self, uint8_t* p, Py_ssize_t r, FrameInfo* fi) except -1:
        """docs/protocol.md 9: read the compressed request's sequence id (and
        Thrift method) from the start of its decompressed bytes and answer it
        with status 5 under that id; False when even that cannot be read."""
        info = read_compressed_request(PyBytes_FromStringAndSize(<char*>p, r),
                                       max_header=self.engine.max_header)
        if info is None or not info["is_request"]:
            return False
        self.out_error(info["seq_id"], STATUS_PROTOCOL, "compressed frames are not supported "
                       "by the mesh: the proxy cannot route them (send them uncompressed)", False,
                       fi.protocol, info["method"],
                       info["body_seq_id"] if info["body_seq_id"] is not None else 0)
        return True

    cdef _answer_too_large(self, uint8_t* p, Py_ssize_t avail):
        """Answer an oversized request with ProtocolException when its header
        is already here (the frame itself is never buffered)."""
        cdef FrameInfo fi
        cdef Py_ssize_t total
        if avail < 8:
            return
        total = 8 + ((<Py_ssize_t>p[4] << 24) | (p[5] << 16) | (p[6] << 8) | p[7])
        if fr_scan_header(p, avail, self.engine.max_header, &fi) > 0 and fi.seq_off >= 0 \
                and fi.flags & FF_REQUEST:
            self.out_error(fi.seq_id, STATUS_PROTOCOL, f"frame of {total} bytes exceeds the limit of "
                          f"{self.engine.max_frame} bytes (limits.max_frame_bytes)", False, fi.protocol)

    # -- asyncio protocol

    def connection_made(self, transport):
        self.set_transport(transport)
        if len(self.engine.outbounds) >= self.engine.max_connections:
            self.rejected = True
            self.engine.log.warning("app connection limit (%d) reached: answering with overload",
                                    self.engine.max_connections)
        self.engine.outbounds.add(self)

    def buffer_updated(self, Py_ssize_t nbytes):
        self.rend += nbytes
        self.out_process()
        if self.rejected and self.transport is not None:
            self.out_flush()  # before close: a closing transport drops what is written after
            self.transport.close()
        self.rb_compact()

    def connection_lost(self, exc):
        self.closed = True
        self.engine.outbounds.discard(self)
        self.transport = None
        self._write = None
        self.fd = -1


