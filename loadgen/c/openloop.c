/*
 * openloop: an independent open-loop client for the lab's framed protocol.
 *
 * It is the open loop of `conclab load --engine c` (loadgen/cengine.py builds it
 * and turns its output into the load generator's JSON), and it checks the
 * Python load generator's open-loop percentiles as a second implementation
 * that shares none of its code (not the codec, not the scheduler, not the
 * histogram): benchmarks/openloop_c/compare.py runs both.
 * What it shares with closedloop.c (framing, failure kinds, clocks,
 * connecting, the JSON of counts by kind) is in wire.h.
 *
 *   openloop --target HOST:PORT --rate R --conns C --duration S
 *            [--warmup S] [--size B] [--pipeline D] [--drain S] [--spin-us U]
 *            [--request HEX --reply HEX] [--announce] [--slice-s S [--replace N]]
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
 * 0x01, --size payload bytes; the reply must be the identical frame. --request
 * and --reply (hex) give other fixed bytes instead (a WORK or PING frame).
 * --announce prints `conclab load: window START END` (CLOCK_MONOTONIC s, the
 * measured window) on stderr before the first slot.
 *
 * Slices (--slice-s S, for a long run watched as it goes): every S seconds of the
 * measured window one line goes to stdout before the final object,
 *   {"slice": K, "t_s", "wall_s", "sent", "late", "held", "own_late", "replies",
 *    "cpu_s", "wait_s", "replaced", "replace_failed", "histogram": [[us, count], ...]}
 * what that slice sent and which replies arrived in it (latency from the
 * scheduled send; replaced and replace_failed count from the start, this
 * slice's turnover included); the slice that ends with the window is not
 * printed (its replies come in the drain). --replace N: at the
 * end of each slice N connections with nothing due, in flight or half-read
 * are closed and a new one opened in their place (connection turnover; the new
 * connection keeps the old one's place in the schedule). A connection that
 * cannot be opened leaves the old one in place (counted in replace_failed).
 *
 * SIGINT or SIGTERM ends the schedule early (the measured window ends there, window_s says
 * how long it was); the drain and the report follow.
 *
 * Timing: CLOCK_MONOTONIC. Until U microseconds (--spin-us, default 50)
 * before the next slot the loop sleeps in epoll_pwait2 (a nanosecond timeout,
 * timer slack 1 ns; a reply ends the sleep early); from there it polls
 * (epoll_wait with a zero timeout) until the slot is due. Why: on a virtual
 * machine a wake-up from a sleep costs about as much CPU as a request and ends
 * tens of microseconds late, so at high rates (slots closer than U) the loop
 * never sleeps: it sends on time and reads every reply as it comes, for the
 * CPU of the socket calls only. Polling burns the core while it waits, so the
 * time of polls that found nothing to do is reported apart (wait_s) and is
 * not load: cpu_s - wait_s is the CPU the requests took, what the self-check
 * judges. --spin-us 0: sleep until each slot (no polling; the old behaviour).
 * A stalled server answers in bursts; while the loop handles one (up to
 * MAX_EVENTS sockets a pass), it sends the slots that came meanwhile every
 * SLOTS_EVERY sockets, so a burst delays its own sends by microseconds, not
 * by the whole burst.
 *
 * Output: one JSON object on stdout. Latencies in microseconds, exact
 * percentiles (nearest rank over the sorted samples of the measured window):
 *   count p50 p90 p99 p999 max mean        the measured replies
 *   sent answered late unsent unanswered   requests scheduled in the measured window:
 *                                          late = sent more than 1 ms after schedule,
 *                                          unsent = never sent, unanswered = still in flight after the drain
 *   send_lag_p50 send_lag_p99              actual send minus scheduled send of the measured replies
 *   held                                   sends of the window that waited for a reply to free a place on
 *                                          their connection (--pipeline full: the server was behind)
 *   own_late own_lag_p50 own_lag_p99        the other sends of the window, the loop's own punctuality:
 *                                          how many were over 1 ms late, and their lateness
 *   errors                                 connections lost or replies that did not match
 *   uncorrected_p50 uncorrected_p99        the same replies measured from the actual send
 *   histogram uncorrected_histogram lag_histogram own_lag_histogram   the same four distributions in whole
 *                                          microseconds, [[us, count], ...] (every distinct value)
 *   error_kinds connect_errors             lost / never opened connections by kind
 *   opened served lost lost_in_flight      connections opened; those that got a measured reply;
 *                                          those lost, and the requests in flight they took along
 *   max_unanswered_wait_us                 the oldest request still unanswered after the drain
 *   cpu_s                                  this process's CPU time over the measured window
 *   replaced replace_failed                --replace: connections replaced, and new ones that failed to open
 *   wait_s                                 of it, the polls that found nothing to do (idle, not load)
 * Connections that cannot be opened are counted (connect_errors); none at all: exit 2.
 * Exit status 0, or 2 on bad arguments or when connecting fails.
 */
