# Service governance in the data path: rate limits (token buckets per
# service, method and caller), the cluster quota's local spending, circuit
# breakers, the retry budget, the adaptive concurrency limit and the outlier
# detector's per-node counts.  Implementation: limits.pyx; the policies are
# compiled from config/xDS by octoproxy/governance.py (Python, per change).
#
# Cost when a service has no governance: the data path checks one pointer
# (Node.gov / the inbound listener's ServiceGov) for None.

from libc.stdint cimport uint8_t, uint32_t, uint64_t

from octoproxy._core.constants cimport STATUS_TRANSPORT
from octoproxy._core.frame cimport FrameInfo


cdef struct Bucket:
    double tokens         # tokens available now (<= burst)
    double rate           # tokens per second
    double burst          # bucket size
    double last           # monotonic seconds of the last refill


# The cluster quota's modes (ServiceGov.qmode): where a request's token comes from.
cdef enum:
    QM_OFF = 0            # no cluster quota
    QM_REDIS = 1          # tokens taken from Redis in steps (ServiceGov.qtokens)
    QM_LOCAL = 2          # Redis unreachable: the local share (ServiceGov.qlocal bucket)
    QM_OPEN = 3           # Redis unreachable, fail-open: every request passes
    QM_CLOSED = 4         # Redis unreachable, fail-closed: every request is refused

# Why gv_* refused a request (index into ServiceGov.reasons is >= GV_RULE).
cdef enum:
    GV_OK = -1
    GV_QUOTA = 0          # cluster quota used up (or fail-closed)
    GV_MAX_REQUESTS = 1   # circuit breaker: service requests in flight
    GV_MAX_PENDING = 2    # circuit breaker: requests waiting for a connection
    GV_NODE_MAX = 3       # circuit breaker: requests in flight on the picked node
    GV_ADAPTIVE = 4       # adaptive concurrency limit
    GV_MAX_CONNECTIONS = 5  # circuit breaker: the service's upstream connections (a new one is needed)
    GV_RULE = 8           # rate-limit rule i is GV_RULE + i


# One caller's bucket of a per-caller rule, in the rule's open-addressing
# table (no Python object per request or per caller).
cdef struct CallerSlot:
    uint64_t h            # hash of the caller's appkey (never 0); 0 = empty slot
    char* key             # the caller's appkey (malloc'd), compared on a hash match
    Py_ssize_t klen
    Bucket b


cdef class RateRule:
    cdef readonly str name
    cdef readonly str message          # the answer's message (status 6)
    cdef bytes method                  # None = any method
    cdef bytes caller                  # None = any caller
    cdef const char* m_p               # method's bytes (of `method`), m_len -1 = any
    cdef Py_ssize_t m_len
    cdef const char* c_p               # caller's bytes (of `caller`), c_len -1 = any
    cdef Py_ssize_t c_len
    cdef readonly bint per_caller      # one bucket per distinct caller appkey
    cdef readonly double rate
    cdef readonly double burst
    cdef Bucket bucket
    cdef CallerSlot* ctab              # per_caller: the callers' buckets (ccap slots, power of 2)
    cdef Py_ssize_t ccap
    cdef Py_ssize_t cn                 # callers in ctab
    cdef Py_ssize_t clast              # the slot of the last caller looked up (a hint, < ccap)
    cdef public long long n_limited
    cdef public long long n_allowed

    cdef Bucket* rr_bucket(self, const uint8_t* c, Py_ssize_t cl, uint64_t h, double now) except NULL
    cdef void ctab_clear(self) noexcept


