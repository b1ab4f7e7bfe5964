# OCTO frame codec: the C-level contract used by the data path (datapath.pyx).
# Implementation: frame.pyx.  Signatures below are the seam; add fields/functions
# freely, but do not change these without updating datapath.pyx.

from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t, uint8_t, uintptr_t

cdef enum:
    # what kind of frame fr_scan found
    FK_OCTO = 1          # OCTO unified-protocol frame (magic 0xABBA)
    FK_THRIFT = 2        # native Thrift framed transport (i32 length + TBinary message)

    # FrameInfo.flags
    FF_CHECKSUM = 1      # a 4-byte Adler-32 trails the frame (verified by fr_scan)
    FF_GZIP = 2          # header+body gzip-compressed: header fields NOT decoded
    FF_SNAPPY = 4        # header+body snappy-compressed: header fields NOT decoded
    FF_REQUEST = 8       # Header.requestInfo present
    FF_RESPONSE = 16     # Header.responseInfo present
    FF_PROXY_RESTART = 32   # localContext octo-proxy-restart == "1"
    FF_PROXY_ANNOUNCE = 64  # localContext octo-proxy == "1"
    FF_RESTART_NOTICE = 128  # localContext octo-restart-notice == "1" (an app asks for ProxyRestart)

    # fr_scan errors (negative return values); fr_strerror() names them
    FE_NEED_MORE = 0           # not an error: incomplete frame
    FE_BAD_MAGIC = -1          # neither OCTO magic nor plausible Thrift framing
    FE_TOO_LARGE = -2          # total length over the configured maximum
    FE_BAD_LENGTH = -3         # total_length/header_length inconsistent
    FE_HEADER_TOO_LARGE = -4
    FE_BAD_HEADER = -5         # malformed Thrift in the header (overlong/negative length, ...)
    FE_BAD_FIELD_TYPE = -6     # a known Header field with the wrong Thrift type
    FE_TOO_DEEP = -7           # nesting in unknown fields over the limit
    FE_BAD_CHECKSUM = -8
    FE_BAD_THRIFT = -9         # malformed native Thrift framed message

# The context keys a caller looks up together (traffic shunting: every key
# a service's rules read), for fr_context_many.  Fill n, keys, klens, then
# call fr_ctx_keys_init (it sets the rest).
cdef enum:
    FR_CTX_KEYS = 32           # keys looked up together, at most
    FR_WANT = 16               # keys fr_scan_want picks out while scanning, at most
cdef struct FrCtxEnt:
    # one wanted key, as fr_context_many compares it (one cache line):
    # entry bytes 0-8 under hmask == head (the big-endian key length and up to
    # 4 key bytes), the 8 entry bytes at toff under tmask == tail (those that
    # end with the key; tmask 0 for a key of up to 4 bytes), and for a key
    # longer than 12 bytes (mid > 0) key bytes 4 .. 4 + mid at entry byte 8
    uint64_t head
    uint64_t hmask
    uint64_t tail
    uint64_t tmask
    Py_ssize_t toff
    const char* mid_key             # w.keys[k] + 4
    Py_ssize_t mid
    uint8_t next                    # 1 + the next key in the same bucket, 0: the end
cdef struct FrCtxKeys:
    Py_ssize_t n
    const char* keys[32]       # FR_CTX_KEYS
    Py_ssize_t klens[32]
    uint8_t first[64]          # by key length mod 64: 1 + the first key of that bucket, 0: none
    FrCtxEnt ent[32]

