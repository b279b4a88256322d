/*
 * wire.h: what the two compiled loops (closedloop.c, openloop.c) share, written once.
 *
 * The lab's framing (u32 big-endian length, op, payload; ECHO and ERROR), the
 * names of the ways a connection fails (as loadgen/conn.py names them) and
 * how an errno or an ERROR frame maps to one, the stop on SIGINT/SIGTERM, the
 * two clocks, resolving and connecting, the request and reply bytes from the
 * command line, the window line and the JSON of counts by kind.
 *
 * Header-only: static functions, standard C and Linux only, included by both
 * programs (each is still one translation unit: `cc -O2 -Wall -o prog prog.c`).
 * A program defines before including it
 *     _GNU_SOURCE, and PROGRAM: its name, the prefix of its error messages,
 * and after it die_usage(msg) (declared here): msg and the usage line on
 * stderr, exit 2. The build (servers/buildcache.py) hashes the headers a
 * source includes with the source, so a change here rebuilds both programs.
 */
#ifndef CONCLAB_WIRE_H
#define CONCLAB_WIRE_H

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define NS 1000000000LL
#define OP_ECHO 0x01
#define OP_ERROR 0xFF
#define HEADER 5                        /* u32 length + op */
#define MAX_EVENTS 256

/* Why a connection failed or a request was refused, named as loadgen/conn.py names them. */
enum { E_CLOSED, E_RESET, E_TIMEOUT, E_REFUSED, E_SERVER, E_PROTOCOL, E_EMFILE, E_ADDR, E_UNREACH, E_OTHER,
       E_BUSY, E_RATE, E_IDLE, E_FRAME, N_KINDS };
static const char *KIND[N_KINDS] = {"closed", "reset", "timeout", "refused", "server_error", "protocol",
                                    "emfile", "addr_unavailable", "unreachable", "other",
                                    "server_busy", "rate_limited", "idle_timeout", "frame_timeout"};

static void die_usage(const char *msg);     /* each program's own: msg and its usage line, exit 2 */

/* The kind of the ERROR frame at p (avail bytes received) by its reason text, and its length in *total;
 * -1 while it is incomplete and can still arrive whole in `room` bytes. */
static int server_kind(const unsigned char *p, size_t avail, size_t room, size_t *total) {
    static const struct { const char *text; int kind; } reasons[] = {
        {"server busy", E_BUSY}, {"rate limited", E_RATE}, {"idle timeout", E_IDLE}, {"frame timeout", E_FRAME}};
    uint32_t len_be;
    memcpy(&len_be, p, 4);
    *total = 4 + (size_t)ntohl(len_be);
    if (*total < 5 || avail < *total) return *total <= room && *total >= 5 ? -1 : E_SERVER;
    size_t n = *total - 5;
    for (size_t i = 0; i < sizeof reasons / sizeof reasons[0]; i++)
        if (strlen(reasons[i].text) == n && !strncasecmp((const char *)p + 5, reasons[i].text, n))
            return reasons[i].kind;
    return E_SERVER;
}

static int kind_of(int err) {
    switch (err) {
    case ECONNRESET: case EPIPE: case ECONNABORTED: return E_RESET;
    case ETIMEDOUT: return E_TIMEOUT;
    case ECONNREFUSED: return E_REFUSED;
    case EMFILE: case ENFILE: return E_EMFILE;
    case EADDRNOTAVAIL: case EADDRINUSE: return E_ADDR;
    case ENETUNREACH: case EHOSTUNREACH: return E_UNREACH;
    default: return E_OTHER;
    }
}

static volatile sig_atomic_t stop_asked;          /* SIGINT/SIGTERM: end the run early, still report */

static void on_stop(int sig) { (void)sig; stop_asked = 1; }

static void stop_on_signals(void) {
    struct sigaction sa = {.sa_handler = on_stop};  /* no SA_RESTART: epoll_wait returns at once */
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

static int64_t mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS + ts.tv_nsec;
}

/* This process's CPU time in seconds (it has one thread). */
static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct addrinfo *resolve(const char *target) {
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
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, PROGRAM ": %s:%s: %s\n", host, port, gai_strerror(rc));
        exit(2);
    }
    return res;
}

/* A connected non-blocking socket (TCP_NODELAY), or -1 with the failure counted in by_kind and kept in *last. */
static int connect_to(const struct addrinfo *ai, long long *by_kind, int *last) {
    int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
    if (fd < 0) { *last = errno; by_kind[kind_of(errno)]++; return -1; }
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
        *last = errno;
        by_kind[kind_of(errno)]++;
        close(fd);
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

/* Hex text -> bytes (malloc'd), or exit 2. */
static unsigned char *from_hex(const char *hex, size_t *len, const char *option) {
    size_t n = strlen(hex);
    if (n == 0 || n % 2) { fprintf(stderr, PROGRAM ": %s: an even number of hex digits\n", option); exit(2); }
    unsigned char *out = malloc(n / 2);
    for (size_t i = 0; i < n / 2; i++) {
        unsigned int byte;
        if (sscanf(hex + 2 * i, "%2x", &byte) != 1) { fprintf(stderr, PROGRAM ": %s: not hex\n", option); exit(2); }
        out[i] = (unsigned char)byte;
    }
    *len = n / 2;
    return out;
}

/* The request and the reply it expects: --request/--reply's bytes (hex), or when they are NULL the ECHO
 * frame of `size` payload bytes ('a'..'z' repeated), which is its own reply (*reply points at *request). */
static void request_and_reply(const char *request_hex, const char *reply_hex, long size,
                              unsigned char **request, size_t *request_len, unsigned char **reply, size_t *reply_len) {
    if (request_hex) {
        *request = from_hex(request_hex, request_len, "--request");
        *reply = from_hex(reply_hex, reply_len, "--reply");
        if (*reply_len < HEADER) die_usage("--reply must be a whole frame");
        return;
    }
    *request_len = *reply_len = HEADER + (size_t)size;
    unsigned char *frame = malloc(*request_len);
    uint32_t len_be = htonl((uint32_t)(1 + size));
    memcpy(frame, &len_be, 4);
    frame[4] = OP_ECHO;
    for (long i = 0; i < size; i++) frame[HEADER + i] = (unsigned char)('a' + i % 26);
    *request = *reply = frame;
}

/* --announce: `conclab load: window START END` (CLOCK_MONOTONIC s, the measured window) on stderr. */
static void announce_window(int64_t warm_at, int64_t end_at) {
    fprintf(stderr, "conclab load: window %.6f %.6f\n", (double)warm_at / NS, (double)end_at / NS);
    fflush(stderr);
}

/* ", \"name\": {\"kind\": count, ...}" of the kinds counted at least once. */
static void print_kinds(const char *name, const long long *kinds) {
    printf(", \"%s\": {", name);
    const char *sep = "";
    for (int k = 0; k < N_KINDS; k++)
        if (kinds[k]) { printf("%s\"%s\": %lld", sep, KIND[k], kinds[k]); sep = ", "; }
    printf("}");
}

#endif
