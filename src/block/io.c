/*
 * io.c - the vd_* I/O entry points: range checks, read-only enforcement and generic emulation
 * (write-zeroes by writing zero buffers, discard as a no-op) in front of each driver.
 *
 * Range rule: on format nodes a request must lie within vd_getlength (else -EINVAL; zero-length
 * requests always succeed). Protocol nodes are not range-checked: formats grow their file by
 * writing past its end, and file reads past the end return zeroes.
 * No locks here: concurrency is each driver's business (block.h), callers may add tracking.
 * VD_OPEN_NO_FLUSH (cache=unsafe) is enforced here: no sync of that node's file, FUA dropped.
 * Every successful write, write-zeroes, discard, compressed write or offloaded copy sets the
 * range in the node's enabled dirty bitmaps (vd_bitmaps_note_write), and a resize resizes them.
 * Each of them that passes the checks runs inside the node's write hooks (block/write-hooks.h).
 * vd_flush follows a writable backing; vd_flush_own does not. Each thread counts its syncs
 * (thread-local, lock-free) so a pivot can report how many it made while guests were drained.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>

#include "block/block.h"
#include "block/dirty-bitmap.h"
#include "block/write-hooks.h"

/* Emulated write-zeroes writes at most this much per request. */
#define ZERO_EMUL_CHUNK (1U << 20)

/*
 * QEMU counts every node's length in whole 512-byte sectors (bdrv_getlength is total_sectors *
 * 512): a 1000-byte file or NBD export is a 1024-byte node, its tail reads as zeroes (every
 * protocol driver pads reads past its end) and writing it grows a file (an NBD export refuses).
 */
int64_t vd_getlength(BlockNode *bs)
{
    if (!bs || !bs->drv) {
        return -EINVAL;
    }
    if (!bs->drv->getlength) {
        return -ENOTSUP;
    }
    int64_t len = bs->drv->getlength(bs);
    if (len > 0 && len % 512 && len <= INT64_MAX - 511) {
        len = (len + 511) / 512 * 512;
    }
    return len;
}

static int check_range(BlockNode *bs, uint64_t offset, uint64_t bytes)
{
    if (offset > (uint64_t)INT64_MAX || bytes > (uint64_t)INT64_MAX - offset) {
        return -EINVAL;
    }
    if (bs->drv->is_protocol) {
        return 0;
    }
    int64_t len = vd_getlength(bs);
    if (len < 0) {
        return (int)len;
    }
    if (offset + bytes > (uint64_t)len) {
        return -EINVAL;
    }
    return 0;
}

/* A format node's request: tell its file child (blkdebug) first. */
static void debug_event(BlockNode *bs, int event)
{
    if (!bs->drv->is_protocol && bs->file && bs->file->drv->debug_event) {
        bs->file->drv->debug_event(bs->file, event);
    }
}

int vd_pread(BlockNode *bs, uint64_t offset, uint64_t bytes, void *buf)
{
    int ret = check_range(bs, offset, bytes);
    if (ret < 0 || bytes == 0) {
        return ret;
    }
    if (!bs->drv->pread) {
        return -ENOTSUP;
    }
    debug_event(bs, VD_DEBUG_READ_AIO);
    return bs->drv->pread(bs, offset, bytes, buf);
}

/* cache=unsafe: FUA would sync, which the node was opened to never do. */
static int req_flags(const BlockNode *bs, int flags)
{
    return (bs->open_flags & VD_OPEN_NO_FLUSH) ? (flags & ~VD_REQ_FUA) : flags;
}

/*
 * A write-like request reached the driver and finished with ret: the range is dirty in bs's
 * bitmaps even on failure (part of it may have been written), as QEMU marks it.
 */
static int noted(BlockNode *bs, uint64_t offset, uint64_t bytes, int ret)
{
    vd_bitmaps_note_write(bs, offset, bytes);
    return ret;
}

/* The driver's part of each write-like request, run inside the node's write hooks. */
static int pwrite_io(BlockNode *bs, const VdWriteReq *w)
{
    debug_event(bs, VD_DEBUG_WRITE_AIO);
    return bs->drv->pwrite(bs, w->offset, w->bytes, w->buf, w->flags);
}

static int pdiscard_io(BlockNode *bs, const VdWriteReq *w)
{
    int ret = bs->drv->pdiscard(bs, w->offset, w->bytes, w->flags);
    return ret == -ENOTSUP ? 0 : ret;
}

static int pwrite_compressed_io(BlockNode *bs, const VdWriteReq *w)
{
    return bs->drv->pwrite_compressed(bs, w->offset, w->bytes, w->buf);
}

/* VD_OPEN_WRITETHROUGH: a completed write is flushed before it is reported (QEMU's FUA). */
static int write_through(BlockNode *bs, int ret)
{
    if (ret == 0 && (bs->open_flags & VD_OPEN_WRITETHROUGH)) {
        ret = vd_flush(bs);
    }
    return ret;
}

