# cython: language_level=3
"""OCTO frame codec: the zero-copy scanner the data path runs per received
buffer, in-place sequence id rewriting, Adler-32, and the (slow, Python-level)
encoders/decoder used for control frames, the SDK and tests.

The contract is frame.pxd; the wire format is docs/protocol.md."""

cimport cython
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcmp, memcpy, memset

from octoproxy._core.constants cimport (
    CALL_ONEWAY, CALL_TWOWAY, MT_HEARTBEAT, MT_NORMAL, MT_PROXY_RESTART, MT_SCANNER_HEARTBEAT,
    PROTO_SERIAL_MASK, SERIAL_THRIFT, STATUS_APPLICATION, STATUS_DEGRADE, STATUS_PROTOCOL,
    STATUS_REMOTE, STATUS_RPC, STATUS_RUNTIME, STATUS_SECURITY, STATUS_SERVICE, STATUS_SUCCESS,
    STATUS_TRANSPORT,
)

import struct as _struct
import time as _time
import zlib as _zlib

# Thrift TBinaryProtocol type codes.
cdef enum:
    T_STOP = 0
    T_BOOL = 2
    T_BYTE = 3
    T_DOUBLE = 4
    T_I16 = 6
    T_I32 = 8
    T_I64 = 10
    T_STRING = 11
    T_STRUCT = 12
    T_MAP = 13
    T_SET = 14
    T_LIST = 15

    OCTO_PREFIX = 10         # magic 2 + version 1 + protocol 1 + total_length 4 + header_length 2
    PROTO_CHECKSUM = 0x80
    PROTO_GZIP = 0x40
    PROTO_SNAPPY = 0x20
    THRIFT_MIN_MESSAGE = 12  # version/type 4 + name length 4 + seqid 4
    TM_CALL = 1              # native Thrift TMessageType
    TM_REPLY = 2
    TM_EXCEPTION = 3
    TM_ONEWAY = 4


# ---------------------------------------------------------------- C helpers

cdef inline uint32_t fr_rd_u32(const uint8_t* p) noexcept nogil:
    return ((<uint32_t>p[0]) << 24) | ((<uint32_t>p[1]) << 16) | ((<uint32_t>p[2]) << 8) | p[3]


cdef inline int64_t fr_rd_i64(const uint8_t* p) noexcept nogil:
    return <int64_t>(((<uint64_t>fr_rd_u32(p)) << 32) | fr_rd_u32(p + 4))


cdef inline void fr_wr_u32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>(v >> 16)
    p[2] = <uint8_t>(v >> 8)
    p[3] = <uint8_t>v


