/*
 * raw.c - the "raw" format: guest bytes are the file child's bytes, offset for offset, or (QEMU's
 * `offset` and `size` options) those of a window [offset, offset+size) of it.
 *
 * Every call passes straight through to bs->file via the vd_* layer, so the file node's range
 * rules, zero-emulation and thread safety apply unchanged; raw keeps no state and needs no lock.
 * Raw is the probing fallback: its score is the lowest non-zero one. A raw image whose format was
 * guessed refuses writes that would make the next probe see another format (QEMU does the same):
 * otherwise a guest could turn its disk into, say, a qcow2 file pointing at host files.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <string.h>

#include <jansson.h>

#include "block/block.h"
#include "util/log.h"

#define RAW_PROBE_BYTES 512

typedef struct RawState {
    bool probed; /* format was guessed, not given */
    uint64_t offset; /* the window's start in the file (0: none) */
    uint64_t size;   /* its length when has_size, else up to the file's end */
    bool has_size;
} RawState;

/* raw has no metadata of its own: the dirty-flag is its file's (QEMU's raw_get_info). */
static int raw_is_dirty(BlockNode *bs, bool *dirty)
{
    return bs->file && bs->file != bs ? vd_is_dirty(bs->file, dirty) : -ENOTSUP;
}

static int raw_probe(const uint8_t *buf, size_t len, const char *filename)
{
    return VD_PROBE_ANY; /* anything can be raw; any real format match wins */
}

static int raw_open(BlockNode *bs, const VdOpenOptions *opts, VdError **errp)
{
    RawState *s = bs->opaque;
    if (!bs->file) {
        vd_error_setg(errp, EINVAL, "raw: '%s' has no file child", bs->filename);
        return -EINVAL;
    }
    s->probed = opts->format == NULL;
    /* QEMU's raw_apply_options: a window onto the file, checked against its size now */
    json_t *o = opts->options;
    if (vd_options_u64(o, "offset", &s->offset, errp) < 0 ||
        vd_options_u64(o, "size", &s->size, errp) < 0) {
        return -EINVAL;
    }
    s->has_size = json_object_get(o, "size") != NULL;
    if (s->offset || s->has_size) {
        int64_t real = vd_getlength(bs->file);
        if (real < 0) {
            vd_error_setg_errno(errp, (int)-real, "Could not get the size of '%s'",
                                bs->file->filename);
            return (int)real;
        }
        if (s->offset > (uint64_t)real) {
            vd_error_setg(errp, EINVAL, "Offset (%" PRIu64 ") cannot be greater than size of "
                          "the containing file (%" PRId64 ")", s->offset, real);
            return -EINVAL;
        }
        if (s->has_size && (uint64_t)real - s->offset < s->size) {
            /* sic: two spaces, as QEMU 7.2 prints it */
            vd_error_setg(errp, EINVAL, "The sum of offset (%" PRIu64 ") and size (%" PRIu64
                          ") has to be smaller or equal to the  actual size of the containing "
                          "file (%" PRId64 ")", s->offset, s->size, real);
            return -EINVAL;
        }
        if (s->has_size && s->size % 512) {
            vd_error_setg(errp, EINVAL, "Specified size is not multiple of 512");
            return -EINVAL;
        }
    }
    if (s->probed && !bs->read_only) {
        /* QEMU's words and lines, naming the file (raw_check_write is the restriction) */
        vd_log_verbatim(VD_LOG_WARN,
                        "WARNING: Image format was not specified for '%s' and probing guessed "
                        "raw.\n"
                        "         Automatically detecting the format is dangerous for raw images, "
                        "write operations on block 0 will be restricted.\n"
                        "         Specify the 'raw' format explicitly to remove the restrictions."
                        "\n", bs->file->filename);
    }
    return 0;
}

/* Would writing buf at offset make the first sector look like another format? */
static bool raw_write_changes_format(BlockNode *bs, uint64_t offset, uint64_t bytes,
                                     const void *buf)
{
    uint8_t head[RAW_PROBE_BYTES];
    if (vd_pread(bs->file, 0, sizeof(head), head) < 0) {
        return true; /* can't verify: refuse rather than risk it */
    }
    uint64_t n = RAW_PROBE_BYTES - offset < bytes ? RAW_PROBE_BYTES - offset : bytes;
    if (buf) {
        memcpy(head + offset, buf, n);
    } else {
        memset(head + offset, 0, n);
    }
    int score;
    vd_probe_bytes(head, sizeof(head), bs->filename, &score);
    return score > VD_PROBE_ANY;
}

static void raw_close(BlockNode *bs)
{
}

static uint64_t at(BlockNode *bs, uint64_t offset)
{
    return ((RawState *)bs->opaque)->offset + offset;
}

static int raw_pread(BlockNode *bs, uint64_t offset, uint64_t bytes, void *buf)
{
    return vd_pread(bs->file, at(bs, offset), bytes, buf);
}

static int raw_pwrite(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf, int flags)
{
    RawState *s = bs->opaque;
    if (s->probed && offset < RAW_PROBE_BYTES && raw_write_changes_format(bs, offset, bytes, buf)) {
        return -EPERM;
    }
    return vd_pwrite(bs->file, at(bs, offset), bytes, buf, flags);
}

/* Offloaded writes skip raw_pwrite's guard: the probed-format head goes through a buffer. */
static int raw_copy_range_to(BlockNode *bs, uint64_t offset, uint64_t bytes, BlockNode *src,
                             uint64_t src_offset)
{
    RawState *s = bs->opaque;
    if ((s->probed && offset < RAW_PROBE_BYTES) || !bs->file->drv->copy_range_to) {
        return -ENOTSUP;
    }
    if (bs->read_only || bs->file->read_only) {
        return -EPERM;
    }
    return bs->file->drv->copy_range_to(bs->file, at(bs, offset), bytes, src, src_offset);
}

