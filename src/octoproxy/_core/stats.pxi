# ---------------------------------------------------------------- Stats
#
# What the data path counts, kept apart from what it does: the counters
# table, the outbound latency histogram, the route errors and the access
# log hook.  Engine (engine.pxi) is a Stats, so the hot path counts with
# `eng.count.<name> += 1` (a field of a C struct) and Python reads it all
# through the methods below, on scrape and on the hot-restart hand-over.

# Every field of the counters table (datapath.pxd: Counters), in its order:
# (field, Prometheus metric, help).  The field is the counter's name in
# Engine.counters(), /stats and the hot-restart hand-over; admin.py exports
# each as its metric.  A metric "family{label=value}" is one labelled series
# of a family; the members of a family are adjacent and share its help.
COUNTERS = (
    ("outbound_requests", "octo_proxy_outbound_requests", "Requests routed upstream"),
    ("outbound_answers", "octo_proxy_outbound_answers", "Upstream answers delivered to apps"),
    ("oneway_requests", "octo_proxy_oneway_requests", "One-way requests forwarded"),
    ("oneway_unanswered", "octo_proxy_oneway_unanswered",
     "One-way requests whose deadline passed without an answer"),
    ("timeouts", "octo_proxy_timeouts", "Requests answered by the proxy with a timeout"),
    ("inbound_requests", "octo_proxy_inbound_requests", "Requests forwarded to the local provider"),
    ("inbound_answers", "octo_proxy_inbound_answers", "Provider answers sent back"),
    ("malformed_frames", "octo_proxy_malformed_frames", "Connections closed for a malformed frame"),
    ("heartbeats", "octo_proxy_heartbeats", "Heartbeats answered by the proxy"),
    ("restart_answers", "octo_proxy_restart_answers",
     "Requests answered with the hot-restart flag"),
    ("slow_consumers", "octo_proxy_slow_consumers",
     "App connections closed for leaving answers unread"),
    ("frame_timeouts", "octo_proxy_frame_timeouts",
     "Connections closed for a frame not completed within limits.frame_timeout_s"),
    ("idle_closed", "octo_proxy_idle_closed",
     "Connections closed after limits.idle_timeout_s without traffic"),
    ("budget_rejects", "octo_proxy_buffer_budget_rejects",
     "Requests refused because limits.max_buffered_bytes was reached"),
    ("inflight_rejects", "octo_proxy_inflight_limit_rejects",
     "Requests refused because limits.max_inflight_total was reached"),
    ("context_rejects", "octo_proxy_context_too_large",
     "Requests refused for a context map over its size limit"),
    ("oversized", "octo_proxy_oversized_frames",
     "Frames over limits.max_frame_bytes answered and skipped"),
    ("early_closes", "octo_proxy_upstream_early_closes",
     "Upstream connections the peer closed within upstream.min_connection_life_ms"),
    ("restart_notices", "octo_proxy_restart_notices",
     "ProxyRestart notices sent to apps that asked for them"),
    ("shutdown_answers", "octo_proxy_shutdown_answers",
     "Requests answered by the proxy because it was stopping"),
    ("ignored_response", "octo_proxy_ignored_frames{kind=response}",
     "Frames an app must not send (ignored), by kind"),
    ("ignored_proxy_restart", "octo_proxy_ignored_frames{kind=proxy_restart}",
     "Frames an app must not send (ignored), by kind"),
    ("rejected_app", "octo_proxy_connections_rejected{kind=app}",
     "Connections closed at once for a connection limit, by kind"),
    ("rejected_inbound", "octo_proxy_connections_rejected{kind=inbound}",
     "Connections closed at once for a connection limit, by kind"),
    ("gov_dropped", "octo_proxy_governance_dropped",
     "One-way requests dropped by a governance limit (there is nothing to answer)"),
    ("label_unwritten", "octo_proxy_shunt_label_unwritten",
     "Requests a context rule labelled, sent without the label (its header would pass 65535 bytes)"),
)


# upper bounds (seconds) of the outbound latency histogram buckets
LAT_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
              0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
cdef double[16] C_LAT_BOUNDS = LAT_BOUNDS


cdef class Stats:
    """The engine's counters, latency histogram and route errors (the base
    of Engine; never made on its own)."""

    def __cinit__(self):
        self.route_errors = {}
        self.access_log = None
        self.access_sample = 1.0

    cdef int fold_route_errors(self) except -1:
        """Add counts kept elsewhere to route_errors (Engine: its cached
        route-error answers')."""
        return 0

    def latency_histogram(self):
        """(cumulative bucket counts by upper bound incl. +Inf, sum in seconds)."""
        cdef int i
        cdef long long acc = 0
        out = []
        for i in range(17):
            acc += self.lat_buckets[i]
            out.append((LAT_BOUNDS[i] if i < 16 else float("inf"), acc))
        return out, self.lat_sum

    def route_error_counts(self):
        self.fold_route_errors()
        return dict(self.route_errors)

    def histogram_state(self):
        cdef int i
        self.fold_route_errors()
        return {"buckets": [self.lat_buckets[i] for i in range(17)], "sum": self.lat_sum,
                "route_errors": [[k[0], k[1], v] for k, v in self.route_errors.items()]}

    def restore_histogram(self, dict st):
        """Continue the previous generation's histogram and route errors (hot restart)."""
        cdef int i
        b = st.get("buckets", [])
        for i in range(min(17, len(b))):
            self.lat_buckets[i] += b[i]
        self.lat_sum += st.get("sum", 0.0)
        for name, status, v in st.get("route_errors", []):
            self.route_errors[(name, status)] = self.route_errors.get((name, status), 0) + v

    def counters(self):
        """Every counter of the table by name, and the proxy's own error
        answers by status ({"errors": {"4": n, ...}})."""
        cdef int i
        cdef dict out = self.count  # the struct as a dict, field by field
        out["errors"] = {str(i): self.n_errors[i] for i in range(STATUS_SLOTS) if self.n_errors[i]}
        return out

    def restore_counters(self, dict c):
        """Continue the previous generation's counters (hot restart); names
        it does not know are ignored, names it lacks count from 0."""
        cdef Counters prev = {row[0]: int(c.get(row[0], 0)) for row in COUNTERS}
        cdef long long* dst = <long long*>&self.count
        cdef const long long* src = <const long long*>&prev
        cdef Py_ssize_t i
        for i in range(<Py_ssize_t>(sizeof(Counters) // sizeof(long long))):
            dst[i] += src[i]
        for k, v in c.get("errors", {}).items():
            i = int(k)
            if 0 <= i < STATUS_SLOTS:
                self.n_errors[i] += v


cdef int count_answer(Stats st, Node node, int status, double sent_at, double now,
                      PyObject* shunt=NULL) except -1:
    """Count one answer for a request that went to `node` (`shunt`: the
    ShuntStat of the rule that routed it, for the access log).  A function,
    not a method: called directly, once per answer."""
    cdef double lat = now - sent_at
    cdef int b = 0
    node.answers[status & (STATUS_SLOTS - 1)] += 1
    if node.gov is not None:
        gv_on_answer(<NodeGov>node.gov, status, lat)
    while b < 16 and lat > C_LAT_BOUNDS[b]:
        b += 1
    st.lat_buckets[b] += 1
    st.lat_sum += lat
    if st.access_log is not None and (st.access_sample >= 1.0
                                      or _random.random() < st.access_sample):
        st.access_log(node.appkey, status, node.address, lat,
                      "" if shunt == NULL else (<ShuntStat>shunt).label)
    return 0
