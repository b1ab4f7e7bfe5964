# cython: freethreading_compatible = False
"""Service authentication in the data path (docs/auth.md).

A signed request carries localContext octo-auth = caller ":" ts ":" sig
(docs/protocol.md 7.6): ts is seconds since the Unix epoch (decimal), sig
the base64url text (no padding) of the first 16 bytes of
HMAC-SHA256(token of the caller, caller "|" provider "|" ts "|" method).
The MAC is HMAC-SHA256 over OpenSSL's SHA-256, each token's pad blocks
absorbed once (_Hmac); the comparison is constant time (_same_sig).
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset, strlen
from posix.time cimport clock_gettime, timespec

from octoproxy._core.frame cimport FF_CHECKSUM, FrameInfo, fi_method, fr_adler32, fr_scan


cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_MD:
        pass
    EVP_MD* EVP_MD_fetch(void* libctx, const char* algorithm, const char* properties)
    EVP_MD_CTX* EVP_MD_CTX_new()
    void EVP_MD_CTX_free(EVP_MD_CTX* ctx)
    int EVP_MD_CTX_copy_ex(EVP_MD_CTX* out, const EVP_MD_CTX* src)
    int EVP_DigestInit_ex2(EVP_MD_CTX* ctx, const EVP_MD* md, const void* params)
    int EVP_DigestUpdate(EVP_MD_CTX* ctx, const void* d, size_t n)
    int EVP_DigestFinal_ex(EVP_MD_CTX* ctx, unsigned char* md, unsigned int* n)
    int EVP_Digest(const void* d, size_t n, unsigned char* md, unsigned int* size,
                   const EVP_MD* t, void* engine)

cdef extern from "openssl/crypto.h" nogil:
    void OPENSSL_cleanse(void* p, size_t n)

cdef extern from "<time.h>" nogil:
    # the clock at the last tick (1-4 ms): a timestamp only has to be within the
    # skew, and reading it costs a fraction of CLOCK_REALTIME's
    const int CLOCK_REALTIME_COARSE


cdef const char* B64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
REASONS = ("ok", "unsigned", "unknown_caller", "bad_signature", "expired", "not_allowed",
           "method_not_allowed")

# SHA-256 fetched once (OpenSSL 3's HMAC() fetches it on every call), and the
# one context each MAC works in: the data path runs under the GIL, one thread.
cdef EVP_MD* _SHA256 = EVP_MD_fetch(NULL, b"SHA256", NULL)
cdef EVP_MD_CTX* _WORK = EVP_MD_CTX_new()
if _SHA256 == NULL or _WORK == NULL:
    raise ImportError("OpenSSL's libcrypto has no SHA-256")
cdef const char* _CHECK = b"octo-proxy: tells tokens apart without keeping them"


cdef int64_t au_now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME_COARSE, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef int64_t au_now_s() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME_COARSE, &ts)
    return <int64_t>ts.tv_sec


cdef void au_b64url_mac(const unsigned char* mac, char* out) noexcept nogil:
    """out[0:22] = base64url (RFC 4648 section 5), no padding, of mac[0:16]."""
    cdef int i, o = 0
    cdef uint32_t v
    for i in range(0, 15, 3):
        v = (<uint32_t>mac[i] << 16) | (<uint32_t>mac[i + 1] << 8) | mac[i + 2]
        out[o] = B64URL[v >> 18]
        out[o + 1] = B64URL[(v >> 12) & 63]
        out[o + 2] = B64URL[(v >> 6) & 63]
        out[o + 3] = B64URL[v & 63]
        o += 4
    out[20] = B64URL[mac[15] >> 2]
    out[21] = B64URL[(mac[15] & 3) << 4]


@cython.final
@cython.no_gc
cdef class _Hmac:
    """One token's HMAC-SHA256 state, precomputed (RFC 2104): SHA-256 after the
    key's inner pad block and after its outer pad block.  The token itself is
    not kept; `check` (its MAC of a fixed text) tells two tokens apart."""

    def __dealloc__(self):
        # OpenSSL clears a digest context's state when it frees it
        EVP_MD_CTX_free(self.inner)
        EVP_MD_CTX_free(self.outer)

    def __repr__(self):
        return "<HMAC key>"

    def __reduce__(self):
        raise TypeError("an HMAC key is not serialised")


cdef _Hmac hm_new(bytes token):
    cdef _Hmac h = _Hmac.__new__(_Hmac)
    cdef unsigned char k[64]
    cdef unsigned char pad[64]
    cdef unsigned int n = 0
    cdef Py_ssize_t klen = PyBytes_GET_SIZE(token), i
    cdef int ok
    memset(k, 0, 64)
    if klen > 64:   # a key longer than the block is its digest
        ok = EVP_Digest(PyBytes_AS_STRING(token), klen, k, &n, _SHA256, NULL)
    else:
        memcpy(k, PyBytes_AS_STRING(token), klen)
        ok = 1
    h.inner = EVP_MD_CTX_new()
    h.outer = EVP_MD_CTX_new()
    for i in range(64):
        pad[i] = k[i] ^ 0x36
    ok = ok and h.inner != NULL and EVP_DigestInit_ex2(h.inner, _SHA256, NULL) \
        and EVP_DigestUpdate(h.inner, pad, 64)
    for i in range(64):
        pad[i] = k[i] ^ 0x5c
    ok = ok and h.outer != NULL and EVP_DigestInit_ex2(h.outer, _SHA256, NULL) \
        and EVP_DigestUpdate(h.outer, pad, 64)
    OPENSSL_cleanse(k, 64)
    OPENSSL_cleanse(pad, 64)
    if not ok or hm_mac(h, <const unsigned char*>_CHECK, strlen(_CHECK), h.check) != 0:
        raise MemoryError("OpenSSL: preparing an HMAC key")
    return h


cdef int hm_mac(_Hmac h, const unsigned char* m, size_t n, unsigned char* out) noexcept:
    """out[0:32] = HMAC-SHA256 of m[0:n] under h's token; 0, or -1 (OpenSSL failed)."""
    cdef unsigned char ih[32]
    cdef unsigned int l = 0
    if EVP_MD_CTX_copy_ex(_WORK, h.inner) != 1 or EVP_DigestUpdate(_WORK, m, n) != 1 \
            or EVP_DigestFinal_ex(_WORK, ih, &l) != 1 \
            or EVP_MD_CTX_copy_ex(_WORK, h.outer) != 1 or EVP_DigestUpdate(_WORK, ih, 32) != 1 \
            or EVP_DigestFinal_ex(_WORK, out, &l) != 1:
        return -1
    return 0


