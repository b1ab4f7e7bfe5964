"""Route table snapshots and load balancers (docs/protocol.md section 8).

Everything that depends only on the discovery snapshot and the proxy's own
labels -- cell, swimlane, health and locality filtering -- is done when a
snapshot is built.  A request then costs: one xxh64 of the appkey (plus one
per context label that is present), one or three open-addressing probes and
one O(1) pick.  No Python object is created on that path.

See docs/routing.md for the decisions (warm-up floor, hash-key fallback, RR
offset, least-request comparison, data structures).
"""

cimport cython
from cpython.object cimport PyObject
from libc.math cimport floor
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc, qsort
from libc.string cimport memcmp, memset
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

from octoproxy._core.frame cimport (
    FM_UNREAD, FR_WANT, FrameInfo, fi_method, fr_context_get, fr_context_many, fr_ctx_keys_init,
    fr_scan, fr_scan_want,
)

import os

from octoproxy import model as _model
from octoproxy import shunting as _shunting

cdef extern from *:
    """
    #include <string.h>
    #include <time.h>

    /* XXH64 (Yann Collet's xxHash, 64-bit), reimplemented; checked against the
       `xxhash` package in tests/unit/test_route.py. */
    #define RT_P1 11400714785074694791ULL
    #define RT_P2 14029467366897019727ULL
    #define RT_P3 1609587929392839161ULL
    #define RT_P4 9650029242287828579ULL
    #define RT_P5 2870177450012600261ULL

    static inline uint64_t rt_rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
    static inline uint64_t rt_rd64(const uint8_t* p) {
        uint64_t v; memcpy(&v, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
    #endif
        return v;
    }
    static inline uint32_t rt_rd32(const uint8_t* p) {
        uint32_t v; memcpy(&v, p, 4);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap32(v);
    #endif
        return v;
    }
    static inline uint64_t rt_xround(uint64_t acc, uint64_t in) {
        acc += in * RT_P2; acc = rt_rotl(acc, 31); return acc * RT_P1;
    }
    static inline uint64_t rt_xmerge(uint64_t acc, uint64_t v) {
        acc ^= rt_xround(0, v); return acc * RT_P1 + RT_P4;
    }
    static uint64_t rt_xxh64(const uint8_t* p, Py_ssize_t len, uint64_t seed) {
        const uint8_t* end = p + len;
        uint64_t h;
        if (len >= 32) {
            const uint8_t* limit = end - 32;
            uint64_t v1 = seed + RT_P1 + RT_P2, v2 = seed + RT_P2, v3 = seed, v4 = seed - RT_P1;
            do {
                v1 = rt_xround(v1, rt_rd64(p)); p += 8;
                v2 = rt_xround(v2, rt_rd64(p)); p += 8;
                v3 = rt_xround(v3, rt_rd64(p)); p += 8;
                v4 = rt_xround(v4, rt_rd64(p)); p += 8;
            } while (p <= limit);
            h = rt_rotl(v1, 1) + rt_rotl(v2, 7) + rt_rotl(v3, 12) + rt_rotl(v4, 18);
            h = rt_xmerge(h, v1); h = rt_xmerge(h, v2); h = rt_xmerge(h, v3); h = rt_xmerge(h, v4);
        } else {
            h = seed + RT_P5;
        }
        h += (uint64_t)len;
        while (p + 8 <= end) {
            h ^= rt_xround(0, rt_rd64(p));
            h = rt_rotl(h, 27) * RT_P1 + RT_P4;
            p += 8;
        }
        if (p + 4 <= end) {
            h ^= (uint64_t)rt_rd32(p) * RT_P1;
            h = rt_rotl(h, 23) * RT_P2 + RT_P3;
            p += 4;
        }
        while (p < end) {
            h ^= (uint64_t)(*p) * RT_P5;
            h = rt_rotl(h, 11) * RT_P1;
            p++;
        }
        h ^= h >> 33; h *= RT_P2; h ^= h >> 29; h *= RT_P3; h ^= h >> 32;
        return h;
    }

    /* splitmix64: tiny, fast, good enough for load balancing (not crypto). */
    static inline uint64_t rt_rand(uint64_t* s) {
        uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
    }
    /* a mod d for 32-bit a and d, with m = 2^64 / d rounded up (Lemire's
       fastmod): a multiply instead of a division */
    static inline uint32_t rt_fastmod(uint32_t a, uint64_t m, uint32_t d) {
        return (uint32_t)(((__uint128_t)(m * a) * d) >> 64);
    }
    /* Up to 8 ASCII digits ending at v + n (1 <= n <= 8), read as one word:
       the 8 bytes ending there must lie in the same buffer (the caller checks
       that v + n - 8 is not before its start).  The bytes before the digits
       are replaced by '0'; every byte must then be a digit (high nibble 3,
       low nibble at most 9), and the value is folded in three multiplies
       (the usual SWAR decimal parse).  0: not all digits. */
    static inline int rt_swar_digits(const uint8_t* v, Py_ssize_t n, uint64_t* out) {
        uint64_t x = rt_rd64(v + n - 8), d;
        if (n < 8) {
            uint64_t keep = ~0ULL << (8 * (8 - n));
            x = (x & keep) | (0x3030303030303030ULL & ~keep);
        }
        d = x - 0x3030303030303030ULL;
        if (((x & 0xF0F0F0F0F0F0F0F0ULL) != 0x3030303030303030ULL)
                | (((d + 0x0606060606060606ULL) & 0xF0F0F0F0F0F0F0F0ULL) != 0))
            return 0;
        d = d * 10 + (d >> 8);
        d = (((d & 0x000000FF000000FFULL) * (100 + (1000000ULL << 32)))
             + (((d >> 16) & 0x000000FF000000FFULL) * (1 + (10000ULL << 32)))) >> 32;
        *out = d;
        return 1;
    }
    /* uniform in [0, n) by multiply-shift (Lemire); bias < n / 2^32, negligible */
    static inline uint32_t rt_below(uint64_t r, uint32_t n) {
        return (uint32_t)(((r >> 32) * (uint64_t)n) >> 32);
    }

    static double rt_wallclock(void) {
        struct timespec ts;
    #ifdef CLOCK_REALTIME_COARSE
        clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    #else
        clock_gettime(CLOCK_REALTIME, &ts);
    #endif
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }

    typedef struct { uint64_t h; uint32_t idx; } rt_point;
    static int rt_point_cmp(const void* a, const void* b) {
        const rt_point* x = (const rt_point*)a; const rt_point* y = (const rt_point*)b;
        if (x->h != y->h) return (x->h > y->h) - (x->h < y->h);
        return (x->idx > y->idx) - (x->idx < y->idx);
    }
    """
    uint64_t rt_xxh64(const uint8_t* p, Py_ssize_t n, uint64_t seed) noexcept nogil
    uint64_t rt_rand(uint64_t* s) noexcept nogil
    uint32_t rt_below(uint64_t r, uint32_t n) noexcept nogil
    uint32_t rt_fastmod(uint32_t a, uint64_t m, uint32_t d) noexcept nogil
    bint rt_swar_digits(const uint8_t* v, Py_ssize_t n, uint64_t* out) noexcept nogil
    double rt_wallclock() noexcept nogil
    ctypedef struct rt_point:
        uint64_t h
        uint32_t idx
    int rt_point_cmp(const void* a, const void* b) noexcept nogil


cdef enum:
    # Warm-up weight floor: a node that has just started still gets a trickle
    # so that it is seen as alive and its warm-up progresses with real traffic.
    RT_WARM_FLOOR = 1
    # Ring points per node of the heaviest weight in a consistent-hash set.
    RT_RING_POINTS = 160
    # RR sequence cap: RT_SEQ_PER_NODE * n slots (weights are scaled down beyond).
    RT_SEQ_PER_NODE = 32

# Warming sets recompute their pick structures at most this often (seconds).
cdef double RT_WARM_TICK = 1.0

globals().update(
    RT_OK=RT_OK,
    RT_UNKNOWN_SERVICE=RT_UNKNOWN_SERVICE,
    RT_SET_NO_NODE=RT_SET_NO_NODE,
    RT_NO_HEALTHY=RT_NO_HEALTHY,
    RT_NO_SERVICE_KEY=RT_NO_SERVICE_KEY,
    RT_SHUNT_NO_NODE=RT_SHUNT_NO_NODE,
)

# the registry values that matter here (one source: octoproxy.model)
cdef int _STATUS_ALIVE = _model.STATUS_ALIVE
cdef int _ROLE_PRIMARY = _model.ROLE_PRIMARY


class RouteError(LookupError):
    """A request could not be routed; `.code` is one of the RT_* constants."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.rule = None  # route_frame: the shunting rule that refused it


cdef dict _POLICIES = {
    "round_robin": LB_ROUND_ROBIN,
    "least_request": LB_LEAST_REQUEST,
    "random": LB_RANDOM,
    "consistent_hash": LB_CONSISTENT_HASH,
}


cdef inline uint64_t rt_hash_bytes(bytes b) noexcept:
    return rt_xxh64(<const uint8_t*><char*>b, len(b), 0)


def xxh64(data, uint64_t seed=0):
    """The core's XXH64 (exposed so tests can compare it with the xxhash package)."""
    cdef bytes b = bytes(data)
    return rt_xxh64(<const uint8_t*><char*>b, len(b), seed)


cdef inline int64_t rt_warm_weight(int64_t w, double start, double wlen, double now) noexcept:
    # Linear ramp from start_time over warmup_s, floored (see RT_WARM_FLOOR).
    cdef double el, x
    if wlen <= 0.0 or w <= 0:
        return w
    el = now - start
    if el >= wlen:
        return w
    if el <= 0.0:
        return RT_WARM_FLOOR if w > RT_WARM_FLOOR else w
    x = floor(<double>w * el / wlen + 1e-9)
    if x < RT_WARM_FLOOR:
        return RT_WARM_FLOOR if w > RT_WARM_FLOOR else w
    return <int64_t>x


# --------------------------------------------------------------------- clock

@cython.final
cdef class RtClock:
    def __cinit__(self):
        self.fixed = 0.0
        self.has_fixed = False
        self.fn = None

    cdef double now(self) except? -1.0:
        if self.has_fixed:
            return self.fixed
        if self.fn is not None:
            return <double>self.fn()
        return rt_wallclock()


# ---------------------------------------------------------------------- node

