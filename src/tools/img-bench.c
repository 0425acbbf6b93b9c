/*
 * img-bench.c - `vdisk bench`: qemu-img bench's I/O load and its two lines of output. `depth`
 * threads keep that many requests in flight; request i goes to offset o_i (o_0 = -o, then
 * + step, wrapped into [0, size - bufsize]: qemu-img 7.2 wraps at the image size and so fails
 * with EIO near the end, later QEMU and vdisk never leave the image). With --flush-interval=N
 * (writes only) a flush follows every N completed requests, after draining the queue unless
 * --no-drain. Timing is wall clock around the whole run.
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tools/tool.h"
#include "util/lock.h"

enum { OPT_PATTERN = 400, OPT_FLUSH_INTERVAL, OPT_NO_DRAIN };

typedef struct Bench {
    BlockNode *bs;
    bool write;
    uint64_t bufsize, step, size;
    uint8_t pattern;
    uint64_t flush_interval;
    bool drain;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    uint64_t next_off;
    uint64_t issued, count; /* requests handed out / to do */
    uint64_t completed, in_flight;
    bool flushing;          /* a draining flush waits: hand out no new request */
    int err;
} Bench;

static void *bench_worker(void *arg)
{
    Bench *b = arg;
    uint8_t *buf = malloc(b->bufsize ? b->bufsize : 1);
    vd_mutex_lock(&b->lock);
    if (!buf) {
        b->err = -ENOMEM;
    } else {
        memset(buf, b->pattern, b->bufsize);
    }
    for (;;) {
        while (b->flushing && !b->err) {
            vd_cond_wait(&b->cond, &b->lock);
        }
        if (b->err || b->issued >= b->count) {
            break;
        }
        uint64_t off = b->next_off;
        b->next_off += b->step;
        b->next_off = b->size <= b->bufsize ? 0 : b->next_off % (b->size - b->bufsize);
        b->issued++;
        b->in_flight++;
        vd_mutex_unlock(&b->lock);
        int r = off > b->size || b->size - off < b->bufsize ? -EIO
                : b->write ? vd_pwrite(b->bs, off, b->bufsize, buf, 0)
                           : vd_pread(b->bs, off, b->bufsize, buf);
        vd_mutex_lock(&b->lock);
        b->in_flight--;
        b->completed++;
        if (r < 0 && !b->err) {
            b->err = r;
        }
        if (!b->err && b->flush_interval && b->completed % b->flush_interval == 0) {
            if (b->drain) {
                b->flushing = true;
                while (b->in_flight && !b->err) {
                    vd_cond_wait(&b->cond, &b->lock);
                }
            }
            r = vd_flush(b->bs);
            if (r < 0 && !b->err) {
                b->err = r;
            }
            b->flushing = false;
        }
        vd_cond_broadcast(&b->cond);
    }
    vd_cond_broadcast(&b->cond);
    vd_mutex_unlock(&b->lock);
    free(buf);
    return NULL;
}

/* A number option in [min, max] (qemu-img's cvtnum with suffixes when sized); -1 after error. */
static int bench_num(const char *arg, bool sized, uint64_t min, uint64_t max, const char *what,
                     uint64_t *out)
{
    if (sized) {
        return tool_cvtnum(what, arg, min, max, out);
    }
    if (tool_parse_uint(arg, out) < 0 || *out < min || *out > max) {
        tool_error("Invalid %s specified", what);
        return -1;
    }
    return 0;
}

/*
 * Does the image sit on a file (file-posix, where qemu-img checks -n / -i native)? vdisk has one
 * I/O engine, so native and io_uring only get qemu-img's checks and then run as threads do.
 */
static bool bench_on_file(const BlockNode *bs)
{
    for (int depth = 0; bs && depth < 8; depth++, bs = bs->file) {
        if (!strcmp(bs->drv->name, "file") || !strcmp(bs->drv->name, "host_device")) {
            return true;
        }
    }
    return false;
}

