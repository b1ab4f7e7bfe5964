/* A closed-loop OCTO load generator for the end-to-end load benchmark.
 *
 *   loadgen [OPTIONS] SOCK CONNS INFLIGHT DURATION_S WARMUP_S TEMPLATE SEQ_OFF BODY_OFF [RESP_LEN]
 *
 * Single-threaded, epoll, UDS.  Opens CONNS connections and keeps INFLIGHT
 * requests outstanding on each.  TEMPLATE is a complete OCTO request frame;
 * SEQ_OFF is the offset of its 8-byte big-endian sequence id and BODY_OFF the
 * offset of its body (>= 16 bytes).  Per request: copy the template, set a
 * unique sequence id, and put the send time (CLOCK_MONOTONIC ns) and the
 * sequence id in the first 16 body bytes.  The provider echoes the body, which
 * is the last BODY_LEN bytes of a response frame without checksum.
 *
 * Every response header is walked (TBinaryProtocol) for its sequence id and
 * status.  A response is an error when its status is not 0, its sequence id
 * is not one outstanding on that connection, the echoed sequence id or send
 * time does not match what was sent, or (RESP_LEN given) its length differs.
 *
 * Latencies and requests are counted for responses received in
 * [WARMUP, WARMUP + DURATION); then no new request is sent and the
 * outstanding ones are drained (at most 3 s; what is left is "lost").
 * Prints one JSON line.  Built by bench_proxy.py / bench_restart.py with gcc
 * at run time.
 *
 * Options (anywhere on the command line; none of them changes the default
 * behaviour above, which bench_proxy.py relies on):
 *
 *   --restart-aware   behave like the Mesh SDK on a proxy hot restart
 *                     (docs/protocol.md, src/octoproxy/sdk/client.py).  Each
 *                     of the CONNS "lanes" keeps INFLIGHT requests
 *                     outstanding over its current connection and any older
 *                     ones still draining:
 *                     - a status-3 response whose header holds the
 *                       localContext entry octo-proxy-restart = "1" answering
 *                       an outstanding request is not an error: the request
 *                       is re-sent once (counted as "retried") on a fresh
 *                       connection, with a new sequence id and the first
 *                       attempt's send time, so its latency runs from the
 *                       first send; a second flagged answer for it is an
 *                       error ("restart_twice");
 *                     - such a flagged response with sequence id 0 (a
 *                       "restart notice", matching no request) marks the
 *                       connection draining: a new connection is opened at
 *                       once and takes the new requests; the old one is
 *                       closed when nothing is owed on it;
 *                     - a connection closed by the peer with nothing owed is
 *                       reopened ("reconnects"); one closed with requests owed
 *                       is reopened too, and those requests are errors
 *                       ("closed_owed").
 *   --interval-ms N   also report per-interval samples in the JSON output
 *                     ("intervals": completions, p50/p99/max latency,
 *                     retries, notices, reconnects, errors per N ms, over the
 *                     whole run from the start, warm-up and drain included).
 *   --dump PATH       write every completed request (whole run) to PATH as
 *                     pairs of native uint32: receive time in us since the
 *                     start, latency in ns (capped at 2^32-1).
 *
 * The JSON line carries "t0_ns", the CLOCK_MONOTONIC start time, so that
 * events timed elsewhere (e.g. Python's time.monotonic_ns()) line up with
 * the intervals and the dump.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define READ_CHUNK (64 * 1024)
#define MAX_FRAME (16 * 1024 * 1024)
#define RECONNECT_TIMEOUT_NS 5000000000ull /* give up reopening a lane after 5 s */
#define RECONNECT_PAUSE_NS 20000000ull     /* between failed connect attempts */

typedef struct {
    uint64_t seq;  /* 0: free */
    uint64_t sent_ns;  /* send time of the first attempt (also what the body carries) */
    int attempts;
} slot_t;

typedef struct lane lane_t;

typedef struct conn {
    int fd;
    int idx;
    int want_out;
    int outstanding;
    int draining;  /* restart notice or flagged answer seen: no new requests */
    lane_t *lane;
    struct conn *next_all;
    slot_t *slots;
    uint8_t *in;
    size_t in_len, in_cap;
    uint8_t *out;
    size_t out_len, out_off, out_cap;
} conn_t;