@cython.final
cdef class Node:
    """One node of one service (read-only from Python, except the data path's fields)."""

    def answers_by_status(self):
        """Answers for requests sent to this node, by status (data path counts)."""
        cdef int i
        return {i: self.answers[i] for i in range(16) if self.answers[i]}

    def add_counts(self, long long picks, dict answers):
        """Continue the counts of the previous generation (hot restart)."""
        cdef int i
        self.picks += picks
        for k, v in answers.items():
            i = int(k)
            if 0 <= i < 16:
                self.answers[i] += v

    def __cinit__(self):
        self.upstream = None
        self.gov = None
        self.ejected = False
        self.in_flight = 0
        self.picks = 0

    @property
    def effective_weight(self):
        """The weight with warm-up applied at the table clock's current time."""
        return rt_warm_weight(self.weight, self.start_time, self.warmup_s, self.clock.now())

    def weight_at(self, double now):
        """The weight with warm-up applied at `now` (unix seconds)."""
        return rt_warm_weight(self.weight, self.start_time, self.warmup_s, now)

    def __repr__(self):
        return (f"Node({self.appkey!r}, {self.address!r}, w={self.weight}, "
                f"cell={self.cell!r}, lane={self.swimlane!r}, in_flight={self.in_flight})")


# --------------------------------------------------------------------- index

@cython.final
cdef class RtIndex:
    def __cinit__(self):
        self.mask = 0
        self.count = 0
        self.hashes = NULL
        self.kptr = NULL
        self.klen = NULL
        self.vals = NULL

    def __dealloc__(self):
        free(self.hashes)
        free(<void*>self.kptr)
        free(self.klen)
        free(self.vals)

    cdef PyObject* get(self, const uint8_t* p, Py_ssize_t n, uint64_t h) noexcept:
        cdef Py_ssize_t i = <Py_ssize_t>(h & <uint64_t>self.mask)
        while self.vals[i] != NULL:
            if (self.hashes[i] == h and self.klen[i] == n
                    and memcmp(self.kptr[i], p, <size_t>n) == 0):
                return self.vals[i]
            i = (i + 1) & self.mask
        return NULL


cdef RtIndex rt_index_new(list keys, list hashes, list values):
    """Build an index from unique byte keys, their xxh64 and their values."""
    cdef RtIndex ix = RtIndex.__new__(RtIndex)
    cdef Py_ssize_t n = len(keys), cap = 4, i, j
    cdef uint64_t h
    cdef bytes k
    while cap < 2 * n + 1:
        cap <<= 1
    ix.mask = cap - 1
    ix.count = n
    ix.keys = keys
    ix.values = values
    ix.hashes = <uint64_t*>malloc(cap * sizeof(uint64_t))
    ix.kptr = <const char**>malloc(cap * sizeof(char*))
    ix.klen = <Py_ssize_t*>malloc(cap * sizeof(Py_ssize_t))
    ix.vals = <PyObject**>malloc(cap * sizeof(PyObject*))
    if not ix.hashes or not ix.kptr or not ix.klen or not ix.vals:
        raise MemoryError()
    for i in range(cap):
        ix.vals[i] = NULL
    for i in range(n):
        k = <bytes>keys[i]
        h = <uint64_t>hashes[i]
        j = <Py_ssize_t>(h & <uint64_t>ix.mask)
        while ix.vals[j] != NULL:
            j = (j + 1) & ix.mask
        ix.hashes[j] = h
        ix.kptr[j] = <char*>k
        ix.klen[j] = len(k)
        ix.vals[j] = <PyObject*>values[i]
    return ix


# ------------------------------------------------------------ candidate sets

@cython.final
cdef class CandSet:
    def __cinit__(self):
        self.n = 0
        self.nodes = NULL
        self.weight = NULL
        self.warm_start = NULL
        self.warm_len = NULL
        self.eff = NULL
        self.seq = NULL
        self.alias_prob = NULL
        self.alias_idx = NULL
        self.ring_hash = NULL
        self.ring_idx = NULL
        self.ring_len = 0
        self.seq_len = 0
        self.pos = -1
        self.prepared = False

    def __dealloc__(self):
        free(self.nodes)
        free(self.weight)
        free(self.warm_start)
        free(self.warm_len)
        free(self.eff)
        free(self.seq)
        free(self.alias_prob)
        free(self.alias_idx)
        free(self.ring_hash)
        free(self.ring_idx)

    @property
    def candidates(self):
        return list(self.node_list)


cdef CandSet cs_new(int policy, str cell, str lane, int n_endpoints, list nodes, double now):
    """A candidate set over `nodes` (already filtered), pick structures built."""
    cdef CandSet cs = CandSet.__new__(CandSet)
    cdef Py_ssize_t n = len(nodes), i
    cdef Node nd
    cs.policy = policy
    cs.cell = cell
    cs.lane = lane
    cs.n_endpoints = n_endpoints
    cs.node_list = nodes
    cs.n = n
    cs.has_warmup = False
    cs.warming = False
    cs.err = RT_OK if n > 0 else RT_NO_HEALTHY
    if n == 0:
        return cs
    cs.nodes = <PyObject**>malloc(n * sizeof(PyObject*))
    cs.weight = <int64_t*>malloc(n * sizeof(int64_t))
    cs.warm_start = <double*>malloc(n * sizeof(double))
    cs.warm_len = <double*>malloc(n * sizeof(double))
    cs.eff = <int64_t*>malloc(n * sizeof(int64_t))
    if not cs.nodes or not cs.weight or not cs.warm_start or not cs.warm_len or not cs.eff:
        raise MemoryError()
    for i in range(n):
        nd = <Node>nodes[i]
        cs.nodes[i] = <PyObject*>nd
        cs.weight[i] = nd.weight
        cs.warm_start[i] = nd.start_time
        cs.warm_len[i] = nd.warmup_s
        if nd.warmup_s > 0.0 and now - nd.start_time < nd.warmup_s:
            cs.has_warmup = True
    return cs


cdef bint cs_same(CandSet a, CandSet b):
    """Same nodes, weights and warm-up parameters: `a` can stand in for `b`."""
    cdef Py_ssize_t i
    if a.n != b.n or a.policy != b.policy or a.n_endpoints != b.n_endpoints:
        return False
    for i in range(a.n):
        if (a.nodes[i] != b.nodes[i] or a.weight[i] != b.weight[i]
                or a.warm_start[i] != b.warm_start[i] or a.warm_len[i] != b.warm_len[i]):
            return False
    return True


include "balance.pxi"


# ------------------------------------------------------------ service build

@cython.final
cdef class CellEntry:
    pass


@cython.final
cdef class ServiceEntry:
    pass


@cython.final
cdef class Snapshot:
    pass


@cython.final
cdef class GroupEntry:
    pass


# ---------------------------------------------------------- traffic shunting
#
# docs/shunting.md.  Rules are compiled per service when it is built (its own
# rules, then the global ones): C arrays of conditions over (pointer, length)
# strings, the rule's group resolved to this service's GroupEntry, a unit
# table as an RtIndex.  A request first reads every value the rules use into
# slots (rt_req_fill: one pass over the context maps, integers parsed and
# percent buckets hashed once), then evaluates the rules in order with byte
# compares and integer arithmetic only: no Python object, no allocation, no
# regex.

cdef enum:
    RS_SERVICE = 0
    RS_METHOD = 1
    RS_CALLER = 2
    RS_CONTEXT = 3
    RS_RANDOM = 4

    RO_EQ = 0
    RO_IN = 1
    RO_PREFIX = 2
    RO_PRESENT = 3
    RO_RANGE = 4
    RO_MOD = 5
    RO_PERCENT = 6
    RO_RANDOM = 7                   # a random percentage (no request value)
    RO_ALONE = 8                    # a context key past the table, looked up alone (op: aop)
    RO_PRESENT_ANY = 9              # present, even empty (a percentage of 100%)

    RC_KEEP = 0                     # rt_compile_cond: the condition is tested per request
    RC_DROP = 1                     # ... always true (beyond its value's presence): not tested
    RC_NEVER = 2                    # ... never true: the rule never matches

    RA_GROUP = 0
    RA_CONTEXT = 1

    # the request values the rules read, one slot each (RtReq): the service,
    # the caller, the method, then the context keys in the order the rules
    # first name them; 32 slots so that presence fits one word
    RQ_SERVICE = 0
    RQ_CALLER = 1
    RQ_METHOD = 2
    RQ_CTX = 3
    RT_MAX_CTX = 28                 # context keys looked up in one pass per request (slots 3-30)
    RT_MOD_BITS = 4096              # mod: remainders kept as a bitmap up to this modulus

# a `need` bit no request has (slot 31 is never used): a rule that cannot match
cdef uint64_t RQ_NEVER = (<uint64_t>1) << 63

cdef dict _RS = {_model.SRC_SERVICE: RS_SERVICE, _model.SRC_METHOD: RS_METHOD,
                 _model.SRC_CALLER: RS_CALLER, _model.SRC_CONTEXT: RS_CONTEXT,
                 _model.SRC_RANDOM: RS_RANDOM}
cdef dict _RO = {_model.OP_EQ: RO_EQ, _model.OP_IN: RO_IN, _model.OP_PREFIX: RO_PREFIX,
                 _model.OP_PRESENT: RO_PRESENT, _model.OP_RANGE: RO_RANGE,
                 _model.OP_MOD: RO_MOD, _model.OP_PERCENT: RO_PERCENT}
cdef dict _TARGETS = {"octo-liteset": 0, "octo-set": 1, "octo-swimlane": 2}

cdef extern from *:
    """
    static inline int rt_ctz64(uint64_t x) { return __builtin_ctzll(x); }
    /* FNV-1a 64 (shunting.fnv1a64): eight bytes per turn, the rest unrolled */
    #define RT_FNV_STEP h = (h ^ *p++) * 1099511628211ULL
    static inline uint64_t rt_fnv(const uint8_t* p, Py_ssize_t n) {
        uint64_t h = 14695981039346656037ULL;
        for (; n >= 8; n -= 8) {
            RT_FNV_STEP; RT_FNV_STEP; RT_FNV_STEP; RT_FNV_STEP;
            RT_FNV_STEP; RT_FNV_STEP; RT_FNV_STEP; RT_FNV_STEP;
        }
        switch (n) {
        case 7: RT_FNV_STEP; /* fall through */
        case 6: RT_FNV_STEP; /* fall through */
        case 5: RT_FNV_STEP; /* fall through */
        case 4: RT_FNV_STEP; /* fall through */
        case 3: RT_FNV_STEP; /* fall through */
        case 2: RT_FNV_STEP; /* fall through */
        case 1: RT_FNV_STEP; /* fall through */
        default: break;
        }
        return h;
    }
    /* word i of a little-endian bitmap held in bytes (rt_compile_flat) */
    static inline uint64_t rt_bits_word(const char* b, uint32_t i) {
        uint64_t w; memcpy(&w, b + 8 * (size_t)i, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);
    #endif
        return w;
    }
    """
    int rt_ctz64(uint64_t x) noexcept nogil
    uint64_t rt_bits_word(const char* b, uint32_t i) noexcept nogil
    uint64_t rt_fnv(const uint8_t* p, Py_ssize_t n) noexcept nogil


