# The per-connection data path: asyncio BufferedProtocol objects whose
# per-read work (scan -> route -> pick -> rewrite id -> queue) runs in C.
# Python (listeners.py, upstream.py, server.py) creates them and owns
# everything per connection lifetime: accept, connect, close, timers.
# Implementation: datapath.pyx, one include file per role (listed there).

from cpython.object cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t

from octoproxy._core.auth cimport Signer, Verifier, _Hmac
from octoproxy._core.constants cimport STATUS_SLOTS
from octoproxy._core.frame cimport FrameInfo, FrCtxKeys
from octoproxy._core.limits cimport ServiceGov
from octoproxy._core.route cimport Node, RouteTable


cdef class Answer
cdef class Stats
cdef class Engine
cdef class UpstreamPool
cdef class UpstreamConn
cdef class OutboundConn
cdef class InboundConn
cdef class ProviderConn


# The engine's counters, one table: a field added here, with its row in
# COUNTERS (stats.pxi: its Prometheus metric and help; a unit test keeps the
# two in step), is counted by `eng.count.<name> += 1` and is then in
# Engine.counters() under <name> (also its key in the hot-restart hand-over)
# and exported on the admin's /stats as its metric: nothing else names it.
# Every field is a long long (restore_counters adds them as one array).
cdef struct Counters:
    long long outbound_requests     # requests routed upstream
    long long outbound_answers      # upstream answers delivered to apps
    long long oneway_requests       # one-way requests forwarded
    long long oneway_unanswered     # one-way requests that expired without an answer
    long long timeouts              # requests answered by the proxy with a timeout
    long long inbound_requests      # requests forwarded to the local provider
    long long inbound_answers       # provider answers sent back
    long long malformed_frames      # connections closed for a malformed frame
    long long heartbeats            # heartbeats answered by the proxy
    long long restart_answers       # requests answered with the hot-restart flag
    long long slow_consumers        # app connections closed for leaving answers unread
    # the hardening's (docs/protocol.md 6.4-6.7)
    long long frame_timeouts        # connections closed for a stalled partial frame
    long long idle_closed           # connections closed for silence
    long long budget_rejects        # frames refused for the buffered-bytes budget
    long long inflight_rejects      # requests refused for max_in_flight_total
    long long context_rejects       # requests refused for a context over its limit
    long long oversized             # frames over max_frame answered and skipped
    long long early_closes          # upstream connections that died young
    long long restart_notices       # ProxyRestart frames sent to apps that asked
    long long shutdown_answers      # requests answered because the proxy was stopping
    long long ignored_response      # Response frames from apps (ignored)
    long long ignored_proxy_restart  # ProxyRestart frames from apps (ignored)
    long long rejected_app          # app connections over max_connections
    long long rejected_inbound      # inbound connections over max_connections
    # governance's (docs/governance.md)
    long long gov_dropped           # one-way requests dropped by a limit
    # shunting's (docs/shunting.md)
    long long label_unwritten       # labelled requests sent without the label


# A growable C byte buffer where the reads of one event-loop iteration stage
# what they send to one destination; flushed once at the end of the
# iteration, straight to the socket when the transport holds nothing.
cdef struct OutBuf:
    char* data
    Py_ssize_t len
    Py_ssize_t cap


# A local answer encoded once (answer.pxi): the frame with sequence id 0,
# copied and patched at each use.
cdef class Answer:
    cdef bytes data
    cdef Py_ssize_t seq_off             # the 8-byte sequence id in data
    cdef Py_ssize_t name_at             # Thrift EXCEPTION body: where the method name goes; else -1
    cdef bint checksum                  # an Adler-32 trailer to recompute
    cdef int status
    # what it was made for (its cache compares these)
    cdef int64_t k1
    cdef int64_t k2
    cdef object k3                      # compared by identity
    cdef bytes name_key                 # route errors: the name the request used,
    cdef bytes cell_key                 # and (Set routing) its cell
    cdef str name                       # route errors: counted under (name, status)
    cdef long long count                # uses not yet added to Engine.route_errors


