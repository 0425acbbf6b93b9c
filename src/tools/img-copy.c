/*
 * img-copy.c - convert (copy between formats) and compare (content equality), as qemu-img 7.2.
 * convert plans extents in order from chain block status (holes and zeroes are never read);
 * worker threads read ahead; in plan order (unless -W or -c) the worker holding the write turn
 * scans for zero runs (-S) and writes every chunk already read, so writes follow back to back.
 * Sparse detection, zero handling and -B follow qemu-img so results read and allocate alike.
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "block/dirty-bitmap.h"
#include "tools/tool.h"
#include "util/lock.h"

#define SECTOR 512ull
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

/* ================================ compare ================================ */

/* Offset (relative to buf) of the first 512-byte sector holding a non-zero byte, or -1. */
static int64_t find_nonzero(const uint8_t *buf, uint64_t n)
{
    uint64_t i;
    for (i = 0; i + SECTOR <= n; i += SECTOR) {
        if (!tool_is_zero(buf + i, SECTOR)) {
            return (int64_t)i;
        }
    }
    if (i < n && !tool_is_zero(buf + i, n - i)) {
        return (int64_t)i;
    }
    return -1;
}

/* First differing 512-byte sector (relative offset), or -1 if equal. */
static int64_t find_mismatch(const uint8_t *a, const uint8_t *b, uint64_t n)
{
    if (memcmp(a, b, n) == 0) {
        return -1;
    }
    for (uint64_t i = 0; i < n; i += SECTOR) {
        uint64_t len = MIN(SECTOR, n - i);
        if (memcmp(a + i, b + i, len)) {
            return (int64_t)i;
        }
    }
    return -1;
}

/* Read for compare; a read error is reported as qemu-img does and means exit status 4. */
static int compare_read(BlockNode *bs, uint64_t offset, uint64_t bytes, const char *filename,
                        uint8_t *buf)
{
    int r = vd_pread(bs, offset, bytes, buf);
    if (r < 0) {
        tool_error("Error while reading offset %" PRIu64 " of %s: %s", offset, filename,
                   strerror(-r));
        return 4;
    }
    return 0;
}

static int check_empty(BlockNode *bs, uint64_t offset, uint64_t bytes, const char *filename,
                       uint8_t *buf, bool quiet)
{
    if (compare_read(bs, offset, bytes, filename, buf)) {
        return 4;
    }
    int64_t idx = find_nonzero(buf, bytes);
    if (idx >= 0) {
        if (!quiet) {
            printf("Content mismatch at offset %" PRIu64 "!\n", offset + (uint64_t)idx);
        }
        return 1;
    }
    return 0;
}

int img_compare(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 }
    };
    const char *fmt1 = NULL, *fmt2 = NULL, *cache = "writeback";
    bool progress = false, quiet = false, strict = false, force_share = false;
    int c;
    while ((c = getopt_long(argc, argv, ":hf:F:T:pqsU", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt1 = optarg; break;
        case 'F': fmt2 = optarg; break;
        case 'T': cache = optarg; break;
        case 'p': progress = true; break;
        case 'q': quiet = true; break;
        case 's': strict = true; break;
        case 'U': force_share = true; break;
        case 'h': tool_print_usage("compare"); return 0;
        default: tool_bad_option(argv[0], c, argv[optind - 1]); return 1;
        }
    }
    if (quiet) {
        progress = false;
    }
    if (optind != argc - 2) { /* usage errors exit 1, as in qemu-img (not compare's 2) */
        tool_usage_error("Expecting two image file names");
        return 1;
    }
    const char *filename1 = argv[optind], *filename2 = argv[optind + 1];
    int cflags;
    if (tool_cache_flags(cache, &cflags) < 0) {
        tool_error("Invalid source cache option: %s", cache);
        return 2;
    }
    progress_init(progress, 2.0);
    int flags = tool_open_flags(cflags & VD_OPEN_DIRECT, force_share);
    int ret;
    uint8_t *buf1 = NULL, *buf2 = NULL;
    ToolWorker *worker = NULL;
    BlockNode *bs2 = NULL;
    BlockNode *bs1 = tool_open(filename1, fmt1, flags);
    if (!bs1) {
        ret = 2;
        goto out;
    }
    bs2 = tool_open(filename2, fmt2, flags);
    if (!bs2) {
        ret = 2;
        goto out;
    }
    buf1 = malloc(TOOL_BUF_SIZE);
    buf2 = malloc(TOOL_BUF_SIZE);
    worker = tool_worker_new();
    if (!buf1 || !buf2 || !worker) {
        tool_error("out of memory");
        ret = 2;
        goto out;
    }
    int64_t size1 = vd_getlength(bs1), size2 = vd_getlength(bs2);
    if (size1 < 0 || size2 < 0) {
        tool_error("Can't get size of %s: %s", size1 < 0 ? filename1 : filename2,
                   strerror((int)-(size1 < 0 ? size1 : size2)));
        ret = 4;
        goto out;
    }
    uint64_t total = (uint64_t)MIN(size1, size2);
    uint64_t progress_base = (uint64_t)MAX(size1, size2);
    progress_print(0, 100);
    if (strict && size1 != size2) {
        if (!quiet) {
            printf("Strict mode: Image size mismatch!\n");
        }
        ret = 1;
        goto out;
    }
    uint64_t offset = 0;
    while (offset < total) {
        VdBlockStatus st1, st2;
        uint64_t pnum1, pnum2;
        int r = vd_block_status_above(bs1, NULL, offset, (uint64_t)size1 - offset, &pnum1, &st1);
        if (r < 0 || pnum1 == 0) {
            tool_error("Sector allocation test failed for %s", filename1);
            ret = 3;
            goto out;
        }
        r = vd_block_status_above(bs2, NULL, offset, (uint64_t)size2 - offset, &pnum2, &st2);
        if (r < 0 || pnum2 == 0) {
            tool_error("Sector allocation test failed for %s", filename2);
            ret = 3;
            goto out;
        }
        bool alloc1 = st1.flags & VD_BS_ALLOCATED, alloc2 = st2.flags & VD_BS_ALLOCATED;
        uint64_t chunk = MIN(pnum1, pnum2);
        if (strict) {
            /* Compare the statuses qemu-img compares: allocation, data, zero. */
            int m = VD_BS_ALLOCATED | VD_BS_DATA | VD_BS_ZERO;
            if ((st1.flags & m) != (st2.flags & m)) {
                if (!quiet) {
                    printf("Strict mode: Offset %" PRIu64 " block status mismatch!\n", offset);
                }
                ret = 1;
                goto out;
            }
        }
        if ((st1.flags & VD_BS_ZERO) && (st2.flags & VD_BS_ZERO)) {
            /* both read zeroes */
        } else if (alloc1 == alloc2) {
            if (alloc1) {
                chunk = MIN(chunk, TOOL_BUF_SIZE);
                /* Both images at once: the page-cache copies dominate (tool-worker.c). */
                ToolRead t2 = {bs2, -1, offset, chunk, buf2};
                tool_worker_submit(worker, tool_read_task, &t2);
                int r1 = compare_read(bs1, offset, chunk, filename1, buf1);
                int r2 = tool_worker_wait(worker);
                if (r2 < 0 && !r1) {
                    tool_error("Error while reading offset %" PRIu64 " of %s: %s", offset,
                               filename2, strerror(-r2));
                }
                if (r1 || r2 < 0) {
                    ret = 4;
                    goto out;
                }
                int64_t mis = find_mismatch(buf1, buf2, chunk);
                if (mis >= 0) {
                    if (!quiet) {
                        printf("Content mismatch at offset %" PRIu64 "!\n",
                               offset + (uint64_t)mis);
                    }
                    ret = 1;
                    goto out;
                }
            }
        } else {
            chunk = MIN(chunk, TOOL_BUF_SIZE);
            ret = alloc1 ? check_empty(bs1, offset, chunk, filename1, buf1, quiet)
                         : check_empty(bs2, offset, chunk, filename2, buf1, quiet);
            if (ret) {
                goto out;
            }
        }
        offset += chunk;
        progress_print(((float)chunk / progress_base) * 100, 100);
    }
    if (size1 != size2) {
        BlockNode *over = size1 > size2 ? bs1 : bs2;
        const char *fover = size1 > size2 ? filename1 : filename2;
        if (!quiet) {
            printf("Warning: Image size mismatch!\n");
        }
        while (offset < progress_base) {
            VdBlockStatus st;
            uint64_t chunk;
            int r = vd_block_status_above(over, NULL, offset, progress_base - offset, &chunk, &st);
            if (r < 0 || chunk == 0) {
                tool_error("Sector allocation test failed for %s", fover);
                ret = 3;
                goto out;
            }
            if ((st.flags & VD_BS_ALLOCATED) && !(st.flags & VD_BS_ZERO)) {
                chunk = MIN(chunk, TOOL_BUF_SIZE);
                ret = check_empty(over, offset, chunk, fover, buf1, quiet);
                if (ret) {
                    goto out;
                }
            }
            offset += chunk;
            progress_print(((float)chunk / progress_base) * 100, 100);
        }
    }
    /* no closing 100 %: qemu-img's compare shows what the last chunk reached */
    if (!quiet) {
        printf("Images are identical.\n");
    }
    ret = 0;
out:
    progress_end();
    tool_worker_free(worker);
    free(buf1);
    free(buf2);
    if (bs2) {
        vd_node_unref(bs2);
    }
    if (bs1) {
        vd_node_unref(bs1);
    }
    return ret;
}