@cython.final
cdef class ShuntStat:
    """One rule's identity and counters (hits, fallbacks, rejects)."""

    def __cinit__(self):
        self.hits = 0
        self.fallbacks = 0
        self.rejects = 0
        self.answers = None


@cython.final
cdef class RtRules:
    def __cinit__(self):
        self.rules = NULL
        self.n = 0
        self.needs_method = False
        self.ck.n = 0
        self.slots = 0
        self.int_slots = 0
        self.pct_slots = 0
        self.fc = NULL
        self.nfc = 0
        self.rm = NULL
        self.small = False
        self.zr = 0
        self.rhas = NULL
        self.want = NULL
        self.keep = []

    def __dealloc__(self):
        cdef Py_ssize_t i, j
        cdef RtRule* r
        free(self.fc)  # compact copies: their arrays belong to the rules' conditions
        free(self.rm)
        free(self.rhas)
        if self.rules == NULL:
            return
        for i in range(self.n):
            r = &self.rules[i]
            if r.conds != NULL:
                for j in range(r.nconds):
                    free(<void*>r.conds[j].vals)
                    free(r.conds[j].vlens)
                    free(r.conds[j].rems)
                free(r.conds)
        free(self.rules)

    cdef const char* keep_str(self, str v, Py_ssize_t* n) except? NULL:
        cdef bytes b = _b(v)
        self.keep.append(b)
        n[0] = PyBytes_GET_SIZE(b)
        return PyBytes_AS_STRING(b)

    cdef const char* keep_bits(self, bytes b) except NULL:
        self.keep.append(b)
        return PyBytes_AS_STRING(b)


