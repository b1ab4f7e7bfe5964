# cython: language_level=3
"""Service governance in the data path (contract: limits.pxd).

Per request everything here is C, with no Python object made: token buckets
refilled from the monotonic clock, rules matched by memcmp against the method
name (read in place, once per request, by fi_method) and the caller's appkey
(traceInfo.clientAppkey), per-caller buckets found in a C hash table, counters.
Python (octoproxy/governance.py)
compiles the policies into these objects when config or xDS changes, fetches
cluster-quota steps from Redis when `qwant` is called (once per step), and
decides ejections when `on_trip` is called (once per trip).

docs/governance.md describes the behaviour."""

import os

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.ref cimport PyObject
from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from octoproxy._core.frame cimport FrameInfo, fi_method, fr_scan

# the caller's bucket of a per-caller rule: at most this many callers are
# tracked per rule; past it the table is emptied (every caller starts full)
DEF MAX_CALLERS = 10000
# every caller's slot is within this many of its hash's home slot, so a
# lookup reads at most this many (callers crafted to collide empty the table)
DEF MAX_PROBE = 32
# a run of MAX_PROBE grows the table up to this many slots (4 times what
# MAX_CALLERS needs at load 1/2) before it is taken for crafted collisions
DEF MAX_CAP = 131072


cdef inline double mono() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


def monotonic():
    """The clock the buckets use (CLOCK_MONOTONIC seconds)."""
    return mono()


cdef inline void bk_init(Bucket* b, double rate, double burst, double now) noexcept nogil:
    b.rate = rate
    b.burst = burst
    b.tokens = burst
    b.last = now


cdef inline void bk_set(Bucket* b, double rate, double burst, double now) noexcept nogil:
    # a changed limit keeps the tokens already there (capped by the new burst)
    bk_refill(b, now)
    b.rate = rate
    b.burst = burst
    if b.tokens > burst:
        b.tokens = burst


cdef inline void bk_refill(Bucket* b, double now) noexcept nogil:
    cdef double t
    if now > b.last:
        t = b.tokens + (now - b.last) * b.rate
        b.tokens = b.burst if t > b.burst else t
        b.last = now


cdef inline bint bk_take(Bucket* b, double now) noexcept nogil:
    bk_refill(b, now)
    if b.tokens >= 1.0:
        b.tokens -= 1.0
        return True
    return False


cdef uint64_t _hseed = 0


cdef inline uint64_t mix64(uint64_t h) noexcept nogil:
    h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ULL
    h = (h ^ (h >> 27)) * 0x94D049BB133111EBULL
    return h ^ (h >> 31)


cdef inline uint64_t caller_hash(const uint8_t* c, Py_ssize_t n) noexcept nogil:
    # 8 bytes per multiply, seeded per process (a caller's appkey is the
    # request's to choose); never 0 (0 marks an empty slot)
    cdef uint64_t h = _hseed ^ <uint64_t>n
    cdef uint64_t w
    while n >= 8:
        memcpy(&w, c, 8)
        h = mix64(h ^ w)
        c += 8
        n -= 8
    if n > 0:
        w = 0
        memcpy(&w, c, n)
        h = mix64(h ^ w ^ 0x9E3779B97F4A7C15ULL)
    return h if h != 0 else 1


cdef void ctab_free(CallerSlot* t, Py_ssize_t cap) noexcept:
    cdef Py_ssize_t i
    if t == NULL:
        return
    for i in range(cap):
        if t[i].h != 0:
            free(t[i].key)
    free(t)


cdef inline Py_ssize_t ctab_put(CallerSlot* t, Py_ssize_t cap, CallerSlot* s) noexcept:
    # the slot's index; -1 when it would be MAX_PROBE or more from its hash's home
    cdef Py_ssize_t i = <Py_ssize_t>(s.h & <uint64_t>(cap - 1)), d = 0
    while t[i].h != 0:
        i = (i + 1) & (cap - 1)
        d += 1
        if d >= MAX_PROBE:
            return -1
    t[i] = s[0]
    return i