int img_bench(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "force-share", no_argument, NULL, 'U' },
        { "flush-interval", required_argument, NULL, OPT_FLUSH_INTERVAL },
        { "pattern", required_argument, NULL, OPT_PATTERN },
        { "no-drain", no_argument, NULL, OPT_NO_DRAIN },
        { NULL, 0, NULL, 0 }
    };
    Bench b = { .bufsize = 4096, .count = 75000, .drain = true };
    uint64_t depth = 64, offset = 0, step = 0, v;
    bool step_set = false, force_share = false, quiet = false, native = false;
    const char *fmt = NULL;
    int c, cflags = 0;
    while ((c = getopt_long(argc, argv, ":hc:d:f:i:no:qs:S:t:wU", longopts, NULL)) != -1) {
        switch (c) {
        case 'c':
            if (bench_num(optarg, false, 0, INT32_MAX, "request count", &b.count) < 0) {
                return 1;
            }
            break;
        case 'd':
            /* qemu-img 7.2 accepts 0 and then hangs; later QEMU refuses it, so does vdisk */
            if (bench_num(optarg, false, 1, INT32_MAX, "queue depth", &depth) < 0) {
                return 1;
            }
            break;
        case 'f': fmt = optarg; break;
        case 'i':
            /* bdrv_parse_aio: "threads" is the default and never clears an earlier -n */
            if (!strcmp(optarg, "native")) {
                native = true;
            } else if (strcmp(optarg, "threads") && strcmp(optarg, "io_uring")) {
                tool_error("Invalid aio option: %s", optarg);
                return 1;
            }
            break;
        case 'n': native = true; break;
        case 'o':
            if (bench_num(optarg, true, 0, INT64_MAX, "offset", &offset) < 0) {
                return 1;
            }
            break;
        case 'q': quiet = true; break;
        case 's':
            if (bench_num(optarg, true, 0, INT32_MAX, "buffer size", &b.bufsize) < 0) {
                return 1;
            }
            break;
        case 'S':
            if (bench_num(optarg, true, 0, INT32_MAX, "step_size", &step) < 0) {
                return 1;
            }
            step_set = true;
            break;
        case 't':
            if (tool_cache_flags(optarg, &cflags) < 0) {
                tool_error("Invalid cache mode");
                return 1;
            }
            break;
        case 'w': b.write = true; break;
        case 'U': force_share = true; break;
        case OPT_PATTERN:
            if (bench_num(optarg, false, 0, 255, "pattern byte", &v) < 0) {
                return 1;
            }
            b.pattern = (uint8_t)v;
            break;
        case OPT_FLUSH_INTERVAL:
            if (bench_num(optarg, false, 0, INT32_MAX, "flush interval", &b.flush_interval) < 0) {
                return 1;
            }
            break;
        case OPT_NO_DRAIN: b.drain = false; break;
        case 'h': tool_print_usage("bench"); return 0;
        default: tool_bad_option(argv[0], c, argv[optind - 1]); return 1;
        }
    }
    (void)quiet; /* qemu-img bench -q only quiets opening; the result lines are always printed */
    const char *filename = tool_one_image(argc, argv);
    if (!filename) {
        return 1;
    }
    if (b.flush_interval && !b.write) {
        tool_error("--flush-interval is only available in write tests");
        return 1;
    }
    if (b.flush_interval && b.flush_interval < depth) {
        tool_error("Flush interval can't be smaller than depth");
        return 1;
    }
    int flags = (b.write ? VD_OPEN_RDWR : 0) | cflags;
    if (force_share && b.write) {
        tool_error("Could not open '%s': force-share=on can only be used with read-only images",
                   filename);
        return 1;
    }
    b.bs = tool_open(filename, fmt, tool_open_flags(flags, force_share));
    if (!b.bs) {
        return 1;
    }
    if (native && !(flags & VD_OPEN_DIRECT) && bench_on_file(b.bs)) {
        tool_error("Could not open '%s': aio=native was specified, but it requires "
                   "cache.direct=on, which was not specified.", filename);
        vd_node_unref(b.bs);
        return 1;
    }
    int64_t len = vd_getlength(b.bs);
    b.size = len > 0 ? (uint64_t)len : 0;
    b.step = step_set ? step : b.bufsize;
    b.next_off = offset;
    printf("Sending %" PRIu64 " %s requests, %" PRIu64 " bytes each, %" PRIu64 " in parallel "
           "(starting at offset %" PRIu64 ", step size %" PRIu64 ")\n", b.count,
           b.write ? "write" : "read", b.bufsize, depth, offset, b.step);
    if (b.flush_interval) {
        printf("Sending flush every %" PRIu64 " requests\n", b.flush_interval);
    }
    fflush(stdout);
    pthread_mutex_init(&b.lock, NULL);
    pthread_cond_init(&b.cond, NULL);
    uint64_t nthreads = depth < b.count ? depth : b.count;
    pthread_t *th = calloc(nthreads ? nthreads : 1, sizeof(pthread_t));
    uint64_t started = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (; th && started < nthreads; started++) {
        if (pthread_create(&th[started], NULL, bench_worker, &b) != 0) {
            break;
        }
    }
    if (started == 0 && nthreads) {
        b.err = -ENOMEM;
    }
    for (uint64_t i = 0; i < started; i++) {
        pthread_join(th[i], NULL);
    }
    int ret = b.err;
    if (ret == 0 && b.write) {
        ret = vd_flush(b.bs);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    free(th);
    pthread_cond_destroy(&b.cond);
    pthread_mutex_destroy(&b.lock);
    vd_node_unref(b.bs);
    if (ret < 0) {
        tool_error("Failed request: %s", strerror(-ret));
        return 1;
    }
    printf("Run completed in %3.3f seconds.\n",
           (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