cdef int au_mac_sig(_Hmac key, const char* caller, Py_ssize_t clen, const char* provider,
                    Py_ssize_t plen, const char* ts, Py_ssize_t tlen, const char* method,
                    Py_ssize_t mlen, char* out) noexcept:
    """out[0:22] = the signature of caller|provider|ts|method under key: base64url
    of HMAC-SHA256's first 16 bytes; 0, or -1 when the message cannot be built."""
    cdef char stack[512]
    cdef Py_ssize_t n = clen + plen + tlen + mlen + 3
    cdef char* m = stack
    cdef unsigned char mac[32]
    cdef int r
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
    if n == key.last_len and memcmp(m, key.last_msg, n) == 0:
        memcpy(out, key.last_mac, AU_SIG_LEN)   # the same message: the same MAC
        return 0
    r = hm_mac(key, <const unsigned char*>m, n, mac)
    if r == 0:
        au_b64url_mac(mac, out)
        if n <= HM_LAST_MAX:
            memcpy(key.last_msg, m, n)
            memcpy(key.last_mac, out, AU_SIG_LEN)
            key.last_len = n
    if m != stack:
        free(m)
    return r


@cython.final
@cython.no_gc
cdef class _Accepted:
    """One appkey's tokens: the current one, and during a rotation the previous
    one (until previous_until_ms; 0: as long as this entry)."""

    def __repr__(self):
        return "<tokens>"

    def __reduce__(self):
        raise TypeError("tokens are not serialised")


cdef bytes _appkey(appkey):
    if isinstance(appkey, str):
        appkey = (<str>appkey).encode()
    if not isinstance(appkey, bytes) or not appkey:
        raise TypeError("an appkey is a non-empty str or bytes")
    return <bytes>appkey


cdef bytes _token(token):
    if isinstance(token, str):
        token = (<str>token).encode()
    if not isinstance(token, bytes) or not token:
        # never the value in the message
        raise TypeError("a token is non-empty str or bytes")
    return <bytes>token


