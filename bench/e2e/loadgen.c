/* A closed-loop OCTO load generator for the end-to-end load benchmark.
 *
 *   loadgen SOCK CONNS INFLIGHT DURATION_S WARMUP_S TEMPLATE SEQ_OFF BODY_OFF [RESP_LEN]
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
 * Prints one JSON line.  Built by bench_proxy.py with gcc at run time.
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
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define READ_CHUNK (64 * 1024)
#define MAX_FRAME (16 * 1024 * 1024)

typedef struct {
    uint64_t seq;  /* 0: free */
    uint64_t sent_ns;
} slot_t;

typedef struct {
    int fd;
    int idx;
    int want_out;
    int outstanding;
    slot_t *slots;
    uint8_t *in;
    size_t in_len, in_cap;
    uint8_t *out;
    size_t out_len, out_off, out_cap;
} conn_t;

static uint8_t *tpl;
static size_t tpl_len, body_len, resp_len_expected;
static long seq_off, body_off;
static int inflight;
static uint64_t next_seq;
static int sending = 1, measuring;
static uint64_t warm_end_ns, end_ns;

static unsigned long long n_measured, n_total, n_sent;
static unsigned long long e_status, e_seq, e_echo, e_len, e_parse;
static uint32_t *lat;
static size_t lat_len, lat_cap;
static int msgs_printed;

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

/* ---- connections */

static void queue_request(conn_t *c, uint64_t t) {
    int s = 0;
    while (s < inflight && c->slots[s].seq) s++;
    if (s == inflight) return;
    uint64_t seq = next_seq++;
    c->slots[s].seq = seq;
    c->slots[s].sent_ns = t;
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

static int flush_out(int ep, conn_t *c) {
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
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = want;
    }
    return 0;
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
    int s = 0;
    while (s < inflight && c->slots[s].seq != seq) s++;
    if (s == inflight || seq == 0) {
        e_seq++;
        if (msgs_printed++ < 5)
            fprintf(stderr, "loadgen: conn %d: response for seq %llu not outstanding\n", c->idx,
                    (unsigned long long)seq);
        return;
    }
    uint64_t sent = c->slots[s].sent_ns;
    c->slots[s].seq = 0;
    c->outstanding--;
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
            sent = ets; /* the latency comes from the echoed body */
        }
    }
    if (!ok) return;
    n_total++;
    if (t >= warm_end_ns && t < end_ns) {
        n_measured++;
        if (lat_len == lat_cap) {
            lat_cap = lat_cap ? lat_cap * 2 : 1 << 16;
            lat = realloc(lat, lat_cap * sizeof *lat);
            if (!lat) die("realloc");
        }
        uint64_t d = t - sent;
        lat[lat_len++] = d > 0xFFFFFFFFull ? 0xFFFFFFFFu : (uint32_t)d;
    }
}