cdef uint32_t fr_adler32(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    # 5552 is the largest run that cannot overflow 32-bit sums (zlib's NMAX),
    # so the modulo is taken once per run instead of once per byte.
    cdef uint32_t a = 1, b = 0
    cdef Py_ssize_t run
    while n > 0:
        run = 5552 if n > 5552 else n
        n -= run
        while run >= 8:
            a += p[0]; b += a
            a += p[1]; b += a
            a += p[2]; b += a
            a += p[3]; b += a
            a += p[4]; b += a
            a += p[5]; b += a
            a += p[6]; b += a
            a += p[7]; b += a
            p += 8
            run -= 8
        while run > 0:
            a += p[0]; b += a
            p += 1
            run -= 1
        a %= 65521
        b %= 65521
    return (b << 16) | a


cdef inline Py_ssize_t fr_min_size(int t) noexcept nogil:
    # Smallest encoding of one value of type t, so that an element count can
    # be checked against the bytes left before a single element is read.
    if t == T_BOOL or t == T_BYTE:
        return 1
    if t == T_I16:
        return 2
    if t == T_I32:
        return 4
    if t == T_I64 or t == T_DOUBLE:
        return 8
    if t == T_STRING:
        return 4
    if t == T_STRUCT:
        return 1
    if t == T_MAP:
        return 6
    if t == T_SET or t == T_LIST:
        return 5
    return -1


cdef const uint8_t* fr_skip(const uint8_t* p, const uint8_t* end, int t, int depth,
                            int* err) noexcept nogil:
    # Skip one value of type t; NULL with *err set when it is malformed.
    # Every loop consumes at least one byte per turn and counts are checked
    # against the bytes left, so the work is bounded by the header length.
    cdef Py_ssize_t cnt, i, ks, vs
    cdef int32_t k
    cdef int ft, kt, vt
    if t == T_BOOL or t == T_BYTE or t == T_I16 or t == T_I32 or t == T_I64 or t == T_DOUBLE:
        ks = fr_min_size(t)
        if end - p < ks:
            err[0] = FE_BAD_HEADER
            return NULL
        return p + ks
    if t == T_STRING:
        if end - p < 4:
            err[0] = FE_BAD_HEADER
            return NULL
        k = <int32_t>fr_rd_u32(p)
        if k < 0 or k > end - p - 4:
            err[0] = FE_BAD_HEADER
            return NULL
        return p + 4 + k
    if t != T_STRUCT and t != T_MAP and t != T_SET and t != T_LIST:
        err[0] = FE_BAD_HEADER
        return NULL
    if depth > FR_MAX_DEPTH:
        err[0] = FE_TOO_DEEP
        return NULL
    if t == T_STRUCT:
        while True:
            if p >= end:
                err[0] = FE_BAD_HEADER
                return NULL
            ft = p[0]
            if ft == T_STOP:
                return p + 1
            if end - p < 3:
                err[0] = FE_BAD_HEADER
                return NULL
            p = fr_skip(p + 3, end, ft, depth + 1, err)
            if p == NULL:
                return NULL
    if t == T_MAP:
        if end - p < 6:
            err[0] = FE_BAD_HEADER
            return NULL
        kt = p[0]
        vt = p[1]
        cnt = <int32_t>fr_rd_u32(p + 2)
        p += 6
        if cnt == 0:
            return p
        ks = fr_min_size(kt)
        vs = fr_min_size(vt)
        if cnt < 0 or ks < 0 or vs < 0 or cnt > (end - p) // (ks + vs):
            err[0] = FE_BAD_HEADER
            return NULL
        for i in range(cnt):  # no-cython-lint: only the count matters
            p = fr_skip(p, end, kt, depth + 1, err)
            if p == NULL:
                return NULL
            p = fr_skip(p, end, vt, depth + 1, err)
            if p == NULL:
                return NULL
        return p
    # set / list
    if end - p < 5:
        err[0] = FE_BAD_HEADER
        return NULL
    kt = p[0]
    cnt = <int32_t>fr_rd_u32(p + 1)
    p += 5
    if cnt == 0:
        return p
    ks = fr_min_size(kt)
    if cnt < 0 or ks < 0 or cnt > (end - p) // ks:
        err[0] = FE_BAD_HEADER
        return NULL
    if ks == 8 or ks == 4 and kt != T_STRING or ks == 2 or ks == 1 and kt != T_STRUCT:
        # fixed-size elements: one bounds check for the whole run
        return p + cnt * ks
    for i in range(cnt):  # no-cython-lint: only the count matters
        p = fr_skip(p, end, kt, depth + 1, err)
        if p == NULL:
            return NULL
    return p


cdef inline const uint8_t* fr_field(const uint8_t* p, const uint8_t* end, int* ft, int* fid,
                                    int* err) noexcept nogil:
    # Read a field header; ft = T_STOP at the end of the struct.
    if p >= end:
        err[0] = FE_BAD_HEADER
        return NULL
    ft[0] = p[0]
    if ft[0] == T_STOP:
        return p + 1
    if end - p < 3:
        err[0] = FE_BAD_HEADER
        return NULL
    fid[0] = <int16_t>((p[1] << 8) | p[2])
    return p + 3


cdef inline const uint8_t* fr_string(const uint8_t* p, const uint8_t* end, const uint8_t* base,
                                     Py_ssize_t* off, Py_ssize_t* ln, int* err) noexcept nogil:
    cdef int32_t k
    if end - p < 4:
        err[0] = FE_BAD_HEADER
        return NULL
    k = <int32_t>fr_rd_u32(p)
    if k < 0 or k > end - p - 4:
        err[0] = FE_BAD_HEADER
        return NULL
    off[0] = p + 4 - base
    ln[0] = k
    return p + 4 + k


cdef inline const uint8_t* fr_known(const uint8_t* p, const uint8_t* end, int ft, int want,
                                    Py_ssize_t size, int* err) noexcept nogil:
    # A known field: wrong Thrift type -> FE_BAD_FIELD_TYPE; its `size` bytes
    # not all there -> FE_BAD_HEADER.  Returns p (NULL on error).
    if ft != want:
        err[0] = FE_BAD_FIELD_TYPE
        return NULL
    if end - p < size:
        err[0] = FE_BAD_HEADER
        return NULL
    return p


cdef inline const uint8_t* fr_known_str(const uint8_t* p, const uint8_t* end, const uint8_t* base,
                                        int ft, Py_ssize_t* off, Py_ssize_t* ln,
                                        int* err) noexcept nogil:
    if ft != T_STRING:
        err[0] = FE_BAD_FIELD_TYPE
        return NULL
    return fr_string(p, end, base, off, ln, err)


cdef inline const uint8_t* fr_seq(const uint8_t* p, const uint8_t* end, const uint8_t* base,
                                  int ft, FrameInfo* fi, int* err) noexcept nogil:
    # RequestInfo/ResponseInfo sequenceId: value and where its 8 bytes are
    if fr_known(p, end, ft, T_I64, 8, err) == NULL:
        return NULL
    fi.seq_id = fr_rd_i64(p)
    fi.seq_off = p - base
    return p + 8


cdef const uint8_t* fr_request_info(const uint8_t* p, const uint8_t* end, const uint8_t* base,
                                    FrameInfo* fi, int* err) noexcept nogil:
    cdef int ft = 0, fid = 0
    cdef bint has_seq = False
    while True:
        p = fr_field(p, end, &ft, &fid, err)
        if p == NULL:
            return NULL
        if ft == T_STOP:
            break
        if fid == 1:                      # serviceName
            p = fr_known_str(p, end, base, ft, &fi.service_off, &fi.service_len, err)
        elif fid == 2:                    # sequenceId
            p = fr_seq(p, end, base, ft, fi, err)
            has_seq = True
        elif fid == 3:                    # callType
            if fr_known(p, end, ft, T_BYTE, 1, err) == NULL:
                return NULL
            fi.call_type = <int8_t>p[0]
            p += 1
        elif fid == 4:                    # timeout
            if fr_known(p, end, ft, T_I32, 4, err) == NULL:
                return NULL
            fi.timeout = <int32_t>fr_rd_u32(p)
            p += 4
        else:
            p = fr_skip(p, end, ft, 2, err)
        if p == NULL:
            return NULL
    if not has_seq:
        # the data path multiplexes by sequence id: a request without one
        # could never be answered
        err[0] = FE_BAD_HEADER
        return NULL
    fi.flags |= FF_REQUEST
    return p


cdef const uint8_t* fr_response_info(const uint8_t* p, const uint8_t* end, const uint8_t* base,
                                     FrameInfo* fi, int* err) noexcept nogil:
    cdef int ft = 0, fid = 0
    cdef bint has_seq = False
    while True:
        p = fr_field(p, end, &ft, &fid, err)
        if p == NULL:
            return NULL
        if ft == T_STOP:
            break
        if fid == 1:                      # sequenceId
            p = fr_seq(p, end, base, ft, fi, err)
            has_seq = True
        elif fid == 2:                    # status
            if fr_known(p, end, ft, T_BYTE, 1, err) == NULL:
                return NULL
            fi.status = <int8_t>p[0]
            p += 1
        elif fid == 3:                    # message
            p = fr_known_str(p, end, base, ft, &fi.message_off, &fi.message_len, err)
        else:
            p = fr_skip(p, end, ft, 2, err)
        if p == NULL:
            return NULL
    if not has_seq:
        err[0] = FE_BAD_HEADER
        return NULL
    fi.flags |= FF_RESPONSE
    return p


cdef inline const uint8_t* fr_ctx_entry(const uint8_t* p, const uint8_t* e, Py_ssize_t* kl,
                                        Py_ssize_t* vl) noexcept nogil:
    # One map<string,string> entry at p (e: the end of the bytes): the key is
    # p[4:4+kl], the value follows its own 4-byte length.  Returns the next
    # entry, or NULL when the entry does not fit.  The one reader of context
    # entries: fr_context (scan time, checking) and fr_context_many (lookups).
    cdef int32_t k, v
    if e - p < 8:
        return NULL
    k = <int32_t>fr_rd_u32(p)
    if k < 0 or k > e - p - 8:
        return NULL
    v = <int32_t>fr_rd_u32(p + 4 + k)
    if v < 0 or v > e - p - 8 - k:
        return NULL
    kl[0] = k
    vl[0] = v
    return p + 8 + k + v


# The context-map keys the scanner picks out (docs/protocol.md 7.1): one row
# each in CTX_KEYS below, so adding a key is one row (and, for a span, its
# two FrameInfo fields).  SPAN(map, key, field): the value's offset and
# length go to FrameInfo.<field>_off and <field>_len.  FLAG(map, key, name):
# FF_<name> is set in FrameInfo.flags when the value is "1".  map: L
# (localContext) or G (globalContext).  The table is a C macro so that each
# row compiles to what a hand-written chain did: a length compare and a
# memcmp of a constant length, which the C compiler turns into a few word
# compares (a data table cost 10% more instructions per frame in the scanner,
# cachegrind).  The last of a repeated key wins.
cdef extern from *:
    """
    #define CTX_KEYS(SPAN, FLAG) \
        SPAN(L, "octo-remote-appkey", appkey) \
        SPAN(L, "octo-hash-key", hashkey) \
        FLAG(L, "octo-proxy-restart", PROXY_RESTART) \
        FLAG(L, "octo-proxy", PROXY_ANNOUNCE) \
        FLAG(L, "octo-restart-notice", RESTART_NOTICE) \
        SPAN(L, "octo-auth", auth_sig)  /* whole; fr_auth_split splits it */ \
        SPAN(G, "octo-liteset", liteset) \
        SPAN(G, "octo-set", set) \
        SPAN(G, "octo-swimlane", swimlane)

    /* one row as an `if (...) {...} else`, in the chain of its own map only */
    #define CTX_IS(k) (ctx_klen == (Py_ssize_t)sizeof(k) - 1 \
                       && memcmp(ctx_key, k, sizeof(k) - 1) == 0)
    #define CTX_SPAN_L_L(k, f) if (CTX_IS(k)) { ctx_fi->f##_off = ctx_voff; \
                                               ctx_fi->f##_len = ctx_vlen; } else
    #define CTX_SPAN_G_G CTX_SPAN_L_L
    #define CTX_SPAN_L_G(k, f)
    #define CTX_SPAN_G_L(k, f)
    #define CTX_FLAG_L_L(k, n) if (CTX_IS(k)) { if (ctx_vlen == 1 && ctx_base[ctx_voff] == '1') \
        ctx_fi->flags |= __pyx_e_9octoproxy_5_core_5frame_FF_##n; } else
    #define CTX_FLAG_G_G CTX_FLAG_L_L
    #define CTX_FLAG_L_G(k, n)
    #define CTX_FLAG_G_L(k, n)
    #define CTX_SPAN_IN_L(m, k, f) CTX_SPAN_##m##_L(k, f)
    #define CTX_SPAN_IN_G(m, k, f) CTX_SPAN_##m##_G(k, f)
    #define CTX_FLAG_IN_L(m, k, n) CTX_FLAG_##m##_L(k, n)
    #define CTX_FLAG_IN_G(m, k, n) CTX_FLAG_##m##_G(k, n)
    #define CTX_MATCH(M, key, klen, base, voff, vlen, fi) do { \
        const uint8_t* ctx_key = (key); Py_ssize_t ctx_klen = (klen); \
        const uint8_t* ctx_base = (base); Py_ssize_t ctx_voff = (voff), ctx_vlen = (vlen); \
        __typeof__(fi) ctx_fi = (fi); (void)ctx_base; \
        CTX_KEYS(CTX_SPAN_IN_##M, CTX_FLAG_IN_##M) {} \
    } while (0)
    #define OCTO_CTX_LOCAL(key, klen, base, voff, vlen, fi) CTX_MATCH(L, key, klen, base, voff, vlen, fi)
    #define OCTO_CTX_GLOBAL(key, klen, base, voff, vlen, fi) CTX_MATCH(G, key, klen, base, voff, vlen, fi)
    """
    void OCTO_CTX_LOCAL(const uint8_t* key, Py_ssize_t klen, const uint8_t* base,
                        Py_ssize_t voff, Py_ssize_t vlen, FrameInfo* fi) noexcept nogil
    void OCTO_CTX_GLOBAL(const uint8_t* key, Py_ssize_t klen, const uint8_t* base,
                         Py_ssize_t voff, Py_ssize_t vlen, FrameInfo* fi) noexcept nogil


cdef const uint8_t* fr_context(const uint8_t* p, const uint8_t* end, const uint8_t* base,
                               FrameInfo* fi, bint local, int* err) noexcept nogil:
    # map<string,string>: pick out the keys of the table above (CTX_KEYS).
    cdef Py_ssize_t cnt, i, klen = 0, voff = 0, vlen = 0
    cdef const uint8_t* key
    cdef const uint8_t* q
    cdef int k
    if end - p < 6:
        err[0] = FE_BAD_HEADER
        return NULL
    if local:
        fi.lctx_off = p - base
        fi.lctx_end = p + 6 - base
        fi.wfound_l = 0  # a repeated map: the last one counts
    else:
        fi.gctx_off = p - base
        fi.gctx_end = p + 6 - base
        fi.wfound_g = 0
    cnt = <int32_t>fr_rd_u32(p + 2)
    if cnt == 0:
        # some encoders write key/value type 0 for an empty map
        return p + 6
    if p[0] != T_STRING or p[1] != T_STRING:
        err[0] = FE_BAD_FIELD_TYPE
        return NULL
    p += 6
    if cnt < 0 or cnt > (end - p) // 8:
        err[0] = FE_BAD_HEADER
        return NULL
    for i in range(cnt):  # no-cython-lint: only the count matters
        key = p + 4
        q = fr_ctx_entry(p, end, &klen, &vlen)
        if q == NULL:
            err[0] = FE_BAD_HEADER
            return NULL
        voff = p + 8 + klen - base
        if fi.want != 0 and (<const FrCtxKeys*>fi.want).first[klen & 63]:
            # the keys traffic shunting reads (fr_scan_want)
            k = fr_want_find(p, <size_t>klen, <const FrCtxKeys*>fi.want)
            if k:
                k -= 1
                if local:
                    fi.woff_l[k] = <int32_t>voff
                    fi.wlen_l[k] = <int32_t>vlen
                    fi.wfound_l |= (<uint32_t>1) << k
                else:
                    fi.woff_g[k] = <int32_t>voff
                    fi.wlen_g[k] = <int32_t>vlen
                    fi.wfound_g |= (<uint32_t>1) << k
        p = q
        if klen < 8 or memcmp(key, b"octo-", 5) != 0:
            continue
        if local:
            OCTO_CTX_LOCAL(key, klen, base, voff, vlen, fi)
        else:
            OCTO_CTX_GLOBAL(key, klen, base, voff, vlen, fi)
    if local:
        fi.lctx_end = p - base
    else:
        fi.gctx_end = p - base
    return p


cdef const uint8_t* fr_caller(const uint8_t* p, const uint8_t* end, const uint8_t* base,
                              FrameInfo* fi, bint trace, int* err) noexcept nogil:
    # traceInfo (field 1 clientAppkey) or heartbeatInfo (field 1 appkey): the
    # caller's appkey; traceInfo wins over heartbeatInfo.  Other fields, and a
    # field 1 of another type, are skipped (only well-formedness is checked
    # inside these structs, docs/protocol.md).
    cdef int ft = 0, fid = 0
    cdef Py_ssize_t off = 0, ln = 0
    while True:
        p = fr_field(p, end, &ft, &fid, err)
        if p == NULL:
            return NULL
        if ft == T_STOP:
            return p
        if fid == 1 and ft == T_STRING:
            p = fr_string(p, end, base, &off, &ln, err)
            if p != NULL and (trace or fi.caller_len < 0):
                fi.caller_off = off
                fi.caller_len = ln
        else:
            p = fr_skip(p, end, ft, 2, err)
        if p == NULL:
            return NULL


cdef void fr_auth_split(const uint8_t* base, FrameInfo* fi) noexcept nogil:
    # localContext octo-auth (docs/protocol.md 7.6), which the context walk
    # left whole in auth_sig: caller ":" timestamp ":" signature, split at its
    # last two colons (the caller may hold any byte, the other two hold no
    # colon).  Without two colons and a caller before them, no part is set:
    # the request counts as unsigned.
    cdef const uint8_t* v = base + fi.auth_sig_off
    cdef Py_ssize_t n = fi.auth_sig_len, i, j
    fi.auth_sig_off = -1
    fi.auth_sig_len = -1
    i = n - 1 - AUTH_SIG_CHARS
    if i < 0 or v[i] != 58:       # not the usual length: search back for ':'
        i = n - 1
        while i >= 0 and v[i] != 58:
            i -= 1
    j = i - 1
    while j >= 0 and v[j] != 58:
        j -= 1
    if j <= 0:
        return
    fi.auth_app_off = v - base
    fi.auth_app_len = j
    fi.auth_ts_off = fi.auth_app_off + j + 1
    fi.auth_ts_len = i - j - 1
    fi.auth_sig_off = fi.auth_app_off + i + 1
    fi.auth_sig_len = n - i - 1


cdef int fr_header(const uint8_t* base, Py_ssize_t off, Py_ssize_t hl, FrameInfo* fi) noexcept nogil:
    # Decode the Header struct at base[off:off+hl]; 0 or an FE_* code.
    cdef const uint8_t* p = base + off
    cdef const uint8_t* end = p + hl
    cdef const uint8_t* q
    cdef int ft = 0, fid = 0, err = FE_BAD_HEADER
    while True:
        p = fr_field(p, end, &ft, &fid, &err)
        if p == NULL:
            return err
        if ft == T_STOP:
            break
        if fid == 1:                      # messageType
            if fr_known(p, end, ft, T_BYTE, 1, &err) == NULL:
                return err
            fi.msg_type = <int8_t>p[0]
            p += 1
        elif fid == 2:                    # requestInfo
            if ft != T_STRUCT:
                return FE_BAD_FIELD_TYPE
            p = fr_request_info(p, end, base, fi, &err)
        elif fid == 3:                    # responseInfo
            if ft != T_STRUCT:
                return FE_BAD_FIELD_TYPE
            p = fr_response_info(p, end, base, fi, &err)
        elif fid == 5 or fid == 6:        # globalContext / localContext
            if ft != T_MAP:
                return FE_BAD_FIELD_TYPE
            q = p
            p = fr_context(p, end, base, fi, fid == 6, &err)
            if p != NULL:
                # the map's size, for the context limits (the last one wins)
                if fid == 6:
                    fi.lctx_len = p - q
                else:
                    fi.gctx_len = p - q
        elif fid == 4 or fid == 7:        # traceInfo / heartbeatInfo: only the caller's appkey
            if ft != T_STRUCT:
                return FE_BAD_FIELD_TYPE
            p = fr_caller(p, end, base, fi, fid == 4, &err)
        else:
            p = fr_skip(p, end, ft, 1, &err)
        if p == NULL:
            return err
    if p != end:
        # bytes after the stop byte: header_length and the struct disagree
        return FE_BAD_HEADER
    if fi.auth_sig_len >= 0:
        fr_auth_split(base, fi)
    if (fi.flags & (FF_REQUEST | FF_RESPONSE)) == 0 and fi.msg_type <= MT_NORMAL:
        # a normal message must be a request or a response; heartbeats and
        # ProxyRestart may carry neither
        return FE_BAD_HEADER
    return 0


cdef inline void fr_reset(FrameInfo* fi) noexcept nogil:
    fi.kind = 0
    fi.flags = 0
    fi.version = 0
    fi.protocol = 0
    fi.msg_type = -1
    fi.length = 0
    fi.header_off = -1
    fi.header_len = 0
    fi.body_off = -1
    fi.body_len = 0
    fi.seq_id = 0
    fi.seq_off = -1
    fi.call_type = 0
    fi.timeout = -1
    fi.status = -1
    fi.service_off = -1
    fi.service_len = -1
    fi.appkey_off = -1
    fi.appkey_len = -1
    fi.liteset_off = -1
    fi.liteset_len = -1
    fi.set_off = -1
    fi.set_len = -1
    fi.swimlane_off = -1
    fi.swimlane_len = -1
    fi.hashkey_off = -1
    fi.hashkey_len = -1
    fi.message_off = -1
    fi.message_len = -1
    fi.caller_off = -1
    fi.caller_len = -1
    fi.gctx_len = 0
    fi.lctx_len = 0
    fi.auth_app_off = -1
    fi.auth_app_len = -1
    fi.auth_ts_off = -1
    fi.auth_ts_len = -1
    fi.auth_sig_off = -1
    fi.auth_sig_len = -1
    fi.lctx_off = -1
    fi.lctx_end = -1
    fi.gctx_off = -1
    fi.gctx_end = -1
    fi.method_off = FM_UNREAD
    fi.method_len = -1
    fi.want = 0
    fi.wfound_g = 0
    fi.wfound_l = 0


cdef Py_ssize_t fr_scan_thrift(const uint8_t* buf, Py_ssize_t n, Py_ssize_t max_frame,
                               FrameInfo* fi) noexcept nogil:
    # Native Thrift framed transport: i32 length + strict TBinaryProtocol
    # message.  Decide as early as the bytes allow, so garbage is rejected
    # after at most 8 bytes and an oversized frame before it is buffered.
    cdef int32_t mlen, nlen = 0
    cdef Py_ssize_t total
    cdef int mtype
    if n >= 4:
        mlen = <int32_t>fr_rd_u32(buf)
        if mlen <= 0:
            return FE_BAD_MAGIC
    # strict TBinaryProtocol: 0x80 0x01 0x00 type
    if (n > 4 and buf[4] != 0x80) or (n > 5 and buf[5] != 0x01) or (n > 6 and buf[6] != 0x00):
        return FE_BAD_MAGIC
    if n < 8:
        return FE_NEED_MORE
    mtype = buf[7]
    if mtype < TM_CALL or mtype > TM_ONEWAY:
        return FE_BAD_THRIFT
    total = 4 + <Py_ssize_t>mlen
    if total > max_frame:
        return FE_TOO_LARGE
    if mlen < THRIFT_MIN_MESSAGE:
        return FE_BAD_THRIFT
    if n >= 12:
        nlen = <int32_t>fr_rd_u32(buf + 8)
        if nlen < 0 or nlen > mlen - THRIFT_MIN_MESSAGE:
            return FE_BAD_THRIFT
    if n < total:
        return FE_NEED_MORE
    fi.kind = FK_THRIFT
    fi.msg_type = MT_NORMAL
    fi.length = total
    fi.header_off = 4
    fi.header_len = 0
    fi.body_off = 4
    fi.body_len = mlen
    fi.service_off = 12
    fi.service_len = nlen
    fi.seq_off = 12 + nlen
    fi.seq_id = <int32_t>fr_rd_u32(buf + fi.seq_off)
    if mtype == TM_CALL or mtype == TM_ONEWAY:
        fi.flags = FF_REQUEST
        fi.call_type = CALL_ONEWAY if mtype == TM_ONEWAY else CALL_TWOWAY
    else:
        fi.flags = FF_RESPONSE
    return total


cdef Py_ssize_t fr_scan(const uint8_t* buf, Py_ssize_t n, Py_ssize_t max_frame,
                        Py_ssize_t max_header, FrameInfo* fi) noexcept nogil:
    return fr_scan_want(buf, n, max_frame, max_header, fi, NULL)


cdef Py_ssize_t fr_scan_want(const uint8_t* buf, Py_ssize_t n, Py_ssize_t max_frame,
                             Py_ssize_t max_header, FrameInfo* fi,
                             const FrCtxKeys* want) noexcept nogil:
    cdef int32_t tl
    cdef Py_ssize_t total, hl, trailer, err
    cdef int proto
    fr_reset(fi)
    fi.want = <uintptr_t>want
    if n <= 0:
        return FE_NEED_MORE
    if buf[0] != 0xAB:
        return fr_scan_thrift(buf, n, max_frame, fi)
    if n < 2:
        return FE_NEED_MORE
    if buf[1] != 0xBA:
        # 0xAB as the top byte of a Thrift length is > 2 GiB: never valid
        return FE_BAD_MAGIC
    if n < 8:
        return FE_NEED_MORE
    proto = buf[3]
    trailer = 4 if proto & PROTO_CHECKSUM else 0
    tl = <int32_t>fr_rd_u32(buf + 4)
    if tl < 2 + trailer:
        return FE_BAD_LENGTH
    total = 8 + <Py_ssize_t>tl
    if total > max_frame:
        return FE_TOO_LARGE
    if n < OCTO_PREFIX:
        return FE_NEED_MORE
    hl = (buf[8] << 8) | buf[9]
    if hl > max_header:
        return FE_HEADER_TOO_LARGE
    if proto & (PROTO_GZIP | PROTO_SNAPPY) == 0 and 2 + hl + trailer > tl:
        # (a compressed frame's header_length is the uncompressed size)
        return FE_BAD_LENGTH
    if n < total:
        return FE_NEED_MORE
    if trailer and fr_adler32(buf, total - 4) != fr_rd_u32(buf + total - 4):
        return FE_BAD_CHECKSUM
    fi.kind = FK_OCTO
    fi.version = buf[2]
    fi.protocol = proto
    fi.length = total
    if trailer:
        fi.flags = FF_CHECKSUM
    if proto & (PROTO_GZIP | PROTO_SNAPPY):
        # header and body are compressed together: report the bounds only,
        # never guess at fields inside (see docs/protocol.md)
        if proto & PROTO_GZIP:
            fi.flags |= FF_GZIP
        if proto & PROTO_SNAPPY:
            fi.flags |= FF_SNAPPY
        fi.header_off = OCTO_PREFIX
        fi.header_len = hl
        fi.body_off = OCTO_PREFIX
        fi.body_len = total - trailer - OCTO_PREFIX
        return total
    fi.header_off = OCTO_PREFIX
    fi.header_len = hl
    fi.body_off = OCTO_PREFIX + hl
    fi.body_len = total - trailer - OCTO_PREFIX - hl
    err = fr_header(buf, OCTO_PREFIX, hl, fi)
    if err != 0:
        return err
    return total


cdef Py_ssize_t fr_scan_header(const uint8_t* buf, Py_ssize_t n, Py_ssize_t max_header,
                               FrameInfo* fi) noexcept nogil:
    # Decode just the header of an OCTO frame, for when the whole frame will
    # never be buffered (an oversized request still deserves an answer
    # carrying its sequence id).  total_length and the checksum are not
    # checked; fi.length is the length the frame claims.
    cdef Py_ssize_t hl, err
    cdef int proto
    fr_reset(fi)
    if n < 2:
        return FE_NEED_MORE if n == 0 or buf[0] == 0xAB else FE_BAD_MAGIC
    if buf[0] != 0xAB or buf[1] != 0xBA:
        return FE_BAD_MAGIC
    if n < OCTO_PREFIX:
        return FE_NEED_MORE
    hl = (buf[8] << 8) | buf[9]
    if hl > max_header:
        return FE_HEADER_TOO_LARGE
    if n < OCTO_PREFIX + hl:
        return FE_NEED_MORE
    proto = buf[3]
    fi.kind = FK_OCTO
    fi.version = buf[2]
    fi.protocol = proto
    fi.length = 8 + <Py_ssize_t>fr_rd_u32(buf + 4)
    fi.header_off = OCTO_PREFIX
    fi.header_len = hl
    if proto & PROTO_CHECKSUM:
        fi.flags = FF_CHECKSUM
    if proto & (PROTO_GZIP | PROTO_SNAPPY):
        fi.flags |= (FF_GZIP if proto & PROTO_GZIP else 0) | (FF_SNAPPY if proto & PROTO_SNAPPY else 0)
        return OCTO_PREFIX + hl
    fi.body_off = OCTO_PREFIX + hl
    err = fr_header(buf, OCTO_PREFIX, hl, fi)
    if err != 0:
        return err
    return OCTO_PREFIX + hl


cdef void fr_set_seq_id(uint8_t* frame, const FrameInfo* fi, int64_t seq_id) noexcept nogil:
    cdef uint8_t* p
    if fi.seq_off < 0:
        return
    p = frame + fi.seq_off
    if fi.kind == FK_THRIFT:
        fr_wr_u32(p, <uint32_t>seq_id)
    else:
        fr_wr_u32(p, <uint32_t>((<uint64_t>seq_id) >> 32))
        fr_wr_u32(p + 4, <uint32_t>seq_id)
    if fi.flags & FF_CHECKSUM:
        fr_wr_u32(frame + fi.length - 4, fr_adler32(frame, fi.length - 4))


cdef inline Py_ssize_t fr_varint(const uint8_t* b, Py_ssize_t n, Py_ssize_t i,
                                 uint32_t* v) noexcept nogil:
    # unsigned LEB128 of at most 5 bytes at b[i:n]: the index after it, -1 if bad
    cdef uint32_t x = 0
    cdef int shift = 0
    while i < n and shift < 35:
        x |= (<uint32_t>(b[i] & 0x7F)) << shift
        if not (b[i] & 0x80):
            v[0] = x
            return i + 1
        i += 1
        shift += 7
    return -1


cdef Py_ssize_t fr_thrift_method(const uint8_t* b, Py_ssize_t n,
                                 Py_ssize_t* name_len) noexcept nogil:
    return fr_thrift_method_i(b, n, name_len)


cdef inline Py_ssize_t fr_thrift_method_i(const uint8_t* b, Py_ssize_t n,
                                         Py_ssize_t* name_len) noexcept nogil:
    cdef int32_t k
    cdef uint32_t u = 0
    cdef Py_ssize_t i
    cdef int t
    if n < 1:
        return -1
    if b[0] == 0x80:
        # strict TBinaryProtocol: 80 01 00 type, i32 name length, name, i32 seqid
        if n < 12 or b[1] != 0x01 or b[3] < 1 or b[3] > 4:
            return -1
        k = <int32_t>fr_rd_u32(b + 4)
        if k < 0 or k > n - 12:
            return -1
        name_len[0] = k
        return 8
    if b[0] == 0x82:
        # TCompactProtocol: 82, type << 5 | version 1, varint seqid, varint name length, name
        if n < 4 or (b[1] & 0x1F) != 1:
            return -1
        t = b[1] >> 5
        if t < 1 or t > 4:
            return -1
        i = fr_varint(b, n, 2, &u)
        if i < 0:
            return -1
        i = fr_varint(b, n, i, &u)
        if i < 0 or u > <uint32_t>(n - i):
            return -1
        name_len[0] = <Py_ssize_t>u
        return i
    # old non-strict TBinaryProtocol: i32 name length, name, type byte, i32 seqid
    if n < 9:
        return -1
    k = <int32_t>fr_rd_u32(b)
    if k < 0 or k > n - 9 or b[4 + k] < 1 or b[4 + k] > 4:
        return -1
    name_len[0] = k
    return 4


cdef Py_ssize_t fr_method(const uint8_t* frame, const FrameInfo* fi,
                          Py_ssize_t* name_len) noexcept nogil:
    cdef Py_ssize_t off
    if fi.kind == FK_THRIFT:
        if fi.service_len < 0:
            return -1
        name_len[0] = fi.service_len
        return fi.service_off
    if fi.kind != FK_OCTO or fi.flags & (FF_GZIP | FF_SNAPPY) or fi.body_off < 0:
        return -1
    off = fr_thrift_method_i(frame + fi.body_off, fi.body_len, name_len)
    if off < 0:
        return -1
    return fi.body_off + off


cdef inline bint fr_same(const uint8_t* a, const char* b, Py_ssize_t n) noexcept nogil:
    # short keys: a plain loop beats a call to memcmp
    cdef Py_ssize_t i
    for i in range(n):
        if a[i] != <uint8_t>b[i]:
            return False
    return True


cdef inline uint64_t fr_rd64(const uint8_t* p) noexcept nogil:
    # 8 bytes as they lie in memory (compared with words built the same way)
    cdef uint64_t x
    memcpy(&x, p, 8)
    return x


cdef inline int fr_want_find(const uint8_t* p, size_t kl, const FrCtxKeys* w) noexcept nogil:
    # The wanted key (1 + its index) that the context entry at p, whose key
    # is kl bytes long, carries; 0: none.  The keys are distinct, so at most
    # one matches.  The entry is at least 8 + kl bytes (its value length
    # follows the key), so every word read stays inside it.
    cdef int k = w.first[kl & 63]
    cdef const FrCtxEnt* t
    while k:
        t = &w.ent[k - 1]
        if ((fr_rd64(p) & t.hmask) == t.head
                and (fr_rd64(p + t.toff) & t.tmask) == t.tail
                and (t.mid == 0 or fr_same(p + 8, t.mid_key, t.mid))):
            return k
        k = t.next
    return 0


cdef void fr_ctx_keys_init(FrCtxKeys* w) noexcept nogil:
    # FrCtxEnt per key: head covers the entry's bytes 0-8 (big-endian key
    # length, then the key's first 4 bytes, masked when shorter); tail, for a
    # key longer than 4, the 8 entry bytes that end where the key ends (bytes
    # kl-4 .. kl+4, inside the entry since its value length follows the key).
    # head and tail cover a key of up to 12 bytes; a longer one also compares
    # bytes 8 .. kl-4 (mid).
    cdef Py_ssize_t k, i, kl, b
    cdef uint8_t h[8]
    cdef uint8_t m[8]
    cdef FrCtxEnt* t
    memset(w.first, 0, sizeof(w.first))
    for k in range(w.n - 1, -1, -1):
        kl = w.klens[k]
        t = &w.ent[k]
        b = kl & 63  # the compare checks the whole length
        t.next = w.first[b]
        w.first[b] = <uint8_t>(k + 1)
        memset(h, 0, 8)
        memset(m, 0, 8)
        fr_wr_u32(h, <uint32_t>kl)
        memset(m, 0xFF, 4)
        for i in range(kl if kl < 4 else 4):
            h[4 + i] = <uint8_t>w.keys[k][i]
            m[4 + i] = 0xFF
        memcpy(&t.head, h, 8)
        memcpy(&t.hmask, m, 8)
        t.tail = 0
        t.tmask = 0
        t.toff = 0
        t.mid_key = w.keys[k] + 4
        t.mid = kl - 12 if kl > 12 else 0
        if kl > 4:
            # the 8 bytes before the key's end, in an entry laid out as
            # length + key (kl - 4 >= 1; for kl < 8 they start in the length)
            for i in range(8):
                b = kl - 4 + i  # entry offset
                h[i] = <uint8_t>w.keys[k][b - 4] if b >= 4 else <uint8_t>(
                    (<uint32_t>kl >> (8 * (3 - b))) & 0xFF)
            memcpy(&t.tail, h, 8)
            t.tmask = 0xFFFFFFFFFFFFFFFFULL
            t.toff = kl - 4


cdef uint64_t fr_context_many(const uint8_t* frame, const FrameInfo* fi, const FrCtxKeys* w,
                              Py_ssize_t* offs, Py_ssize_t* lens) noexcept nogil:
    # Both maps in one pass each: the last entry with a key wins, as when
    # decoding; globalContext first, so that a localContext entry overwrites
    # it (local wins).  fr_scan checked every entry of both maps (each fits),
    # so the walk reads the two lengths unchecked.  An entry whose key length
    # no wanted key has costs one table read; for the others, two word
    # compares (head and tail, FrCtxEnt) settle a key of up to 12 bytes, a
    # longer one compares its middle bytewise.
    cdef const uint8_t* p
    cdef const uint8_t* e
    cdef size_t kl, vl
    cdef Py_ssize_t off, end, k
    cdef uint64_t found = 0
    cdef int m
    for m in range(2):
        if m == 0:
            off = fi.gctx_off
            end = fi.gctx_end
        else:
            off = fi.lctx_off
            end = fi.lctx_end
        if off < 0:
            continue
        p = frame + off + 6
        e = frame + end
        while p < e:
            kl = fr_rd_u32(p)
            vl = fr_rd_u32(p + 4 + kl)
            k = fr_want_find(p, kl, w)
            if k:
                offs[k - 1] = p + 8 + kl - frame
                lens[k - 1] = <Py_ssize_t>vl
                found |= (<uint64_t>1) << (k - 1)
            p += 8 + kl + vl
    return found


cdef Py_ssize_t fr_context_get(const uint8_t* frame, const FrameInfo* fi, const char* key,
                               Py_ssize_t klen, Py_ssize_t* vlen) noexcept nogil:
    cdef FrCtxKeys w
    cdef Py_ssize_t off = -1
    w.n = 1
    w.keys[0] = key
    w.klens[0] = klen
    fr_ctx_keys_init(&w)
    if fr_context_many(frame, fi, &w, &off, vlen):
        return off
    vlen[0] = -1
    return -1


cdef inline Py_ssize_t _gctx_put_at(const FrameInfo* fi, Py_ssize_t klen, Py_ssize_t voff,
                                    Py_ssize_t old_len, Py_ssize_t vlen, Py_ssize_t* at,
                                    Py_ssize_t* cut) noexcept nogil:
    # Where fr_gctx_put edits the request: the bytes [at, cut) are replaced by
    # ones `delta` (returned) longer; everything from cut on moves by delta.
    if voff >= 0:
        at[0] = voff - 4            # the value's length
        cut[0] = voff + old_len     # the old value's end
        return vlen - old_len
    if fi.gctx_off >= 0:
        at[0] = cut[0] = fi.gctx_end    # after the map's last entry
        return 8 + klen + vlen
    at[0] = cut[0] = fi.header_off + fi.header_len - 1     # before the Header's stop byte
    return 9 + 8 + klen + vlen


cdef Py_ssize_t fr_gctx_put(char* dst, const uint8_t* p, const FrameInfo* fi, const char* key,
                            Py_ssize_t klen, Py_ssize_t voff, Py_ssize_t old_len,
                            const char* val, Py_ssize_t vlen) noexcept nogil:
    # The copy of the OCTO request p/fi at dst with globalContext[key] = val
    # (docs/shunting.md, "The label is written into the request"): voff/old_len
    # is the value of the key's last entry in globalContext (voff < 0: none),
    # which the scanner already found; that value is replaced in place, else
    # an entry is appended to the map (the map is added before the Header's
    # stop byte when there is none).  The frame's total length, header length
    # and checksum are fixed.  dst holds fi.length + FR_GCTX_PUT_EXTRA + klen
    # + vlen bytes.  Returns the copy's length, or -1 when its header would
    # exceed 65535 bytes (nothing useful written).
    cdef Py_ssize_t at = 0, cut = 0, delta, hl, n
    cdef const char* src = <const char*>p
    cdef char* d
    cdef bint trailer = (fi.flags & FF_CHECKSUM) != 0
    delta = _gctx_put_at(fi, klen, voff, old_len, vlen, &at, &cut)
    hl = fi.header_len + delta
    if hl > 0xFFFF or hl < 1:
        return -1
    n = fi.length + delta
    memcpy(dst, src, at)
    d = dst + at
    if voff >= 0:
        fr_wr_u32(<uint8_t*>d, <uint32_t>vlen)
        memcpy(d + 4, val, vlen)
    else:
        if fi.gctx_off >= 0:
            dst[fi.gctx_off] = 11   # string -> string (an empty map may say 0)
            dst[fi.gctx_off + 1] = 11
            fr_wr_u32(<uint8_t*>dst + fi.gctx_off + 2, fr_rd_u32(p + fi.gctx_off + 2) + 1)
        else:
            d[0] = 13               # T_MAP, field 5 (globalContext), string -> string, 1 entry
            d[1] = 0
            d[2] = 5
            d[3] = 11
            d[4] = 11
            fr_wr_u32(<uint8_t*>d + 5, 1)
            d += 9
        fr_wr_u32(<uint8_t*>d, <uint32_t>klen)
        memcpy(d + 4, key, klen)
        fr_wr_u32(<uint8_t*>d + 4 + klen, <uint32_t>vlen)
        memcpy(d + 8 + klen, val, vlen)
    memcpy(dst + cut + delta, src + cut, fi.length - cut)
    fr_wr_u32(<uint8_t*>dst + 4, fr_rd_u32(p + 4) + <uint32_t>delta)   # total length
    dst[8] = <char>(hl >> 8)
    dst[9] = <char>hl
    if trailer:
        fr_wr_u32(<uint8_t*>dst + n - 4, fr_adler32(<const uint8_t*>dst, n - 4))
    return n


cdef inline void _moved(Py_ssize_t* off, Py_ssize_t at, Py_ssize_t cut,
                        Py_ssize_t delta) noexcept nogil:
    # an offset from the edit's end on moves; absent (-1) and unread
    # (FM_UNREAD) ones are below any.  When bytes are inserted (at == cut),
    # what starts there is an empty value that ends there: it stays
    if off[0] >= cut and off[0] > at:
        off[0] += delta


cdef Py_ssize_t fr_gctx_put_fi(FrameInfo* lfi, const FrameInfo* fi, const char* key,
                               Py_ssize_t klen, Py_ssize_t voff, Py_ssize_t old_len,
                               Py_ssize_t vlen) noexcept nogil:
    # What fr_scan would find in fr_gctx_put's copy (the same arguments),
    # derived from fi without reading a byte, so that the outbound path
    # scans a labelled request once: every offset from the edit's end (cut)
    # on moves by its size; the edited map's end and size follow it; the
    # key's span (if the scanner picks the key out) is the new value.
    # Returns the copy's length, or -1 as fr_gctx_put does.
    cdef Py_ssize_t at = 0, cut = 0, delta, hl
    delta = _gctx_put_at(fi, klen, voff, old_len, vlen, &at, &cut)
    hl = fi.header_len + delta
    if hl > 0xFFFF or hl < 1:
        return -1
    lfi[0] = fi[0]
    lfi.length = fi.length + delta
    lfi.header_len = hl
    _moved(&lfi.body_off, at, cut, delta)
    _moved(&lfi.seq_off, at, cut, delta)
    _moved(&lfi.service_off, at, cut, delta)
    _moved(&lfi.appkey_off, at, cut, delta)
    _moved(&lfi.liteset_off, at, cut, delta)
    _moved(&lfi.set_off, at, cut, delta)
    _moved(&lfi.swimlane_off, at, cut, delta)
    _moved(&lfi.hashkey_off, at, cut, delta)
    _moved(&lfi.message_off, at, cut, delta)
    _moved(&lfi.caller_off, at, cut, delta)
    _moved(&lfi.auth_app_off, at, cut, delta)
    _moved(&lfi.auth_ts_off, at, cut, delta)
    _moved(&lfi.auth_sig_off, at, cut, delta)
    _moved(&lfi.lctx_off, at, cut, delta)
    _moved(&lfi.gctx_off, at, cut, delta)
    _moved(&lfi.method_off, at, cut, delta)
    if voff < 0 and fi.gctx_off < 0:
        # a map of its own before the stop byte (field and map headers, one
        # entry); localContext may end right there, and stays where it is
        lfi.gctx_off = at + 3
        lfi.gctx_end = at + delta
        lfi.gctx_len = delta - 3
        voff = at + 9 + 8 + klen
    else:
        # inside a map: an end at the edit's end is that map's, and grows
        if lfi.lctx_end >= cut:
            lfi.lctx_end += delta
        if lfi.gctx_end >= cut:
            lfi.gctx_end += delta
        if voff < 0:
            voff = at + 8 + klen        # appended to the (last) map
            lfi.gctx_len += delta
        elif fi.gctx_off < voff <= fi.gctx_end:
            lfi.gctx_len += delta       # replaced in the last map (the size is the last map's)
    OCTO_CTX_GLOBAL(<const uint8_t*>key, klen, NULL, voff, vlen, lfi)
    return lfi.length


cdef Py_ssize_t _gctx_last(const uint8_t* p, const FrameInfo* fi, const char* key, Py_ssize_t klen,
                           Py_ssize_t* vlen) noexcept nogil:
    # the value of key's last entry in globalContext, or -1
    cdef const uint8_t* q = p + fi.gctx_off + 6
    cdef const uint8_t* e = p + fi.gctx_end
    cdef const uint8_t* nx
    cdef Py_ssize_t kl = 0, vl = 0, off = -1
    while q < e:
        nx = fr_ctx_entry(q, e, &kl, &vl)
        if nx == NULL:
            break
        if kl == klen and memcmp(q + 4, key, klen) == 0:
            off = q + 8 + kl - p
            vlen[0] = vl
        q = nx
    return off


def gctx_put(bytes frame not None, key, value) -> bytes:
    """The copy of one whole OCTO request frame with globalContext[key] =
    value, as the outbound path writes a shunting rule's label (tests)."""
    cdef FrameInfo fi
    cdef bytes k = key.encode() if isinstance(key, str) else bytes(key)
    cdef bytes v = value.encode() if isinstance(value, str) else bytes(value)
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(frame)
    cdef Py_ssize_t r = fr_scan(p, len(frame), DEFAULT_MAX_FRAME, DEFAULT_MAX_HEADER, &fi)
    cdef Py_ssize_t voff = -1, vlen = -1
    cdef bytes out
    if r != len(frame) or fi.kind != FK_OCTO or fi.flags & (FF_GZIP | FF_SNAPPY):
        raise ValueError("not one whole uncompressed OCTO frame")
    if fi.gctx_off >= 0:
        voff = _gctx_last(p, &fi, k, len(k), &vlen)
    out = PyBytes_FromStringAndSize(NULL, r + FR_GCTX_PUT_EXTRA + len(k) + len(v))
    r = fr_gctx_put(PyBytes_AS_STRING(out), p, &fi, k, len(k), voff, vlen, v, len(v))
    if r < 0:
        raise ValueError("the header would exceed 65535 bytes")
    return out[:r]


def gctx_put_info(bytes frame not None, key, value) -> tuple:
    """(copy, derived, scanned): the copy of one whole OCTO request frame
    with globalContext[key] = value that the outbound path writes (a key the
    scanner picks out is replaced where the scanner found it), the FrameInfo
    fr_gctx_put_fi derives for it and the one fr_scan finds in it, as dicts
    (the method read in both), for tests: the two must be equal."""
    cdef FrameInfo fi, lfi, sfi
    cdef Py_ssize_t mlen = 0
    cdef bytes k = key.encode() if isinstance(key, str) else bytes(key)
    cdef bytes v = value.encode() if isinstance(value, str) else bytes(value)
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(frame)
    cdef Py_ssize_t r = fr_scan(p, len(frame), DEFAULT_MAX_FRAME, DEFAULT_MAX_HEADER, &fi)
    cdef Py_ssize_t voff = -1, vlen = -1, n
    cdef bytes out
    if r != len(frame) or fi.kind != FK_OCTO or fi.flags & (FF_GZIP | FF_SNAPPY):
        raise ValueError("not one whole uncompressed OCTO frame")
    if k == b"octo-liteset":
        voff, vlen = fi.liteset_off, fi.liteset_len
    elif k == b"octo-set":
        voff, vlen = fi.set_off, fi.set_len
    elif k == b"octo-swimlane":
        voff, vlen = fi.swimlane_off, fi.swimlane_len
    elif fi.gctx_off >= 0:
        voff = _gctx_last(p, &fi, k, len(k), &vlen)
    if vlen < 0:
        voff = -1
    fi_method(p, &fi, &mlen)        # routing reads it before the label is written
    out = PyBytes_FromStringAndSize(NULL, r + FR_GCTX_PUT_EXTRA + len(k) + len(v))
    n = fr_gctx_put(PyBytes_AS_STRING(out), p, &fi, k, len(k), voff, vlen, v, len(v))
    if fr_gctx_put_fi(&lfi, &fi, k, len(k), voff, vlen, len(v)) != n:
        raise AssertionError("fr_gctx_put_fi: another length than fr_gctx_put's")
    if n < 0:
        raise ValueError("the header would exceed 65535 bytes")
    out = out[:n]
    r = fr_scan(<const uint8_t*>PyBytes_AS_STRING(out), n, DEFAULT_MAX_FRAME, 0xFFFF, &sfi)
    if r != n:
        raise ValueError(fr_strerror(r).decode())
    fi_method(<const uint8_t*>PyBytes_AS_STRING(out), &sfi, &mlen)
    _fi_settle(&lfi)
    _fi_settle(&sfi)
    return out, lfi, sfi


cdef void _fi_settle(FrameInfo* fi) noexcept:
    # the scan-time key slots that hold nothing (their wfound bit clear) are
    # never read: zeroed, so that two FrameInfo dicts compare by what counts
    cdef int k
    for k in range(FR_WANT):
        if not (fi.wfound_g >> k) & 1:
            fi.woff_g[k] = 0
            fi.wlen_g[k] = 0
        if not (fi.wfound_l >> k) & 1:
            fi.woff_l[k] = 0
            fi.wlen_l[k] = 0


cdef const char* fr_strerror(Py_ssize_t code) noexcept nogil:
    if code == FE_NEED_MORE:
        return "incomplete frame"
    if code == FE_BAD_MAGIC:
        return "neither an OCTO frame (magic 0xABBA) nor native Thrift framing"
    if code == FE_TOO_LARGE:
        return "frame larger than the configured maximum"
    if code == FE_BAD_LENGTH:
        return "total_length and header_length are inconsistent"
    if code == FE_HEADER_TOO_LARGE:
        return "header larger than the configured maximum"
    if code == FE_BAD_HEADER:
        return "malformed Thrift in the OCTO header"
    if code == FE_BAD_FIELD_TYPE:
        return "a known OCTO header field has the wrong Thrift type"
    if code == FE_TOO_DEEP:
        return "header nesting too deep"
    if code == FE_BAD_CHECKSUM:
        return "Adler-32 checksum mismatch"
    if code == FE_BAD_THRIFT:
        return "malformed native Thrift framed message"
    if code > 0:
        return "ok"
    return "unknown frame error"


# ---------------------------------------------------------------- C encoders

cdef bytes fr_error_response(int64_t seq_id, int status, str message, bint restart, int protocol):
    local = {"octo-proxy-restart": "1"} if restart else None
    return encode_response(seq_id, b"", status=status, message=message, local_context=local,
                           protocol=protocol & PROTO_SERIAL_MASK)


cdef bytes fr_error_answer(int64_t seq_id, int status, str message, bint restart, int protocol,
                           object method, int32_t body_seq):
    return encode_error_response(seq_id, status, message, restart=restart, protocol=protocol,
                                 method=method, body_seq_id=body_seq)


cdef Py_ssize_t fr_error_call(const uint8_t* frame, FrameInfo* fi, Py_ssize_t* name_len,
                              int32_t* body_seq) noexcept nogil:
    # Dorado's bodies are strict TBinaryProtocol (80 01 00 type ...): only then
    # can an EXCEPTION answer be written the way its client reads it
    cdef Py_ssize_t off
    if (fi.kind != FK_OCTO or (fi.protocol & PROTO_SERIAL_MASK) != SERIAL_THRIFT
            or fi.body_len < THRIFT_MIN_MESSAGE):
        return -1
    off = fi_method(frame, fi, name_len)  # the request's one parse of its method
    if off < 0 or frame[fi.body_off] != 0x80 or off + name_len[0] + 4 > fi.body_off + fi.body_len:
        return -1
    body_seq[0] = <int32_t>fr_rd_u32(frame + off + name_len[0])
    return off


cdef object fr_error_method(const uint8_t* frame, FrameInfo* fi, int32_t* body_seq):
    cdef Py_ssize_t n = 0
    cdef Py_ssize_t off = fr_error_call(frame, fi, &n, body_seq)
    if off < 0:
        return None
    return (<const char*>frame)[off:off + n]


cdef bytes fr_heartbeat_response(int64_t seq_id, int protocol):
    return encode_heartbeat(seq_id, response=True, protocol=protocol & PROTO_SERIAL_MASK)


cdef bytes fr_heartbeat_answer(int64_t seq_id, int msg_type, int protocol):
    if msg_type == MT_SCANNER_HEARTBEAT:
        return encode_scanner_heartbeat_response(seq_id, protocol=protocol & PROTO_SERIAL_MASK)
    return encode_heartbeat(seq_id, response=True, protocol=protocol & PROTO_SERIAL_MASK)


cdef bytes fr_proxy_restart():
    return _PROXY_RESTART


cdef bytes fr_proxy_announce(int64_t seq_id):
    return encode_proxy_announce(seq_id)


# ---------------------------------------------------------------- Python API

DEFAULT_MAX_FRAME = 16 * 1024 * 1024
DEFAULT_MAX_HEADER = 64 * 1024
MAX_DEPTH = FR_MAX_DEPTH

# the C enum names are not Python names; export them explicitly
_g = globals()
for _name, _value in (
    ("FK_OCTO", FK_OCTO), ("FK_THRIFT", FK_THRIFT),
    ("FF_CHECKSUM", FF_CHECKSUM), ("FF_GZIP", FF_GZIP), ("FF_SNAPPY", FF_SNAPPY),
    ("FF_REQUEST", FF_REQUEST), ("FF_RESPONSE", FF_RESPONSE),
    ("FF_PROXY_RESTART", FF_PROXY_RESTART), ("FF_PROXY_ANNOUNCE", FF_PROXY_ANNOUNCE),
    ("FF_RESTART_NOTICE", FF_RESTART_NOTICE),
    ("MT_NORMAL", MT_NORMAL), ("MT_HEARTBEAT", MT_HEARTBEAT),
    ("MT_SCANNER_HEARTBEAT", MT_SCANNER_HEARTBEAT), ("MT_PROXY_RESTART", MT_PROXY_RESTART),
    ("FE_NEED_MORE", FE_NEED_MORE), ("FE_BAD_MAGIC", FE_BAD_MAGIC),
    ("FE_TOO_LARGE", FE_TOO_LARGE), ("FE_BAD_LENGTH", FE_BAD_LENGTH),
    ("FE_HEADER_TOO_LARGE", FE_HEADER_TOO_LARGE), ("FE_BAD_HEADER", FE_BAD_HEADER),
    ("FE_BAD_FIELD_TYPE", FE_BAD_FIELD_TYPE), ("FE_TOO_DEEP", FE_TOO_DEEP),
    ("FE_BAD_CHECKSUM", FE_BAD_CHECKSUM), ("FE_BAD_THRIFT", FE_BAD_THRIFT),
    ("STATUS_SUCCESS", STATUS_SUCCESS), ("STATUS_APPLICATION", STATUS_APPLICATION),
    ("STATUS_RUNTIME", STATUS_RUNTIME), ("STATUS_RPC", STATUS_RPC),
    ("STATUS_TRANSPORT", STATUS_TRANSPORT), ("STATUS_PROTOCOL", STATUS_PROTOCOL),
    ("STATUS_DEGRADE", STATUS_DEGRADE), ("STATUS_SECURITY", STATUS_SECURITY),
    ("STATUS_SERVICE", STATUS_SERVICE), ("STATUS_REMOTE", STATUS_REMOTE),
):
    _g[_name] = _value
del _g, _name, _value


class FrameError(ValueError):
    """Malformed bytes: `code` is the FE_* value, the message its description."""

    def __init__(self, int code):
        super().__init__(strerror(code))
        self.code = code


def strerror(Py_ssize_t code) -> str:
    return fr_strerror(code).decode()


cdef inline object str_lossless(bytes data, Py_ssize_t off, Py_ssize_t ln):
    """data[off:off+ln] as str, None when absent (ln < 0).  Lossless: bytes
    that are not UTF-8 become lone surrogates (surrogateescape), so the str
    encodes back to the same bytes, as the reference codec's do.  For the
    codec only: such a str is no text (it cannot be encoded as UTF-8); the
    data path's messages and labels use str_replacing (conn.pxi)."""
    if ln < 0:
        return None
    return data[off:off + ln].decode("utf-8", "surrogateescape")


@cython.final
cdef class Frame:
    """One frame found by scan(): a copy of its bytes plus what fr_scan learnt.

    `offset` is where the frame started in the buffer that was scanned."""

    def __cinit__(self):
        self.offset = 0
        self.data = b""

    @staticmethod
    cdef Frame fr_new(const uint8_t* frame, const FrameInfo* fi, Py_ssize_t offset):
        cdef Frame f = Frame.__new__(Frame)
        f.fi = fi[0]
        f.offset = offset
        f.data = (<const char*>frame)[:fi.length]
        return f

    @property
    def kind(self) -> int:
        return self.fi.kind

    @property
    def flags(self) -> int:
        return self.fi.flags

    @property
    def version(self) -> int:
        return self.fi.version

    @property
    def protocol(self) -> int:
        return self.fi.protocol

    @property
    def msg_type(self) -> int:
        return self.fi.msg_type

    @property
    def offset(self) -> int:
        return self.offset

    @property
    def length(self) -> int:
        return self.fi.length

    @property
    def is_request(self) -> bool:
        return bool(self.fi.flags & FF_REQUEST)

    @property
    def is_response(self) -> bool:
        return bool(self.fi.flags & FF_RESPONSE)

    @property
    def seq_id(self) -> int:
        return self.fi.seq_id

    @property
    def seq_off(self) -> int:
        return self.fi.seq_off

    @property
    def call_type(self) -> int:
        return self.fi.call_type

    @property
    def timeout(self) -> int:
        return self.fi.timeout

    @property
    def status(self) -> int:
        return self.fi.status

    @property
    def message(self):
        return str_lossless(self.data, self.fi.message_off, self.fi.message_len)

    @property
    def service_name(self):
        return str_lossless(self.data, self.fi.service_off, self.fi.service_len)

    @property
    def method(self):
        """The request's method name (fr_method): native Thrift's message
        name, or the name in an OCTO body's Thrift message header; None when
        the body is not a readable Thrift message."""
        cdef Py_ssize_t n = 0
        cdef Py_ssize_t off = fr_method(<const uint8_t*><char*>self.data, &self.fi, &n)
        if off < 0:
            return None
        return str_lossless(self.data, off, n)

    @property
    def caller_appkey(self):
        """traceInfo.clientAppkey (heartbeats: heartbeatInfo.appkey), or None."""
        return str_lossless(self.data, self.fi.caller_off, self.fi.caller_len)

    @property
    def remote_appkey(self):
        return str_lossless(self.data, self.fi.appkey_off, self.fi.appkey_len)

    @property
    def liteset(self):
        return str_lossless(self.data, self.fi.liteset_off, self.fi.liteset_len)

    @property
    def set(self):
        return str_lossless(self.data, self.fi.set_off, self.fi.set_len)

    @property
    def swimlane(self):
        return str_lossless(self.data, self.fi.swimlane_off, self.fi.swimlane_len)

    @property
    def hash_key(self):
        return str_lossless(self.data, self.fi.hashkey_off, self.fi.hashkey_len)

    @property
    def proxy_restart(self) -> bool:
        return bool(self.fi.flags & FF_PROXY_RESTART)

    @property
    def proxy_announce(self) -> bool:
        return bool(self.fi.flags & FF_PROXY_ANNOUNCE)

    @property
    def header_off(self) -> int:
        return self.fi.header_off

    @property
    def header_len(self) -> int:
        return self.fi.header_len

    @property
    def body_off(self) -> int:
        return self.fi.body_off

    @property
    def body_len(self) -> int:
        return self.fi.body_len

    @property
    def body(self) -> bytes:
        return self.data[self.fi.body_off:self.fi.body_off + self.fi.body_len]

    @property
    def bytes(self):
        return self.data

    @property
    def checksum(self) -> bool:
        return bool(self.fi.flags & FF_CHECKSUM)

    @property
    def body_seq_id(self):
        """The seqid of a strict TBinaryProtocol body's message (the one the
        proxy's error answers echo), or None."""
        cdef int32_t seq = 0
        if fr_error_method(<const uint8_t*><char*>self.data, &self.fi, &seq) is None:
            return None
        return seq

    @property
    def compressed(self) -> bool:
        return bool(self.fi.flags & (FF_GZIP | FF_SNAPPY))

    def __repr__(self):
        return (f"<Frame kind={self.fi.kind} msg_type={self.fi.msg_type} flags={self.fi.flags:#x} "
                f"seq_id={self.fi.seq_id} length={self.fi.length} offset={self.offset}>")


def scan(buf, Py_ssize_t start=0, end=None, *, Py_ssize_t max_frame=DEFAULT_MAX_FRAME,
         Py_ssize_t max_header=DEFAULT_MAX_HEADER):
    """Scan buf[start:end] for whole frames -> (frames, bytes consumed from start).

    Raises FrameError when the first unconsumed bytes are malformed; frames
    found before a malformed one are returned first (the next call raises)."""
    cdef const uint8_t[::1] mv = buf
    cdef Py_ssize_t stop = mv.shape[0] if end is None else end
    cdef Py_ssize_t pos, r
    cdef FrameInfo fi
    cdef list frames = []
    if start < 0 or stop > mv.shape[0] or start > stop:
        raise IndexError("start/end out of range")
    pos = start
    while pos < stop:
        r = fr_scan(&mv[0] + pos, stop - pos, max_frame, max_header, &fi)
        if r == 0:
            break
        if r < 0:
            if frames:
                break
            raise FrameError(r)
        frames.append(Frame.fr_new(&mv[0] + pos, &fi, pos))
        pos += r
    return frames, pos - start


def scan_header(buf, *, Py_ssize_t max_header=DEFAULT_MAX_HEADER):
    """Decode the header of the OCTO frame starting buf (fr_scan_header): a
    Frame whose bytes are the prefix and header only, or None if more bytes are
    needed."""
    cdef const uint8_t[::1] mv = buf
    cdef FrameInfo fi
    cdef Frame f
    if mv.shape[0] == 0:
        return None
    r = fr_scan_header(&mv[0], mv.shape[0], max_header, &fi)
    if r < 0:
        raise FrameError(r)
    if r == 0:
        return None
    f = Frame.__new__(Frame)
    f.fi = fi
    f.data = (<const char*>&mv[0])[:r]
    return f


@cython.final
cdef class FrameScanner:
    """Keeps a receive buffer across feed() calls (SDK and tests; the data
    path scans its own buffer with fr_scan)."""

    cdef bytearray _buf
    cdef Py_ssize_t _max_frame
    cdef Py_ssize_t _max_header

    def __init__(self, Py_ssize_t max_frame=DEFAULT_MAX_FRAME,
                 Py_ssize_t max_header=DEFAULT_MAX_HEADER):
        self._buf = bytearray()
        self._max_frame = max_frame
        self._max_header = max_header

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data) -> list:
        self._buf += data
        if not self._buf:
            return []
        frames, used = scan(self._buf, max_frame=self._max_frame, max_header=self._max_header)
        if used:
            del self._buf[:used]
        if not frames and self._buf:
            # surface an error that sits right at the front now, not on the next feed
            scan(self._buf, max_frame=self._max_frame, max_header=self._max_header)
        return frames