@cython.final
cdef class TokenStore:
    """The tokens a proxy signs and verifies with, by appkey, as precomputed
    HMAC state (docs/auth.md).  Changed at run time by the token file's watcher
    or the control plane (SDS): each change swaps one appkey's entry whole, so
    a request is checked against either the old or the new tokens, never a mix;
    Signers and Verifiers built on this store see it at their next request.

    A new current token keeps the replaced one accepted (not signed with) for
    `rotation_grace_s`, unless the change names the previous token itself."""

    def __cinit__(self, tokens=None, double rotation_grace_s=60.0):
        self.keys = {}
        if rotation_grace_s < 0:
            raise ValueError("rotation_grace_s must be >= 0")
        self.rotation_grace_ms = <int64_t>(rotation_grace_s * 1000)
        if tokens is not None:
            self.replace(tokens)

    def set(self, appkey, current, previous=None) -> None:
        """appkey signs with `current`; signatures made with `current` or
        `previous` (when given) are accepted.  Without `previous`, a changed
        current token keeps the old one accepted for rotation_grace_s."""
        self._set(_appkey(appkey), _token(current),
                  None if previous is None else _token(previous), au_now_ms())
        self.generation += 1

    cdef _set(self, bytes appkey, bytes current, bytes previous, int64_t now_ms):
        cdef _Accepted old = self.keys.get(appkey)
        cdef _Accepted e = _Accepted.__new__(_Accepted)
        e.current = hm_new(current)
        if previous is not None:
            e.previous = hm_new(previous)
        elif old is not None and memcmp(old.current.check, e.current.check, 32) != 0:
            e.previous = old.current
            e.previous_until_ms = now_ms + self.rotation_grace_ms
        elif old is not None and old.previous is not None and old.previous_until_ms:
            e.previous = old.previous    # unchanged: a running grace period goes on
            e.previous_until_ms = old.previous_until_ms
        self.keys[appkey] = e

    def remove(self, appkey) -> bool:
        """Forget appkey: it is no longer signed for nor verified.  True when known."""
        found = self.keys.pop(_appkey(appkey), None) is not None
        self.generation += 1
        return found

    def replace(self, tokens) -> None:
        """Make the store hold exactly `tokens`: appkey -> token, or a tuple
        (current, previous) (a token file's rotation window); the appkeys not
        in it are removed, and each changed token follows set()'s rule."""
        cdef int64_t now = au_now_ms()
        cdef dict items = {}
        for k, v in dict(tokens).items():
            if isinstance(v, tuple):
                if not 1 <= len(v) <= 2:
                    raise ValueError("a token entry is a token or (current, previous)")
                items[_appkey(k)] = (_token(v[0]), _token(v[1]) if len(v) == 2 else None)
            else:
                items[_appkey(k)] = (_token(v), None)
        for k in [k for k in self.keys if k not in items]:
            del self.keys[k]
        for k, (cur, prev) in items.items():
            self._set(k, cur, prev, now)
        self.generation += 1

    def appkeys(self) -> list:
        """The appkeys with a token (str), sorted."""
        return sorted(k.decode("utf-8", "replace") for k in self.keys)

    def rotating(self, appkey) -> bool:
        """Whether a previous token of appkey is still accepted."""
        cdef _Accepted e = self.keys.get(_appkey(appkey))
        return e is not None and e.previous is not None and (
            e.previous_until_ms == 0 or au_now_ms() < e.previous_until_ms)

    def __len__(self):
        return len(self.keys)

    def __contains__(self, appkey):
        return isinstance(appkey, (str, bytes)) and bool(appkey) and _appkey(appkey) in self.keys

    def __repr__(self):
        return f"TokenStore(<{len(self.keys)} appkeys>)"

    def __reduce__(self):
        raise TypeError("a TokenStore holds tokens: it is not serialised")


cdef TokenStore _store_of(tokens):
    """A TokenStore, or one made of a dict appkey -> token | (current, previous)."""
    if isinstance(tokens, TokenStore):
        return <TokenStore>tokens
    if isinstance(tokens, dict):
        return TokenStore(tokens, 0.0)
    raise TypeError("tokens: a TokenStore or a dict appkey -> token")


