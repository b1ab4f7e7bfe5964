# Route table and load balancers: the C-level contract used by the data path
# (datapath.pyx).  Implementation: route.pyx; the pickers (lb_*) are in
# balance.pxi, included by route.pyx.

cimport cython
from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

from octoproxy._core.frame cimport FrameInfo, FrCtxKeys


cdef enum:
    RT_OK = 0
    RT_UNKNOWN_SERVICE = 1    # no such appkey / serviceName in the table
    RT_SET_NO_NODE = 2        # Set-enabled service, caller's Set cell has no node (no fallback)
    RT_NO_HEALTHY = 3         # candidates exist but none healthy (weight 0 / not ALIVE / ...)
    RT_NO_SERVICE_KEY = 4     # request names neither an appkey nor a serviceName
    RT_SHUNT_NO_NODE = 5      # a shunting rule's group has no node for it, and the rule rejects


cdef class RtClock  # defined below; Node keeps one


# One node of one service.  The same Node object is carried over from one
# snapshot to the next while (service, address) stays, so that picker state
# and in-flight counts survive updates.
@cython.final
cdef class Node:
    cdef readonly str appkey
    cdef readonly str host
    cdef readonly int port
    cdef readonly str address       # "host:port": key of the data path's upstream pools
    cdef public object upstream     # owned by the data path (its pool for `address`); route never touches it
    cdef public long in_flight      # requests in flight (least request); data path: lb_on_send/lb_on_done
    cdef public long long picks     # how many times this node was picked (stats)
    cdef readonly long weight       # configured weight (0 = drained); warm-up scales it
    cdef readonly int status        # registry status; only ALIVE (2) serves
    cdef readonly int role          # 0 primary, 1 backup
    cdef readonly str cell          # "" = center
    cdef readonly str swimlane      # "" = trunk
    cdef readonly str idc           # for locality tiers
    cdef readonly str region        # for locality tiers
    cdef readonly double warmup_s   # seconds over which the weight ramps up (0 = none)
    cdef readonly double start_time  # unix seconds the node started (warm-up origin)
    cdef readonly str group         # node group for traffic shunting ("" = default nodes)
    cdef bytes addr_b               # address as bytes: seeds the node's ring points
    cdef RtClock clock              # the owning table's clock, for effective_weight
    cdef long long answers[16]      # data path: answers by status (upstream's or the proxy's own)
    cdef public object gov          # governance (limits.NodeGov) or None; set by RouteTable.gov_hook
    cdef public bint ejected        # outlier ejection: out of the candidate sets (governance.py)


# The table's notion of "now": a fixed time (tests), a Python callable (tests),
# or the coarse C realtime clock.  Shared by the table and its nodes (no cycle).
@cython.final
cdef class RtClock:
    cdef double fixed               # value returned while has_fixed
    cdef bint has_fixed             # set_time() was called
    cdef object fn                  # optional Python callable; None = C clock
    cdef double now(self) except? -1.0


# Open-addressing hash index: bytes key -> borrowed object, looked up with a
# (pointer, length, xxh64) triple so that a request slice needs no Python object.
@cython.final
cdef class RtIndex:
    cdef Py_ssize_t mask            # capacity - 1 (capacity a power of two, load <= 1/2)
    cdef Py_ssize_t count           # keys stored
    cdef uint64_t* hashes           # xxh64 of each slot's key
    cdef const char** kptr          # key bytes (owned by `keys`)
    cdef Py_ssize_t* klen           # key lengths
    cdef PyObject** vals            # borrowed values (owned by `values`); NULL = empty slot
    cdef list keys                  # keeps the key bytes alive
    cdef list values                # keeps the values alive
    cdef PyObject* get(self, const uint8_t* p, Py_ssize_t n, uint64_t h) noexcept


