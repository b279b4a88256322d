/*
 * closedloop: the compiled closed loop of the load generator (`conclab load --engine c`).
 *
 * The Python load generator needs about as much CPU per request as the fastest
 * servers, so it would cap them; this client spends little beyond the kernel's
 * share (one recv and one send per reply, a clock read, a histogram increment:
 * on loopback the send's TCP path is most of it). loadgen/cengine.py
 * builds it (cc -O2, on first use) and turns its output into the load
 * generator's JSON result; benchmarks/full_vs_minimal.py runs it directly.
 * What it shares with openloop.c (framing, failure kinds, clocks, connecting,
 * the JSON of counts by kind) is in wire.h.
 *
 *   closedloop --target HOST:PORT --conns C --duration S [--warmup S] [--size B] [--pipeline D]
 *              [--request HEX --reply HEX] [--connect-rate R] [--drain S] [--announce]
 *
 * Each of C connections keeps D requests in flight and sends the next one as
 * soon as a reply arrives. A request is the ECHO frame (u32 big-endian length
 * = 1 + B, op 0x01, B payload bytes) unless --request gives its bytes (hex);
 * the reply must be the identical bytes, or --reply's. The first --warmup
 * seconds are run and not counted; then --duration seconds are measured: a
 * reply arriving in that window is counted and its latency (arrival minus
 * send, integer microseconds) goes into a log-linear histogram with HDR's
 * layout for 3 significant figures (values below 2048 us exact, then 1024
 * sub-buckets per power of two: loadgen/histo.py's settings). After the window
 * no request is sent; the ones in flight get --drain seconds (default 1) to
 * answer, so the server's request count and this client's agree.
 * --announce prints `conclab load: window START END` (CLOCK_MONOTONIC s) on
 * stderr as the first requests go out.
 *
 * SIGINT or SIGTERM ends the run early (the window ends there) and it still reports.
 * A connection is lost on EOF, a socket error, an ERROR frame or bytes that
 * are not the expected reply; its requests in flight are lost with it.
 *
 * Output: one JSON object on stdout:
 *   requests         replies received in the measured window (= histogram count)
 *   total_requests   replies received from the first send to the end of the drain
 *   sent_total       requests sent over the whole run
 *   window_s throughput_rps
 *   errors           connections lost (a number); error_kinds: the same by kind
 *   connect_errors   connections that could not be opened, by kind
 *   opened served lost lost_in_flight
 *   unanswered       requests in flight at the window's end on connections that got
 *                    no reply in the window; max_unanswered_wait_us: the oldest request
 *                    in flight then (as the Python engine counts them)
 *   cpu_s            this process's CPU time (CLOCK_PROCESS_CPUTIME_ID) over the window
 *   clamped          latencies above one hour, recorded as one hour
 *   histogram        [[lowest value of the bucket in us, count], ...] of the non-empty buckets
 * Exit status 0; 2 on bad arguments or when no connection can be opened.
 */
#define _GNU_SOURCE
#define PROGRAM "closedloop"
#include "wire.h"

#define SUB_BITS 11                     /* HDR, 3 significant figures, lowest 1: 2048 sub-buckets */
#define HIGHEST_US 3600000000LL         /* one hour; slower is clamped (loadgen/histo.py) */
#define N_INDEX ((34 << (SUB_BITS - 1)))

typedef struct {
    int fd;
    int alive;
    unsigned char *in;              /* received bytes of replies not yet complete */
    size_t in_len;
    size_t unsent;                  /* bytes of requests the kernel has not taken yet (a short send) */
    int64_t *stamps;                /* send times of the requests in flight, a ring of --pipeline */
    int head, flight;
    long long got;                  /* replies in the measured window */
} conn;

static struct {
    int ep;
    size_t req_len, rep_len;
    unsigned char *reqs, *reps;     /* --pipeline copies of the request / reply, back to back */
    int pipeline;
    int64_t warm_at, end_at;
    long long total, sent, requests, clamped, lost_in_flight;
    long long kinds[N_KINDS], connect_kinds[N_KINDS];
    int connect_errno;                  /* why the last connection failed */
    uint64_t counts[N_INDEX];
} g;

