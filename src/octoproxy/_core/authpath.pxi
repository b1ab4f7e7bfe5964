# ---------------------------------------------------------------- authentication
#
# Service authentication on the data path (docs/auth.md): the outbound side
# signs for the apps of its listener (auth.pyx writes the signed copy), the
# inbound side verifies and applies the ACL before forwarding.  Refusals are
# status 7, from pre-encoded answers (answer.pxi) kept per (reason, caller,
# method, kind) in the Signer's / Verifier's bounded dict.

cdef enum:
    AUTH_ANSWERS_MAX = 1024     # refusal templates kept per listener
    AU_NAME_SHOWN = 128         # bytes of a claimed appkey or method a message shows


cdef str _au_name(const uint8_t* p, Py_ssize_t off, Py_ssize_t n):
    """An appkey or method a request claims, for a message: printable, bounded."""
    if n < 0:
        return "(none)"
    cdef bytes b = PyBytes_FromStringAndSize(<const char*>p + off,
                                             n if n < AU_NAME_SHOWN else AU_NAME_SHOWN)
    return repr(b.decode("utf-8", "replace"))


cdef str _au_reason(Verifier v, int code, const uint8_t* p, const FrameInfo* fi,
                    Py_ssize_t moff, Py_ssize_t mlen):
    cdef str provider = v.provider.decode("utf-8", "replace")
    cdef str caller = _au_name(p, fi.auth_app_off, fi.auth_app_len)
    if code == AU_UNSIGNED:
        return (f"authentication failed: the request to {provider} is not signed "
                f"(localContext octo-auth: caller:timestamp:signature)")
    if code == AU_UNKNOWN_CALLER:
        return f"authentication failed: unknown caller appkey {caller} (no token for it)"
    if code == AU_BAD_SIGNATURE:
        return f"authentication failed: bad signature from caller {caller}"
    if code == AU_EXPIRED:
        return (f"authentication failed: timestamp of caller {caller} is expired "
                f"(outside the allowed clock skew of {v.skew_ms} ms)")
    if code == AU_NOT_ALLOWED:
        return f"authorization failed: caller {caller} is not allowed to call {provider}"
    return (f"authorization failed: caller {caller} is not authorized for method "
            f"{_au_name(p, moff, mlen)} of {provider}")


cdef int au_refuse_inbound(InboundConn c, Verifier v, int code, const uint8_t* p,
                           FrameInfo* fi, Py_ssize_t vmoff, Py_ssize_t vmlen) except -1:
    """Answer a request that failed verification with status 7 (never forwarded)."""
    cdef Engine eng = c.engine
    cdef int kind
    cdef Py_ssize_t moff, mlen
    cdef int32_t body_seq
    cdef Answer a
    cdef bytes body, name
    if fi.call_type == CALL_ONEWAY:
        return 0    # nobody reads an answer: dropped (counted by the Verifier)
    eng.n_errors[<int>STATUS_SECURITY] += 1
    if fi.kind != FK_OCTO:
        # a native Thrift caller reads a Thrift EXCEPTION message
        name = PyBytes_FromStringAndSize(<const char*>p + fi.service_off,
                                         fi.service_len if fi.service_len > 0 else 0)
        body = encode_thrift_exception(name, <int32_t>fi.seq_id, _au_reason(v, code, p, fi, 0, 0))
        ob_append_bytes(&c.reply, (<uint32_t>len(body)).to_bytes(4, "big") + body)
        return 0
    kind = answer_kind(p, fi, &moff, &mlen, &body_seq)
    # the names in the key as the message shows them (their first
    # AU_NAME_SHOWN bytes), so 1024 callers claiming appkeys as long as a
    # header allows keep 1024 short keys, not 1024 copies of those appkeys
    key = (code, kind,
           PyBytes_FromStringAndSize(<const char*>p + fi.auth_app_off,
                                     min(fi.auth_app_len, AU_NAME_SHOWN))
           if code > AU_UNSIGNED else None,
           PyBytes_FromStringAndSize(<const char*>p + vmoff, min(vmlen, AU_NAME_SHOWN))
           if code == AU_METHOD else None)
    a = <Answer>v.answers.get(key)
    if a is None:
        if len(v.answers) >= AUTH_ANSWERS_MAX:
            v.answers.clear()
        a = make_answer(STATUS_SECURITY, _au_reason(v, code, p, fi, vmoff, vmlen), False, kind)
        v.answers[key] = a
    answer_into(&c.reply, a, fi.seq_id, <const char*>p + moff, mlen, body_seq)
    return 0


cdef int au_refuse_outbound(OutboundConn c, Signer s, const uint8_t* p, FrameInfo* fi,
                            bint too_large) except -1:
    """A request whose caller this listener does not sign for: status 7, here."""
    cdef int kind
    cdef Py_ssize_t moff, mlen
    cdef int32_t body_seq
    cdef Answer a
    cdef bytes caller = PyBytes_FromStringAndSize(<const char*>p + fi.caller_off,
                                                  fi.caller_len if fi.caller_len > 0 else 0)
    # one of this listener's apps whose token is not (or no longer) in the store
    cdef bint no_token = not too_large and caller in s.sign_for and caller not in s.store.keys
    kind = answer_kind(p, fi, &moff, &mlen, &body_seq)
    key = (kind, too_large, no_token, caller[:AU_NAME_SHOWN])  # as the message shows it
    a = <Answer>s.answers.get(key)
    if a is None:
        if len(s.answers) >= AUTH_ANSWERS_MAX:
            s.answers.clear()
        if too_large:
            msg = "authentication: the request's header is too large to be signed (65535 bytes)"
        elif no_token:
            msg = (f"authentication: octo-proxy has no token for caller appkey "
                   f"{_au_name(p, fi.caller_off, fi.caller_len)} (yet): not signed, not sent")
        else:
            msg = (f"authentication: octo-proxy does not sign for caller appkey "
                   f"{_au_name(p, fi.caller_off, fi.caller_len)} on this listener "
                   f"(traceInfo.clientAppkey; listeners.outbound[].sign_for)")
        a = make_answer(STATUS_SECURITY, msg, False, kind)
        s.answers[key] = a
    s.n_refused += 1
    c.out_answer(a, fi.seq_id, p, moff, mlen, body_seq)
    return 0


cdef int au_sign_append(OutBuf* ob, const uint8_t* p, FrameInfo* fi, _Hmac key,
                        Node node) except -1:
    """Append the signed copy of the request p/fi (auth.pyx) to ob."""
    cdef Py_ssize_t plen = 0
    cdef const char* provider = PyUnicode_AsUTF8AndSize(node.appkey, &plen)
    cdef Py_ssize_t n = fi.length + au_sign_extra(fi)
    if ob.len + n > ob.cap:
        ob_reserve(ob, n)
    n = au_sign_into(ob.data + ob.len, p, fi, key, provider, plen, au_now_s())
    if n < 0:
        raise MemoryError("signing a request")
    ob.len += n
    return 0
