/*
 * img-io.c - `vdisk io`: a qemu-io style command interpreter over one open image.
 * Commands come from -c options or, without -c, one per line from stdin; in stdin mode stdout
 * is flushed after every command and `flush` prints "flushed" once the data is durable (crash
 * tests rely on that). Output lines match qemu-io; unlike qemu-io, any failed command
 * (I/O error, pattern mismatch, bad arguments) makes the exit status 1.
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tools/tool.h"

#define MIN(a, b) ((a) < (b) ? (a) : (b))

typedef struct IoCtx {
    BlockNode *bs;
    bool stdin_mode;
} IoCtx;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* fixed: always h:mm:ss.ss (qemu-io's VERBOSE_FIXED_TIME, used by -C). */
static void timestr(double secs, char *ts, size_t size, bool fixed)
{
    unsigned long s = (unsigned long)secs;
    double frac = secs - (double)s;
    if (s || fixed) {
        snprintf(ts, size, "%u:%02u:%05.2f", (unsigned)(s / 3600), (unsigned)((s / 60) % 60),
                 (double)(s % 60) + frac);
    } else {
        snprintf(ts, size, "%05.2f sec", frac);
    }
}

/* machine (-C): "bytes,ops,time,bytes/sec,ops/sec" on one line, as qemu-io. */
static void print_report(const char *op, double t, int64_t offset, int64_t count, int64_t total,
                         int cnt, bool machine)
{
    char s1[64], s2[64], ts[64];
    timestr(t, ts, sizeof(ts), machine);
    if (machine) {
        printf("%" PRId64 ",%d,%s,%.3f,%.3f\n", total, cnt, ts,
               t > 0 ? (double)total / t : (double)total * 1e9,
               t > 0 ? (double)cnt / t : (double)cnt * 1e9);
        return;
    }
    tool_cvtstr((double)total, s1, sizeof(s1));
    tool_cvtstr(t > 0 ? (double)total / t : (double)total * 1e9, s2, sizeof(s2));
    printf("%s %" PRId64 "/%" PRId64 " bytes at offset %" PRId64 "\n", op, total, count, offset);
    printf("%s, %d ops; %s (%s/sec and %.4f ops/sec)\n", s1, cnt, ts, s2,
           t > 0 ? (double)cnt / t : (double)cnt * 1e9);
}

/* Parse a qemu-io number; prints qemu-io's message on error. */
static int parse_num(const char *s, int64_t *out)
{
    uint64_t v;
    int r = tool_parse_size(s, &v);
    if (r == 0 && v > INT64_MAX) {
        r = -ERANGE;
    }
    if (r == -ERANGE) {
        printf("Parsing error: argument too large -- %s\n", s);
        return -1;
    }
    if (r < 0) {
        printf("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- %s\n",
               s);
        return -1;
    }
    *out = (int64_t)v;
    return 0;
}

static int parse_pattern(const char *s)
{
    char *end;
    long v = strtol(s, &end, 0);
    if (*end || v < 0 || v > 255) {
        printf("%s is not a valid pattern byte\n", s);
        return -1;
    }
    return (int)v;
}

/* Check offset/len against the image (qemu-io fails such requests with EIO). */
static int check_req(IoCtx *io, int64_t off, int64_t len)
{
    int64_t size = vd_getlength(io->bs);
    if (size < 0) {
        return (int)size;
    }
    if (off > size || len > size - off) {
        return -EIO;
    }
    return 0;
}

/* qemu-io's message for an option getopt did not accept; returns -EINVAL. */
static int bad_option(const char *cmd)
{
    printf("%s: invalid option -- '%c'\n", cmd, optopt);
    return -EINVAL;
}

/* read, write and discard take exactly two operands after their options: "off len". */
static int need_off_len(const char *cmd, const char *usage, int argc)
{
    if (optind != argc - 2) {
        printf("%s: usage: %s\n", cmd, usage);
        return -EINVAL;
    }
    return 0;
}

static int parse_off_len(char **argv, int64_t *off, int64_t *len)
{
    if (parse_num(argv[optind], off) < 0 || parse_num(argv[optind + 1], len) < 0) {
        return -EINVAL;
    }
    return 0;
}

