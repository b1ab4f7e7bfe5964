# ---------------------------------------------------------------- inbound

cdef bytes _thrift_refusal(const uint8_t* p, FrameInfo* fi, str message):
    from octoproxy._core.frame import encode_thrift_exception
    cdef bytes name = (<const char*>p)[fi.service_off:fi.service_off + fi.service_len]
    cdef bytes body = encode_thrift_exception(name, <int32_t>fi.seq_id, message)
    return (<uint32_t>len(body)).to_bytes(4, "big") + body


@cython.final
cdef class InboundConn(Conn):
    """A connection on the provider's registered TCP port, from a client-side
    proxy or a legacy OCTO client; paired 1:1 with a UDS connection to the
    provider app, so sequence ids pass through unchanged."""

    def __cinit__(self, Engine engine, str provider_path):
        self.provider_path = provider_path
        self.reply.data = NULL
        self.reply.len = self.reply.cap = 0
        self.backlog = []
        self.in_flight = 0

    def __dealloc__(self):
        ob_free(&self.reply)

    cdef int in_flush(self) except -1:
        cdef ProviderConn pv = self.provider
        # B pairs one inbound with one provider connection: a read here has
        # nothing to share a write with, so it is sent at once
        if self.reply.len:
            if not self.closed and self.transport is not None and not self.eof_sent:
                self.send_ob(&self.reply)
            else:
                self.reply.len = 0
        if self.out.len and self.closed:
            self.out.len = 0
        elif self.out.len:
            if pv is None or pv.transport is None:
                if pv is not None and pv.closed:
                    self.out.len = 0
                    return 0
                self.backlog.append(ob_take(&self.out))
                self.pause(PAUSE_PEER)  # bounded: stop reading until the provider is there
            else:
                pv.send_ob(&self.out)
        return 0

    cdef int in_process(self, double now) except -1:
        cdef FrameInfo fi
        cdef Py_ssize_t r
        cdef int k
        cdef double timeout
        cdef uint8_t* p
        cdef Engine eng = self.engine
        cdef Verifier v = self.verifier
        cdef int64_t now_ms = au_now_ms() if v is not None else 0
        cdef Py_ssize_t vmoff = 0, vmlen = 0
        cdef ServiceGov g = self.gov
        cdef bint verified
        cdef int code, kind
        cdef Py_ssize_t moff, mlen
        cdef int32_t body_seq
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
                        break
                    self.in_flush()
                    return 0
                self.in_flush()
                self.malformed(r, "inbound")
                return 0
            if fi.msg_type == MT_HEARTBEAT:
                # peer-to-peer: answered here (it may announce a proxy); a
                # ScannerHeartbeat goes on to the provider, whose health it checks
                if not (fi.flags & FF_RESPONSE):
                    if fi.flags & FF_PROXY_ANNOUNCE:
                        self.is_proxy = True
                    self.answer_heartbeat(&fi, &self.reply)
                continue
            verified = False
            if v is not None and fi.flags & FF_REQUEST and fi.msg_type <= MT_NORMAL:
                # service authentication (docs/auth.md): verified before forwarding
                code = au_verify(v, p, &fi, now_ms, &vmoff, &vmlen)
                verified = code == AU_OK
                if code != AU_OK:
                    if v.enforce:
                        au_refuse_inbound(self, v, code, p, &fi, vmoff, vmlen)
                        continue
                    v.n_logged += 1
                    eng.log.warning("auth (log-only) forwarded a request that fails: %s",
                                    _au_reason(v, code, p, &fi, vmoff, vmlen))
            if g is not None and fi.flags & FF_REQUEST and fi.msg_type <= MT_NORMAL:
                # provider-side limits (docs/governance.md): refused here, at once;
                # the caller is octo-auth's signed caller once verified, else
                # traceInfo.clientAppkey, else octo-auth's caller unverified
                if fi.auth_app_len >= 0 and (verified or fi.caller_len < 0):
                    fi.caller_off = fi.auth_app_off
                    fi.caller_len = fi.auth_app_len
                code = gv_inbound(g, p, &fi, now)
                if code != GV_OK:
                    if fi.call_type == CALL_ONEWAY:
                        eng.count.gov_dropped += 1
                    else:
                        eng.n_errors[<int>STATUS_DEGRADE] += 1
                        if fi.kind == FK_OCTO:
                            kind = answer_kind(p, &fi, &moff, &mlen, &body_seq)
                            answer_into(&self.reply, gov_answer(g, code, kind), fi.seq_id,
                                        <const char*>p + moff, mlen, body_seq)
                        else:
                            # a native Thrift caller reads a Thrift EXCEPTION message
                            ob_append_bytes(&self.reply, _thrift_refusal(p, &fi, g.reasons[code]))
                    continue
            if (fi.flags & FF_REQUEST) and fi.call_type != CALL_ONEWAY:
                if eng.stopping:
                    eng.count.shutdown_answers += 1
                    self.in_error(&fi, STATUS_DEGRADE, "octo-proxy is shutting down: it takes no "
                                  "new requests; retry on another instance")
                    continue
                if eng.total_in_flight >= eng.max_in_flight_total:
                    eng.count.inflight_rejects += 1
                    self.in_error(&fi, STATUS_DEGRADE, f"overload: {eng.total_in_flight} requests "
                                  "in flight in this proxy (limits.max_inflight_total)")
                    continue
                # owed until the provider answers or the caller's deadline passes
                timeout = eng.default_timeout if fi.timeout <= 0 else fi.timeout * 0.001
                if timeout > eng.max_timeout:
                    timeout = eng.max_timeout
                if now + timeout > self.deadline:
                    self.deadline = now + timeout
                self.in_flight += 1
                eng.total_in_flight += 1
                eng.count.inbound_requests += 1
                self.served = True
            ob_append(&self.out, <char*>p, r)
        self.in_flush()
        if eng.draining and self.served and not self.is_proxy:
            self.in_end_when_idle()  # a legacy client's read during a drain: its last one
        return 0

    cdef int in_end_when_idle(self) except -1:
        """Hot-restart drain, for a legacy client (no restart notice exists
        for it): read nothing more from this connection, ever, and end it
        (FIN after its answers) as soon as nothing read here is owed.  What
        the client sent after its last read is never executed; it sees the
        end of stream and sends it again on a new connection, which the new
        generation accepts.  Ending the connection with a request still at
        the provider would lose an answer to a request that was executed (a
        client that sends it again executes it twice)."""
        if self.closed or self.transport is None:
            return 0
        if not self.ending:
            self.ending = True
            self.pause(PAUSE_CLOSING)
        if self.in_flight == 0 and not self.eof_sent:
            self.in_flush()  # what is staged goes before the FIN
            self.end_stream()
        return 0

    cdef int in_error(self, FrameInfo* fi, int status, str message) except -1:
        if fi.seq_off >= 0:
            self.engine.n_errors[status & (STATUS_SLOTS - 1)] += 1
            ob_append_bytes(&self.reply, fr_error_response(fi.seq_id, status, message, False,
                                                           fi.protocol & PROTO_SERIAL_MASK))
        return 0

    cdef int in_expire(self, double now) except -1:
        """Every request here is past its caller's deadline: the caller
        answered itself (timeout); nothing is owed any more."""
        if self.in_flight > 0 and now > self.deadline:
            self.engine.total_in_flight -= self.in_flight
            self.in_flight = 0
        return 0

    cdef int refuse_frame(self, FrameInfo* fi, int status, str why) except -1:
        # a request too large for this side: answer it alone, keep the
        # connection (the client side's other requests share it)
        if fi.flags & FF_REQUEST and fi.call_type != CALL_ONEWAY:
            self.in_error(fi, status, why)
            self.in_flush()
        return 0

    def send_proxy_restart(self):
        """Hot restart: tell a client-side proxy to move to a fresh connection."""
        if self.is_proxy and not self.restart_sent and not self.closed:
            self.restart_sent = True
            self.in_flush()  # what is staged goes first
            self.via_transport = True
            self._write(fr_proxy_restart())

    # -- asyncio protocol

    def connection_made(self, transport):
        self.set_transport(transport)
        self.last_rx = self.progress_at = mono()
        if len(self.engine.inbounds) >= self.engine.max_connections:
            self.engine.count.rejected_inbound += 1
            self.engine.log.warning("inbound connection limit (%d, limits.max_connections) reached: "
                                    "closing %s", self.engine.max_connections, _peer_name(transport))
            self.closed = True
            transport.abort()
            return
        self.engine.inbounds.add(self)
        self.provider = ProviderConn(self.engine, self)
        self.engine.connector(self.provider, None, self.provider_path)

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef double now = mono()
        cdef bint was_empty = self.rend == self.rstart
        cdef Py_ssize_t start
        if self.eof_sent:
            return  # after our FIN: discarded (Conn.end_stream)
        self.rb_read(nbytes, now)
        start = self.rstart
        self.in_process(now)
        self.rb_done(start, was_empty, now)

    def connection_lost(self, exc):
        cdef ProviderConn pv = self.provider
        self.closed = True
        self.engine.inbounds.discard(self)
        self.engine.total_in_flight -= self.in_flight
        self.in_flight = 0
        # break the InboundConn <-> ProviderConn cycle now, so both (and
        # their buffers) go with their last reference, not at the next GC
        self.provider = None
        if pv is not None and pv.transport is not None:
            pv.transport.close()
        self.backlog = []
        ob_free(&self.reply)
        self.rb_release()
        self.transport = None
        self._write = None
        self.fd = -1

    def _on_pause_writing(self):
        # the peer does not read its answers: stop reading the provider, and
        # the peer itself (heartbeats answered here count toward it too)
        self.pause(PAUSE_SELF)
        if self.provider is not None:
            self.provider.pause(PAUSE_PEER)

    def _on_resume_writing(self):
        self.resume(PAUSE_SELF)
        if self.provider is not None:
            self.provider.resume(PAUSE_PEER)

    def _provider_ready(self):
        backlog = self.backlog
        self.backlog = []
        if backlog and self.provider is not None:
            self.provider.via_transport = True
            self.provider._write(b"".join(backlog))
        self.resume(PAUSE_PEER)

    def _provider_failed(self, str why):
        self.engine.log.warning("provider %s unavailable (%s): closing inbound connection %s",
                                self.provider_path, why, _peer_name(self.transport))
        self.backlog = []
        if self.transport is not None:
            self.transport.close()