@cython.final
cdef class RateRule:
    """One token bucket: a service's limit, or its limit for one method
    and/or one caller (or each caller)."""

    def __init__(self, str name, double rate, double burst=0.0, method=None, caller=None,
                 bint per_caller=False):
        if rate <= 0.0:
            raise ValueError("rate must be > 0")
        self.name = name
        self.rate = rate
        self.burst = burst if burst >= 1.0 else (rate if rate >= 1.0 else 1.0)
        self.method = method.encode() if isinstance(method, str) else method
        self.caller = caller.encode() if isinstance(caller, str) else caller
        self.m_p = <const char*>self.method if self.method is not None else NULL
        self.m_len = len(self.method) if self.method is not None else -1
        self.c_p = <const char*>self.caller if self.caller is not None else NULL
        self.c_len = len(self.caller) if self.caller is not None else -1
        self.per_caller = per_caller
        self.message = f"rate limited by octo-proxy: {name} ({rate:g}/s, burst {self.burst:g})"
        bk_init(&self.bucket, rate, self.burst, mono())

    def __dealloc__(self):
        ctab_free(self.ctab, self.ccap)
        self.ctab = NULL

    @property
    def key(self):
        """What the rule matches: (method, caller, per_caller)."""
        return (self.method.decode() if self.method is not None else None,
                self.caller.decode() if self.caller is not None else None, self.per_caller)

    @property
    def n_callers(self):
        """Callers with a bucket of their own (per_caller)."""
        return self.cn

    def update_from(self, RateRule new):
        """Take `new`'s limits, keeping the tokens already granted (capped by
        the new burst) and the counters."""
        cdef double now = mono()
        cdef Py_ssize_t i
        self.rate = new.rate
        self.burst = new.burst
        self.message = new.message
        bk_set(&self.bucket, new.rate, new.burst, now)
        for i in range(self.ccap):
            if self.ctab[i].h != 0:
                bk_set(&self.ctab[i].b, new.rate, new.burst, now)

    def tokens(self):
        bk_refill(&self.bucket, mono())
        return self.bucket.tokens

    def bucket_state(self):
        """(tokens, last refill, {caller: (tokens, last)}) for a hot restart:
        CLOCK_MONOTONIC is the host's, so the next generation refills from
        the same instant.  Per-caller buckets that are full are left out (a
        new bucket starts full)."""
        cdef double now = mono()
        cdef Py_ssize_t i
        cdef CallerSlot* sl
        callers = {}
        for i in range(self.ccap):
            sl = &self.ctab[i]
            if sl.h == 0:
                continue
            bk_refill(&sl.b, now)
            if sl.b.tokens < sl.b.burst:
                callers[sl.key[:sl.klen].decode("utf-8", "replace")] = (sl.b.tokens, sl.b.last)
        bk_refill(&self.bucket, now)
        return (self.bucket.tokens, self.bucket.last, callers)

    def restore_bucket(self, double tokens, double last, dict callers):
        """The previous generation's bucket_state(), capped by this rule's burst."""
        cdef double now = mono()
        cdef bytes kb
        cdef Bucket* b
        self.bucket.tokens = min(tokens, self.burst)
        self.bucket.last = min(last, now)
        if not self.per_caller:
            return
        for k, (t, lt) in callers.items():
            if self.cn >= MAX_CALLERS - 1:
                break
            kb = k.encode()
            b = self.rr_bucket(<const uint8_t*><char*>kb, len(kb),
                               caller_hash(<const uint8_t*><char*>kb, len(kb)), now)
            b.tokens = min(<double>t, self.burst)
            b.last = min(<double>lt, now)

    def try_take(self, caller=None):
        """Python twin of the data path's check (tests)."""
        cdef bytes c = caller.encode() if isinstance(caller, str) else (caller or b"")
        cdef double now = mono()
        cdef Bucket* b = &self.bucket
        if self.per_caller:
            b = self.rr_bucket(<const uint8_t*><char*>c, len(c),
                               caller_hash(<const uint8_t*><char*>c, len(c)), now)
        return bk_take(b, now)

    cdef Bucket* rr_bucket(self, const uint8_t* c, Py_ssize_t cl, uint64_t h,
                           double now) except NULL:
        """The bucket of caller c[0:cl] (hash h) of a per-caller rule, made
        full on first sight; past MAX_CALLERS (or MAX_PROBE at MAX_CAP) the
        table is emptied and every caller starts full again."""
        cdef Py_ssize_t i, d, ncap
        cdef CallerSlot* t
        cdef CallerSlot s
        if cl < 0:
            cl = 0
        if self.ctab != NULL:
            i = <Py_ssize_t>(h & <uint64_t>(self.ccap - 1))
            d = 0
            while self.ctab[i].h != 0 and d < MAX_PROBE:
                if (self.ctab[i].h == h and self.ctab[i].klen == cl
                        and memcmp(self.ctab[i].key, c, cl) == 0):
                    self.clast = i
                    return &self.ctab[i].b
                i = (i + 1) & (self.ccap - 1)
                d += 1
        if self.cn >= MAX_CALLERS:
            self.ctab_clear()
        ncap = self.ccap
        if self.ctab == NULL or (self.cn + 1) * 2 > self.ccap:
            ncap = self.ccap * 2 if self.ccap else 16  # load <= 1/2
        s.h = h
        s.klen = cl
        s.key = <char*>malloc(cl if cl > 0 else 1)
        if s.key == NULL:
            raise MemoryError()
        memcpy(s.key, c, cl)
        bk_init(&s.b, self.rate, self.burst, now)
        while True:
            if ncap != self.ccap:
                # grow (or make) the table
                t = <CallerSlot*>calloc(ncap, sizeof(CallerSlot))
                if t == NULL:
                    free(s.key)
                    raise MemoryError()
                for i in range(self.ccap):
                    if self.ctab[i].h != 0 and ctab_put(t, ncap, &self.ctab[i]) < 0:
                        free(self.ctab[i].key)
                        self.cn -= 1
                free(self.ctab)
                self.ctab = t
                self.ccap = ncap
                self.clast = 0
            i = ctab_put(self.ctab, self.ccap, &s)
            if i >= 0:
                break
            # MAX_PROBE occupied slots in a row: at load 1/2 that happens by
            # chance among thousands of callers, and a bigger table breaks
            # the run up; past MAX_CAP the callers were crafted to collide:
            # start over (an empty table always takes it)
            if self.ccap < MAX_CAP:
                ncap = self.ccap * 2
            else:
                self.ctab_clear()
                ncap = 16
        self.cn += 1
        self.clast = i
        return &self.ctab[i].b

    cdef void ctab_clear(self) noexcept:
        ctab_free(self.ctab, self.ccap)
        self.ctab = NULL
        self.ccap = 0
        self.cn = 0
        self.clast = 0