/* A request that needs a buffer is limited to 1 GiB, as in qemu-io. */
static int check_buf_len(int64_t len, const char *arg)
{
    if (len > (int64_t)(1u << 30)) {
        printf("length cannot exceed 1 GiB, given %s\n", arg);
        return -EINVAL;
    }
    return 0;
}

/* Say how request R ended: "<cmd> failed: ..." or, unless QFLAG, qemu-io's timing report. */
static int request_done(const char *cmd, const char *done, int r, double t, bool qflag,
                        bool machine, int64_t off, int64_t len)
{
    if (r < 0) {
        printf("%s failed: %s\n", cmd, strerror(-r));
        return r;
    }
    if (!qflag) {
        print_report(done, t, off, len, len, 1, machine);
    }
    return 0;
}

static void dump_buffer(const uint8_t *buf, int64_t offset, int64_t len)
{
    for (int64_t i = 0; i < len; i += 16) {
        printf("%08" PRIx64 ":  ", (uint64_t)(offset + i));
        for (int64_t j = 0; j < 16 && i + j < len; j++) {
            printf("%02x ", buf[i + j]);
        }
        printf(" ");
        for (int64_t j = 0; j < 16 && i + j < len; j++) {
            printf("%c", isalnum(buf[i + j]) ? buf[i + j] : '.');
        }
        printf("\n");
    }
}

static int cmd_read(IoCtx *io, int argc, char **argv)
{
    bool vflag = false, qflag = false, Cflag = false;
    int pattern = -1, c;
    optind = 0;
    while ((c = getopt(argc, argv, "+P:vqC")) != -1) {
        switch (c) {
        case 'P':
            pattern = parse_pattern(optarg);
            if (pattern < 0) {
                return -EINVAL;
            }
            break;
        case 'v': vflag = true; break;
        case 'q': qflag = true; break;
        case 'C': Cflag = true; break;
        default: return bad_option("read");
        }
    }
    int64_t off, len;
    if (need_off_len("read", "read [-P pattern] [-v] [-q] off len", argc) < 0 ||
        parse_off_len(argv, &off, &len) < 0 || check_buf_len(len, argv[optind + 1]) < 0) {
        return -EINVAL;
    }
    uint8_t *buf = malloc(len ? (size_t)len : 1);
    if (!buf) {
        printf("read failed: %s\n", strerror(ENOMEM));
        return -ENOMEM;
    }
    double t0 = now();
    int r = check_req(io, off, len);
    if (r == 0) {
        r = vd_pread(io->bs, (uint64_t)off, (uint64_t)len, buf);
    }
    double t = now() - t0;
    if (r < 0) {
        printf("read failed: %s\n", strerror(-r));
        free(buf);
        return r;
    }
    int ret = 0;
    if (pattern >= 0) {
        for (int64_t i = 0; i < len; i++) {
            if (buf[i] != (uint8_t)pattern) {
                printf("Pattern verification failed at offset %" PRId64 ", %" PRId64 " bytes\n",
                       off, len);
                ret = -EINVAL;
                break;
            }
        }
    }
    if (!qflag) {
        if (vflag) {
            dump_buffer(buf, off, len);
        }
        print_report("read", t, off, len, len, 1, Cflag);
    }
    free(buf);
    return ret;
}