int vd_pwrite(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf, int flags)
{
    if (bs->read_only) {
        return -EPERM;
    }
    flags = req_flags(bs, flags);
    int ret = check_range(bs, offset, bytes);
    if (ret < 0 || bytes == 0) {
        return ret;
    }
    if (!bs->drv->pwrite) {
        return -ENOTSUP;
    }
    VdWriteReq w = {.kind = VD_WRITE_DATA, .offset = offset, .bytes = bytes, .buf = buf,
                    .flags = flags};
    return write_through(bs, noted(bs, offset, bytes, vd_write_hooks_run(bs, &w, pwrite_io)));
}

static int pwrite_zeroes(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags);

int vd_pwrite_zeroes(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    int ret = pwrite_zeroes(bs, offset, bytes, flags);
    return ret == -EINVAL || ret == -EPERM ? ret : write_through(bs, noted(bs, offset, bytes, ret));
}

static int pwrite_zeroes_io(BlockNode *bs, const VdWriteReq *w);

static int pwrite_zeroes(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    if (bs->read_only) {
        return -EPERM;
    }
    flags = req_flags(bs, flags);
    int ret = check_range(bs, offset, bytes);
    if (ret < 0 || bytes == 0) {
        return ret;
    }
    VdWriteReq w = {.kind = VD_WRITE_ZEROES, .offset = offset, .bytes = bytes, .flags = flags};
    return vd_write_hooks_run(bs, &w, pwrite_zeroes_io);
}

static int pwrite_zeroes_io(BlockNode *bs, const VdWriteReq *w)
{
    uint64_t offset = w->offset, bytes = w->bytes;
    int flags = w->flags, ret;
    debug_event(bs, VD_DEBUG_PWRITEV_ZERO);
    if (bs->drv->pwrite_zeroes) {
        ret = bs->drv->pwrite_zeroes(bs, offset, bytes, flags);
        if (ret != -ENOTSUP) {
            return ret;
        }
    }
    if (flags & VD_REQ_NO_FALLBACK) {
        return -ENOTSUP;
    }
    if (!bs->drv->pwrite) {
        return -ENOTSUP;
    }
    /* Emulate: write real zeroes (the driver may still detect and optimise them). */
    size_t chunk = bytes < ZERO_EMUL_CHUNK ? (size_t)bytes : ZERO_EMUL_CHUNK;
    void *zero = calloc(1, chunk);
    if (!zero) {
        return -ENOMEM;
    }
    ret = 0;
    while (bytes > 0) {
        uint64_t n = bytes < chunk ? bytes : chunk;
        ret = bs->drv->pwrite(bs, offset, n, zero, flags & VD_REQ_FUA);
        if (ret < 0) {
            break;
        }
        offset += n;
        bytes -= n;
    }
    free(zero);
    return ret;
}

int vd_pdiscard(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    if (bs->read_only) {
        return -EPERM;
    }
    int ret = check_range(bs, offset, bytes);
    if (ret < 0 || bytes == 0) {
        return ret;
    }
    if (!bs->drv->pdiscard) {
        return 0; /* discard is advisory */
    }
    VdWriteReq w = {.kind = VD_WRITE_DISCARD, .offset = offset, .bytes = bytes, .flags = flags};
    return noted(bs, offset, bytes, vd_write_hooks_run(bs, &w, pdiscard_io));
}

int vd_pwrite_compressed(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf)
{
    if (bs->read_only) {
        return -EPERM;
    }
    int ret = check_range(bs, offset, bytes);
    if (ret < 0 || bytes == 0) {
        return ret;
    }
    if (!bs->drv->pwrite_compressed) {
        return -ENOTSUP;
    }
    VdWriteReq w = {.kind = VD_WRITE_DATA, .offset = offset, .bytes = bytes, .buf = buf};
    return write_through(bs, noted(bs, offset, bytes,
                                   vd_write_hooks_run(bs, &w, pwrite_compressed_io)));
}

/*
 * Syncs (a protocol node's flush, i.e. fdatasync) issued by the calling thread: the jobs' pivots
 * count how many they made while guest I/O was drained (vd_flush_thread_syncs).
 */
static __thread uint64_t thread_syncs;
static uint64_t total_syncs; /* atomic */

uint64_t vd_flush_thread_syncs(void)
{
    return thread_syncs;
}

uint64_t vd_flush_total_syncs(void)
{
    return __atomic_load_n(&total_syncs, __ATOMIC_RELAXED);
}

uint64_t vd_flush_requests(BlockNode *bs)
{
    return __atomic_load_n(&bs->flush_requests, __ATOMIC_SEQ_CST);
}