@cython.final
cdef class Verifier:
    """An inbound listener's authentication and ACL (docs/auth.md).  `tokens`:
    the proxy's TokenStore (or a dict, made into one); set_acl() changes the
    ACL at run time."""

    def __cinit__(self, bytes provider not None, bint enforce, int64_t skew_ms, tokens not None,
                  dict acl not None):
        self.provider = provider
        self.enforce = enforce
        self.skew_ms = skew_ms
        self.store = _store_of(tokens)
        self.acl = _acl(acl)
        self.answers = {}

    def set_acl(self, acl not None) -> None:
        """Replace the ACL (caller appkey -> None for every method, or the
        methods it may call), whole: the next request is checked against it."""
        self.acl = _acl(acl)
        self.last_caller = None
        self.m_ok = False

    def set_enforce(self, bint enforce) -> None:
        """enforce (True) or log-only (False), at run time."""
        self.enforce = enforce

    @property
    def tokens(self) -> TokenStore:
        return self.store

    def __repr__(self):
        return f"Verifier({self.provider!r}, {len(self.store)} tokens, {len(self.acl)} callers)"

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


cdef dict _acl(acl):
    cdef dict out = {}
    for k, v in dict(acl).items():
        out[_appkey(k)] = None if v is None else frozenset(
            m.encode() if isinstance(m, str) else bytes(m) for m in v)
    return out


cdef int _scan_whole(bytes frame, FrameInfo* fi) except -1:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(frame)
    if fr_scan(<const uint8_t*>PyBytes_AS_STRING(frame), n, n + 8, n, fi) != n:
        raise ValueError("not one whole valid frame")
    return 0


@cython.final
cdef class Signer:
    """The appkeys an outbound listener signs for (its apps), with the proxy's
    TokenStore (or a dict appkey -> token, made into one; then `sign_for`
    defaults to its appkeys).  set_sign_for() changes the appkeys at run time."""

    def __cinit__(self, tokens not None, sign_for=None):
        self.store = _store_of(tokens)
        if sign_for is None:
            if isinstance(tokens, TokenStore):
                raise TypeError("Signer(store, sign_for): the appkeys it signs for")
            sign_for = tokens.keys()
        self.sign_for = frozenset(_appkey(a) for a in sign_for)
        self.answers = {}

    def set_sign_for(self, appkeys) -> None:
        """The appkeys signed for, replaced whole (the listener's apps)."""
        self.sign_for = frozenset(_appkey(a) for a in appkeys)
        self.last_caller = None
        self.last_key = None

    @property
    def appkeys(self) -> list:
        return sorted(a.decode("utf-8", "replace") for a in self.sign_for)

    def __repr__(self):
        return f"Signer({self.appkeys!r})"

    def __reduce__(self):
        raise TypeError("a Signer holds tokens: it is not serialised")

    cdef _Hmac key_for(self, const uint8_t* caller, Py_ssize_t clen):
        """The current key of caller when this listener signs for it, else None."""
        cdef bytes last
        cdef _Accepted e
        if clen <= 0:
            return None
        if self.last_caller is not None and self.last_gen == self.store.generation \
                and PyBytes_GET_SIZE(self.last_caller) == clen \
                and memcmp(PyBytes_AS_STRING(self.last_caller), caller, clen) == 0:
            return self.last_key
        last = PyBytes_FromStringAndSize(<const char*>caller, clen)
        if last not in self.sign_for:
            return None
        e = self.store.keys.get(last)
        if e is None:
            return None
        self.last_caller = last
        self.last_key = e.current
        self.last_gen = self.store.generation
        return e.current


cdef object _NOT_LISTED = object()

# the last timestamp written (signing) and read (verifying), with its text
cdef int64_t _ts_s = -1
cdef char _ts_txt[24]
cdef Py_ssize_t _ts_len = 0
cdef int64_t _vts_s = 0
cdef char _vts_txt[16]
cdef Py_ssize_t _vts_len = 0


cdef void _ts_remember(int64_t s, const char* txt, Py_ssize_t n) noexcept nogil:
    global _ts_s, _ts_len
    memcpy(_ts_txt, txt, n)
    _ts_len = n
    _ts_s = s


cdef void _vts_remember(const char* txt, Py_ssize_t n, int64_t s) noexcept nogil:
    global _vts_s, _vts_len
    memcpy(_vts_txt, txt, n)
    _vts_len = n
    _vts_s = s


