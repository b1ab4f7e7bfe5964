/* A minimal OCTO echo provider for the end-to-end load benchmark.
 *
 *   provider SOCK REQ_TEMPLATE REQ_SEQ_OFF REQ_BODY_OFF RESP_TEMPLATE RESP_SEQ_OFF RESP_BODY_OFF
 *
 * Single-threaded, epoll, UDS.  For every complete request frame it answers
 * with a copy of the response template carrying the request's 8-byte sequence
 * id (read at the request template's sequence offset: the proxies rewrite the
 * id in place and keep every other byte) and the request's body copied into
 * the response body.  Answers to one read event go out in one write.
 *
 * Frames whose length differs from the request template's, or whose
 * messageType is not 0 (heartbeats), are not answered; they are counted and
 * the first few are dumped to stderr.  On SIGTERM/SIGINT it prints one JSON
 * line with its counters to stdout and exits.
 *
 * Built by bench_proxy.py with gcc at run time (no binary is committed).
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
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_EVENTS 128
#define READ_CHUNK (64 * 1024)
#define MAX_FRAME (16 * 1024 * 1024)

typedef struct {
    int fd;
    uint8_t *in;
    size_t in_len, in_cap;
    uint8_t *out;
    size_t out_len, out_off, out_cap;
    int want_out;
} conn_t;

static uint8_t *req_tpl, *resp_tpl;
static size_t req_len, resp_len;
static long req_seq_off, req_body_off, resp_seq_off, resp_body_off;
static size_t copy_body;
static volatile sig_atomic_t stop_flag;
static unsigned long long n_answered, n_unexpected, n_heartbeat, n_conns, n_bad_magic;
static int dumped;

static void die(const char *what) {
    perror(what);
    exit(2);
}

static uint8_t *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(n > 0 ? n : 1);
    if (n > 0 && fread(b, 1, n, f) != (size_t)n) die("fread");
    fclose(f);
    *len = (size_t)n;
    return b;
}

static uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void on_stop(int sig) {
    (void)sig;
    stop_flag = 1;
}

static void set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void ensure(uint8_t **buf, size_t *cap, size_t need) {
    if (need <= *cap) return;
    size_t c = *cap ? *cap : 4096;
    while (c < need) c *= 2;
    *buf = realloc(*buf, c);
    if (!*buf) die("realloc");
    *cap = c;
}

static void close_conn(int ep, conn_t *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in);
    free(c->out);
    free(c);
}

static void dump(const char *why, const uint8_t *p, size_t n) {
    if (dumped >= 5) return;
    dumped++;
    fprintf(stderr, "provider: %s (len %zu, expected %zu):", why, n, req_len);
    for (size_t i = 0; i < n && i < 256; i++) fprintf(stderr, "%s%02x", i % 32 ? "" : "\n  ", p[i]);
    fprintf(stderr, "\n");
}

/* Answer every complete frame in c->in; returns -1 on a fatal framing error. */
static int process(conn_t *c) {
    size_t pos = 0;
    while (c->in_len - pos >= 8) {
        const uint8_t *f = c->in + pos;
        if (f[0] != 0xAB || f[1] != 0xBA) {
            n_bad_magic++;
            dump("bad magic", f, c->in_len - pos);
            return -1;
        }
        size_t flen = 8 + (size_t)be32(f + 4);
        if (flen > MAX_FRAME) return -1;
        if (c->in_len - pos < flen) break;
        /* header starts at 10: field (BYTE, id 1) messageType comes first */
        int mtype = (flen > 13 && f[10] == 3 && f[11] == 0 && f[12] == 1) ? f[13] : 0;
        if (mtype != 0) {
            n_heartbeat++;
        } else if (flen != req_len) {
            n_unexpected++;
            dump("unexpected request frame", f, flen);
        } else {
            ensure(&c->out, &c->out_cap, c->out_len + resp_len);
            uint8_t *o = c->out + c->out_len;
            memcpy(o, resp_tpl, resp_len);
            memcpy(o + resp_seq_off, f + req_seq_off, 8);
            memcpy(o + resp_body_off, f + req_body_off, copy_body);
            c->out_len += resp_len;
            n_answered++;
        }
        pos += flen;
    }
    if (pos) {
        memmove(c->in, c->in + pos, c->in_len - pos);
        c->in_len -= pos;
    }
    return 0;
}

/* Write what is pending; returns -1 when the peer is gone. */
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
    if (c->out_off == c->out_len) {
        c->out_off = c->out_len = 0;
        if (c->want_out) {
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
            epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
            c->want_out = 0;
        }
    } else if (!c->want_out) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s SOCK REQ_TPL REQ_SEQ_OFF REQ_BODY_OFF RESP_TPL RESP_SEQ_OFF RESP_BODY_OFF\n",
                argv[0]);
        return 2;
    }
    const char *sock_path = argv[1];
    req_tpl = read_file(argv[2], &req_len);
    req_seq_off = atol(argv[3]);
    req_body_off = atol(argv[4]);
    resp_tpl = read_file(argv[5], &resp_len);
    resp_seq_off = atol(argv[6]);
    resp_body_off = atol(argv[7]);
    if (req_seq_off < 0 || req_seq_off + 8 > (long)req_len || resp_seq_off < 0 ||
        resp_seq_off + 8 > (long)resp_len || req_body_off > (long)req_len || resp_body_off > (long)resp_len) {
        fprintf(stderr, "provider: offsets out of range\n");
        return 2;
    }
    size_t rb = req_len - (size_t)req_body_off, pb = resp_len - (size_t)resp_body_off;
    copy_body = rb < pb ? rb : pb;

    struct sigaction sa = {0};
    sa.sa_handler = on_stop;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    int lfd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (lfd < 0) die("socket");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(sock_path) >= sizeof addr.sun_path) {
        fprintf(stderr, "provider: socket path too long\n");
        return 2;
    }
    strcpy(addr.sun_path, sock_path);
    unlink(sock_path);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(lfd, 1024) < 0) die("listen");
    set_nonblock(lfd);

    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    printf("ready\n");
    fflush(stdout);

    struct epoll_event evs[MAX_EVENTS];
    while (!stop_flag) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, 200);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (!c) {
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    c = calloc(1, sizeof *c);
                    c->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                    n_conns++;
                }
                continue;
            }
            if (evs[i].events & EPOLLOUT) {
                if (flush_out(ep, c) < 0) {
                    close_conn(ep, c);
                    continue;
                }
            }
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                ensure(&c->in, &c->in_cap, c->in_len + READ_CHUNK);
                ssize_t r = read(c->fd, c->in + c->in_len, c->in_cap - c->in_len);
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                if (r <= 0) {
                    close_conn(ep, c);
                    continue;
                }
                c->in_len += (size_t)r;
                if (process(c) < 0 || flush_out(ep, c) < 0) {
                    close_conn(ep, c);
                    continue;
                }
            }
        }
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    printf("{\"answered\": %llu, \"unexpected\": %llu, \"heartbeats\": %llu, \"bad_magic\": %llu, "
           "\"connections\": %llu, \"cpu_s\": %.6f}\n",
           n_answered, n_unexpected, n_heartbeat, n_bad_magic, n_conns, cpu);
    fflush(stdout);
    unlink(sock_path);
    return 0;
}