static int raw_pwrite_zeroes(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    return vd_pwrite_zeroes(bs->file, at(bs, offset), bytes, flags);
}

static int raw_pdiscard(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    return vd_pdiscard(bs->file, at(bs, offset), bytes, flags);
}

static int raw_block_status(BlockNode *bs, uint64_t offset, uint64_t bytes, uint64_t *pnum,
                            uint64_t *map, BlockNode **file)
{
    VdBlockStatus st;
    RawState *s = bs->opaque;
    int64_t flen = vd_getlength(bs->file);
    if (flen < 0) {
        return (int)flen;
    }
    flen = flen > (int64_t)s->offset ? flen - (int64_t)s->offset : 0; /* the window's view */
    if (offset >= (uint64_t)flen) {
        /* A window's sector-rounding tail past its file's end reads as zeroes. */
        *pnum = bytes;
        *map = at(bs, offset);
        *file = bs->file;
        return VD_BS_ZERO | VD_BS_OFFSET_VALID | VD_BS_ALLOCATED;
    }
    if (bytes > (uint64_t)flen - offset) {
        bytes = (uint64_t)flen - offset;
    }
    int ret = vd_block_status(bs->file, at(bs, offset), bytes, pnum, &st);
    if (ret < 0) {
        return ret;
    }
    *map = st.offset;
    *file = st.file;
    /* Raw decides every byte itself (no backing); an NBD export's tail has no offset. */
    return (st.flags & (VD_BS_DATA | VD_BS_ZERO | VD_BS_OFFSET_VALID)) | VD_BS_ALLOCATED;
}

static int raw_flush(BlockNode *bs)
{
    return 0; /* vd_flush flushes the file child after this */
}

/* vd_getlength rounds to whole sectors: a 1000-byte file is a 1024-byte image. */
static int64_t raw_getlength(BlockNode *bs)
{
    RawState *s = bs->opaque;
    if (s->has_size) {
        return (int64_t)s->size;
    }
    int64_t len = vd_getlength(bs->file);
    if (len >= 0 && s->offset) {
        return len > (int64_t)s->offset ? len - (int64_t)s->offset : 0;
    }
    return len;
}

/* qemu-img measure -O raw: a raw image always needs its whole (sector-rounded) virtual size. */
static int raw_measure(const VdCreateOptions *opts, BlockNode *src, uint64_t *required,
                       uint64_t *fully_allocated, VdError **errp)
{
    uint64_t size;
    if (src) {
        int64_t len = vd_getlength(src);
        if (len < 0) {
            vd_error_setg_errno(errp, (int)-len, "Unable to get image virtual_size");
            return (int)len;
        }
        size = (uint64_t)len;
    } else {
        if (opts->size > (uint64_t)INT64_MAX - 511) {
            vd_error_setg(errp, EINVAL, "Image size is too large");
            return -EINVAL;
        }
        size = (opts->size + 511) / 512 * 512;
    }
    *required = size;
    *fully_allocated = size;
    return 0;
}

static int64_t raw_allocated_size(BlockNode *bs)
{
    if (bs->file->drv->allocated_size) {
        return bs->file->drv->allocated_size(bs->file);
    }
    return -ENOTSUP;
}

static int raw_truncate(BlockNode *bs, uint64_t size, bool shrink, VdPrealloc prealloc,
                        VdError **errp)
{
    RawState *s = bs->opaque;
    if (s->has_size) {
        vd_error_setg(errp, ENOTSUP, "Cannot resize fixed-size raw disks");
        return -ENOTSUP;
    }
    if (size > INT64_MAX - s->offset) {
        vd_error_setg(errp, EINVAL, "Disk size too large for the chosen offset");
        return -EINVAL;
    }
    return vd_truncate(bs->file, at(bs, size), shrink, prealloc, errp);
}

static int raw_create(const char *filename, const VdCreateOptions *opts, VdError **errp)
{
    if (opts->backing_file) {
        vd_error_setg(errp, ENOTSUP, "Format 'raw' does not support backing files");
        return -ENOTSUP;
    }
    if (opts->prealloc == VD_PREALLOC_METADATA) {
        vd_error_setg(errp, EINVAL, "Unsupported preallocation mode 'metadata' for format raw");
        return -EINVAL;
    }
    return vd_protocol_create(filename, opts, errp); /* file or nbd, as the name says */
}

/* BlockdevOptionsRaw: the file child and a window onto it. */
static const VdOptSpec raw_blockdev_options[] = {
    {"file", VD_OPT_REF, true},
    {"offset", VD_OPT_INT},
    {"size", VD_OPT_INT},
    {NULL}};

/* QEMU names a raw node by these when given (its strong runtime options) */
static const char *const raw_json_name_options[] = {"offset", "size", NULL};

const BlockDriver vd_drv_raw = {
    .name = "raw",
    .is_protocol = false,
    .supports_backing = false,
    .passthrough = true,
    .blockdev_options = raw_blockdev_options,
    .json_name_options = raw_json_name_options,
    .state_size = sizeof(RawState),
    .probe = raw_probe,
    .open = raw_open,
    .close = raw_close,
    .create = raw_create,
    .pread = raw_pread,
    .pwrite = raw_pwrite,
    .pwrite_zeroes = raw_pwrite_zeroes,
    .copy_range_to = raw_copy_range_to,
    .pdiscard = raw_pdiscard,
    .flush = raw_flush,
    .block_status = raw_block_status,
    .getlength = raw_getlength,
    .allocated_size = raw_allocated_size,
    .truncate = raw_truncate,
    .measure = raw_measure,
    .is_dirty = raw_is_dirty,
};