# One ready-to-pick candidate set: the result of steps 1-4 for one
# (service, cell, swimlane).  Immutable list; the pick structures inside are
# picker state (RR position, warm-up recomputation).
@cython.final
cdef class CandSet:
    cdef int err                    # RT_OK, or RT_NO_HEALTHY for an empty set
    cdef int policy                 # LB_* of the service
    cdef readonly str cell          # the cell this set serves (for messages)
    cdef readonly str lane          # the swimlane this set serves ("" = trunk)
    cdef readonly int n_endpoints   # endpoints in (cell, lane) before the health filter
    cdef list node_list             # the candidates (Node), owns the references
    cdef Py_ssize_t n               # len(node_list)
    cdef PyObject** nodes           # borrowed from node_list, for the pick loop
    cdef int64_t* weight            # configured weights at build time
    cdef double* warm_start         # start_time per node
    cdef double* warm_len           # warmup_s per node
    cdef int64_t* eff               # effective weights at the last prepare
    cdef bint has_warmup            # some node has warmup_s > 0 (may still be warming)
    cdef readonly bint warming      # some node was still warming at the last prepare
    cdef bint prepared              # pick structures built
    cdef bint uniform               # all effective weights equal: index math, no tables
    cdef readonly double prepared_at  # clock value of the last prepare
    cdef uint32_t* seq              # RR: smooth weighted sequence of node indexes
    cdef Py_ssize_t seq_len         # RR: sequence length (n when uniform)
    cdef Py_ssize_t pos             # RR: next position in the sequence
    cdef uint32_t* alias_prob       # random/LR: Vose alias thresholds (2^32 scale)
    cdef uint32_t* alias_idx        # random/LR: alias targets
    cdef uint64_t* ring_hash        # CH: sorted ring point hashes
    cdef uint32_t* ring_idx         # CH: node index of each ring point
    cdef Py_ssize_t ring_len        # CH: points on the ring (0 = not built yet)


# A cell of a service: its swimlane index and the trunk fallback.
@cython.final
cdef class CellEntry:
    cdef str cell                   # "" = center
    cdef RtIndex lanes              # lane bytes -> CandSet (non-empty lanes only)
    cdef CandSet trunk              # (cell, "") candidates: fallback and no-lane callers


# The cells of one node group of a service ("" = the default nodes, kept in
# the ServiceEntry itself; named groups in ServiceEntry.groups).
@cython.final
cdef class GroupEntry:
    cdef readonly str name
    cdef RtIndex cells              # non-center cell bytes -> CellEntry
    cdef CellEntry center           # cell "" of the group


# Traffic shunting (docs/shunting.md), compiled at snapshot time: one C
# array of rules per service (its own rules, then the global ones), every
# string a (pointer, length) into bytes the RtRules object keeps alive.
cdef struct RtCond:
    # what a request's test reads first, in the first 64 bytes
    int op                          # RO_* (RO_ALONE: a context key past the one-pass table)
    int slot                        # the request value it reads (RtReq slot, RQ_*); -1: RO_ALONE
    uint32_t threshold              # percent: buckets of 10000
    int aop                         # RO_ALONE: the real RO_*
    const char* val0                # eq/prefix: the value (in: the first)
    Py_ssize_t vlen0
    int64_t lo                      # range [lo, hi)
    int64_t hi
    uint64_t mod_m                  # mod: Lemire's fastmod multiplier (modulus < 2^32), else 0
    int64_t modulus                 # mod
    int64_t* rems
    Py_ssize_t nrems
    bint in_mask                    # evaluated before the rules (RtRules.fc): in cmask
    const char** vals               # in: n
    Py_ssize_t* vlens
    Py_ssize_t nvals
    const char* key                 # RO_ALONE: its context key
    Py_ssize_t key_len


cdef struct RtRule:
    # (what a request must have for it, and its grouped conditions: RtRules.rm)
    RtCond* conds
    Py_ssize_t nconds
    Py_ssize_t nrest                # conditions not in cmask (random, a key looked up alone)
    int action                      # 0 group, 1 context
    PyObject* group                 # this service's GroupEntry (borrowed), NULL: no such group
    bint reject                     # on_no_node == reject
    int target                      # context: 0 liteset, 1 set, 2 swimlane
    const char* value               # context: the constant value
    Py_ssize_t value_len
    const char* skey                # context: the unit table's source key (NULL: constant)
    Py_ssize_t skey_len
    int skslot                      # its RtReq slot (-1: looked up alone)
    PyObject* table                 # RtIndex value -> bytes (borrowed) or NULL
    PyObject* stat                  # ShuntStat (borrowed)


