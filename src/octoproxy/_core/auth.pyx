# cython: freethreading_compatible = False
"""Service authentication in the data path (docs/auth.md).

The signature of a request is lowercase hex of
HMAC-SHA256(token of the caller, caller "|" provider "|" ts "|" method), in
localContext octo-auth-sig, beside octo-auth-appkey (the caller) and
octo-auth-ts (milliseconds since the Unix epoch, decimal).  The MAC is
OpenSSL's HMAC(); the comparison is CRYPTO_memcmp (constant time).
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint8_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

from octoproxy._core.frame cimport FF_CHECKSUM, FrameInfo, fr_adler32, fr_method, fr_scan


cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_MD:
        pass
    const EVP_MD* EVP_sha256()

cdef extern from "openssl/hmac.h" nogil:
    unsigned char* HMAC(const EVP_MD* md, const void* key, int key_len, const unsigned char* d,
                        size_t n, unsigned char* md_out, unsigned int* md_len)

cdef extern from "openssl/crypto.h" nogil:
    int CRYPTO_memcmp(const void* a, const void* b, size_t n)


cdef const char* HEX = b"0123456789abcdef"
REASONS = ("ok", "unsigned", "unknown_caller", "bad_signature", "expired", "not_allowed",
           "method_not_allowed")


cdef int64_t au_now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef int au_mac_hex(bytes token, const char* caller, Py_ssize_t clen, const char* provider,
                    Py_ssize_t plen, const char* ts, Py_ssize_t tlen, const char* method,
                    Py_ssize_t mlen, char* out) noexcept:
    """out[0:64] = hex(HMAC-SHA256(token, caller|provider|ts|method)); 0, or -1
    when the message cannot be built."""
    cdef char stack[512]
    cdef Py_ssize_t n = clen + plen + tlen + mlen + 3
    cdef char* m = stack
    cdef unsigned char mac[32]
    cdef unsigned int maclen = 0
    cdef Py_ssize_t i
    if n > 512:
        m = <char*>malloc(n)
        if m == NULL:
            return -1
    memcpy(m, caller, clen)
    m[clen] = b'|'
    memcpy(m + clen + 1, provider, plen)
    m[clen + 1 + plen] = b'|'
    memcpy(m + clen + plen + 2, ts, tlen)
    m[clen + plen + tlen + 2] = b'|'
    if mlen:
        memcpy(m + clen + plen + tlen + 3, method, mlen)
    HMAC(EVP_sha256(), PyBytes_AS_STRING(token), <int>PyBytes_GET_SIZE(token),
         <const unsigned char*>m, n, mac, &maclen)
    if m != stack:
        free(m)
    for i in range(32):
        out[2 * i] = HEX[mac[i] >> 4]
        out[2 * i + 1] = HEX[mac[i] & 15]
    return 0


@cython.final
cdef class Verifier:
    """An inbound listener's authentication and ACL (docs/auth.md)."""

    def __cinit__(self, bytes provider not None, bint enforce, int64_t skew_ms, dict tokens not None,
                  dict acl not None):
        self.provider = provider
        self.enforce = enforce
        self.skew_ms = skew_ms
        self.tokens = tokens
        self.acl = acl
        self.answers = {}

    def __repr__(self):
        return f"Verifier({self.provider!r}, {len(self.tokens)} tokens, {len(self.acl)} callers)"

    def __reduce__(self):
        raise TypeError("a Verifier holds tokens: it is not serialised")

    def counters(self) -> dict:
        """ok, each failure reason, and (log-only) the failures forwarded."""
        d = {"ok": self.n_ok, "logged": self.n_logged}
        for i in range(1, AU_REASONS):
            d[REASONS[i]] = self.n_failed[i]
        return d

    def verify(self, bytes frame not None, int64_t now_ms=0) -> int:
        """au_verify over one whole frame (tests): AU_OK or the reason."""
        cdef FrameInfo fi
        cdef Py_ssize_t moff = 0, mlen = 0
        _scan_whole(frame, &fi)
        return au_verify(self, <const uint8_t*>PyBytes_AS_STRING(frame), &fi,
                         now_ms or au_now_ms(), &moff, &mlen)


cdef int _scan_whole(bytes frame, FrameInfo* fi) except -1:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(frame)
    if fr_scan(<const uint8_t*>PyBytes_AS_STRING(frame), n, n + 8, n, fi) != n:
        raise ValueError("not one whole valid frame")
    return 0