cdef inline Bucket* rr_hint(RateRule r, const uint8_t* c, Py_ssize_t cl) noexcept:
    # the bucket of the caller last looked up in a per-caller rule when this
    # request is from it (one memcmp instead of hashing and probing: a
    # connection's requests mostly come from one caller); else NULL
    cdef CallerSlot* s
    if r.ctab == NULL:
        return NULL
    s = &r.ctab[r.clast]
    if cl < 0:
        cl = 0
    if s.h == 0 or s.klen != cl or (cl > 0 and memcmp(s.key, c, cl) != 0):
        return NULL
    return &s.b


cdef inline Bucket* rr_lookup(RateRule r, const uint8_t* c, Py_ssize_t cl, uint64_t* h,
                              double now) except NULL:
    # the caller's bucket of a per-caller rule; *h: the caller's hash, made
    # here on first need (0 until then) and shared by the request's rules
    cdef Bucket* b = rr_hint(r, c, cl)
    if b != NULL:
        return b
    if h[0] == 0:
        h[0] = caller_hash(c, cl if cl > 0 else 0)
    return r.rr_bucket(c, cl, h[0], now)


cdef inline bint rule_matches(RateRule r, const uint8_t* m, Py_ssize_t ml,
                              const uint8_t* c, Py_ssize_t cl) noexcept:
    if r.m_len >= 0 and (ml != r.m_len or (ml > 0 and memcmp(r.m_p, m, ml) != 0)):
        return False
    if r.c_len >= 0 and (cl != r.c_len or (cl > 0 and memcmp(r.c_p, c, cl) != 0)):
        return False
    return True