# A rule's two tests, side by side for the rule loop (RtRules.rm[i] for
# RtRules.rules[i]).  need: the request slots that must be present (bit s)
# and read as integers (bit 32 + s) for the rule to match, tested against
# RtReq.have; cmask: its conditions evaluated before the rules (RtRules.fc).
cdef struct RtRm:
    uint64_t need
    uint64_t cmask


# A grouped condition (RtRules.fc), compact: what rt_flat reads, in one
# cache line.
cdef struct RtFc:
    int slot                        # the RtReq slot it reads
    int op                          # RO_*
    Py_ssize_t vlen                 # eq, prefix: the value
    const char* val
    int64_t a                       # range: lo; mod: modulus; percent: threshold
    int64_t b                       # range: hi; in: its values' lengths (bit l, 63 for 63+)
    uint64_t m                      # mod: fastmod multiplier, val its remainders' bitmap (0: neither)
    const RtCond* c                 # in; mod with a modulus over 64: the whole condition


# One rule's identity and counters, shared by every service it is compiled
# into; kept across rule updates while (scope, name) stays.
@cython.final
cdef class ShuntStat:
    cdef readonly str scope
    cdef readonly str name
    cdef readonly str label         # "scope/name" (access log)
    cdef readonly object rule       # the model.ShuntRule
    cdef public long long hits      # requests it matched
    cdef public long long fallbacks  # ... whose group had no node: default nodes
    cdef public long long rejects   # ... whose group had no node: answered status 8
    cdef public list answers        # the data path's pre-encoded answers, per kind


@cython.final
cdef class RtRules:
    cdef RtRule* rules
    cdef Py_ssize_t n
    cdef bint needs_method          # a condition reads the method (parsed once per request)
    # the context keys the rules read (RT_MAX_CTX): RtReq slots RQ_CTX..,
    # found in one pass over the request's maps
    cdef FrCtxKeys ck
    cdef uint64_t slots             # RtReq slots some rule reads (bit s)
    cdef uint64_t int_slots         # ... as an integer (range, mod): parsed once per request
    cdef uint64_t pct_slots         # ... as a percent bucket: hashed once per request
    # every condition on a slot, sorted by op (compact copies of the rules'
    # conditions, at most 64): evaluated in one loop, a switch on the op, into
    # a mask of true conditions before the rules are walked; nfc 0: none
    cdef RtFc* fc
    cdef Py_ssize_t nfc
    cdef RtRm* rm                   # per rule: need and cmask (the rule loop reads only these)
    # at most 64 rules: the rules that can match are those with no grouped
    # condition (zr) and those having a true one (rhas[k]: the rules whose
    # cmask has bit k), so a request tests only those (ascending = in order)
    cdef bint small
    cdef uint64_t zr
    cdef uint64_t* rhas
    # the route table's scan-time keys (RouteTable.want) when they hold every
    # key of ck: then fr_scan_want already found them (gmap[k]: the index of
    # ck.keys[k] there) and rt_req_fill needs no walk; NULL: walk
    cdef const FrCtxKeys* want
    cdef int gmap[28]               # RT_MAX_CTX
    cdef bint gident                # gmap[k] == k for every key
    cdef list keep                  # bytes, RtIndex and ShuntStat objects the arrays point into
    cdef const char* keep_str(self, str v, Py_ssize_t* n) except? NULL
    cdef const char* keep_bits(self, bytes b) except NULL


# One service in one snapshot.  Reused as-is by the next snapshot when another
# service is updated.
@cython.final
cdef class ServiceEntry:
    cdef readonly str appkey        # the service
    cdef bytes appkey_b             # utf-8 appkey (index key)
    cdef uint64_t appkey_h          # xxh64 of appkey_b (rebuilding the index needs no rehash)
    cdef int policy                 # LB_*
    cdef bint set_enabled           # Set callers get their Set cell, no fallback
    cdef RtIndex cells              # non-center cell bytes -> CellEntry
    cdef CellEntry center           # cell "" (always present, maybe empty)
    cdef CandSet default_cs         # result for the proxy's own labels (None if error)
    cdef int default_err            # RT_* for the proxy's own labels
    cdef dict by_key                # (cell, lane) -> CandSet, for reuse and admin
    cdef dict nodes_by_addr         # address -> Node, carried to the next build
    cdef list nodes                 # every Node of the service, endpoint order
    cdef object service             # the model.Service it was built from
    cdef dict groups                # group name -> GroupEntry (named groups with nodes)
    cdef RtRules shunt              # compiled rules (provider's then global); None: none