def set_seq_id(bytearray buf not None, Frame frame not None, seq_id) -> None:
    """Rewrite frame's sequence id inside buf (where it was scanned), in place."""
    cdef uint8_t[::1] mv = buf
    cdef int64_t v
    if frame.fi.seq_off < 0:
        raise ValueError("frame has no sequence id (compressed, or neither request nor response)")
    if frame.offset < 0 or frame.offset + frame.fi.length > mv.shape[0]:
        raise IndexError("frame lies outside buf")
    if frame.fi.kind == FK_THRIFT and not (-(1 << 31) <= seq_id < (1 << 31)):
        raise OverflowError("native Thrift sequence ids are i32")
    v = seq_id
    fr_set_seq_id(&mv[0] + frame.offset, &frame.fi, v)


def thrift_method(body):
    """The method name in the Thrift message header at the start of `body`
    (binary strict/non-strict or compact), or None (fr_thrift_method)."""
    cdef const uint8_t[::1] mv = body
    cdef Py_ssize_t n = 0, off
    if mv.shape[0] == 0:
        return None
    off = fr_thrift_method(&mv[0], mv.shape[0], &n)
    if off < 0:
        return None
    return bytes(mv[off:off + n]).decode("utf-8", "surrogateescape")


def thrift_call(name, seq_id=0, args=b"", *, int message_type=1, bint compact=False):
    """A Thrift call message (no frame length) as an OCTO body: strict
    TBinaryProtocol, or TCompactProtocol with an empty struct when compact
    and no args are given (tests and the SDK)."""
    nb = name.encode("utf-8") if isinstance(name, str) else bytes(name)
    if compact:
        out = bytearray(b"\x82")
        out.append(((message_type & 7) << 5) | 1)
        for v in (seq_id & 0xFFFFFFFF, len(nb)):
            while v >= 0x80:
                out.append((v & 0x7F) | 0x80)
                v >>= 7
            out.append(v)
        return bytes(out) + nb + (bytes(args) or b"\x00")
    return (b"\x80\x01\x00" + bytes((message_type & 0xFF,)) + _pk_i32(len(nb)) + nb
            + _pk_i32(seq_id) + (bytes(args) or b"\x00"))