/* -> -1 when the connection is gone */
static int on_readable(int ep, conn_t *c) {
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
    if (sending) {
        while (c->outstanding < inflight) queue_request(c, now_ns());
    }
    return flush_out(ep, c);
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(double p) {
    if (!lat_len) return 0;
    size_t k = (size_t)(p * lat_len + 0.999999);
    if (k < 1) k = 1;
    if (k > lat_len) k = lat_len;
    return lat[k - 1] / 1000.0;
}

int main(int argc, char **argv) {
    if (argc < 9) {
        fprintf(stderr, "usage: %s SOCK CONNS INFLIGHT DURATION_S WARMUP_S TEMPLATE SEQ_OFF BODY_OFF [RESP_LEN]\n",
                argv[0]);
        return 2;
    }
    const char *sock_path = argv[1];
    int nconns = atoi(argv[2]);
    inflight = atoi(argv[3]);
    double duration = atof(argv[4]), warmup = atof(argv[5]);
    FILE *tf = fopen(argv[6], "rb");
    if (!tf) die(argv[6]);
    fseek(tf, 0, SEEK_END);
    tpl_len = (size_t)ftell(tf);
    fseek(tf, 0, SEEK_SET);
    tpl = malloc(tpl_len);
    if (fread(tpl, 1, tpl_len, tf) != tpl_len) die("fread");
    fclose(tf);
    seq_off = atol(argv[7]);
    body_off = atol(argv[8]);
    if (argc > 9) resp_len_expected = (size_t)atol(argv[9]);
    if (nconns < 1 || inflight < 1 || seq_off < 0 || seq_off + 8 > (long)tpl_len || body_off < 0 ||
        body_off + 16 > (long)tpl_len) {
        fprintf(stderr, "loadgen: bad arguments\n");
        return 2;
    }
    body_len = tpl_len - (size_t)body_off;
    signal(SIGPIPE, SIG_IGN);
    next_seq = ((uint64_t)getpid() << 32) | 1;

    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    conn_t *conns = calloc((size_t)nconns, sizeof *conns);
    for (int i = 0; i < nconns; i++) {
        conn_t *c = &conns[i];
        c->idx = i;
        c->slots = calloc((size_t)inflight, sizeof *c->slots);
        c->fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (c->fd < 0) die("socket");
        struct sockaddr_un addr = {.sun_family = AF_UNIX};
        strncpy(addr.sun_path, sock_path, sizeof addr.sun_path - 1);
        if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
        fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    }

    uint64_t t0 = now_ns();
    warm_end_ns = t0 + (uint64_t)(warmup * 1e9);
    end_ns = warm_end_ns + (uint64_t)(duration * 1e9);
    uint64_t drain_end = end_ns + 3000000000ull;
    double cpu0 = 0, cpu1 = 0, wait0 = 0, wait1 = 0;
    measuring = 0;
    int closed = 0;

    for (int i = 0; i < nconns; i++) {
        for (int k = 0; k < inflight; k++) queue_request(&conns[i], now_ns());
        if (flush_out(ep, &conns[i]) < 0) die("write");
    }
    if (warmup <= 0) {
        measuring = 1;
        cpu0 = cpu_now();
        wait0 = runq_wait_now();
    }

    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        uint64_t t = now_ns();
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
            for (int i = 0; i < nconns; i++) left += conns[i].fd >= 0 ? conns[i].outstanding : 0;
            if (left == 0 || t >= drain_end) break;
        }
        int timeout_ms = 50;
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
            if (bad) {
                fprintf(stderr, "loadgen: conn %d closed by peer with %d outstanding\n", c->idx,
                        c->outstanding);
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                c->fd = -1;
                closed++;
            }
        }
        if (closed == nconns) break;
    }
    if (sending) {
        cpu1 = cpu_now();
        wait1 = runq_wait_now();
    }
    unsigned long long lost = 0;
    for (int i = 0; i < nconns; i++) lost += (unsigned long long)conns[i].outstanding;

    qsort(lat, lat_len, sizeof *lat, cmp_u32);
    double sum = 0;
    for (size_t i = 0; i < lat_len; i++) sum += lat[i];
    double cpu = cpu1 - cpu0;
    unsigned long long errors = e_status + e_seq + e_echo + e_len + e_parse;
    printf("{\"connections\": %d, \"inflight\": %d, \"requests\": %llu, \"duration\": %.3f, "
           "\"rps\": %.1f, \"p50_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f, "
           "\"mean_us\": %.1f, \"cpu_s\": %.4f, \"cpu_share\": %.4f, \"runq_wait_share\": %.4f, \"total\": %llu, \"sent\": %llu, "
           "\"errors\": %llu, \"status_errors\": %llu, \"seq_mismatch\": %llu, \"echo_mismatch\": %llu, "
           "\"len_mismatch\": %llu, \"unparsable\": %llu, \"lost\": %llu, \"closed\": %d}\n",
           nconns, inflight, n_measured, duration, n_measured / duration, pct(0.50), pct(0.99),
           pct(0.999), lat_len ? lat[lat_len - 1] / 1000.0 : 0.0, lat_len ? sum / lat_len / 1000.0 : 0.0,
           cpu, cpu / duration, (wait1 - wait0) / duration, n_total, n_sent, errors, e_status, e_seq, e_echo, e_len, e_parse, lost,
           closed);
    return (errors || lost || closed) ? 1 : 0;
}
