# ---------------------------------------------------------------- local answers
#
# What the proxy answers by itself (hot restart, overload, no route, upstream
# unavailable, timeout, upstream lost) is encoded once per reason, by the
# Python-level encoder, and kept: each use copies it and writes the request's
# sequence id in, so shedding load costs less than forwarding (no Python
# objects per request).  A template made with a Thrift EXCEPTION body
# (fr_error_answer with an empty method name, docs/protocol.md) also takes the
# request's method name and body seqid at each use; the frame's length and,
# when the protocol byte asks for it, its Adler-32 trailer are fixed up.

cdef enum:
    ROUTE_SLOTS = 64            # route-error answers kept per engine (hashed)
    ANSWER_KINDS = 16           # akey(): serialization (2 bits), checksum, Thrift body


@cython.final
cdef class Answer:
    """One pre-encoded local answer (see the section's comment)."""

    def __cinit__(self):
        self.k3 = None
        self.name_at = -1


cdef inline int akey(int protocol, bint thrift_body) noexcept nogil:
    """Which template of a reason an answer needs: the protocol byte's
    serialization and checksum bits, and whether the body is a Thrift EXCEPTION."""
    return (protocol & PROTO_SERIAL_MASK) | (4 if protocol & 0x80 else 0) | (8 if thrift_body else 0)


cdef int answer_kind(const uint8_t* p, FrameInfo* fi, Py_ssize_t* moff, Py_ssize_t* mlen,
                     int32_t* body_seq) noexcept nogil:
    """The template kind (akey) an answer to the request p/fi uses, and the
    method name and body seqid that go in it (docs/protocol.md 11): the
    request's serialization and checksum bits, and, when its body is a strict
    TBinaryProtocol call, a Thrift EXCEPTION body with its method and seqid
    (where a Dorado client reads the reason)."""
    cdef Py_ssize_t off
    mlen[0] = 0
    body_seq[0] = 0
    off = fr_error_call(p, fi, mlen, body_seq)
    if off < 0:
        moff[0] = 0
        mlen[0] = 0
        return akey(fi.protocol, False)
    moff[0] = off
    return akey(fi.protocol, True)


cdef Answer make_answer(int status, str message, bint restart, int kind):
    """Encode a template of kind `kind` (akey) with sequence id 0."""
    cdef Answer a = Answer()
    cdef FrameInfo fi
    cdef bytes data
    cdef const uint8_t* d
    cdef Py_ssize_t n
    cdef int protocol = (kind & PROTO_SERIAL_MASK) | (0x80 if kind & 4 else 0)
    if kind & 8:
        data = fr_error_answer(0, status, message, restart, protocol, b"", 0)
    else:
        data = fr_error_response(0, status, message, restart, protocol)
    d = <const uint8_t*>PyBytes_AS_STRING(data)
    n = PyBytes_GET_SIZE(data)
    if fr_scan(d, n, n + 8, n, &fi) != n or fi.seq_off < 0:
        raise AssertionError("a local answer template does not scan")
    a.data = data
    a.seq_off = fi.seq_off
    a.status = status
    a.checksum = (d[3] & 0x80) != 0
    if kind & 8:
        # 80 01 00 03 | i32 name length (0) | name | i32 seqid | TApplicationException
        if fi.body_len < 12 or memcmp(d + fi.body_off, b"\x80\x01\x00\x03\x00\x00\x00\x00", 8) != 0:
            raise AssertionError("a Thrift EXCEPTION template without its message header")
        a.name_at = fi.body_off + 8
    return a


cdef inline void put_be32(char* p, uint32_t v) noexcept nogil:
    p[0] = <char>(v >> 24)
    p[1] = <char>(v >> 16)
    p[2] = <char>(v >> 8)
    p[3] = <char>v


cdef inline void put_be64(char* p, int64_t v) noexcept nogil:
    put_be32(p, <uint32_t>(<uint64_t>v >> 32))
    put_be32(p + 4, <uint32_t>(<uint64_t>v & 0xFFFFFFFFu))


cdef inline uint32_t get_be32(const char* p) noexcept nogil:
    cdef const uint8_t* u = <const uint8_t*>p
    return (<uint32_t>u[0] << 24) | (<uint32_t>u[1] << 16) | (<uint32_t>u[2] << 8) | u[3]


cdef int answer_into(OutBuf* ob, Answer a, int64_t seq_id, const char* method, Py_ssize_t mlen,
                     int32_t body_seq) except -1:
    """Append a's frame to ob with seq_id (and, for a Thrift body, the method
    name and body seqid) written in."""
    cdef const char* src = PyBytes_AS_STRING(a.data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(a.data)
    cdef Py_ssize_t total = n + (mlen if a.name_at >= 0 else 0)
    cdef char* dst
    if ob.len + total > ob.cap:
        ob_reserve(ob, total)
    dst = ob.data + ob.len
    if a.name_at < 0:
        memcpy(dst, src, n)
    else:
        memcpy(dst, src, a.name_at)
        if mlen:
            memcpy(dst + a.name_at, method, mlen)
        memcpy(dst + a.name_at + mlen, src + a.name_at, n - a.name_at)
        put_be32(dst + a.name_at - 4, <uint32_t>mlen)
        put_be32(dst + a.name_at + mlen, <uint32_t>body_seq)
        put_be32(dst + 4, get_be32(dst + 4) + <uint32_t>mlen)   # the frame's total length
    put_be64(dst + a.seq_off, seq_id)
    if a.checksum:
        put_be32(dst + total - 4, fr_adler32(<const uint8_t*>dst, total - 4))
    ob.len += total
    return 0


cdef inline uint64_t fnv(uint64_t h, const char* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ <uint8_t>p[i]) * 1099511628211ULL
    return h


cdef inline bint same_bytes(bytes b, const char* p, Py_ssize_t n) noexcept:
    """b holds exactly p[:n]; None stands for an absent field (n < 0)."""
    if b is None:
        return n < 0
    return n >= 0 and PyBytes_GET_SIZE(b) == n and memcmp(PyBytes_AS_STRING(b), p, n) == 0


def _answer_for_test(int status, str message, bint restart, int kind, int64_t seq_id,
                     bytes method=b"", int32_t body_seq=0):
    """A local answer as the data path builds it from its template (tests)."""
    cdef OutBuf ob
    ob.data = NULL
    ob.len = ob.cap = 0
    a = make_answer(status, message, restart, kind)
    try:
        answer_into(&ob, a, seq_id, PyBytes_AS_STRING(method), PyBytes_GET_SIZE(method), body_seq)
        return PyBytes_FromStringAndSize(ob.data, ob.len)
    finally:
        ob_free(&ob)