static int cmd_write(IoCtx *io, int argc, char **argv)
{
    bool zflag = false, uflag = false, cflag = false, qflag = false, Pflag = false;
    bool Cflag = false;
    int fua = 0, pattern = 0xcd, c;
    optind = 0;
    while ((c = getopt(argc, argv, "+P:zucqfbC")) != -1) {
        switch (c) {
        case 'P':
            Pflag = true;
            pattern = parse_pattern(optarg);
            if (pattern < 0) {
                return -EINVAL;
            }
            break;
        case 'z': zflag = true; break;
        case 'u': uflag = true; break;
        case 'c': cflag = true; break;
        case 'q': qflag = true; break;
        case 'f': fua = VD_REQ_FUA; break;
        case 'C': Cflag = true; break;
        case 'b':
            /* qcow2's VM state area is not the disk: never write it there instead */
            printf("write -b (VM state) is not supported\n");
            return -ENOTSUP;
        default: return bad_option("write");
        }
    }
    if (need_off_len("write", "write [-P pattern] [-z [-u]] [-c] [-f] [-q] off len", argc) < 0) {
        return -EINVAL;
    }
    if (zflag && Pflag) {
        printf("Only one of -z, -P, and -s can be specified at the same time\n");
        return -EINVAL;
    }
    if (zflag && cflag) {
        printf("-z and -c cannot be specified at the same time\n");
        return -EINVAL;
    }
    if (uflag && !zflag) {
        printf("-u requires -z to be specified\n");
        return -EINVAL;
    }
    int64_t off, len;
    if (parse_off_len(argv, &off, &len) < 0 ||
        (!zflag && check_buf_len(len, argv[optind + 1]) < 0)) {
        return -EINVAL;
    }
    uint8_t *buf = NULL;
    if (!zflag) {
        buf = malloc(len ? (size_t)len : 1);
        if (!buf) {
            printf("write failed: %s\n", strerror(ENOMEM));
            return -ENOMEM;
        }
        memset(buf, pattern, (size_t)len);
    }
    double t0 = now();
    int r = check_req(io, off, len);
    if (r == 0) {
        if (zflag) {
            r = vd_pwrite_zeroes(io->bs, (uint64_t)off, (uint64_t)len,
                                 fua | (uflag ? VD_REQ_MAY_UNMAP : 0));
        } else if (cflag) {
            r = vd_pwrite_compressed(io->bs, (uint64_t)off, (uint64_t)len, buf);
        } else {
            r = vd_pwrite(io->bs, (uint64_t)off, (uint64_t)len, buf, fua);
        }
    }
    double t = now() - t0;
    free(buf);
    return request_done("write", "wrote", r, t, qflag, Cflag, off, len);
}

static int cmd_discard(IoCtx *io, int argc, char **argv)
{
    bool qflag = false, Cflag = false;
    int c;
    optind = 0;
    while ((c = getopt(argc, argv, "+qC")) != -1) {
        switch (c) {
        case 'q': qflag = true; break;
        case 'C': Cflag = true; break;
        default: return bad_option("discard");
        }
    }
    int64_t off, len;
    if (need_off_len("discard", "discard [-q] off len", argc) < 0 ||
        parse_off_len(argv, &off, &len) < 0) {
        return -EINVAL;
    }
    double t0 = now();
    int r = check_req(io, off, len);
    if (r == 0) {
        r = vd_pdiscard(io->bs, (uint64_t)off, (uint64_t)len, 0);
    }
    double t = now() - t0;
    return request_done("discard", "discard", r, t, qflag, Cflag, off, len);
}

static int cmd_flush(IoCtx *io, int argc, char **argv)
{
    int r = vd_flush(io->bs);
    if (r < 0) {
        printf("flush failed: %s\n", strerror(-r));
        return r;
    }
    if (io->stdin_mode) {
        printf("flushed\n"); /* the data written so far is durable */
    }
    return 0;
}

/* Is [off, off+bytes) allocated in the top layer? Merged like qemu-io's map_is_allocated. */
static int top_allocated(BlockNode *bs, int64_t off, int64_t bytes, int64_t *pnum)
{
    VdBlockStatus st;
    uint64_t n;
    int r = vd_block_status(bs, (uint64_t)off, (uint64_t)bytes, &n, &st);
    if (r < 0) {
        return r;
    }
    if (n == 0) {
        return -EIO;
    }
    int first = !!(st.flags & VD_BS_ALLOCATED);
    *pnum = (int64_t)n;
    off += (int64_t)n;
    bytes -= (int64_t)n;
    while (bytes > 0) {
        r = vd_block_status(bs, (uint64_t)off, (uint64_t)bytes, &n, &st);
        if (r < 0 || n == 0 || !!(st.flags & VD_BS_ALLOCATED) != first) {
            break;
        }
        *pnum += (int64_t)n;
        off += (int64_t)n;
        bytes -= (int64_t)n;
    }
    return first;
}

