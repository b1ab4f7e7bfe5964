# Service authentication in the data path (docs/auth.md): HMAC-SHA256
# request signatures (OpenSSL libcrypto), checked and written in C.
# Implementation: auth.pyx.

from libc.stdint cimport int64_t, uint8_t

from octoproxy._core.frame cimport FrameInfo


cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_MD_CTX:
        pass

cdef enum:
    # au_verify results; AU_REASONS sizes the per-reason counters
    AU_OK = 0
    AU_UNSIGNED = 1        # no octo-auth (or not caller:timestamp:signature)
    AU_UNKNOWN_CALLER = 2  # no token for the claimed caller, whom the ACL names
    AU_BAD_SIGNATURE = 3
    AU_EXPIRED = 4         # timestamp outside the allowed skew (or unreadable)
    AU_NOT_ALLOWED = 5     # caller not in the provider's ACL (token or not)
    AU_METHOD = 6          # caller in the ACL, but not for this method
    AU_REASONS = 7
    AU_MAC_LEN = 16        # the signature's bytes: HMAC-SHA256 truncated to 128 bits
    AU_SIG_LEN = 22        # its text: base64url of AU_MAC_LEN bytes, no padding
    AU_TS_MAX = 12         # most timestamp digits (seconds since the epoch)
    HM_LAST_MAX = 240      # longest message whose MAC a key remembers
    AU_MEMO_MAX = 64       # longest appkey / method a signer's or verifier's memo keeps
    AU_ENTRY_MAX = 128     # longest octo-auth entry (key and value) a key's memo keeps


# One token's HMAC-SHA256 state, precomputed: SHA-256 after the key's inner
# and outer pad blocks (copied per MAC); `check`: its MAC of a fixed text.
# The last message MAC'd under it and the signature's text: requests within
# the same second from one caller for one method share it (signing and
# verifying).
cdef class _Hmac:
    cdef EVP_MD_CTX* inner
    cdef EVP_MD_CTX* outer
    cdef unsigned char check[32]
    cdef Py_ssize_t last_len            # 0: none
    cdef char last_msg[HM_LAST_MAX]
    cdef char last_mac[AU_SIG_LEN]
    # signing: the last octo-auth entry written, by timestamp, provider and
    # method (the caller is the key's appkey), so that the next request of
    # the same second to the same provider and method copies it (au_sign_into)
    cdef Py_ssize_t s_elen              # 0: none
    cdef int64_t s_ts
    cdef Py_ssize_t s_plen
    cdef Py_ssize_t s_mlen
    cdef char s_prov[AU_MEMO_MAX]
    cdef char s_m[AU_MEMO_MAX]
    cdef char s_entry[AU_ENTRY_MAX]


# One appkey's accepted tokens; replaced whole on a change, never modified.
cdef class _Accepted:
    cdef _Hmac current                  # signs; accepted
    cdef _Hmac previous                 # accepted during a rotation, or None
    cdef int64_t previous_until_ms      # 0: as long as this entry


# The proxy's tokens by appkey (bytes -> _Accepted), changed at run time.
cdef class TokenStore:
    cdef dict keys
    cdef readonly int64_t rotation_grace_ms
    cdef readonly long long generation  # + 1 per change (the Signers' lookup cache)

    cdef _set(self, bytes appkey, bytes current, bytes previous, int64_t now_ms)


# One inbound listener's checks: the provider it serves, its callers' tokens and ACL.
cdef class Verifier:
    cdef readonly bytes provider
    cdef readonly bint enforce          # False: log-only (count, log, forward)
    cdef readonly int64_t skew_ms
    cdef TokenStore store               # the callers' tokens
    cdef dict acl                       # caller appkey -> None (all methods) | frozenset of methods
    cdef public dict answers            # the data path's pre-encoded refusals (bounded)
    cdef long long n_ok
    cdef long long n_failed[AU_REASONS]
    cdef long long n_logged             # log-only: failures forwarded
    cdef bytes last_caller              # the last caller known: its entry and ACL (store generation)
    cdef _Accepted last_acc
    cdef object last_methods
    cdef bytes last_method              # and the last method checked against them, and the answer
    cdef bint last_method_ok
    cdef long long last_gen
    # the last request that passed with the caller's current token: its
    # caller, timestamp text and method, and the signature they call for
    # (au_verify's first test; cleared by an ACL change, stale with the store)
    cdef bint m_ok
    cdef long long m_gen
    cdef int64_t m_ts
    cdef Py_ssize_t m_clen
    cdef Py_ssize_t m_tlen
    cdef Py_ssize_t m_mlen
    cdef char m_caller[AU_MEMO_MAX]
    cdef char m_ts_txt[AU_TS_MAX]
    cdef char m_m[AU_MEMO_MAX]
    cdef char m_sig[AU_SIG_LEN]


# One outbound listener's signing: the appkeys of the apps that use it.
cdef class Signer:
    cdef TokenStore store
    cdef frozenset sign_for             # appkeys (bytes)
    cdef public dict answers            # the data path's pre-encoded refusals (bounded)
    cdef bytes last_caller              # the last caller looked up, its key, the store's generation
    cdef _Hmac last_key
    cdef long long last_gen
    cdef readonly long long n_signed
    cdef readonly long long n_refused

    cdef _Hmac key_for(self, const uint8_t* caller, Py_ssize_t clen)


cdef int64_t au_now_ms() noexcept nogil
cdef int64_t au_now_s() noexcept nogil

# Check the request p/fi against v; *moff/*mlen: its method name (body's
# Thrift message; mlen 0 when none).  AU_OK or an AU_* reason; counts it.
cdef int au_verify(Verifier v, const uint8_t* p, FrameInfo* fi, int64_t now_ms,
                   Py_ssize_t* moff, Py_ssize_t* mlen) except -1

# Bytes the signed copy of p/fi adds (caller: fi.caller_*).
cdef Py_ssize_t au_sign_extra(const FrameInfo* fi) noexcept nogil

# Write the signed copy of the OCTO frame p/fi (length fi.length) at dst (room
# for fi.length + au_sign_extra(fi)): the octo-auth entry, timestamp ts_s
# (seconds), appended to its localContext, lengths and checksum fixed.
# Returns the new length, or -1 when the header would outgrow its 16-bit
# length.
cdef Py_ssize_t au_sign_into(char* dst, const uint8_t* p, FrameInfo* fi, _Hmac key,
                             const char* provider, Py_ssize_t plen, int64_t ts_s) noexcept