#define _GNU_SOURCE
#define PROGRAM "openloop"
#include "wire.h"

#include <sys/prctl.h>

#define LATE_NS 1000000LL          /* sent this far behind schedule: late (as the Python generator) */
#define RECV_CHUNK 65536
#define SLICE_US 65536             /* a slice counts latencies below this (us) in an array, stores the rest */
#define SLOTS_EVERY 8              /* while handling a burst of events, send the slots that came every this many */

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
    long long got;                  /* replies to requests scheduled in the measured window */
} conn;

static struct {
    int64_t warm_at, end_at;
    size_t frame_len, reply_len;
    unsigned char *frame, *reply;
    long long kinds[N_KINDS], connect_kinds[N_KINDS];
    int connect_errno;                  /* why the last connection failed */
    int pipeline;
    int ep;
    long long sent, answered, late, errors, lost_in_flight;
    long long held, own_late;           /* sends that waited for a reply (a full connection); the others' late */
    int64_t *samples, *uncorrected;
    size_t n_samples, cap_samples;
    int64_t *own_lag;                   /* actual - scheduled send of every send not held: the loop's own */
    size_t n_own, cap_own;
    int slicing;                        /* --slice-s given: count what each slice sent and got */
    long long s_sent, s_late, s_held, s_own_late, replaced, replace_failed;
    long long *s_us;                    /* the current slice's replies: counts by whole microsecond below SLICE_US */
    int64_t *s_over;                    /* and the latencies (ns) of those at or over it, few */
    size_t n_s_replies, n_s_over, cap_s_over;
    conn *cs;                           /* the connections; slot k goes to cs[k mod opened] */
    long opened;
    int64_t t0, slot_at;                /* the schedule's start, and the next slot's time */
    long long slot;
    double step;                        /* ns between two slots */
} g;

static void die_usage(const char *msg) {
    fprintf(stderr, "openloop: %s\n"
            "usage: openloop --target HOST:PORT --rate R --conns C --duration S "
            "[--warmup S] [--size B] [--pipeline D] [--drain S] [--spin-us U] [--request HEX --reply HEX] "
            "[--announce] [--slice-s S [--replace N]]\n", msg);
    exit(2);
}

static void record(conn *c, int64_t sched, int64_t actual, int64_t now) {
    if (sched < g.warm_at) return;
    c->got++;
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
    if (g.slicing) {                    /* counted, not stored: a slice's line must cost the loop little */
        int64_t us = (now - sched) / 1000;
        g.n_s_replies++;
        if (us < SLICE_US) g.s_us[us]++;
        else {
            if (g.n_s_over == g.cap_s_over) {
                g.cap_s_over = g.cap_s_over ? g.cap_s_over * 2 : 4096;
                g.s_over = realloc(g.s_over, g.cap_s_over * sizeof *g.s_over);
                if (!g.s_over) { perror("realloc"); exit(3); }
            }
            g.s_over[g.n_s_over++] = now - sched;
        }
    }
}