cdef int rt_compile_cond(RtRules rs, RtRm* r, RtCond* c, object m) except -1:
    """One condition; adds what it reads to the rule's `need` and the rule
    set's slots (what the request extraction fills in).  Returns RC_KEEP,
    RC_DROP (always true once its value is present: a percentage of 100%)
    or RC_NEVER (never true: a percentage of 0%)."""
    cdef Py_ssize_t i, nv
    cdef int src = _RS[m.source]
    cdef uint64_t bit
    cdef uint32_t threshold = <uint32_t>_shunting.percent_threshold(m.percent)
    c.vals = NULL
    c.vlens = NULL
    c.rems = NULL
    c.nvals = 0
    c.nrems = 0
    c.key = NULL
    c.key_len = 0
    c.val0 = NULL
    c.vlen0 = 0
    c.op = _RO[m.op]
    c.aop = c.op
    c.slot = -1
    if src == RS_RANDOM:
        c.op = RO_RANDOM
    elif src == RS_SERVICE:
        c.slot = RQ_SERVICE
    elif src == RS_CALLER:
        c.slot = RQ_CALLER
    elif src == RS_METHOD:
        c.slot = RQ_METHOD
        rs.needs_method = True
    else:
        c.key = rs.keep_str(m.key, &c.key_len)
        c.slot = rt_ctx_slot(rs, c.key, c.key_len)
        if c.slot < 0:
            c.op = RO_ALONE
    if c.op == RO_PERCENT or c.op == RO_RANDOM or c.aop == RO_PERCENT:
        # 0% never matches, 100% always does (a bucket is below 10000):
        # no hash, no draw
        if threshold == 0:
            return RC_NEVER
        if threshold >= 10000:
            if c.op == RO_ALONE:
                c.aop = RO_PRESENT_ANY
            elif c.op == RO_RANDOM:
                return RC_DROP
            else:
                c.op = RO_PRESENT_ANY
    if c.slot >= 0:
        # a missing value makes any condition false; range and mod also
        # need the value to read as an integer
        bit = (<uint64_t>1) << c.slot
        r.need |= bit
        rs.slots |= bit
        if c.op == RO_RANGE or c.op == RO_MOD:
            r.need |= bit << 32
            rs.int_slots |= bit
        elif c.op == RO_PERCENT:
            rs.pct_slots |= bit
        elif c.op == RO_PRESENT_ANY:
            return RC_DROP  # `need` has its presence: nothing left to test
    nv = len(m.values)
    if nv:
        c.vals = <const char**>calloc(nv, sizeof(char*))
        c.vlens = <Py_ssize_t*>calloc(nv, sizeof(Py_ssize_t))
        if c.vals == NULL or c.vlens == NULL:
            raise MemoryError()
        for i in range(nv):
            c.vals[i] = rs.keep_str(m.values[i], &c.vlens[i])
        c.nvals = nv
        c.val0 = c.vals[0]
        c.vlen0 = c.vlens[0]
    c.lo = m.lo
    c.hi = m.hi
    c.modulus = m.modulus
    c.mod_m = 0
    if 0 < m.modulus < 2**32:
        c.mod_m = <uint64_t>(((2**64 - 1) // m.modulus + 1) & 0xFFFFFFFFFFFFFFFF)
    if m.remainders:
        c.rems = <int64_t*>calloc(len(m.remainders), sizeof(int64_t))
        if c.rems == NULL:
            raise MemoryError()
        for i in range(len(m.remainders)):
            c.rems[i] = m.remainders[i]
        c.nrems = len(m.remainders)
    c.threshold = threshold
    return RC_KEEP


cdef int rt_ctx_slot(RtRules rs, const char* key, Py_ssize_t n) noexcept:
    """The RtReq slot of a context key (-1: the table is full)."""
    cdef Py_ssize_t k
    for k in range(rs.ck.n):
        if rs.ck.klens[k] == n and memcmp(rs.ck.keys[k], key, <size_t>n) == 0:
            return <int>(RQ_CTX + k)
    if rs.ck.n == RT_MAX_CTX:
        return -1
    rs.ck.keys[rs.ck.n] = key
    rs.ck.klens[rs.ck.n] = n
    rs.ck.n += 1
    fr_ctx_keys_init(&rs.ck)
    return <int>(RQ_CTX + rs.ck.n - 1)


# The values one request offers the rules (on the C stack), filled once
# before the first rule by rt_req_fill: slot s is valid when bit s of
# `have` is set; iv[s] when bit 32 + s is set; pb[s] when s is a percent slot
# and present.
cdef struct RtReq:
    uint64_t have
    Py_ssize_t off[32]              # the value's offset in the frame
    Py_ssize_t len[32]
    int64_t iv[32]                  # the value read as an integer (range, mod)
    uint32_t pb[32]                 # FNV-1a-64(value) mod 10000 (percent)


cdef inline bint rt_same(const uint8_t* a, const char* b, Py_ssize_t n) noexcept:
    # short values: a plain loop beats a call to memcmp
    cdef Py_ssize_t i
    for i in range(n):
        if a[i] != <uint8_t>b[i]:
            return False
    return True


@cython.final
cdef class CtxWant:
    """A route table's scan-time context keys (route.pxd)."""


cdef bint rt_want_update(RouteTable t) except -1:
    """Make the table's scan-time keys (CtxWant) hold every context key the
    rules now read, in first-named order.  Keys are appended while there is
    room, so rules compiled earlier keep their keys' places (returns False).
    When the keys do not fit beside stale ones, the table is rebuilt from the
    rules' keys alone and True is returned: every service's rules must then
    be compiled again before a request is routed.  More than FR_WANT keys:
    not used at all (the rules walk the maps); no rules: emptied."""
    cdef CtxWant w = t._want
    cdef list need = []
    cdef bytes kb
    for rules in t._shunt.values():
        for rule in rules:
            keys = [m.key for m in rule.matches if m.source == _model.SRC_CONTEXT]
            if rule.source_key:
                keys.append(rule.source_key)
            for key in keys:
                kb = _b(key)
                if kb not in need:
                    need.append(kb)
    if len(need) > FR_WANT:
        # compiled rules keep their places in the unchanged keys (their
        # requests are now scanned without them and walk the maps)
        w.full = True
        t.want = NULL
        return False
    new = [kb for kb in need if kb not in w.keep] if not w.full else need
    rebuild = w.full or len(w.keep) + len(new) > FR_WANT or not need
    if rebuild:
        w.keep = []
        w.k.n = 0
        new = need
    for kb in new:
        w.keep.append(kb)
        w.k.keys[w.k.n] = PyBytes_AS_STRING(kb)
        w.k.klens[w.k.n] = PyBytes_GET_SIZE(kb)
        w.k.n += 1
    w.full = False
    fr_ctx_keys_init(&w.k)
    t.want = &w.k if w.k.n else NULL
    return rebuild and bool(need)


cdef int rt_want_map(RouteTable t, RtRules rs) noexcept:
    # rs.want/gmap: where each of the rules' context keys sits in the table's
    # scan-time keys; NULL when one is missing (or those are not used)
    cdef Py_ssize_t k, g
    cdef CtxWant w = t._want
    rs.want = NULL
    rs.gident = False
    if t.want == NULL:
        return 0
    for k in range(rs.ck.n):
        rs.gmap[k] = -1
        for g in range(w.k.n):
            if (w.k.klens[g] == rs.ck.klens[k]
                    and memcmp(w.k.keys[g], rs.ck.keys[k], <size_t>w.k.klens[g]) == 0):
                rs.gmap[k] = <int>g
                break
        if rs.gmap[k] < 0:
            return 0
    rs.want = t.want
    rs.gident = True
    for k in range(rs.ck.n):
        if rs.gmap[k] != k:
            rs.gident = False
    return 0


cdef RtRules rt_compile_rules(RouteTable t, ServiceEntry e):
    """The service's rules, then the global ones, as one C array (None: no rules)."""
    cdef list todo = []
    cdef RtRules rs
    cdef RtRule* r
    cdef RtRm* tm
    cdef ShuntStat st
    cdef Py_ssize_t i, j, n
    cdef list keys, hashes, vals
    cdef bytes kb
    for scope in (e.appkey, _model.SHUNT_GLOBAL):
        for rule in t._shunt.get(scope, ()):
            todo.append(t._stats[(scope, rule.name)])
    if not todo:
        return None
    rs = RtRules.__new__(RtRules)
    n = len(todo)
    rs.rules = <RtRule*>calloc(n, sizeof(RtRule))
    rs.rm = <RtRm*>calloc(n, sizeof(RtRm))
    if rs.rules == NULL or rs.rm == NULL:
        raise MemoryError()
    rs.n = n
    for i in range(n):
        st = <ShuntStat>todo[i]
        rule = st.rule
        rs.keep.append(st)
        r = &rs.rules[i]
        tm = &rs.rm[i]
        r.stat = <PyObject*>st
        r.nconds = len(rule.matches)
        if r.nconds:
            r.conds = <RtCond*>calloc(r.nconds, sizeof(RtCond))
            if r.conds == NULL:
                r.nconds = 0
                raise MemoryError()
            j = 0
            for m in rule.matches:
                kind = rt_compile_cond(rs, tm, &r.conds[j], m)
                if kind == RC_KEEP:
                    j += 1
                    continue
                free(<void*>r.conds[j].vals)
                free(r.conds[j].vlens)
                free(r.conds[j].rems)
                memset(&r.conds[j], 0, sizeof(RtCond))
                if kind == RC_NEVER:
                    tm.need |= RQ_NEVER  # no request has it: skipped with the need test
            r.nconds = j
        if rule.action == _model.ACT_DEFAULT:
            # the default nodes, evaluation stops: a group action without a
            # group takes its fallback (counted as such; shunting_stats
            # reports those hits as routed)
            r.action = RA_GROUP
            r.group = NULL
            r.reject = False
        elif rule.action == _model.ACT_GROUP:
            r.action = RA_GROUP
            ge = e.groups.get(rule.group)
            r.group = <PyObject*>ge if ge is not None else NULL
            r.reject = rule.on_no_node == _model.NO_NODE_REJECT
        else:
            r.action = RA_CONTEXT
            r.target = _TARGETS[rule.target]
            if rule.source_key:
                r.skey = rs.keep_str(rule.source_key, &r.skey_len)
                r.skslot = rt_ctx_slot(rs, r.skey, r.skey_len)
                if r.skslot >= 0:
                    # a source value missing from the request is no match
                    tm.need |= (<uint64_t>1) << r.skslot
                    rs.slots |= (<uint64_t>1) << r.skslot
                keys = []
                hashes = []
                vals = []
                for k, v in rule.unit_table:
                    kb = _b(k)
                    keys.append(kb)
                    hashes.append(rt_hash_bytes(kb))
                    vals.append(_b(v))
                ix = rt_index_new(keys, hashes, vals)
                rs.keep.append(ix)
                r.table = <PyObject*>ix
            else:
                r.value = rs.keep_str(rule.value, &r.value_len)
    rt_compile_flat(rs)
    rt_want_map(t, rs)
    return rs


cdef int rt_compile_flat(RtRules rs) except -1:
    """Sort every condition on a slot by op (RtRules.fc) when there are at
    most 64: a request evaluates them in one loop into a mask (a switch on
    the op whose jumps repeat in runs), and a rule is then one test over two
    masks.  A
    condition has no side effect, so evaluating all of them, in any order,
    gives each rule the same answer; random draws (and keys looked up alone)
    stay in the rule, evaluated in order once the mask test passes.  Then
    each rule's two tests go side by side into RtRules.rm.  Conditions that
    say the same thing (in different rules) are evaluated once: one bit."""
    cdef Py_ssize_t i, i2, j, n = 0, k = 0
    cdef int op
    cdef RtRule* r
    cdef RtCond* c
    cdef RtFc* f
    cdef dict seen = {}
    cdef bytearray bits
    for i in range(rs.n):
        r = &rs.rules[i]
        r.nrest = r.nconds
        for j in range(r.nconds):
            if r.conds[j].op <= RO_PERCENT:
                n += 1
    if 0 < n <= 64:
        rs.fc = <RtFc*>calloc(n, sizeof(RtFc))
        if rs.fc == NULL:
            raise MemoryError()
        for op in range(RO_PERCENT + 1):
            for i in range(rs.n):
                r = &rs.rules[i]
                for j in range(r.nconds):
                    c = &r.conds[j]
                    if c.op != op:
                        continue
                    c.in_mask = True
                    r.nrest -= 1
                    vals = []
                    for i2 in range(c.nvals):
                        vals.append(c.vals[i2][:c.vlens[i2]])
                    rems = set()
                    for i2 in range(c.nrems):
                        rems.add(c.rems[i2])
                    same = (op, c.slot, tuple(vals), c.lo, c.hi, c.modulus,
                            tuple(sorted(rems)), c.threshold)
                    if same in seen:
                        rs.rm[i].cmask |= (<uint64_t>1) << <Py_ssize_t>seen[same]
                        continue
                    seen[same] = k
                    f = &rs.fc[k]
                    f.slot = c.slot
                    f.op = op
                    f.vlen = c.vlen0
                    f.val = c.val0
                    f.c = c
                    f.m = 0
                    if op == RO_RANGE:
                        f.a = c.lo
                        f.b = c.hi
                    elif op == RO_IN:
                        f.b = 0
                        for i2 in range(c.nvals):
                            f.b |= <int64_t>((<uint64_t>1) << (c.vlens[i2] if c.vlens[i2] < 63 else 63))
                    elif op == RO_MOD:
                        f.a = c.modulus
                        f.b = 0
                        if c.mod_m != 0 and c.modulus <= RT_MOD_BITS:
                            # the remainders as a bitmap (f.val), tested with
                            # one shift after a multiply-based modulo
                            f.m = c.mod_m
                            bits = bytearray(((c.modulus + 63) // 64) * 8)
                            for i2 in range(c.nrems):
                                if 0 <= c.rems[i2] < c.modulus:
                                    bits[c.rems[i2] >> 3] |= 1 << (c.rems[i2] & 7)
                            f.val = rs.keep_bits(bytes(bits))
                    elif op == RO_PERCENT:
                        f.a = c.threshold
                    rs.rm[i].cmask |= (<uint64_t>1) << k
                    k += 1
        rs.nfc = k
    if rs.n <= 64:
        rs.rhas = <uint64_t*>calloc(k if k else 1, sizeof(uint64_t))
        if rs.rhas == NULL:
            raise MemoryError()
        for i in range(rs.n):
            if rs.rm[i].cmask == 0:
                rs.zr |= (<uint64_t>1) << i
            for j in range(k):
                if rs.rm[i].cmask >> j & 1:
                    rs.rhas[j] |= (<uint64_t>1) << i
        rs.small = True
    return 0


cdef inline bint rt_parse_i64(const uint8_t* v, Py_ssize_t n, int64_t* out) noexcept:
    # an optional '-' or '+' then ASCII digits, within int64 (shunting.parse_int)
    cdef Py_ssize_t i = 0
    cdef uint64_t acc = 0
    cdef uint32_t d
    cdef bint neg = n > 0 and v[0] == 45  # '-'
    if neg or (n > 0 and v[0] == 43):  # '+', as Envoy's range_match reads it
        i = 1
    if i >= n or n - i > 19:
        return False
    while i < n:
        d = <uint32_t>v[i] - 48  # '0'..'9' -> 0..9; anything else wraps above 9
        if d > 9:
            return False
        acc = acc * 10 + d  # 19 digits < 2^64: no overflow
        i += 1
    if neg:
        if acc > 9223372036854775808ULL:
            return False
        out[0] = <int64_t>(<uint64_t>0 - acc)
    else:
        if acc > 9223372036854775807ULL:
            return False
        out[0] = <int64_t>acc
    return True


cdef inline bint rt_parse_i64_at(const uint8_t* frame, Py_ssize_t off, Py_ssize_t n,
                                 int64_t* out) noexcept:
    # rt_parse_i64 of frame[off:off + n]; up to 16 digits without a sign
    # are read a word at a time (rt_swar_digits), when the 8 bytes before
    # each word's end lie in the frame
    cdef const uint8_t* v = frame + off
    cdef uint64_t hi, lo
    if 0 < n <= 8 and off + n >= 8:
        if rt_swar_digits(v, n, &lo):
            out[0] = <int64_t>lo
            return True
        return rt_parse_i64(v, n, out)  # a sign, or not a number
    if 8 < n <= 16 and off + n >= 16:
        if rt_swar_digits(v, n - 8, &hi) and rt_swar_digits(v + n - 8, 8, &lo):
            out[0] = <int64_t>(hi * 100000000ULL + lo)
            return True
    return rt_parse_i64(v, n, out)


cdef inline uint64_t rt_fnv1a64(const uint8_t* p, Py_ssize_t n) noexcept:
    # FNV-1a 64: the percentage rules' stable hash (shunting.fnv1a64)
    return rt_fnv(p, n)


cdef inline void rt_req_fill(RtRules rs, const uint8_t* p, FrameInfo* fi, RtReq* q) noexcept:
    """Everything the service's rules read from this request, once: the
    context keys as the scan found them (fr_scan_want) or in one pass over
    both maps, each integer parsed once, each percent bucket hashed once."""
    cdef uint64_t have = 0, m
    cdef uint32_t fl, fg
    cdef Py_ssize_t k
    cdef int s, g
    if fi.service_len >= 0:
        q.off[RQ_SERVICE] = fi.service_off
        q.len[RQ_SERVICE] = fi.service_len
        have |= (<uint64_t>1) << RQ_SERVICE
    if fi.caller_len >= 0:
        q.off[RQ_CALLER] = fi.caller_off
        q.len[RQ_CALLER] = fi.caller_len
        have |= (<uint64_t>1) << RQ_CALLER
    if rs.needs_method:
        # parsed once per request, shared with governance and auth
        q.off[RQ_METHOD] = fi_method(p, fi, &q.len[RQ_METHOD])
        if q.len[RQ_METHOD] >= 0:
            have |= (<uint64_t>1) << RQ_METHOD
    if rs.ck.n:
        if rs.want != NULL and fi.want == <uintptr_t>rs.want:
            # found while scanning (fr_scan_want): localContext wins
            fl = fi.wfound_l
            fg = fi.wfound_g
            if rs.gident:
                # the table's first keys are the rules' own, in order
                m = (fl | fg) & ((<uint64_t>1 << rs.ck.n) - 1)
                have |= m << RQ_CTX
                while m:
                    k = rt_ctz64(m)
                    m &= m - 1
                    if (fl >> k) & 1:
                        q.off[RQ_CTX + k] = fi.woff_l[k]
                        q.len[RQ_CTX + k] = fi.wlen_l[k]
                    else:
                        q.off[RQ_CTX + k] = fi.woff_g[k]
                        q.len[RQ_CTX + k] = fi.wlen_g[k]
            elif fl | fg:
                for k in range(rs.ck.n):
                    g = rs.gmap[k]
                    if (fl >> g) & 1:
                        q.off[RQ_CTX + k] = fi.woff_l[g]
                        q.len[RQ_CTX + k] = fi.wlen_l[g]
                        have |= (<uint64_t>1) << (RQ_CTX + k)
                    elif (fg >> g) & 1:
                        q.off[RQ_CTX + k] = fi.woff_g[g]
                        q.len[RQ_CTX + k] = fi.wlen_g[g]
                        have |= (<uint64_t>1) << (RQ_CTX + k)
        else:
            have |= fr_context_many(p, fi, &rs.ck, &q.off[RQ_CTX], &q.len[RQ_CTX]) << RQ_CTX
    m = rs.int_slots & have
    while m:
        s = rt_ctz64(m)
        m &= m - 1
        q.iv[s] = 0
        if rt_parse_i64_at(p, q.off[s], q.len[s], &q.iv[s]):
            have |= (<uint64_t>1) << (32 + s)
    m = rs.pct_slots & have
    while m:
        s = rt_ctz64(m)
        m &= m - 1
        q.pb[s] = <uint32_t>(rt_fnv1a64(p + q.off[s], q.len[s]) % 10000)
    # a missing value reads as nothing (no bytes, integer 0, bucket 0): the
    # grouped conditions read every slot, and `need` already makes any rule
    # that reads it false
    m = rs.slots & ~have
    while m:
        s = rt_ctz64(m)
        m &= m - 1
        q.off[s] = 0
        q.len[s] = -1
        q.iv[s] = 0
        q.pb[s] = 0
    q.have = have


cdef inline uint64_t rt_flat(RtRules rs, const RtReq* q, const uint8_t* p) noexcept:
    """The mask of the grouped conditions (RtRules.fc) that are true for
    this request: one loop, one switch per condition (sorted by op, so the
    switch's jumps repeat in runs)."""
    cdef uint64_t t = 0
    cdef int64_t x
    cdef uint32_t r
    cdef Py_ssize_t k
    cdef const RtFc* f = rs.fc
    cdef int s, op
    cdef bint b
    for k in range(rs.nfc):
        s = f.slot
        op = f.op
        if op == RO_EQ:
            b = q.len[s] == f.vlen and rt_same(p + q.off[s], f.val, f.vlen)
        elif op == RO_IN:
            # the lengths of the set's values first (f.b: bit l, 63 for 63+)
            b = (q.len[s] >= 0 and (<uint64_t>f.b >> (q.len[s] if q.len[s] < 63 else 63)) & 1
                 and rt_in(f.c, p + q.off[s], q.len[s]))
        elif op == RO_PREFIX:
            b = q.len[s] >= f.vlen and rt_same(p + q.off[s], f.val, f.vlen)
        elif op == RO_PRESENT:
            b = q.len[s] > 0
        elif op == RO_RANGE:
            x = q.iv[s]
            b = f.a <= x < f.b
        elif op == RO_MOD:
            x = q.iv[s]
            if f.m != 0 and 0 <= x < 4294967296LL:
                # the common case: a modulus up to RT_MOD_BITS, a value in
                # [0, 2^32): the remainder's bit in the bitmap
                r = rt_fastmod(<uint32_t>x, f.m, <uint32_t>f.a)
                b = (rt_bits_word(f.val, r >> 6) >> (r & 63)) & 1
            else:
                b = rt_mod_in(f.c, x)
        else:
            b = q.pb[s] < <uint32_t>f.a
        t |= (<uint64_t>b) << k
        f += 1
    return t


cdef inline bint rt_mod_in(const RtCond* c, int64_t x) noexcept:
    # floored like Python's %: -3 % 10 == 7
    cdef int64_t r
    cdef Py_ssize_t i
    if c.mod_m != 0 and -4294967296LL < x < 4294967296LL:
        r = rt_fastmod(<uint32_t>(x if x >= 0 else -x), c.mod_m, <uint32_t>c.modulus)
        if x < 0 and r != 0:
            r = c.modulus - r
    else:
        r = x % c.modulus
        if r < 0:
            r += c.modulus
    for i in range(c.nrems):
        if c.rems[i] == r:
            return True
    return False


cdef inline bint rt_in(const RtCond* c, const uint8_t* v, Py_ssize_t vl) noexcept:
    cdef Py_ssize_t i
    for i in range(c.nvals):
        if vl == c.vlens[i] and rt_same(v, c.vals[i], vl):
            return True
    return False


cdef bint rt_test_alone(const RtCond* c, const uint8_t* p, const FrameInfo* fi) noexcept:
    """A condition on a context key past the one-pass table: looked up on
    its own, parsed or hashed for this condition only."""
    cdef Py_ssize_t vl = -1
    cdef Py_ssize_t off = fr_context_get(p, fi, c.key, c.key_len, &vl)
    cdef const uint8_t* v
    cdef int64_t x
    if off < 0:
        return False
    v = p + off
    if c.aop == RO_EQ:
        return vl == c.vlen0 and rt_same(v, c.val0, vl)
    if c.aop == RO_IN:
        return rt_in(c, v, vl)
    if c.aop == RO_PREFIX:
        return vl >= c.vlen0 and rt_same(v, c.val0, c.vlen0)
    if c.aop == RO_PRESENT:
        return vl > 0
    if c.aop == RO_PRESENT_ANY:
        return True
    if c.aop == RO_PERCENT:
        return <uint32_t>(rt_fnv1a64(v, vl) % 10000) < c.threshold
    if not rt_parse_i64(v, vl, &x):
        return False
    if c.aop == RO_RANGE:
        return c.lo <= x < c.hi
    return rt_mod_in(c, x)


cdef inline bint rt_test(RouteTable t, const RtCond* c, const RtReq* q, const uint8_t* p,
                         const FrameInfo* fi) noexcept:
    """One condition on one request.  The rule's `need` was checked first,
    so the slot it reads is present (and an integer for range and mod)."""
    cdef int s = c.slot
    cdef int op = c.op
    if op == RO_EQ:
        return q.len[s] == c.vlen0 and rt_same(p + q.off[s], c.val0, c.vlen0)
    elif op == RO_IN:
        return rt_in(c, p + q.off[s], q.len[s])
    elif op == RO_PREFIX:
        return q.len[s] >= c.vlen0 and rt_same(p + q.off[s], c.val0, c.vlen0)
    elif op == RO_PRESENT:
        return q.len[s] > 0
    elif op == RO_RANGE:
        return c.lo <= q.iv[s] < c.hi
    elif op == RO_MOD:
        return rt_mod_in(c, q.iv[s])
    elif op == RO_PERCENT:
        return q.pb[s] < c.threshold
    elif op == RO_RANDOM:
        return rt_below(rt_rand(&t._rng), 10000) < c.threshold
    else:
        return rt_test_alone(c, p, fi)


cdef inline Node rt_pick(RouteTable t, CandSet cs, const uint8_t* hashkey, Py_ssize_t hashkey_len):
    cdef double now
    cdef Py_ssize_t i
    cdef Node nd
    if cs.warming:
        # weights follow the clock: recompute at most once per tick
        now = t._clock.now()
        if now - cs.prepared_at >= RT_WARM_TICK:
            lb_prepare(cs, now, &t._rng)
    i = lb_pick(cs, &t._rng, hashkey, hashkey_len)
    nd = <Node>cs.nodes[i]
    nd.picks += 1
    return nd


cdef inline bytes _b(str s):
    return s.encode("utf-8")


cdef list rt_health_locality(list group, str own_idc, str own_region):
    """Steps 3 and 4 over the nodes of one (cell, lane).  Ejected nodes
    (outlier detection) count as unhealthy, unless that would leave the set
    empty: then they serve (no silent black hole, docs/governance.md)."""
    cdef list res = rt_health_locality_ej(group, own_idc, own_region, True)
    if not res:
        res = rt_health_locality_ej(group, own_idc, own_region, False)
    return res


cdef list rt_health_locality_ej(list group, str own_idc, str own_region, bint skip_ejected):
    cdef list prim = [], back = [], tier
    cdef Node nd
    for nd in group:
        if nd.weight <= 0 or nd.status != _STATUS_ALIVE or (skip_ejected and nd.ejected):
            continue
        if nd.role == _ROLE_PRIMARY:
            prim.append(nd)
        else:
            back.append(nd)
    if not prim:
        prim = back
    if own_idc:
        tier = [nd for nd in prim if nd.idc == own_idc]
        if tier:
            return tier
    if own_region:
        tier = [nd for nd in prim if nd.region == own_region]
        if tier:
            return tier
    return prim


cdef CandSet rt_make_cs(RouteTable t, ServiceEntry old, int policy, str gname, str cell,
                        str lane, list group, double now):
    cdef list cands = rt_health_locality(group, t._own_idc, t._own_region)
    cdef CandSet cs = cs_new(policy, cell, lane, len(group), cands, now)
    cdef CandSet prev
    if old is not None:
        prev = old.by_key.get(_ck(gname, cell, lane))
        if prev is not None and cs_same(prev, cs):
            # same candidates: keep the old set and its picker state (RR position)
            return prev
    if cs.n > 0:
        lb_prepare(cs, now, &t._rng)
    return cs


cdef ServiceEntry rt_build_service(RouteTable t, object svc, ServiceEntry old, double now):
    cdef ServiceEntry e = ServiceEntry.__new__(ServiceEntry)
    cdef dict old_nodes = old.nodes_by_addr if old is not None else None
    cdef dict by_addr = {}
    cdef list nodes = []
    cdef dict ngroups = {}   # group -> {cell -> {lane -> [Node]}}
    cdef dict groups         # cell -> {lane -> [Node]}
    cdef str gname
    cdef GroupEntry ge
    cdef dict lanes
    cdef list grp
    cdef Node nd
    cdef str appkey = svc.appkey, host, addr, cell, lane
    cdef object ep, policy_v
    cdef int port, policy
    cdef CellEntry ce
    cdef CandSet cs
    cdef list lkeys, lhash, lvals, ckeys, chash, cvals
    cdef bytes kb
    t.builds += 1
    policy_v = svc.lb_policy
    policy = _POLICIES.get(str(policy_v), -1)
    if policy < 0:
        raise ValueError(f"service {appkey!r}: unknown lb_policy {policy_v!r}")
    for ep in svc.endpoints:
        host = ep.host
        port = ep.port
        addr = f"{host}:{port}"
        if addr in by_addr:
            continue    # duplicate address: the first endpoint wins
        nd = None
        if old_nodes is not None:
            nd = old_nodes.get(addr)
        if nd is None:
            nd = Node.__new__(Node)
            nd.appkey = appkey
            nd.host = host
            nd.port = port
            nd.address = addr
            nd.addr_b = _b(addr)
            nd.clock = t._clock
        # reused nodes are refreshed in place: labels/weights may have changed
        nd.weight = ep.weight
        nd.status = ep.status
        nd.role = ep.role
        nd.cell = ep.cell
        nd.swimlane = ep.swimlane
        nd.idc = ep.idc
        nd.region = ep.region
        nd.warmup_s = ep.warmup_s
        nd.start_time = ep.start_time
        nd.group = ep.group
        by_addr[addr] = nd
        nodes.append(nd)
        # grouped nodes are kept apart: default routing never sees them
        groups = ngroups.get(nd.group)
        if groups is None:
            groups = ngroups[nd.group] = {}
        lanes = groups.get(nd.cell)
        if lanes is None:
            lanes = groups[nd.cell] = {}
        grp = lanes.get(nd.swimlane)
        if grp is None:
            lanes[nd.swimlane] = [nd]
        else:
            grp.append(nd)
    if "" not in ngroups:
        ngroups[""] = {}
    if t.gov_hook is not None:
        # governance: each node's NodeGov and ejection state, before the sets are made
        t.gov_hook(svc, nodes)
    e.appkey = appkey
    e.appkey_b = _b(appkey)
    e.appkey_h = rt_hash_bytes(e.appkey_b)
    e.policy = policy
    e.set_enabled = bool(svc.set_enabled)
    e.service = svc
    e.nodes = nodes
    e.nodes_by_addr = by_addr
    e.by_key = {}
    e.groups = {}
    for gname, groups in ngroups.items():
        # by_key: (cell, lane) for the default nodes, (group, cell, lane) for a group's
        ge = GroupEntry.__new__(GroupEntry)
        ge.name = gname
        ckeys = []
        chash = []
        cvals = []
        if "" not in groups:
            groups[""] = {}
        for cell, lanes in groups.items():
            ce = CellEntry.__new__(CellEntry)
            ce.cell = cell
            lkeys = []
            lhash = []
            lvals = []
            for lane, grp in lanes.items():
                cs = rt_make_cs(t, old, policy, gname, cell, lane, grp, now)
                e.by_key[_ck(gname, cell, lane)] = cs
                if lane:
                    kb = _b(lane)
                    lkeys.append(kb)
                    lhash.append(rt_hash_bytes(kb))
                    lvals.append(cs)
            if "" in lanes:
                ce.trunk = e.by_key[_ck(gname, cell, "")]
            else:
                ce.trunk = rt_make_cs(t, old, policy, gname, cell, "", [], now)
                e.by_key[_ck(gname, cell, "")] = ce.trunk
            ce.lanes = rt_index_new(lkeys, lhash, lvals)
            if cell:
                kb = _b(cell)
                ckeys.append(kb)
                chash.append(rt_hash_bytes(kb))
                cvals.append(ce)
            else:
                ge.center = ce
        ge.cells = rt_index_new(ckeys, chash, cvals)
        if gname:
            e.groups[gname] = ge
        else:
            e.cells = ge.cells
            e.center = ge.center
    e.default_cs = None
    e.default_err = RT_OK
    e.shunt = rt_compile_rules(t, e)
    return e


cdef inline tuple _ck(str group, str cell, str lane):
    return (cell, lane) if not group else (group, cell, lane)


cdef int rt_set_default(RouteTable t, ServiceEntry e) except -1:
    """Precompute the lookup for the proxy's own labels (the common case)."""
    cdef int err = RT_OK
    e.default_cs = rt_resolve(t, e, NULL, -1, NULL, -1, NULL, -1, &err)
    e.default_err = err
    return 0


cdef Snapshot rt_snapshot(dict entries):
    """Index a set of service entries (their pick structures are reused as-is)."""
    cdef Snapshot s = Snapshot.__new__(Snapshot)
    cdef list keys = [], hashes = [], vals = [], nkeys = [], nhash = [], nvals = []
    cdef ServiceEntry e
    cdef dict names = {}
    cdef str name, ak
    cdef bytes nb
    for e in entries.values():
        keys.append(e.appkey_b)
        hashes.append(e.appkey_h)
        vals.append(e)
        for name in e.service.service_names:
            ak = names.get(name)
            # a serviceName claimed by several services: the smallest appkey wins
            if ak is None or e.appkey < ak:
                names[name] = e.appkey
    for name, ak in names.items():
        nb = _b(name)
        nkeys.append(nb)
        nhash.append(rt_hash_bytes(nb))
        nvals.append(entries[ak])
    s.entries = entries
    s.by_appkey = rt_index_new(keys, hashes, vals)
    s.by_name = rt_index_new(nkeys, nhash, nvals)
    s.name_to_appkey = names
    return s


# ------------------------------------------------------------------ lookup

cdef inline CandSet rt_resolve(RouteTable t, ServiceEntry svc,
                               const uint8_t* l, Py_ssize_t ll,
                               const uint8_t* s, Py_ssize_t sl,
                               const uint8_t* w, Py_ssize_t wl, int* err):
    return rt_resolve_in(t, svc.cells, svc.center, svc.set_enabled, l, ll, s, sl, w, wl, err)


cdef CandSet rt_resolve_in(RouteTable t, RtIndex cells, CellEntry center, bint set_enabled,
                           const uint8_t* l, Py_ssize_t ll,
                           const uint8_t* s, Py_ssize_t sl,
                           const uint8_t* w, Py_ssize_t wl, int* err):
    """Steps 1-2 as two O(1) probes; steps 3-4 were done at build time."""
    cdef uint64_t lh = 0, sh = 0, wh = 0
    cdef PyObject* p
    cdef CellEntry ce
    cdef CandSet cs
    if ll < 0:
        l = <const uint8_t*><char*>t._own_l
        ll = len(t._own_l)
        lh = t._own_l_h
    elif ll > 0:
        lh = rt_xxh64(l, ll, 0)
    if ll > 0:
        # LiteSet: its cell, else the center
        p = cells.get(l, ll, lh)
        ce = <CellEntry>p if p != NULL else center
    else:
        if sl < 0:
            s = <const uint8_t*><char*>t._own_s
            sl = len(t._own_s)
            sh = t._own_s_h
        elif sl > 0:
            sh = rt_xxh64(s, sl, 0)
        if sl > 0 and set_enabled:
            # Set: its cell, no fallback
            p = cells.get(s, sl, sh)
            if p == NULL:
                err[0] = RT_SET_NO_NODE
                return None
            ce = <CellEntry>p
        else:
            ce = center
    if wl < 0:
        w = <const uint8_t*><char*>t._own_w
        wl = len(t._own_w)
        wh = t._own_w_h
    elif wl > 0:
        wh = rt_xxh64(w, wl, 0)
    cs = ce.trunk
    if wl > 0:
        p = ce.lanes.get(w, wl, wh)
        if p != NULL:
            cs = <CandSet>p
    if cs.err != RT_OK:
        err[0] = cs.err
        return None
    return cs


cdef inline ServiceEntry rt_find(Snapshot snap, const uint8_t* appkey, Py_ssize_t appkey_len,
                                 const uint8_t* service, Py_ssize_t service_len,
                                 int* err):
    cdef PyObject* p
    if appkey_len > 0:
        p = snap.by_appkey.get(appkey, appkey_len, rt_xxh64(appkey, appkey_len, 0))
    elif service_len > 0:
        p = snap.by_name.get(service, service_len, rt_xxh64(service, service_len, 0))
    else:
        err[0] = RT_NO_SERVICE_KEY
        return None
    if p == NULL:
        err[0] = RT_UNKNOWN_SERVICE
        return None
    return <ServiceEntry>p


cdef inline const uint8_t* _ptr(object b, Py_ssize_t* n):
    # None -> absent (-1); else the bytes' buffer
    if b is None:
        n[0] = -1
        return NULL
    n[0] = len(<bytes>b)
    return <const uint8_t*><char*><bytes>b


cdef object _enc(object v):
    if v is None or isinstance(v, bytes):
        return v
    return (<str>v).encode("utf-8")


# ------------------------------------------------------------------- table

@cython.final
cdef class RouteTable:
    """The live route table: immutable snapshots swapped atomically inside."""

    def __init__(self, labels, *, seed=None, clock=None):
        self.labels = labels
        self.version = 0
        self.builds = 0
        self._services = {}
        self._own_l = _b(labels.liteset)
        self._own_s = _b(labels.set)
        self._own_w = _b(labels.swimlane)
        self._own_l_h = rt_hash_bytes(self._own_l)
        self._own_s_h = rt_hash_bytes(self._own_s)
        self._own_w_h = rt_hash_bytes(self._own_w)
        self._own_idc = labels.idc
        self._own_region = labels.region
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self._rng = <uint64_t>(seed & 0xFFFFFFFFFFFFFFFF)
        rt_rand(&self._rng)
        self._clock = RtClock.__new__(RtClock)
        self._clock.fn = clock
        self._snap = rt_snapshot({})
        self._shunt = {}
        self._stats = {}
        self.last_rule = NULL
        self.last_label = -1
        self._want = CtxWant.__new__(CtxWant)
        self._want.k.n = 0
        self._want.keep = []
        self._want.full = False
        self.want = NULL

    # -- the data path's entry point ---------------------------------------

    cdef Node rt_route(self,
                       const uint8_t* appkey, Py_ssize_t appkey_len,
                       const uint8_t* service, Py_ssize_t service_len,
                       const uint8_t* liteset, Py_ssize_t liteset_len,
                       const uint8_t* set_, Py_ssize_t set_len,
                       const uint8_t* swimlane, Py_ssize_t swimlane_len,
                       const uint8_t* hashkey, Py_ssize_t hashkey_len,
                       int* err):
        cdef ServiceEntry svc
        cdef CandSet cs
        svc = rt_find(self._snap, appkey, appkey_len, service, service_len, err)
        if svc is None:
            return None
        if liteset_len < 0 and set_len < 0 and swimlane_len < 0:
            cs = svc.default_cs
            if cs is None:
                err[0] = svc.default_err
                return None
        else:
            cs = rt_resolve(self, svc, liteset, liteset_len, set_, set_len,
                            swimlane, swimlane_len, err)
            if cs is None:
                return None
        err[0] = RT_OK
        return rt_pick(self, cs, hashkey, hashkey_len)

    cdef Node rt_route_req(self, const uint8_t* p, FrameInfo* fi, int* err):
        cdef ServiceEntry svc
        cdef CandSet cs
        cdef RtRules rs
        cdef RtRule* r
        cdef ShuntStat st
        cdef GroupEntry ge
        cdef PyObject* hit
        cdef Py_ssize_t voff, vl = 0
        cdef RtReq q
        cdef uint64_t have, truth, cand = 0, m
        cdef Py_ssize_t i, n
        cdef const RtRm* rm
        cdef const RtCond* c
        cdef const RtCond* cend
        cdef const uint8_t* lp = p + fi.liteset_off
        cdef const uint8_t* sp = p + fi.set_off
        cdef const uint8_t* wp = p + fi.swimlane_off
        cdef Py_ssize_t ll = fi.liteset_len, sl = fi.set_len, wl = fi.swimlane_len
        cdef const uint8_t* vp
        self.last_rule = NULL
        self.last_label = -1
        svc = rt_find(self._snap, p + fi.appkey_off, fi.appkey_len,
                      p + fi.service_off, fi.service_len, err)
        if svc is None:
            return None
        rs = svc.shunt
        if rs is not None:
            rt_req_fill(rs, p, fi, &q)
            # first match wins: the service's rules, then the global ones
            have = q.have
            truth = rt_flat(rs, &q, p) if rs.nfc else 0
            rm = rs.rm
            n = rs.n
            i = -1
            if rs.small:
                # only the rules with no grouped condition or a true one
                cand = rs.zr
                m = truth
                while m:
                    cand |= rs.rhas[rt_ctz64(m)]
                    m &= m - 1
            while True:
                if rs.small:
                    if not cand:
                        break
                    i = rt_ctz64(cand)
                    cand &= cand - 1
                else:
                    i += 1
                    if i >= n:
                        break
                # a value it reads is missing (or not an integer), or one of
                # its grouped conditions is false: one test for both
                if (rm[i].need & ~have) | (rm[i].cmask & ~truth):
                    continue
                r = &rs.rules[i]
                if r.nrest:
                    # random draws and keys looked up alone, in order
                    c = r.conds
                    cend = c + r.nconds
                    while c < cend:
                        if not c.in_mask and not rt_test(self, c, &q, p, fi):
                            break
                        c += 1
                    if c < cend:
                        continue
                if r.action == RA_CONTEXT:
                    if r.skey != NULL:
                        # unit mapping: a value missing from the table is no match
                        if r.skslot >= 0:
                            voff = q.off[r.skslot]  # present: checked with `need`
                            vl = q.len[r.skslot]
                        else:
                            voff = fr_context_get(p, fi, r.skey, r.skey_len, &vl)
                            if voff < 0:
                                continue
                        hit = (<RtIndex>r.table).get(p + voff, vl, rt_xxh64(p + voff, vl, 0))
                        if hit == NULL:
                            continue
                        vp = <const uint8_t*>PyBytes_AS_STRING(<object>hit)
                        vl = PyBytes_GET_SIZE(<object>hit)
                    else:
                        vp = <const uint8_t*>r.value
                        vl = r.value_len
                    self.last_label = r.target
                    self.last_label_val = <const char*>vp
                    self.last_label_len = vl
                    if r.target == 0:
                        lp = vp
                        ll = vl
                    elif r.target == 1:
                        sp = vp
                        sl = vl
                    else:
                        wp = vp
                        wl = vl
                st = <ShuntStat>r.stat
                st.hits += 1
                self.last_rule = r.stat
                if r.action == RA_GROUP:
                    cs = None
                    if r.group != NULL:
                        ge = <GroupEntry>r.group
                        cs = rt_resolve_in(self, ge.cells, ge.center, svc.set_enabled,
                                           lp, ll, sp, sl, wp, wl, err)
                    if cs is not None:
                        err[0] = RT_OK
                        return rt_pick(self, cs, p + fi.hashkey_off, fi.hashkey_len)
                    if r.reject:
                        st.rejects += 1
                        err[0] = RT_SHUNT_NO_NODE
                        return None
                    st.fallbacks += 1
                break
        if ll < 0 and sl < 0 and wl < 0:
            cs = svc.default_cs
            if cs is None:
                err[0] = svc.default_err
                return None
        else:
            cs = rt_resolve(self, svc, lp, ll, sp, sl, wp, wl, err)
            if cs is None:
                return None
        err[0] = RT_OK
        return rt_pick(self, cs, p + fi.hashkey_off, fi.hashkey_len)

    # -- building -----------------------------------------------------------

    def _swap(self, Snapshot snap):
        cdef ServiceEntry e
        # own-label lookups are resolved after indexing; assigning _snap is the swap
        for e in snap.entries.values():
            if e.default_cs is None and e.default_err == RT_OK:
                rt_set_default(self, e)
        self._snap = snap
        self.version += 1

    def update_service(self, service):
        """Add or replace one service; only that service is rebuilt."""
        cdef Snapshot cur = self._snap
        cdef ServiceEntry old = cur.entries.get(service.appkey)
        cdef ServiceEntry e = rt_build_service(self, service, old, self._clock.now())
        cdef dict entries = dict(cur.entries)
        entries[e.appkey] = e
        self._services[e.appkey] = service
        self._swap(rt_snapshot(entries))

    def rebuild(self, appkey):
        """Rebuild one service from what it was last given (e.g. a node's
        ejection changed); no error if absent."""
        svc = self._services.get(appkey)
        if svc is not None:
            self.update_service(svc)

    def remove_service(self, appkey):
        """Remove one service (no error if absent)."""
        cdef Snapshot cur = self._snap
        cdef dict entries
        if appkey not in cur.entries:
            return
        entries = dict(cur.entries)
        del entries[appkey]
        self._services.pop(appkey, None)
        self._swap(rt_snapshot(entries))

    def replace_all(self, services):
        """Full build from an iterable of Service (nodes that stay keep their state)."""
        cdef Snapshot cur = self._snap
        cdef dict entries = {}, src = {}
        cdef double now = self._clock.now()
        cdef ServiceEntry e
        for svc in services:
            src[svc.appkey] = svc
        for appkey, svc in src.items():
            e = rt_build_service(self, svc, cur.entries.get(appkey), now)
            entries[appkey] = e
        self._services = src
        self._swap(rt_snapshot(entries))

    def update_shunting(self, str scope, rules):
        """Replace the shunting rules of `scope` (a provider appkey, or
        model.SHUNT_GLOBAL for the global rules); an empty tuple removes them.
        ValueError naming the rule when the set is invalid (nothing changes
        then).  docs/shunting.md."""
        cdef ShuntStat st
        rules = tuple(rules)
        _shunting.validate_rules(scope, rules)
        if rules == self._shunt.get(scope, ()):
            return
        stats = {}
        for rule in rules:
            st = self._stats.get((scope, rule.name))
            if st is None:
                st = ShuntStat.__new__(ShuntStat)
                st.scope = scope
                st.name = rule.name
                st.label = f"{scope}/{rule.name}"
            elif st.rule != rule:
                st.answers = None  # its answer names the rule's group
            st.rule = rule
            stats[(scope, rule.name)] = st
        for key in [k for k in self._stats if k[0] == scope]:
            if key not in stats:
                del self._stats[key]
        self._stats.update(stats)
        if rules:
            self._shunt[scope] = rules
        else:
            self._shunt.pop(scope, None)
        # recompiled into a new snapshot, swapped at once (a request sees the
        # old rules or the new ones, never a mix); every service when the
        # scan-time keys were rebuilt (their places changed)
        if rt_want_update(self) or scope == _model.SHUNT_GLOBAL:
            if self._services:
                self.replace_all(list(self._services.values()))
        elif scope in self._services:
            self.update_service(self._services[scope])

    def scan_keys(self):
        """The context keys outbound connections pick out while scanning a
        request (every key the rules read, at most FR_WANT = 16): a tuple,
        () when no rules read one, None when the rules read more (then the
        rules walk the maps themselves).  docs/shunting.md."""
        if self._want.full:
            return None
        return tuple(b.decode("utf-8") for b in self._want.keep)

    def shunting_rules(self, str scope):
        """The rules stored for `scope` (empty tuple when none)."""
        return self._shunt.get(scope, ())

    def shunting_stats(self):
        """Every rule with its counters, in evaluation order per scope
        (the global rules last): dicts for /clusters and /config_dump."""
        cdef ShuntStat st
        out = []
        for scope in sorted(self._shunt, key=lambda s: (s == _model.SHUNT_GLOBAL, s)):
            for rule in self._shunt[scope]:
                st = self._stats[(scope, rule.name)]
                # a default action's hits are its fallbacks in the core: routed
                out.append({"scope": scope, "name": st.name, "hits": st.hits,
                            "fallbacks": 0 if rule.action == _model.ACT_DEFAULT
                            else st.fallbacks,
                            "rejects": st.rejects, "rule": rule})
        return out

    def shunt_stat(self, str scope, str name):
        """The counters of one rule (None when there is no such rule)."""
        return self._stats.get((scope, name))

    def groups(self, appkey):
        """The named node groups of a service that has nodes in them."""
        cdef ServiceEntry e = self._snap.entries.get(appkey)
        if e is None:
            raise RouteError(RT_UNKNOWN_SERVICE, f"unknown service: appkey {appkey!r}")
        return sorted(e.groups)

    def route_frame(self, frame, bint scan_keys=True):
        """Route one request frame (bytes) with its shunting rules: the
        Python twin of rt_route_req.  Returns (node, matched rule name or
        None); RouteError on failure (RT_SHUNT_NO_NODE names the rule).
        scan_keys: the scan picks out the rules' context keys, as an
        outbound connection's does (fr_scan_want); False: the rules walk
        the maps themselves (fr_context_many)."""
        cdef bytes b = bytes(frame)
        cdef FrameInfo fi
        cdef int err = RT_OK
        cdef Py_ssize_t r = fr_scan_want(<const uint8_t*><char*>b, len(b), len(b) + 1, 65536, &fi,
                                         self.want if scan_keys else NULL)
        if r <= 0:
            raise ValueError(f"not a whole frame ({r})")
        nd = self.rt_route_req(<const uint8_t*><char*>b, &fi, &err)
        name = (<ShuntStat>self.last_rule).name if self.last_rule != NULL else None
        if nd is None:
            e = RouteError(err, self.shunt_message(<ShuntStat>self.last_rule)
                           if err == RT_SHUNT_NO_NODE else f"routing error {err}")
            e.rule = name
            raise e
        return nd, name

    def shunt_message(self, ShuntStat st):
        """The message of a rule's status-8 answer (its group has no node)."""
        scope = "global rule" if st.scope == _model.SHUNT_GLOBAL else "rule"
        return (f"traffic shunting: {scope} {st.name!r} sends this request to node group "
                f"{st.rule.group!r}, which has no serving node for it (on_no_node: reject)")

    def shunting_scopes(self):
        """Every scope with rules (appkeys and possibly model.SHUNT_GLOBAL)."""
        return sorted(self._shunt)

    def set_time(self, now):
        """Freeze the warm-up clock at `now` (unix seconds); None unfreezes."""
        if now is None:
            self._clock.has_fixed = False
        else:
            self._clock.fixed = now
            self._clock.has_fixed = True

    # -- inspection ---------------------------------------------------------

    def has_service(self, appkey):
        return appkey in self._snap.entries

    def appkeys(self):
        return list(self._snap.entries)

    def service_names(self):
        """serviceName -> appkey, as the index resolves it."""
        return dict(self._snap.name_to_appkey)

    def nodes(self, appkey):
        cdef ServiceEntry e = self._snap.entries.get(appkey)
        if e is None:
            raise RouteError(RT_UNKNOWN_SERVICE, f"unknown service: appkey {appkey!r}")
        return list(e.nodes)

    def _entry(self, appkey):
        """The service's entry in the current snapshot (tests: identity across updates)."""
        return self._snap.entries.get(appkey)

    def _candset(self, appkey, liteset=None, set=None, swimlane=None):
        """The CandSet object a lookup resolves to (tests: identity/reuse)."""
        cs, _ = self._lookup(_enc(appkey), None, _enc(liteset), _enc(set), _enc(swimlane))
        return cs

    def _lookup(self, object ak, object sn, object l, object s, object w):
        cdef Py_ssize_t akl, snl, ll, sl, wl
        cdef const uint8_t* akp = _ptr(ak, &akl)
        cdef const uint8_t* snp = _ptr(sn, &snl)
        cdef const uint8_t* lp = _ptr(l, &ll)
        cdef const uint8_t* sp = _ptr(s, &sl)
        cdef const uint8_t* wp = _ptr(w, &wl)
        cdef int err = RT_OK
        cdef ServiceEntry svc = rt_find(self._snap, akp, akl, snp, snl, &err)
        if svc is None:
            return None, err
        cs = rt_resolve(self, svc, lp, ll, sp, sl, wp, wl, &err)
        return cs, err

    def candidates(self, appkey, liteset=None, set=None, swimlane=None):
        """The candidate set a lookup returns (after steps 1-4); RouteError if none."""
        cs, err = self._lookup(_enc(appkey), None, _enc(liteset), _enc(set), _enc(swimlane))
        if cs is None:
            raise RouteError(err, self.error_message(err, appkey, None, liteset, set, swimlane))
        return list((<CandSet>cs).node_list)

    def route(self, appkey=None, service_name=None, liteset=None, set=None,
              swimlane=None, hash_key=None):
        """Route one request (Python twin of rt_route); RouteError on failure."""
        cdef bytes ak = _enc(appkey), sn = _enc(service_name)
        cdef bytes l = _enc(liteset), s = _enc(set), w = _enc(swimlane), hk = _enc(hash_key)
        cdef Py_ssize_t akl, snl, ll, sl, wl, hkl
        cdef const uint8_t* akp = _ptr(ak, &akl)
        cdef const uint8_t* snp = _ptr(sn, &snl)
        cdef const uint8_t* lp = _ptr(l, &ll)
        cdef const uint8_t* sp = _ptr(s, &sl)
        cdef const uint8_t* wp = _ptr(w, &wl)
        cdef const uint8_t* hkp = _ptr(hk, &hkl)
        cdef int err = RT_OK
        nd = self.rt_route(akp, akl, snp, snl, lp, ll, sp, sl, wp, wl, hkp, hkl, &err)
        if nd is None:
            raise RouteError(err, self.error_message(err, appkey, service_name,
                                                     liteset, set, swimlane))
        return nd

    def error_message(self, int code, appkey=None, service_name=None, liteset=None,
                      set=None, swimlane=None):
        """A message that says why a lookup failed (for the RpcException answer)."""
        def _s(v):
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else v
        appkey, service_name = _s(appkey), _s(service_name)
        liteset, set, swimlane = _s(liteset), _s(set), _s(swimlane)
        lab = self.labels
        if code == RT_NO_SERVICE_KEY:
            return "request names neither an appkey (octo-remote-appkey) nor a serviceName"
        if code == RT_UNKNOWN_SERVICE:
            if appkey:
                return f"unknown service: appkey {appkey!r} is not in the route table"
            return f"unknown serviceName {service_name!r}: not in the service index"
        if not appkey:
            appkey = self._snap.name_to_appkey.get(service_name, service_name)
        if code == RT_SET_NO_NODE:
            s = set if set is not None else lab.set
            return (f"service {appkey!r}: Set cell {s!r} has no node "
                    f"(Set-enabled service, no fallback to the center)")
        if code == RT_NO_HEALTHY:
            self._lookup(_enc(appkey), None, _enc(liteset), _enc(set), _enc(swimlane))
            cell, lane, n = "", "", 0
            e = self._snap.entries.get(appkey)
            if e is not None:
                # find the (cell, lane) the lookup resolved to, for the message
                cell, lane, n = _resolved_where(self, e, liteset, set, swimlane)
            where = f"cell {cell!r}" if cell else "the center"
            lanes = f"swimlane {lane!r}" if lane else "the trunk"
            return (f"service {appkey!r}: no healthy node in {where}, {lanes} "
                    f"({n} endpoint(s) there, all weight 0 / not ALIVE)")
        return f"routing error {code}"


cdef tuple _resolved_where(RouteTable t, ServiceEntry e, liteset, set_, swimlane):
    # slow path, messages only: mirror rt_resolve to name the (cell, lane)
    cdef str l = liteset if liteset is not None else t.labels.liteset
    cdef str s = set_ if set_ is not None else t.labels.set
    cdef str w = swimlane if swimlane is not None else t.labels.swimlane
    cdef str cell = ""
    cdef CandSet cs
    cells = {k[0] for k in e.by_key if len(k) == 2}
    if l:
        cell = l if l in cells else ""
    elif s and e.set_enabled:
        cell = s
    lane = w if (w and (cell, w) in e.by_key) else ""
    cs = e.by_key.get((cell, lane))
    return cell, lane, (cs.n_endpoints if cs is not None else 0)


# ------------------------------------------------------------ bench helper

def bench_route(RouteTable table, bytes appkey, long n_iter, bytes hash_key=None,
                bint send_done=False, bytes liteset=None, bytes set_=None,
                bytes swimlane=None):
    """Loop rt_route n_iter times in C (as the data path calls it); returns the
    number of successful picks.  send_done: also lb_on_send/lb_on_done.
    liteset/set_/swimlane: context labels (None = absent)."""
    cdef long i, ok = 0
    cdef int err = 0
    cdef Node nd
    cdef const uint8_t* ak = <const uint8_t*><char*>appkey
    cdef Py_ssize_t akl = len(appkey), hkl, ll, sl, wl
    cdef const uint8_t* hk = _ptr(hash_key, &hkl)
    cdef const uint8_t* lp = _ptr(liteset, &ll)
    cdef const uint8_t* sp = _ptr(set_, &sl)
    cdef const uint8_t* wp = _ptr(swimlane, &wl)
    for i in range(n_iter):  # no-cython-lint: only the count matters
        nd = table.rt_route(ak, akl, NULL, -1, lp, ll, sp, sl, wp, wl, hk, hkl, &err)
        if nd is not None:
            ok += 1
            if send_done:
                lb_on_send(nd)
                lb_on_done(nd)
    return ok


def bench_scan_route(RouteTable table, bytes frame, long n_iter):
    """Scan one request frame and route it, n_iter times in C, as an
    outbound connection does (fr_scan_want with the table's context keys,
    then rt_route_req); returns the number of successful picks."""
    cdef long i, ok = 0
    cdef int err = 0
    cdef FrameInfo fi
    cdef Py_ssize_t n = len(frame)
    cdef const uint8_t* p = <const uint8_t*><char*>frame
    for i in range(n_iter):  # no-cython-lint: only the count matters
        if fr_scan_want(p, n, n + 1, 65536, &fi, table.want) != n:
            raise ValueError("not a whole frame")
        if table.rt_route_req(p, &fi, &err) is not None:
            ok += 1
    return ok


def bench_route_req(RouteTable table, bytes frame, long n_iter):
    """Loop rt_route_req n_iter times in C over one scanned request frame
    (shunting rules, lookup, pick: what the data path calls per request);
    returns the number of successful picks."""
    cdef long i, ok = 0
    cdef int err = 0
    cdef FrameInfo fi
    cdef const uint8_t* p = <const uint8_t*><char*>frame
    if fr_scan(p, len(frame), len(frame) + 1, 65536, &fi) <= 0:
        raise ValueError("not a whole frame")
    for i in range(n_iter):  # no-cython-lint: only the count matters
        # a new request: its method is not read yet (the data path scans
        # each request afresh, so a rule on the method parses it each time)
        fi.method_off = FM_UNREAD
        if table.rt_route_req(p, &fi, &err) is not None:
            ok += 1
    return ok