/* ================================ convert ================================ */

enum { ST_DATA, ST_ZERO, ST_BACKING };

/* At most this many copy threads (qemu-img's -m goes to 16; 4 keep 2 cores busy). */
#define CONVERT_MAX_THREADS 4


typedef struct Convert {
    /* configuration (read-only while workers run) */
    BlockNode **src;
    uint64_t *src_size;
    int nsrc;
    uint64_t total;
    BlockNode *target;
    bool has_zero_init;
    bool target_has_backing;
    bool diff_backing;        /* -B differs from the source's backing: compare and copy diffs */
    int64_t target_backing_len; /* -1 if no backing */
    bool compressed;
    bool salvage;             /* --salvage: unreadable sectors are copied as zeroes */
    bool quiet;
    uint64_t cluster_size;    /* target cluster size (compressed alignment) */
    uint64_t min_sparse;      /* sectors; 0 = write everything */
    uint64_t alignment;       /* sectors */
    bool in_order;
    uint64_t buf_size;        /* bytes per data chunk */
    ToolRate rate;            /* -r: target write rate */

    /* -C: offload data chunks (copy_file_range); cleared for good by the first failure */
    bool copy_range;

    /* planner state, under lock */
    pthread_mutex_t lock;
    struct ConvertTurn *turn; /* one per worker */
    int nworkers;             /* turn[] slots handed out */
    bool writer_active;       /* in-order mode: a worker is writing the ready chunks */
    uint64_t pos;             /* next byte (global) to plan */
    uint64_t status_end;      /* end (global) of the cached status extent */
    int status;
    uint64_t next_seq, write_seq;
    uint64_t allocated;       /* -p: bytes that count (chunk_counts), counted before the copy */
    uint64_t done;            /* -p: of those, bytes planned so far */
    int ret;
    VdError *err;
} Convert;

typedef struct Chunk {
    uint64_t offset, bytes; /* global == target offset */
    int status;
    uint64_t seq;
} Chunk;

/*
 * A worker's chunk and buffers. In order (the default), a chunk read ahead is marked ready and
 * whichever worker holds the write turn writes every ready chunk in sequence, so consecutive
 * writes need no wake-up of another thread on the critical path; the owner only waits until its
 * buffer is free again (a wake-up off the critical path).
 */
typedef struct ConvertTurn {
    pthread_cond_t cond;      /* the owner waits here for its chunk to be written */
    Chunk ch;
    uint8_t *buf, *bbuf;
    bool have_data, offload;
    bool ready;               /* read, not yet written (under s->lock) */
    bool writing;             /* another worker is writing from buf: the owner must not free it */
} ConvertTurn;

/* Under s->lock, after a failure: every worker waiting for its chunk stops waiting. */
static void convert_wake_all(Convert *s)
{
    for (int i = 0; i < s->nworkers; i++) {
        vd_cond_signal(&s->turn[i].cond);
    }
}

