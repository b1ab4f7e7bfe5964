# cython: language_level=3
"""The per-connection data path.

Each connection is an asyncio BufferedProtocol implemented here: the event
loop reads straight into the connection's C receive buffer, then calls
``buffer_updated`` once; from there every frame of the read is scanned,
routed, its sequence id rewritten in place, and staged for its destination
in C.  No Python object is made for a forwarded request, with three
exceptions: a Thrift call's method name (bytes, kept for an error answer)
and, on a listener that signs, the caller's appkey (auth.pyx: key_for),
each when it differs from the previous one, and a copy of the request when
governance may retry it.  Python objects are otherwise touched
only through reference counts (the node and connection a request holds) and
set/list operations once per read or state change (the destinations a read
fed, an upstream connection's first request in flight joining the timeout
sweep), as ``cython -a`` shows.  What the reads of one event-loop iteration
stage for a destination goes out in one write at the end of the iteration,
from the core's buffer straight to the socket when nothing waits in the
transport.  Connections are created and closed by the
Python modules (listeners.py, upstream.py); this module never awaits.

One extension, one file per role (``include``d below, in this order):

- conn.pxi      the connection base: receive buffer, staged output, pausing
- answer.pxi    local answers, pre-encoded per reason
- stats.pxi     Stats, the engine's base: the counters table, latency histogram, route errors
- engine.pxi    Engine: limits, protocol factories, timers, write batching, drain
- upstream.pxi  UpstreamPool and UpstreamConn with its pending table
- outbound.pxi  OutboundConn: an app's connection to the outbound listener
- inbound.pxi   InboundConn and ProviderConn: the provider side, paired 1:1
- authpath.pxi  service authentication: signing (outbound), verifying (inbound)

The declarations (fields and C methods of every class) are in datapath.pxd.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.buffer cimport PyBUF_WRITE
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.errno cimport EINTR, errno
from libc.string cimport memcmp, memcpy, memmove, strlen
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from cpython.unicode cimport PyUnicode_AsUTF8AndSize

from octoproxy._core.auth cimport (
    AU_BAD_SIGNATURE, AU_EXPIRED, AU_METHOD, AU_NOT_ALLOWED, AU_OK, AU_UNKNOWN_CALLER,
    AU_UNSIGNED, Signer, Verifier, _Hmac, au_now_ms, au_now_s, au_sign_extra, au_sign_into,
    au_verify,
)
from octoproxy._core.constants cimport (
    CALL_ONEWAY, CONN_CLOSED, CONN_CONNECTING, CONN_DRAINING, CONN_OPEN, MT_HEARTBEAT, MT_NORMAL,
    MT_PROXY_RESTART, MT_SCANNER_HEARTBEAT, PROTO_SERIAL_MASK, STATUS_DEGRADE, STATUS_PROTOCOL,
    STATUS_RPC, STATUS_SECURITY, STATUS_SERVICE, STATUS_SLOTS, STATUS_SUCCESS, STATUS_TRANSPORT,
)
from octoproxy._core.frame cimport (
    FE_TOO_LARGE, FF_GZIP, FF_PROXY_ANNOUNCE, FF_REQUEST, FF_RESPONSE, FF_RESTART_NOTICE, FF_SNAPPY,
    FK_OCTO, FR_GCTX_PUT_EXTRA,
    FrameInfo, fr_adler32, fr_error_answer, fr_error_call, fr_error_response, fr_gctx_put,
    fr_gctx_put_fi,
    fr_heartbeat_answer,
    fr_proxy_announce, fr_proxy_restart, fr_scan, fr_scan_header, fr_scan_want, fr_set_seq_id, fr_strerror,
)
from octoproxy._core.limits cimport (
    GV_MAX_CONNECTIONS, GV_MAX_PENDING, GV_OK, NodeGov, ServiceGov, gv_budget, gv_inbound,
    gv_may_retry, gv_on_answer, gv_outbound,
)
from octoproxy._core.route cimport (
    RT_NO_SERVICE_KEY, RT_SET_NO_NODE, RT_SHUNT_NO_NODE, RT_UNKNOWN_SERVICE, Node, RouteTable,
    ShuntStat, lb_on_done, lb_on_send,
)

import contextvars as _contextvars
import random as _random

from octoproxy._core.frame import encode_thrift_exception, read_compressed_request
from octoproxy.logs import peer_name as _peer_name
cdef extern from *:
    """
    #ifndef OCTOPROXY_DEBUG
    #define OCTOPROXY_DEBUG 0
    #endif
    """
    # 1 in OCTOPROXY_DEBUG=1 builds (setup.py): invariant checks are compiled
    # in; 0 in release builds, where the C compiler drops them
    const int OCTOPROXY_DEBUG

DEBUG = bool(OCTOPROXY_DEBUG)

cdef enum:
    # Conn.pause_mask bits: why a connection's reading is paused
    PAUSE_SELF = 1          # our own transport's write buffer is over the high mark
    PAUSE_UPSTREAM = 2      # an upstream connection we feed is over its high mark
    PAUSE_PEER = 4          # (inbound) the paired connection cannot take more
    PAUSE_CLOSING = 8       # close_clients(): nothing more is read, ever

    # Pending.gflags: what a request counts in its service's governance
    GF_COUNTED = 1          # in ServiceGov.inflight
    GF_PENDING = 2          # in ServiceGov.pending (its connection is still being made)
    GF_RETRY = 4            # in ServiceGov.retries_active
    MAX_UNSENT_TRIES = 3    # picks per request when a node's connection is backed off

    MIN_TAIL = 4096         # compact the receive buffer when less free space is left
    FIRST_SLOTS = 64        # initial pending-table size per upstream connection
    SOLO_STREAK = 4         # batched iterations with one read each before sending at once
    SOLO_RUN = 64           # reads sent at once between two batched (sampling) iterations

cdef extern from "<sys/socket.h>" nogil:
    ssize_t c_send "send"(int fd, const void* buf, size_t n, int flags)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL

cdef double TICK = 0.01                        # timeout sweep period (seconds)
cdef int64_t MAX_ID = 0x3FFFFFFFFFFFFFFF       # upstream sequence ids wrap below this

include "conn.pxi"
include "answer.pxi"
include "stats.pxi"
include "engine.pxi"
include "upstream.pxi"
include "outbound.pxi"
include "inbound.pxi"
include "authpath.pxi"