static int cmd_map(IoCtx *io, int argc, char **argv)
{
    int64_t length = vd_getlength(io->bs);
    if (length < 0) {
        printf("getlength: %s\n", strerror((int)-length));
        return (int)length;
    }
    int64_t off = 0;
    while (off < length) {
        int64_t num;
        int r = top_allocated(io->bs, off, length - off, &num);
        if (r < 0) {
            printf("Failed to get allocation status: %s\n", strerror(-r));
            return r;
        }
        char s1[64], s2[64];
        tool_cvtstr((double)num, s1, sizeof(s1));
        tool_cvtstr((double)off, s2, sizeof(s2));
        printf("%s (0x%" PRIx64 ") bytes %s at offset %s (0x%" PRIx64 ")\n", s1, (uint64_t)num,
               r ? "    allocated" : "not allocated", s2, (uint64_t)off);
        off += num;
    }
    return 0;
}

static int cmd_alloc(IoCtx *io, int argc, char **argv)
{
    if (argc < 2 || argc > 3) {
        printf("alloc: usage: alloc offset [count]\n");
        return -EINVAL;
    }
    int64_t off, count = 512;
    if (parse_num(argv[1], &off) < 0) {
        return -EINVAL;
    }
    if (argc == 3 && parse_num(argv[2], &count) < 0) {
        return -EINVAL;
    }
    int r = check_req(io, off, count);
    if (r < 0) {
        printf("alloc failed: %s\n", strerror(-r));
        return r;
    }
    int64_t rem = count, o = off, sum = 0;
    while (rem > 0) {
        VdBlockStatus st;
        uint64_t n;
        r = vd_block_status(io->bs, (uint64_t)o, (uint64_t)rem, &n, &st);
        if (r < 0 || n == 0) {
            printf("is_allocated failed: %s\n", strerror(r < 0 ? -r : EIO));
            return r < 0 ? r : -EIO;
        }
        if (st.flags & VD_BS_ALLOCATED) {
            sum += (int64_t)n;
        }
        o += (int64_t)n;
        rem -= (int64_t)n;
    }
    char s1[64];
    tool_cvtstr((double)off, s1, sizeof(s1));
    printf("%" PRId64 "/%" PRId64 " bytes allocated at offset %s\n", sum, count, s1);
    return 0;
}

static int cmd_length(IoCtx *io, int argc, char **argv)
{
    int64_t size = vd_getlength(io->bs);
    if (size < 0) {
        printf("getlength: %s\n", strerror((int)-size));
        return (int)size;
    }
    char s1[64];
    tool_cvtstr((double)size, s1, sizeof(s1));
    printf("%s\n", s1);
    return 0;
}

static int cmd_info(IoCtx *io, int argc, char **argv)
{
    BlockNode *bs = io->bs;
    uint64_t cs = bs->drv->cluster_size ? bs->drv->cluster_size(bs) : 0;
    VdError *err = NULL;
    json_t *info = vd_image_info(bs, &err);
    if (!info) {
        printf("%s\n", vd_error_msg(err));
        vd_error_free(err);
        return -EIO;
    }
    json_t *data = json_object_get(json_object_get(info, "format-specific"), "data");
    /* qcow2 keeps VM state after the guest-visible part covered by whole L2 tables. */
    uint64_t vmoff = 0;
    if (cs && !strcmp(bs->drv->name, "qcow2")) {
        uint64_t entry = json_is_true(json_object_get(data, "extended-l2")) ? 16 : 8;
        uint64_t span = cs * (cs / entry);
        int64_t size = vd_getlength(bs);
        if (size > 0) {
            vmoff = ((uint64_t)size + span - 1) / span * span;
        }
    }
    char s1[64], s2[64];
    tool_cvtstr((double)cs, s1, sizeof(s1));
    tool_cvtstr((double)vmoff, s2, sizeof(s2));
    printf("format name: %s\n", bs->drv->name);
    printf("cluster size: %s\n", s1);
    printf("vm state offset: %s\n", s2);
    if (json_is_object(data)) {
        printf("Format specific information:\n");
        qdict_dump_human(stdout, data, 1);
    }
    json_decref(info);
    return 0;
}

static const struct {
    const char *name, *alt;
    int (*fn)(IoCtx *, int, char **);
} io_cmds[] = {
    { "read", "r", cmd_read },
    { "write", "w", cmd_write },
    { "discard", "d", cmd_discard },
    { "flush", "f", cmd_flush },
    { "map", NULL, cmd_map },
    { "alloc", "a", cmd_alloc },
    { "length", "l", cmd_length },
    { "info", "i", cmd_info },
};