static void convert_fail(Convert *s, int ret, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void convert_fail(Convert *s, int ret, const char *fmt, ...)
{
    vd_mutex_lock(&s->lock);
    if (s->ret == 0) {
        s->ret = ret < 0 ? ret : -EIO;
        char *msg = NULL;
        va_list ap;
        va_start(ap, fmt);
        if (vasprintf(&msg, fmt, ap) < 0) {
            msg = NULL;
        }
        va_end(ap);
        vd_error_setg(&s->err, -s->ret, "%s", msg ? msg : "convert failed");
        free(msg);
    }
    convert_wake_all(s);
    vd_mutex_unlock(&s->lock);
}

/* Which source holds global offset `pos`; sets *local. */
static int select_src(const Convert *s, uint64_t pos, uint64_t *local, uint64_t *avail)
{
    uint64_t base = 0;
    for (int i = 0; i < s->nsrc; i++) {
        if (pos < base + s->src_size[i]) {
            *local = pos - base;
            *avail = base + s->src_size[i] - pos;
            return i;
        }
        base += s->src_size[i];
    }
    return -1;
}

/* Plan the next chunk (called with the lock held). Returns 0 with chunk, 1 when done, <0 error. */
static int plan_chunk(Convert *s, Chunk *ch)
{
    if (s->pos >= s->total) {
        return 1;
    }
    if (s->status_end <= s->pos) {
        uint64_t local, avail;
        int i = select_src(s, s->pos, &local, &avail);
        if (i < 0) {
            return -EIO;
        }
        BlockNode *src = s->src[i];
        BlockNode *base = (s->target_has_backing && !s->diff_backing) ? src->backing : NULL;
        uint64_t want = MIN(avail, 1ull << 30);
        uint64_t pnum = 0;
        VdBlockStatus st;
        int r = vd_block_status_above(src, base, local, want, &pnum, &st);
        /* --salvage: retry on a quarter of the range, down to one sector read as data (qemu-img) */
        while (r < 0 && s->salvage) {
            if (want <= SECTOR) {
                if (!s->quiet) {
                    tool_warning("error while reading block status at offset %" PRIu64 ": %s",
                                 local, strerror(-r));
                }
                st.flags = VD_BS_DATA;
                pnum = want;
                r = 0;
                break;
            }
            want = (want + SECTOR - 1) / SECTOR;
            want = MIN((want + 3) / 4 * SECTOR, avail);
            r = vd_block_status_above(src, base, local, want, &pnum, &st);
        }
        if (r < 0) {
            vd_error_setg(&s->err, -r, "error while reading block status at offset %" PRIu64
                          ": %s", local, strerror(-r));
            return r;
        }
        if (pnum == 0 || pnum > want) {
            vd_error_setg(&s->err, EIO, "error while reading block status at offset %" PRIu64
                          ": invalid extent", local);
            return -EIO;
        }
        if (st.flags & VD_BS_ZERO) {
            s->status = ST_ZERO;
        } else if (st.flags & (VD_BS_DATA | VD_BS_ALLOCATED)) {
            s->status = ST_DATA;
        } else {
            s->status = base ? ST_BACKING : ST_ZERO;
        }
        /* Past the target backing's end zeroes need not be written. */
        if (s->target_has_backing && !s->diff_backing && s->status == ST_ZERO &&
            s->target_backing_len >= 0) {
            uint64_t tbl = (uint64_t)s->target_backing_len;
            if (s->pos >= tbl) {
                s->status = ST_BACKING;
            } else if (s->pos + pnum > tbl) {
                pnum = tbl - s->pos;
            }
        }
        s->status_end = s->pos + pnum;
    }
    uint64_t n = s->status_end - s->pos;
    if (s->status == ST_DATA || s->diff_backing) {
        n = MIN(n, s->buf_size);
    } else if (s->status == ST_ZERO && s->min_sparse == 0) {
        n = MIN(n, s->buf_size); /* -S 0: zeroes are written as data */
    }
    int status = s->status;
    if (s->compressed) {
        /* Compressed clusters are written whole: round to the target cluster size. */
        uint64_t cs = s->cluster_size;
        uint64_t cstart = s->pos / cs * cs;
        if (cstart != s->pos || n < cs) {
            n = MIN(cstart + cs, s->total) - s->pos;
            status = ST_DATA;
        } else {
            n = n / cs * cs;
        }
        n = MIN(n, MAX(s->buf_size / cs, 1) * cs);
        if (s->pos + n > s->status_end) {
            s->status_end = s->pos; /* re-query after a forced whole cluster */
        }
    }
    ch->offset = s->pos;
    ch->bytes = n;
    ch->status = status;
    ch->seq = s->next_seq++;
    s->pos += n;
    return 0;
}

/*
 * --salvage after a failed read of [local, local+bytes) of src: read it again sector by sector,
 * an unreadable sector as zeroes with qemu-img's warning (its offset in that source).
 */
static void salvage_read(const Convert *s, BlockNode *src, uint64_t local, uint64_t bytes,
                         uint8_t *buf)
{
    for (uint64_t o = 0; o < bytes; o += SECTOR) {
        uint64_t n = MIN(SECTOR, bytes - o);
        int r = vd_pread(src, local + o, n, buf + o);
        if (r < 0) {
            if (!s->quiet) {
                tool_warning("error while reading offset %" PRIu64 ": %s", local + o,
                             strerror(-r));
            }
            memset(buf + o, 0, n);
        }
    }
}

/*
 * [offset, offset+bytes) of the concatenated sources, piece by piece: copy=false reads them into
 * buf, copy=true has the kernel copy them into the target at the same offsets (-C).
 */
static int convert_pieces(Convert *s, uint64_t offset, uint64_t bytes, uint8_t *buf, bool copy)
{
    while (bytes) {
        uint64_t local, avail;
        int i = select_src(s, offset, &local, &avail);
        if (i < 0) {
            return -EIO;
        }
        uint64_t n = MIN(bytes, avail);
        int r = copy ? vd_copy_range(s->src[i], local, s->target, offset, n)
                     : vd_pread(s->src[i], local, n, buf);
        if (r < 0 && !copy && s->salvage) {
            salvage_read(s, s->src[i], local, n, buf);
            r = 0;
        }
        if (r < 0) {
            return r;
        }
        offset += n;
        bytes -= n;
        buf += copy ? 0 : n;
    }
    return 0;
}

static int convert_read(Convert *s, uint64_t offset, uint64_t bytes, uint8_t *buf)
{
    return convert_pieces(s, offset, bytes, buf, false);
}

static bool sector_zero(const uint8_t *buf, uint64_t blen, uint64_t idx)
{
    uint64_t off = idx * SECTOR;
    return tool_is_zero(buf + off, MIN(SECTOR, blen - off));
}

/* qemu-img's is_allocated_sectors(): sectors [first, first+n) of buf; returns "is data". */
static bool is_allocated_sectors(const uint8_t *buf, uint64_t blen, uint64_t first, uint64_t n,
                                 uint64_t *pnum, uint64_t sector_num, uint64_t alignment)
{
    if (n == 0) {
        *pnum = 0;
        return false;
    }
    bool is_zero = sector_zero(buf, blen, first);
    uint64_t i;
    for (i = 1; i < n; i++) {
        if (is_zero != sector_zero(buf, blen, first + i)) {
            break;
        }
    }
    if (i == n) {
        *pnum = i;
        return !is_zero;
    }
    uint64_t tail = (sector_num + i) & (alignment - 1);
    if (tail) {
        if (is_zero && i <= tail) {
            /* The next sector is data and will rewrite this tail anyway. */
            is_zero = false;
        }
        if (!is_zero) {
            i += alignment - tail;
            i = MIN(i, n);
        } else {
            i -= tail;
        }
    }
    *pnum = i;
    return !is_zero;
}

/* qemu-img's is_allocated_sectors_min(): zero runs shorter than min inside data are data. */
static bool is_allocated_sectors_min(const uint8_t *buf, uint64_t blen, uint64_t first,
                                     uint64_t n, uint64_t *pnum, uint64_t min,
                                     uint64_t sector_num, uint64_t alignment)
{
    if (n < min) {
        min = n;
    }
    if (!is_allocated_sectors(buf, blen, first, n, pnum, sector_num, alignment)) {
        return false;
    }
    uint64_t used = *pnum, checked = *pnum;
    first += *pnum;
    n -= *pnum;
    sector_num += *pnum;
    while (n > 0) {
        bool data = is_allocated_sectors(buf, blen, first, n, pnum, sector_num, alignment);
        first += *pnum;
        n -= *pnum;
        sector_num += *pnum;
        checked += *pnum;
        if (data) {
            used = checked;
        } else if (*pnum >= min) {
            break;
        }
    }
    *pnum = used;
    return true;
}

static int write_zero_range(Convert *s, uint64_t offset, uint64_t bytes)
{
    if (s->has_zero_init) {
        return 0;
    }
    return vd_pwrite_zeroes(s->target, offset, bytes,
                            s->target_has_backing ? 0 : VD_REQ_MAY_UNMAP);
}

/* Write a chunk of data (buf) with sparse detection; offsets are target offsets. */
static int write_data(Convert *s, uint64_t offset, uint64_t bytes, const uint8_t *buf)
{
    if (s->compressed) {
        uint64_t cs = s->cluster_size;
        for (uint64_t o = 0; o < bytes; o += cs) {
            uint64_t n = MIN(cs, bytes - o);
            int r;
            if (tool_is_zero(buf + o, n)) {
                r = write_zero_range(s, offset + o, n);
            } else {
                r = vd_pwrite_compressed(s->target, offset + o, n, buf + o);
                if (r == -EINVAL && n < cs) {
                    r = vd_pwrite(s->target, offset + o, n, buf + o, 0);
                }
            }
            if (r < 0) {
                return r;
            }
        }
        return 0;
    }
    if (s->min_sparse == 0) {
        return vd_pwrite(s->target, offset, bytes, buf, 0);
    }
    uint64_t nsec = (bytes + SECTOR - 1) / SECTOR;
    uint64_t first = 0;
    /* Sector numbers are relative to the target (alignment of the write requests). */
    uint64_t sector_num = offset / SECTOR;
    while (first < nsec) {
        uint64_t cnt;
        bool data = is_allocated_sectors_min(buf, bytes, first, nsec - first, &cnt,
                                             s->min_sparse, sector_num, s->alignment);
        uint64_t bo = first * SECTOR;
        uint64_t bl = MIN(cnt * SECTOR, bytes - bo);
        int r = data ? vd_pwrite(s->target, offset + bo, bl, buf + bo, 0)
                     : write_zero_range(s, offset + bo, bl);
        if (r < 0) {
            return r;
        }
        first += cnt;
        sector_num += cnt;
    }
    return 0;
}

/* Does the target's backing read [offset, offset+bytes) as zeroes (per block status)? */
static bool backing_reads_zero(Convert *s, uint64_t offset, uint64_t bytes)
{
    BlockNode *b = s->target->backing;
    uint64_t blen = s->target_backing_len > 0 ? (uint64_t)s->target_backing_len : 0;
    uint64_t end = MIN(offset + bytes, blen);
    while (offset < end) {
        VdBlockStatus st;
        uint64_t pnum;
        if (vd_block_status_above(b, NULL, offset, end - offset, &pnum, &st) < 0 || pnum == 0 ||
            !(st.flags & VD_BS_ZERO)) {
            return false;
        }
        offset += pnum;
    }
    return true;
}

/* -B with a backing file other than the source's: write where source and backing differ. */
static int write_diff(Convert *s, uint64_t offset, uint64_t bytes, const uint8_t *buf,
                      uint8_t *bbuf)
{
    BlockNode *b = s->target->backing;
    uint64_t blen = s->target_backing_len > 0 ? (uint64_t)s->target_backing_len : 0;
    memset(bbuf, 0, bytes);
    if (b && offset < blen) {
        int r = vd_pread(b, offset, MIN(bytes, blen - offset), bbuf);
        if (r < 0) {
            return r;
        }
    }
    uint64_t i = 0;
    while (i < bytes) {
        uint64_t len = MIN(SECTOR, bytes - i);
        if (!memcmp(buf + i, bbuf + i, len)) {
            i += len;
            continue;
        }
        uint64_t j = i + len;
        while (j < bytes) {
            uint64_t l2 = MIN(SECTOR, bytes - j);
            if (!memcmp(buf + j, bbuf + j, l2)) {
                break;
            }
            j += l2;
        }
        int r = tool_is_zero(buf + i, j - i)
                    ? vd_pwrite_zeroes(s->target, offset + i, j - i, 0)
                    : vd_pwrite(s->target, offset + i, j - i, buf + i, 0);
        if (r < 0) {
            return r;
        }
        i = j;
    }
    return 0;
}

/* Read (or zero-fill) t's chunk into its buffer unless the write offloads it; <0: failed. */
static int convert_fill_chunk(Convert *s, ConvertTurn *t)
{
    const Chunk *ch = &t->ch;
    t->have_data = false;
    t->offload = ch->status == ST_DATA && !s->diff_backing &&
                 __atomic_load_n(&s->copy_range, __ATOMIC_RELAXED);
    if (!t->offload && (ch->status == ST_DATA || (ch->status == ST_ZERO && s->diff_backing))) {
        if (ch->status == ST_DATA) {
            int r = convert_read(s, ch->offset, ch->bytes, t->buf);
            if (r < 0) {
                convert_fail(s, r, "error while reading at byte %" PRIu64 ": %s", ch->offset,
                             strerror(-r));
                return r;
            }
        } else {
            memset(t->buf, 0, ch->bytes);
        }
        t->have_data = true;
    } else if (ch->status == ST_ZERO && s->min_sparse == 0 && !s->compressed) {
        memset(t->buf, 0, ch->bytes); /* -S 0: fully allocate */
        t->have_data = true;
    }
    return 0;
}

/* Write t's chunk into the target (any worker may, see ConvertTurn); <0: failed. */
static int convert_write_chunk(Convert *s, ConvertTurn *t)
{
    const Chunk *ch = &t->ch;
    int r = 0;
    if (t->have_data || t->offload || (ch->status == ST_ZERO && !s->has_zero_init)) {
        tool_rate_wait(&s->rate, ch->bytes);
    }
    if (t->offload) {
        r = convert_pieces(s, ch->offset, ch->bytes, NULL, true);
        if (r < 0) {
            /* As qemu-img: offloading failed once, copy through buffers from now on. */
            __atomic_store_n(&s->copy_range, false, __ATOMIC_RELAXED);
            r = convert_read(s, ch->offset, ch->bytes, t->buf);
            if (r < 0) {
                convert_fail(s, r, "error while reading at byte %" PRIu64 ": %s", ch->offset,
                             strerror(-r));
                return r;
            }
            t->have_data = true;
        }
    }
    if (s->diff_backing && t->have_data) {
        /* Zeroes over a backing range that reads zero: nothing to write. */
        if (ch->status != ST_ZERO || !backing_reads_zero(s, ch->offset, ch->bytes)) {
            r = write_diff(s, ch->offset, ch->bytes, t->buf, t->bbuf);
        }
    } else if (t->have_data) {
        r = write_data(s, ch->offset, ch->bytes, t->buf);
    } else if (ch->status == ST_ZERO) {
        r = write_zero_range(s, ch->offset, ch->bytes);
    }
    if (r < 0) {
        convert_fail(s, r, "error while writing at byte %" PRIu64 ": %s", ch->offset,
                     strerror(-r));
    }
    return r;
}

/*
 * -p weighs a chunk by what qemu-img copies: data, and zeroes when -S 0 writes them; holes and
 * ranges left to the backing count nothing (its allocated_sectors).
 */
static bool chunk_counts(const Convert *s, int status)
{
    return status == ST_DATA || (status == ST_ZERO && s->min_sparse == 0);
}

/*
 * -p: the bytes that will count, by the planning the copy does, run once before it (qemu-img's
 * first pass over the block status). The planner is left as it was. <0: block status failed.
 */
static int convert_count_allocated(Convert *s)
{
    uint64_t pos = s->pos, status_end = s->status_end, seq = s->next_seq;
    int status = s->status, r;
    Chunk ch;
    s->allocated = 0;
    while ((r = plan_chunk(s, &ch)) == 0) { /* each chunk advances pos: bounded by the size */
        if (chunk_counts(s, ch.status)) {
            s->allocated += ch.bytes;
        }
    }
    s->pos = pos;
    s->status_end = status_end;
    s->status = status;
    s->next_seq = seq;
    return r < 0 ? r : 0;
}

/*
 * Under s->lock: a chunk is planned; qemu-img shows its progress then, before the copy. A
 * compressed chunk is a cluster at a time there (its buffer holds one): one step per cluster.
 */
static void convert_chunk_planned(Convert *s, const Chunk *ch)
{
    if (!s->allocated || !chunk_counts(s, ch->status)) {
        return;
    }
    uint64_t step = s->compressed ? s->cluster_size : ch->bytes;
    for (uint64_t o = 0; o < ch->bytes; o += step) {
        s->done += MIN(step, ch->bytes - o);
        progress_print(100.0f * (float)s->done / (float)s->allocated, 0);
    }
}

/*
 * Under s->lock, called by the worker whose ready chunk is next: write ready chunks in sequence
 * (its own first, then any read meanwhile) until the next one is not read yet. A worker whose
 * chunk becomes ready while this runs finds writer_active set and waits: this loop takes it.
 */
static void convert_write_ready(Convert *s)
{
    s->writer_active = true;
    while (!s->ret) {
        ConvertTurn *t = NULL;
        for (int i = 0; i < s->nworkers && !t; i++) {
            if (s->turn[i].ready && s->turn[i].ch.seq == s->write_seq) {
                t = &s->turn[i];
            }
        }
        if (!t) {
            break;
        }
        t->writing = true;
        vd_mutex_unlock(&s->lock);
        int r = convert_write_chunk(s, t);
        vd_mutex_lock(&s->lock);
        t->writing = false;
        t->ready = false;
        if (r == 0) {
            s->write_seq++;
        }
        vd_cond_signal(&t->cond);
    }
    s->writer_active = false;
}

static void *convert_worker(void *opaque)
{
    Convert *s = opaque;
    vd_mutex_lock(&s->lock);
    ConvertTurn *me = &s->turn[s->nworkers++]; /* img_convert starts <= CONVERT_MAX_THREADS */
    vd_mutex_unlock(&s->lock);
    me->buf = malloc(MAX(s->buf_size, s->cluster_size));
    me->bbuf = s->diff_backing ? malloc(s->buf_size) : NULL;
    if (!me->buf || (s->diff_backing && !me->bbuf)) {
        convert_fail(s, -ENOMEM, "out of memory");
        goto out;
    }
    for (;;) {
        vd_mutex_lock(&s->lock);
        int p = s->ret ? 1 : plan_chunk(s, &me->ch);
        if (p < 0) {
            s->ret = p;
            convert_wake_all(s);
        } else if (p == 0) {
            convert_chunk_planned(s, &me->ch);
        }
        vd_mutex_unlock(&s->lock);
        if (p != 0 || convert_fill_chunk(s, me) < 0) {
            break;
        }
        if (!s->in_order) {
            if (convert_write_chunk(s, me) < 0) {
                break;
            }
            continue;
        }
        vd_mutex_lock(&s->lock);
        me->ready = true;
        if (!s->writer_active && s->write_seq == me->ch.seq) {
            convert_write_ready(s);
        }
        /* after a failure, only until no other worker writes from our buffer */
        while (me->ready && (!s->ret || me->writing)) {
            vd_cond_wait(&me->cond, &s->lock);
        }
        me->ready = false;
        bool stop = s->ret != 0;
        vd_mutex_unlock(&s->lock);
        if (stop) {
            break;
        }
    }
out:
    free(me->buf);
    free(me->bbuf);
    me->buf = me->bbuf = NULL;
    return NULL;
}

/* ---------------------------- convert --bitmaps ---------------------------- */

/*
 * qemu-img's checks of the source before anything is created: its format can hold bitmaps and,
 * unless skip_broken, none of its persistent bitmaps is inconsistent (in use in the file).
 */
static int convert_check_bitmaps(BlockNode *src, bool skip_broken)
{
    if (!vd_bitmaps_persistent_supported(src)) {
        tool_error("Source lacks bitmap support");
        return -1;
    }
    json_t *list = vd_bitmaps_info(src), *b;
    size_t i;
    int ret = 0;
    json_array_foreach(list, i, b) {
        if (json_is_true(json_object_get(b, "persistent")) && !skip_broken &&
            json_is_true(json_object_get(b, "inconsistent"))) {
            tool_error("Cannot copy inconsistent bitmap '%s'",
                       json_string_value(json_object_get(b, "name")));
            fprintf(stderr, "Try --skip-broken-bitmaps, or use '" TOOL_NAME " bitmap --remove' "
                    "to delete it\n");
            ret = -1;
            break;
        }
    }
    json_decref(list);
    return ret;
}

/* The bitmaps convert added to its target, and which of them record writes once it is done. */
typedef struct ConvertBitmaps {
    char **names;
    bool *enable;
    size_t n;
} ConvertBitmaps;

/* Undo convert_add_bitmaps (a failed convert leaves the target's bitmaps as they were). */
static void convert_drop_bitmaps(BlockNode *dst, ConvertBitmaps *cb)
{
    for (size_t i = 0; i < cb->n; i++) {
        if (dst) {
            vd_bitmap_remove(dst, cb->names[i], NULL);
        }
        free(cb->names[i]);
    }
    free(cb->names);
    free(cb->enable);
    memset(cb, 0, sizeof(*cb));
}

/*
 * Copy every persistent bitmap of src into dst as qemu-img's convert_copy_bitmaps: same name,
 * granularity and bits, disabled where the source's is, in the source's list order (so the
 * target's bitmap directory keeps the source's order); with skip_broken an inconsistent one is
 * skipped with qemu-img's warning. Done before the data copy so that a bitmap the target cannot
 * take fails the convert before it writes anything; each is disabled until convert_enable_bitmaps
 * (the copy's own writes must not dirty it). On failure what was added is removed again.
 */
static int convert_add_bitmaps(BlockNode *src, BlockNode *dst, bool skip_broken,
                               ConvertBitmaps *cb)
{
    json_t *list = vd_bitmaps_info(src), *b;
    size_t i, cap = json_array_size(list);
    int ret = 0;
    cb->names = calloc(cap ? cap : 1, sizeof(*cb->names));
    cb->enable = calloc(cap ? cap : 1, sizeof(*cb->enable));
    if (!cb->names || !cb->enable) {
        tool_error("out of memory");
        ret = -1;
    }
    json_array_foreach(list, i, b) {
        const char *name = json_string_value(json_object_get(b, "name"));
        if (ret < 0 || !name) {
            break;
        }
        if (!json_is_true(json_object_get(b, "persistent"))) {
            continue;
        }
        if (skip_broken && json_is_true(json_object_get(b, "inconsistent"))) {
            tool_warning("Skipping inconsistent bitmap '%s'", name);
            continue;
        }
        uint64_t gran = (uint64_t)json_integer_value(json_object_get(b, "granularity"));
        VdError *err = NULL;
        if (vd_bitmap_add(dst, name, gran, true, true, &err) < 0) {
            tool_error("Failed to create bitmap %s: %s", name, vd_error_msg(err));
            vd_error_free(err);
            ret = -1;
            break;
        }
        cb->names[cb->n] = strdup(name);
        if (!cb->names[cb->n]) {
            vd_bitmap_remove(dst, name, NULL);
            tool_error("out of memory");
            ret = -1;
            break;
        }
        cb->enable[cb->n++] = json_is_true(json_object_get(b, "recording"));
        VdBitmapRef ref = { .node = src, .name = name };
        if (vd_bitmap_merge(dst, name, &ref, 1, &err) < 0) {
            tool_error("Failed to populate bitmap %s: %s", name, vd_error_msg(err));
            vd_error_free(err);
            ret = -1;
        }
    }
    json_decref(list);
    if (ret < 0) {
        convert_drop_bitmaps(dst, cb);
    }
    return ret;
}

/* After the data copy: the copied bitmaps that record writes do so from now on; store them. */
static int convert_enable_bitmaps(BlockNode *dst, const ConvertBitmaps *cb)
{
    VdError *err = NULL;
    for (size_t i = 0; i < cb->n; i++) {
        if (cb->enable[i] && vd_bitmap_enable(dst, cb->names[i], true, &err) < 0) {
            tool_error("Failed to populate bitmap %s: %s", cb->names[i], vd_error_msg(err));
            vd_error_free(err);
            return -1;
        }
    }
    if (cb->n && vd_bitmaps_store(dst, &err) < 0) {
        tool_report(err, "Could not store the bitmaps");
        return -1;
    }
    return 0;
}

/* Can an image created from spec by drv hold persistent bitmaps (qcow2 v3 only, as QEMU)? */
static bool create_supports_bitmaps(const BlockDriver *drv, const CreateSpec *spec)
{
    const char *compat = spec->co.compat;
    bool v2 = compat && (!strcmp(compat, "0.10") || !strcmp(compat, "v2"));
    return drv->bitmaps_can_store && !(drv->bitmaps_supported && v2);
}

static bool same_file(const char *a, const char *b)
{
    struct stat sa, sb;
    if (!a || !b || stat(a, &sa) < 0 || stat(b, &sb) < 0) {
        return false;
    }
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

int img_convert(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "help", no_argument, NULL, 'h' },
        { "force-share", no_argument, NULL, 'U' },
        { "target-is-zero", no_argument, NULL, OPT_TARGET_IS_ZERO },
        { "target-image-opts", no_argument, NULL, OPT_TARGET_IMAGE_OPTS },
        { "bitmaps", no_argument, NULL, OPT_BITMAPS },
        { "skip-broken-bitmaps", no_argument, NULL, OPT_SKIP_BROKEN_BITMAPS },
        { "salvage", no_argument, NULL, OPT_SALVAGE },
        { NULL, 0, NULL, 0 }
    };
    const char *fmt = NULL, *out_fmt = NULL, *out_base = NULL, *base_fmt = NULL;
    const char *cache = "unsafe", *src_cache = "writeback";
    char *optstr = NULL;
    bool compress = false, skip_create = false, progress = false, quiet = false;
    bool force_share = false, ooo = false, target_is_zero = false;
    bool copy_range = false, explicit_sparse = false, tgt_image_opts = false;
    bool bitmaps = false, skip_broken = false, salvage = false;
    ConvertBitmaps cb = { 0 };
    uint64_t sparse = 4096, coroutines = 8, rate = 0;
    ToolSnapParam snap = { 0 };
    int c, ret = 1;
    ToolOpts o = { 0 };
    Convert s;
    memset(&s, 0, sizeof(s));
    pthread_mutex_init(&s.lock, NULL);
    ConvertTurn turns[CONVERT_MAX_THREADS];
    memset(turns, 0, sizeof(turns));
    for (int i = 0; i < CONVERT_MAX_THREADS; i++) {
        pthread_cond_init(&turns[i].cond, NULL);
    }
    s.turn = turns;
    tool_rate_init(&s.rate, 0);

    while ((c = getopt_long(argc, argv, ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:", longopts, NULL)) !=
           -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'O': out_fmt = optarg; break;
        case 'B': out_base = optarg; break;
        case 'F': base_fmt = optarg; break;
        case 'C': copy_range = true; break;
        case 'c': compress = true; break;
        case 'o':
            if (tool_append_opts(&optstr, optarg) < 0) {
                goto out;
            }
            break;
        case 'l':
            tool_opts_free(&snap.opts);
            if (tool_snapshot_param_parse(optarg, &snap) < 0) {
                goto out;
            }
            break;
        case 'S': {
            uint64_t v;
            if (tool_cvtnum("buffer size for sparse output", optarg, 0, INT64_MAX, &v) < 0) {
                goto out;
            }
            if (v % SECTOR || v / SECTOR > 32768) {
                tool_error("Invalid buffer size for sparse output specified. Valid sizes are "
                           "multiples of 512 up to 16777216. Select 0 to disable sparse "
                           "detection (fully allocates output).");
                goto out;
            }
            sparse = v;
            explicit_sparse = true;
            break;
        }
        case 'p': progress = true; break;
        case 't': cache = optarg; break;
        case 'T': src_cache = optarg; break;
        case 'q': quiet = true; break;
        case 'n': skip_create = true; break;
        case 'm':
            if (tool_parse_uint(optarg, &coroutines) < 0 || coroutines < 1 || coroutines > 16) {
                tool_error("Invalid number of coroutines. Allowed number of coroutines is "
                           "between 1 and 16");
                goto out;
            }
            break;
        case 'W': ooo = true; break;
        case 'U': force_share = true; break;
        case 'r':
            if (tool_parse_rate(optarg, &rate) < 0) {
                goto out;
            }
            break;
        case OPT_TARGET_IS_ZERO: target_is_zero = true; break;
        case OPT_TARGET_IMAGE_OPTS: tgt_image_opts = true; break;
        case OPT_BITMAPS: bitmaps = true; break;
        case OPT_SKIP_BROKEN_BITMAPS: skip_broken = true; break;
        case OPT_SALVAGE: salvage = true; break;
        case 'h': tool_print_usage("convert");
            ret = 0; goto out;
        default: tool_bad_option(argv[0], c, argv[optind - 1]); goto out;
        }
    }
    if (quiet) {
        progress = false;
    }
    if (!out_fmt && !tgt_image_opts) { /* the target's options name its driver */
        out_fmt = "raw";
    }
    /* qemu-img's order of these checks */
    if (skip_broken && !bitmaps) {
        tool_error("Use of --skip-broken-bitmaps requires --bitmaps");
        goto out;
    }
    if (compress && copy_range) {
        tool_error("Cannot enable copy offloading when -c is used");
        goto out;
    }
    if (explicit_sparse && copy_range) {
        tool_error("Cannot enable copy offloading when -S is used");
        goto out;
    }
    if (copy_range && salvage) {
        tool_error("Cannot use copy offloading in salvaging mode");
        goto out;
    }
    if (tgt_image_opts && !skip_create) {
        tool_error("--target-image-opts requires use of -n flag");
        goto out;
    }
    if (skip_create && optstr) {
        tool_error("-o has no effect when skipping image creation");
        goto out;
    }
    int src_cflags, dst_cflags;
    if (tool_cache_flags(src_cache, &src_cflags) < 0) {
        tool_error("Invalid source cache option: %s", src_cache);
        goto out;
    }
    if (tool_cache_flags(cache, &dst_cflags) < 0) {
        tool_error("Invalid cache option: %s", cache);
        goto out;
    }
    if (target_is_zero && !skip_create) {
        tool_error("--target-is-zero requires use of -n flag");
        goto out;
    }
    int nsrc = argc - optind - 1;
    /* with --target-image-opts (and so -n) nothing is created: the target's driver counts */
    const BlockDriver *drv = tgt_image_opts && !out_fmt ? NULL
                                                        : tool_create_format(out_fmt, optstr, &o);
    if (!drv && !tgt_image_opts) {
        goto out;
    }
    if (tool_opts_get(&o, "help")) { /* before the file names, as qemu-img */
        tool_print_create_help(out_fmt, nsrc >= 1 ? argv[argc - 1] : NULL);
        ret = 0;
        goto out;
    }
    if (nsrc < 1) {
        tool_error("Must specify image file name");
        goto out;
    }
    const char *out_filename = argv[argc - 1];
    if (nsrc > 1 && out_base) {
        tool_error("-B makes no sense when concatenating multiple input images");
        goto out;
    }
    if (skip_create && out_base) {
        tool_error("Specifying backing image makes no sense when -n is used");
        goto out;
    }
    if (compress && drv && !drv->pwrite_compressed) {
        tool_error("Compression not supported for this file format");
        goto out;
    }

    s.nsrc = nsrc;
    s.src = calloc((size_t)nsrc, sizeof(*s.src));
    s.src_size = calloc((size_t)nsrc, sizeof(*s.src_size));
    if (!s.src || !s.src_size) {
        tool_error("out of memory");
        goto out;
    }
    int sflags = tool_open_flags(src_cflags & VD_OPEN_DIRECT, force_share);
    for (int i = 0; i < nsrc; i++) {
        s.src[i] = i == 0 ? tool_open_snapshot(argv[optind], fmt, sflags, &snap)
                          : tool_open(argv[optind + i], fmt, sflags);
        if (!s.src[i]) {
            goto out;
        }
        if (i == 0 && snap.id_or_name && nsrc > 1) {
            tool_error("No support for concatenating multiple snapshot");
            goto out;
        }
        int64_t len = vd_getlength(s.src[i]);
        if (len < 0) {
            tool_error("Could not get size of %s: %s", argv[optind + i], strerror((int)-len));
            goto out;
        }
        s.src_size[i] = (uint64_t)len;
        s.total += (uint64_t)len;
    }

    if (!skip_create) {
        CreateSpec spec;
        if (tool_create_options(&spec, out_fmt, &o, out_filename, TOOL_OPTS_CONVERT) < 0) {
            goto out;
        }
        if (out_base) {
            spec.co.backing_file = out_base;
        }
        if (base_fmt) {
            spec.co.backing_fmt = base_fmt;
        }
        if (spec.co.backing_fmt && !spec.co.backing_file) {
            tool_error("%s: error while converting %s: Backing format cannot be used without "
                       "backing file", out_filename, out_fmt);
            goto out;
        }
        if (spec.co.backing_file && !spec.co.backing_fmt) {
            tool_error("%s: Backing file specified without backing format", out_filename);
            goto out;
        }
        if (spec.co.backing_file && !drv->supports_backing) {
            tool_error("%s: Backing file not supported for file format '%s'", out_filename,
                       out_fmt);
            goto out;
        }
        out_base = spec.co.backing_file;
        if (compress && spec.co.prealloc != VD_PREALLOC_OFF) {
            tool_error("Compression and preallocation not supported at the same time");
            goto out;
        }
        if (compress && spec.co.encrypt_format) {
            tool_error("Compression and encryption not supported at the same time");
            goto out;
        }
        if (bitmaps && nsrc > 1) {
            tool_error("Copying bitmaps only possible with single source");
            goto out;
        }
        if (bitmaps && convert_check_bitmaps(s.src[0], skip_broken) < 0) {
            goto out;
        }
        /* qemu-img says so after creating an empty target; nothing is created here */
        if (bitmaps && !create_supports_bitmaps(drv, &spec)) {
            tool_error("Format driver '%s' does not support bitmaps", drv->name);
            goto out;
        }
        spec.co.size = s.total;
        spec.co.size_given = true;
        spec.co.unsafe = true; /* the backing is opened below, with the target */
        VdError *err = NULL;
        if (vd_create(&spec.co, out_filename, &err) < 0) {
            tool_create_report(err, out_fmt, out_filename, TOOL_OPTS_CONVERT);
            goto out;
        }
        s.has_zero_init = !out_base;
    } else {
        if (bitmaps && nsrc > 1) {
            tool_error("Copying bitmaps only possible with single source");
            goto out;
        }
        if (bitmaps && convert_check_bitmaps(s.src[0], skip_broken) < 0) {
            goto out;
        }
        s.has_zero_init = target_is_zero;
    }

    /* cache=unsafe (convert's default target cache, as in qemu-img): never sync the target. */
    /* an encrypted target opens with the secret it was created with (qemu-img's key secrets) */
    const char *key = tool_opts_get(&o, "key-secret");
    s.target = tgt_image_opts
                   ? tool_open_image_opts(out_filename, out_fmt, VD_OPEN_RDWR | dst_cflags)
                   : tool_open_keyed(out_filename, out_fmt, VD_OPEN_RDWR | dst_cflags,
                                     key ? key : tool_opts_get(&o, "encrypt.key-secret"));
    if (!s.target) {
        goto out;
    }
    if (bitmaps && !vd_bitmaps_persistent_supported(s.target)) {
        tool_error("Format driver '%s' does not support bitmaps", s.target->drv->name);
        goto out;
    }
    if (compress && !s.target->drv->pwrite_compressed) {
        tool_error("Compression not supported for this file format");
        goto out;
    }
    int64_t tlen = vd_getlength(s.target);
    if (tlen < 0 || (uint64_t)tlen < s.total) {
        tool_error("Target image is too small (%" PRId64 " bytes, need %" PRIu64 ")", tlen,
                   s.total);
        goto out;
    }
    /* Only a backing given with -B counts: with -n the target's own content is overwritten. */
    s.target_has_backing = !skip_create && out_base && s.target->backing != NULL;
    s.target_backing_len = -1;
    if (s.target_has_backing) {
        s.target_backing_len = vd_getlength(s.target->backing);
        if (s.target_backing_len < 0) {
            tool_error("Could not get the size of the backing file");
            goto out;
        }
        /*
         * qemu-img assumes -B names the source's own backing file and copies only what the
         * source's top layer allocates. When it names something else, compare instead so the
         * output still reads exactly like the source.
         */
        BlockNode *sb = s.src[0]->backing;
        s.diff_backing = !(sb && same_file(sb->filename, s.target->backing->filename) &&
                           !strcmp(sb->drv->name, s.target->backing->drv->name) &&
                           vd_getlength(sb) == s.target_backing_len);
        s.has_zero_init = false;
    }
    if (s.target->encrypted && !s.target->drv->supports_backing) {
        s.has_zero_init = false; /* raw LUKS: unwritten sectors decrypt to noise, not zeroes */
    }
    if (bitmaps && convert_add_bitmaps(s.src[0], s.target, skip_broken, &cb) < 0) {
        goto out;
    }
    s.salvage = salvage;
    s.quiet = quiet;
    s.compressed = compress;
    if (compress) {
        uint32_t cs = s.target->drv->cluster_size ? s.target->drv->cluster_size(s.target) : 0;
        if (!cs) {
            tool_error("Compression not supported for this file format");
            goto out;
        }
        s.cluster_size = cs;
    }
    s.min_sparse = sparse / SECTOR;
    {
        uint64_t a = 1;
        while (a * 2 <= s.min_sparse) {
            a *= 2;
        }
        s.alignment = s.min_sparse ? a : 1;
    }
    /* Compressed clusters land wherever they fit anyway: let them compress in parallel. */
    s.in_order = !ooo && !compress;
    s.copy_range = copy_range;
    s.rate.rate = rate;
    s.buf_size = tool_rate_chunk(&s.rate, TOOL_BUF_SIZE);

    progress_init(progress, 1.0);
    progress_print(0, 100);
    if (progress) {
        s.ret = convert_count_allocated(&s); /* failed: the workers stop at once */
    }
    int nthreads = (int)MIN(coroutines, CONVERT_MAX_THREADS);
    if (s.total < 4 * (uint64_t)TOOL_BUF_SIZE || s.ret) {
        nthreads = 1; /* small images: threads cost more than they save */
    }
    pthread_t tids[CONVERT_MAX_THREADS];
    int started = 0;
    for (int i = 1; i < nthreads; i++) {
        if (pthread_create(&tids[i], NULL, convert_worker, &s) != 0) {
            break;
        }
        started++;
    }
    convert_worker(&s);
    for (int i = 1; i <= started; i++) {
        pthread_join(tids[i], NULL);
    }
    progress_print(100, 0); /* qemu-img shows 100 % also when the copy failed */
    progress_end();
    if (s.ret < 0) {
        if (s.err) {
            tool_report(s.err, NULL);
            s.err = NULL;
        } else {
            tool_error("error while converting: %s", strerror(-s.ret));
        }
        goto out;
    }
    /* With cache=unsafe this writes metadata but syncs nothing (VD_OPEN_NO_FLUSH). */
    int r = vd_flush(s.target);
    if (r < 0) {
        tool_error("error while flushing %s: %s", out_filename, strerror(-r));
        goto out;
    }
    if (convert_enable_bitmaps(s.target, &cb) < 0) {
        goto out;
    }
    ret = 0;
out:
    convert_drop_bitmaps(ret ? s.target : NULL, &cb);
    vd_error_free(s.err);
    if (s.target) {
        vd_node_unref(s.target);
    }
    for (int i = 0; s.src && i < s.nsrc; i++) {
        if (s.src[i]) {
            vd_node_unref(s.src[i]);
        }
    }
    free(s.src);
    free(s.src_size);
    tool_opts_free(&o);
    free(optstr);
    pthread_mutex_destroy(&s.lock);
    for (int i = 0; i < CONVERT_MAX_THREADS; i++) {
        pthread_cond_destroy(&turns[i].cond);
    }
    tool_rate_destroy(&s.rate);
    tool_opts_free(&snap.opts);
    return ret;
}
