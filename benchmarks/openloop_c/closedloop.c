/*
 * closedloop: a compiled closed-loop client for the lab's framed protocol.
 *
 * benchmarks/full_vs_minimal.py drives every server with it: the Python load
 * generator needs about as much CPU per request as the fastest servers, so it
 * would cap them and squeeze their ratios towards 1. This client needs a few
 * times less (one recv and one send per request, nothing else).
 *
 *   closedloop --target HOST:PORT --conns C --duration S [--warmup S] [--size B] [--pipeline D]
 *
 * Each of C connections keeps D ECHO frames in flight (u32 big-endian length
 * = 1 + B, op 0x01, B payload bytes) and sends the next one as soon as a reply
 * arrives; a reply must be the identical frame. The first --warmup seconds are
 * run and not counted; then --duration seconds are measured.
 *
 * Output: one JSON object on stdout:
 *   requests        replies received in the measured window
 *   total_requests  replies received from the first send to the end (warm-up included): divide the
 *                   server's CPU time over this client's whole run by this
 *   throughput_rps  requests / the measured window's length
 *   errors          connections lost (closed, reset, an ERROR frame or a reply that did not match)
 * Exit status 0; 2 on bad arguments or when a connection cannot be made.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define NS 1000000000LL
#define OP_ECHO 0x01
#define MAX_EVENTS 256

typedef struct {
    int fd;
    int alive;
    unsigned char *in;              /* received bytes of replies not yet complete */
    size_t in_len;
    size_t unsent;                  /* bytes of requests the kernel has not taken yet (a short send) */
} conn;

static struct {
    int ep;
    size_t frame_len;
    unsigned char *frames;          /* --pipeline copies of the request frame, back to back */
    int pipeline;
    long long total, errors;
} g;

static int64_t mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS + ts.tv_nsec;
}

static void die_usage(const char *msg) {
    fprintf(stderr, "closedloop: %s\n"
            "usage: closedloop --target HOST:PORT --conns C --duration S [--warmup S] [--size B] [--pipeline D]\n",
            msg);
    exit(2);
}

static void lose(conn *c) {
    if (!c->alive) return;
    c->alive = 0;
    g.errors++;
    epoll_ctl(g.ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
}

static void watch(conn *c, int op) {
    struct epoll_event ev = {.events = EPOLLIN | (c->unsent ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(g.ep, op, c->fd, &ev);
}

/* Add k requests to the unsent bytes and hand them to the kernel; what it does not take waits for EPOLLOUT. */
static void send_requests(conn *c, size_t k) {
    int waiting = c->unsent > 0;
    c->unsent += k * g.frame_len;
    while (c->unsent) {
        /* Every frame is the same, so the unsent bytes are the tail of g.frames: at most `pipeline`
         * frames are in flight, and a short send leaves the first of them partly sent. */
        size_t offset = (g.frame_len - c->unsent % g.frame_len) % g.frame_len;
        ssize_t sent = send(c->fd, g.frames + offset, c->unsent, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) { lose(c); return; }
            break;
        }
        c->unsent -= (size_t)sent;
    }
    if ((c->unsent > 0) != waiting) watch(c, EPOLL_CTL_MOD);
}

/* Count the whole replies received, then send as many new requests. */
static void readable(conn *c) {
    ssize_t n = recv(c->fd, c->in + c->in_len, (size_t)g.pipeline * g.frame_len - c->in_len, 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
    if (n <= 0) { lose(c); return; }
    c->in_len += (size_t)n;
    size_t replies = c->in_len / g.frame_len, whole = replies * g.frame_len;
    if (memcmp(c->in, g.frames, whole) != 0) { lose(c); return; }   /* an ERROR frame or wrong bytes */
    memmove(c->in, c->in + whole, c->in_len - whole);
    c->in_len -= whole;
    g.total += (long long)replies;
    if (replies) send_requests(c, replies);
}

static int connect_to(const char *host, const char *port) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res, *ai;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "closedloop: %s:%s: %s\n", host, port, gai_strerror(rc));
        exit(2);
    }
    int fd = -1;
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) continue;
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        fprintf(stderr, "closedloop: connect %s:%s: %s\n", host, port, strerror(errno));
        exit(2);
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void split_target(const char *target, char *host, size_t host_size, char *port, size_t port_size) {
    const char *colon = strrchr(target, ':');
    if (!colon || (size_t)(colon - target) >= host_size || strlen(colon + 1) >= port_size)
        die_usage("--target must be HOST:PORT");
    memcpy(host, target, (size_t)(colon - target));
    host[colon - target] = 0;
    strcpy(port, colon + 1);
    if (host[0] == '[') {                               /* [v6]:port */
        size_t n = strlen(host);
        memmove(host, host + 1, n);
        if (n >= 2 && host[n - 2] == ']') host[n - 2] = 0;
    }
}