cdef inline bint _same_sig(const char* a, const uint8_t* b) noexcept nogil:
    """Constant time: every byte of both 22-byte signatures is read whatever
    they hold, no branch depends on them (OpenSSL's CRYPTO_memcmp reads a byte
    at a time through volatile pointers: 6% of a verifying proxy's CPU): three
    8-byte words at 0, 8 and 14 (the last two overlap)."""
    cdef uint64_t x, y, acc = 0
    memcpy(&x, a, 8)
    memcpy(&y, b, 8)
    acc |= x ^ y
    memcpy(&x, a + 8, 8)
    memcpy(&y, b + 8, 8)
    acc |= x ^ y
    memcpy(&x, a + AU_SIG_LEN - 8, 8)
    memcpy(&y, b + AU_SIG_LEN - 8, 8)
    acc |= x ^ y
    return _ct_zero(acc)


cdef inline bint _ct_zero(uint64_t acc) noexcept nogil:
    # acc | -acc has its top bit set exactly when acc != 0: no branch, no table
    return ((acc | (~acc + 1)) >> 63) == 0


cdef inline bint _sig_ok(_Hmac key, Verifier v, const uint8_t* p, const FrameInfo* fi,
                         Py_ssize_t moff, Py_ssize_t mlen) noexcept:
    cdef char mac[AU_SIG_LEN]
    return au_mac_sig(key, <const char*>p + fi.auth_app_off, fi.auth_app_len,
                      PyBytes_AS_STRING(v.provider), PyBytes_GET_SIZE(v.provider),
                      <const char*>p + fi.auth_ts_off, fi.auth_ts_len,
                      <const char*>p + moff, mlen, mac) == 0 \
        and _same_sig(mac, p + fi.auth_sig_off)


cdef bint _method_ok(Verifier v, frozenset methods, const uint8_t* m, Py_ssize_t n) except -1:
    """m in the caller's allowed methods; the last answer is kept (last caller's)."""
    cdef bytes last = v.last_method
    if last is not None and PyBytes_GET_SIZE(last) == n \
            and memcmp(PyBytes_AS_STRING(last), m, n) == 0:
        return v.last_method_ok
    last = PyBytes_FromStringAndSize(<const char*>m, n)
    v.last_method = last
    v.last_method_ok = last in methods
    return v.last_method_ok