def adler32(data) -> int:
    cdef const uint8_t[::1] mv = data
    if mv.shape[0] == 0:
        return 1
    return fr_adler32(&mv[0], mv.shape[0])


def bench_scan(buf, Py_ssize_t max_frame=DEFAULT_MAX_FRAME,
               Py_ssize_t max_header=DEFAULT_MAX_HEADER) -> int:
    """Scan every frame of buf in C and count them (benchmarks the core alone)."""
    cdef const uint8_t[::1] mv = buf
    cdef Py_ssize_t pos = 0, n = mv.shape[0], r = 0, count = 0
    cdef FrameInfo fi
    if n == 0:
        return 0
    with nogil:
        while pos < n:
            r = fr_scan(&mv[0] + pos, n - pos, max_frame, max_header, &fi)
            if r <= 0:
                break
            pos += r
            count += 1
    if r < 0:
        raise FrameError(r)
    return count


# ------------------------------------------------ Python-level encoder/decoder
# Not on the hot path: control frames, the SDK and tests.

_pk_i16 = _struct.Struct(">h").pack
_pk_i32 = _struct.Struct(">i").pack
_pk_u32 = _struct.Struct(">I").pack
_pk_i64 = _struct.Struct(">q").pack
_pk_dbl = _struct.Struct(">d").pack


