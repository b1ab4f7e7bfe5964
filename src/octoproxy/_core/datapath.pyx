# cython: language_level=3
"""The per-connection data path.

Each connection is an asyncio BufferedProtocol implemented here: the event
loop reads straight into the connection's C receive buffer, then calls
``buffer_updated`` once; from there every frame of the read is scanned,
routed, its sequence id rewritten in place, and staged for its destination
without touching Python objects.  At the end of the read each destination
gets one ``transport.write``.  Connections are created and closed by the
Python modules (listeners.py, upstream.py); this module never awaits.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.buffer cimport PyBUF_WRITE
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from octoproxy._core.frame cimport (
    FE_TOO_LARGE, FF_GZIP, FF_PROXY_ANNOUNCE, FF_REQUEST, FF_RESPONSE, FF_SNAPPY, FK_OCTO,
    MT_HEARTBEAT, MT_PROXY_RESTART, MT_SCANNER_HEARTBEAT, FrameInfo, fr_error_response,
    fr_heartbeat_response, fr_proxy_announce, fr_proxy_restart, fr_scan, fr_scan_header,
    fr_set_seq_id,
    fr_strerror,
)
from octoproxy._core.route cimport (
    RT_NO_HEALTHY, RT_NO_SERVICE_KEY, RT_OK, RT_SET_NO_NODE, RT_UNKNOWN_SERVICE, Node, RouteTable,
    lb_on_done, lb_on_send,
)

import random as _random

# PROTOCOL.md status codes the proxy answers with
DEF ST_RPC = 3
DEF ST_TRANSPORT = 4
DEF ST_PROTOCOL = 5
DEF ST_DEGRADE = 6
DEF ST_SERVICE = 8

# Conn.pause_mask bits
DEF PAUSE_SELF = 1          # our own transport's write buffer is over the high mark
DEF PAUSE_UPSTREAM = 2      # an upstream connection we feed is over its high mark
DEF PAUSE_PEER = 4          # (inbound) the paired connection cannot take more

# UpstreamConn.state
UC_CONNECTING = 0
UC_OPEN = 1
UC_DRAINING = 2             # got ProxyRestart: no new requests, read what is owed
UC_CLOSED = 3
DEF S_CONNECTING = 0
DEF S_OPEN = 1
DEF S_DRAINING = 2
DEF S_CLOSED = 3

DEF MIN_TAIL = 4096         # compact the receive buffer when less free space is left
DEF FIRST_SLOTS = 64        # initial pending-table size per upstream connection
DEF TICK = 0.01             # timeout sweep period (seconds)
DEF MAX_ID = 0x3FFFFFFFFFFFFFFF

# upper bounds (seconds) of the outbound latency histogram buckets
LAT_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
              0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
cdef double[16] C_LAT_BOUNDS = LAT_BOUNDS


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


cdef inline str slice_str(const char* base, Py_ssize_t off, Py_ssize_t n):
    if n < 0:
        return None
    return base[off:off + n].decode("utf-8", "replace")


# ---------------------------------------------------------------- Engine

@cython.final
cdef class Engine:
    """Shared state of one proxy process's data path: the route table, the
    upstream pools, the limits and the counters."""

    def __cinit__(self):
        self.pools = {}
        self.timed = set()
        self.downstreams = set()
        self.inbounds = set()
        self.tick_handle = None
        self.route_errors = {}
        self.access_log = None
        self.access_sample = 1.0

    def __init__(self, RouteTable table, loop, connector, log, *,
                 Py_ssize_t max_frame=16 * 1024 * 1024, Py_ssize_t max_header=64 * 1024,
                 Py_ssize_t max_inflight=10000, Py_ssize_t max_connections=10000,
                 Py_ssize_t read_buffer=65536, Py_ssize_t high_water=4 * 1024 * 1024,
                 Py_ssize_t low_water=1024 * 1024, Py_ssize_t max_unread=32 * 1024 * 1024,
                 double default_timeout=3.0,
                 double max_timeout=60.0, int conns_per_node=2, double backoff_base=0.1,
                 double backoff_max=5.0, double idle_timeout=300.0, double connect_timeout=1.0):
        self.table = table
        self.loop = loop
        self.connector = connector
        self.log = log
        self.max_frame = max_frame
        self.max_header = max_header
        self.max_inflight = max_inflight
        self.max_connections = max_connections
        self.read_buffer = read_buffer
        self.high_water = high_water
        self.low_water = low_water
        self.max_unread = max_unread
        self.default_timeout = default_timeout
        self.max_timeout = max_timeout
        self.conns_per_node = conns_per_node
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout

    cdef UpstreamPool get_pool(self, Node node):
        cdef UpstreamPool pool = self.pools.get(node.address)
        if pool is None:
            pool = UpstreamPool(self, node.host, node.port)
            self.pools[node.address] = pool
        node.upstream = pool
        return pool

    cdef int on_answer(self, Node node, int status, double sent_at, double now) except -1:
        """Count one answer for a request that went to `node`."""
        cdef double lat = now - sent_at
        cdef int b = 0
        node.answers[status & 15] += 1
        while b < 16 and lat > C_LAT_BOUNDS[b]:
            b += 1
        self.lat_buckets[b] += 1
        self.lat_sum += lat
        if self.access_log is not None and (self.access_sample >= 1.0
                                            or _random.random() < self.access_sample):
            self.access_log(node.appkey, status, node.address, lat)
        return 0

    def latency_histogram(self):
        """(cumulative bucket counts by upper bound incl. +Inf, sum in seconds)."""
        cdef int i
        cdef long long acc = 0
        out = []
        for i in range(17):
            acc += self.lat_buckets[i]
            out.append((LAT_BOUNDS[i] if i < 16 else float("inf"), acc))
        return out, self.lat_sum

    def route_error_counts(self):
        return dict(self.route_errors)

    def histogram_state(self):
        cdef int i
        return {"buckets": [self.lat_buckets[i] for i in range(17)], "sum": self.lat_sum,
                "route_errors": [[k[0], k[1], v] for k, v in self.route_errors.items()]}

    def restore_histogram(self, dict st):
        """Continue the previous generation's histogram and route errors (hot restart)."""
        cdef int i
        b = st.get("buckets", [])
        for i in range(min(17, len(b))):
            self.lat_buckets[i] += b[i]
        self.lat_sum += st.get("sum", 0.0)
        for name, status, v in st.get("route_errors", []):
            self.route_errors[(name, status)] = self.route_errors.get((name, status), 0) + v

    cdef int arm_timer(self) except -1:
        if self.tick_handle is None and self.timed:
            self.tick_handle = self.loop.call_later(TICK, self._on_tick)
        return 0

    def _on_tick(self):
        cdef UpstreamConn c
        cdef double now = mono()
        self.tick_handle = None
        for c in list(self.timed):
            c.up_sweep(now)
        self.arm_timer()

    # -- Python-side API (per connection / per config change / per scrape)

    def downstream(self):
        """Protocol factory for an outbound (app) listener."""
        return Downstream(self)

    def inbound(self, str provider_path):
        """Protocol factory for an inbound listener that forwards to `provider_path`."""
        return InboundConn(self, provider_path)

    def idle_sweep(self):
        """Close upstream connections idle for longer than idle_timeout."""
        cdef UpstreamPool pool
        cdef UpstreamConn c
        cdef double now = mono()
        for pool in list(self.pools.values()):
            for c in list(pool.conns):
                if c.used == 0 and c.state == S_OPEN and now - c.last_active > self.idle_timeout:
                    pool.conns.remove(c)
                    c.state = S_DRAINING
                    if c.transport is not None:
                        c.transport.close()

    def start_drain(self):
        """Hot restart: from now on every new app request is answered at once
        with the restart flag (status 3) so the SDK retries on the new process.
        Every app connection also gets a restart notice (the flagged answer
        with sequence id 0, docs/protocol.md) so that idle SDK connections move
        too, and close once nothing is owed on them."""
        cdef Downstream d
        self.draining = True
        for d in list(self.downstreams):
            if not d.closed:
                d.ds_error(0, ST_RPC, "octo-proxy is hot-restarting: reconnect", True, 1)
                d.ds_flush()

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

    def counters(self):
        cdef int i
        return {
            "requests": self.n_requests, "responses": self.n_responses,
            "oneway": self.n_oneway, "timeouts": self.n_timeouts,
            "inbound_requests": self.n_inbound_requests,
            "inbound_responses": self.n_inbound_responses,
            "malformed": self.n_malformed, "heartbeats": self.n_heartbeats,
            "restart_answers": self.n_restart_answers, "slow_consumers": self.n_slow_consumers,
            "errors": {str(i): self.n_errors[i] for i in range(16) if self.n_errors[i]},
        }

    def restore_counters(self, dict c):
        """Continue the previous generation's counters (hot restart)."""
        cdef int i
        self.n_requests += c.get("requests", 0)
        self.n_responses += c.get("responses", 0)
        self.n_oneway += c.get("oneway", 0)
        self.n_timeouts += c.get("timeouts", 0)
        self.n_inbound_requests += c.get("inbound_requests", 0)
        self.n_inbound_responses += c.get("inbound_responses", 0)
        self.n_malformed += c.get("malformed", 0)
        self.n_heartbeats += c.get("heartbeats", 0)
        self.n_restart_answers += c.get("restart_answers", 0)
        self.n_slow_consumers += c.get("slow_consumers", 0)
        for k, v in c.get("errors", {}).items():
            i = int(k)
            if 0 <= i < 16:
                self.n_errors[i] += v

    def in_flight(self):
        """Requests this process still owes an answer for (both directions)."""
        cdef UpstreamConn c
        cdef InboundConn ic
        cdef Py_ssize_t n = 0
        for c in self.timed:   # every upstream connection with requests in flight
            n += c.used
        for ic in self.inbounds:
            n += ic.inflight
        return n

    def inbound_conns(self):
        return list(self.inbounds)

    def downstream_conns(self):
        return list(self.downstreams)

    def pool_stats(self):
        cdef UpstreamPool pool
        cdef UpstreamConn c
        out = {}
        for addr, pool in self.pools.items():
            out[addr] = {
                "connections": len(pool.conns),
                "in_flight": sum([c.used for c in pool.conns]),
                "connects": pool.n_connects,
                "connect_failures": pool.n_connect_failures,
                "last_error": pool.last_error,
            }
        return out

    def errors_by_status(self):
        cdef int i
        return {i: self.n_errors[i] for i in range(16) if self.n_errors[i]}

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

    def __dealloc__(self):
        free(self.rbuf)
        self.rbuf = NULL
        ob_free(&self.out)

    def get_buffer(self, Py_ssize_t sizehint):
        if self.rend == self.rcap:
            self.rb_compact()
        return PyMemoryView_FromMemory(self.rbuf + self.rend, self.rcap - self.rend, PyBUF_WRITE)

    def eof_received(self):
        return False

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
        when that frame is larger than the buffer (bounded by max_frame)."""
        cdef Py_ssize_t left = self.rend - self.rstart
        cdef Py_ssize_t need = 0
        cdef const uint8_t* p
        cdef char* nb
        if left == 0:
            self.rstart = self.rend = 0
            if self.rcap > 4 * self.engine.read_buffer:
                # a large frame grew the buffer: give the memory back once it is gone
                nb = <char*>realloc(self.rbuf, self.engine.read_buffer)
                if nb != NULL:
                    self.rbuf = nb
                    self.rcap = self.engine.read_buffer
            return 0
        p = <const uint8_t*>(self.rbuf + self.rstart)
        if left >= 8 and p[0] == 0xAB and p[1] == 0xBA:
            need = 8 + ((<Py_ssize_t>p[4] << 24) | (p[5] << 16) | (p[6] << 8) | p[7])
        elif left >= 4 and not (p[0] == 0xAB and p[1] == 0xBA):
            need = 4 + ((<Py_ssize_t>(p[0] & 0x7F) << 24) | (p[1] << 16) | (p[2] << 8) | p[3])
        if need > self.engine.max_frame + 8:
            need = 0  # the scanner rejects it; never grow for it
        if self.rstart > 0 and (self.rcap - self.rend < MIN_TAIL or self.rstart + need > self.rcap):
            memmove(self.rbuf, self.rbuf + self.rstart, left)
            self.rstart = 0
            self.rend = left
        if need > self.rcap or self.rend == self.rcap:
            nb = <char*>realloc(self.rbuf, max(need, self.rcap * 2))
            if nb == NULL:
                raise MemoryError()
            self.rbuf = nb
            self.rcap = max(need, self.rcap * 2)
        return 0

    cdef Py_ssize_t rb_next(self, FrameInfo* fi, uint8_t** frame) noexcept:
        """The next whole frame in the receive buffer: its length (the buffer
        moves past it, *frame points at it), 0 when more bytes are needed,
        or a negative FE_* code for bytes that can never be a frame."""
        cdef Py_ssize_t r
        if self.rstart >= self.rend:
            return 0
        frame[0] = <uint8_t*>(self.rbuf + self.rstart)
        r = fr_scan(frame[0], self.rend - self.rstart, self.engine.max_frame,
                    self.engine.max_header, fi)
        if r > 0:
            self.rstart += r
        return r

    cdef int answer_heartbeat(self, FrameInfo* fi, OutBuf* out) except -1:
        """A peer heartbeat that is not itself an answer is answered here,
        with the same sequence id (PROTOCOL.md section 2)."""
        self.engine.n_heartbeats += 1
        ob_append_bytes(out, fr_heartbeat_response(fi.seq_id, fi.protocol & 3))
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
        self.engine.n_malformed += 1
        self.engine.log.warning(
            "closing %s connection %s: malformed frame: %s", side,
            self.transport.get_extra_info("peername") if self.transport is not None else None,
            (<bytes>fr_strerror(code)).decode())
        self.rstart = self.rend = 0
        if self.transport is not None:
            self.transport.abort()
        return 0


# ---------------------------------------------------------------- upstream

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

    cdef UpstreamConn pick(self):
        """A connection for the next request, opening one on first use; None
        while connecting is backed off after a failure and none is left."""
        cdef Py_ssize_t n = len(self.conns)
        cdef UpstreamConn c
        if n < self.engine.conns_per_node and (n == 0 or mono() >= self.retry_at):
            if n == 0 and mono() < self.retry_at:
                return None
            c = UpstreamConn(self.engine, self)
            self.conns.append(c)
            self.n_connects += 1
            self.engine.connector(c, self.host, self.port)
            return c
        if n == 0:
            return None
        self.rr += 1
        return <UpstreamConn>self.conns[self.rr % n]

    cdef _on_conn_failed(self, UpstreamConn c, str why):
        cdef double jitter
        if c in self.conns:
            self.conns.remove(c)
        self.n_connect_failures += 1
        self.last_error = why
        # full jitter over the current backoff, doubling up to the maximum
        jitter = _random.random() * self.backoff
        self.retry_at = mono() + jitter
        self.backoff = min(self.backoff * 2, self.engine.backoff_max)

    cdef _on_conn_ok(self):
        self.backoff = self.engine.backoff_base
        self.retry_at = 0.0
        self.last_error = None

    def connections(self):
        return list(self.conns)


@cython.final
cdef class UpstreamConn(Conn):
    """One multiplexed TCP connection to a remote proxy; requests from many
    app connections share it under sequence ids of its own."""

    def __cinit__(self, Engine engine, UpstreamPool pool):
        cdef Py_ssize_t i
        self.pool = pool
        self.state = S_CONNECTING
        self.backlog = []
        self.waiters = []
        self.touched = []
        self.cap = FIRST_SLOTS
        self.slots = <Pending*>malloc(self.cap * sizeof(Pending))
        if self.slots == NULL:
            raise MemoryError()
        for i in range(self.cap):
            self.slots[i].id = -1
        self.used = 0
        self.head = self.tail = -1
        self.next_id = 1 + <int64_t>(_random.getrandbits(20))
        self.last_active = mono()
        self.hb_id = 0

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.slots != NULL:
            for i in range(self.cap):
                if self.slots[i].id != -1:
                    Py_DECREF(<object>self.slots[i].down)
                    Py_DECREF(<object>self.slots[i].node)
            free(self.slots)
            self.slots = NULL

    # -- pending table: id & mask is the slot; at most half full, so the
    #    next free id is found in about one probe and a grow never collides.

    cdef Py_ssize_t up_alloc(self, double deadline) except -1:
        cdef int64_t sid
        cdef Py_ssize_t s, t
        if (self.used + 1) * 2 > self.cap:
            self.up_grow()
        while True:
            sid = self.next_id
            self.next_id = sid + 1 if sid < MAX_ID else 1
            s = sid & (self.cap - 1)
            if self.slots[s].id == -1:
                break
        self.slots[s].id = sid
        self.slots[s].deadline = deadline
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
        self.used += 1
        if self.used == 1:
            self.engine.timed.add(self)
            self.engine.arm_timer()
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
        cdef object down = <object>self.slots[s].down
        cdef object node = <object>self.slots[s].node
        self.up_unlink(s)
        self.slots[s].id = -1
        self.used -= 1
        (<Downstream>down).inflight -= 1
        lb_on_done(<Node>node)
        Py_DECREF(down)
        Py_DECREF(node)
        if self.used == 0:
            self.engine.timed.discard(self)
        return 0

    cdef int up_fail_all(self, int status, str why) except -1:
        """Answer every request in flight here with an error, at once."""
        cdef Py_ssize_t s
        cdef Downstream down
        cdef double now = mono()
        while self.head != -1:
            s = self.head
            down = <Downstream>self.slots[s].down
            self.engine.on_answer(<Node>self.slots[s].node, status, self.slots[s].sent_at, now)
            if not down.closed:
                down.ds_error(self.slots[s].orig_id, status, why, False, self.slots[s].protocol)
                if not down.in_touched:
                    down.in_touched = True
                    self.touched.append(down)
            self.up_release(s)
        self.up_flush_touched()
        return 0

    cdef int up_sweep(self, double now) except -1:
        cdef Py_ssize_t s
        cdef Downstream down
        while self.head != -1 and self.slots[self.head].deadline <= now:
            s = self.head
            down = <Downstream>self.slots[s].down
            self.engine.n_timeouts += 1
            self.engine.on_answer(<Node>self.slots[s].node, ST_TRANSPORT, self.slots[s].sent_at, now)
            if not down.closed:
                down.ds_error(self.slots[s].orig_id, ST_TRANSPORT,
                              f"timeout: no answer from {self.pool.address} within "
                              f"{self.slots[s].timeout_ms:.0f} ms", False, self.slots[s].protocol)
                if not down.in_touched:
                    down.in_touched = True
                    self.touched.append(down)
            self.up_release(s)
        self.up_flush_touched()
        if self.state == S_DRAINING and self.used == 0 and self.transport is not None:
            self.transport.close()
        return 0

    cdef int up_flush(self) except -1:
        if self.out.len == 0:
            return 0
        data = ob_take(&self.out)
        if self.state == S_CONNECTING:
            self.backlog.append(data)
        elif self.state != S_CLOSED:
            self._write(data)
        return 0

    cdef int up_flush_touched(self) except -1:
        cdef Downstream d
        if not self.touched:
            return 0
        for d in self.touched:
            d.in_touched = False
            d.ds_flush()
        self.touched.clear()
        return 0

    cdef int up_process(self) except -1:
        cdef FrameInfo fi
        cdef Py_ssize_t r, s
        cdef uint8_t* p
        cdef Downstream down
        cdef Engine eng = self.engine
        while True:
            r = self.rb_next(&fi, &p)
            if r == 0:
                break
            if r < 0:
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
            down = <Downstream>self.slots[s].down
            eng.on_answer(<Node>self.slots[s].node, fi.status if fi.status >= 0 else 0,
                          self.slots[s].sent_at, mono())
            if not down.closed:
                fr_set_seq_id(p, &fi, self.slots[s].orig_id)
                ob_append(&down.out, <char*>p, r)
                if not down.in_touched:
                    down.in_touched = True
                    self.touched.append(down)
                eng.n_responses += 1
            self.up_release(s)
        self.up_flush_touched()
        self.up_flush()
        if self.state == S_DRAINING and self.used == 0 and self.transport is not None:
            self.transport.close()  # after ProxyRestart: nothing more is owed here
        return 0

    def _on_proxy_restart(self):
        # PROTOCOL.md 3: out of the pool at once, keep reading what is owed
        if self.state == S_OPEN or self.state == S_CONNECTING:
            self.state = S_DRAINING
            if self in self.pool.conns:
                self.pool.conns.remove(self)
            self.engine.timed.add(self)  # keeps it swept and closed when empty
            self.engine.arm_timer()
            if self.used == 0 and self.transport is not None:
                self.transport.close()

    # -- asyncio protocol

    def connection_made(self, transport):
        cdef list backlog
        self.transport = transport
        self._write = transport.write
        transport.set_write_buffer_limits(self.engine.high_water, self.engine.low_water)
        if self.state == S_CONNECTING:
            self.state = S_OPEN
        self.pool._on_conn_ok()
        self.hb_id += 1
        backlog = self.backlog
        self.backlog = []
        transport.writelines([fr_proxy_announce(self.hb_id)] + backlog)

    def connect_failed(self, str why):
        """Called by the connector when the connection could not be made."""
        self.state = S_CLOSED
        self.closed = True
        self.backlog = []
        self.pool._on_conn_failed(self, why)
        self.up_fail_all(ST_TRANSPORT, f"upstream {self.pool.address} unavailable: connect failed: {why}")
        self._release_waiters()

    def buffer_updated(self, Py_ssize_t nbytes):
        self.rend += nbytes
        self.last_active = mono()
        self.up_process()
        self.rb_compact()

    def connection_lost(self, exc):
        was = self.state
        self.state = S_CLOSED
        self.closed = True
        if self in self.pool.conns:
            self.pool.conns.remove(self)
        self.engine.timed.discard(self)
        if self.used:
            self.up_fail_all(ST_TRANSPORT, f"upstream connection to {self.pool.address} closed"
                             + (f": {exc}" if exc else ""))
        self._release_waiters()
        self.transport = None
        self._write = None

    def _on_pause_writing(self):
        self.paused = True

    def _on_resume_writing(self):
        self.paused = False
        self._release_waiters()

    def _release_waiters(self):
        cdef Downstream d
        waiters = self.waiters
        self.waiters = []
        for d in waiters:
            d.resume(PAUSE_UPSTREAM)

    @property
    def in_flight(self):
        return self.used


# ---------------------------------------------------------------- downstream

@cython.final
cdef class Downstream(Conn):
    """An app's connection to the outbound UDS listener."""

    def __cinit__(self, Engine engine):
        self.dests = []
        self.inflight = 0

    cdef int ds_error(self, int64_t seq_id, int status, str message, bint restart,
                      int protocol) except -1:
        self.engine.n_errors[status & 15] += 1
        ob_append_bytes(&self.out, fr_error_response(seq_id, status, message, restart, protocol & 3))
        return 0

    cdef int ds_flush(self) except -1:
        if self.out.len and not self.closed:
            self._write(ob_take(&self.out))
            if self.pause_mask & PAUSE_SELF:
                self.ds_check_unread()
        else:
            self.out.len = 0
        return 0

    cdef int ds_check_unread(self) except -1:
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

    cdef int ds_process(self) except -1:
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
        while True:
            r = self.rb_next(&fi, &p)
            if r == 0:
                break
            if r < 0:
                self.ds_flush_dests()
                if r == FE_TOO_LARGE:
                    self._answer_too_large(p, self.rend - self.rstart)
                self.ds_flush()
                self.malformed(r, "app")
                return 0
            if fi.kind != FK_OCTO or fi.flags & (FF_GZIP | FF_SNAPPY):
                # nothing to route by (docs/protocol.md): say why, then close,
                # since the caller cannot match an answer to this request
                self.ds_flush_dests()
                if fi.kind == FK_OCTO:
                    self.ds_error(0, ST_PROTOCOL, "compressed frames are not supported by the "
                                  "mesh: the proxy cannot read their header to route them",
                                  False, fi.protocol)
                self.ds_flush()
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
            if eng.draining:
                eng.n_restart_answers += 1
                self.ds_error(fi.seq_id, ST_RPC, "octo-proxy is hot-restarting: reconnect and retry",
                              True, fi.protocol)
                continue
            if self.rejected:
                self.ds_error(fi.seq_id, ST_DEGRADE, f"overload: connection limit of "
                              f"{eng.max_connections} app connections reached", False, fi.protocol)
                continue
            if fi.call_type != 1 and self.inflight >= eng.max_inflight:
                self.ds_error(fi.seq_id, ST_DEGRADE, f"overload: {self.inflight} requests in flight "
                              f"on this connection (limit {eng.max_inflight})", False, fi.protocol)
                continue
            node = table.rt_route(
                p + fi.appkey_off, fi.appkey_len, p + fi.service_off, fi.service_len,
                p + fi.liteset_off, fi.liteset_len, p + fi.set_off, fi.set_len,
                p + fi.swimlane_off, fi.swimlane_len, p + fi.hashkey_off, fi.hashkey_len, &err)
            if node is None:
                self._route_error(<char*>p, &fi, err)
                continue
            pool = <UpstreamPool>node.upstream
            if pool is None:
                pool = eng.get_pool(node)
            conn = pool.pick()
            if conn is None:
                node.answers[ST_TRANSPORT] += 1
                self.ds_error(fi.seq_id, ST_TRANSPORT, f"upstream {pool.address} unavailable: "
                              f"{pool.last_error}", False, fi.protocol)
                continue
            if conn.out.len == 0:
                self.dests.append(conn)
            if fi.call_type == 1:
                # one-way: no answer, no state; the id is left as the app chose it
                eng.n_oneway += 1
                ob_append(&conn.out, <char*>p, r)
                continue
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
            slot.down = <PyObject*>self
            Py_INCREF(node)
            slot.node = <PyObject*>node
            fr_set_seq_id(p, &fi, slot.id)
            ob_append(&conn.out, <char*>p, r)
            self.inflight += 1
            lb_on_send(node)
            eng.n_requests += 1
        self.ds_flush_dests()
        self.ds_flush()
        return 0

    cdef int ds_flush_dests(self) except -1:
        """One write per upstream connection this read fed."""
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

    cdef _route_error(self, char* p, FrameInfo* fi, int err):
        cdef RouteTable table = self.engine.table
        name = slice_str(p, fi.appkey_off, fi.appkey_len) or slice_str(p, fi.service_off, fi.service_len)
        key = (name or "", ST_SERVICE if err in (RT_UNKNOWN_SERVICE, RT_NO_SERVICE_KEY) else ST_TRANSPORT)
        self.engine.route_errors[key] = self.engine.route_errors.get(key, 0) + 1
        if err == RT_UNKNOWN_SERVICE:
            self.ds_error(fi.seq_id, ST_SERVICE, f"unknown service {name!r}: no route (not in the "
                          f"route table; subscribe to it first)", False, fi.protocol)
        elif err == RT_NO_SERVICE_KEY:
            self.ds_error(fi.seq_id, ST_SERVICE, "request names no service: neither "
                          "octo-remote-appkey nor serviceName is set", False, fi.protocol)
        elif err == RT_SET_NO_NODE:
            cell = slice_str(p, fi.set_off, fi.set_len)
            if cell is None:
                cell = table.labels.set
            self.ds_error(fi.seq_id, ST_TRANSPORT, f"no node of service {name!r} in Set cell "
                          f"{cell!r} (Set routing does not fall back)", False, fi.protocol)
        else:
            self.ds_error(fi.seq_id, ST_TRANSPORT, f"no healthy node for service {name!r}",
                          False, fi.protocol)

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
            self.ds_error(fi.seq_id, ST_PROTOCOL, f"frame of {total} bytes exceeds the limit of "
                          f"{self.engine.max_frame} bytes (limits.max_frame_bytes)", False, fi.protocol)

    # -- asyncio protocol

    def connection_made(self, transport):
        self.transport = transport
        self._write = transport.write
        transport.set_write_buffer_limits(self.engine.high_water, self.engine.low_water)
        if len(self.engine.downstreams) >= self.engine.max_connections:
            self.rejected = True
            self.engine.log.warning("app connection limit (%d) reached: answering with overload",
                                    self.engine.max_connections)
        self.engine.downstreams.add(self)

    def buffer_updated(self, Py_ssize_t nbytes):
        self.rend += nbytes
        self.ds_process()
        if self.rejected and self.transport is not None:
            self.transport.close()
        self.rb_compact()

    def connection_lost(self, exc):
        self.closed = True
        self.engine.downstreams.discard(self)
        self.transport = None
        self._write = None