@cython.final
cdef class ServiceGov:
    """Everything governance keeps for one service; it lives as long as the
    service is known and is updated in place (tokens and counts survive)."""

    def __cinit__(self, str appkey):
        cdef double now = mono()
        self.appkey = appkey
        self.in_rules = []
        self.out_rules = []
        self.idempotent = []
        self.reasons = [
            f"rate limited by octo-proxy: cluster quota of service {appkey!r} used up",
            f"circuit breaker of octo-proxy open: service {appkey!r} has too many requests in flight",
            f"circuit breaker of octo-proxy open: service {appkey!r} has too many requests "
            f"waiting for a connection",
            f"circuit breaker of octo-proxy open: the picked node of {appkey!r} has too many "
            f"requests in flight",
            f"overload: adaptive concurrency limit of service {appkey!r} reached",
            f"circuit breaker of octo-proxy open: service {appkey!r} has too many connections "
            f"(max_connections) and none to the picked node",
        ]
        self.qmode = QM_OFF
        self.max_attempts = 1
        self.budget_ratio = 0.2
        self.min_retries = 3
        self.status_mask = 0
        self.lat_min = 0.0
        self.on_trip = None
        self.qwant = None
        bk_init(&self.qlocal, 1.0, 1.0, now)

    # -- configuration (Python, per change)

    def set_rules(self, list inbound, list outbound):
        """Install rate rules; a rule with the same key as one already there
        keeps its tokens and counters (run-time changes drop nothing)."""
        old = {(r.key, side): r for side, rules in ((0, self.in_rules), (1, self.out_rules))
               for r in rules}
        new_in, new_out = [], []
        for side, rules, dest in ((0, inbound, new_in), (1, outbound, new_out)):
            for r in rules:
                prev = old.get(((<RateRule>r).key, side))
                if prev is not None:
                    (<RateRule>prev).update_from(r)
                    (<RateRule>prev).name = (<RateRule>r).name
                    r = prev
                dest.append(r)
        self.in_rules = new_in
        self.out_rules = new_out
        self.in_method = any([(<RateRule>r).method is not None for r in new_in])
        self.out_method = any([(<RateRule>r).method is not None for r in new_out])
        self.in_caller = any([(<RateRule>r).caller is not None or (<RateRule>r).per_caller
                              for r in new_in])
        self.out_caller = any([(<RateRule>r).caller is not None or (<RateRule>r).per_caller
                               for r in new_out])
        self.answers = None  # the messages change: the data path encodes them again
        del self.reasons[GV_RULE:]
        while len(self.reasons) < GV_RULE:
            self.reasons.append("")
        for r in new_in + new_out:
            self.reasons.append((<RateRule>r).message)

    @property
    def inbound_rules(self):
        return list(self.in_rules)

    @property
    def outbound_rules(self):
        return list(self.out_rules)

    def set_local_share(self, double rate, double burst):
        """The bucket used while Redis is unreachable (QM_LOCAL)."""
        bk_set(&self.qlocal, rate, burst if burst >= 1.0 else 1.0, mono())

    def local_share_tokens(self):
        bk_refill(&self.qlocal, mono())
        return self.qlocal.tokens

    def set_idempotent(self, methods):
        self.idempotent = [m.encode() if isinstance(m, str) else bytes(m) for m in methods]

    @property
    def idempotent_methods(self):
        return [m.decode() for m in self.idempotent]

    def breaker_counts(self):
        return {"max_requests": self.n_cb[GV_MAX_REQUESTS - 1],
                "max_pending": self.n_cb[GV_MAX_PENDING - 1],
                "node_max_requests": self.n_cb[GV_NODE_MAX - 1],
                "adaptive": self.n_cb[GV_ADAPTIVE - 1],
                "max_connections": self.n_cb[GV_MAX_CONNECTIONS - 1]}

    def counts(self):
        """The service's counters (what add_counts continues)."""
        return {"quota_allowed": self.n_quota_allowed, "quota_limited": self.n_quota_limited,
                "retries": self.n_retries, "retries_unsent": self.n_retries_unsent,
                "budget_exhausted": self.n_budget_exhausted,
                "breakers": [self.n_cb[i] for i in range(6)]}

    def add_counts(self, dict c):
        """Continue the previous generation's counts (hot restart)."""
        cdef Py_ssize_t i
        self.n_quota_allowed += c.get("quota_allowed", 0)
        self.n_quota_limited += c.get("quota_limited", 0)
        self.n_retries += c.get("retries", 0)
        self.n_retries_unsent += c.get("retries_unsent", 0)
        self.n_budget_exhausted += c.get("budget_exhausted", 0)
        for i, v in enumerate(c.get("breakers", ())[:6]):
            self.n_cb[i] += v

    def take_latency(self):
        """(sum s, count, min s) of the answers since the last call; resets."""
        out = (self.lat_sum, self.lat_n, self.lat_min)
        self.lat_sum = 0.0
        self.lat_n = 0
        self.lat_min = 0.0
        return out

    def reason(self, int code):
        return self.reasons[code]

    # -- the data path

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef int gv_rules(self, list rules, const uint8_t* frame, FrameInfo* fi,
                      bint by_method, bint by_caller, double now) except -2:
        cdef const uint8_t* m = NULL
        cdef const uint8_t* c = NULL
        cdef Py_ssize_t ml = -1, cl = -1, mo, i, j, n = PyList_GET_SIZE(rules)
        cdef PyObject* r                # a RateRule, borrowed from `rules` (no refcounting)
        cdef Bucket* b
        cdef uint64_t h = 0
        if by_method:
            mo = fi_method(frame, fi, &ml)
            if mo >= 0:
                m = frame + mo
            else:
                ml = -1
        if by_caller and fi.caller_len >= 0:
            c = frame + fi.caller_off
            cl = fi.caller_len
        for i in range(n):
            r = PyList_GET_ITEM(rules, i)
            if not rule_matches(<RateRule>r, m, ml, c, cl):
                continue
            if (<RateRule>r).per_caller:
                b = rr_lookup(<RateRule>r, c, cl, &h, now)
            else:
                b = &(<RateRule>r).bucket
            if bk_take(b, now):
                (<RateRule>r).n_allowed += 1
                continue
            (<RateRule>r).n_limited += 1
            # refused: give back what the rules before it took
            for j in range(i):
                r = PyList_GET_ITEM(rules, j)
                if rule_matches(<RateRule>r, m, ml, c, cl):
                    if (<RateRule>r).per_caller:
                        b = rr_lookup(<RateRule>r, c, cl, &h, now)
                    else:
                        b = &(<RateRule>r).bucket
                    b.tokens += 1.0
                    (<RateRule>r).n_allowed -= 1
            return i
        return GV_OK

    cdef int gv_quota(self, double now) except -2:
        if self.qmode == QM_REDIS:
            if self.qexhausted:
                self.n_quota_limited += 1
                return GV_QUOTA
            if self.qtokens <= self.qlow and not self.qasked and self.qwant is not None:
                self.qasked = True
                self.qwant()
            if self.qtokens > -self.qdebt:
                self.qtokens -= 1.0
                self.n_quota_allowed += 1
                return GV_OK
            self.n_quota_limited += 1
            return GV_QUOTA
        if self.qmode == QM_LOCAL:
            if bk_take(&self.qlocal, now):
                self.n_quota_allowed += 1
                return GV_OK
            self.n_quota_limited += 1
            return GV_QUOTA
        if self.qmode == QM_CLOSED:
            self.n_quota_limited += 1
            return GV_QUOTA
        if self.qmode == QM_OPEN:
            self.n_quota_allowed += 1
        return GV_OK

    # -- Python twins (tests, tools)

    def check_inbound(self, bytes frame not None):
        """gv_inbound over one whole frame: None when allowed, else the message."""
        cdef FrameInfo fi = _scan1(frame)
        cdef int r = gv_inbound(self, <const uint8_t*><char*>frame, &fi, mono())
        return None if r == GV_OK else self.reasons[r]

    def check_outbound(self, bytes frame not None, long active=0):
        cdef FrameInfo fi = _scan1(frame)
        cdef int r = gv_outbound(self, <const uint8_t*><char*>frame, &fi, active, mono())
        return None if r == GV_OK else self.reasons[r]

    def may_retry(self, bytes frame not None):
        cdef FrameInfo fi = _scan1(frame)
        return gv_may_retry(self, <const uint8_t*><char*>frame, &fi)