cdef inline bytes _enc_str(s):
    b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else bytes(s)
    return _pk_i32(len(b)) + b


cdef inline bytes _fh(int t, int fid):
    return bytes((t,)) + _pk_i16(fid)


cdef bytes _enc_strmap(dict m):
    out = [bytes((T_STRING, T_STRING)), _pk_i32(len(m))]
    for k, v in m.items():
        out.append(_enc_str(k))
        out.append(_enc_str(v))
    return b"".join(out)


_TRACE_STRINGS = {1: "clientAppkey", 2: "traceId", 3: "spanId", 4: "rootMessageId",
                  5: "currentMessageId", 6: "serverMessageId", 9: "clientIp"}
_TRACE_BOOLS = {7: "debug", 8: "sample"}
_TRACE_IDS = {**_TRACE_STRINGS, **_TRACE_BOOLS}


cdef bytes _enc_request_info(dict r):
    out = []
    if "serviceName" in r:
        out += [_fh(T_STRING, 1), _enc_str(r["serviceName"])]
    if "sequenceId" in r:
        out += [_fh(T_I64, 2), _pk_i64(r["sequenceId"])]
    if "callType" in r:
        out += [_fh(T_BYTE, 3), _struct.pack(">b", r["callType"])]
    if "timeout" in r:
        out += [_fh(T_I32, 4), _pk_i32(r["timeout"])]
    out.append(b"\x00")
    return b"".join(out)


