cdef inline double mono() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


# ---------------------------------------------------------------- OutBuf

cdef int ob_reserve(OutBuf* ob, Py_ssize_t extra) except -1:
    cdef Py_ssize_t want = ob.len + extra
    cdef Py_ssize_t cap
    cdef char* p
    if want <= ob.cap:
        return 0
    cap = ob.cap * 2 if ob.cap else 4096
    while cap < want:
        cap *= 2
    p = <char*>realloc(ob.data, cap)
    if p == NULL:
        raise MemoryError()
    ob.data = p
    ob.cap = cap
    return 0


cdef inline int ob_append(OutBuf* ob, const char* src, Py_ssize_t n) except -1:
    if ob.len + n > ob.cap:
        ob_reserve(ob, n)
    memcpy(ob.data + ob.len, src, n)
    ob.len += n
    return 0


cdef inline int ob_append_bytes(OutBuf* ob, bytes b) except -1:
    return ob_append(ob, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))


cdef inline object ob_take(OutBuf* ob):
    """The staged bytes as one bytes object; the buffer is emptied (and shrunk if it grew big)."""
    cdef object b = PyBytes_FromStringAndSize(ob.data, ob.len)
    ob.len = 0
    if ob.cap > 1048576:
        free(ob.data)
        ob.data = NULL
        ob.cap = 0
    return b


cdef inline void ob_free(OutBuf* ob) noexcept:
    free(ob.data)
    ob.data = NULL
    ob.len = ob.cap = 0


cdef inline str str_replacing(const char* base, Py_ssize_t off, Py_ssize_t n):
    """base[off:off+n] as text, None when absent (n < 0): bytes that are not
    UTF-8 become U+FFFD.  For what the proxy writes itself (an answer's
    message, a metric label, a log line), which must encode as UTF-8; the
    codec's str_lossless (frame.pyx) keeps the bytes instead."""
    if n < 0:
        return None
    return base[off:off + n].decode("utf-8", "replace")


# ---------------------------------------------------------------- Conn