struct lane {
    int idx;
    int dead;        /* not restart-aware: its only connection closed */
    conn_t *active;  /* where new requests go; NULL while (re)connecting */
    int outstanding; /* over every connection of the lane + pending */
    slot_t *pending; /* retries waiting for a connection */
    int npending;
    uint64_t connect_since, connect_next; /* while active == NULL */
};

static uint8_t *tpl;
static size_t tpl_len, body_len, resp_len_expected;
static long seq_off, body_off;
static int inflight;
static uint64_t next_seq;
static int sending = 1, measuring;
static uint64_t t0_ns, warm_end_ns, end_ns;
static int restart_aware;
static const char *sock_path;
static int ep;
static conn_t *all_conns;  /* every open connection */
static conn_t *graveyard;  /* closed during this epoll batch: freed after it */

static unsigned long long n_measured, n_total, n_sent;
static unsigned long long e_status, e_seq, e_echo, e_len, e_parse, e_restart2, e_closed_owed, e_connect;
static unsigned long long n_retried, n_notices, n_reconnects, n_drained_closed, n_opened;
static uint32_t *lat;
static size_t lat_len, lat_cap;
static int msgs_printed;

/* per-interval samples */
static uint64_t iv_ns;
static uint64_t iv_cur; /* index of the interval being filled */
static uint32_t *ivl;   /* latencies (ns) of the current interval */
static size_t ivl_len, ivl_cap;
typedef struct {
    uint64_t t_ms;
    unsigned long long n, retried, notices, reconnects, errors;
    double p50, p99, max;
} iv_t;
static iv_t *ivs;
static size_t ivs_len, ivs_cap;
static unsigned long long iv_base_retried, iv_base_notices, iv_base_reconnects, iv_base_errors;
static FILE *dump;