cdef bytes _enc_response_info(dict r):
    out = []
    if "sequenceId" in r:
        out += [_fh(T_I64, 1), _pk_i64(r["sequenceId"])]
    if "status" in r:
        out += [_fh(T_BYTE, 2), _struct.pack(">b", r["status"])]
    if r.get("message") is not None:
        out += [_fh(T_STRING, 3), _enc_str(r["message"])]
    out.append(b"\x00")
    return b"".join(out)


cdef bytes _enc_trace_info(dict t):
    out = []
    for fid, name in sorted(_TRACE_IDS.items()):
        if name not in t:
            continue
        if fid in _TRACE_BOOLS:
            out += [_fh(T_BOOL, fid), b"\x01" if t[name] else b"\x00"]
        else:
            out += [_fh(T_STRING, fid), _enc_str(t[name])]
    out.append(b"\x00")
    return b"".join(out)


cdef bytes _enc_load_info(dict li):
    out = []
    if "averageLoad" in li:
        out += [_fh(T_DOUBLE, 1), _pk_dbl(li["averageLoad"])]
    for fid, name in ((2, "oldGC"), (3, "threadNum"), (4, "queueSize")):
        if name in li:
            out += [_fh(T_I32, fid), _pk_i32(li[name])]
    if "methodQpsMap" in li:
        m = li["methodQpsMap"]
        out += [_fh(T_MAP, 5), bytes((T_STRING, T_DOUBLE)), _pk_i32(len(m))]
        for k, v in m.items():
            out += [_enc_str(k), _pk_dbl(v)]
    out.append(b"\x00")
    return b"".join(out)


