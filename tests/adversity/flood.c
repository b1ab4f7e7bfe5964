/* Writes a file's bytes over and over to N TCP connections for S seconds
 * and never reads (an attack tool for tests/adversity).
 *
 *   flood HOST PORT CONNS SECONDS RCVBUF FILE
 *
 * Prints the bytes the kernel took, as one number.  Built at test time.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 7) return 2;
    int n = atoi(argv[3]), rcv = atoi(argv[5]);
    double secs = atof(argv[4]);
    FILE *f = fopen(argv[6], "rb");
    if (!f) return 2;
    struct stat st;
    fstat(fileno(f), &st);
    size_t len = st.st_size;
    char *buf = malloc(len);
    if (!buf || fread(buf, 1, len, f) != len) return 2;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &a.sin_addr);
    struct pollfd *p = calloc(n, sizeof *p);
    size_t *off = calloc(n, sizeof *off);
    long long total = 0;
    for (int i = 0; i < n; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (rcv > 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);
        if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) return 3;
        fcntl(fd, F_SETFL, O_NONBLOCK);
        p[i].fd = fd;
        p[i].events = POLLOUT;
    }
    double end = now() + secs;
    while (now() < end) {
        if (poll(p, n, 50) <= 0) continue;
        for (int i = 0; i < n; i++) {
            if (!(p[i].revents & POLLOUT)) continue;
            ssize_t w = send(p[i].fd, buf + off[i], len - off[i], MSG_NOSIGNAL);
            if (w > 0) {
                total += w;
                off[i] = (off[i] + w) % len;
            } else if (w < 0 && errno != EAGAIN) {
                p[i].fd = -p[i].fd - 1;  /* closed by the peer: stop polling it */
            }
        }
    }
    printf("%lld\n", total);
    return 0;
}