# ---------------------------------------------------------------- inbound

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
        self.inflight = 0

    def __dealloc__(self):
        ob_free(&self.reply)

    cdef int in_flush(self) except -1:
        cdef ProviderConn pv = self.provider
        if self.reply.len:
            if not self.closed:
                self._write(ob_take(&self.reply))
            else:
                self.reply.len = 0
        if self.out.len:
            data = ob_take(&self.out)
            if pv is None or pv.transport is None:
                if pv is not None and pv.closed:
                    return 0
                self.backlog.append(data)
                self.pause(PAUSE_PEER)  # bounded: stop reading until the provider is there
            else:
                pv._write(data)
        return 0

    cdef int in_process(self) except -1:
        cdef FrameInfo fi
        cdef Py_ssize_t r
        cdef uint8_t* p
        cdef Engine eng = self.engine
        while True:
            r = self.rb_next(&fi, &p)
            if r == 0:
                break
            if r < 0:
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
            if (fi.flags & FF_REQUEST) and fi.call_type != 1:
                self.inflight += 1
                eng.n_inbound_requests += 1
            ob_append(&self.out, <char*>p, r)
        self.in_flush()
        return 0

    def send_proxy_restart(self):
        """Hot restart: tell a client-side proxy to move to a fresh connection."""
        if self.is_proxy and not self.restart_sent and not self.closed:
            self.restart_sent = True
            self._write(fr_proxy_restart())

    # -- asyncio protocol

    def connection_made(self, transport):
        self.transport = transport
        self._write = transport.write
        transport.set_write_buffer_limits(self.engine.high_water, self.engine.low_water)
        if len(self.engine.inbounds) >= self.engine.max_connections:
            self.engine.log.warning("inbound connection limit (%d) reached: closing %s",
                                    self.engine.max_connections, transport.get_extra_info("peername"))
            self.closed = True
            transport.abort()
            return
        self.engine.inbounds.add(self)
        self.provider = ProviderConn(self.engine, self)
        self.engine.connector(self.provider, None, self.provider_path)

    def buffer_updated(self, Py_ssize_t nbytes):
        self.rend += nbytes
        self.in_process()
        self.rb_compact()

    def connection_lost(self, exc):
        self.closed = True
        self.engine.inbounds.discard(self)
        if self.provider is not None and self.provider.transport is not None:
            self.provider.transport.close()
        self.transport = None
        self._write = None

    def _on_pause_writing(self):
        # the peer does not read its answers: stop reading the provider
        if self.provider is not None:
            self.provider.pause(PAUSE_PEER)

    def _on_resume_writing(self):
        if self.provider is not None:
            self.provider.resume(PAUSE_PEER)

    def _provider_ready(self):
        backlog = self.backlog
        self.backlog = []
        if backlog:
            self.provider._write(b"".join(backlog))
        self.resume(PAUSE_PEER)

    def _provider_failed(self, str why):
        self.engine.log.warning("provider %s unavailable (%s): closing inbound connection %s",
                                self.provider_path, why,
                                self.transport.get_extra_info("peername") if self.transport else None)
        self.backlog = []
        if self.transport is not None:
            self.transport.close()