cdef bytes _enc_heartbeat_info(dict h):
    out = []
    if "appkey" in h:
        out += [_fh(T_STRING, 1), _enc_str(h["appkey"])]
    if "sendTime" in h:
        out += [_fh(T_I64, 2), _pk_i64(h["sendTime"])]
    if "loadInfo" in h:
        out += [_fh(T_STRUCT, 3), _enc_load_info(h["loadInfo"])]
    if "status" in h:
        out += [_fh(T_I32, 4), _pk_i32(h["status"])]
    out.append(b"\x00")
    return b"".join(out)


def encode_header(dict h not None) -> bytes:
    """Encode a Header dict (keys as in the IDL: messageType, requestInfo,
    responseInfo, traceInfo, globalContext, localContext, heartbeatInfo)."""
    out = []
    if h.get("messageType") is not None:
        out += [_fh(T_BYTE, 1), _struct.pack(">b", h["messageType"])]
    if h.get("requestInfo") is not None:
        out += [_fh(T_STRUCT, 2), _enc_request_info(h["requestInfo"])]
    if h.get("responseInfo") is not None:
        out += [_fh(T_STRUCT, 3), _enc_response_info(h["responseInfo"])]
    if h.get("traceInfo") is not None:
        out += [_fh(T_STRUCT, 4), _enc_trace_info(h["traceInfo"])]
    if h.get("globalContext") is not None:
        out += [_fh(T_MAP, 5), _enc_strmap(h["globalContext"])]
    if h.get("localContext") is not None:
        out += [_fh(T_MAP, 6), _enc_strmap(h["localContext"])]
    if h.get("heartbeatInfo") is not None:
        out += [_fh(T_STRUCT, 7), _enc_heartbeat_info(h["heartbeatInfo"])]
    out.append(b"\x00")
    return b"".join(out)


def encode_frame(bytes header not None, body=b"", *, int protocol=1, bint checksum=False,
                 int version=1, bint compress=False) -> bytes:
    """Wrap encoded header bytes and a body into an OCTO frame.

    With compress=True and the gzip (0x40) or snappy (0x20) bit in protocol,
    header+body are compressed as Dorado does (header_length stays the
    uncompressed size); otherwise they are written as given."""
    cdef Py_ssize_t hl = len(header)
    if hl > 0xFFFF:
        raise ValueError("header longer than 65535 bytes")
    payload = header + bytes(body)
    if compress and protocol & PROTO_GZIP:
        payload = _gzip_compress(payload)
    elif compress and protocol & PROTO_SNAPPY:
        payload = snappy_compress(payload)
    proto = (protocol | PROTO_CHECKSUM) if checksum else (protocol & ~PROTO_CHECKSUM)
    trailer = 4 if checksum else 0
    frame = b"".join((b"\xab\xba", bytes((version & 0xFF, proto & 0xFF)),
                      _pk_u32(2 + len(payload) + trailer), _struct.pack(">H", hl), payload))
    if checksum:
        frame += _pk_u32(adler32(frame))
    return frame


def encode_request(seq_id, service_name, body=b"", *, int call_type=0, int timeout=0,
                   global_context=None, local_context=None, trace_info=None,
                   int message_type=0, int protocol=1, bint checksum=False,
                   int version=1) -> bytes:
    """A request.  RequestInfo carries all four fields and a traceInfo always
    carries clientAppkey ("" when not given): the official IDL requires them."""
    if trace_info is not None and "clientAppkey" not in trace_info:
        trace_info = {"clientAppkey": "", **trace_info}
    h = {"messageType": message_type,
         "requestInfo": {"serviceName": service_name, "sequenceId": seq_id,
                         "callType": call_type, "timeout": timeout},
         "traceInfo": trace_info, "globalContext": global_context,
         "localContext": local_context}
    return encode_frame(encode_header(h), body, protocol=protocol, checksum=checksum,
                        version=version)


def encode_response(seq_id, body=b"", *, int status=0, message=None, global_context=None,
                    local_context=None, int message_type=0, int protocol=1,
                    bint checksum=False) -> bytes:
    h = {"messageType": message_type,
         "responseInfo": {"sequenceId": seq_id, "status": status, "message": message},
         "globalContext": global_context, "localContext": local_context}
    return encode_frame(encode_header(h), body, protocol=protocol, checksum=checksum)


# Thrift TApplicationException.type values (the official providers send 0).
TAPP_UNKNOWN = 0
TAPP_UNKNOWN_METHOD = 1
TAPP_INTERNAL_ERROR = 6
TAPP_PROTOCOL_ERROR = 7


def encode_thrift_exception(method, seq_id, message, int exc_type=TAPP_UNKNOWN) -> bytes:
    """A Thrift EXCEPTION message (strict TBinaryProtocol) carrying a
    TApplicationException{1: message, 2: type}: the body Dorado providers
    write for an error, and the only place a Dorado client reads its text."""
    name = method if isinstance(method, bytes) else str(method).encode("utf-8", "surrogateescape")
    return b"".join((b"\x80\x01\x00\x03", _pk_i32(len(name)), name,
                     _pk_i32(_i32(seq_id)), _thrift_exception_struct(message, exc_type)))


cdef bytes _thrift_exception_struct(message, int exc_type):
    out = []
    if message is not None:
        out += [_fh(T_STRING, 1), _enc_str(message)]
    out += [_fh(T_I32, 2), _pk_i32(exc_type), b"\x00"]
    return b"".join(out)


cdef inline object _i32(v):
    v = int(v) & 0xFFFFFFFF
    return v - 0x100000000 if v & 0x80000000 else v


def decode_thrift_exception(body) -> dict:
    """Decode a Thrift EXCEPTION message -> {name, seq_id, message, type}.
    Raises FrameError when body is not one."""
    body = bytes(body)
    if len(body) < THRIFT_MIN_MESSAGE or body[:4] != b"\x80\x01\x00\x03":
        raise FrameError(FE_BAD_THRIFT)
    cdef _Reader r = _Reader(body, 4, len(body))
    name = r.string()
    seq = r.i32()
    out = {"name": name, "seq_id": seq, "message": None, "type": TAPP_UNKNOWN}
    for fid, ft in r.fields():
        if fid == 1 and ft == T_STRING:
            out["message"] = r.string()
        elif fid == 2 and ft == T_I32:
            out["type"] = r.i32()
        else:
            r.value(ft, 1)
    return out


def encode_error_response(seq_id, int status, message, *, bint restart=False,
                          int protocol=1, method=None, body_seq_id=None) -> bytes:
    """What the proxy answers when it cannot deliver a request.

    ResponseInfo{sequenceId, status, message}; when the request was
    thrift-serialized (serialization bits 1) and its body named a method, the
    body is a Thrift EXCEPTION message (method, the body's seqid, or seq_id
    when not given, TApplicationException{message}) as a Dorado provider
    writes it, otherwise empty.  The request's checksum and compression bits
    are kept (the answer is compressed the same way)."""
    local = {"octo-proxy-restart": "1"} if restart else None
    body = b""
    if method is not None and protocol & PROTO_SERIAL_MASK == SERIAL_THRIFT:
        body = encode_thrift_exception(method, seq_id if body_seq_id is None else body_seq_id,
                                       message)
    h = {"messageType": MT_NORMAL,
         "responseInfo": {"sequenceId": seq_id, "status": status, "message": message},
         "localContext": local}
    comp = protocol & (PROTO_GZIP | PROTO_SNAPPY)
    if comp == PROTO_GZIP | PROTO_SNAPPY:
        comp = PROTO_SNAPPY  # Dorado reads snappy first when both are set
    return encode_frame(encode_header(h), body, protocol=(protocol & PROTO_SERIAL_MASK) | comp,
                        checksum=bool(protocol & PROTO_CHECKSUM), compress=True)


def encode_heartbeat(seq_id, *, bint response=False, appkey=None, send_time_ms=None,
                     status=None, local_context=None, int protocol=1) -> bytes:
    """A NormalHeartbeat request (requestInfo) or response (responseInfo, status 0).

    RequestInfo/ResponseInfo carry every field the OCTO IDL marks required, so
    strict decoders accept them.  heartbeatInfo (only when appkey, send_time_ms
    or status is given) always carries its required status (default 2, ALIVE);
    sendTime is in milliseconds, as Dorado sends it."""
    h = {"messageType": MT_HEARTBEAT, "localContext": local_context}
    if response:
        h["responseInfo"] = {"sequenceId": seq_id, "status": 0}
    else:
        h["requestInfo"] = {"serviceName": "", "sequenceId": seq_id, "callType": 0,
                            "timeout": 0}
    if appkey is not None or send_time_ms is not None or status is not None:
        hb = {"status": HB_ALIVE if status is None else status}
        if appkey is not None:
            hb["appkey"] = appkey
        if send_time_ms is not None:
            hb["sendTime"] = send_time_ms
        h["heartbeatInfo"] = hb
    return encode_frame(encode_header(h), b"", protocol=protocol & PROTO_SERIAL_MASK)


# HeartbeatInfo.status values (official IDL): 0 DEAD, 2 ALIVE, 4 STOPPED.
HB_DEAD = 0
HB_ALIVE = 2
HB_STOPPED = 4


def encode_scanner_heartbeat_response(seq_id, *, int status=HB_ALIVE, appkey=None,
                                      send_time_ms=None, int protocol=1) -> bytes:
    """The answer to a ScannerHeartbeat (messageType 2) as Dorado providers
    write it: messageType 2, responseInfo{sequenceId, status 0},
    heartbeatInfo{appkey, sendTime (ms, now when not given), status}."""
    hb = {"sendTime": int(_time.time() * 1000) if send_time_ms is None else send_time_ms,
          "status": status}
    if appkey is not None:
        hb["appkey"] = appkey
    h = {"messageType": MT_SCANNER_HEARTBEAT,
         "responseInfo": {"sequenceId": seq_id, "status": 0}, "heartbeatInfo": hb}
    return encode_frame(encode_header(h), b"", protocol=protocol & PROTO_SERIAL_MASK)


# -------- compression (cold paths: answers to compressed requests, tests)

def _gzip_compress(data) -> bytes:
    c = _zlib.compressobj(6, _zlib.DEFLATED, 31)
    return c.compress(bytes(data)) + c.flush()


def snappy_compress(data) -> bytes:
    """Raw snappy (the format Dorado's Snappy.compress writes), literals only:
    valid for every snappy decoder, no compression gained."""
    data = bytes(data)
    out = [_varint(len(data))]
    cdef Py_ssize_t i = 0, n = len(data), k
    while i < n:
        k = min(n - i, 65536)
        if k - 1 < 60:
            out.append(bytes(((k - 1) << 2,)))
        elif k - 1 < 256:
            out.append(bytes((60 << 2, k - 1)))
        else:
            out.append(bytes((61 << 2, (k - 1) & 0xFF, (k - 1) >> 8)))
        out.append(data[i:i + k])
        i += k
    return b"".join(out)