@cython.final
cdef class Signer:
    """The appkeys an outbound listener signs for, with their tokens."""

    def __cinit__(self, dict tokens not None):
        self.tokens = tokens
        self.answers = {}

    def __repr__(self):
        return f"Signer({sorted(self.tokens)!r})"

    def __reduce__(self):
        raise TypeError("a Signer holds tokens: it is not serialised")

    cdef bytes token_for(self, const uint8_t* caller, Py_ssize_t clen):
        cdef bytes last = self.last_caller
        if clen <= 0:
            return None
        if last is not None and PyBytes_GET_SIZE(last) == clen \
                and memcmp(PyBytes_AS_STRING(last), caller, clen) == 0:
            return self.last_token
        last = PyBytes_FromStringAndSize(<const char*>caller, clen)
        token = self.tokens.get(last)
        if token is not None:
            self.last_caller = last
            self.last_token = token
        return token


cdef int au_verify(Verifier v, const uint8_t* p, const FrameInfo* fi, int64_t now_ms,
                   Py_ssize_t* moff, Py_ssize_t* mlen) except -1:
    cdef int64_t ts = 0
    cdef Py_ssize_t i
    cdef char mac[AU_SIG_HEX]
    cdef bytes caller, token
    cdef tuple toks
    cdef object methods
    cdef int r
    mlen[0] = 0
    moff[0] = fr_method(p, fi, mlen)
    if moff[0] < 0:
        moff[0] = 0
        mlen[0] = 0
    if fi.auth_app_len <= 0 or fi.auth_ts_len < 0 or fi.auth_sig_len < 0:
        r = AU_UNSIGNED
    else:
        caller = PyBytes_FromStringAndSize(<const char*>p + fi.auth_app_off, fi.auth_app_len)
        toks = v.tokens.get(caller)
        if toks is None:
            r = AU_UNKNOWN_CALLER
        else:
            r = AU_OK
            if fi.auth_ts_len == 0 or fi.auth_ts_len > 15:
                r = AU_EXPIRED
            else:
                for i in range(fi.auth_ts_len):
                    if p[fi.auth_ts_off + i] < 48 or p[fi.auth_ts_off + i] > 57:
                        r = AU_EXPIRED
                        break
                    ts = ts * 10 + (p[fi.auth_ts_off + i] - 48)
                if r == AU_OK and (ts > now_ms + v.skew_ms or ts < now_ms - v.skew_ms):
                    r = AU_EXPIRED
            if r == AU_OK:
                # the current token, then (rotation window) the previous one
                r = AU_BAD_SIGNATURE
                if fi.auth_sig_len == AU_SIG_HEX:
                    for token in toks:
                        if au_mac_hex(
                                token, <const char*>p + fi.auth_app_off, fi.auth_app_len,
                                PyBytes_AS_STRING(v.provider), PyBytes_GET_SIZE(v.provider),
                                <const char*>p + fi.auth_ts_off, fi.auth_ts_len,
                                <const char*>p + moff[0], mlen[0], mac) == 0 \
                                and CRYPTO_memcmp(mac, p + fi.auth_sig_off, AU_SIG_HEX) == 0:
                            r = AU_OK
                            break
            if r == AU_OK:
                if caller not in v.acl:
                    r = AU_NOT_ALLOWED
                else:
                    methods = v.acl[caller]
                    if methods is not None and PyBytes_FromStringAndSize(
                            <const char*>p + moff[0], mlen[0]) not in methods:
                        r = AU_METHOD
    if r == AU_OK:
        v.n_ok += 1
    else:
        v.n_failed[r] += 1
    return r


cdef inline void wr_u32(char* p, uint32_t v) noexcept nogil:
    p[0] = <char>(v >> 24)
    p[1] = <char>(v >> 16)
    p[2] = <char>(v >> 8)
    p[3] = <char>v


cdef inline uint32_t rd_u32(const char* p) noexcept nogil:
    cdef const uint8_t* u = <const uint8_t*>p
    return (<uint32_t>u[0] << 24) | (<uint32_t>u[1] << 16) | (<uint32_t>u[2] << 8) | u[3]


cdef inline char* wr_str(char* d, const char* s, Py_ssize_t n) noexcept nogil:
    wr_u32(d, <uint32_t>n)
    memcpy(d + 4, s, n)
    return d + 4 + n


cdef Py_ssize_t au_sign_extra(const FrameInfo* fi) noexcept nogil:
    # three string pairs: octo-auth-appkey, octo-auth-ts (13 digits), octo-auth-sig (64 hex)
    cdef Py_ssize_t clen = fi.caller_len if fi.caller_len > 0 else 0
    cdef Py_ssize_t n = (4 + 16 + 4 + clen) + (4 + 12 + 4 + 20) + (4 + 13 + 4 + AU_SIG_HEX)
    if fi.lctx_off < 0:
        n += 3 + 6    # field header (map, id 6) and map header
    return n