# Everything fr_scan learns about one frame.  Offsets are relative to the start
# of the frame; a string is (off, len) with len == -1 when the field is absent.
cdef struct FrameInfo:
    int kind                  # FK_*
    int flags                 # FF_*
    int version               # byte 2 of an OCTO frame
    int protocol              # byte 3 of an OCTO frame
    int msg_type              # MT_*; -1 if absent
    Py_ssize_t length         # whole frame in bytes (what fr_scan returned)
    Py_ssize_t header_off     # OCTO: offset of the Thrift Header struct
    Py_ssize_t header_len
    Py_ssize_t body_off       # OCTO: offset of the body
    Py_ssize_t body_len
    int64_t seq_id            # RequestInfo.sequenceId or ResponseInfo.sequenceId (Thrift: i32 seqid)
    Py_ssize_t seq_off        # offset of the seq id bytes (8 for OCTO, 4 for Thrift); -1 if absent
    int call_type             # RequestInfo.callType; 0 if absent
    int32_t timeout           # RequestInfo.timeout in ms; -1 if absent
    int status                # ResponseInfo.status; -1 if absent
    Py_ssize_t service_off    # RequestInfo.serviceName (Thrift: method name)
    Py_ssize_t service_len
    Py_ssize_t appkey_off     # localContext  octo-remote-appkey
    Py_ssize_t appkey_len
    Py_ssize_t liteset_off    # globalContext octo-liteset
    Py_ssize_t liteset_len
    Py_ssize_t set_off        # globalContext octo-set
    Py_ssize_t set_len
    Py_ssize_t swimlane_off   # globalContext octo-swimlane
    Py_ssize_t swimlane_len
    Py_ssize_t hashkey_off    # localContext  octo-hash-key
    Py_ssize_t hashkey_len
    # --- added by frame.pyx (appended; fields above unchanged) ---
    Py_ssize_t message_off    # ResponseInfo.message
    Py_ssize_t message_len
    Py_ssize_t caller_off     # traceInfo.clientAppkey (heartbeats: heartbeatInfo.appkey)
    Py_ssize_t caller_len
    Py_ssize_t gctx_len       # bytes of the globalContext map's encoding (0 if absent)
    Py_ssize_t lctx_len       # bytes of the localContext map's encoding (0 if absent)
    # service authentication (docs/protocol.md 7.6): localContext octo-auth
    # = caller ":" timestamp ":" signature, split at its last two colons
    # (-1: no octo-auth, or one without two colons and a caller), and where
    # localContext's map header (6 bytes) starts and its entries end
    Py_ssize_t auth_app_off   # the caller appkey
    Py_ssize_t auth_app_len
    Py_ssize_t auth_ts_off    # the timestamp
    Py_ssize_t auth_ts_len
    Py_ssize_t auth_sig_off   # the signature
    Py_ssize_t auth_sig_len
    Py_ssize_t lctx_off       # -1: no localContext
    Py_ssize_t lctx_end
    # the same for globalContext (traffic shunting reads any context key)
    Py_ssize_t gctx_off       # -1: no globalContext
    Py_ssize_t gctx_end
    # the request's method name, parsed once per request (fi_method below):
    # FM_UNREAD until then; -1 when the body is not a readable Thrift message
    Py_ssize_t method_off
    Py_ssize_t method_len
    # context keys picked out while scanning (fr_scan_want; traffic shunting):
    # want: the keys (a const FrCtxKeys* as an integer, so that the struct
    # still converts to a dict; 0: none), and per map the keys found (bit k
    # for want.keys[k]) with their values' offsets and lengths; the last map
    # and its last entry win, as in fr_context_many
    uintptr_t want
    uint32_t wfound_g
    uint32_t wfound_l
    int32_t woff_g[16]         # FR_WANT
    int32_t wlen_g[16]
    int32_t woff_l[16]
    int32_t wlen_l[16]

# Message types, status codes and call types: constants.pxd.
cdef enum:
    FR_MAX_DEPTH = 32          # deepest struct/map/set/list nesting accepted in a header
    FM_UNREAD = -2             # FrameInfo.method_off before fi_method has read the method
    AUTH_SIG_CHARS = 22        # octo-auth's signature: base64url of 16 bytes, no padding

# Scan one frame at buf[0:n].  Returns the frame's length (> 0) and fills *fi
# when a whole frame is there; 0 (FE_NEED_MORE) when more bytes are needed; a
# negative FE_* code when the bytes can never become a valid frame.  Never
# reads outside buf[0:n], never raises, never allocates.
cdef Py_ssize_t fr_scan(const uint8_t* buf, Py_ssize_t n, Py_ssize_t max_frame,
                        Py_ssize_t max_header, FrameInfo* fi) noexcept nogil