@cython.final
cdef class ProviderConn(Conn):
    """The UDS connection from an inbound connection to the provider app."""

    def __cinit__(self, Engine engine, InboundConn inbound):
        self.inbound = inbound

    cdef int pv_process(self) except -1:
        cdef FrameInfo fi
        cdef Py_ssize_t r
        cdef uint8_t* p
        cdef InboundConn ic = self.inbound
        cdef Engine eng = self.engine
        while True:
            r = self.rb_next(&fi, &p)
            if r == 0:
                break
            if r < 0:
                ic.in_flush()
                self.malformed(r, "provider")
                return 0
            if (fi.flags & FF_RESPONSE) and fi.msg_type != MT_HEARTBEAT and ic.inflight > 0:
                ic.inflight -= 1
                eng.n_inbound_responses += 1
            ob_append(&ic.reply, <char*>p, r)
        ic.in_flush()
        return 0

    def connection_made(self, transport):
        self.transport = transport
        self._write = transport.write
        transport.set_write_buffer_limits(self.engine.high_water, self.engine.low_water)
        if self.inbound.closed:
            transport.close()
            return
        self.inbound._provider_ready()

    def connect_failed(self, str why):
        self.closed = True
        self.inbound._provider_failed(why)

    def buffer_updated(self, Py_ssize_t nbytes):
        self.rend += nbytes
        self.pv_process()
        self.rb_compact()

    def connection_lost(self, exc):
        self.closed = True
        self.transport = None
        self._write = None
        if not self.inbound.closed and self.inbound.transport is not None:
            # the requests in flight cannot be answered any more: closing the
            # inbound connection makes the client side answer them at once
            self.inbound.transport.close()

    def _on_pause_writing(self):
        self.inbound.pause(PAUSE_PEER)

    def _on_resume_writing(self):
        self.inbound.resume(PAUSE_PEER)