cdef Py_ssize_t au_sign_into(char* dst, const uint8_t* p, const FrameInfo* fi, bytes token,
                             const char* provider, Py_ssize_t plen, int64_t now_ms) noexcept:
    cdef char ts[24]
    cdef Py_ssize_t tlen = 0, at, extra, hl
    cdef char mac[AU_SIG_HEX]
    cdef Py_ssize_t moff, mlen = 0
    cdef const char* src = <const char*>p
    cdef const char* caller = src + fi.caller_off
    cdef Py_ssize_t clen = fi.caller_len
    cdef char* d
    cdef int64_t t = now_ms
    cdef bint trailer = (fi.flags & FF_CHECKSUM) != 0
    # the timestamp, decimal
    if t <= 0:
        t = 0
    while True:
        ts[23 - tlen] = <char>(48 + t % 10)
        tlen += 1
        t //= 10
        if t == 0:
            break
    memcpy(ts, ts + 24 - tlen, tlen)
    moff = fr_method(p, fi, &mlen)
    if moff < 0:
        moff = 0
        mlen = 0
    if au_mac_hex(token, caller, clen, provider, plen, ts, tlen, src + moff, mlen, mac) != 0:
        return -1
    extra = (4 + 16 + 4 + clen) + (4 + 12 + 4 + tlen) + (4 + 13 + 4 + AU_SIG_HEX)
    if fi.lctx_off < 0:
        extra += 9
        at = fi.header_off + fi.header_len - 1      # before the Header's stop byte
    else:
        at = fi.lctx_end
    hl = fi.header_len + extra
    if hl > 0xFFFF:
        return -1
    memcpy(dst, src, at)
    d = dst + at
    if fi.lctx_off < 0:
        d[0] = 13             # T_MAP, field 6 (localContext)
        d[1] = 0
        d[2] = 6
        d[3] = 11             # string -> string, 3 entries
        d[4] = 11
        wr_u32(d + 5, 3)
        d += 9
    else:
        dst[fi.lctx_off] = 11
        dst[fi.lctx_off + 1] = 11
        wr_u32(dst + fi.lctx_off + 2, rd_u32(src + fi.lctx_off + 2) + 3)
    d = wr_str(d, b"octo-auth-appkey", 16)
    d = wr_str(d, caller, clen)
    d = wr_str(d, b"octo-auth-ts", 12)
    d = wr_str(d, ts, tlen)
    d = wr_str(d, b"octo-auth-sig", 13)
    d = wr_str(d, mac, AU_SIG_HEX)
    memcpy(d, src + at, fi.length - at)
    wr_u32(dst + 4, rd_u32(src + 4) + <uint32_t>extra)     # total length
    dst[8] = <char>(hl >> 8)
    dst[9] = <char>hl
    if trailer:
        wr_u32(dst + fi.length + extra - 4,
               fr_adler32(<const uint8_t*>dst, fi.length + extra - 4))
    return fi.length + extra


def sign(token, caller, provider, ts, method=b"") -> str:
    """The signature a caller puts in octo-auth-sig (docs/auth.md): lowercase
    hex HMAC-SHA256(token, caller|provider|ts|method); for legacy clients, tests."""
    cdef char out[AU_SIG_HEX]
    cdef bytes t = bytes(token), c = bytes(caller), pv = bytes(provider), m = bytes(method)
    cdef bytes s = str(ts).encode()
    if au_mac_hex(t, c, len(c), pv, len(pv), s, len(s), m, len(m), out) != 0:
        raise MemoryError()
    return out[:AU_SIG_HEX].decode()


def sign_frame(bytes frame not None, token, provider, int64_t now_ms=0) -> bytes:
    """The signed copy of a whole OCTO request frame, as the outbound path
    writes it (tests); its caller is traceInfo.clientAppkey."""
    cdef FrameInfo fi
    _scan_whole(frame, &fi)
    cdef bytes pv = bytes(provider)
    cdef Py_ssize_t n = fi.length + au_sign_extra(&fi)
    cdef char* buf = <char*>malloc(n)
    if buf == NULL:
        raise MemoryError()
    try:
        n = au_sign_into(buf, <const uint8_t*>PyBytes_AS_STRING(frame), &fi, bytes(token),
                         pv, len(pv), now_ms or au_now_ms())
        if n < 0:
            raise ValueError("the signed header would exceed 65535 bytes")
        return PyBytes_FromStringAndSize(buf, n)
    finally:
        free(buf)
