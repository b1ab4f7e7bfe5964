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
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort
from libc.string cimport memcmp

import os

from octoproxy import model as _model

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
)

# the registry values that matter here (one source: octoproxy.model)
cdef int _STATUS_ALIVE = _model.STATUS_ALIVE
cdef int _ROLE_PRIMARY = _model.ROLE_PRIMARY


class RouteError(LookupError):
    """A request could not be routed; `.code` is one of the RT_* constants."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


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


cdef CandSet rt_make_cs(RouteTable t, ServiceEntry old, int policy, str cell, str lane,
                        list group, double now):
    cdef list cands = rt_health_locality(group, t._own_idc, t._own_region)
    cdef CandSet cs = cs_new(policy, cell, lane, len(group), cands, now)
    cdef CandSet prev
    if old is not None:
        prev = old.by_key.get((cell, lane))
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
    cdef dict groups = {}    # cell -> {lane -> [Node]}
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
        by_addr[addr] = nd
        nodes.append(nd)
        lanes = groups.get(nd.cell)
        if lanes is None:
            lanes = groups[nd.cell] = {}
        grp = lanes.get(nd.swimlane)
        if grp is None:
            lanes[nd.swimlane] = [nd]
        else:
            grp.append(nd)
    if "" not in groups:
        groups[""] = {}
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
    ckeys = []
    chash = []
    cvals = []
    for cell, lanes in groups.items():
        ce = CellEntry.__new__(CellEntry)
        ce.cell = cell
        lkeys = []
        lhash = []
        lvals = []
        for lane, grp in lanes.items():
            cs = rt_make_cs(t, old, policy, cell, lane, grp, now)
            e.by_key[(cell, lane)] = cs
            if lane:
                kb = _b(lane)
                lkeys.append(kb)
                lhash.append(rt_hash_bytes(kb))
                lvals.append(cs)
        if "" in lanes:
            ce.trunk = e.by_key[(cell, "")]
        else:
            ce.trunk = rt_make_cs(t, old, policy, cell, "", [], now)
            e.by_key[(cell, "")] = ce.trunk
        ce.lanes = rt_index_new(lkeys, lhash, lvals)
        if cell:
            kb = _b(cell)
            ckeys.append(kb)
            chash.append(rt_hash_bytes(kb))
            cvals.append(ce)
        else:
            e.center = ce
    e.cells = rt_index_new(ckeys, chash, cvals)
    e.default_cs = None
    e.default_err = RT_OK
    return e


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

cdef CandSet rt_resolve(RouteTable t, ServiceEntry svc,
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
        p = svc.cells.get(l, ll, lh)
        ce = <CellEntry>p if p != NULL else svc.center
    else:
        if sl < 0:
            s = <const uint8_t*><char*>t._own_s
            sl = len(t._own_s)
            sh = t._own_s_h
        elif sl > 0:
            sh = rt_xxh64(s, sl, 0)
        if sl > 0 and svc.set_enabled:
            # Set: its cell, no fallback
            p = svc.cells.get(s, sl, sh)
            if p == NULL:
                err[0] = RT_SET_NO_NODE
                return None
            ce = <CellEntry>p
        else:
            ce = svc.center
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
        cdef Node nd
        cdef double now
        cdef Py_ssize_t i
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
        if cs.warming:
            # weights follow the clock: recompute at most once per tick
            now = self._clock.now()
            if now - cs.prepared_at >= RT_WARM_TICK:
                lb_prepare(cs, now, &self._rng)
        i = lb_pick(cs, &self._rng, hashkey, hashkey_len)
        nd = <Node>cs.nodes[i]
        nd.picks += 1
        err[0] = RT_OK
        return nd

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
    cells = {k[0] for k in e.by_key}
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