static void set_events(conn *c) {
    struct epoll_event ev = {.events = EPOLLIN | (c->want_out ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(g.ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void lose(conn *c, int kind) {
    if (!c->alive) return;
    c->alive = 0;
    g.errors++;
    g.kinds[kind]++;
    g.lost_in_flight += (long long)c->flight.len;
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
            lose(c, kind_of(errno));
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

static int has_room(const conn *c) {
    return g.pipeline == 0 || c->flight.len < (size_t)g.pipeline;
}

/* The lateness of a send the loop made at its slot's pass, not held by a full connection. */
static void own_send(int64_t lag) {
    if (g.n_own == g.cap_own) {
        g.cap_own = g.cap_own ? g.cap_own * 2 : 65536;
        g.own_lag = realloc(g.own_lag, g.cap_own * sizeof *g.own_lag);
        if (!g.own_lag) { perror("realloc"); exit(3); }
    }
    g.own_lag[g.n_own++] = lag;
    if (lag > LATE_NS) { g.own_late++; g.s_own_late++; }
}

/* Send every due request of c that the pipeline allows, in one send. `held`: they waited for a reply
 * to free a place (the server was behind), not for the loop. */
static void send_due(conn *c, int64_t now, int held) {
    if (!c->alive) return;
    int k = 0;
    while (c->due.len && has_room(c)) {
        int64_t sched = fifo_pop(&c->due);
        fifo_push(&c->flight, sched);
        fifo_push(&c->actual, now);
        if (sched >= g.warm_at) {
            g.sent++;
            g.s_sent++;
            if (now - sched > LATE_NS) { g.late++; g.s_late++; }
            if (held) { g.held++; g.s_held++; }
            else own_send(now - sched);
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
            lose(c, kind_of(errno));
            return;
        }
        if (n == 0) { lose(c, E_CLOSED); return; }
        int64_t now = mono();
        c->in_len += (size_t)n;
        size_t off = 0;
        for (;;) {                                  /* every whole frame: a reply, or an ERROR */
            size_t left = c->in_len - off, total;
            if (left < HEADER) break;
            const unsigned char *p = c->in + off;
            if (memcmp(p, g.reply, HEADER) == 0) {
                if (left < g.reply_len) break;
                if (memcmp(p, g.reply, g.reply_len) != 0 || c->flight.len == 0) {
                    lose(c, E_PROTOCOL);            /* wrong bytes, or a reply nobody asked for */
                    return;
                }
                off += g.reply_len;
                int64_t sched = fifo_pop(&c->flight), actual = fifo_pop(&c->actual);
                record(c, sched, actual, now);
            } else if (p[4] == OP_ERROR) {
                int kind = server_kind(p, left, g.reply_len, &total);
                if (kind < 0) break;                /* the rest of it is still to come */
                if (kind != E_RATE || c->flight.len == 0) { lose(c, kind); return; }
                g.kinds[E_RATE]++;                  /* refused, the connection stays (as the Python engine) */
                off += total;
                fifo_pop(&c->flight);
                fifo_pop(&c->actual);
            } else {
                lose(c, E_PROTOCOL);
                return;
            }
        }
        memmove(c->in, c->in + off, c->in_len - off);
        c->in_len -= off;
        send_due(c, now, 1);
        if ((size_t)n < RECV_CHUNK) return;         /* drained the socket */
    }
}

static void handle(struct epoll_event *ev) {
    conn *c = ev->data.ptr;
    if (!c->alive) return;
    if (ev->events & EPOLLOUT) flush(c);
    if (ev->events & (EPOLLIN | EPOLLERR | EPOLLHUP)) readable(c);
}

/* Wait for replies: sleep up to `sleep_ns` (a reply ends it early), or only poll when it is <= 0. */
static int poll_or_sleep(struct epoll_event *evs, int64_t sleep_ns) {
    static int no_pwait2;                               /* a kernel before 5.11: millisecond sleeps only */
    if (sleep_ns <= 0) return epoll_wait(g.ep, evs, MAX_EVENTS, 0);
    if (!no_pwait2) {
        struct timespec ts = {.tv_sec = sleep_ns / NS, .tv_nsec = sleep_ns % NS};
        int n = epoll_pwait2(g.ep, evs, MAX_EVENTS, &ts, NULL);
        if (n >= 0 || errno != ENOSYS) return n < 0 ? 0 : n;
        no_pwait2 = 1;
    }
    return epoll_wait(g.ep, evs, MAX_EVENTS, (int)(sleep_ns / 1000000));
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

/* "[us, count], ..." of sorted ns samples, every distinct whole microsecond, `sep` before the first; the
 * separator for what follows. */
static const char *print_us_pairs(const char *sep, const int64_t *sorted, size_t n) {
    for (size_t i = 0; i < n;) {
        int64_t us = sorted[i] / 1000;
        size_t j = i;
        while (j < n && sorted[j] / 1000 == us) j++;
        printf("%s[%lld, %zu]", sep, (long long)us, j - i);
        sep = ", ";
        i = j;
    }
    return sep;
}

/* ", \"name\": [[us, count], ...]" of sorted ns samples. */
static void print_us_counts(const char *name, const int64_t *sorted, size_t n) {
    printf(", \"%s\": [", name);
    print_us_pairs("", sorted, n);
    printf("]");
}

/* Send every slot that has come by `now` (each on its connection, or queued there when its pipeline is
 * full); 1 if there was one. */
static int send_slots(int64_t now) {
    int worked = 0;
    while (g.slot_at <= now && g.slot_at < g.end_at) {
        conn *c = &g.cs[g.slot % g.opened];
        if (c->alive) {                                 /* a lost connection's requests stay unsent */
            int held = c->due.len > 0 || !has_room(c);  /* readable() drains due whenever room opens */
            fifo_push(&c->due, g.slot_at);
            send_due(c, now, held);
        }
        g.slot++;
        g.slot_at = g.t0 + (int64_t)((double)g.slot * g.step);
        worked = 1;
    }
    return worked;
}

/* One slice's line (see the top): what it sent, the replies that came in it, its CPU; then reset. */
static void print_slice(long long k, double t_s, double wall_s, double cpu_s, double wait_s) {
    printf("{\"slice\": %lld, \"t_s\": %.3f, \"wall_s\": %.6f, \"sent\": %lld, \"late\": %lld, \"held\": %lld, "
           "\"own_late\": %lld, \"replies\": %zu, \"cpu_s\": %.6f, \"wait_s\": %.6f, \"replaced\": %lld, "
           "\"replace_failed\": %lld, \"histogram\": [", k, t_s, wall_s, g.s_sent, g.s_late, g.s_held, g.s_own_late,
           g.n_s_replies, cpu_s, wait_s, g.replaced, g.replace_failed);
    const char *sep = "";
    for (int64_t us = 0; us < SLICE_US; us++)
        if (g.s_us[us]) { printf("%s[%lld, %lld]", sep, (long long)us, g.s_us[us]); sep = ", "; }
    qsort(g.s_over, g.n_s_over, sizeof *g.s_over, cmp64);
    print_us_pairs(sep, g.s_over, g.n_s_over);
    printf("]}\n");
    fflush(stdout);
    g.s_sent = g.s_late = g.s_held = g.s_own_late = 0;
    memset(g.s_us, 0, SLICE_US * sizeof *g.s_us);
    g.n_s_replies = g.n_s_over = 0;
}

/* Turnover: close up to n idle connections (nothing due, in flight or half-read or unsent), each only once
 * a new one is open, which takes its place (and so its slots). From *next on, round the ring. */
static void replace_idle(conn *cs, long opened, long n, long *next, const struct addrinfo *ai) {
    long long kinds[N_KINDS] = {0};
    int last = 0;
    for (long tried = 0, done = 0; done < n && tried < opened; tried++) {
        conn *c = &cs[*next];
        *next = (*next + 1) % opened;
        if (!c->alive || c->due.len || c->flight.len || c->in_len || c->out_len) continue;
        int fd = connect_to(ai, kinds, &last);
        if (fd < 0) { g.replace_failed++; continue; }
        epoll_ctl(g.ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = fd;
        c->want_out = 0;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(g.ep, EPOLL_CTL_ADD, fd, &ev);
        g.replaced++;
        done++;
    }
}

int main(int argc, char **argv) {
    const char *target = NULL, *request_hex = NULL, *reply_hex = NULL;
    double rate = 0, duration = 0, warmup = 1.0, drain = 2.0;
    long conns = 0, size = 64;
    int pipeline = 1, announce = 0;
    double spin_us = 50, slice_s = 0;
    long replace = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("usage: openloop --target HOST:PORT --rate R --conns C --duration S "
                   "[--warmup S (1)] [--size B (64)] [--pipeline D (1; 0 = no limit)] [--drain S (2)] "
                   "[--spin-us U (50)] [--request HEX --reply HEX (ECHO of --size bytes)] [--announce] "
                   "[--slice-s S (0: no slices) [--replace N (0)]]\n");
            return 0;
        }
        if (!strcmp(a, "--announce")) { announce = 1; continue; }
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
        else if (!strcmp(a, "--request")) request_hex = v;
        else if (!strcmp(a, "--reply")) reply_hex = v;
        else if (!strcmp(a, "--slice-s")) slice_s = atof(v);
        else if (!strcmp(a, "--replace")) replace = atol(v);
        else die_usage("unknown option");
    }
    if (!target || rate <= 0 || conns <= 0 || duration <= 0 || warmup < 0 || size < 0 || pipeline < 0
        || drain < 0 || spin_us < 0 || !request_hex != !reply_hex || slice_s < 0 || replace < 0
        || (replace && !slice_s))
        die_usage("need --target, --rate > 0, --conns > 0, --duration > 0, --request with --reply, "
                  "--replace with --slice-s");

    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);             /* wake on the schedule, not up to 50 us after */

    request_and_reply(request_hex, reply_hex, size, &g.frame, &g.frame_len, &g.reply, &g.reply_len);
    g.pipeline = pipeline;

    struct addrinfo *ai = resolve(target);
    stop_on_signals();
    g.ep = epoll_create1(0);
    conn *cs = calloc((size_t)conns, sizeof *cs);
    long opened = 0;
    for (long i = 0; i < conns; i++) {
        int fd = connect_to(ai, g.connect_kinds, &g.connect_errno);
        if (fd < 0) continue;
        conn *c = &cs[opened++];
        c->fd = fd;
        c->alive = 1;
        c->in = malloc(RECV_CHUNK + g.reply_len);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(g.ep, EPOLL_CTL_ADD, c->fd, &ev);
    }
    if (opened == 0) {                                  /* nothing to measure: say why, as a usage error */
        fprintf(stderr, "openloop: connect %s: %s\n", target, strerror(g.connect_errno));
        return 2;
    }
    g.cs = cs;
    g.opened = opened;
    g.step = (double)NS / rate;                         /* ns between two requests, all connections together */
    int64_t t0 = g.slot_at = g.t0 = mono() + 10000000;  /* start 10 ms from now */
    g.warm_at = t0 + (int64_t)(warmup * NS);
    g.end_at = g.warm_at + (int64_t)(duration * NS);
    if (announce) announce_window(g.warm_at, g.end_at);
    g.slicing = slice_s > 0;
    if (g.slicing && !(g.s_us = calloc(SLICE_US, sizeof *g.s_us))) { perror("calloc"); exit(3); }
    int64_t slice_ns = (int64_t)(slice_s * NS), slice_at = g.warm_at + slice_ns;
    long long slice_k = 0;
    long next_victim = 0;
    double slice_cpu = 0;
    int64_t slice_wait = 0, slice_mark = g.warm_at;
    int64_t spin_ns = (int64_t)(spin_us * 1000), wait_ns = 0;
    double cpu_from = -1, cpu_s = 0;
    struct epoll_event evs[MAX_EVENTS];

    int64_t now = mono();
    for (;;) {
        if (stop_asked && now < g.end_at) g.end_at = now > g.warm_at ? now : g.warm_at;   /* end early */
        if (cpu_from < 0 && now >= g.warm_at) slice_cpu = cpu_from = cpu_now();
        if (g.slicing && now >= slice_at && slice_at <= g.end_at) {   /* a whole slice is over */
            double cpu = cpu_now();
            if (replace) replace_idle(cs, opened, replace, &next_victim, ai);
            print_slice(slice_k++, (double)(slice_at - g.warm_at) / NS, (double)(now - slice_mark) / NS,
                        cpu - slice_cpu, (double)(wait_ns - slice_wait) / NS);
            slice_mark = now;
            slice_cpu = cpu;
            slice_wait = wait_ns;
            slice_at += slice_ns;
            while (slice_at <= now) slice_at += slice_ns;  /* (a stalled loop does not print empty slices) */
        }
        int worked = send_slots(now);
        if (g.slot_at >= g.end_at) break;
        int64_t wake_at = g.slot_at - spin_ns, before = worked ? mono() : now;
        if (g.slicing && slice_at < wake_at) wake_at = slice_at;
        int n = poll_or_sleep(evs, wake_at - before);
        int64_t after = mono();
        if (n == 0 && wake_at <= before && cpu_from >= 0)  /* a poll that found nothing: waiting (and the */
            wait_ns += after - (worked ? before : now);     /* whole pass, when it had no slot either) */
        for (int i = 0; i < n; i++) {
            handle(&evs[i]);
            if (i % SLOTS_EVERY == SLOTS_EVERY - 1) send_slots(mono());   /* a burst of replies: the slots */
        }                                                                   /* that came meanwhile go on time */
        now = n > 0 ? mono() : after;
    }
    freeaddrinfo(ai);
    if (cpu_from < 0) cpu_from = cpu_now();
    cpu_s = cpu_now() - cpu_from;
    double wait_s = (double)wait_ns / NS;

    /* Drain: in-flight (and still queued) requests may answer for a while. */
    int64_t drain_end = mono() + (int64_t)(drain * NS);
    for (;;) {
        int pending = 0;
        for (long i = 0; i < opened; i++)
            if (cs[i].alive && (cs[i].flight.len || cs[i].due.len)) pending = 1;
        int64_t left = drain_end - mono();
        if (!pending || left <= 0) break;
        int n = epoll_wait(g.ep, evs, MAX_EVENTS, (int)(left / 1000000) + 1);
        for (int i = 0; i < n; i++) handle(&evs[i]);
    }
    int64_t drained_at = mono(), oldest = drained_at;
    long served = 0;
    for (long i = 0; i < opened; i++) {
        conn *c = &cs[i];
        if (c->got) served++;
        if (c->alive && c->flight.len && c->flight.v[c->flight.head] < oldest) oldest = c->flight.v[c->flight.head];
    }

    /* What the measured window scheduled and never got answered. */
    long long scheduled = 0;
    for (long long k = 0;; k++) {                       /* count slots in [warm_at, end_at) */
        int64_t at = t0 + (int64_t)((double)k * g.step);
        if (at >= g.end_at) break;
        if (at >= g.warm_at) scheduled++;
    }
    long long unanswered = 0;                           /* still in flight after the drain */
    for (long i = 0; i < opened; i++)
        if (cs[i].alive) unanswered += (long long)cs[i].flight.len;
    long long unsent = scheduled - g.sent;

    int64_t *lag = malloc((g.n_samples + 1) * sizeof *lag);  /* actual send - scheduled send */
    for (size_t i = 0; i < g.n_samples; i++) lag[i] = g.samples[i] - g.uncorrected[i];
    qsort(lag, g.n_samples, sizeof *lag, cmp64);
    qsort(g.samples, g.n_samples, sizeof *g.samples, cmp64);
    qsort(g.uncorrected, g.n_samples, sizeof *g.uncorrected, cmp64);
    qsort(g.own_lag, g.n_own, sizeof *g.own_lag, cmp64);
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
           "\"unanswered\": %lld, \"errors\": %lld, \"throughput_rps\": %.1f, \"loadavg\": [%.2f, %.2f, %.2f], "
           "\"window_s\": %.6f, \"opened\": %ld, \"served\": %ld, \"lost\": %lld, \"lost_in_flight\": %lld, "
           "\"max_unanswered_wait_us\": %lld, \"cpu_s\": %.6f, \"wait_s\": %.6f, "
           "\"held\": %lld, \"own_late\": %lld, \"own_lag_p50\": %.1f, \"own_lag_p99\": %.1f, "
           "\"replaced\": %lld, \"replace_failed\": %lld",
           target, rate, conns, size, pipeline, warmup, duration,
           n, pct_us(g.samples, n, 50), pct_us(g.samples, n, 90), pct_us(g.samples, n, 99),
           pct_us(g.samples, n, 99.9), n ? g.samples[n - 1] / 1000.0 : 0.0, n ? sum / n / 1000.0 : 0.0,
           pct_us(g.uncorrected, n, 50), pct_us(g.uncorrected, n, 99),
           pct_us(lag, n, 50), pct_us(lag, n, 99), spin_us,
           scheduled, g.sent, g.answered, g.late, unsent, unanswered, g.errors,
           duration > 0 ? g.answered / duration : 0.0, loadavg[0], loadavg[1], loadavg[2],
           (double)(g.end_at - g.warm_at) / NS, opened, served, g.errors, g.lost_in_flight, (long long)((drained_at - oldest) / 1000), cpu_s, wait_s,
           g.held, g.own_late, pct_us(g.own_lag, g.n_own, 50), pct_us(g.own_lag, g.n_own, 99),
           g.replaced, g.replace_failed);
    print_kinds("error_kinds", g.kinds);
    print_kinds("connect_errors", g.connect_kinds);
    print_us_counts("histogram", g.samples, n);
    print_us_counts("uncorrected_histogram", g.uncorrected, n);
    print_us_counts("lag_histogram", lag, n);
    print_us_counts("own_lag_histogram", g.own_lag, g.n_own);
    printf("}\n");
    return 0;
}
