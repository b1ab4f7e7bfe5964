# Route table and load balancers: the C-level contract used by the data path
# (datapath.pyx).  Implementation: route.pyx (+ balance.pyx if split).  Add
# fields/functions freely; do not change these without updating datapath.pyx.

from libc.stdint cimport int64_t, uint8_t

cdef enum:
    RT_OK = 0
    RT_UNKNOWN_SERVICE = 1    # no such appkey / serviceName in the table
    RT_SET_NO_NODE = 2        # Set-enabled service, caller's Set cell has no node (no fallback)
    RT_NO_HEALTHY = 3         # candidates exist but none healthy (weight 0 / not ALIVE / ...)
    RT_NO_SERVICE_KEY = 4     # request names neither an appkey nor a serviceName

# One node of one service.  The same Node object is carried over from one
# snapshot to the next while (service, address) stays, so that picker state
# and active counts survive updates.
cdef class Node:
    cdef readonly str appkey
    cdef readonly str host
    cdef readonly int port
    cdef readonly str address       # "host:port": key of the data path's upstream pools
    cdef public object upstream     # owned by the data path (its pool for `address`); route never touches it
    cdef public long active         # requests in flight (least request); data path: lb_on_send/lb_on_done
    cdef public long long picks     # how many times this node was picked (stats)
    # ... labels, weight, warm-up fields as the implementation needs

# The live table the data path holds for its whole life; snapshots are swapped
# inside it atomically.  Strings are (pointer, length); length -1 = absent
# (then the proxy's own label is used; a present value, even "", overrides).
cdef class RouteTable:
    # Route one request to a node.  Returns the node, or None with *err set to
    # an RT_* code.  Does not change counters other than the picker's own state.
    cdef Node rt_route(self,
                       const uint8_t* appkey, Py_ssize_t appkey_len,
                       const uint8_t* service, Py_ssize_t service_len,
                       const uint8_t* liteset, Py_ssize_t liteset_len,
                       const uint8_t* set_, Py_ssize_t set_len,
                       const uint8_t* swimlane, Py_ssize_t swimlane_len,
                       const uint8_t* hashkey, Py_ssize_t hashkey_len,
                       int* err)

cdef inline void lb_on_send(Node node) noexcept:
    node.active += 1

cdef inline void lb_on_done(Node node) noexcept:
    if node.active > 0:
        node.active -= 1
