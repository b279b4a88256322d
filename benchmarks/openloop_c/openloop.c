/*
 * openloop: an independent open-loop client for the lab's framed protocol.
 *
 * It exists to check the Python load generator's open-loop percentiles
 * against a second implementation that shares none of its code (not the
 * codec, not the scheduler, not the histogram). compare.py builds and runs it.
 *
 *   openloop --target HOST:PORT --rate R --conns C --duration S
 *            [--warmup S] [--size B] [--pipeline D] [--drain S] [--spin-us U]
 *
 * The schedule: request k is due at t0 + k/R on connection k mod C, for
 * warmup + duration seconds. A connection sends a request as soon as it is
 * due and has fewer than D requests in flight (D = 0: no limit); otherwise the
 * request waits on that connection and goes out when a reply frees a place.
 * Latency is reply arrival minus *scheduled* send time, so a stalled server
 * shows up in the latency of every request that should have been sent
 * meanwhile (no coordinated omission). Requests scheduled during the warm-up
 * are sent and answered but not counted. After the schedule ends, requests
 * in flight get --drain seconds to answer.
 *
 * Each request is one ECHO frame: u32 big-endian length (op + payload), op
 * 0x01, --size payload bytes; the reply must be the identical frame.
 *
 * Timing: CLOCK_MONOTONIC; the loop sleeps in epoll_wait on a timerfd armed
 * at the next slot's absolute time (timer slack set to 1 ns). With
 * --spin-us U it wakes U microseconds early and polls (epoll_wait with a zero
 * timeout) until the slot: no wake-up latency, at the cost of a busy core.
 *
 * Output: one JSON object on stdout. Latencies in microseconds, exact
 * percentiles (nearest rank over the sorted samples of the measured window):
 *   count p50 p90 p99 p999 max mean        the measured replies
 *   sent answered late unsent unanswered   requests scheduled in the measured window:
 *                                          late = sent more than 1 ms after schedule,
 *                                          unsent = never sent, unanswered = sent, no reply
 *   send_lag_p50 send_lag_p99              actual send minus scheduled send of the measured replies
 *   errors                                 connections lost or replies that did not match
 *   uncorrected_p50 uncorrected_p99        the same replies measured from the actual send
 * Exit status 0, or 2 on bad arguments or when connecting fails.
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
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define NS 1000000000LL
#define LATE_NS 1000000LL          /* sent this far behind schedule: late (as the Python generator) */
#define OP_ECHO 0x01
#define MAX_EVENTS 256
#define RECV_CHUNK 65536

typedef struct {                    /* a growable FIFO of int64 */
    int64_t *v;
    size_t head, len, cap;
} fifo;

static void fifo_push(fifo *q, int64_t x) {
    if (q->len == q->cap) {
        size_t cap = q->cap ? q->cap * 2 : 16;
        int64_t *v = malloc(cap * sizeof *v);
        if (!v) { perror("malloc"); exit(3); }
        for (size_t i = 0; i < q->len; i++) v[i] = q->v[(q->head + i) % q->cap];
        free(q->v);
        q->v = v; q->head = 0; q->cap = cap;
    }
    q->v[(q->head + q->len) % q->cap] = x;
    q->len++;
}

static int64_t fifo_pop(fifo *q) {
    int64_t x = q->v[q->head];
    q->head = (q->head + 1) % q->cap;
    q->len--;
    return x;
}

typedef struct {
    int fd;
    int alive;
    fifo due;                       /* scheduled times of requests due but not yet sent (pipeline full) */
    fifo flight;                    /* scheduled times of requests sent, awaiting a reply */
    fifo actual;                    /* actual send times of the same */
    unsigned char *in;              /* received bytes not yet a whole reply */
    size_t in_len;
    unsigned char *out;             /* bytes the kernel did not take yet */
    size_t out_len, out_cap;
    int want_out;
} conn;

static struct {
    int64_t warm_at, end_at;
    size_t frame_len;
    unsigned char *frame;
    int pipeline;
    int ep;
    long long sent, answered, late, errors;
    int64_t *samples, *uncorrected;
    size_t n_samples, cap_samples;
} g;

static int64_t mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS + ts.tv_nsec;
}