cdef FrameInfo _scan1(bytes frame):
    cdef FrameInfo fi
    cdef Py_ssize_t r = fr_scan(<const uint8_t*><char*>frame, len(frame), 1 << 30, 1 << 20, &fi)
    if r != len(frame):
        raise ValueError("not exactly one whole frame")
    return fi


cdef int gv_inbound(ServiceGov g, const uint8_t* frame, FrameInfo* fi, double now) except -2:
    cdef int r
    if g.in_rules:
        r = g.gv_rules(g.in_rules, frame, fi, g.in_method, g.in_caller, now)
        if r != GV_OK:
            return GV_RULE + r
    if (g.qmode == QM_REDIS and not g.qexhausted and g.qtokens > g.qlow
            and g.qtokens > -g.qdebt):
        # a step's tokens being spent, the next one not due yet (the common case)
        g.qtokens -= 1.0
        g.n_quota_allowed += 1
        return GV_OK
    if g.qmode != QM_OFF:
        return g.gv_quota(now)
    return GV_OK


cdef int gv_outbound(ServiceGov g, const uint8_t* frame, FrameInfo* fi, long active,
                     double now) except -2:
    cdef int r
    if g.max_requests > 0 and g.inflight >= g.max_requests:
        g.n_cb[GV_MAX_REQUESTS - 1] += 1
        return GV_MAX_REQUESTS
    if g.node_max_requests > 0 and active >= g.node_max_requests:
        g.n_cb[GV_NODE_MAX - 1] += 1
        return GV_NODE_MAX
    if g.adaptive_limit > 0 and g.inflight >= g.adaptive_limit:
        g.n_cb[GV_ADAPTIVE - 1] += 1
        return GV_ADAPTIVE
    if g.out_rules:
        r = g.gv_rules(g.out_rules, frame, fi, g.out_method, g.out_caller, now)
        if r != GV_OK:
            return GV_RULE + len(g.in_rules) + r
    return GV_OK