/* Run the event loop until `until` (monotonic ns). */
static void run_until(int64_t until) {
    struct epoll_event evs[MAX_EVENTS];
    for (int64_t now = mono(); now < until; now = mono()) {
        int n = epoll_wait(g.ep, evs, MAX_EVENTS, (int)((until - now) / 1000000) + 1);
        for (int i = 0; i < n; i++) {
            conn *c = evs[i].data.ptr;
            if (c->alive && (evs[i].events & EPOLLOUT)) send_requests(c, 0);
            if (c->alive && (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))) readable(c);
        }
    }
}

int main(int argc, char **argv) {
    const char *target = NULL;
    double duration = 0, warmup = 1.0;
    long conns = 0, size = 64;
    int pipeline = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("usage: closedloop --target HOST:PORT --conns C --duration S "
                   "[--warmup S (1)] [--size B (64)] [--pipeline D (1)]\n");
            return 0;
        }
        if (i + 1 >= argc) die_usage("missing value");
        const char *v = argv[++i];
        if (!strcmp(a, "--target")) target = v;
        else if (!strcmp(a, "--conns")) conns = atol(v);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--warmup")) warmup = atof(v);
        else if (!strcmp(a, "--size")) size = atol(v);
        else if (!strcmp(a, "--pipeline")) pipeline = atoi(v);
        else die_usage("unknown option");
    }
    if (!target || conns <= 0 || duration <= 0 || warmup < 0 || size < 0 || pipeline < 1)
        die_usage("need --target, --conns > 0, --duration > 0, --pipeline >= 1");
    char host[256], port[16];
    split_target(target, host, sizeof host, port, sizeof port);

    g.frame_len = 5 + (size_t)size;
    g.pipeline = pipeline;
    g.frames = malloc((size_t)pipeline * g.frame_len);
    for (int k = 0; k < pipeline; k++) {
        unsigned char *f = g.frames + (size_t)k * g.frame_len;
        uint32_t len_be = htonl((uint32_t)(1 + size));
        memcpy(f, &len_be, 4);
        f[4] = OP_ECHO;
        for (long i = 0; i < size; i++) f[5 + i] = (unsigned char)('a' + i % 26);
    }

    g.ep = epoll_create1(0);
    conn *cs = calloc((size_t)conns, sizeof *cs);
    for (long i = 0; i < conns; i++) {
        cs[i].fd = connect_to(host, port);
        cs[i].alive = 1;
        cs[i].in = malloc((size_t)pipeline * g.frame_len);
        watch(&cs[i], EPOLL_CTL_ADD);
    }
    for (long i = 0; i < conns; i++) send_requests(&cs[i], (size_t)pipeline);

    int64_t warm_at = mono() + (int64_t)(warmup * NS);
    run_until(warm_at);
    long long before = g.total;
    int64_t measured_from = mono();
    run_until(measured_from + (int64_t)(duration * NS));
    int64_t measured_to = mono();
    long long requests = g.total - before;
    double window = (double)(measured_to - measured_from) / NS;

    printf("{\"client\": \"closedloop.c\", \"target\": \"%s\", \"conns\": %ld, \"size\": %ld, \"pipeline\": %d, "
           "\"warmup_s\": %g, \"duration_s\": %g, \"window_s\": %.6f, \"requests\": %lld, \"total_requests\": %lld, "
           "\"throughput_rps\": %.1f, \"errors\": %lld}\n",
           target, conns, size, pipeline, warmup, duration, window, requests, g.total,
           window > 0 ? requests / window : 0.0, g.errors);
    return 0;
}
