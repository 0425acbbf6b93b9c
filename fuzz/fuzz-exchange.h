/*
 * fuzz-exchange.h - what the socket fuzzers share: send one input to an in-process server over a
 * connected socket while draining its replies, then EOF, until the server hangs up. A server that
 * neither answers nor hangs up for 30 s is reported with every thread's state (/proc), and the
 * wait goes on up to 10 minutes before it is called a hang: on a loaded machine a nice-19 process
 * can be starved for tens of seconds, and the report tells starvation (threads runnable, the wait
 * ends) from a deadlock (threads asleep in futex, it does not). Header-only: each target is one
 * executable.
 */
#ifndef VDISK_FUZZ_EXCHANGE_H
#define VDISK_FUZZ_EXCHANGE_H

#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Every thread of this process: its state letter, kernel wait channel and current syscall. */
static void fuzz_dump_threads(const char *who)
{
    DIR *d = opendir("/proc/self/task");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.') {
            continue;
        }
        char path[96], stat[512] = "", wchan[64] = "", sys[128] = "";
        const char *files[] = {"stat", "wchan", "syscall"};
        char *bufs[] = {stat, wchan, sys};
        size_t lens[] = {sizeof(stat), sizeof(wchan), sizeof(sys)};
        for (int i = 0; i < 3; i++) {
            snprintf(path, sizeof(path), "/proc/self/task/%s/%s", e->d_name, files[i]);
            FILE *f = fopen(path, "re");
            if (f) {
                size_t n = fread(bufs[i], 1, lens[i] - 1, f);
                bufs[i][n] = 0;
                bufs[i][strcspn(bufs[i], "\n")] = 0;
                fclose(f);
            }
        }
        const char *st = strrchr(stat, ')');
        fprintf(stderr, "%s: thread %s state %c wchan %s syscall %s\n", who, e->d_name,
                st && st[1] ? st[2] : '?', wchan, sys);
    }
    if (d) {
        closedir(d);
    }
}

static double fuzz_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Send data on fd (a connected stream socket), drain replies, until the peer closes. */
static void fuzz_exchange(const char *who, int fd, const uint8_t *data, size_t size)
{
    size_t sent = 0;
    bool eof_sent = size == 0;
    if (eof_sent) {
        shutdown(fd, SHUT_WR);
    }
    static char buf[65536];
    double quiet_since = fuzz_now();
    bool reported = false;
    for (int rounds = 0; rounds < 1000000; rounds++) {
        struct pollfd p = {.fd = fd, .events = POLLIN | (eof_sent ? 0 : POLLOUT)};
        int r = poll(&p, 1, 30000);
        if (r < 0 && errno == EINTR) {
            continue; /* libFuzzer's SIGALRM (its -timeout watchdog), not the server */
        }
        if (r <= 0) {
            double quiet = fuzz_now() - quiet_since;
            fprintf(stderr, "%s: the server has neither answered nor hung up for %.0f s\n", who,
                    quiet);
            fuzz_dump_threads(who);
            reported = true;
            if (quiet > 600) {
                abort(); /* a hang */
            }
            continue;
        }
        if (reported) {
            fprintf(stderr, "%s: the server answered after %.0f s\n", who,
                    fuzz_now() - quiet_since);
            reported = false;
        }
        quiet_since = fuzz_now();
        if (p.revents & POLLOUT) {
            ssize_t w = send(fd, data + sent, size - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (w > 0) {
                sent += (size_t)w;
            }
            if ((w < 0 && errno != EAGAIN) || sent == size) {
                shutdown(fd, SHUT_WR); /* all sent, or the server hung up */
                eof_sent = true;
            }
        }
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t got = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
            if (got == 0 || (got < 0 && errno != EAGAIN)) {
                return; /* the server closed the connection */
            }
        }
    }
    fprintf(stderr, "%s: the exchange did not end in a million rounds\n", who);
    abort();
}

#endif
