# Service authentication in the data path (docs/auth.md): HMAC-SHA256
# request signatures (OpenSSL libcrypto), checked and written in C.
# Implementation: auth.pyx.

from libc.stdint cimport int64_t, uint8_t

from octoproxy._core.frame cimport FrameInfo

cdef enum:
    # au_verify results; AU_REASONS sizes the per-reason counters
    AU_OK = 0
    AU_UNSIGNED = 1        # no octo-auth-appkey / -ts / -sig
    AU_UNKNOWN_CALLER = 2  # no token for the claimed caller
    AU_BAD_SIGNATURE = 3
    AU_EXPIRED = 4         # timestamp outside the allowed skew (or unreadable)
    AU_NOT_ALLOWED = 5     # caller not in the provider's ACL
    AU_METHOD = 6          # caller in the ACL, but not for this method
    AU_REASONS = 7
    AU_SIG_HEX = 64        # octo-auth-sig: lowercase hex of the 32-byte MAC


# One inbound listener's checks: the provider it serves, its callers' tokens and ACL.
cdef class Verifier:
    cdef readonly bytes provider
    cdef readonly bint enforce          # False: log-only (count, log, forward)
    cdef readonly int64_t skew_ms
    cdef dict tokens                    # caller appkey (bytes) -> (current token, [previous])
    cdef dict acl                       # caller appkey -> None (all methods) | frozenset of methods
    cdef public dict answers            # the data path's pre-encoded refusals (bounded)
    cdef long long n_ok
    cdef long long n_failed[AU_REASONS]
    cdef long long n_logged             # log-only: failures forwarded


# One outbound listener's signing keys: the appkeys of the apps that use it.
cdef class Signer:
    cdef dict tokens                    # appkey (bytes) -> token (bytes)
    cdef public dict answers            # the data path's pre-encoded refusals (bounded)
    cdef bytes last_caller              # the last caller looked up, and its token
    cdef bytes last_token
    cdef readonly long long n_signed
    cdef readonly long long n_refused

    cdef bytes token_for(self, const uint8_t* caller, Py_ssize_t clen)


cdef int64_t au_now_ms() noexcept nogil

# Check the request p/fi against v; *moff/*mlen: its method name (body's
# Thrift message; mlen 0 when none).  AU_OK or an AU_* reason; counts it.
cdef int au_verify(Verifier v, const uint8_t* p, const FrameInfo* fi, int64_t now_ms,
                   Py_ssize_t* moff, Py_ssize_t* mlen) except -1

# Bytes the signed copy of p/fi adds (caller: fi.caller_*).
cdef Py_ssize_t au_sign_extra(const FrameInfo* fi) noexcept nogil

# Write the signed copy of the OCTO frame p/fi (length fi.length) at dst (room
# for fi.length + au_sign_extra(fi)): the octo-auth-* entries appended to its
# localContext, lengths and checksum fixed.  Returns the new length, or -1
# when the header would outgrow its 16-bit length.
cdef Py_ssize_t au_sign_into(char* dst, const uint8_t* p, const FrameInfo* fi, bytes token,
                             const char* provider, Py_ssize_t plen, int64_t now_ms) noexcept