cdef int au_verify(Verifier v, const uint8_t* p, FrameInfo* fi, int64_t now_ms,
                   Py_ssize_t* moff, Py_ssize_t* mlen) except -1:
    cdef int64_t ts = 0
    cdef Py_ssize_t i
    cdef bytes caller
    cdef _Accepted toks
    cdef object methods
    cdef int r
    cdef bint cur = False
    mlen[0] = 0
    moff[0] = fi_method(p, fi, mlen)     # read once per request (governance reads it too)
    if moff[0] < 0:
        moff[0] = 0
        mlen[0] = 0
    if v.m_ok and fi.auth_app_len == v.m_clen and fi.auth_ts_len == v.m_tlen \
            and mlen[0] == v.m_mlen and fi.auth_sig_len == AU_SIG_LEN \
            and v.m_gen == v.store.generation \
            and memcmp(p + fi.auth_ts_off, v.m_ts_txt, v.m_tlen) == 0 \
            and memcmp(p + fi.auth_app_off, v.m_caller, v.m_clen) == 0 \
            and memcmp(p + moff[0], v.m_m, v.m_mlen) == 0 \
            and v.m_ts * 1000 <= now_ms + v.skew_ms and v.m_ts * 1000 + 999 >= now_ms - v.skew_ms \
            and _same_sig(v.m_sig, p + fi.auth_sig_off):
        # the caller, timestamp and method of the last request that passed:
        # the same signature is due (compared in constant time), the same
        # ACL answer; the skew is checked as below.  Anything else takes the
        # whole path.
        v.n_ok += 1
        return AU_OK
    if fi.auth_app_len <= 0 or fi.auth_ts_len < 0 or fi.auth_sig_len < 0:
        r = AU_UNSIGNED
    else:
        caller = v.last_caller
        if caller is not None and v.last_gen == v.store.generation \
                and PyBytes_GET_SIZE(caller) == fi.auth_app_len \
                and memcmp(PyBytes_AS_STRING(caller), p + fi.auth_app_off, fi.auth_app_len) == 0:
            toks = v.last_acc               # the same caller as the last request
            methods = v.last_methods
        else:
            caller = PyBytes_FromStringAndSize(<const char*>p + fi.auth_app_off, fi.auth_app_len)
            toks = v.store.keys.get(caller)     # this request's entry, whatever changes after
            methods = v.acl.get(caller, _NOT_LISTED)
            if toks is not None:
                v.last_method = None
                v.last_caller = caller
                v.last_acc = toks
                v.last_methods = methods
                v.last_gen = v.store.generation
        if toks is None:
            # no token to authenticate it with: a caller the ACL does not name
            # would be refused whatever its token, so that is its answer (the
            # same whether the tokens come from a file or only the ACL's
            # callers' from the control plane); one it names lacks a token
            r = AU_NOT_ALLOWED if methods is _NOT_LISTED else AU_UNKNOWN_CALLER
        else:
            r = AU_OK
            if fi.auth_ts_len == 0 or fi.auth_ts_len > AU_TS_MAX:
                r = AU_EXPIRED
            elif fi.auth_ts_len == _vts_len \
                    and memcmp(p + fi.auth_ts_off, _vts_txt, _vts_len) == 0:
                ts = _vts_s         # the same text as the last request's: its value
            else:
                for i in range(fi.auth_ts_len):
                    if p[fi.auth_ts_off + i] < 48 or p[fi.auth_ts_off + i] > 57:
                        r = AU_EXPIRED
                        break
                    ts = ts * 10 + (p[fi.auth_ts_off + i] - 48)
                if r == AU_OK:
                    _vts_remember(<const char*>p + fi.auth_ts_off, fi.auth_ts_len, ts)
            # signed during second ts (ts.000 to ts.999): expired unless that
            # second overlaps [now - skew, now + skew]
            if r == AU_OK and (ts * 1000 > now_ms + v.skew_ms
                               or ts * 1000 + 999 < now_ms - v.skew_ms):
                r = AU_EXPIRED
            if r == AU_OK:
                # the current token, then (rotation window) the previous one
                r = AU_BAD_SIGNATURE
                if fi.auth_sig_len == AU_SIG_LEN:
                    if _sig_ok(toks.current, v, p, fi, moff[0], mlen[0]):
                        r = AU_OK
                        cur = True
                    elif toks.previous is not None and (
                            toks.previous_until_ms == 0 or now_ms < toks.previous_until_ms) \
                            and _sig_ok(toks.previous, v, p, fi, moff[0], mlen[0]):
                        r = AU_OK
            if r == AU_OK:
                if methods is _NOT_LISTED:
                    r = AU_NOT_ALLOWED
                elif methods is not None and not _method_ok(v, methods, p + moff[0], mlen[0]):
                    r = AU_METHOD
    if r == AU_OK:
        v.n_ok += 1
        if cur and fi.auth_app_len <= AU_MEMO_MAX and mlen[0] <= AU_MEMO_MAX:
            _memo_verified(v, p, fi, moff[0], mlen[0], ts)
    else:
        v.n_failed[r] += 1
    return r


cdef void _memo_verified(Verifier v, const uint8_t* p, const FrameInfo* fi, Py_ssize_t moff,
                         Py_ssize_t mlen, int64_t ts) noexcept:
    # the request passed with the caller's current token: its signature is
    # what the next request with the same caller, timestamp and method needs
    v.m_ok = True
    v.m_gen = v.store.generation
    v.m_ts = ts
    v.m_clen = fi.auth_app_len
    v.m_tlen = fi.auth_ts_len
    v.m_mlen = mlen
    memcpy(v.m_caller, p + fi.auth_app_off, fi.auth_app_len)
    memcpy(v.m_ts_txt, p + fi.auth_ts_off, fi.auth_ts_len)
    memcpy(v.m_m, p + moff, mlen)
    memcpy(v.m_sig, p + fi.auth_sig_off, AU_SIG_LEN)


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
    # one string pair: "octo-auth", caller ":" ts (at most AU_TS_MAX digits) ":" sig
    cdef Py_ssize_t clen = fi.caller_len if fi.caller_len > 0 else 0
    cdef Py_ssize_t n = 4 + 9 + 4 + clen + 1 + AU_TS_MAX + 1 + AU_SIG_LEN
    if fi.lctx_off < 0:
        n += 3 + 6    # field header (map, id 6) and map header
    return n


cdef inline bint _sign_memo_hit(_Hmac key, int64_t ts_s, const char* provider, Py_ssize_t plen,
                                const char* method, Py_ssize_t mlen) noexcept nogil:
    return key.s_elen > 0 and ts_s == key.s_ts and plen == key.s_plen and mlen == key.s_mlen \
        and memcmp(method, key.s_m, mlen) == 0 and memcmp(provider, key.s_prov, plen) == 0