static void die_usage(const char *msg) {
    fprintf(stderr, "openloop: %s\n"
            "usage: openloop --target HOST:PORT --rate R --conns C --duration S "
            "[--warmup S] [--size B] [--pipeline D] [--drain S] [--spin-us U]\n", msg);
    exit(2);
}

static void record(int64_t sched, int64_t actual, int64_t now) {
    if (sched < g.warm_at) return;
    if (g.n_samples == g.cap_samples) {
        g.cap_samples = g.cap_samples ? g.cap_samples * 2 : 65536;
        g.samples = realloc(g.samples, g.cap_samples * sizeof *g.samples);
        g.uncorrected = realloc(g.uncorrected, g.cap_samples * sizeof *g.uncorrected);
        if (!g.samples || !g.uncorrected) { perror("realloc"); exit(3); }
    }
    g.samples[g.n_samples] = now - sched;
    g.uncorrected[g.n_samples] = now - actual;
    g.n_samples++;
    g.answered++;
}

static void set_events(conn *c) {
    struct epoll_event ev = {.events = EPOLLIN | (c->want_out ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(g.ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void lose(conn *c) {
    if (!c->alive) return;
    c->alive = 0;
    g.errors++;
    epoll_ctl(g.ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
}

static void out_append(conn *c, const unsigned char *p, size_t n) {
    if (c->out_len + n > c->out_cap) {
        size_t cap = c->out_cap ? c->out_cap : 4096;
        while (cap < c->out_len + n) cap *= 2;
        c->out = realloc(c->out, cap);
        if (!c->out) { perror("realloc"); exit(3); }
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
}

static void flush(conn *c) {
    while (c->out_len) {
        ssize_t n = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (errno == EINTR) continue;
            lose(c);
            return;
        }
        memmove(c->out, c->out + n, c->out_len - (size_t)n);
        c->out_len -= (size_t)n;
    }
    int want = c->out_len > 0;
    if (want != c->want_out) {
        c->want_out = want;
        set_events(c);
    }
}

/* Send every due request of c that the pipeline allows, in one send. */
static void send_due(conn *c, int64_t now) {
    if (!c->alive) return;
    int k = 0;
    while (c->due.len && (g.pipeline == 0 || c->flight.len < (size_t)g.pipeline)) {
        int64_t sched = fifo_pop(&c->due);
        fifo_push(&c->flight, sched);
        fifo_push(&c->actual, now);
        if (sched >= g.warm_at) {
            g.sent++;
            if (now - sched > LATE_NS) g.late++;
        }
        out_append(c, g.frame, g.frame_len);
        k++;
    }
    if (k) flush(c);
}

static void readable(conn *c) {
    for (;;) {
        if (!c->alive) return;
        ssize_t n = recv(c->fd, c->in + c->in_len, RECV_CHUNK, 0);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            if (errno == EINTR) continue;
            lose(c);
            return;
        }
        if (n == 0) { lose(c); return; }
        int64_t now = mono();
        c->in_len += (size_t)n;
        size_t off = 0;
        while (c->in_len - off >= g.frame_len) {
            if (memcmp(c->in + off, g.frame, g.frame_len) != 0 || c->flight.len == 0) {
                lose(c);                            /* ERROR frame, wrong bytes, or a reply nobody asked for */
                return;
            }
            off += g.frame_len;
            int64_t sched = fifo_pop(&c->flight), actual = fifo_pop(&c->actual);
            record(sched, actual, now);
        }
        memmove(c->in, c->in + off, c->in_len - off);
        c->in_len -= off;
        send_due(c, now);
        if ((size_t)n < RECV_CHUNK) return;         /* drained the socket */
    }
}

static void handle(struct epoll_event *ev) {
    conn *c = ev->data.ptr;
    if (!c->alive) return;
    if (ev->events & EPOLLOUT) flush(c);
    if (ev->events & (EPOLLIN | EPOLLERR | EPOLLHUP)) readable(c);
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest rank: the smallest sample with at least p% of the samples at or below it. */
static double pct_us(const int64_t *sorted, size_t n, double p) {
    if (n == 0) return 0.0;
    double r = p / 100.0 * (double)n;
    size_t rank = (size_t)r;
    if ((double)rank < r) rank++;
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return sorted[rank - 1] / 1000.0;
}

static int connect_to(const char *host, const char *port) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res, *ai;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "openloop: %s:%s: %s\n", host, port, gai_strerror(rc));
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
        fprintf(stderr, "openloop: connect %s:%s: %s\n", host, port, strerror(errno));
        exit(2);
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

int main(int argc, char **argv) {
    const char *target = NULL;
    double rate = 0, duration = 0, warmup = 1.0, drain = 2.0;
    long conns = 0, size = 64;
    int pipeline = 1;
    double spin_us = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("usage: openloop --target HOST:PORT --rate R --conns C --duration S "
                   "[--warmup S (1)] [--size B (64)] [--pipeline D (1; 0 = no limit)] [--drain S (2)] "
                   "[--spin-us U (0)]\n");
            return 0;
        }
        if (i + 1 >= argc) die_usage("missing value");
        const char *v = argv[++i];
        if (!strcmp(a, "--target")) target = v;
        else if (!strcmp(a, "--rate")) rate = atof(v);
        else if (!strcmp(a, "--conns")) conns = atol(v);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--warmup")) warmup = atof(v);
        else if (!strcmp(a, "--size")) size = atol(v);
        else if (!strcmp(a, "--pipeline")) pipeline = atoi(v);
        else if (!strcmp(a, "--drain")) drain = atof(v);
        else if (!strcmp(a, "--spin-us")) spin_us = atof(v);
        else die_usage("unknown option");
    }
    if (!target || rate <= 0 || conns <= 0 || duration <= 0 || warmup < 0 || size < 0 || pipeline < 0
        || drain < 0 || spin_us < 0)
        die_usage("need --target, --rate > 0, --conns > 0, --duration > 0");

    char host[256], port[16];
    const char *colon = strrchr(target, ':');
    if (!colon || (size_t)(colon - target) >= sizeof host || strlen(colon + 1) >= sizeof port)
        die_usage("--target must be HOST:PORT");
    memcpy(host, target, (size_t)(colon - target));
    host[colon - target] = 0;
    strcpy(port, colon + 1);
    if (host[0] == '[') {                               /* [v6]:port */
        size_t n = strlen(host);
        memmove(host, host + 1, n);
        if (n >= 2 && host[n - 2] == ']') host[n - 2] = 0;
    }

    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);             /* wake on the schedule, not up to 50 us after */

    g.frame_len = 5 + (size_t)size;
    g.frame = malloc(g.frame_len);
    uint32_t len_be = htonl((uint32_t)(1 + size));
    memcpy(g.frame, &len_be, 4);
    g.frame[4] = OP_ECHO;
    for (long i = 0; i < size; i++) g.frame[5 + i] = (unsigned char)('a' + i % 26);
    g.pipeline = pipeline;

    g.ep = epoll_create1(0);
    conn *cs = calloc((size_t)conns, sizeof *cs);
    for (long i = 0; i < conns; i++) {
        cs[i].fd = connect_to(host, port);
        cs[i].alive = 1;
        cs[i].in = malloc(RECV_CHUNK + g.frame_len);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &cs[i]};
        epoll_ctl(g.ep, EPOLL_CTL_ADD, cs[i].fd, &ev);
    }
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct epoll_event tev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(g.ep, EPOLL_CTL_ADD, tfd, &tev);

    double step = (double)NS / rate;                    /* ns between two requests, all connections together */
    int64_t t0 = mono() + 10000000;                     /* start 10 ms from now */
    g.warm_at = t0 + (int64_t)(warmup * NS);
    g.end_at = g.warm_at + (int64_t)(duration * NS);
    long long slot = 0;
    int64_t slot_at = t0, armed = -1, spin_ns = (int64_t)(spin_us * 1000);
    struct epoll_event evs[MAX_EVENTS];

    for (;;) {
        int64_t now = mono();
        while (slot_at <= now && slot_at < g.end_at) {  /* every slot that has come */
            conn *c = &cs[slot % conns];
            if (c->alive) {                             /* a lost connection's requests stay unsent */
                fifo_push(&c->due, slot_at);
                send_due(c, now);
            }
            slot++;
            slot_at = t0 + (int64_t)((double)slot * step);
        }
        if (slot_at >= g.end_at) break;
        int timeout = -1;                               /* sleep until the timer (or a reply) */
        if (spin_ns && slot_at - mono() <= spin_ns) {
            timeout = 0;                                /* close to the slot: poll without sleeping */
        } else if (slot_at - spin_ns != armed) {
            int64_t at = slot_at - spin_ns;
            struct itimerspec its = {.it_value = {.tv_sec = at / NS, .tv_nsec = at % NS}};
            timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
            armed = at;
        }
        int n = epoll_wait(g.ep, evs, MAX_EVENTS, timeout);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == NULL) {
                uint64_t expirations;
                ssize_t r = read(tfd, &expirations, sizeof expirations);
                (void)r;
                armed = -1;
                continue;
            }
            handle(&evs[i]);
        }
    }

    /* Drain: in-flight (and still queued) requests may answer for a while. */
    int64_t drain_end = mono() + (int64_t)(drain * NS);
    for (;;) {
        int pending = 0;
        for (long i = 0; i < conns; i++)
            if (cs[i].alive && (cs[i].flight.len || cs[i].due.len)) pending = 1;
        int64_t left = drain_end - mono();
        if (!pending || left <= 0) break;
        int n = epoll_wait(g.ep, evs, MAX_EVENTS, (int)(left / 1000000) + 1);
        for (int i = 0; i < n; i++)
            if (evs[i].data.ptr != NULL) handle(&evs[i]);
    }

    /* What the measured window scheduled and never got answered. */
    long long scheduled = 0;
    for (long long k = 0;; k++) {                       /* count slots in [warm_at, end_at) */
        int64_t at = t0 + (int64_t)((double)k * step);
        if (at >= g.end_at) break;
        if (at >= g.warm_at) scheduled++;
    }
    long long unanswered = g.sent - g.answered;
    long long unsent = scheduled - g.sent;

    int64_t *lag = malloc((g.n_samples + 1) * sizeof *lag);  /* actual send - scheduled send */
    for (size_t i = 0; i < g.n_samples; i++) lag[i] = g.samples[i] - g.uncorrected[i];
    qsort(lag, g.n_samples, sizeof *lag, cmp64);
    qsort(g.samples, g.n_samples, sizeof *g.samples, cmp64);
    qsort(g.uncorrected, g.n_samples, sizeof *g.uncorrected, cmp64);
    size_t n = g.n_samples;
    double sum = 0;
    for (size_t i = 0; i < n; i++) sum += (double)g.samples[i];
    double loadavg[3] = {0, 0, 0};
    getloadavg(loadavg, 3);

    printf("{\"client\": \"openloop.c\", \"target\": \"%s\", \"rate\": %g, \"conns\": %ld, \"size\": %ld, "
           "\"pipeline\": %d, \"warmup_s\": %g, \"duration_s\": %g, "
           "\"count\": %zu, \"p50\": %.1f, \"p90\": %.1f, \"p99\": %.1f, \"p999\": %.1f, \"max\": %.1f, "
           "\"mean\": %.1f, \"uncorrected_p50\": %.1f, \"uncorrected_p99\": %.1f, "
           "\"send_lag_p50\": %.1f, \"send_lag_p99\": %.1f, \"spin_us\": %g, "
           "\"scheduled\": %lld, \"sent\": %lld, \"answered\": %lld, \"late\": %lld, \"unsent\": %lld, "
           "\"unanswered\": %lld, \"errors\": %lld, \"throughput_rps\": %.1f, \"loadavg\": [%.2f, %.2f, %.2f]}\n",
           target, rate, conns, size, pipeline, warmup, duration,
           n, pct_us(g.samples, n, 50), pct_us(g.samples, n, 90), pct_us(g.samples, n, 99),
           pct_us(g.samples, n, 99.9), n ? g.samples[n - 1] / 1000.0 : 0.0, n ? sum / n / 1000.0 : 0.0,
           pct_us(g.uncorrected, n, 50), pct_us(g.uncorrected, n, 99),
           pct_us(lag, n, 50), pct_us(lag, n, 99), spin_us,
           scheduled, g.sent, g.answered, g.late, unsent, unanswered, g.errors,
           duration > 0 ? g.answered / duration : 0.0, loadavg[0], loadavg[1], loadavg[2]);
    return 0;
}