static void die(const char *what) {
    perror(what);
    exit(2);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double cpu_now(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* seconds this (single-threaded) process waited runnable for a CPU: /proc/self/schedstat field 2 */
static double runq_wait_now(void) {
    unsigned long long run = 0, wait = 0;
    FILE *f = fopen("/proc/self/schedstat", "r");
    if (!f) return 0;
    if (fscanf(f, "%llu %llu", &run, &wait) != 2) wait = 0;
    fclose(f);
    return wait / 1e9;
}

static uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static uint64_t be64(const uint8_t *p) {
    return ((uint64_t)be32(p) << 32) | be32(p + 4);
}

static void put_be64(uint8_t *p, uint64_t v) {
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

static void ensure(uint8_t **buf, size_t *cap, size_t need) {
    if (need <= *cap) return;
    size_t c = *cap ? *cap : 4096;
    while (c < need) c *= 2;
    *buf = realloc(*buf, c);
    if (!*buf) die("realloc");
    *cap = c;
}

/* ---- TBinaryProtocol walk: just enough to find ResponseInfo {1: seq, 2: status} */

typedef struct {
    const uint8_t *p, *end;
    int bad;
} rd_t;

static int need(rd_t *r, size_t n) {
    if (r->bad || (size_t)(r->end - r->p) < n) {
        r->bad = 1;
        return 0;
    }
    return 1;
}

static void skip(rd_t *r, int type, int depth);

static void skip_struct(rd_t *r, int depth) {
    while (need(r, 1)) {
        int t = *r->p++;
        if (t == 0) return;
        if (!need(r, 2)) return;
        r->p += 2;
        skip(r, t, depth + 1);
    }
}

static void skip(rd_t *r, int type, int depth) {
    if (depth > 16) {
        r->bad = 1;
        return;
    }
    int32_t n;
    switch (type) {
    case 2: case 3: if (need(r, 1)) r->p += 1; break;
    case 6: if (need(r, 2)) r->p += 2; break;
    case 8: if (need(r, 4)) r->p += 4; break;
    case 4: case 10: if (need(r, 8)) r->p += 8; break;
    case 11:
        if (!need(r, 4)) return;
        n = (int32_t)be32(r->p);
        r->p += 4;
        if (n < 0 || !need(r, (size_t)n)) { r->bad = 1; return; }
        r->p += n;
        break;
    case 12: skip_struct(r, depth); break;
    case 13: {
        if (!need(r, 6)) return;
        int kt = r->p[0], vt = r->p[1];
        n = (int32_t)be32(r->p + 2);
        r->p += 6;
        for (int32_t i = 0; i < n && !r->bad; i++) {
            skip(r, kt, depth + 1);
            skip(r, vt, depth + 1);
        }
        break;
    }
    case 14: case 15: {
        if (!need(r, 5)) return;
        int et = r->p[0];
        n = (int32_t)be32(r->p + 1);
        r->p += 5;
        for (int32_t i = 0; i < n && !r->bad; i++) skip(r, et, depth + 1);
        break;
    }
    default: r->bad = 1;
    }
}

/* -> 0 ok; fills seq/status (status -1 when absent) and the message if any */
static int parse_response(const uint8_t *f, size_t flen, uint64_t *seq, int *status,
                          const uint8_t **msg, int32_t *msg_len, int *mtype) {
    if (flen < 10 || f[0] != 0xAB || f[1] != 0xBA) return -1;
    if (f[3] & 0x60) return -1; /* compressed: not expected here */
    size_t hl = ((size_t)f[8] << 8) | f[9];
    if (10 + hl > flen) return -1;
    rd_t r = {f + 10, f + 10 + hl, 0};
    int have_seq = 0;
    *status = -1;
    *msg = NULL;
    *msg_len = 0;
    *mtype = 0;
    while (need(&r, 1)) {
        int t = *r.p++;
        if (t == 0) break;
        if (!need(&r, 2)) break;
        int id = (r.p[0] << 8) | r.p[1];
        r.p += 2;
        if (id == 1 && t == 3) {
            if (need(&r, 1)) *mtype = *r.p++;
        } else if (id == 3 && t == 12) {
            while (need(&r, 1)) {
                int t2 = *r.p++;
                if (t2 == 0) break;
                if (!need(&r, 2)) break;
                int id2 = (r.p[0] << 8) | r.p[1];
                r.p += 2;
                if (id2 == 1 && t2 == 10 && need(&r, 8)) {
                    *seq = be64(r.p);
                    r.p += 8;
                    have_seq = 1;
                } else if (id2 == 2 && t2 == 3 && need(&r, 1)) {
                    *status = *r.p++;
                } else if (id2 == 3 && t2 == 11 && need(&r, 4)) {
                    int32_t n = (int32_t)be32(r.p);
                    if (n >= 0 && need(&r, 4 + (size_t)n)) {
                        *msg = r.p + 4;
                        *msg_len = n;
                    }
                    skip(&r, t2, 1);
                } else {
                    skip(&r, t2, 1);
                }
            }
        } else {
            skip(&r, t, 0);
        }
    }
    return (r.bad || !have_seq) ? -1 : 0;
}

/* ---- restart flag: localContext "octo-proxy-restart" -> "1" somewhere in the header */

static int has_restart_flag(const uint8_t *f, size_t flen) {
    static const char key[] = "octo-proxy-restart";
    const size_t kl = sizeof key - 1;
    if (flen < 10) return 0;
    size_t hl = ((size_t)f[8] << 8) | f[9];
    if (10 + hl > flen) return 0;
    const uint8_t *h = f + 10, *end = f + 10 + hl;
    /* a map<string,string> entry: i32 len, key, i32 len, value */
    while ((size_t)(end - h) >= 4 + kl + 5) {
        const uint8_t *k = memmem(h, (size_t)(end - h), key, kl);
        if (!k) return 0;
        if (k - h >= 4 && be32(k - 4) == kl && (size_t)(end - (k + kl)) >= 5 && be32(k + kl) == 1 &&
            k[kl + 4] == '1')
            return 1;
        h = k + 1;
    }
    return 0;
}

/* ---- per-interval samples */

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double pct_of(uint32_t *v, size_t n, double p) {
    if (!n) return 0;
    size_t k = (size_t)(p * n + 0.999999);
    if (k < 1) k = 1;
    if (k > n) k = n;
    return v[k - 1] / 1000.0;
}

static unsigned long long errors_now(void) {
    return e_status + e_seq + e_echo + e_len + e_parse + e_restart2 + e_closed_owed + e_connect;
}

static void iv_close_one(void) {
    if (ivs_len == ivs_cap) {
        ivs_cap = ivs_cap ? ivs_cap * 2 : 256;
        ivs = realloc(ivs, ivs_cap * sizeof *ivs);
        if (!ivs) die("realloc");
    }
    qsort(ivl, ivl_len, sizeof *ivl, cmp_u32);
    iv_t *s = &ivs[ivs_len++];
    s->t_ms = (iv_cur + 1) * iv_ns / 1000000ull;
    s->n = ivl_len;
    s->p50 = pct_of(ivl, ivl_len, 0.50);
    s->p99 = pct_of(ivl, ivl_len, 0.99);
    s->max = ivl_len ? ivl[ivl_len - 1] / 1000.0 : 0;
    s->retried = n_retried - iv_base_retried;
    s->notices = n_notices - iv_base_notices;
    s->reconnects = n_reconnects - iv_base_reconnects;
    s->errors = errors_now() - iv_base_errors;
    iv_base_retried = n_retried;
    iv_base_notices = n_notices;
    iv_base_reconnects = n_reconnects;
    iv_base_errors = errors_now();
    ivl_len = 0;
    iv_cur++;
}

/* close every interval that ended before t */
static void iv_advance(uint64_t t) {
    if (!iv_ns) return;
    uint64_t k = (t - t0_ns) / iv_ns;
    while (iv_cur < k) iv_close_one();
}

static void record_completion(uint64_t t, uint64_t d) {
    uint32_t v = d > 0xFFFFFFFFull ? 0xFFFFFFFFu : (uint32_t)d;
    if (iv_ns) {
        iv_advance(t);
        if (ivl_len == ivl_cap) {
            ivl_cap = ivl_cap ? ivl_cap * 2 : 4096;
            ivl = realloc(ivl, ivl_cap * sizeof *ivl);
            if (!ivl) die("realloc");
        }
        ivl[ivl_len++] = v;
    }
    if (dump) {
        uint32_t rec[2] = {(uint32_t)((t - t0_ns) / 1000ull), v};
        fwrite(rec, sizeof rec, 1, dump);
    }
}

/* ---- connections */

static void flush_out_ep(conn_t *c);

static conn_t *open_conn(lane_t *l) {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    /* a blocking UDS connect returns at once unless the accept backlog is full; bound it */
    struct timeval tv = {.tv_sec = 1, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, sock_path, sizeof addr.sun_path - 1);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return NULL;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    conn_t *c = calloc(1, sizeof *c);
    if (!c) die("calloc");
    c->fd = fd;
    c->idx = l->idx;
    c->lane = l;
    c->slots = calloc((size_t)inflight, sizeof *c->slots);
    if (!c->slots) die("calloc");
    c->next_all = all_conns;
    all_conns = c;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    n_opened++;
    return c;
}

static void put_request(conn_t *c, uint64_t seq, uint64_t t, int attempts) {
    int s = 0;
    while (s < inflight && c->slots[s].seq) s++;
    if (s == inflight) {
        fprintf(stderr, "loadgen: internal error: no free slot\n");
        exit(2);
    }
    c->slots[s].seq = seq;
    c->slots[s].sent_ns = t;
    c->slots[s].attempts = attempts;
    c->outstanding++;
    ensure(&c->out, &c->out_cap, c->out_len + tpl_len);
    uint8_t *o = c->out + c->out_len;
    memcpy(o, tpl, tpl_len);
    put_be64(o + seq_off, seq);
    memcpy(o + body_off, &t, 8);
    memcpy(o + body_off + 8, &seq, 8);
    c->out_len += tpl_len;
    n_sent++;
}

static void queue_request(conn_t *c, uint64_t t) {
    if (c->outstanding >= inflight) return;
    put_request(c, next_seq++, t, 1);
    c->lane->outstanding++;
}

static int flush_out(int ep_, conn_t *c) {
    while (c->out_off < c->out_len) {
        ssize_t w = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) break;
            return -1;
        }
        c->out_off += (size_t)w;
    }
    int want = c->out_off < c->out_len;
    if (!want) c->out_off = c->out_len = 0;
    if (want != c->want_out) {
        struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = c};
        epoll_ctl(ep_, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = want;
    }
    return 0;
}

/* restart-aware: make sure the lane has a live, non-draining connection; send
 * its pending retries and top it up to INFLIGHT.  The writes are flushed by
 * the caller's flush of that connection (or here, for a new one). */
static void lane_fill(lane_t *l, uint64_t t) {
    if (l->dead) return;
    if (!l->active) {
        if (!restart_aware) return;
        if (t < l->connect_next) return;
        conn_t *c = open_conn(l);
        if (!c) {
            if (!l->connect_since) l->connect_since = t;
            l->connect_next = t + RECONNECT_PAUSE_NS;
            if (t - l->connect_since > RECONNECT_TIMEOUT_NS) {
                fprintf(stderr, "loadgen: lane %d: cannot connect for %.1f s: %s\n", l->idx,
                        (t - l->connect_since) / 1e9, strerror(errno));
                e_connect++;
                e_closed_owed += (unsigned long long)l->npending; /* the retries waiting: lost */
                l->outstanding -= l->npending;
                l->npending = 0;
                l->dead = 1;
            }
            return;
        }
        l->active = c;
        l->connect_since = l->connect_next = 0;
    }
    conn_t *c = l->active;
    for (int i = 0; i < l->npending; i++)
        put_request(c, next_seq++, l->pending[i].sent_ns, l->pending[i].attempts);
    l->npending = 0;
    if (sending)
        while (l->outstanding < inflight && c->outstanding < inflight) queue_request(c, now_ns());
    flush_out_ep(c);
}

/* a connection is being closed (by us or the peer) */
static void conn_close(conn_t *c) {
    if (c->fd < 0) return;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    lane_t *l = c->lane;
    if (l->active == c) l->active = NULL;
    l->outstanding -= c->outstanding;
    for (conn_t **pp = &all_conns; *pp; pp = &(*pp)->next_all)
        if (*pp == c) {
            *pp = c->next_all;
            break;
        }
    c->next_all = graveyard;
    graveyard = c;
}

static void conn_draining(conn_t *c) {
    if (c->draining) return;
    c->draining = 1;
    if (c->lane->active == c) c->lane->active = NULL; /* lane_fill opens the next one at once */
}

static int closed;  /* not restart-aware: connections closed by the peer */

static void flush_out_ep(conn_t *c) {
    if (c->fd >= 0 && flush_out(ep, c) < 0) {
        /* handled on the next read event (EPOLLHUP/EPOLLERR) */
    }
}

static void on_response(conn_t *c, const uint8_t *f, size_t flen, uint64_t t) {
    uint64_t seq = 0;
    int status, mtype;
    const uint8_t *msg;
    int32_t msg_len;
    if (parse_response(f, flen, &seq, &status, &msg, &msg_len, &mtype) < 0) {
        e_parse++;
        if (msgs_printed++ < 5) fprintf(stderr, "loadgen: unparsable frame of %zu bytes\n", flen);
        return;
    }
    if (mtype != 0) return; /* a heartbeat from the peer: not ours */
    int restart = restart_aware && status == 3 && has_restart_flag(f, flen);
    if (restart && seq == 0) {
        /* restart notice: new requests on a new connection, this one closes when empty */
        n_notices++;
        conn_draining(c);
        return;
    }
    int s = 0;
    while (s < inflight && c->slots[s].seq != seq) s++;
    if (s == inflight || seq == 0) {
        e_seq++;
        if (msgs_printed++ < 5)
            fprintf(stderr, "loadgen: conn %d: response for seq %llu not outstanding%s\n", c->idx,
                    (unsigned long long)seq, restart ? " (restart-flagged)" : "");
        return;
    }
    uint64_t sent = c->slots[s].sent_ns;
    int attempts = c->slots[s].attempts;
    c->slots[s].seq = 0;
    c->outstanding--;
    c->lane->outstanding--;
    if (restart) {
        conn_draining(c); /* the proxy behind it is hot-restarting */
        if (attempts >= 2) {
            e_restart2++;
            if (msgs_printed++ < 5)
                fprintf(stderr, "loadgen: seq %llu: restart-flagged answer to a retried request\n",
                        (unsigned long long)seq);
            return;
        }
        lane_t *l = c->lane;
        n_retried++;
        l->pending[l->npending].sent_ns = sent;
        l->pending[l->npending].attempts = attempts + 1;
        l->npending++;
        l->outstanding++;
        return;
    }
    int ok = 1;
    if (status != 0) {
        e_status++;
        ok = 0;
        if (msgs_printed++ < 5)
            fprintf(stderr, "loadgen: seq %llu status %d: %.*s\n", (unsigned long long)seq, status,
                    (int)msg_len, msg ? (const char *)msg : "");
    } else if (resp_len_expected && flen != resp_len_expected) {
        e_len++;
        ok = 0;
    } else if (flen < 10 + body_len) {
        e_len++;
        ok = 0;
    } else {
        uint64_t ets, eseq;
        const uint8_t *b = f + flen - body_len;
        memcpy(&ets, b, 8);
        memcpy(&eseq, b + 8, 8);
        if (eseq != seq || ets != sent) {
            e_echo++;
            ok = 0;
            if (msgs_printed++ < 5)
                fprintf(stderr, "loadgen: seq %llu: echoed seq %llu / time mismatch\n",
                        (unsigned long long)seq, (unsigned long long)eseq);
        } else {
            sent = ets; /* the latency comes from the echoed body (the first attempt's send time) */
        }
    }
    if (!ok) return;
    n_total++;
    uint64_t d = t - sent;
    record_completion(t, d);
    if (t >= warm_end_ns && t < end_ns) {
        n_measured++;
        if (lat_len == lat_cap) {
            lat_cap = lat_cap ? lat_cap * 2 : 1 << 16;
            lat = realloc(lat, lat_cap * sizeof *lat);
            if (!lat) die("realloc");
        }
        lat[lat_len++] = d > 0xFFFFFFFFull ? 0xFFFFFFFFu : (uint32_t)d;
    }
}

/* -> -1 when the connection is gone */
static int on_readable(int ep_, conn_t *c) {
    ensure(&c->in, &c->in_cap, c->in_len + READ_CHUNK);
    ssize_t r = read(c->fd, c->in + c->in_len, c->in_cap - c->in_len);
    if (r < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
    if (r <= 0) return -1;
    uint64_t t = now_ns();
    c->in_len += (size_t)r;
    size_t pos = 0;
    while (c->in_len - pos >= 8) {
        const uint8_t *f = c->in + pos;
        if (f[0] != 0xAB || f[1] != 0xBA) {
            fprintf(stderr, "loadgen: conn %d: bad magic\n", c->idx);
            return -1;
        }
        size_t flen = 8 + (size_t)be32(f + 4);
        if (flen > MAX_FRAME) return -1;
        if (c->in_len - pos < flen) break;
        on_response(c, f, flen, t);
        pos += flen;
    }
    if (pos) {
        memmove(c->in, c->in + pos, c->in_len - pos);
        c->in_len -= pos;
    }
    if (!restart_aware) {
        if (sending) {
            while (c->outstanding < inflight) queue_request(c, now_ns());
        }
        return flush_out(ep_, c);
    }
    if (flush_out(ep_, c) < 0) return -1;
    lane_t *l = c->lane;
    if (c->draining && c->outstanding == 0) {
        n_drained_closed++;
        conn_close(c);
    }
    lane_fill(l, now_ns());
    return 0;
}

/* the peer closed c (or a read/write failed) */
static void on_gone(conn_t *c) {
    lane_t *l = c->lane;
    if (!restart_aware) {
        fprintf(stderr, "loadgen: conn %d closed by peer with %d outstanding\n", c->idx,
                c->outstanding);
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
        l->dead = 1;
        closed++;
        return;
    }
    if (c->outstanding) {
        e_closed_owed += (unsigned long long)c->outstanding;
        fprintf(stderr, "loadgen: conn %d (%s) closed by peer with %d outstanding\n", c->idx,
                c->draining ? "draining" : "active", c->outstanding);
    }
    if (!c->draining) n_reconnects++; /* a draining one was on its way out anyway */
    conn_close(c);
    lane_fill(l, now_ns());
}

static double pct(double p) {
    return pct_of(lat, lat_len, p);
}

int main(int argc, char **argv) {
    const char *pos[16];
    int npos = 0;
    double interval_ms = 0;
    const char *dump_path = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--restart-aware")) {
            restart_aware = 1;
        } else if (!strcmp(argv[i], "--interval-ms") && i + 1 < argc) {
            interval_ms = atof(argv[++i]);
        } else if (!strcmp(argv[i], "--dump") && i + 1 < argc) {
            dump_path = argv[++i];
        } else if (!strncmp(argv[i], "--", 2)) {
            fprintf(stderr, "loadgen: unknown option %s\n", argv[i]);
            return 2;
        } else if (npos < 16) {
            pos[npos++] = argv[i];
        }
    }
    if (npos < 8) {
        fprintf(stderr,
                "usage: %s [--restart-aware] [--interval-ms N] [--dump PATH] "
                "SOCK CONNS INFLIGHT DURATION_S WARMUP_S TEMPLATE SEQ_OFF BODY_OFF [RESP_LEN]\n",
                argv[0]);
        return 2;
    }
    sock_path = pos[0];
    int nconns = atoi(pos[1]);
    inflight = atoi(pos[2]);
    double duration = atof(pos[3]), warmup = atof(pos[4]);
    FILE *tf = fopen(pos[5], "rb");
    if (!tf) die(pos[5]);
    fseek(tf, 0, SEEK_END);
    tpl_len = (size_t)ftell(tf);
    fseek(tf, 0, SEEK_SET);
    tpl = malloc(tpl_len);
    if (fread(tpl, 1, tpl_len, tf) != tpl_len) die("fread");
    fclose(tf);
    seq_off = atol(pos[6]);
    body_off = atol(pos[7]);
    if (npos > 8) resp_len_expected = (size_t)atol(pos[8]);
    if (nconns < 1 || inflight < 1 || seq_off < 0 || seq_off + 8 > (long)tpl_len || body_off < 0 ||
        body_off + 16 > (long)tpl_len || interval_ms < 0) {
        fprintf(stderr, "loadgen: bad arguments\n");
        return 2;
    }
    iv_ns = (uint64_t)(interval_ms * 1e6);
    if (dump_path) {
        dump = fopen(dump_path, "wb");
        if (!dump) die(dump_path);
    }
    body_len = tpl_len - (size_t)body_off;
    signal(SIGPIPE, SIG_IGN);
    next_seq = ((uint64_t)getpid() << 32) | 1;

    ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    lane_t *lanes = calloc((size_t)nconns, sizeof *lanes);
    for (int i = 0; i < nconns; i++) {
        lane_t *l = &lanes[i];
        l->idx = i;
        l->pending = calloc((size_t)inflight, sizeof *l->pending);
        l->active = open_conn(l);
        if (!l->active) die("connect");
    }

    t0_ns = now_ns();
    warm_end_ns = t0_ns + (uint64_t)(warmup * 1e9);
    end_ns = warm_end_ns + (uint64_t)(duration * 1e9);
    uint64_t drain_end = end_ns + 3000000000ull;
    double cpu0 = 0, cpu1 = 0, wait0 = 0, wait1 = 0;
    measuring = 0;

    for (int i = 0; i < nconns; i++) {
        conn_t *c = lanes[i].active;
        for (int k = 0; k < inflight; k++) queue_request(c, now_ns());
        if (flush_out(ep, c) < 0) die("write");
    }
    if (warmup <= 0) {
        measuring = 1;
        cpu0 = cpu_now();
        wait0 = runq_wait_now();
    }

    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        uint64_t t = now_ns();
        iv_advance(t);
        if (!measuring && t >= warm_end_ns && sending) {
            measuring = 1;
            cpu0 = cpu_now();
            wait0 = runq_wait_now();
        }
        if (sending && t >= end_ns) {
            sending = 0;
            cpu1 = cpu_now();
            wait1 = runq_wait_now();
        }
        if (!sending) {
            int left = 0;
            for (int i = 0; i < nconns; i++) left += lanes[i].dead ? 0 : lanes[i].outstanding;
            if (left == 0 || t >= drain_end) break;
        }
        int timeout_ms = 50;
        if (restart_aware) {
            /* lanes without a connection (connect failed): try again soon */
            for (int i = 0; i < nconns; i++)
                if (!lanes[i].dead && !lanes[i].active) {
                    lane_fill(&lanes[i], t);
                    if (!lanes[i].active) timeout_ms = 5;
                }
        }
        int n = epoll_wait(ep, evs, MAX_EVENTS, timeout_ms);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (c->fd < 0) continue;
            int bad = 0;
            if (evs[i].events & EPOLLOUT) bad = flush_out(ep, c) < 0;
            if (!bad && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) bad = on_readable(ep, c) < 0;
            if (bad && c->fd >= 0) on_gone(c);
        }
        while (graveyard) {
            conn_t *g = graveyard;
            graveyard = g->next_all;
            free(g->slots);
            free(g->in);
            free(g->out);
            free(g);
        }
        if (!restart_aware && closed == nconns) break;
    }
    if (sending) {
        cpu1 = cpu_now();
        wait1 = runq_wait_now();
    }
    unsigned long long lost = 0;
    for (int i = 0; i < nconns; i++)
        if (!lanes[i].dead || !restart_aware) lost += (unsigned long long)lanes[i].outstanding;
    if (iv_ns) {
        iv_advance(now_ns());
        if (ivl_len) iv_close_one();
    }
    if (dump) fclose(dump);

    qsort(lat, lat_len, sizeof *lat, cmp_u32);
    double sum = 0;
    for (size_t i = 0; i < lat_len; i++) sum += lat[i];
    double cpu = cpu1 - cpu0;
    unsigned long long errors = errors_now();
    printf("{\"connections\": %d, \"inflight\": %d, \"requests\": %llu, \"duration\": %.3f, "
           "\"rps\": %.1f, \"p50_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f, "
           "\"mean_us\": %.1f, \"cpu_s\": %.4f, \"cpu_share\": %.4f, \"runq_wait_share\": %.4f, \"total\": %llu, \"sent\": %llu, "
           "\"errors\": %llu, \"status_errors\": %llu, \"seq_mismatch\": %llu, \"echo_mismatch\": %llu, "
           "\"len_mismatch\": %llu, \"unparsable\": %llu, \"lost\": %llu, \"closed\": %d",
           nconns, inflight, n_measured, duration, n_measured / duration, pct(0.50), pct(0.99),
           pct(0.999), lat_len ? lat[lat_len - 1] / 1000.0 : 0.0, lat_len ? sum / lat_len / 1000.0 : 0.0,
           cpu, cpu / duration, (wait1 - wait0) / duration, n_total, n_sent, errors, e_status, e_seq, e_echo, e_len, e_parse, lost,
           closed);
    if (restart_aware)
        printf(", \"restart_aware\": 1, \"retried\": %llu, \"notices\": %llu, \"reconnects\": %llu, "
               "\"drained_closed\": %llu, \"opened\": %llu, \"restart_twice\": %llu, \"closed_owed\": %llu, "
               "\"connect_failed\": %llu",
               n_retried, n_notices, n_reconnects, n_drained_closed, n_opened, e_restart2, e_closed_owed,
               e_connect);
    if (iv_ns || restart_aware || dump_path) printf(", \"t0_ns\": %llu", (unsigned long long)t0_ns);
    if (iv_ns) {
        printf(", \"intervals\": {\"ms\": %g, \"fields\": [\"t_ms\", \"completed\", \"p50_us\", \"p99_us\", "
               "\"max_us\", \"retried\", \"notices\", \"reconnects\", \"errors\"], \"rows\": [",
               interval_ms);
        for (size_t i = 0; i < ivs_len; i++) {
            iv_t *s = &ivs[i];
            printf("%s[%llu, %llu, %.1f, %.1f, %.1f, %llu, %llu, %llu, %llu]", i ? ", " : "",
                   (unsigned long long)s->t_ms, s->n, s->p50, s->p99, s->max, s->retried, s->notices,
                   s->reconnects, s->errors);
        }
        printf("]}");
    }
    printf("}\n");
    return (errors || lost || closed) ? 1 : 0;
}
