/* Kernel thread switch baseline: two OS threads ping-pong, nanoseconds per switch.
 *
 * For conclab's switch experiment (experiments/switch.py builds this file with the
 * system C compiler into a cache keyed by its hash, like the Go switchbench).
 *
 *   threadswitch --mode futex|pipe --cpus A[,B] [--iterations N] [--rounds R] [--round-s S]
 *
 * Thread A (main) is pinned to CPU A, thread B to CPU B (to CPU A too when only
 * one CPU is given: "same CPU"; two different CPUs: "across CPUs"). They hand a
 * token back and forth N times per round (a round trip is two switches):
 *
 *   futex: one shared word says whose turn it is; a thread that is not on turn
 *          sleeps in FUTEX_WAIT, the other flips the word and FUTEX_WAKEs it.
 *          No spinning: every hand-off blocks one thread and wakes the other.
 *   pipe:  two pipes, one per direction; write one byte, block in read.
 *
 * Without --iterations, N is calibrated so a round takes about --round-s seconds.
 * Printed as one JSON line: the median, min and max ns per switch over the
 * rounds; over all measured rounds, both threads' context switches
 * (getrusage RUSAGE_THREAD ru_nvcsw / ru_nivcsw) and CPU time
 * (CLOCK_THREAD_CPUTIME_ID); and how often the CPUs used entered each idle
 * state (/sys/devices/system/cpu/cpuN/cpuidle, when the kernel has it).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define SWITCHES_PER_ROUND_TRIP 2
#define MAX_ROUNDS 1000
#define MAX_IDLE_STATES 16
#define CALIBRATE_START 1000
#define CALIBRATE_FRACTION 0.2

enum mode { FUTEX, PIPE };

struct usage {                 /* one thread's counters at one moment */
    long voluntary, involuntary;
    long long cpu_ns;
};

struct shared {
    enum mode mode;
    int cpu_b;
    long n;                    /* round trips in the next round; 0: thread B exits */
    int turn;                  /* futex word: 0 = A's turn, 1 = B's turn */
    int a_to_b[2], b_to_a[2];  /* pipes */
    pthread_barrier_t start, end;
    struct usage b_before, b_after;
    int b_error;
};

static void die(const char *what) {
    fprintf(stderr, "threadswitch: %s: %s\n", what, strerror(errno));
    exit(2);
}

static long long now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static struct usage usage_now(void) {
    struct rusage ru;
    struct usage u;
    getrusage(RUSAGE_THREAD, &ru);
    u.voluntary = ru.ru_nvcsw;
    u.involuntary = ru.ru_nivcsw;
    u.cpu_ns = now_ns(CLOCK_THREAD_CPUTIME_ID);
    return u;
}

static long futex(int *word, int op, int value) {
    return syscall(SYS_futex, word, op, value, NULL, NULL, 0);
}

/* Hand the turn to `to` and sleep until it comes back to `me`. */
static void futex_pass(int *turn, int me, int to) {
    __atomic_store_n(turn, to, __ATOMIC_SEQ_CST);
    futex(turn, FUTEX_WAKE_PRIVATE, 1);
    while (__atomic_load_n(turn, __ATOMIC_SEQ_CST) != me)
        if (futex(turn, FUTEX_WAIT_PRIVATE, to) == -1 && errno != EAGAIN && errno != EINTR)
            die("FUTEX_WAIT");
}

static void futex_await(int *turn, int me, int other) {
    while (__atomic_load_n(turn, __ATOMIC_SEQ_CST) != me)
        if (futex(turn, FUTEX_WAIT_PRIVATE, other) == -1 && errno != EAGAIN && errno != EINTR)
            die("FUTEX_WAIT");
}

static void pipe_send(int fd) {
    char byte = 'x';
    if (write(fd, &byte, 1) != 1)
        die("write");
}

static void pipe_receive(int fd) {
    char byte;
    if (read(fd, &byte, 1) != 1)
        die("read");
}

static void pin(pthread_t thread, int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    int err = pthread_setaffinity_np(thread, sizeof set, &set);
    if (err) {
        errno = err;
        fprintf(stderr, "threadswitch: cannot pin a thread to CPU %d: %s\n", cpu, strerror(err));
        exit(2);
    }
}