# One request in flight on an upstream connection.
cdef struct Pending:
    int64_t id            # the upstream-side sequence id; -1 = free slot
    int64_t orig_id       # the id the app used, restored on the response
    PyObject* app         # OutboundConn that sent it (strong ref)
    PyObject* node        # route.Node it went to (strong ref), for least request
    double deadline       # monotonic seconds
    float timeout_ms      # the timeout applied, for the error message
    double sent_at        # monotonic seconds when it went out (latency)
    int32_t prev          # deadline-ordered doubly linked list of live slots
    int32_t next
    uint8_t protocol      # the request's protocol byte, for error answers (docs/protocol.md 11)
    uint8_t oneway        # callType 1: not in the app's in-flight count, expires silently (6.2)
    int32_t body_seq      # the Thrift call's seqid, for an error answer's body
    PyObject* method      # the Thrift call's method name (bytes, strong ref) or NULL
    uint8_t attempt       # 1 = first attempt; retries count up (governance)
    uint8_t gflags        # GF_*: what this request counts in its service's governance
    PyObject* gov         # the service's limits.ServiceGov (strong ref) when counted, else NULL
    char* retry           # a copy of the request (app's id) to execute again (rc_copy), or NULL
    Py_ssize_t retry_len  # its length
    PyObject* shunt       # route.ShuntStat of the shunting rule that routed it (strong ref), or NULL


# What the engine counts (stats.pxi): its base class, so the hot path's
# `eng.count.<name> += 1` is a store into a C struct of the engine itself.
cdef class Stats:
    cdef Counters count                 # the counters table (above)
    cdef long long n_errors[STATUS_SLOTS]  # proxy-made error answers by status
    cdef long long lat_buckets[17]      # outbound latency histogram (LAT_BOUNDS + +Inf)
    cdef double lat_sum                 # seconds, for the histogram's _sum
    cdef dict route_errors              # (service name, status) -> count, for requests without a node
    cdef public object access_log       # callable(appkey, status, upstream, latency_s, rule) or None
    cdef public double access_sample    # fraction of answers logged

    cdef int fold_route_errors(self) except -1


cdef class Engine(Stats):
    cdef readonly RouteTable table
    cdef readonly object loop
    cdef readonly object connector        # upstream.py: connector(conn, host, port) starts a connect
    cdef readonly object log              # logging.Logger
    cdef dict pools                     # address -> UpstreamPool
    cdef set timed                      # UpstreamConns with requests in flight (timeout sweep)
    cdef set outbounds                  # live OutboundConn connections
    cdef set inbounds                   # live InboundConn connections
    cdef object tick_handle
    # limits, read from config.limits / config.upstream once (Engine.__init__)
    cdef readonly Py_ssize_t max_frame
    cdef readonly Py_ssize_t max_header
    cdef readonly Py_ssize_t max_in_flight
    cdef readonly Py_ssize_t max_connections
    cdef readonly Py_ssize_t read_buffer
    cdef readonly Py_ssize_t high_water
    cdef readonly Py_ssize_t low_water
    cdef readonly Py_ssize_t max_unread       # queued answers past which a non-reading app is cut off
    cdef readonly double default_timeout   # seconds
    cdef readonly double max_timeout       # seconds
    cdef readonly int conns_per_node
    cdef readonly double backoff_base      # seconds
    cdef readonly double backoff_max       # seconds
    cdef readonly double idle_timeout      # seconds
    cdef readonly double connect_timeout   # seconds
    cdef readonly bint draining            # hot restart: answer new app requests with the restart flag
    cdef readonly bint stopping            # SIGTERM: answer new requests with status 6 (shutting down)
    # hardening limits (docs/protocol.md 6.4-6.7)
    cdef readonly Py_ssize_t max_in_flight_total  # requests in flight in the process, both directions
    cdef readonly double frame_timeout     # seconds a started frame may take to complete
    cdef readonly double conn_idle_timeout  # seconds an app/inbound connection may stay silent
    cdef readonly Py_ssize_t max_buffered  # receive-buffer bytes beyond read_buffer, process-wide
    cdef readonly Py_ssize_t max_gctx      # globalContext bytes of an app's request
    cdef readonly Py_ssize_t max_lctx      # localContext bytes of an app's request
    cdef readonly double min_life          # seconds: an upstream connection closed sooner died young
    cdef readonly Py_ssize_t total_in_flight    # requests owed an answer, both directions
    cdef readonly Py_ssize_t buffered_bytes     # receive-buffer bytes beyond read_buffer
    cdef str budget_msg                  # the answers' messages, "{total}" = the frame's size
    cdef str too_large_msg
    # output staged by one loop iteration's reads, flushed once per connection at its end
    cdef list flushq                     # Conns with staged output, in staging order
    cdef list flushq_spare               # the other list (the two are swapped, never reallocated)
    cdef bint flush_armed                # a call_soon(_flush_all) is pending
    cdef object flush_cb                 # self._flush_all, bound once
    cdef object flush_ctx                # its contextvars.Context (call_soon copies none)
    cdef long long read_seq              # counts app reads (which upstream conns one read fed)
    cdef int iter_reads                  # reads that staged output in the batched iteration
    cdef int single_streak               # batched iterations in a row with one such read
    cdef int solo_left                   # reads still to send at once before batching one again
    # pre-encoded local answers (answer.pxi), by akey()
    cdef list ans_restart
    cdef list ans_overload
    cdef list ans_route                  # ROUTE_SLOTS, hashed by (error, kind, name, cell)

    cdef UpstreamPool get_pool(self, Node node)
    cdef int arm_timer(self) except -1
    cdef int defer(self, Conn c) except -1
    cdef bint read_solo(self) noexcept
    cdef Answer route_answer(self, const char* p, const FrameInfo* fi, int err, int kind)
    cdef int fold_route_errors(self) except -1