cdef Py_ssize_t _sign_entry(char* d, _Hmac key, const char* caller, Py_ssize_t clen,
                            const char* provider, Py_ssize_t plen, int64_t ts_s,
                            const char* method, Py_ssize_t mlen) noexcept:
    """Write the octo-auth entry (key and value, string pairs) at d: its length,
    or -1.  Kept in key's memo when it fits (the caller is key's appkey)."""
    cdef char ts[24]
    cdef char mac[AU_SIG_LEN]
    cdef Py_ssize_t tlen = 0, vlen, elen
    cdef int64_t t = ts_s if ts_s > 0 else 0
    # the timestamp, decimal (the last one's text again while the second is
    # the same: requests come far more often)
    if t == _ts_s and _ts_len:
        tlen = _ts_len
        memcpy(ts, _ts_txt, tlen)
    else:
        while True:
            ts[23 - tlen] = <char>(48 + t % 10)
            tlen += 1
            t //= 10
            if t == 0:
                break
        if tlen > AU_TS_MAX:
            return -1
        memcpy(ts, ts + 24 - tlen, tlen)
        _ts_remember(ts_s if ts_s > 0 else 0, ts, tlen)
    if au_mac_sig(key, caller, clen, provider, plen, ts, tlen, method, mlen, mac) != 0:
        return -1
    vlen = clen + 1 + tlen + 1 + AU_SIG_LEN
    elen = 4 + 9 + 4 + vlen
    wr_str(d, b"octo-auth", 9)
    wr_u32(d + 13, <uint32_t>vlen)
    memcpy(d + 17, caller, clen)
    d[17 + clen] = b':'
    memcpy(d + 18 + clen, ts, tlen)
    d[18 + clen + tlen] = b':'
    memcpy(d + 19 + clen + tlen, mac, AU_SIG_LEN)
    key.s_elen = 0
    if ts_s > 0 and plen <= AU_MEMO_MAX and mlen <= AU_MEMO_MAX and elen <= AU_ENTRY_MAX:
        key.s_ts = ts_s
        key.s_plen = plen
        key.s_mlen = mlen
        memcpy(key.s_prov, provider, plen)
        memcpy(key.s_m, method, mlen)
        memcpy(key.s_entry, d, elen)
        key.s_elen = elen
    return elen


cdef Py_ssize_t au_sign_into(char* dst, const uint8_t* p, FrameInfo* fi, _Hmac key,
                             const char* provider, Py_ssize_t plen, int64_t ts_s) noexcept:
    cdef Py_ssize_t at, extra, hl, elen
    cdef Py_ssize_t moff, mlen = 0
    cdef const char* src = <const char*>p
    cdef char* d
    cdef bint trailer = (fi.flags & FF_CHECKSUM) != 0
    moff = fi_method(p, fi, &mlen)       # read once per request (routing read it already)
    if moff < 0:
        moff = 0
        mlen = 0
    if fi.lctx_off < 0:
        at = fi.header_off + fi.header_len - 1      # before the Header's stop byte
    else:
        at = fi.lctx_end
    d = dst + at + (9 if fi.lctx_off < 0 else 0)
    if _sign_memo_hit(key, ts_s, provider, plen, src + moff, mlen):
        # the same second, provider and method as the last request signed
        # with this key (whose appkey is the caller): the same entry
        elen = key.s_elen
        memcpy(d, key.s_entry, elen)
    else:
        elen = _sign_entry(d, key, src + fi.caller_off, fi.caller_len, provider, plen, ts_s,
                           src + moff, mlen)
        if elen < 0:
            return -1
    extra = elen + (9 if fi.lctx_off < 0 else 0)
    hl = fi.header_len + extra
    if hl > 0xFFFF:
        return -1
    memcpy(dst, src, at)
    if fi.lctx_off < 0:
        d = dst + at
        d[0] = 13             # T_MAP, field 6 (localContext)
        d[1] = 0
        d[2] = 6
        d[3] = 11             # string -> string, 1 entry
        d[4] = 11
        wr_u32(d + 5, 1)
    else:
        dst[fi.lctx_off] = 11
        dst[fi.lctx_off + 1] = 11
        wr_u32(dst + fi.lctx_off + 2, rd_u32(src + fi.lctx_off + 2) + 1)
    memcpy(dst + at + extra, src + at, fi.length - at)
    wr_u32(dst + 4, rd_u32(src + 4) + <uint32_t>extra)     # total length
    dst[8] = <char>(hl >> 8)
    dst[9] = <char>hl
    if trailer:
        wr_u32(dst + fi.length + extra - 4,
               fr_adler32(<const uint8_t*>dst, fi.length + extra - 4))
    return fi.length + extra