static int flush_node(BlockNode *bs, bool follow_backing)
{
    if (!bs || !bs->drv) {
        return -EINVAL;
    }
    /*
     * cache=unsafe: a protocol node never syncs; a format node still writes its cached metadata
     * into its file (so the file is a complete image for other readers, like QEMU's flush_to_os)
     * but does not sync its file child (vd_open gives the file node it opens the same flag;
     * a caller-supplied opts.file keeps its own flags for its own flushes).
     */
    bool no_flush = (bs->open_flags & VD_OPEN_NO_FLUSH) != 0;
    if (no_flush && bs->drv->is_protocol) {
        return 0;
    }
    __atomic_add_fetch(&bs->flush_requests, 1, __ATOMIC_SEQ_CST);
    int ret = 0;
    debug_event(bs, VD_DEBUG_FLUSH_TO_OS);
    if (bs->drv->flush) {
        if (bs->drv->is_protocol) {
            thread_syncs++;
            __atomic_add_fetch(&total_syncs, 1, __ATOMIC_RELAXED);
        }
        ret = bs->drv->flush(bs);
    }
    /* The format's metadata is only durable once its file is (unless the driver synced it). */
    if (ret == 0 && bs->file && !no_flush && !bs->drv->flush_syncs_file) {
        debug_event(bs, VD_DEBUG_FLUSH_TO_DISK);
        ret = flush_node(bs->file, true);
    }
    /* A writable backing (commit's target) holds data we wrote too. */
    if (ret == 0 && follow_backing && bs->backing && !bs->backing->read_only) {
        ret = flush_node(bs->backing, true);
    }
    return ret;
}

int vd_flush(BlockNode *bs)
{
    return flush_node(bs, true);
}

int vd_flush_own(BlockNode *bs)
{
    return flush_node(bs, false);
}

int vd_start_writeback(BlockNode *bs)
{
    if (!bs || !bs->drv || !bs->drv->start_writeback) {
        return -ENOTSUP;
    }
    return bs->drv->start_writeback(bs);
}

int vd_truncate(BlockNode *bs, uint64_t size, bool shrink, VdPrealloc prealloc, VdError **errp)
{
    if (bs->read_only) {
        vd_error_setg(errp, EPERM, "Cannot resize '%s': opened read-only", bs->filename);
        return -EPERM;
    }
    if (size > (uint64_t)INT64_MAX) {
        vd_error_setg(errp, EINVAL, "Size %llu is too large", (unsigned long long)size);
        return -EINVAL;
    }
    if (!bs->drv->truncate) {
        vd_error_setg(errp, ENOTSUP, "Format '%s' of '%s' does not support resizing",
                      bs->drv->name, bs->filename);
        return -ENOTSUP;
    }
    int ret = bs->drv->truncate(bs, size, shrink, prealloc, errp);
    if (ret == 0 && vd_bitmaps_resize(bs, size) < 0) {
        vd_error_setg(errp, ENOMEM, "Out of memory resizing the bitmaps of '%s'", bs->filename);
        return -ENOMEM;
    }
    return ret;
}

/*
 * Copy offloading (qemu-img convert -C): find where src's data lives in a host file (block
 * status) and have dst's driver fill its range from there (copy_range_to, ending in
 * copy_file_range between two file nodes). 0 only when every byte went through the kernel.
 */
/* One offloaded piece: the destination's write request (no buffer) and where the data lives. */
typedef struct CopyRangeReq {
    VdWriteReq w; /* first: copy_range_io gets &c.w */
    BlockNode *file;
    uint64_t file_offset;
} CopyRangeReq;

static int copy_range_io(BlockNode *bs, const VdWriteReq *w)
{
    const CopyRangeReq *c = (const CopyRangeReq *)w;
    return bs->drv->copy_range_to(bs, w->offset, w->bytes, c->file, c->file_offset);
}

int vd_copy_range(BlockNode *src, uint64_t src_offset, BlockNode *dst, uint64_t dst_offset,
                  uint64_t bytes)
{
    if (dst->read_only) {
        return -EPERM;
    }
    int ret = check_range(src, src_offset, bytes);
    if (ret == 0) {
        ret = check_range(dst, dst_offset, bytes);
    }
    if (ret < 0 || bytes == 0) {
        return ret;
    }
    if (!dst->drv->copy_range_to) {
        return -ENOTSUP;
    }
    while (bytes > 0) {
        uint64_t pnum;
        VdBlockStatus st;
        ret = vd_block_status_above(src, NULL, src_offset, bytes, &pnum, &st);
        if (ret < 0) {
            return ret;
        }
        /* Compressed, zero or backing-less holes have no host bytes to hand over. */
        if ((st.flags & (VD_BS_DATA | VD_BS_ZERO | VD_BS_OFFSET_VALID)) !=
                (VD_BS_DATA | VD_BS_OFFSET_VALID) || !st.file || pnum == 0) {
            return -ENOTSUP;
        }
        pnum = pnum < bytes ? pnum : bytes;
        CopyRangeReq c = {.w = {.kind = VD_WRITE_DATA, .offset = dst_offset, .bytes = pnum},
                          .file = st.file, .file_offset = st.offset};
        ret = vd_write_hooks_run(dst, &c.w, copy_range_io);
        if (noted(dst, dst_offset, pnum, ret) < 0) {
            return ret;
        }
        src_offset += pnum;
        dst_offset += pnum;
        bytes -= pnum;
    }
    return 0;
}