cdef bytes _varint(Py_ssize_t v):
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def snappy_decompress(data, Py_ssize_t limit=-1) -> bytes:
    """Decode raw snappy; with limit >= 0 stop once `limit` bytes are out
    (a prefix).  Raises ValueError on malformed input."""
    cdef const uint8_t[:] d = memoryview(bytes(data)).cast("B")
    cdef Py_ssize_t n = d.shape[0], i = 0, ulen = 0, shift = 0, ln, off, j, start
    cdef int tag
    while True:
        if i >= n or shift > 28:
            raise ValueError("snappy: bad length preamble")
        ulen |= (d[i] & 0x7F) << shift
        i += 1
        if not d[i - 1] & 0x80:
            break
        shift += 7
    if limit < 0 or limit > ulen:
        limit = ulen
    out = bytearray()
    while len(out) < limit:
        if i >= n:
            raise ValueError("snappy: truncated")
        tag = d[i]
        i += 1
        if tag & 3 == 0:
            ln = tag >> 2
            if ln >= 60:
                k = ln - 59
                if i + k > n:
                    raise ValueError("snappy: truncated literal length")
                ln = 0
                for j in range(k):
                    ln |= d[i + j] << (8 * j)
                i += k
            ln += 1
            if i + ln > n:
                raise ValueError("snappy: truncated literal")
            out += d[i:i + ln]
            i += ln
            continue
        if tag & 3 == 1:
            if i >= n:
                raise ValueError("snappy: truncated copy")
            ln = ((tag >> 2) & 7) + 4
            off = ((tag >> 5) << 8) | d[i]
            i += 1
        elif tag & 3 == 2:
            if i + 2 > n:
                raise ValueError("snappy: truncated copy")
            ln = (tag >> 2) + 1
            off = d[i] | (d[i + 1] << 8)
            i += 2
        else:
            if i + 4 > n:
                raise ValueError("snappy: truncated copy")
            ln = (tag >> 2) + 1
            off = d[i] | (d[i + 1] << 8) | (d[i + 2] << 16) | (<Py_ssize_t>d[i + 3] << 24)
            i += 4
        if off <= 0 or off > len(out):
            raise ValueError("snappy: bad copy offset")
        start = len(out) - off
        for j in range(ln):
            out.append(out[start + j])
    if len(out) > limit:
        del out[limit:]
    return bytes(out)


def read_compressed_request(data, *, Py_ssize_t max_header=DEFAULT_MAX_HEADER):
    """For a whole gzip/snappy-compressed OCTO frame: decompress only its
    header and the start of its body (bounded by the header length + 4 KiB,
    never the whole payload) -> {"seq_id", "is_request", "method",
    "body_seq_id", "protocol"}, or None when that prefix cannot be read."""
    cdef FrameInfo fi
    data = bytes(data)
    if len(data) < OCTO_PREFIX or data[0] != 0xAB or data[1] != 0xBA:
        return None
    proto = data[3]
    hl = (data[8] << 8) | data[9]
    if hl > max_header:
        return None
    trailer = 4 if proto & PROTO_CHECKSUM else 0
    payload = data[OCTO_PREFIX:len(data) - trailer]
    want = hl + 4096
    try:
        if proto & PROTO_SNAPPY:
            plain = snappy_decompress(payload, want)
        elif proto & PROTO_GZIP:
            plain = _zlib.decompressobj(47).decompress(payload, want)
        else:
            return None
    except (ValueError, _zlib.error):
        return None
    if len(plain) < hl:
        return None
    fake = data[:3] + bytes((proto & PROTO_SERIAL_MASK,)) + _pk_u32(2 + len(plain)) + data[8:10] + plain
    cdef const uint8_t[:] mv = fake
    if fr_scan_header(&mv[0], len(fake), max_header, &fi) <= 0 or fi.seq_off < 0:
        return None
    out = {"seq_id": fi.seq_id, "is_request": bool(fi.flags & FF_REQUEST), "method": None,
           "body_seq_id": None, "protocol": proto}
    cdef int32_t bseq = 0
    fi.kind = FK_OCTO
    fi.protocol = proto & PROTO_SERIAL_MASK
    fi.body_off = OCTO_PREFIX + hl
    fi.body_len = len(plain) - hl
    m = fr_error_method(&mv[0], &fi, &bseq)
    if m is not None:
        out["method"] = m
        out["body_seq_id"] = bseq
    return out


def encode_proxy_restart() -> bytes:
    return _PROXY_RESTART


def encode_proxy_announce(seq_id) -> bytes:
    return encode_heartbeat(seq_id, local_context={"octo-proxy": "1"})


cdef bytes _PROXY_RESTART = encode_frame(encode_header({"messageType": MT_PROXY_RESTART}), b"")


def encode_thrift_message(name, int message_type, seq_id, payload=b"") -> bytes:
    """A native Thrift framed message (strict TBinaryProtocol), for tests/SDK."""
    msg = b"".join((b"\x80\x01\x00", bytes((message_type & 0xFF,)), _enc_str(name),
                    _pk_i32(seq_id), bytes(payload)))
    return _pk_i32(len(msg)) + msg


# -------- full decode (Python level)

cdef class _Reader:
    cdef bytes b
    cdef Py_ssize_t p
    cdef Py_ssize_t end

    def __init__(self, bytes b, Py_ssize_t p, Py_ssize_t end):
        self.b = b
        self.p = p
        self.end = end

    cdef bytes take(self, Py_ssize_t k):
        if k < 0 or self.p + k > self.end:
            raise FrameError(FE_BAD_HEADER)
        r = self.b[self.p:self.p + k]
        self.p += k
        return r

    cdef int u8(self) except -1:
        return self.take(1)[0]

    cdef int i8(self) except? -999:
        return _struct.unpack(">b", self.take(1))[0]

    cdef object i16(self):
        return _struct.unpack(">h", self.take(2))[0]

    cdef object i32(self):
        return _struct.unpack(">i", self.take(4))[0]

    cdef object i64(self):
        return _struct.unpack(">q", self.take(8))[0]

    cdef object dbl(self):
        return _struct.unpack(">d", self.take(8))[0]

    cdef object string(self):
        return self.take(self.i32()).decode("utf-8", "surrogateescape")

    cdef object value(self, int t, int depth):
        # generic decode, used to skip unknown fields and for wrong-typed ones
        cdef Py_ssize_t cnt
        if t == T_BOOL:
            return self.u8() != 0
        if t == T_BYTE:
            return self.i8()
        if t == T_I16:
            return self.i16()
        if t == T_I32:
            return self.i32()
        if t == T_I64:
            return self.i64()
        if t == T_DOUBLE:
            return self.dbl()
        if t == T_STRING:
            return self.take(self.i32())
        if t not in (T_STRUCT, T_MAP, T_SET, T_LIST):
            raise FrameError(FE_BAD_HEADER)
        if depth > FR_MAX_DEPTH:
            raise FrameError(FE_TOO_DEEP)
        if t == T_STRUCT:
            out = {}
            for fid, ft in self.fields():
                out[fid] = self.value(ft, depth + 1)
            return out
        if t == T_MAP:
            kt = self.u8()
            vt = self.u8()
            cnt = self.i32()
            if cnt < 0:
                raise FrameError(FE_BAD_HEADER)
            return [(self.value(kt, depth + 1), self.value(vt, depth + 1)) for _ in range(cnt)]
        et = self.u8()
        cnt = self.i32()
        if cnt < 0:
            raise FrameError(FE_BAD_HEADER)
        return [self.value(et, depth + 1) for _ in range(cnt)]

    def fields(self):
        cdef int ft
        while True:
            ft = self.u8()
            if ft == T_STOP:
                return
            yield self.i16(), ft

    cdef dict strmap(self):
        kt = self.u8()
        vt = self.u8()
        cnt = self.i32()
        if cnt < 0:
            raise FrameError(FE_BAD_HEADER)
        if cnt and (kt != T_STRING or vt != T_STRING):
            raise FrameError(FE_BAD_FIELD_TYPE)
        return {self.string(): self.string() for _ in range(cnt)}

    cdef dict struct(self, dict spec, int depth):
        # spec: field id -> (name, type, reader or None); others skipped
        out = {}
        for fid, ft in self.fields():
            s = spec.get(fid)
            if s is None or s[1] != ft:
                self.value(ft, depth + 1)
                continue
            name, t, sub = s
            if sub is not None:
                out[name] = self.struct(sub, depth + 1)
            elif t == T_STRING:
                out[name] = self.string()
            elif t == T_BOOL:
                out[name] = self.u8() != 0
            elif t == T_MAP:
                mkt = self.u8()
                mvt = self.u8()
                cnt = self.i32()
                if cnt < 0:
                    raise FrameError(FE_BAD_HEADER)
                if cnt and (mkt != T_STRING or mvt != T_DOUBLE):
                    for _ in range(cnt):
                        self.value(mkt, depth + 2)
                        self.value(mvt, depth + 2)
                    continue
                out[name] = {self.string(): self.dbl() for _ in range(cnt)}
            else:
                out[name] = self.value(t, depth + 1)
        return out


_LOAD_SPEC = {1: ("averageLoad", T_DOUBLE, None), 2: ("oldGC", T_I32, None),
              3: ("threadNum", T_I32, None), 4: ("queueSize", T_I32, None),
              5: ("methodQpsMap", T_MAP, None)}
_HB_SPEC = {1: ("appkey", T_STRING, None), 2: ("sendTime", T_I64, None),
            3: ("loadInfo", T_STRUCT, _LOAD_SPEC), 4: ("status", T_I32, None)}
_TRACE_SPEC = {fid: (name, T_BOOL if fid in _TRACE_BOOLS else T_STRING, None)
               for fid, name in _TRACE_IDS.items()}
_REQ_SPEC = {1: ("serviceName", T_STRING, None), 2: ("sequenceId", T_I64, None),
             3: ("callType", T_BYTE, None), 4: ("timeout", T_I32, None)}
_RESP_SPEC = {1: ("sequenceId", T_I64, None), 2: ("status", T_BYTE, None),
              3: ("message", T_STRING, None)}


def decode_header(bytes data not None) -> dict:
    """Decode a Header struct fully (unknown fields ignored)."""
    cdef _Reader r = _Reader(data, 0, len(data))
    h = {}
    for fid, ft in r.fields():
        if fid == 1 and ft == T_BYTE:
            h["messageType"] = r.i8()
        elif fid == 2 and ft == T_STRUCT:
            h["requestInfo"] = r.struct(_REQ_SPEC, 1)
        elif fid == 3 and ft == T_STRUCT:
            h["responseInfo"] = r.struct(_RESP_SPEC, 1)
        elif fid == 4 and ft == T_STRUCT:
            h["traceInfo"] = r.struct(_TRACE_SPEC, 1)
        elif fid == 5 and ft == T_MAP:
            h["globalContext"] = r.strmap()
        elif fid == 6 and ft == T_MAP:
            h["localContext"] = r.strmap()
        elif fid == 7 and ft == T_STRUCT:
            h["heartbeatInfo"] = r.struct(_HB_SPEC, 1)
        elif 1 <= fid <= 7:
            raise FrameError(FE_BAD_FIELD_TYPE)
        else:
            r.value(ft, 1)
    if r.p != r.end:
        raise FrameError(FE_BAD_HEADER)
    return h


def decode_frame(data, *, Py_ssize_t max_frame=DEFAULT_MAX_FRAME,
                 Py_ssize_t max_header=DEFAULT_MAX_HEADER) -> dict:
    """Fully decode exactly one frame (validated by the C scanner first).

    OCTO: {kind, version, protocol, checksum, compressed, header (dict, None
    when compressed), body}.  Thrift: {kind, message_type, name, seq_id, body}."""
    data = bytes(data)
    frames, used = scan(data, max_frame=max_frame, max_header=max_header)
    if not frames:
        raise FrameError(FE_NEED_MORE)
    if len(frames) != 1 or used != len(data):
        if used != len(data) and len(frames) == 1:
            scan(data, used, max_frame=max_frame, max_header=max_header)  # raise its error
        raise ValueError("data holds more than one frame")
    cdef Frame f = frames[0]
    if f.fi.kind == FK_THRIFT:
        mtype = data[7]
        return {"kind": FK_THRIFT, "message_type": mtype, "name": f.service_name,
                "seq_id": f.fi.seq_id, "body": f.body}
    out = {"kind": FK_OCTO, "version": f.fi.version, "protocol": f.fi.protocol,
           "checksum": f.checksum, "compressed": f.compressed, "body": f.body,
           "header": None}
    if not f.compressed:
        out["header"] = decode_header(data[f.fi.header_off:f.fi.header_off + f.fi.header_len])
    return out
