/*
 * tool-ratelimit.c - the `-r rate_limit` of convert and commit: bytes written per second.
 *
 * Invariant: a write of n bytes is let through only once the bytes admitted before it fit in the
 * time elapsed since the first one at the given rate (start + sent / rate <= now), so m bytes
 * take at least (m - last request) / rate seconds. Thread safe; rate 0 admits everything.
 */
#include <errno.h>
#include <time.h>

#include "tool.h"
#include "util/lock.h"

static double mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int tool_parse_rate(const char *arg, uint64_t *rate)
{
    if (tool_cvtnum("rate limit", arg, 0, INT64_MAX, rate) < 0) {
        return -EINVAL;
    }
    return 0;
}

void tool_rate_init(ToolRate *r, uint64_t bytes_per_sec)
{
    r->rate = bytes_per_sec;
    r->start = -1;
    r->sent = 0;
    pthread_mutex_init(&r->lock, NULL);
}

void tool_rate_destroy(ToolRate *r)
{
    pthread_mutex_destroy(&r->lock);
}

uint64_t tool_rate_chunk(const ToolRate *r, uint64_t chunk)
{
    /* About ten requests a second keep the pace even; never below 64 KiB (one cluster). */
    uint64_t want = r->rate / 10 / 65536 * 65536;
    if (r->rate == 0 || want >= chunk) {
        return chunk;
    }
    return want < 65536 ? 65536 : want;
}

void tool_rate_wait(ToolRate *r, uint64_t bytes)
{
    if (r->rate == 0) {
        return;
    }
    vd_mutex_lock(&r->lock);
    double now = mono_now();
    if (r->start < 0) {
        r->start = now;
    }
    double due = r->start + (double)r->sent / (double)r->rate;
    r->sent += bytes;
    vd_mutex_unlock(&r->lock);
    /* Sleeping outside the lock: each request waits for its own slot only. */
    while (due > now) {
        double d = due - now;
        struct timespec ts = { (time_t)d, (long)((d - (double)(time_t)d) * 1e9) };
        nanosleep(&ts, NULL);
        now = mono_now();
    }
}