# The same, also picking out the context keys of `want` (at most FR_WANT;
# NULL: none) in the scan's own pass over the maps: fi.want, wfound_*,
# woff_*/wlen_* (a second walk, fr_context_many, is then not needed).
cdef Py_ssize_t fr_scan_want(const uint8_t* buf, Py_ssize_t n, Py_ssize_t max_frame,
                             Py_ssize_t max_header, FrameInfo* fi,
                             const FrCtxKeys* want) noexcept nogil

# Decode only the header of the OCTO frame at buf[0:n] (prefix + header
# present; body, total_length and checksum unchecked), e.g. to answer a frame
# too large to buffer.  Returns 10 + header_length, FE_NEED_MORE or FE_*;
# fi.length is the length the frame claims, fi.body_len is 0.
cdef Py_ssize_t fr_scan_header(const uint8_t* buf, Py_ssize_t n, Py_ssize_t max_header,
                               FrameInfo* fi) noexcept nogil

# Rewrite the sequence id of the frame at `frame` in place (and the trailing
# checksum when FF_CHECKSUM is set).  fi must come from fr_scan on these bytes.
cdef void fr_set_seq_id(uint8_t* frame, const FrameInfo* fi, int64_t seq_id) noexcept nogil

# The method name of a request, without creating a Python object: for native
# Thrift the message name (fi.service_*); for an OCTO frame the name in the
# body's Thrift message header (TBinaryProtocol strict or old non-strict, or
# TCompactProtocol).  Returns the name's offset in `frame` and sets *name_len,
# or returns -1 when the body is not a readable Thrift message (compressed
# frames, empty or foreign bodies).  Reads at most the first bytes of the body.
cdef Py_ssize_t fr_method(const uint8_t* frame, const FrameInfo* fi,
                          Py_ssize_t* name_len) noexcept nogil

# A context value by key, without creating a Python object: localContext[key]
# if present, else globalContext[key] (docs/shunting.md).  Returns the value's
# offset in `frame` and sets *vlen, or -1 when neither map has the key.  fi
# must come from fr_scan on these bytes (the maps were checked there).
cdef Py_ssize_t fr_context_get(const uint8_t* frame, const FrameInfo* fi, const char* key,
                               Py_ssize_t klen, Py_ssize_t* vlen) noexcept nogil
# The copy of request p/fi at dst with globalContext[key] = val, the value of
# key's last globalContext entry (voff/old_len; voff < 0: none) replaced in
# place, else an entry appended (the map added when absent); lengths and
# checksum fixed.  dst: fi.length + FR_GCTX_PUT_EXTRA + klen + vlen bytes.
# Returns the copy's length, or -1 (its header would exceed 65535 bytes).
cdef enum:
    FR_GCTX_PUT_EXTRA = 17     # field header, map header, the entry's two lengths
cdef Py_ssize_t fr_gctx_put(char* dst, const uint8_t* p, const FrameInfo* fi, const char* key,
                            Py_ssize_t klen, Py_ssize_t voff, Py_ssize_t old_len,
                            const char* val, Py_ssize_t vlen) noexcept nogil
# What fr_scan would find in that copy (the same arguments but val), derived
# from fi without reading it: at *lfi.  Returns the copy's length, or -1.
cdef Py_ssize_t fr_gctx_put_fi(FrameInfo* lfi, const FrameInfo* fi, const char* key,
                               Py_ssize_t klen, Py_ssize_t voff, Py_ssize_t old_len,
                               Py_ssize_t vlen) noexcept nogil