/* Run one command line; returns 0 ok, <0 failed, 1 = quit. */
static int run_line(IoCtx *io, char *line)
{
    char *argv[64];
    int argc = 0;
    for (char *tok = strtok(line, " \t\r\n"); tok && argc < 63; tok = strtok(NULL, " \t\r\n")) {
        argv[argc++] = tok;
    }
    argv[argc] = NULL;
    if (argc == 0 || argv[0][0] == '#') {
        return 0;
    }
    if (!strcmp(argv[0], "quit") || !strcmp(argv[0], "q") || !strcmp(argv[0], "exit")) {
        return 1;
    }
    for (size_t i = 0; i < sizeof(io_cmds) / sizeof(io_cmds[0]); i++) {
        if (!strcmp(argv[0], io_cmds[i].name) ||
            (io_cmds[i].alt && !strcmp(argv[0], io_cmds[i].alt))) {
            int r = io_cmds[i].fn(io, argc, argv);
            return r < 0 ? r : 0;
        }
    }
    fflush(stdout);
    fprintf(stderr, "command \"%s\" not found\n", argv[0]);
    return -EINVAL;
}

int img_io(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { "cmd", required_argument, NULL, 'c' },
        { "read-only", no_argument, NULL, 'r' },
        { "force-share", no_argument, NULL, 'U' },
        { "nocache", no_argument, NULL, 'n' },
        { NULL, 0, NULL, 0 }
    };
    const char *fmt = NULL;
    char **cmds = calloc((size_t)argc + 1, sizeof(char *));
    int ncmds = 0, flags = VD_OPEN_RDWR, c;
    bool force_share = false;
    if (!cmds) {
        tool_error("out of memory");
        return 1;
    }
    while ((c = getopt_long(argc, argv, ":hf:c:rUnt:", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'c': cmds[ncmds++] = optarg; break;
        case 'r': flags &= ~VD_OPEN_RDWR; break;
        case 'U': force_share = true; break;
        case 'n': flags |= VD_OPEN_DIRECT; break;
        case 't': {
            int cflags; /* unsafe: `flush` then syncs nothing, as in qemu-io */
            if (tool_cache_flags(optarg, &cflags) < 0) {
                tool_error("Invalid cache option: %s", optarg);
                free(cmds);
                return 1;
            }
            flags |= cflags;
            break;
        }
        case 'h':
            printf("usage: " TOOL_NAME " io [-f fmt] [-r] [-U] [-n] [-c 'cmd']... filename\n"
                   "Commands: read [-P pat] [-v] [-q] off len | write [-P pat] [-z [-u]] [-c] "
                   "[-f] [-q] off len |\n"
                   "          discard off len | flush | map | alloc off [len] | length | info\n"
                   "Without -c, commands are read from stdin, one per line; `flush` then prints "
                   "\"flushed\".\n"
                   "Exit status: 1 if any command failed (unlike qemu-io, which exits 0).\n");
            free(cmds);
            return 0;
        default:
            tool_bad_option(argv[0], c, argv[optind - 1]);
            free(cmds);
            return 1;
        }
    }
    const char *filename = tool_one_image(argc, argv);
    if (!filename) {
        free(cmds);
        return 1;
    }
    BlockNode *bs = tool_open(filename, fmt, tool_open_flags(flags, force_share));
    if (!bs) {
        free(cmds);
        return 1;
    }
    IoCtx io = { .bs = bs, .stdin_mode = ncmds == 0 };
    int failed = 0;
    if (ncmds) {
        for (int i = 0; i < ncmds; i++) {
            char *line = strdup(cmds[i]);
            if (!line) {
                tool_error("out of memory");
                failed = 1;
                break;
            }
            int r = run_line(&io, line);
            free(line);
            if (r < 0) {
                failed = 1;
            } else if (r == 1) {
                break;
            }
        }
    } else {
        char *line = NULL;
        size_t cap = 0;
        while (getline(&line, &cap, stdin) >= 0) {
            int r = run_line(&io, line);
            fflush(stdout);
            if (r < 0) {
                failed = 1;
            } else if (r == 1) {
                break;
            }
        }
        free(line);
    }
    fflush(stdout);
    vd_node_unref(bs);
    free(cmds);
    return failed;
}