cdef int gv_on_failure(NodeGov ng, bint transport) except -1:
    """gv_on_answer for a failure (a transport failure / timeout, or an error
    status): the detector's counts, and a trip when one reaches its threshold."""
    cdef ServiceGov g = ng.svc
    ng.win_fail += 1
    if transport:
        ng.consec_tr += 1
        ng.consec_st = 0
    else:
        ng.consec_st += 1
        ng.consec_tr = 0
    if ng.tripped or ng.ejected or g.on_trip is None:
        return 0
    if g.consec_transport > 0 and ng.consec_tr >= g.consec_transport:
        ng.tripped = True
        g.on_trip(ng, f"{ng.consec_tr} consecutive transport failures/timeouts")
    elif g.consec_status > 0 and ng.consec_st >= g.consec_status:
        ng.tripped = True
        g.on_trip(ng, f"{ng.consec_st} consecutive error statuses")
    return 0


cdef bint gv_may_retry(ServiceGov g, const uint8_t* frame, FrameInfo* fi) except -1:
    cdef Py_ssize_t ml = -1, mo, i, n
    cdef PyObject* m                    # bytes, borrowed from g.idempotent
    if g.max_attempts < 2:
        return False
    if g.idempotent_all:
        return True
    n = PyList_GET_SIZE(g.idempotent)
    if n:
        mo = fi_method(frame, fi, &ml)
        if mo >= 0:
            for i in range(n):
                m = PyList_GET_ITEM(g.idempotent, i)
                if (PyBytes_GET_SIZE(<bytes>m) == ml
                        and memcmp(PyBytes_AS_STRING(<bytes>m), frame + mo, ml) == 0):
                    return True
    return False


cdef bint gv_budget(ServiceGov g) noexcept:
    """One more retry in flight fits the budget."""
    cdef double allowed = g.budget_ratio * g.inflight
    if allowed < g.min_retries:
        allowed = g.min_retries
    return g.retries_active < allowed


def retry_budget_allows(ServiceGov g):
    return gv_budget(g)


@cython.final
cdef class NodeGov:
    """The outlier detector's counts and the ejection state of one node."""

    def __cinit__(self, ServiceGov svc, str address):
        self.svc = svc
        self.address = address

    def on_answer(self, int status, double latency=0.0):
        """Python twin of the data path's count (tests)."""
        gv_on_answer(self, status, latency)

    def take_window(self):
        """(answers, failures) since the last call; resets."""
        out = (self.win_total, self.win_fail)
        self.win_total = 0
        self.win_fail = 0
        return out

    def __repr__(self):
        return f"NodeGov({self.svc.appkey!r}, {self.address!r}, ejected={self.ejected})"


_hseed = mix64(int.from_bytes(os.urandom(8), "little"))

globals().update(QM_OFF=QM_OFF, QM_REDIS=QM_REDIS, QM_LOCAL=QM_LOCAL, QM_OPEN=QM_OPEN,
                 QM_CLOSED=QM_CLOSED, GV_OK=GV_OK, GV_QUOTA=GV_QUOTA,
                 GV_MAX_REQUESTS=GV_MAX_REQUESTS, GV_MAX_PENDING=GV_MAX_PENDING,
                 GV_NODE_MAX=GV_NODE_MAX, GV_ADAPTIVE=GV_ADAPTIVE,
                 GV_MAX_CONNECTIONS=GV_MAX_CONNECTIONS, GV_RULE=GV_RULE)