# What every connection of the data path shares: the transport, one
# preallocated receive buffer that BufferedProtocol reads into, and the
# reasons its reading is paused.
cdef class Conn:
    cdef Engine engine
    cdef object transport
    cdef object _write                  # transport.write, bound once
    cdef char* rbuf                     # receive buffer (malloc), frames are parsed in place
    cdef Py_ssize_t rcap
    cdef Py_ssize_t rstart              # first unconsumed byte
    cdef Py_ssize_t rend                # end of received bytes
    cdef OutBuf out                     # staged output for this connection's destination
    cdef object rview                   # the memoryview get_buffer last returned, and what it spans
    cdef char* rview_at
    cdef Py_ssize_t rview_len
    cdef readonly bint closed
    cdef int pause_mask                 # why reading is paused (PAUSE_* bits)
    cdef Py_ssize_t grown               # rcap beyond read_buffer, counted in Engine.buffered_bytes
    cdef Py_ssize_t skip                # bytes of a refused frame still to discard as they arrive
    cdef double last_rx                 # monotonic time of the last read
    cdef double progress_at             # last time a frame completed or a new one began
    cdef bint queued                    # in engine.flushq
    cdef int fd                         # the socket while connected (sent to directly); else -1
    cdef bint via_transport             # bytes went through the transport: check it is empty first
    cdef readonly bint eof_sent         # our side has ended (FIN after its answers): nothing more is sent
    cdef const FrCtxKeys* want          # context keys picked out while scanning (fr_scan_want), or NULL

    cdef int set_transport(self, object transport) except -1
    cdef int flush_now(self) except -1
    cdef int send_ob(self, OutBuf* ob) except -1
    cdef int rb_compact(self) except -1
    cdef int rb_grow(self, Py_ssize_t cap) except -1
    cdef int rb_release(self) except -1
    cdef int rb_refuse(self, int status, str why) except -1
    cdef int rb_oversized(self, uint8_t* p) except -1
    cdef int refuse_frame(self, FrameInfo* fi, int status, str why) except -1
    cdef int rb_read(self, Py_ssize_t nbytes, double now) except -1
    cdef int rb_done(self, Py_ssize_t start, bint was_empty, double now) except -1
    cdef bint sweep_check(self, double now, Py_ssize_t owed) except -1
    cdef Py_ssize_t rb_next(self, FrameInfo* fi, uint8_t** frame) noexcept
    cdef int answer_heartbeat(self, FrameInfo* fi, OutBuf* out) except -1
    cdef int end_stream(self) except -1
    cdef int pause(self, int why) except -1
    cdef int resume(self, int why) except -1
    cdef int malformed(self, Py_ssize_t code, str side) except -1


cdef class UpstreamPool:
    cdef Engine engine
    cdef readonly str address
    cdef readonly str host
    cdef readonly int port
    cdef list conns                     # open or connecting UpstreamConns in rotation
    cdef Py_ssize_t rr
    cdef double retry_at                # monotonic time before which no new connect is tried
    cdef double backoff                 # current backoff (seconds)
    cdef public str last_error
    cdef public long long n_connects
    cdef public long long n_connect_failures
    cdef public long long n_early_closes
    cdef list ans_timeout               # by akey(): the last timeout answer made here
    cdef list ans_unavailable           # by akey(): keyed by last_error's identity

    cdef UpstreamConn pick(self, ServiceGov g)
    cdef _on_conn_failed(self, UpstreamConn c, str why)
    cdef _back_off(self, str why)
    cdef _on_conn_ok(self)