@cython.final
cdef class ProviderConn(Conn):
    """The UDS connection from an inbound connection to the provider app."""

    def __cinit__(self, Engine engine, InboundConn inbound):
        self.inbound = inbound

    cdef int refuse_frame(self, FrameInfo* fi, int status, str why) except -1:
        # an answer too large to pass: the caller gets the reason instead
        cdef InboundConn ic = self.inbound
        if fi.flags & FF_RESPONSE and fi.seq_off >= 0 and not ic.closed:
            if ic.in_flight > 0:
                ic.in_flight -= 1
                self.engine.total_in_flight -= 1
            ic.in_error(fi, status, "the provider's answer was refused: " + why)
            ic.in_flush()
            if ic.ending and ic.in_flight == 0:
                ic.in_end_when_idle()
        return 0

    cdef int pv_process(self) except -1:
        cdef FrameInfo fi
        cdef int k
        cdef Py_ssize_t r
        cdef uint8_t* p
        cdef InboundConn ic = self.inbound
        cdef Engine eng = self.engine
        while True:
            r = self.rb_next(&fi, &p)
            if r == 0:
                break
            if r < 0:
                if r == FE_TOO_LARGE:
                    k = self.rb_oversized(p)
                    if k == 1:
                        continue  # the caller got status 5 instead, the answer is skipped
                    if k == 0:
                        break
                    ic.in_flush()
                    return 0
                ic.in_flush()
                self.malformed(r, "provider")
                return 0
            if (fi.flags & FF_RESPONSE) and fi.msg_type != MT_HEARTBEAT and ic.in_flight > 0:
                ic.in_flight -= 1
                eng.total_in_flight -= 1
                eng.count.inbound_answers += 1
            ob_append(&ic.reply, <char*>p, r)
        ic.in_flush()
        if ic.ending and ic.in_flight == 0:
            ic.in_end_when_idle()  # the last answer a draining legacy client was owed
        return 0

    def connection_made(self, transport):
        self.set_transport(transport)
        if self.inbound.closed:
            transport.close()
            return
        self.inbound._provider_ready()

    def connect_failed(self, str why):
        self.closed = True
        self.inbound._provider_failed(why)

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef double now = mono()
        cdef bint was_empty = self.rend == self.rstart
        cdef Py_ssize_t start
        self.rb_read(nbytes, now)
        start = self.rstart
        self.pv_process()
        self.rb_done(start, was_empty, now)

    def connection_lost(self, exc):
        self.closed = True
        self.rb_release()
        self.transport = None
        self._write = None
        self.fd = -1
        if not self.inbound.closed and self.inbound.transport is not None:
            # the requests in flight cannot be answered any more: closing the
            # inbound connection makes the client side answer them at once
            self.inbound.transport.close()

    def _on_pause_writing(self):
        self.inbound.pause(PAUSE_PEER)

    def _on_resume_writing(self):
        self.inbound.resume(PAUSE_PEER)