# fr_method, read once per frame and kept in fi.method_off/method_len: every
# per-request consumer (governance rules and retries, auth, traffic shunting)
# calls this, so the body's message header is parsed at most once.
cdef inline Py_ssize_t fi_method(const uint8_t* frame, FrameInfo* fi,
                                 Py_ssize_t* name_len) noexcept nogil:
    cdef const uint8_t* b
    cdef uint32_t k
    if fi.method_off == FM_UNREAD:
        b = frame + fi.body_off
        if (fi.kind == FK_OCTO and not (fi.flags & (FF_GZIP | FF_SNAPPY)) and fi.body_len >= 12
                and b[0] == 0x80 and b[1] == 0x01 and 1 <= b[3] <= 4):
            # the usual strict TBinaryProtocol call, read here (fr_method
            # reads this and every other form the same way)
            k = (<uint32_t>b[4] << 24) | (<uint32_t>b[5] << 16) | (<uint32_t>b[6] << 8) | b[7]
            if k <= <uint32_t>(fi.body_len - 12):
                fi.method_off = fi.body_off + 8
                fi.method_len = k
            else:
                fi.method_off = -1
        else:
            fi.method_off = fr_method(frame, fi, &fi.method_len)
        if fi.method_off < 0:
            fi.method_len = -1
    name_len[0] = fi.method_len
    return fi.method_off

cdef void fr_ctx_keys_init(FrCtxKeys* w) noexcept nogil

# The same as fr_context_get for the keys of `w` in one pass over both maps:
# returns the keys found (bit k for w.keys[k]), with offs[k]/lens[k] set for
# those only.  fi must come from fr_scan over these same bytes (the maps'
# entries are known to fit).
cdef uint64_t fr_context_many(const uint8_t* frame, const FrameInfo* fi, const FrCtxKeys* w,
                              Py_ssize_t* offs, Py_ssize_t* lens) noexcept nogil

# The same over a bare Thrift message at body[0:n]: the name's offset in body.
cdef Py_ssize_t fr_thrift_method(const uint8_t* body, Py_ssize_t n,
                                 Py_ssize_t* name_len) noexcept nogil

# A static, human-readable description of an FE_* code.
cdef const char* fr_strerror(Py_ssize_t code) noexcept nogil

# Encoders for the frames the proxy sends on its own (not on the hot path).
cdef bytes fr_error_response(int64_t seq_id, int status, str message, bint restart, int protocol)
# The proxy's own error answer as Dorado providers write one: for a
# thrift-serialized request (method not None) the body is a Thrift EXCEPTION
# message (method, body_seq, TApplicationException{message}); the protocol
# byte keeps the request's serialization and checksum bits (docs/protocol.md).
cdef bytes fr_error_answer(int64_t seq_id, int status, str message, bint restart, int protocol,
                           object method, int32_t body_seq)
# For an error answer (docs/protocol.md 11): when the request's body is
# a strict TBinaryProtocol message (serialization 1, uncompressed), the offset
# of its method name in `frame` (*name_len its length, *body_seq its seqid);
# else -1.  No Python object, reads at most the first bytes of the body; the
# method is read through fi_method (once per request, kept in fi).
cdef Py_ssize_t fr_error_call(const uint8_t* frame, FrameInfo* fi, Py_ssize_t* name_len,
                              int32_t* body_seq) noexcept nogil
# The same as a Python bytes object (None when there is none).
cdef object fr_error_method(const uint8_t* frame, FrameInfo* fi, int32_t* body_seq)
cdef bytes fr_heartbeat_response(int64_t seq_id, int protocol)
# The answer to a heartbeat request of either kind: NormalHeartbeat (1)
# -> messageType 1; ScannerHeartbeat (2) -> messageType 2 with
# heartbeatInfo{sendTime (ms), status 2 ALIVE} as Dorado providers answer.
cdef bytes fr_heartbeat_answer(int64_t seq_id, int msg_type, int protocol)
cdef bytes fr_proxy_restart()
cdef bytes fr_proxy_announce(int64_t seq_id)

# Adler-32 of p[0:n] (the OCTO trailer checksum).
cdef uint32_t fr_adler32(const uint8_t* p, Py_ssize_t n) noexcept nogil

# A scanned frame as a Python object (SDK/tests); a copy of its bytes.
cdef class Frame:
    cdef FrameInfo fi          # what fr_scan filled in
    cdef Py_ssize_t offset     # where the frame started in the scanned buffer
    cdef bytes data            # the frame's bytes (copied once, for the str properties)

    @staticmethod
    cdef Frame fr_new(const uint8_t* frame, const FrameInfo* fi, Py_ssize_t offset)