static void *thread_b(void *arg) {
    struct shared *s = arg;
    pin(pthread_self(), s->cpu_b);
    for (;;) {
        pthread_barrier_wait(&s->start);
        long n = s->n;
        if (n == 0)
            return NULL;
        s->b_before = usage_now();
        for (long i = 0; i < n; i++) {
            if (s->mode == FUTEX) {
                futex_await(&s->turn, 1, 0);
                __atomic_store_n(&s->turn, 0, __ATOMIC_SEQ_CST);
                futex(&s->turn, FUTEX_WAKE_PRIVATE, 1);
            } else {
                pipe_receive(s->a_to_b[0]);
                pipe_send(s->b_to_a[1]);
            }
        }
        s->b_after = usage_now();
        pthread_barrier_wait(&s->end);
    }
}

struct round {
    long long elapsed_ns;
    long voluntary, involuntary;
    long long cpu_ns;
};

/* One round of n round trips, run by thread A; both threads' counters. */
static struct round run_round(struct shared *s, long n) {
    struct round r;
    s->n = n;
    s->turn = 0;
    pthread_barrier_wait(&s->start);
    struct usage before = usage_now();
    long long t0 = now_ns(CLOCK_MONOTONIC);
    for (long i = 0; i < n; i++) {
        if (s->mode == FUTEX) {
            futex_pass(&s->turn, 0, 1);
        } else {
            pipe_send(s->a_to_b[1]);
            pipe_receive(s->b_to_a[0]);
        }
    }
    r.elapsed_ns = now_ns(CLOCK_MONOTONIC) - t0;
    struct usage after = usage_now();
    pthread_barrier_wait(&s->end);
    r.voluntary = (after.voluntary - before.voluntary) + (s->b_after.voluntary - s->b_before.voluntary);
    r.involuntary = (after.involuntary - before.involuntary) + (s->b_after.involuntary - s->b_before.involuntary);
    r.cpu_ns = (after.cpu_ns - before.cpu_ns) + (s->b_after.cpu_ns - s->b_before.cpu_ns);
    return r;
}

struct idle_state {
    int cpu, state;
    char name[32];
    long long usage, time_us;
};

static int read_number(const char *path, long long *out) {
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    int ok = fscanf(f, "%lld", out) == 1;
    fclose(f);
    return ok ? 0 : -1;
}

/* The idle states of the CPUs used and how often each was entered so far (none without cpuidle). */
static int idle_states(const int *cpus, int ncpus, struct idle_state *out) {
    int count = 0;
    for (int c = 0; c < ncpus; c++) {
        if (c == 1 && cpus[1] == cpus[0])
            break;
        for (int k = 0; k < MAX_IDLE_STATES && count < 2 * MAX_IDLE_STATES; k++) {
            char path[128];
            struct idle_state *st = &out[count];
            snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/cpuidle/state%d/usage", cpus[c], k);
            if (read_number(path, &st->usage) != 0)
                break;
            snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/cpuidle/state%d/time", cpus[c], k);
            if (read_number(path, &st->time_us) != 0)
                st->time_us = 0;
            snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/cpuidle/state%d/name", cpus[c], k);
            FILE *f = fopen(path, "r");
            st->name[0] = '\0';
            if (f) {
                if (fgets(st->name, sizeof st->name, f))
                    st->name[strcspn(st->name, "\n\"\\")] = '\0';
                fclose(f);
            }
            st->cpu = cpus[c];
            st->state = k;
            count++;
        }
    }
    return count;
}

static int compare_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void usage_exit(const char *why) {
    fprintf(stderr, "threadswitch: %s\nusage: threadswitch --mode futex|pipe --cpus A[,B] [--iterations N] "
            "[--rounds R] [--round-s S]\n", why);
    exit(2);
}