KEY = "octo-auth"


def sign(token, caller, provider, ts, method=b"") -> str:
    """The signature part of octo-auth (docs/protocol.md 7.6): base64url, no
    padding, of the first 16 bytes of HMAC-SHA256(token, caller|provider|ts|
    method), ts the decimal text of the timestamp (seconds); for tests."""
    cdef char out[AU_SIG_LEN]
    cdef bytes t = bytes(token), c = bytes(caller), pv = bytes(provider), m = bytes(method)
    cdef bytes s = str(ts).encode()
    if au_mac_sig(hm_new(_token(t)), c, len(c), pv, len(pv), s, len(s), m, len(m), out) != 0:
        raise MemoryError()
    return out[:AU_SIG_LEN].decode()


def context(token, caller, provider, ts, method=b"") -> dict:
    """{"octo-auth": caller:ts:signature}, the localContext entry of a request
    signed as docs/protocol.md 7.6 says (tests; caller, provider and method as
    bytes or str)."""
    def b(x):
        return x.encode() if isinstance(x, str) else bytes(x)
    c = b(caller)
    return {KEY: f"{c.decode()}:{ts}:{sign(b(token), c, b(provider), ts, b(method))}"}


def sign_frame(bytes frame not None, token, provider, int64_t ts=0) -> bytes:
    """The signed copy of a whole OCTO request frame, as the outbound path
    writes it (tests): its caller is traceInfo.clientAppkey; ts: the
    timestamp (seconds since the epoch), 0: now."""
    cdef FrameInfo fi
    _scan_whole(frame, &fi)
    cdef bytes pv = bytes(provider)
    cdef Py_ssize_t n = fi.length + au_sign_extra(&fi)
    cdef char* buf = <char*>malloc(n)
    if buf == NULL:
        raise MemoryError()
    try:
        n = au_sign_into(buf, <const uint8_t*>PyBytes_AS_STRING(frame), &fi, hm_new(_token(token)),
                         pv, len(pv), ts or au_now_s())
        if n < 0:
            raise ValueError("the signed header would exceed 65535 bytes")
        return PyBytes_FromStringAndSize(buf, n)
    finally:
        free(buf)


def bench_verify(Verifier v not None, tuple frames not None, int n, int64_t now_ms=0) -> int:
    """au_verify of whole signed frames, n times in C in turn (bench/micro):
    how many passed.  Two frames that differ in their message never reuse the
    key's remembered MAC: every verify computes one."""
    cdef FrameInfo fi[2]
    cdef const uint8_t* p[2]
    cdef Py_ssize_t moff = 0, mlen = 0
    cdef int i, k = len(frames), ok = 0
    if not 1 <= k <= 2:
        raise ValueError("one or two frames")
    for i in range(k):
        _scan_whole(frames[i], &fi[i])
        p[i] = <const uint8_t*>PyBytes_AS_STRING(frames[i])
    if now_ms == 0:
        now_ms = au_now_ms()
    for i in range(n):
        ok += au_verify(v, p[i % k], &fi[i % k], now_ms, &moff, &mlen) == AU_OK
    return ok


def bench_sign(bytes frame not None, token, provider, int n, bint distinct=False) -> int:
    """au_sign_into of one whole request frame, n times in C (bench/micro), with
    the key prepared once as the data path does: the signed length.  distinct:
    the timestamp alternates, so that every signature computes a MAC."""
    cdef FrameInfo fi
    cdef bytes pv = bytes(provider)
    cdef _Hmac key = hm_new(_token(token))
    cdef Py_ssize_t r = 0
    cdef int i
    _scan_whole(frame, &fi)
    cdef char* buf = <char*>malloc(fi.length + au_sign_extra(&fi))
    if buf == NULL:
        raise MemoryError()
    cdef int64_t now = au_now_s()
    for i in range(n):
        r = au_sign_into(buf, <const uint8_t*>PyBytes_AS_STRING(frame), &fi, key, pv, len(pv),
                         now + (i & 1 if distinct else 0))
    free(buf)
    return r