cdef class ServiceGov:
    cdef readonly str appkey
    cdef list in_rules                 # RateRule: provider side (inbound)
    cdef list out_rules                # RateRule: caller side (outbound)
    cdef bint in_method                # some inbound rule is keyed by method
    cdef bint out_method
    cdef bint in_caller                # some inbound rule is keyed by caller
    cdef bint out_caller
    # cluster quota (provider side)
    cdef public int qmode              # QM_*
    cdef public double qtokens         # QM_REDIS: tokens left of the grants (may go below 0 by qdebt)
    cdef public double qdebt           # how far qtokens may go below 0 while a grant is on its way
    cdef public double qlow            # below this, ask Python for the next step (once)
    cdef public bint qasked            # a step was asked for and has not arrived
    cdef public bint qexhausted        # Redis said the window is used up: refuse until the next one
    cdef Bucket qlocal                 # QM_LOCAL: the local share
    cdef public object qwant           # callable(): Python fetches the next step (not per request)
    cdef public long long n_quota_allowed
    cdef public long long n_quota_limited
    # circuit breakers (caller side); 0 = no limit
    cdef public long max_requests
    cdef public long max_pending
    cdef public long node_max_requests
    cdef public long inflight          # requests of this service in flight (outbound)
    cdef public long pending           # of those, waiting for a connection
    cdef public long max_connections   # upstream connections opened for the service (0 = no limit)
    cdef public long connections       # upstream connections open or connecting, opened for it
    cdef public long node_max_connections  # connections to one node it uses (0 = connections_per_node)
    cdef public long long n_cb[6]      # refusals by GV_MAX_REQUESTS .. GV_MAX_CONNECTIONS
    # adaptive concurrency (0 = off); Python recomputes it from the samples
    cdef public long adaptive_limit
    cdef public double lat_sum         # seconds, answers since the last sample
    cdef public long long lat_n
    cdef public double lat_min
    # retries
    cdef list idempotent               # method bytes retried after being written
    cdef public bint idempotent_all    # every method is idempotent
    cdef public int max_attempts       # attempts in all (1 = no retry)
    cdef public double budget_ratio    # retries in flight <= ratio * requests in flight ...
    cdef public long min_retries       # ... or this many
    cdef public long retries_active
    cdef public long long n_retries
    cdef public long long n_retries_unsent   # of them: never written before (always safe)
    cdef public long long n_budget_exhausted
    # outlier detection (counted in gv_on_answer; decided in Python)
    cdef public int consec_transport   # 0 = off
    cdef public int consec_status      # 0 = off
    cdef public uint32_t status_mask   # bit s: status s counts as an error (consec_status, rate)
    cdef public object on_trip         # callable(NodeGov, str reason)
    cdef public list reasons           # GV_* / rule index -> message
    cdef public list answers           # the data path's pre-encoded refusals (None after a change)

    cdef int gv_rules(self, list rules, const uint8_t* frame, FrameInfo* fi,
                      bint by_method, bint by_caller, double now) except -2
    cdef int gv_quota(self, double now) except -2


cdef class NodeGov:
    cdef readonly ServiceGov svc
    cdef readonly str address
    cdef public int consec_tr          # consecutive transport failures / timeouts
    cdef public int consec_st          # consecutive error statuses
    cdef public long long win_total    # answers in the failure-rate window
    cdef public long long win_fail
    cdef public bint tripped           # on_trip called, Python has not decided yet
    cdef public bint ejected
    cdef public double ejected_until   # unix seconds (admin)
    cdef public int ejections          # times ejected (ejection time grows with it)
    cdef public long long n_ejections


# Provider side: the inbound rate rules and the cluster quota.  GV_OK or a GV_* code.
cdef int gv_inbound(ServiceGov g, const uint8_t* frame, FrameInfo* fi, double now) except -2

# Caller side, after the pick: caller rate rules, circuit breakers, adaptive limit.
# `active` is the picked node's requests in flight.  GV_OK or a GV_* code.
cdef int gv_outbound(ServiceGov g, const uint8_t* frame, FrameInfo* fi, long active,
                     double now) except -2

# One answer (or a proxy-made failure) for a request sent to the node:
# inline for the common answer (not a failure: counts reset, the adaptive
# limit's latency sample), gv_on_failure (limits.pyx) for a failure.
cdef int gv_on_failure(NodeGov ng, bint transport) except -1

cdef inline int gv_on_answer(NodeGov ng, int status, double latency) except -1:
    ng.win_total += 1
    if status == STATUS_TRANSPORT or (
            0 <= status < 32 and (ng.svc.status_mask >> <uint32_t>status) & 1):
        return gv_on_failure(ng, status == STATUS_TRANSPORT)
    ng.consec_tr = 0
    ng.consec_st = 0
    if ng.svc.adaptive_limit > 0:
        ng.svc.lat_sum += latency
        ng.svc.lat_n += 1
        if ng.svc.lat_min == 0.0 or latency < ng.svc.lat_min:
            ng.svc.lat_min = latency
    return 0

# One more retry in flight fits the service's retry budget.
cdef bint gv_budget(ServiceGov g) noexcept

# Whether a request written upstream may be executed again: its method is
# idempotent and the retry budget allows one more.
cdef bint gv_may_retry(ServiceGov g, const uint8_t* frame, FrameInfo* fi) except -1