cdef class UpstreamConn(Conn):
    cdef UpstreamPool pool
    cdef readonly int state             # ConnState (CONN_*)
    cdef list backlog                   # bytes queued while connecting
    cdef Pending* slots
    cdef Py_ssize_t cap
    cdef Py_ssize_t in_flight           # requests sent here and not answered yet
    cdef int32_t head, tail
    cdef int64_t next_id
    cdef bint paused                    # our transport's write buffer is over the high mark
    cdef list waiters                   # OutboundConns paused because of us
    cdef list touched                   # OutboundConns with staged responses during one read
    cdef readonly double last_active
    cdef int64_t hb_id
    cdef Py_ssize_t backlog_bytes       # bytes queued while connecting (counts toward backpressure)
    cdef double made_at                 # monotonic time the connection was made (0: not yet)
    cdef bint proven                    # an answer came back: the peer serves
    cdef long long fed_by               # engine.read_seq of the last app read that staged here
    cdef ServiceGov gov                 # the service it was opened for (its max_connections), or None

    cdef Py_ssize_t up_alloc(self, double deadline) except -1
    cdef int up_grow(self) except -1
    cdef void up_unlink(self, Py_ssize_t s) noexcept
    cdef int up_release(self, Py_ssize_t s) except -1
    cdef int up_answer(self, OutboundConn app, Py_ssize_t s, Answer a) except -1
    cdef int up_fail_all(self, int status, str why, dict unsent=*) except -1
    cdef dict up_unsent(self)
    cdef int up_sweep(self, double now) except -1
    cdef int up_flush(self) except -1
    cdef int up_flush_touched(self) except -1
    cdef int up_process(self) except -1
    cdef int refuse_frame(self, FrameInfo* fi, int status, str why) except -1
    cdef int up_check(self) except -1


cdef class OutboundConn(Conn):
    cdef list dests                     # UpstreamConns with staged frames during one read
    cdef readonly Py_ssize_t in_flight  # requests read here and not answered yet
    cdef bint in_touched                # already in some UpstreamConn.touched list
    cdef bytes last_method              # the method name of the last Thrift call, reused
    cdef readonly bint wants_notice     # asked for the restart notice (octo-restart-notice: 1)
    cdef Signer signer                  # service authentication: the appkeys signed for, or None

    cdef int out_process(self) except -1
    cdef int out_error(self, int64_t seq_id, int status, str message, bint restart, int protocol,
                       object method=*, int32_t body_seq=*) except -1
    cdef object out_method(self, const uint8_t* p, Py_ssize_t moff, Py_ssize_t mlen)
    cdef bint _answer_compressed(self, uint8_t* p, Py_ssize_t r, FrameInfo* fi) except -1
    # skey: the key to sign with when the caller found it already (None: looked up)
    cdef int out_send(self, uint8_t* p, Py_ssize_t r, FrameInfo* fi, double now, double deadline,
                      int attempt, Node avoid, _Hmac skey) except -1
    cdef int out_resend(self, bytes frame, int64_t orig_id, double deadline, int attempt,
                        Node avoid, bint unsent) except -1
    cdef int out_answer(self, Answer a, int64_t seq_id, const uint8_t* p, Py_ssize_t moff,
                        Py_ssize_t mlen, int32_t body_seq) except -1
    cdef int out_flush(self) except -1
    cdef int out_check_unread(self) except -1
    cdef int out_flush_dests(self) except -1
    cdef int out_refuse(self, FrameInfo* fi, int status, str message) except -1
    cdef int refuse_frame(self, FrameInfo* fi, int status, str why) except -1


cdef class InboundConn(Conn):
    cdef readonly str provider_path     # the provider app's UDS
    cdef readonly ProviderConn provider
    cdef OutBuf reply                   # staged back to the peer (heartbeat answers, errors)
    cdef list backlog                   # bytes for the provider while it connects
    cdef readonly bint is_proxy           # the peer announced itself (octo-proxy: 1)
    cdef readonly bint restart_sent
    cdef readonly Py_ssize_t in_flight  # requests read here and not answered yet
    cdef double deadline                # latest caller deadline among them (monotonic)
    cdef public ServiceGov gov          # provider-side limits of the listener's appkey, or None
    cdef Verifier verifier              # service authentication of the callers, or None
    cdef bint served                    # a request was read here (a legacy client, unless is_proxy)
    cdef readonly bint ending           # drain: read nothing more; FIN once nothing read is owed

    cdef int in_process(self, double now) except -1
    cdef int in_end_when_idle(self) except -1
    cdef int in_expire(self, double now) except -1
    cdef int in_error(self, FrameInfo* fi, int status, str message) except -1
    cdef int in_flush(self) except -1
    cdef int refuse_frame(self, FrameInfo* fi, int status, str why) except -1


cdef class ProviderConn(Conn):
    cdef InboundConn inbound

    cdef int pv_process(self) except -1
    cdef int refuse_frame(self, FrameInfo* fi, int status, str why) except -1
