/* readclient: time open + read(whole file) + close, the way an application reads a secret.
 *
 *   readclient PATH ITERATIONS WARMUP [--barrier]
 *
 * Reads PATH WARMUP times untimed; with --barrier it then prints "ready" and waits for a byte
 * on stdin, so parallel clients start timing together (after all have warmed up). Then it times
 * ITERATIONS rounds of open(O_RDONLY) + read() until EOF + close() with
 * clock_gettime(CLOCK_MONOTONIC) and, after the loop, prints "size <bytes>" (what one round
 * read, so the caller can check the whole file came back), "elapsed <nanoseconds>" (the wall
 * time of the whole timed loop), "start <nanoseconds>" (CLOCK_MONOTONIC when the loop began, the
 * same clock in every process: with elapsed, the caller knows when each parallel client ran, for
 * opens per second) and one line per round: "<nanoseconds>". Exit status 1 on any error.
 *
 * Compiled by bench/read_latency.py into bench/.build/ (cc -O2).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BUF_SIZE (128 * 1024)

static char buf[BUF_SIZE];

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* One round; returns the number of bytes read or -1. */
static long one_round(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    long total = 0;
    for (;;) {
        ssize_t n = read(fd, buf, BUF_SIZE);
        if (n < 0) {
            if (errno == EINTR) continue;
            close(fd);
            return -1;
        }
        if (n == 0) break;
        total += n;
    }
    if (close(fd) < 0) return -1;
    return total;
}

int main(int argc, char **argv) {
    if (argc < 4 || argc > 5 || (argc == 5 && strcmp(argv[4], "--barrier") != 0)) {
        fprintf(stderr, "usage: %s PATH ITERATIONS WARMUP [--barrier]\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    long iterations = strtol(argv[2], NULL, 10);
    long warmup = strtol(argv[3], NULL, 10);
    if (iterations <= 0 || warmup < 0) {
        fprintf(stderr, "readclient: bad ITERATIONS or WARMUP\n");
        return 2;
    }
    int64_t *samples = malloc(sizeof(int64_t) * (size_t)iterations);
    if (samples == NULL) {
        perror("readclient: malloc");
        return 1;
    }
    long size = -1;
    for (long i = 0; i < warmup; i++) {
        size = one_round(path);
        if (size < 0) {
            fprintf(stderr, "readclient: %s: %s\n", path, strerror(errno));
            return 1;
        }
    }
    if (argc == 5) {
        char go;
        printf("ready\n");
        fflush(stdout);
        if (read(0, &go, 1) != 1) {
            fprintf(stderr, "readclient: no go signal on stdin\n");
            return 1;
        }
    }
    int64_t start = now_ns();
    for (long i = 0; i < iterations; i++) {
        int64_t t0 = now_ns();
        long n = one_round(path);
        int64_t t1 = now_ns();
        if (n < 0) {
            fprintf(stderr, "readclient: %s: %s\n", path, strerror(errno));
            return 1;
        }
        if (size >= 0 && n != size) {
            fprintf(stderr, "readclient: %s: read %ld bytes, then %ld\n", path, size, n);
            return 1;
        }
        size = n;
        samples[i] = t1 - t0;
    }
    int64_t elapsed = now_ns() - start;
    /* Print only after timing, so stdout never slows the loop. */
    printf("size %ld\n", size);
    printf("elapsed %lld\n", (long long)elapsed);
    printf("start %lld\n", (long long)start);
    for (long i = 0; i < iterations; i++) printf("%lld\n", (long long)samples[i]);
    free(samples);
    return fflush(stdout) == 0 ? 0 : 1;
}