# The context keys every service's rules read, together (at most FR_WANT):
# the outbound connections scan requests with them (fr_scan_want), so rules
# find their values without a second walk.  Append-only while rules exist
# (compiled rules keep their indices), emptied when no rules are left.
@cython.final
cdef class CtxWant:
    cdef FrCtxKeys k
    cdef list keep                  # the keys' bytes
    cdef bint full                  # more keys than FR_WANT were wanted: not used


# An immutable snapshot: what one version of the table routes with.
@cython.final
cdef class Snapshot:
    cdef dict entries               # appkey -> ServiceEntry
    cdef RtIndex by_appkey          # appkey bytes -> ServiceEntry
    cdef RtIndex by_name            # serviceName bytes -> ServiceEntry
    cdef dict name_to_appkey        # serviceName -> appkey (admin, messages)


cdef enum:
    LB_ROUND_ROBIN = 0
    LB_LEAST_REQUEST = 1
    LB_RANDOM = 2
    LB_CONSISTENT_HASH = 3


# The live table the data path holds for its whole life; snapshots are swapped
# inside it atomically.  Strings are (pointer, length); length -1 = absent
# (then the proxy's own label is used; a present value, even "", overrides).
@cython.final
cdef class RouteTable:
    cdef Snapshot _snap             # the current snapshot; swapped by one assignment
    cdef readonly object labels     # the proxy's own model.Labels
    cdef readonly long long version  # bumps on each swap
    cdef readonly long long builds  # services built since creation (tests: no needless rebuilds)
    cdef dict _services             # appkey -> model.Service (source of rebuilds)
    cdef bytes _own_l               # own liteset (utf-8)
    cdef bytes _own_s               # own set
    cdef bytes _own_w               # own swimlane
    cdef uint64_t _own_l_h          # xxh64 of the above, so absent context costs no hashing
    cdef uint64_t _own_s_h
    cdef uint64_t _own_w_h
    cdef str _own_idc               # locality tier 1 (build time only)
    cdef str _own_region            # locality tier 2 (build time only)
    cdef uint64_t _rng              # splitmix64 state: RR offsets and random picks
    cdef RtClock _clock             # warm-up clock
    cdef public object gov_hook     # callable(model.Service, [Node]) per service build (governance)
    cdef dict _shunt                # scope (appkey or "*") -> tuple[model.ShuntRule, ...] (validated)
    cdef dict _stats                # (scope, name) -> ShuntStat
    cdef PyObject* last_rule        # ShuntStat of the rule the last rt_route_req matched, or NULL
    # the label a context rule of the last rt_route_req set (docs/shunting.md),
    # written into the forwarded request: target 0 liteset, 1 set, 2
    # swimlane, -1 none; the value points into the snapshot's rules
    cdef int last_label
    cdef const char* last_label_val
    cdef Py_ssize_t last_label_len
    cdef CtxWant _want
    # what outbound connections scan requests with (fr_scan_want): &_want.k,
    # or NULL when no rules read a context key or they read too many
    cdef const FrCtxKeys* want
    # Route one request to a node.  Returns the node, or None with *err set to
    # an RT_* code.  Advances the picker's state and counts the pick (Node.picks).
    cdef Node rt_route(self,
                       const uint8_t* appkey, Py_ssize_t appkey_len,
                       const uint8_t* service, Py_ssize_t service_len,
                       const uint8_t* liteset, Py_ssize_t liteset_len,
                       const uint8_t* set_, Py_ssize_t set_len,
                       const uint8_t* swimlane, Py_ssize_t swimlane_len,
                       const uint8_t* hashkey, Py_ssize_t hashkey_len,
                       int* err)
    # The same for a scanned request frame, with its shunting rules applied
    # first (docs/shunting.md); last_rule names the rule that matched.
    cdef Node rt_route_req(self, const uint8_t* p, FrameInfo* fi, int* err)


cdef inline void lb_on_send(Node node) noexcept:
    node.in_flight += 1


cdef inline void lb_on_done(Node node) noexcept:
    if node.in_flight > 0:
        node.in_flight -= 1