cdef class Conn:
    """Receive-buffer handling shared by every connection of the data path."""

    def __cinit__(self, Engine engine, *args):
        self.engine = engine
        self.rcap = engine.read_buffer
        self.rbuf = <char*>malloc(self.rcap)
        if self.rbuf == NULL:
            raise MemoryError()
        self.rstart = self.rend = 0
        self.out.data = NULL
        self.out.len = self.out.cap = 0
        self.fd = -1
        self.via_transport = True

    def __dealloc__(self):
        free(self.rbuf)
        self.rbuf = NULL
        ob_free(&self.out)

    def get_buffer(self, Py_ssize_t sizehint):
        if self.rend == self.rcap and self.rb_compact():
            if self.rb_refuse(STATUS_DEGRADE, self.engine.budget_msg) == 1:
                self.engine.count.budget_rejects += 1
            if self.rend == self.rcap:
                self.rb_grow(self.rcap * 2)  # only to finish reading the refused frame's header
        # the same span as the last read (everything consumed: rend back at 0)
        # reuses its memoryview: no allocation per read
        if self.rview_at != self.rbuf + self.rend or self.rview_len != self.rcap - self.rend:
            self.rview_at = self.rbuf + self.rend
            self.rview_len = self.rcap - self.rend
            self.rview = PyMemoryView_FromMemory(self.rview_at, self.rview_len, PyBUF_WRITE)
        return self.rview

    def eof_received(self):
        return False

    cdef int set_transport(self, object transport) except -1:
        """connection_made's common part."""
        self.transport = transport
        self._write = transport.write
        transport.set_write_buffer_limits(self.engine.high_water, self.engine.low_water)
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1
        self.via_transport = True  # connection_made may write through the transport
        return 0

    cdef int flush_now(self) except -1:
        """Send what the iteration staged here (Engine._flush_all)."""
        return 0

    cdef int send_ob(self, OutBuf* ob) except -1:
        """Send what ob holds and empty it: from ob straight to the socket
        while nothing of ours waits in the transport (no bytes object, one
        send), the rest (or, while the transport holds bytes, all of it)
        through the transport, which keeps the order and the write-buffer
        water marks.  The fd stays valid until connection_lost: uvloop closes
        it after calling that."""
        cdef ssize_t n = 0
        cdef Py_ssize_t left = ob.len
        if left == 0:
            return 0
        if self.fd >= 0:
            if self.via_transport and self.transport.get_write_buffer_size() == 0:
                self.via_transport = False
            if not self.via_transport:
                while True:
                    n = c_send(self.fd, ob.data, left, MSG_DONTWAIT | MSG_NOSIGNAL)
                    if n >= 0 or errno != EINTR:
                        break
                if n < 0:
                    n = 0  # EAGAIN, or an error that the transport meets and reports
        if n < left:
            self.via_transport = True
            self._write(PyBytes_FromStringAndSize(ob.data + n, left - n))
        ob.len = 0
        if ob.cap > 1048576:
            free(ob.data)
            ob.data = NULL
            ob.cap = 0
        return 0

    def pause_writing(self):
        self._on_pause_writing()

    def resume_writing(self):
        self._on_resume_writing()

    def _on_pause_writing(self):
        self.pause(PAUSE_SELF)

    def _on_resume_writing(self):
        self.resume(PAUSE_SELF)

    cdef int rb_compact(self) except -1:
        """Make room after a read: reset when everything was consumed, move a
        partial frame to the front when the tail is short, grow the buffer
        when that frame is larger than the buffer (bounded by max_frame).
        Growth beyond read_buffer draws on the process's budget
        (max_buffered); returns 1, without growing, when the frame at the
        front does not fit in what is left of it (the caller refuses it)."""
        cdef Py_ssize_t left = self.rend - self.rstart
        cdef Py_ssize_t need = 0
        cdef const uint8_t* p
        cdef Engine eng = self.engine
        if left == 0:
            self.rstart = self.rend = 0
            if self.rcap > 4 * eng.read_buffer:
                # a large frame grew the buffer: give the memory back once it is gone
                self.rb_grow(eng.read_buffer)
            return 0
        p = <const uint8_t*>(self.rbuf + self.rstart)
        if left >= 8 and p[0] == 0xAB and p[1] == 0xBA:
            need = 8 + ((<Py_ssize_t>p[4] << 24) | (p[5] << 16) | (p[6] << 8) | p[7])
        elif left >= 4 and not (p[0] == 0xAB and p[1] == 0xBA):
            need = 4 + ((<Py_ssize_t>(p[0] & 0x7F) << 24) | (p[1] << 16) | (p[2] << 8) | p[3])
        if need > eng.max_frame + 8:
            need = 0  # the scanner rejects it; never grow for it
        if self.rstart > 0 and (self.rcap - self.rend < MIN_TAIL or self.rstart + need > self.rcap):
            memmove(self.rbuf, self.rbuf + self.rstart, left)
            self.rstart = 0
            self.rend = left
        if need > self.rcap and need > eng.read_buffer and \
                eng.buffered_bytes - self.grown + (need - eng.read_buffer) > eng.max_buffered:
            return 1
        if need > self.rcap or self.rend == self.rcap:
            self.rb_grow(max(need, self.rcap * 2))
        return 0

    cdef int rb_grow(self, Py_ssize_t cap) except -1:
        """Resize the receive buffer to cap bytes (never below what it holds)
        and account for it in the budget."""
        cdef char* nb
        cdef Py_ssize_t g
        if cap < self.rend:
            cap = self.rend
        nb = <char*>realloc(self.rbuf, cap)
        if nb == NULL:
            raise MemoryError()
        self.rbuf = nb
        self.rcap = cap
        g = cap - self.engine.read_buffer if cap > self.engine.read_buffer else 0
        self.engine.buffered_bytes += g - self.grown
        self.grown = g
        return 0

    cdef int rb_release(self) except -1:
        """The connection is gone: drop what it holds now (not when the
        object is collected) and give its budget back."""
        self.rstart = self.rend = 0
        self.skip = 0
        if self.grown:
            self.rb_grow(self.engine.read_buffer)
        ob_free(&self.out)
        return 0

    cdef int rb_refuse(self, int status, str why) except -1:
        """The frame at the front cannot be buffered: once its header is
        here, answer it (refuse_frame) and discard its bytes as they come,
        keeping the connection.  A frame whose header is unreadable closes
        the connection.  1: refused, 0: its header is still coming, 2: closed."""
        cdef FrameInfo fi
        cdef Py_ssize_t r, total, avail = self.rend - self.rstart
        cdef uint8_t* p = <uint8_t*>(self.rbuf + self.rstart)
        if avail < 10 or not (p[0] == 0xAB and p[1] == 0xBA):
            if avail >= 4 and not (p[0] == 0xAB and p[1] == 0xBA):
                self.malformed(FE_TOO_LARGE, "peer")  # native Thrift: no header to answer by
                return 2
            return 0  # wait for the header's length
        r = fr_scan_header(p, avail, self.engine.max_header, &fi)
        if r == 0:
            return 0  # the header is still coming
        if r < 0:
            self.malformed(r, "peer")
            return 2
        total = 8 + ((<Py_ssize_t>p[4] << 24) | (p[5] << 16) | (p[6] << 8) | p[7])
        self.refuse_frame(&fi, status, why.format(total=total))
        if total > avail:
            self.skip = total - avail
            self.rstart = self.rend
        else:
            self.rstart += total
        self.progress_at = mono()
        return 1

    cdef int rb_oversized(self, uint8_t* p) except -1:
        """fr_scan said FE_TOO_LARGE for the frame at the front: refuse that
        frame alone (status 5) instead of dropping the connection.  As
        rb_refuse: 1 refused (go on), 0 wait for its header, 2 closed."""
        cdef int k = self.rb_refuse(STATUS_PROTOCOL, self.engine.too_large_msg)
        if k == 1:
            self.engine.count.oversized += 1
        return k

    cdef int refuse_frame(self, FrameInfo* fi, int status, str why) except -1:
        """Answer a frame the proxy will not take (each kind knows how); by
        default nobody can be answered: only counted and logged."""
        self.engine.log.warning("dropping a frame from %s: %s", _peer_name(self.transport), why)
        return 0

    cdef int rb_read(self, Py_ssize_t nbytes, double now) except -1:
        """nbytes arrived: account for them, discarding what belongs to a
        refused frame."""
        cdef Py_ssize_t n
        self.last_rx = now
        if self.skip:
            n = nbytes if nbytes < self.skip else self.skip
            self.skip -= n
            # the skipped bytes are the last ones in the buffer: drop them
            memmove(self.rbuf + self.rend, self.rbuf + self.rend + n, nbytes - n)
            nbytes -= n
            self.progress_at = now
        self.rend += nbytes
        return 0

    cdef int rb_done(self, Py_ssize_t start, bint was_empty, double now) except -1:
        """After a read's frames were handled: note progress (for the frame
        timeout), then compact, refusing a frame the budget cannot hold."""
        if self.rstart != start or was_empty:
            self.progress_at = now
        if self.rb_compact() and self.rb_refuse(STATUS_DEGRADE, self.engine.budget_msg) == 1:
            self.engine.count.budget_rejects += 1
        return 0

    cdef bint sweep_check(self, double now, Py_ssize_t owed) except -1:
        """The 1 s sweep: close a connection whose partial frame has stalled
        (frame_timeout) or that stayed silent with nothing owed
        (conn_idle_timeout).  True when it was closed."""
        cdef Engine eng = self.engine
        if self.closed or self.transport is None:
            return False
        if self.rend > self.rstart or self.skip:
            if now - self.progress_at > eng.frame_timeout:
                eng.count.frame_timeouts += 1
                eng.log.warning("closing connection %s: a frame begun %.0f s ago is not complete "
                                "(limits.frame_timeout_s = %g)", _peer_name(self.transport),
                                now - self.progress_at, eng.frame_timeout)
                self.transport.abort()
                return True
        elif owed == 0 and now - self.last_rx > eng.conn_idle_timeout:
            eng.count.idle_closed += 1
            eng.log.info("closing connection %s: idle for %.0f s (limits.idle_timeout_s)",
                         _peer_name(self.transport), now - self.last_rx)
            self.transport.close()
            return True
        return False

    cdef Py_ssize_t rb_next(self, FrameInfo* fi, uint8_t** frame) noexcept:
        """The next whole frame in the receive buffer: its length (the buffer
        moves past it, *frame points at it), 0 when more bytes are needed,
        or a negative FE_* code for bytes that can never be a frame."""
        cdef Py_ssize_t r
        if self.rstart >= self.rend or self.skip:
            return 0
        frame[0] = <uint8_t*>(self.rbuf + self.rstart)
        r = fr_scan_want(frame[0], self.rend - self.rstart, self.engine.max_frame,
                         self.engine.max_header, fi, self.want)
        if r > 0:
            self.rstart += r
        return r

    cdef int answer_heartbeat(self, FrameInfo* fi, OutBuf* out) except -1:
        """A peer heartbeat that is not itself an answer is answered here,
        with the same sequence id and message type (docs/protocol.md 4.2, 12.3)."""
        self.engine.count.heartbeats += 1
        ob_append_bytes(out, fr_heartbeat_answer(fi.seq_id, fi.msg_type,
                                                 fi.protocol & PROTO_SERIAL_MASK))
        return 0

    cdef int end_stream(self) except -1:
        """End our side (FIN) after what is queued.  From then on, what the
        peer sends is read and discarded, never taken (buffer_updated): its
        own close is then seen (connection_lost), and the socket closes
        without a reset, which a close with unread bytes would send."""
        if self.eof_sent or self.closed or self.transport is None:
            return 0
        self.eof_sent = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.rstart = self.rend = 0  # a partial frame is never completed
        self.skip = 0
        self.resume(PAUSE_CLOSING)
        return 0

    cdef int pause(self, int why) except -1:
        if self.pause_mask == 0 and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.pause_mask |= why
        return 0

    cdef int resume(self, int why) except -1:
        if self.pause_mask == 0:
            return 0
        self.pause_mask &= ~why
        if self.pause_mask == 0 and self.transport is not None and not self.closed:
            self.transport.resume_reading()
        return 0

    cdef int malformed(self, Py_ssize_t code, str side) except -1:
        """A malformed frame closes this connection only, with one log line."""
        self.engine.count.malformed_frames += 1
        self.engine.log.warning(
            "closing %s connection %s: malformed frame: %s", side, _peer_name(self.transport),
            (<bytes>fr_strerror(code)).decode())
        self.rstart = self.rend = 0
        if self.transport is not None:
            self.transport.abort()
        return 0