int main(int argc, char **argv) {
    static struct shared s;
    const char *mode = NULL, *cpu_list = NULL;
    long iterations = 0;
    int rounds = 5;
    double round_s = 0.2;
    for (int i = 1; i < argc; i++) {
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (!value)
            usage_exit("every option takes a value");
        if (!strcmp(argv[i], "--mode")) mode = value;
        else if (!strcmp(argv[i], "--cpus")) cpu_list = value;
        else if (!strcmp(argv[i], "--iterations")) iterations = atol(value);
        else if (!strcmp(argv[i], "--rounds")) rounds = atoi(value);
        else if (!strcmp(argv[i], "--round-s")) round_s = atof(value);
        else usage_exit("unknown option");
        i++;
    }
    if (!mode || (strcmp(mode, "futex") && strcmp(mode, "pipe")))
        usage_exit("--mode must be futex or pipe");
    if (!cpu_list)
        usage_exit("--cpus is required");
    int cpus[2];
    int ncpus = sscanf(cpu_list, "%d,%d", &cpus[0], &cpus[1]);
    if (ncpus < 1 || cpus[0] < 0 || (ncpus == 2 && cpus[1] < 0))
        usage_exit("--cpus takes one CPU number or two, comma-separated");
    if (ncpus == 1)
        cpus[1] = cpus[0];
    if (rounds < 1) rounds = 1;
    if (rounds > MAX_ROUNDS) rounds = MAX_ROUNDS;

    s.mode = strcmp(mode, "futex") ? PIPE : FUTEX;
    s.cpu_b = cpus[1];
    if (pipe(s.a_to_b) || pipe(s.b_to_a))
        die("pipe");
    pthread_barrier_init(&s.start, NULL, 2);
    pthread_barrier_init(&s.end, NULL, 2);
    pin(pthread_self(), cpus[0]);
    pthread_t peer;
    if ((errno = pthread_create(&peer, NULL, thread_b, &s)))
        die("pthread_create");

    long n = iterations;
    if (n <= 0) {                               /* calibrate: about round_s seconds per round */
        n = CALIBRATE_START;
        for (;;) {
            double elapsed_s = run_round(&s, n).elapsed_ns / 1e9;
            if (elapsed_s >= round_s * CALIBRATE_FRACTION || n >= 1000000000L) {
                if (elapsed_s < 1e-9) elapsed_s = 1e-9;
                n = (long)(n * round_s / elapsed_s) + 1;
                break;
            }
            n *= 4;
        }
    }

    static struct idle_state idle0[2 * MAX_IDLE_STATES], idle1[2 * MAX_IDLE_STATES];
    int nidle = idle_states(cpus, 2, idle0);
    double ns[MAX_ROUNDS];
    long voluntary = 0, involuntary = 0;
    long long cpu_ns = 0;
    for (int r = 0; r < rounds; r++) {
        struct round result = run_round(&s, n);
        ns[r] = (double)result.elapsed_ns / ((double)n * SWITCHES_PER_ROUND_TRIP);
        voluntary += result.voluntary;
        involuntary += result.involuntary;
        cpu_ns += result.cpu_ns;
    }
    if (idle_states(cpus, 2, idle1) != nidle)
        nidle = 0;
    s.n = 0;
    pthread_barrier_wait(&s.start);
    pthread_join(peer, NULL);

    double sorted[MAX_ROUNDS];
    memcpy(sorted, ns, sizeof(double) * rounds);
    qsort(sorted, rounds, sizeof(double), compare_double);
    double median = rounds % 2 ? sorted[rounds / 2] : (sorted[rounds / 2 - 1] + sorted[rounds / 2]) / 2;
    double round_trips = (double)n * rounds;
    printf("{\"bench\": \"%s\", \"placement\": \"%s\", \"cpus\": [%d, %d], \"iterations\": %ld, \"rounds\": %d, "
           "\"ns_per_switch\": %.3f, \"ns_min\": %.3f, \"ns_max\": %.3f, "
           "\"ctx_voluntary\": %ld, \"ctx_involuntary\": %ld, \"ctx_per_round_trip\": %.4f, "
           "\"cpu_ns\": %lld, \"cpu_ns_per_switch\": %.3f, \"idle\": [",
           mode, cpus[0] == cpus[1] ? "same-cpu" : "cross-cpu", cpus[0], cpus[1], n, rounds,
           median, sorted[0], sorted[rounds - 1], voluntary, involuntary,
           (voluntary + involuntary) / round_trips, cpu_ns, cpu_ns / (round_trips * SWITCHES_PER_ROUND_TRIP));
    for (int k = 0; k < nidle; k++)
        printf("%s{\"cpu\": %d, \"state\": \"%s\", \"entries\": %lld, \"time_us\": %lld}", k ? ", " : "",
               idle1[k].cpu, idle1[k].name, idle1[k].usage - idle0[k].usage, idle1[k].time_us - idle0[k].time_us);
    printf("]}\n");
    return 0;
}