static void die_usage(const char *msg) {
    fprintf(stderr, "closedloop: %s\n"
            "usage: closedloop --target HOST:PORT --conns C --duration S [--warmup S] [--size B] [--pipeline D] "
            "[--request HEX --reply HEX] [--connect-rate R] [--drain S] [--announce]\n", msg);
    exit(2);
}

/* HDR's counts index of v (us): bucket = bit length beyond SUB_BITS, sub-bucket = v >> bucket. */
static void record_us(int64_t v) {
    if (v < 0) v = 0;
    if (v > HIGHEST_US) { v = HIGHEST_US; g.clamped++; }
    int bits = 64 - __builtin_clzll((uint64_t)v | ((1u << SUB_BITS) - 1));
    int bucket = bits - SUB_BITS, half = SUB_BITS - 1;
    g.counts[((bucket + 1) << half) + (v >> bucket) - (1 << half)]++;
}

/* The lowest value of index i's bucket (the inverse of record_us's index). */
static int64_t index_value(int i) {
    int half = SUB_BITS - 1;
    if (i < (1 << SUB_BITS)) return i;
    int bucket = (i >> half) - 1;
    return (int64_t)((i & ((1 << half) - 1)) + (1 << half)) << bucket;
}

static void lose(conn *c, int kind) {
    if (!c->alive) return;
    c->alive = 0;
    g.kinds[kind]++;
    g.lost_in_flight += c->flight;
    c->flight = 0;
    epoll_ctl(g.ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
}

static void watch(conn *c, int op) {
    struct epoll_event ev = {.events = EPOLLIN | (c->unsent ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(g.ep, op, c->fd, &ev);
}

/* Add k requests (stamped `now`) to the unsent bytes and hand them to the kernel; the rest waits for EPOLLOUT. */
static void send_requests(conn *c, size_t k, int64_t now) {
    int waiting = c->unsent > 0;
    for (size_t i = 0; i < k; i++) c->stamps[(c->head + c->flight++) % g.pipeline] = now;
    g.sent += (long long)k;
    c->unsent += k * g.req_len;
    while (c->unsent) {
        /* Every request is the same, so the unsent bytes are the tail of g.reqs: at most `pipeline`
         * requests are in flight, and a short send leaves the first of them partly sent. */
        size_t offset = (size_t)g.pipeline * g.req_len - c->unsent;
        ssize_t sent = send(c->fd, g.reqs + offset, c->unsent, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) { lose(c, kind_of(errno)); return; }
            break;
        }
        c->unsent -= (size_t)sent;
    }
    if ((c->unsent > 0) != waiting) watch(c, EPOLL_CTL_MOD);
}

/* Count the whole replies received (their latency if in the window), then send as many new requests.
 * A rate-limited ERROR ends its request, not the connection (as the Python engine): it is counted and
 * replaced; any other ERROR, or bytes that are not the reply, lose the connection. */
static void readable(conn *c) {
    size_t room = (size_t)g.pipeline * g.rep_len;
    ssize_t n = recv(c->fd, c->in + c->in_len, room - c->in_len, 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
    if (n < 0) { lose(c, kind_of(errno)); return; }
    if (n == 0) { lose(c, E_CLOSED); return; }
    int64_t now = mono();
    c->in_len += (size_t)n;
    int counted = now >= g.warm_at && now < g.end_at, fatal = -1;
    size_t off = 0, ended = 0;                          /* ended: requests answered or refused */
    while (c->in_len - off >= HEADER && fatal < 0) {
        const unsigned char *p = c->in + off;
        size_t total;
        if (memcmp(p, g.reps, HEADER) == 0) {
            if (c->in_len - off < g.rep_len) break;
            if (memcmp(p, g.reps, g.rep_len) != 0 || !c->flight) { fatal = E_PROTOCOL; break; }
            if (counted) { record_us((now - c->stamps[c->head]) / 1000); g.requests++; c->got++; }
            g.total++;
            off += g.rep_len;
        } else if (p[4] == OP_ERROR) {
            int kind = server_kind(p, c->in_len - off, room, &total);
            if (kind < 0) break;                        /* the rest of it is still to come */
            if (kind != E_RATE || !c->flight) { fatal = kind; break; }
            g.kinds[E_RATE]++;
            off += total;
        } else {
            fatal = E_PROTOCOL;
            break;
        }
        c->head = (c->head + 1) % g.pipeline;
        c->flight--;
        ended++;
    }
    if (fatal >= 0) { lose(c, fatal); return; }
    memmove(c->in, c->in + off, c->in_len - off);
    c->in_len -= off;
    if (ended && now < g.end_at) send_requests(c, ended, now);
}

static unsigned char *repeated(const unsigned char *bytes, size_t len, int times) {
    unsigned char *out = malloc((size_t)times * len);
    for (int k = 0; k < times; k++) memcpy(out + (size_t)k * len, bytes, len);
    return out;
}

/* Run the event loop until `until` (monotonic ns), or until nothing is in flight if `drain`. */
static void run_until(int64_t until, conn *cs, long conns, int drain) {
    struct epoll_event evs[MAX_EVENTS];
    for (int64_t now = mono(); now < until && (drain || !stop_asked); now = mono()) {
        if (drain) {
            int pending = 0;
            for (long i = 0; i < conns && !pending; i++) pending = cs[i].alive && cs[i].flight;
            if (!pending) return;
        }
        int n = epoll_wait(g.ep, evs, MAX_EVENTS, (int)((until - now) / 1000000) + 1);
        for (int i = 0; i < n; i++) {
            conn *c = evs[i].data.ptr;
            if (c->alive && (evs[i].events & EPOLLOUT)) send_requests(c, 0, mono());
            if (c->alive && (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))) readable(c);
        }
    }
}

int main(int argc, char **argv) {
    const char *target = NULL, *request_hex = NULL, *reply_hex = NULL;
    double duration = 0, warmup = 1.0, connect_rate = 0, drain = 1.0;
    long conns = 0, size = 64;
    int pipeline = 1, announce = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("usage: closedloop --target HOST:PORT --conns C --duration S [--warmup S (1)] [--size B (64)] "
                   "[--pipeline D (1)] [--request HEX --reply HEX (ECHO of --size bytes)] "
                   "[--connect-rate R (no pacing)] [--drain S (1)] [--announce]\n");
            return 0;
        }
        if (!strcmp(a, "--announce")) { announce = 1; continue; }
        if (i + 1 >= argc) die_usage("missing value");
        const char *v = argv[++i];
        if (!strcmp(a, "--target")) target = v;
        else if (!strcmp(a, "--conns")) conns = atol(v);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--warmup")) warmup = atof(v);
        else if (!strcmp(a, "--size")) size = atol(v);
        else if (!strcmp(a, "--pipeline")) pipeline = atoi(v);
        else if (!strcmp(a, "--request")) request_hex = v;
        else if (!strcmp(a, "--reply")) reply_hex = v;
        else if (!strcmp(a, "--connect-rate")) connect_rate = atof(v);
        else if (!strcmp(a, "--drain")) drain = atof(v);
        else die_usage("unknown option");
    }
    if (!target || conns <= 0 || duration <= 0 || warmup < 0 || size < 0 || pipeline < 1 || connect_rate < 0
        || drain < 0 || !request_hex != !reply_hex)
        die_usage("need --target, --conns > 0, --duration > 0, --pipeline >= 1, --request with --reply");

    unsigned char *req, *rep;
    request_and_reply(request_hex, reply_hex, size, &req, &g.req_len, &rep, &g.rep_len);
    g.pipeline = pipeline;
    g.reqs = repeated(req, g.req_len, pipeline);
    g.reps = repeated(rep, g.rep_len, pipeline);

    struct addrinfo *ai = resolve(target);
    stop_on_signals();
    g.ep = epoll_create1(0);
    conn *cs = calloc((size_t)conns, sizeof *cs);
    long opened = 0;
    int64_t next_connect = mono();
    for (long i = 0; i < conns; i++) {
        if (connect_rate > 0) {                         /* pace: connection i no sooner than i / rate */
            int64_t wait = next_connect - mono();
            if (wait > 0) {
                struct timespec ts = {.tv_sec = wait / NS, .tv_nsec = wait % NS};
                nanosleep(&ts, NULL);
            }
            next_connect += (int64_t)(NS / connect_rate);
        }
        int fd = connect_to(ai, g.connect_kinds, &g.connect_errno);
        if (fd < 0) continue;
        conn *c = &cs[opened++];
        c->fd = fd;
        c->alive = 1;
        c->in = malloc((size_t)pipeline * g.rep_len);
        c->stamps = malloc((size_t)pipeline * sizeof *c->stamps);
        watch(c, EPOLL_CTL_ADD);
    }
    freeaddrinfo(ai);
    if (opened == 0) {                                  /* nothing to measure: say why, as a usage error */
        fprintf(stderr, "closedloop: connect %s: %s\n", target, strerror(g.connect_errno));
        return 2;
    }

    int64_t start = mono();
    g.warm_at = start + (int64_t)(warmup * NS);
    g.end_at = g.warm_at + (int64_t)(duration * NS);
    if (announce) announce_window(g.warm_at, g.end_at);
    for (long i = 0; i < opened; i++) send_requests(&cs[i], (size_t)pipeline, start);
    run_until(g.warm_at, cs, opened, 0);
    double cpu_from = cpu_now();
    int64_t measured_from = mono();
    run_until(g.end_at, cs, opened, 0);
    int64_t measured_to = mono();
    if (stop_asked && measured_to < g.end_at) g.end_at = measured_to;   /* stopped early: nothing more is sent */
    double cpu_s = cpu_now() - cpu_from;

    long long unanswered = 0;                           /* as loadgen/engine.py counts them at the window's end */
    int64_t oldest = measured_to;
    long served = 0, lost = 0;
    for (long i = 0; i < opened; i++) {
        conn *c = &cs[i];
        if (c->got) served++;
        if (!c->alive) { lost++; continue; }
        if (!c->flight) continue;
        if (!c->got) unanswered += c->flight;
        if (c->stamps[c->head] < oldest) oldest = c->stamps[c->head];
    }
    run_until(measured_to + (int64_t)(drain * NS), cs, opened, 1);
    for (long i = 0; i < opened; i++)
        if (cs[i].alive) close(cs[i].fd);

    double window = (double)(measured_to - measured_from) / NS;
    long long errors = 0;                               /* connections lost, and rate-limited requests */
    for (int k = 0; k < N_KINDS; k++) errors += g.kinds[k];
    printf("{\"client\": \"closedloop.c\", \"target\": \"%s\", \"conns\": %ld, \"size\": %ld, \"pipeline\": %d, "
           "\"warmup_s\": %g, \"duration_s\": %g, \"window_s\": %.6f, \"requests\": %lld, \"total_requests\": %lld, "
           "\"sent_total\": %lld, \"throughput_rps\": %.1f, \"errors\": %lld",
           target, conns, size, pipeline, warmup, duration, window, g.requests, g.total, g.sent,
           window > 0 ? g.requests / window : 0.0, errors);
    print_kinds("error_kinds", g.kinds);
    print_kinds("connect_errors", g.connect_kinds);
    printf(", \"opened\": %ld, \"served\": %ld, \"lost\": %ld, \"lost_in_flight\": %lld, \"unanswered\": %lld, "
           "\"max_unanswered_wait_us\": %lld, \"cpu_s\": %.6f, \"clamped\": %lld, \"histogram\": [",
           opened, served, lost, g.lost_in_flight, unanswered, (long long)((measured_to - oldest) / 1000), cpu_s,
           g.clamped);
    const char *sep = "";
    for (int i = 0; i < N_INDEX; i++)
        if (g.counts[i]) { printf("%s[%lld, %llu]", sep, (long long)index_value(i), (unsigned long long)g.counts[i]); sep = ", "; }
    printf("]}\n");
    return 0;
}
