# ---------------------------------------------------------------- downstream

cdef Answer gov_answer(ServiceGov g, int code, int kind):
    """A governance refusal (status 6 naming the limit), pre-encoded per
    reason and kind in the service's governance object; encoded again after
    its rules change (ServiceGov.answers is reset then)."""
    cdef Answer a
    if g.answers is None or len(g.answers) < len(g.reasons) * ANSWER_KINDS:
        g.answers = [None] * (len(g.reasons) * ANSWER_KINDS)
    a = <Answer>g.answers[code * ANSWER_KINDS + kind]
    if a is None:
        a = make_answer(STATUS_DEGRADE, g.reasons[code], False, kind)
        g.answers[code * ANSWER_KINDS + kind] = a
    return a


cdef Answer shunt_answer(RouteTable t, ShuntStat st, int kind):
    """A shunting rule's refusal (status 8 naming the rule, its group has no
    node for the request), pre-encoded per kind in the rule's counters;
    encoded again when the rule changes (ShuntStat.answers is reset then)."""
    cdef Answer a
    if st.answers is None:
        st.answers = [None] * ANSWER_KINDS
    a = <Answer>st.answers[kind]
    if a is None:
        a = make_answer(STATUS_SERVICE, t.shunt_message(st), False, kind)
        st.answers[kind] = a
    return a


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
        if self.out.len and not self.closed and self.transport is not None and not self.eof_sent:
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
            self.engine.count.slow_consumers += 1
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
        cdef int k
        cdef bint oneway
        cdef Signer signer = self.signer
        cdef _Hmac skey = None
        eng.read_seq += 1
        # the context keys the shunting rules read, picked out by the scan
        self.want = table.want
        while True:
            r = self.rb_next(&fi, &p)
            if r == 0:
                break
            if r < 0:
                if r == FE_TOO_LARGE:
                    k = self.rb_oversized(p)
                    if k == 1:
                        continue  # answered (status 5), its bytes are skipped
                    if k == 0:
                        break  # its header is still coming
                    self.out_flush_dests()
                    self.out_flush()
                    return 0
                self.out_flush_dests()
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
                self.engine.count.malformed_frames += 1
                self.transport.abort()
                return 0
            if fi.msg_type == MT_HEARTBEAT or fi.msg_type == MT_SCANNER_HEARTBEAT:
                if not (fi.flags & FF_RESPONSE):
                    if fi.flags & FF_RESTART_NOTICE:
                        self.wants_notice = True
                    self.answer_heartbeat(&fi, &self.out)
                continue
            if not (fi.flags & FF_REQUEST):
                # apps send requests (docs/protocol.md 6.5): anything else is
                # ignored, counted and logged with the app's pid/uid
                if fi.msg_type == MT_PROXY_RESTART:
                    eng.count.ignored_proxy_restart += 1
                    what = "ProxyRestart"
                else:
                    eng.count.ignored_response += 1
                    what = "response" if fi.flags & FF_RESPONSE else "non-request"
                eng.log.warning("ignoring a %s frame from app %s: apps send requests only",
                                what, _peer_name(self.transport))
                continue
            oneway = fi.call_type == CALL_ONEWAY
            if eng.stopping:
                eng.count.shutdown_answers += 1
                self.out_refuse(&fi, STATUS_DEGRADE, "octo-proxy is shutting down: it takes no "
                                "new requests; retry on another instance")
                continue
            if fi.gctx_len > eng.max_gctx or fi.lctx_len > eng.max_lctx:
                eng.count.context_rejects += 1
                if fi.gctx_len > eng.max_gctx:
                    self.out_refuse(&fi, STATUS_PROTOCOL, f"globalContext of {fi.gctx_len} bytes "
                                    f"exceeds the limit of {eng.max_gctx} bytes "
                                    "(limits.max_global_context_bytes)")
                else:
                    self.out_refuse(&fi, STATUS_PROTOCOL, f"localContext of {fi.lctx_len} bytes "
                                    f"exceeds the limit of {eng.max_lctx} bytes "
                                    "(limits.max_local_context_bytes)")
                continue
            # local answers: pre-encoded per reason (answer.pxi), the request's
            # sequence id (and method, for a Thrift body) written in
            if eng.draining:
                eng.count.restart_answers += 1
                kind = answer_kind(p, &fi, &moff, &mlen, &body_seq)
                a = <Answer>eng.ans_restart[kind]
                if a is None:
                    a = make_answer(STATUS_RPC, "octo-proxy is hot-restarting: reconnect and retry",
                                    True, kind)
                    eng.ans_restart[kind] = a
                self.out_answer(a, fi.seq_id, p, moff, mlen, body_seq)
                continue
            if not oneway and self.in_flight >= eng.max_in_flight:
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
            if not oneway and eng.total_in_flight >= eng.max_in_flight_total:
                eng.count.inflight_rejects += 1
                self.out_error(fi.seq_id, STATUS_DEGRADE, f"overload: {eng.total_in_flight} requests "
                               "in flight in this proxy (limits.max_inflight_total)", False,
                               fi.protocol)
                continue
            skey = None
            if signer is not None:
                skey = signer.key_for(p + fi.caller_off, fi.caller_len)
                if skey is None or fi.header_len + au_sign_extra(&fi) > 0xFFFF:
                    # service authentication (docs/auth.md): only the listener's own apps
                    # are signed for
                    au_refuse_outbound(self, signer, p, &fi,
                                       fi.header_len + au_sign_extra(&fi) > 0xFFFF)
                    continue
            timeout = eng.default_timeout if fi.timeout <= 0 else fi.timeout * 0.001
            if timeout > eng.max_timeout:
                timeout = eng.max_timeout
            self.out_send(p, r, &fi, now, now + timeout, 1, None, skey)
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

    cdef int out_send(self, uint8_t* p, Py_ssize_t r, FrameInfo* fi, double now, double deadline,
                      int attempt, Node avoid, _Hmac skey) except -1:
        """Route one request and stage it for its upstream connection: the
        governance checks of its service (breakers, adaptive limit, caller
        rate limits, docs/governance.md), and a pick of another node when the
        chosen node's connection is backed off (never written: always safe to
        move).  `avoid`: the node a retry comes from; when only that node is
        left the request is neither sent nor answered and 1 is returned (the
        caller answers it).  p[0:r] is the request with the app's sequence
        id; it is rewritten in place."""
        cdef Engine eng = self.engine
        cdef RouteTable table = eng.table
        cdef int err = 0, code, tries = 0
        cdef Node node
        cdef UpstreamPool pool = None
        cdef UpstreamConn conn = None
        cdef ServiceGov g = None
        cdef Py_ssize_t s
        cdef Pending* slot
        cdef Answer a
        cdef int kind
        cdef Py_ssize_t moff, mlen
        cdef int32_t body_seq
        cdef bint oneway = fi.call_type == CALL_ONEWAY
        cdef bint is_retry = avoid is not None
        cdef object method
        cdef _Hmac key
        cdef PyObject* rule = NULL
        cdef bint labelled = False
        while True:
            # the service's shunting rules, then cell/lane routing (docs/shunting.md)
            node = table.rt_route_req(p, fi, &err)
            rule = table.last_rule
            if node is None:
                if pool is not None:
                    break  # a backed-off node before: say so below
                kind = answer_kind(p, fi, &moff, &mlen, &body_seq)
                if err == RT_SHUNT_NO_NODE:
                    a = shunt_answer(table, <ShuntStat>rule, kind)
                else:
                    a = eng.route_answer(<const char*>p, fi, err, kind)
                    a.count += 1
                self.out_answer(a, fi.seq_id, p, moff, mlen, body_seq)
                return 0
            if node is avoid:
                if tries < MAX_UNSENT_TRIES:
                    tries += 1  # a retry goes to another node when there is one
                    continue
                if is_retry:
                    return 1
            pool = <UpstreamPool>node.upstream
            if pool is None:
                pool = eng.get_pool(node)
            g = (<NodeGov>node.gov).svc if node.gov is not None else None
            if g is not None and g.max_connections > 0 and g.connections >= g.max_connections \
                    and not pool.conns:
                # the service's connections are all open elsewhere and this
                # node needs a new one: refused (circuit breaker, never written)
                g.n_cb[GV_MAX_CONNECTIONS - 1] += 1
                if oneway:
                    eng.count.gov_dropped += 1
                else:
                    kind = answer_kind(p, fi, &moff, &mlen, &body_seq)
                    self.out_answer(gov_answer(g, GV_MAX_CONNECTIONS, kind), fi.seq_id, p, moff,
                                    mlen, body_seq)
                return 0
            conn = pool.pick(g)
            if conn is not None:
                break
            # the node's connection is backed off after a failed connect: the
            # request was never written anywhere, so another node may take it
            node.answers[<int>STATUS_TRANSPORT] += 1
            if node.gov is not None:
                gv_on_answer(<NodeGov>node.gov, STATUS_TRANSPORT, 0.0)
            tries += 1
            if tries >= MAX_UNSENT_TRIES:
                break
            avoid = node
            is_retry = False  # the next node is a first write, not a retry
            if node.gov is not None:
                g = (<NodeGov>node.gov).svc
                g.n_retries += 1
                g.n_retries_unsent += 1
                g = None
        if conn is None:
            kind = answer_kind(p, fi, &moff, &mlen, &body_seq)
            a = <Answer>pool.ans_unavailable[kind]
            if a is None or a.k3 is not pool.last_error:
                a = make_answer(STATUS_TRANSPORT, f"upstream {pool.address} unavailable: "
                                f"{pool.last_error}", False, kind)
                a.k3 = pool.last_error
                pool.ans_unavailable[kind] = a
            self.out_answer(a, fi.seq_id, p, moff, mlen, body_seq)
            return 0
        if node.gov is not None:
            g = (<NodeGov>node.gov).svc
            code = gv_outbound(g, p, fi, node.in_flight, now)
            if (code == GV_OK and g.max_pending > 0 and conn.state == CONN_CONNECTING
                    and g.pending >= g.max_pending):
                g.n_cb[GV_MAX_PENDING - 1] += 1
                code = GV_MAX_PENDING
            if code != GV_OK:
                if oneway:
                    eng.count.gov_dropped += 1
                else:
                    kind = answer_kind(p, fi, &moff, &mlen, &body_seq)
                    self.out_answer(gov_answer(g, code, kind), fi.seq_id, p, moff, mlen, body_seq)
                return 0
        if conn.fed_by != eng.read_seq:
            conn.fed_by = eng.read_seq
            self.dests.append(conn)
        s = conn.up_alloc(deadline)
        slot = &conn.slots[s]
        slot.orig_id = fi.seq_id
        slot.timeout_ms = <float>((deadline - now) * 1000.0)
        slot.protocol = <uint8_t>fi.protocol
        slot.sent_at = now
        slot.attempt = <uint8_t>attempt
        Py_INCREF(self)
        slot.app = <PyObject*>self
        Py_INCREF(node)
        slot.node = <PyObject*>node
        if rule != NULL:
            Py_INCREF(<object>rule)  # the access log names the rule
        slot.shunt = rule
        # kept for an error answer's Thrift EXCEPTION body (docs/protocol.md 11)
        moff = fr_error_call(p, fi, &mlen, &body_seq)
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
        slot.oneway = oneway
        if g is not None and not oneway:
            Py_INCREF(g)
            slot.gov = <PyObject*>g
            slot.gflags = GF_COUNTED
            g.inflight += 1
            if conn.state == CONN_CONNECTING:
                slot.gflags |= GF_PENDING
                g.pending += 1
            if attempt > 1:
                slot.gflags |= GF_RETRY
                g.retries_active += 1
            if attempt < g.max_attempts and gv_may_retry(g, p, fi) and gv_budget(g):
                # a copy with the app's id, for executing it again: only when a
                # retry is possible now (idempotent method, attempts and budget left)
                slot.retry = rc_copy(<const char*>p, r)
                slot.retry_len = r
        fr_set_seq_id(p, fi, slot.id)
        key = skey
        if key is None and self.signer is not None:
            key = self.signer.key_for(p + fi.caller_off, fi.caller_len)
        if table.last_label >= 0:
            # a context rule set a routing label: the provider gets it too
            # (docs/shunting.md), written straight into the staged output
            labelled = fi.kind == FK_OCTO and out_label_append(&conn.out, table, p, fi, key, node)
            if not labelled:
                # routed by the label all the same, but it cannot carry it
                eng.count.label_unwritten += 1
        if labelled:
            if key is not None:
                self.signer.n_signed += 1
        elif key is not None:
            # signed for its app (docs/auth.md): the copy with octo-auth is what is sent
            au_sign_append(&conn.out, p, fi, key, node)
            self.signer.n_signed += 1
        else:
            ob_append(&conn.out, <char*>p, r)
        if oneway:
            eng.count.oneway_requests += 1
        else:
            self.in_flight += 1
            eng.total_in_flight += 1
            lb_on_send(node)
            eng.count.outbound_requests += 1
        return 0

    cdef int out_resend(self, bytes frame, int64_t orig_id, double deadline, int attempt,
                        Node avoid, bint unsent) except -1:
        """Send a request again (a retry): `frame` is its bytes with any
        sequence id; the app's id and the original deadline are restored, and
        it is written at once.  Returns out_send's result (1: no node but
        `avoid` is left)."""
        cdef bytes cp = PyBytes_FromStringAndSize(PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
        cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(cp)
        cdef Py_ssize_t r
        cdef FrameInfo fi
        cdef ServiceGov g
        cdef int res
        r = fr_scan(p, PyBytes_GET_SIZE(cp), self.engine.max_frame, self.engine.max_header, &fi)
        if r <= 0 or self.closed:
            return 0
        fr_set_seq_id(p, &fi, orig_id)
        fi.seq_id = orig_id
        self.engine.read_seq += 1  # its own batch: out_flush_dests below writes it
        res = self.out_send(p, r, &fi, mono(), deadline, attempt, avoid, None)
        if res == 0 and avoid.gov is not None:
            g = (<NodeGov>avoid.gov).svc
            g.n_retries += 1
            if unsent:
                g.n_retries_unsent += 1
        self.out_flush_dests()
        return res

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

    cdef int out_refuse(self, FrameInfo* fi, int status, str message) except -1:
        """Answer a request the proxy will not take (one-way ones too,
        docs/protocol.md 6.2)."""
        self.out_error(fi.seq_id, status, message, False, fi.protocol)
        return 0

    cdef int refuse_frame(self, FrameInfo* fi, int status, str why) except -1:
        # a frame too large (or over the buffer budget): answer it alone
        if fi.flags & FF_REQUEST and fi.seq_off >= 0:
            self.out_refuse(fi, status, why)
            self.out_flush()
        return 0

    # -- asyncio protocol

    def connection_made(self, transport):
        cdef Engine eng = self.engine
        self.last_rx = self.progress_at = mono()
        if len(eng.outbounds) >= eng.max_connections:
            # over the limit: closed at once, so the limit bounds open fds
            eng.count.rejected_app += 1
            eng.log.warning("app connection limit (%d, limits.max_connections) reached: closing "
                            "the connection from %s", eng.max_connections, _peer_name(transport))
            self.closed = True
            transport.abort()
            return
        self.set_transport(transport)
        eng.outbounds.add(self)

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef double now = mono()
        cdef bint was_empty = self.rend == self.rstart
        cdef Py_ssize_t start
        if self.eof_sent:
            return  # after our FIN: discarded (Conn.end_stream)
        self.rb_read(nbytes, now)
        start = self.rstart
        self.out_process()
        self.rb_done(start, was_empty, now)

    def connection_lost(self, exc):
        self.closed = True
        self.engine.outbounds.discard(self)
        self.dests.clear()
        self.rb_release()
        self.transport = None
        self._write = None
        self.fd = -1


cdef bint out_label_append(OutBuf* ob, RouteTable table, const uint8_t* p, FrameInfo* fi,
                           _Hmac key, Node node) except -1:
    """Append to ob the copy of request p/fi whose globalContext carries the
    label the matched context rule set (table.last_label*), signed with key
    unless None (then as au_sign_append would).  False, nothing appended,
    when it cannot be written (its header, signed if key, would exceed 65535
    bytes): then the request is sent as it came.  The copy's FrameInfo is
    derived, not scanned (fr_gctx_put_fi)."""
    cdef const char* k
    cdef Py_ssize_t klen, voff, olen, n, room, extra, plen = 0
    cdef int t = table.last_label
    cdef FrameInfo lfi
    cdef char* tmp
    cdef const char* provider
    if t == 0:
        k = b"octo-liteset"
        voff = fi.liteset_off
        olen = fi.liteset_len
    elif t == 1:
        k = b"octo-set"
        voff = fi.set_off
        olen = fi.set_len
    else:
        k = b"octo-swimlane"
        voff = fi.swimlane_off
        olen = fi.swimlane_len
    klen = strlen(k)
    if olen < 0:
        voff = -1
    room = fi.length + FR_GCTX_PUT_EXTRA + klen + table.last_label_len
    if key is None:
        if ob.len + room > ob.cap:
            ob_reserve(ob, room)
        n = fr_gctx_put(ob.data + ob.len, p, fi, k, klen, voff, olen,
                        table.last_label_val, table.last_label_len)
        if n < 0:
            return False
        ob.len += n
        return True
    # signed: the labelled copy is staged in ob past the room its signed
    # copy needs, and signed from there to ob's end (what au_sign_append does)
    extra = au_sign_extra(fi)       # the same for the copy: caller and localContext are kept
    if fr_gctx_put_fi(&lfi, fi, k, klen, voff, olen, table.last_label_len) < 0 \
            or lfi.header_len + extra > 0xFFFF:
        return False
    if ob.len + room + extra + room > ob.cap:
        ob_reserve(ob, room + extra + room)
    tmp = ob.data + ob.len + room + extra
    fr_gctx_put(tmp, p, fi, k, klen, voff, olen, table.last_label_val, table.last_label_len)
    provider = PyUnicode_AsUTF8AndSize(node.appkey, &plen)
    n = au_sign_into(ob.data + ob.len, <const uint8_t*>tmp, &lfi, key, provider, plen,
                     au_now_s())
    if n < 0:
        raise MemoryError("signing a request")
    ob.len += n
    return True
