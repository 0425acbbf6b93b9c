/*
 * qcow2-check.c - offline qcow2 check/repair (qemu-img check semantics); measure is qcow2-measure.c.
 * Reads the image only through the protocol node; every on-disk size/offset is bounded (file size,
 * format limits) before it drives a loop or an allocation. A check without fix never writes; a
 * rebuild writes new refcount structures past EOF, flushes, and only then switches the header.
 */
#include "formats/qcow2-check.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2-format.h"

/* Limits (the same as QEMU's, so the same images are accepted). */
#define CHK_MAX_SNAPSHOTS 65536U
#define CHK_MAX_SNAPSHOT_EXTRA 1024U
#define CHK_MAX_SNAPSHOTS_SIZE (1024ULL * CHK_MAX_SNAPSHOTS)
#define CHK_SNAPSHOT_HEADER_SIZE 40
#define CHK_MAX_BITMAPS 65535U
#define CHK_MAX_BITMAP_DIR_SIZE (1024ULL * CHK_MAX_BITMAPS)
#define CHK_BITMAP_DIR_ENTRY_SIZE 24
#define CHK_MAX_BITMAP_DATA (64ULL << 20)
#define CHK_BME_RESERVED_MASK 0xff000000000001feULL
#define CHK_BME_OFFSET_MASK 0x00fffffffffffe00ULL
#define CHK_BME_ALL_ONES 1ULL
#define CHK_L2E_STD_RESERVED_MASK 0x3f000000000001feULL
#define CHK_REFT_RESERVED_MASK 0x1ffULL
/* Refuse to allocate the in-memory refcount array beyond this many clusters (as QEMU: INT_MAX). */
#define CHK_MAX_CLUSTERS 0x7fffffffULL

typedef struct ChkSnapshot {
    uint64_t l1_offset;
    uint32_t l1_size;
    char *id;
    char *name;
    uint16_t id_size;
    uint16_t name_size;
    uint8_t hdr[40];      /* the entry's fixed part as stored (for rewriting the table) */
    uint8_t *extra;       /* extra data kept (at most CHK_MAX_SNAPSHOT_EXTRA bytes) */
    uint32_t extra_size;
} ChkSnapshot;

typedef struct Chk {
    BlockNode *file;
    VdCheckResult *res;
    int fix;
    bool quiet;
    uint64_t file_size;

    Qcow2Header h;
    uint32_t cluster_bits;
    uint64_t cluster_size;
    bool extl2;
    bool data_file;
    uint32_t l2_entry_size;
    uint64_t l2_entries;
    uint32_t csize_shift;
    uint64_t csize_mask;
    uint64_t cluster_offset_mask;
    uint32_t refcount_order;
    uint64_t refcount_max;
    uint32_t rb_bits; /* log2(refcount entries per refcount block) */

    uint64_t *reftable; /* host order, as stored (flags included) */
    uint64_t reftable_entries;
    uint64_t reftable_offset;

    uint64_t *l1; /* active L1, host order */
    uint32_t l1_size;
    uint64_t l1_offset;

    ChkSnapshot *snaps;
    uint32_t nb_snaps;
    uint64_t snapshots_offset;
    uint64_t snapshots_size;
    int snap_corruptions;  /* entries to rewrite (incomplete / too much extra data) */
    uint32_t snap_reduced; /* snapshots discarded by a repair (header count lowered) */

    uint32_t nb_bitmaps;
    uint64_t bm_dir_offset;
    uint64_t bm_dir_size;

    uint64_t crypto_offset;
    uint64_t crypto_length;

    /* Computed references, one per host cluster. */
    uint32_t *refs;
    uint64_t refs_alloc;
    uint64_t nb_clusters;
    uint32_t refs_cap;

    /* One cached stored refcount block (write-back while repairing). */
    uint8_t *rb_buf;
    uint64_t rb_offset;
    bool rb_valid;
    bool rb_dirty;
} Chk;

static void say(Chk *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(Chk *c, const char *fmt, ...)
{
    if (c->quiet) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
}

/* ---- file access: reads past EOF read zeroes, as QEMU's block layer does ---- */

static int read_padded(Chk *c, uint64_t offset, uint64_t len, void *buf)
{
    if (len == 0) {
        return 0;
    }
    if (offset > UINT64_MAX - len) {
        return -EINVAL;
    }
    uint64_t avail = 0;
    if (offset < c->file_size) {
        avail = c->file_size - offset;
        if (avail > len) {
            avail = len;
        }
    }
    if (avail) {
        int ret = vd_pread(c->file, offset, avail, buf);
        if (ret < 0) {
            return ret;
        }
    }
    if (avail < len) {
        memset((uint8_t *)buf + avail, 0, len - avail);
    }
    return 0;
}

static int write_file(Chk *c, uint64_t offset, uint64_t len, const void *buf)
{
    if (offset > UINT64_MAX - len) {
        return -EINVAL;
    }
    if (offset + len > c->file_size) {
        /* Never grow the file implicitly: only the rebuild does, explicitly. */
        return -EINVAL;
    }
    return vd_pwrite(c->file, offset, len, buf, 0);
}

static inline uint64_t div_round_up(uint64_t a, uint64_t b)
{
    return a / b + (a % b != 0);
}

static inline uint64_t off_in_cluster(Chk *c, uint64_t off)
{
    return off & (c->cluster_size - 1);
}

/* ---- refcount block entries of width 1 << order bits ---- */

static uint64_t rb_get(const uint8_t *rb, uint64_t idx, uint32_t order)
{
    switch (order) {
    case 0:
        return (rb[idx / 8] >> (idx % 8)) & 1;
    case 1:
        return (rb[idx / 4] >> (2 * (idx % 4))) & 3;
    case 2:
        return (rb[idx / 2] >> (4 * (idx % 2))) & 0xf;
    case 3:
        return rb[idx];
    case 4:
        return ((uint64_t)rb[2 * idx] << 8) | rb[2 * idx + 1];
    case 5:
        return qcow2_be32(rb + 4 * idx);
    default:
        return qcow2_be64(rb + 8 * idx);
    }
}

static void rb_set(uint8_t *rb, uint64_t idx, uint32_t order, uint64_t v)
{
    unsigned shift;
    switch (order) {
    case 0:
        shift = idx % 8;
        rb[idx / 8] = (uint8_t)((rb[idx / 8] & ~(1u << shift)) | ((v & 1) << shift));
        break;
    case 1:
        shift = 2 * (idx % 4);
        rb[idx / 4] = (uint8_t)((rb[idx / 4] & ~(3u << shift)) | ((v & 3) << shift));
        break;
    case 2:
        shift = 4 * (idx % 2);
        rb[idx / 2] = (uint8_t)((rb[idx / 2] & ~(0xfu << shift)) | ((v & 0xf) << shift));
        break;
    case 3:
        rb[idx] = (uint8_t)v;
        break;
    case 4:
        rb[2 * idx] = (uint8_t)(v >> 8);
        rb[2 * idx + 1] = (uint8_t)v;
        break;
    case 5:
        qcow2_put_be32(rb + 4 * idx, (uint32_t)v);
        break;
    default:
        qcow2_put_be64(rb + 8 * idx, v);
        break;
    }
}

static int rb_writeback(Chk *c)
{
    if (!c->rb_valid || !c->rb_dirty) {
        return 0;
    }
    int ret = write_file(c, c->rb_offset, c->cluster_size, c->rb_buf);
    if (ret == 0) {
        c->rb_dirty = false;
    }
    return ret;
}

static int rb_load(Chk *c, uint64_t offset)
{
    if (c->rb_valid && c->rb_offset == offset) {
        return 0;
    }
    int ret = rb_writeback(c);
    if (ret < 0) {
        return ret;
    }
    c->rb_valid = false;
    ret = read_padded(c, offset, c->cluster_size, c->rb_buf);
    if (ret < 0) {
        return ret;
    }
    c->rb_offset = offset;
    c->rb_valid = true;
    return 0;
}

/* Stored refcount of cluster idx (0 when its refcount block is absent). */
static int stored_refcount(Chk *c, uint64_t idx, uint64_t *val)
{
    uint64_t rt = idx >> c->rb_bits;
    *val = 0;
    if (rt >= c->reftable_entries) {
        return 0;
    }
    uint64_t off = c->reftable[rt] & QCOW2_REFT_OFFSET_MASK;
    if (!off) {
        return 0;
    }
    if (off_in_cluster(c, off)) {
        return -EIO;
    }
    int ret = rb_load(c, off);
    if (ret < 0) {
        return ret;
    }
    *val = rb_get(c->rb_buf, idx & ((1ULL << c->rb_bits) - 1), c->refcount_order);
    return 0;
}

/* Set a stored refcount; only for clusters whose refcount block exists (refcount was > 0). */
static int set_stored_refcount(Chk *c, uint64_t idx, uint64_t val)
{
    uint64_t rt = idx >> c->rb_bits;
    if (rt >= c->reftable_entries) {
        return -EINVAL;
    }
    uint64_t off = c->reftable[rt] & QCOW2_REFT_OFFSET_MASK;
    if (!off || off_in_cluster(c, off) || off > c->file_size ||
        c->file_size - off < c->cluster_size) {
        return -EINVAL;
    }
    int ret = rb_load(c, off);
    if (ret < 0) {
        return ret;
    }
    rb_set(c->rb_buf, idx & ((1ULL << c->rb_bits) - 1), c->refcount_order, val);
    c->rb_dirty = true;
    return 0;
}

/* ---- computed references ---- */

/*
 * Count one reference to every cluster touched by [offset, offset+size). As QEMU, a region that
 * ends one cluster or more past the end of the file is a corruption and is not counted (a
 * compressed cluster may legitimately end a little past EOF). Returns 1 if counted, 0 if not.
 */
static int inc_refs(Chk *c, uint64_t offset, uint64_t size)
{
    if (size == 0) {
        return 0;
    }
    if (offset > (uint64_t)INT64_MAX || size > (uint64_t)INT64_MAX - offset ||
        (offset + size > c->file_size && offset + size - c->file_size >= c->cluster_size)) {
        say(c, "ERROR: counting reference for region exceeding the end of the file by one cluster "
               "or more: offset 0x%" PRIx64 " size 0x%" PRIx64 "\n", offset, size);
        c->res->corruptions++;
        return 0;
    }
    uint64_t first = offset >> c->cluster_bits;
    uint64_t last = (offset + size - 1) >> c->cluster_bits;
    for (uint64_t k = first; k <= last; k++) {
        if (k >= c->refs_alloc) {
            /* Cannot happen given the bound above and refs_alloc; be safe anyway. */
            c->res->check_errors++;
            return 0;
        }
        if (c->refs[k] >= c->refs_cap) {
            say(c, "ERROR: overflow cluster offset=0x%" PRIx64 "\n", k << c->cluster_bits);
            say(c, "Use qemu-img amend to increase the refcount entry width or qemu-img convert "
                   "to create a clean copy if the image cannot be opened for writing\n");
            c->res->corruptions++;
            continue;
        }
        c->refs[k]++;
        if (k + 1 > c->nb_clusters) {
            c->nb_clusters = k + 1;
        }
    }
    return 1;
}

/* ---- header, header extensions, tables ---- */

static int parse_extensions(Chk *c, VdError **errp)
{
    Qcow2Header *h = &c->h;
    uint64_t start = h->header_length;
    /* Extensions end at the backing file name (if it is in the first cluster) or the cluster. */
    uint64_t end = c->cluster_size;
    if (h->backing_file_offset && h->backing_file_offset < end && h->backing_file_offset > start) {
        end = h->backing_file_offset;
    }
    if (start >= end) {
        return 0;
    }
    uint8_t *buf = malloc(end);
    if (!buf) {
        vd_error_setg(errp, ENOMEM, "Out of memory reading header extensions");
        return -ENOMEM;
    }
    int ret = read_padded(c, 0, end, buf);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "Could not read header extensions");
        free(buf);
        return ret;
    }
    uint64_t off = start;
    while (end - off >= 8) {
        uint32_t type = qcow2_be32(buf + off);
        uint32_t len = qcow2_be32(buf + off + 4);
        off += 8;
        if (len > end - off) {
            vd_error_setg(errp, EINVAL, "Header extension too large");
            free(buf);
            return -EINVAL;
        }
        if (type == QCOW2_EXT_END) {
            break;
        }
        const uint8_t *d = buf + off;
        if (type == QCOW2_EXT_BITMAPS) {
            if (len != 24) {
                vd_error_setg(errp, EINVAL, "bitmaps_ext: Invalid extension length");
                free(buf);
                return -EINVAL;
            }
            /* QEMU ignores the extension unless the autoclear bit says it is consistent. */
            if (h->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS) {
                c->nb_bitmaps = qcow2_be32(d);
                c->bm_dir_size = qcow2_be64(d + 8);
                c->bm_dir_offset = qcow2_be64(d + 16);
                if (c->nb_bitmaps > CHK_MAX_BITMAPS) {
                    vd_error_setg(errp, EINVAL, "bitmaps_ext: Image has %" PRIu32 " bitmaps, "
                                  "exceeding the supported maximum of %u", c->nb_bitmaps,
                                  CHK_MAX_BITMAPS);
                    free(buf);
                    return -EINVAL;
                }
                if (c->nb_bitmaps == 0) {
                    vd_error_setg(errp, EINVAL, "found bitmaps extension with zero bitmaps");
                    free(buf);
                    return -EINVAL;
                }
                if (off_in_cluster(c, c->bm_dir_offset)) {
                    vd_error_setg(errp, EINVAL, "bitmaps_ext: invalid bitmap directory offset");
                    free(buf);
                    return -EINVAL;
                }
                if (c->bm_dir_size > CHK_MAX_BITMAP_DIR_SIZE) {
                    vd_error_setg(errp, EINVAL, "bitmaps_ext: bitmap directory size (%" PRIu64
                                  ") exceeds the maximum supported size (%llu)", c->bm_dir_size,
                                  (unsigned long long)CHK_MAX_BITMAP_DIR_SIZE);
                    free(buf);
                    return -EINVAL;
                }
            }
        } else if (type == QCOW2_EXT_CRYPTO) {
            if (len != 16) {
                vd_error_setg(errp, EINVAL, "Invalid encryption header extension length");
                free(buf);
                return -EINVAL;
            }
            c->crypto_offset = qcow2_be64(d);
            c->crypto_length = qcow2_be64(d + 8);
        }
        off += ((uint64_t)len + 7) & ~7ULL;
        if (off > end) {
            break;
        }
    }
    free(buf);
    return 0;
}

static int parse_header(Chk *c, VdError **errp)
{
    Qcow2Header *h = &c->h;
    uint8_t hdr[QCOW2_HEADER_DECODE_SIZE];

    if (c->file_size < QCOW2_V2_HEADER_SIZE) {
        vd_error_setg(errp, EINVAL, "Image is not in qcow2 format (file too short)");
        return -EINVAL;
    }
    int ret = read_padded(c, 0, sizeof(hdr), hdr);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "Could not read qcow2 header");
        return ret;
    }
    qcow2_header_decode(hdr, h);

    if (h->magic != QCOW2_MAGIC) {
        vd_error_setg(errp, EINVAL, "Image is not in qcow2 format");
        return -EINVAL;
    }
    if (h->version < 2 || h->version > 3) {
        vd_error_setg(errp, EINVAL, "Unsupported qcow2 version %" PRIu32, h->version);
        return -EINVAL;
    }
    if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS || h->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
        vd_error_setg(errp, EINVAL, "Unsupported cluster size: 2^%" PRIu32, h->cluster_bits);
        return -EINVAL;
    }
    c->cluster_bits = h->cluster_bits;
    c->cluster_size = 1ULL << h->cluster_bits;

    if (h->version == 3) {
        if (h->header_length < 104) {
            vd_error_setg(errp, EINVAL, "qcow2 header too short");
            return -EINVAL;
        }
        if (h->header_length > c->cluster_size) {
            vd_error_setg(errp, EINVAL, "qcow2 header exceeds cluster size");
            return -EINVAL;
        }
    }
    if (h->backing_file_offset > c->cluster_size) {
        vd_error_setg(errp, EINVAL, "Invalid backing file offset");
        return -EINVAL;
    }
    if (h->backing_file_offset && h->backing_file_size > 1023) {
        vd_error_setg(errp, EINVAL, "Backing file name too long");
        return -EINVAL;
    }
    if (h->incompatible_features & ~QCOW2_INCOMPAT_KNOWN) {
        vd_error_setg(errp, ENOTSUP, "Unsupported qcow2 feature(s): 0x%" PRIx64,
                      (uint64_t)(h->incompatible_features & ~QCOW2_INCOMPAT_KNOWN));
        return -ENOTSUP;
    }
    if (h->refcount_order > 6) {
        vd_error_setg(errp, EINVAL,
                      "Reference count entry width too large; may not exceed 64 bits");
        return -EINVAL;
    }
    if (h->crypt_method > 2) {
        vd_error_setg(errp, EINVAL, "Unsupported encryption method: %" PRIu32, h->crypt_method);
        return -EINVAL;
    }
    if (h->compression_type > QCOW2_COMPRESSION_ZSTD ||
        ((h->compression_type != QCOW2_COMPRESSION_ZLIB) !=
         !!(h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION))) {
        vd_error_setg(errp, EINVAL, "Invalid compression type %u", h->compression_type);
        return -EINVAL;
    }

    if ((h->autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW) &&
        !(h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE)) {
        vd_error_setg(errp, EINVAL, "data-file-raw requires a data file");
        return -EINVAL;
    }
    c->extl2 = (h->incompatible_features & QCOW2_INCOMPAT_EXTL2) != 0;
    if (c->extl2 && c->cluster_bits < 14) {
        vd_error_setg(errp, EINVAL, "Extended L2 entries are only supported with cluster sizes "
                      "of at least 16384 bytes");
        return -EINVAL;
    }
    c->data_file = (h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) != 0;
    c->l2_entry_size = c->extl2 ? 16 : 8;
    c->l2_entries = c->cluster_size / c->l2_entry_size;
    c->csize_shift = 62 - (c->cluster_bits - 8);
    c->csize_mask = (1ULL << (c->cluster_bits - 8)) - 1;
    c->cluster_offset_mask = (1ULL << c->csize_shift) - 1;
    c->refcount_order = h->refcount_order;
    c->refcount_max = h->refcount_order == 6 ? UINT64_MAX
                                             : (1ULL << (1u << h->refcount_order)) - 1;
    c->refs_cap = c->refcount_max > UINT32_MAX ? UINT32_MAX : (uint32_t)c->refcount_max;
    c->rb_bits = c->cluster_bits + 3 - h->refcount_order;

    /* Reference count table */
    if (h->refcount_table_clusters > QCOW2_MAX_REFTABLE_SIZE / c->cluster_size) {
        vd_error_setg(errp, EINVAL, "Reference count table too large");
        return -EINVAL;
    }
    /* refcount_table_clusters == 0 is checkable: every refcount reads 0 (a rebuild fixes it) */
    if (off_in_cluster(c, h->refcount_table_offset) ||
        h->refcount_table_offset > (uint64_t)INT64_MAX - QCOW2_MAX_REFTABLE_SIZE) {
        vd_error_setg(errp, EINVAL, "Reference count table offset invalid");
        return -EINVAL;
    }
    /* Active L1 table */
    if (h->l1_size > QCOW2_MAX_L1_SIZE / 8) {
        vd_error_setg(errp, EINVAL, "Active L1 table too large");
        return -EINVAL;
    }
    if (off_in_cluster(c, h->l1_table_offset) ||
        h->l1_table_offset > (uint64_t)INT64_MAX - QCOW2_MAX_L1_SIZE) {
        vd_error_setg(errp, EINVAL, "Active L1 table offset invalid");
        return -EINVAL;
    }
    if (h->size > (uint64_t)INT64_MAX) {
        vd_error_setg(errp, EINVAL, "Image size too large");
        return -EINVAL;
    }
    uint64_t per_l1 = c->l2_entries << c->cluster_bits; /* bytes covered by one L2 table */
    if (div_round_up(h->size, per_l1) > h->l1_size) {
        vd_error_setg(errp, EINVAL, "L1 table is too small");
        return -EINVAL;
    }
    /* Snapshot table pointer (its contents are validated by read_snapshots) */
    if (off_in_cluster(c, h->snapshots_offset) ||
        h->snapshots_offset > (uint64_t)INT64_MAX - CHK_MAX_SNAPSHOTS_SIZE) {
        vd_error_setg(errp, EINVAL, "Snapshot table offset invalid");
        return -EINVAL;
    }
    c->l1_size = h->l1_size;
    c->l1_offset = h->l1_table_offset;
    c->reftable_offset = h->refcount_table_offset;
    c->reftable_entries = ((uint64_t)h->refcount_table_clusters << c->cluster_bits) / 8;
    c->snapshots_offset = h->snapshots_offset;
    return parse_extensions(c, errp);
}

static int load_u64_table(Chk *c, uint64_t offset, uint64_t entries, uint64_t **out)
{
    *out = NULL;
    if (entries == 0) {
        return 0;
    }
    uint64_t *t = malloc(entries * 8);
    if (!t) {
        return -ENOMEM;
    }
    int ret = read_padded(c, offset, entries * 8, t);
    if (ret < 0) {
        free(t);
        return ret;
    }
    for (uint64_t i = 0; i < entries; i++) {
        t[i] = be64toh(t[i]);
    }
    *out = t;
    return 0;
}

static void free_snapshots(Chk *c)
{
    for (uint32_t i = 0; i < c->nb_snaps; i++) {
        free(c->snaps[i].id);
        free(c->snaps[i].name);
        free(c->snaps[i].extra);
    }
    free(c->snaps);
    c->snaps = NULL;
    c->nb_snaps = 0;
}

static char *read_string(Chk *c, uint64_t off, uint32_t len, int *ret)
{
    char *s = malloc((size_t)len + 1);
    if (!s) {
        *ret = -ENOMEM;
        return NULL;
    }
    *ret = read_padded(c, off, len, s);
    if (*ret < 0) {
        free(s);
        return NULL;
    }
    s[len] = 0;
    return s;
}

/*
 * Read the snapshot table (as QEMU's check does before counting). A table that cannot be read
 * is a check error that stops the check, like qemu-img. With VD_FIX_ERRORS, overhanging snapshots
 * are discarded (c->snap_reduced) and oversized extra data is dropped; entries that need
 * rewriting are counted in c->snap_corruptions (and as corruptions).
 */
static int read_snapshots(Chk *c, VdError **errp)
{
    uint32_t nb = c->h.nb_snapshots;
    uint64_t off = c->snapshots_offset;
    bool repair = (c->fix & VD_FIX_ERRORS) != 0;
    int ret = 0;

    c->snapshots_size = 0;
    c->snap_corruptions = 0;
    c->snap_reduced = 0;
    if (nb == 0) {
        return 0;
    }
    if (nb > CHK_MAX_SNAPSHOTS) {
        if (!repair) {
            say(c, "ERROR snapshot table too large\n");
            say(c, "You can force-remove all %u overhanging snapshots with qemu-img check -r all\n",
                nb - CHK_MAX_SNAPSHOTS);
            c->res->check_errors++;
            vd_error_setg(errp, EFBIG, "Snapshot table too large (%" PRIu32 " snapshots)", nb);
            return -EFBIG;
        }
        say(c, "Discarding %u overhanging snapshots\n", nb - CHK_MAX_SNAPSHOTS);
        c->snap_reduced += nb - CHK_MAX_SNAPSHOTS;
        nb = CHK_MAX_SNAPSHOTS;
    }
    c->snaps = calloc(nb, sizeof(*c->snaps));
    if (!c->snaps) {
        c->res->check_errors++;
        vd_error_setg(errp, ENOMEM, "Out of memory reading the snapshot table");
        return -ENOMEM;
    }
    uint64_t pos = off;
    for (uint32_t i = 0; i < nb; i++) {
        ChkSnapshot *sn = &c->snaps[i];
        ret = read_padded(c, pos, sizeof(sn->hdr), sn->hdr);
        if (ret < 0) {
            goto io_fail;
        }
        c->nb_snaps = i + 1;
        sn->l1_offset = qcow2_be64(sn->hdr);
        sn->l1_size = qcow2_be32(sn->hdr + 8);
        sn->id_size = (uint16_t)((sn->hdr[12] << 8) | sn->hdr[13]);
        sn->name_size = (uint16_t)((sn->hdr[14] << 8) | sn->hdr[15]);
        uint32_t extra_size = qcow2_be32(sn->hdr + 36);
        pos += sizeof(sn->hdr);
        sn->extra_size = extra_size;
        if (extra_size > CHK_MAX_SNAPSHOT_EXTRA) {
            if (!repair) {
                say(c, "ERROR failed to read the snapshot table: Too much extra metadata in "
                       "snapshot table entry %u\n", i);
                say(c, "You can force-remove this extra metadata with qemu-img check -r all\n");
                c->res->check_errors++;
                vd_error_setg(errp, EFBIG, "Too much extra metadata in snapshot table entry %u",
                              i);
                return -EFBIG;
            }
            say(c, "Discarding too much extra metadata in snapshot table entry %u (%" PRIu32
                   " > %u)\n", i, extra_size, CHK_MAX_SNAPSHOT_EXTRA);
            c->snap_corruptions++;
            sn->extra_size = 24; /* keep only the fields this format defines */
        }
        sn->extra = calloc(1, sn->extra_size ? sn->extra_size : 1);
        if (!sn->extra) {
            ret = -ENOMEM;
            goto io_fail;
        }
        ret = read_padded(c, pos, sn->extra_size, sn->extra);
        if (ret < 0) {
            goto io_fail;
        }
        pos += extra_size;
        sn->id = read_string(c, pos, sn->id_size, &ret);
        if (!sn->id) {
            goto io_fail;
        }
        pos += sn->id_size;
        sn->name = read_string(c, pos, sn->name_size, &ret);
        if (!sn->name) {
            goto io_fail;
        }
        pos += sn->name_size;
        pos = (pos + 7) & ~7ULL;
        if (pos - off > CHK_MAX_SNAPSHOTS_SIZE) {
            if (!repair) {
                say(c, "ERROR failed to read the snapshot table: Snapshot table exceeds the "
                       "maximum supported size\n");
                c->res->check_errors++;
                vd_error_setg(errp, EFBIG, "Snapshot table exceeds the maximum supported size");
                return -EFBIG;
            }
            say(c, "Discarding %u overhanging snapshots (snapshot table is too big)\n", nb - i);
            c->snap_reduced += nb - i;
            free(sn->id);
            free(sn->name);
            free(sn->extra);
            memset(sn, 0, sizeof(*sn));
            c->nb_snaps = i;
            break;
        }
    }
    c->snapshots_size = c->nb_snaps ? pos - off : 0;
    if (c->nb_snaps < c->h.nb_snapshots && c->nb_snaps) {
        /* only the entries kept are part of the table (the rest leaks until repaired) */
        uint64_t p2 = off;
        for (uint32_t i = 0; i < c->nb_snaps; i++) {
            ChkSnapshot *sn = &c->snaps[i];
            p2 += 40 + (uint64_t)qcow2_be32(sn->hdr + 36) + sn->id_size + sn->name_size;
            p2 = (p2 + 7) & ~7ULL;
        }
        c->snapshots_size = p2 - off;
    }
    c->res->corruptions += c->snap_corruptions;
    if (c->h.version >= 3) {
        /* v3 entries need at least vm_state_size_large and disk_size as extra data */
        for (uint32_t i = 0; i < c->nb_snaps; i++) {
            if (c->snaps[i].extra_size < 16) {
                c->res->corruptions++;
                c->snap_corruptions++;
                say(c, "%s snapshot table entry %u is incomplete\n",
                    repair ? "Repairing" : "ERROR", i);
            }
        }
    }
    return 0;

io_fail:
    say(c, "ERROR failed to read the snapshot table: %s\n", strerror(-ret));
    c->res->check_errors++;
    vd_error_setg_errno(errp, -ret, "Could not read the snapshot table");
    return ret;
}

/* With repair: lower the header's snapshot count to what was kept (the tail leaks). */
static int write_snapshot_count(Chk *c)
{
    uint8_t b[4];
    qcow2_put_be32(b, c->nb_snaps);
    int ret = vd_pwrite(c->file, 60, 4, b, 0);
    if (ret == 0) {
        ret = vd_flush(c->file);
    }
    if (ret < 0) {
        say(c, "ERROR failed to update the snapshot count in the image header: %s\n",
            strerror(-ret));
        c->res->check_errors++;
        return ret;
    }
    c->h.nb_snapshots = c->nb_snaps;
    c->res->corruptions_fixed += (int)c->snap_reduced;
    return 0;
}

/* ---- counting references ---- */

static Qcow2ClusterType l2_type(Chk *c, uint64_t e)
{
    if (e & QCOW2_OFLAG_COMPRESSED) {
        return QCOW2_CLUSTER_COMPRESSED;
    }
    if ((e & QCOW2_OFLAG_ZERO) && !c->extl2) {
        return (e & QCOW2_L2E_OFFSET_MASK) ? QCOW2_CLUSTER_ZERO_ALLOC : QCOW2_CLUSTER_ZERO_PLAIN;
    }
    if (!(e & QCOW2_L2E_OFFSET_MASK)) {
        /* With an external data file, offset 0 plus COPIED is a real (identity-mapped) cluster. */
        if (c->data_file && (e & QCOW2_OFLAG_COPIED)) {
            return QCOW2_CLUSTER_NORMAL;
        }
        return QCOW2_CLUSTER_UNALLOCATED;
    }
    return QCOW2_CLUSTER_NORMAL;
}

static inline bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return alen != 0 && blen != 0 && a < b + blen && b < a + alen;
}

/* Does [off, off+len) touch metadata a repair must never overwrite (active L2s excepted)? */
static bool overlaps_metadata(Chk *c, uint64_t off, uint64_t len)
{
#define OVL(o, l) ranges_overlap(off, len, (o), (l))
    if (off < c->cluster_size) {
        return true;
    }
    if (OVL(c->l1_offset, (uint64_t)c->l1_size * 8) ||
        OVL(c->reftable_offset, c->reftable_entries * 8) ||
        OVL(c->snapshots_offset, c->snapshots_size) ||
        OVL(c->bm_dir_offset, c->bm_dir_size)) {
        return true;
    }
    for (uint64_t i = 0; i < c->reftable_entries; i++) {
        uint64_t rb = c->reftable[i] & QCOW2_REFT_OFFSET_MASK;
        if (rb && OVL(rb, c->cluster_size)) {
            return true;
        }
    }
    for (uint32_t i = 0; i < c->nb_snaps; i++) {
        if (OVL(c->snaps[i].l1_offset, (uint64_t)c->snaps[i].l1_size * 8)) {
            return true;
        }
    }
    return false;
#undef OVL
}

/* Replace L2 entry i (an unaligned preallocated zero cluster) by a plain zero cluster. */
static int fix_l2_entry_by_zero(Chk *c, uint64_t l2_offset, uint8_t *l2, uint64_t i)
{
    uint8_t *p = l2 + i * c->l2_entry_size;
    if (c->extl2) {
        qcow2_put_be64(p, 0);
        qcow2_put_be64(p + 8, QCOW2_L2_BITMAP_ALL_ZEROES);
    } else {
        qcow2_put_be64(p, QCOW2_OFLAG_ZERO);
    }
    uint64_t at = l2_offset + i * c->l2_entry_size;
    if (off_in_cluster(c, l2_offset) || overlaps_metadata(c, l2_offset, c->cluster_size)) {
        say(c, "ERROR: Overlap check failed\n");
        c->res->check_errors++;
        return -EIO;
    }
    int ret = write_file(c, at, c->l2_entry_size, p);
    if (ret < 0) {
        say(c, "ERROR: Failed to overwrite L2 table entry: %s\n", strerror(-ret));
        c->res->check_errors++;
        return ret;
    }
    c->res->corruptions--;
    c->res->corruptions_fixed++;
    return 0;
}

static int check_l2(Chk *c, uint64_t l2_offset, bool frag, uint8_t *l2)
{
    VdCheckResult *res = c->res;
    int ret = read_padded(c, l2_offset, c->cluster_size, l2);
    if (ret < 0) {
        say(c, "ERROR: I/O error in check_refcounts_l2\n");
        res->check_errors++;
        return ret;
    }
    uint64_t next_contiguous = 0;
    for (uint64_t i = 0; i < c->l2_entries; i++) {
        const uint8_t *p = l2 + i * c->l2_entry_size;
        uint64_t e = qcow2_be64(p);
        uint64_t bm = c->extl2 ? qcow2_be64(p + 8) : 0;
        Qcow2ClusterType type = l2_type(c, e);

        if (type != QCOW2_CLUSTER_COMPRESSED && (e & CHK_L2E_STD_RESERVED_MASK)) {
            say(c, "ERROR found l2 entry with reserved bits set: %" PRIx64 "\n", e);
            res->corruptions++;
        }
        switch (type) {
        case QCOW2_CLUSTER_COMPRESSED: {
            if (e & QCOW2_OFLAG_COPIED) {
                say(c, "ERROR: coffset=0x%" PRIx64 ": copied flag must never be set for "
                       "compressed clusters\n", e & c->cluster_offset_mask);
                e &= ~QCOW2_OFLAG_COPIED;
                res->corruptions++;
            }
            if (c->data_file) {
                say(c, "ERROR compressed cluster %" PRIu64 " with data file, entry=0x%" PRIx64
                       "\n", i, e);
                res->corruptions++;
                break;
            }
            if (bm) {
                say(c, "ERROR compressed cluster %" PRIu64 " with non-zero subcluster allocation "
                       "bitmap, entry=0x%" PRIx64 "\n", i, e);
                res->corruptions++;
                break;
            }
            uint64_t coff, csize;
            qcow2_compressed_extent(e & ~(QCOW2_OFLAG_COPIED | QCOW2_OFLAG_COMPRESSED),
                                    c->cluster_bits, &coff, &csize);
            inc_refs(c, coff, csize);
            if (frag) {
                res->allocated_clusters++;
                res->compressed_clusters++;
                /* Compressed clusters are fragmented by nature (sub-sector placement). */
                res->fragmented_clusters++;
            }
            break;
        }
        case QCOW2_CLUSTER_ZERO_ALLOC:
        case QCOW2_CLUSTER_NORMAL: {
            uint64_t offset = e & QCOW2_L2E_OFFSET_MASK;
            if ((bm >> 32) & bm) {
                res->corruptions++;
                say(c, "ERROR offset=%" PRIx64 ": Allocated cluster has corrupted subcluster "
                       "allocation bitmap\n", offset);
            }
            if (off_in_cluster(c, offset)) {
                bool has_data = c->extl2 ? (bm & QCOW2_L2_BITMAP_ALL_ALLOC) != 0
                                         : !(e & QCOW2_OFLAG_ZERO);
                res->corruptions++;
                if (!has_data) {
                    bool fixing = (c->fix & VD_FIX_ERRORS) != 0;
                    say(c, "%s offset=%" PRIx64 ": Preallocated cluster is not properly aligned; "
                           "L2 entry corrupted.\n", fixing ? "Repairing" : "ERROR", offset);
                    if (fixing && fix_l2_entry_by_zero(c, l2_offset, l2, i) == 0) {
                        continue; /* the cluster is not referenced any more */
                    }
                } else {
                    say(c, "ERROR offset=%" PRIx64 ": Data cluster is not properly aligned; L2 "
                           "entry corrupted.\n", offset);
                }
            }
            if (frag) {
                res->allocated_clusters++;
                if (next_contiguous && offset != next_contiguous) {
                    res->fragmented_clusters++;
                }
                next_contiguous = offset + c->cluster_size;
            }
            if (!c->data_file) {
                inc_refs(c, offset, c->cluster_size);
            }
            break;
        }
        case QCOW2_CLUSTER_ZERO_PLAIN:
            break;
        case QCOW2_CLUSTER_UNALLOCATED:
            if (bm & QCOW2_L2_BITMAP_ALL_ALLOC) {
                res->corruptions++;
                say(c, "ERROR: Unallocated cluster has non-zero subcluster allocation map\n");
            }
            break;
        }
    }
    return 0;
}

static int check_l1(Chk *c, uint64_t l1_offset, uint32_t l1_size, bool active, uint8_t *l2buf)
{
    VdCheckResult *res = c->res;
    uint64_t *l1 = NULL;
    int ret = 0;

    if (!l1_size) {
        return 0;
    }
    inc_refs(c, l1_offset, (uint64_t)l1_size * 8);
    /*
     * Entries past EOF read as zero (unused): only look at the part inside the file, so that
     * many snapshots pointing past EOF cost nothing.
     */
    uint32_t in_file = 0;
    if (l1_offset < c->file_size) {
        uint64_t n = div_round_up(c->file_size - l1_offset, 8);
        in_file = n < l1_size ? (uint32_t)n : l1_size;
    }
    if (active) {
        l1 = c->l1;
    } else {
        ret = load_u64_table(c, l1_offset, in_file, &l1);
        if (ret < 0) {
            say(c, "ERROR: I/O error in check_refcounts_l1\n");
            res->check_errors++;
            return ret;
        }
    }
    for (uint32_t i = 0; i < in_file; i++) {
        if (!l1[i]) {
            continue;
        }
        if (l1[i] & QCOW2_L1E_RESERVED_MASK) {
            say(c, "ERROR found L1 entry with reserved bits set: %" PRIx64 "\n", l1[i]);
            res->corruptions++;
        }
        uint64_t l2_offset = l1[i] & QCOW2_L1E_OFFSET_MASK;
        inc_refs(c, l2_offset, c->cluster_size);
        if (off_in_cluster(c, l2_offset)) {
            say(c, "ERROR l2_offset=%" PRIx64 ": Table is not cluster aligned; L1 entry "
                   "corrupted\n", l2_offset);
            res->corruptions++;
        }
        ret = check_l2(c, l2_offset, active, l2buf);
        if (ret < 0) {
            break;
        }
    }
    if (!active) {
        free(l1);
    }
    return ret;
}

static int check_bitmaps(Chk *c)
{
    VdCheckResult *res = c->res;
    if (c->nb_bitmaps == 0) {
        return 0;
    }
    inc_refs(c, c->bm_dir_offset, c->bm_dir_size);
    if (c->bm_dir_size < CHK_BITMAP_DIR_ENTRY_SIZE) {
        say(c, "ERROR bitmap directory too small\n");
        res->corruptions++;
        return 0;
    }
    uint8_t *dir = malloc(c->bm_dir_size);
    if (!dir) {
        res->check_errors++;
        return -ENOMEM;
    }
    int ret = read_padded(c, c->bm_dir_offset, c->bm_dir_size, dir);
    if (ret < 0) {
        say(c, "ERROR: could not read the bitmap directory: %s\n", strerror(-ret));
        res->check_errors++;
        free(dir);
        return ret;
    }
    uint64_t pos = 0;
    for (uint32_t n = 0; n < c->nb_bitmaps; n++) {
        if (c->bm_dir_size - pos < CHK_BITMAP_DIR_ENTRY_SIZE) {
            say(c, "ERROR bitmap directory is truncated (bitmap %u)\n", n);
            res->corruptions++;
            break;
        }
        const uint8_t *e = dir + pos;
        uint64_t table_offset = qcow2_be64(e);
        uint32_t table_size = qcow2_be32(e + 8);
        uint16_t name_size = (uint16_t)((e[18] << 8) | e[19]);
        uint32_t extra_size = qcow2_be32(e + 20);
        uint64_t entry_len = ((uint64_t)CHK_BITMAP_DIR_ENTRY_SIZE + extra_size + name_size + 7) &
                             ~7ULL;
        if (entry_len > c->bm_dir_size - pos) {
            say(c, "ERROR bitmap directory entry %u exceeds the directory\n", n);
            res->corruptions++;
            break;
        }
        pos += entry_len;

        uint64_t table_bytes = (uint64_t)table_size * 8;
        /* As QEMU: a bitmap may cover at most 64 MiB of bitmap data (bounds the table too). */
        if (off_in_cluster(c, table_offset) || table_size == 0 ||
            (uint64_t)table_size * c->cluster_size > CHK_MAX_BITMAP_DATA ||
            table_offset > (uint64_t)INT64_MAX) {
            say(c, "ERROR bitmap %u has an invalid bitmap table (offset 0x%" PRIx64 ", %" PRIu32
                   " entries)\n", n, table_offset, table_size);
            res->corruptions++;
            continue;
        }
        inc_refs(c, table_offset, table_bytes);
        uint64_t *table = NULL;
        ret = load_u64_table(c, table_offset, table_size, &table);
        if (ret < 0) {
            say(c, "ERROR: could not read bitmap table %u: %s\n", n, strerror(-ret));
            res->corruptions++;
            ret = 0;
            continue;
        }
        for (uint32_t i = 0; i < table_size; i++) {
            uint64_t te = table[i];
            uint64_t off = te & CHK_BME_OFFSET_MASK;
            if ((te & CHK_BME_RESERVED_MASK) || (off && (te & CHK_BME_ALL_ONES)) ||
                off_in_cluster(c, off)) {
                res->corruptions++;
                continue;
            }
            if (off) {
                inc_refs(c, off, c->cluster_size);
            }
        }
        free(table);
    }
    free(dir);
    return ret;
}

/* Would the refcount block in reftable entry i be counted (and thus part of the structure)? */
static bool refblock_usable(Chk *c, uint64_t i, uint64_t file_clusters)
{
    uint64_t off = c->reftable[i] & QCOW2_REFT_OFFSET_MASK;
    return !(c->reftable[i] & CHK_REFT_RESERVED_MASK) && !off_in_cluster(c, off) &&
           (off >> c->cluster_bits) < file_clusters && off != 0;
}

static int check_refblocks(Chk *c, bool *rebuild)
{
    VdCheckResult *res = c->res;
    uint64_t file_clusters = div_round_up(c->file_size, c->cluster_size);
    for (uint64_t i = 0; i < c->reftable_entries; i++) {
        uint64_t off = c->reftable[i] & QCOW2_REFT_OFFSET_MASK;
        uint64_t cluster = off >> c->cluster_bits;
        if (c->reftable[i] & CHK_REFT_RESERVED_MASK) {
            say(c, "ERROR refcount table entry %" PRIu64 " has reserved bits set\n", i);
            res->corruptions++;
            *rebuild = true;
            continue;
        }
        if (off_in_cluster(c, off)) {
            say(c, "ERROR refcount block %" PRIu64 " is not cluster aligned; refcount table entry "
                   "corrupted\n", i);
            res->corruptions++;
            *rebuild = true;
            continue;
        }
        if (cluster >= file_clusters) {
            /* QEMU grows the file here; we rebuild instead (never write beyond EOF blindly). */
            say(c, "ERROR refcount block %" PRIu64 " is outside image\n", i);
            res->corruptions++;
            if (c->fix & VD_FIX_ERRORS) {
                *rebuild = true;
            }
            continue;
        }
        if (off) {
            inc_refs(c, off, c->cluster_size);
            if (c->refs[cluster] != 1) {
                say(c, "ERROR refcount block %" PRIu64 " refcount=%" PRIu32 "\n", i,
                    c->refs[cluster]);
                res->corruptions++;
                *rebuild = true;
            }
        }
    }
    return 0;
}

/* Fill c->refs from scratch (the in-memory refcount table). */
static int calculate_refcounts(Chk *c, bool *rebuild)
{
    VdCheckResult *res = c->res;
    int ret;

    uint64_t file_clusters = div_round_up(c->file_size, c->cluster_size);
    uint64_t want = file_clusters + 2;
    if (want > CHK_MAX_CLUSTERS) {
        res->check_errors++;
        return -EFBIG;
    }
    if (want > c->refs_alloc) {
        uint32_t *n = realloc(c->refs, want * sizeof(uint32_t));
        if (!n) {
            res->check_errors++;
            return -ENOMEM;
        }
        c->refs = n;
        c->refs_alloc = want;
    }
    memset(c->refs, 0, c->refs_alloc * sizeof(uint32_t));
    c->nb_clusters = file_clusters;

    uint8_t *l2buf = malloc(c->cluster_size);
    if (!l2buf) {
        res->check_errors++;
        return -ENOMEM;
    }
    /* header cluster (holds the header extensions and the backing file name too) */
    inc_refs(c, 0, c->cluster_size);

    ret = check_l1(c, c->l1_offset, c->l1_size, true, l2buf);
    if (ret < 0) {
        goto out;
    }
    if (c->data_file && c->nb_snaps) {
        say(c, "ERROR %u snapshots in image with data file\n", c->nb_snaps);
        res->corruptions++;
    }
    for (uint32_t i = 0; i < c->nb_snaps; i++) {
        ChkSnapshot *sn = &c->snaps[i];
        if (off_in_cluster(c, sn->l1_offset)) {
            say(c, "ERROR snapshot %s (%s) l1_offset=%#" PRIx64 ": L1 table is not cluster "
                   "aligned; snapshot table entry corrupted\n", sn->id, sn->name, sn->l1_offset);
            res->corruptions++;
            continue;
        }
        if (sn->l1_size > QCOW2_MAX_L1_SIZE / 8) {
            say(c, "ERROR snapshot %s (%s) l1_size=%#" PRIx32 ": L1 table is too large; snapshot "
                   "table entry corrupted\n", sn->id, sn->name, sn->l1_size);
            res->corruptions++;
            continue;
        }
        ret = check_l1(c, sn->l1_offset, sn->l1_size, false, l2buf);
        if (ret < 0) {
            goto out;
        }
    }
    inc_refs(c, c->snapshots_offset, c->snapshots_size);
    inc_refs(c, c->reftable_offset, c->reftable_entries * 8);
    if (c->h.crypt_method && c->crypto_length) {
        inc_refs(c, c->crypto_offset, c->crypto_length);
    }
    ret = check_bitmaps(c);
    if (ret < 0) {
        goto out;
    }
    ret = check_refblocks(c, rebuild);
out:
    free(l2buf);
    return ret;
}

/*
 * Compare stored and computed refcounts. With fix, repair mismatches in place (leaks with
 * VD_FIX_LEAKS, too-low refcounts with VD_FIX_ERRORS). A stored refcount of 0 for a used cluster
 * means its refcount block may be missing: that needs a rebuild.
 */
static void compare_refcounts(Chk *c, int fix, bool *rebuild, uint64_t *highest)
{
    VdCheckResult *res = c->res;
    *highest = 0;
    for (uint64_t i = 0; i < c->nb_clusters; i++) {
        uint64_t r1, r2 = c->refs[i];
        int ret = stored_refcount(c, i, &r1);
        if (ret < 0) {
            say(c, "Can't get refcount for cluster %" PRIu64 ": %s\n", i, strerror(-ret));
            res->check_errors++;
            continue;
        }
        if (r1 > 0 || r2 > 0) {
            *highest = i;
        }
        if (r1 == r2) {
            continue;
        }
        int *num_fixed = NULL;
        if (r1 == 0) {
            *rebuild = true;
        } else if (r1 > r2 && (fix & VD_FIX_LEAKS)) {
            num_fixed = &res->leaks_fixed;
        } else if (r1 < r2 && (fix & VD_FIX_ERRORS)) {
            num_fixed = &res->corruptions_fixed;
        }
        say(c, "%s cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64 "\n",
            num_fixed ? "Repairing" : r1 < r2 ? "ERROR" : "Leaked", i, r1, r2);
        if (num_fixed && set_stored_refcount(c, i, r2) == 0) {
            (*num_fixed)++;
            continue;
        }
        if (r1 < r2) {
            res->corruptions++;
        } else {
            res->leaks++;
        }
    }
}

/*
 * Write a complete new refcount structure past the end of the file (never over anything that may
 * still be in use, including the old refcount structure), flush, then point the header at it.
 * The new structure counts what calculate_refcounts found minus the old refcount structure.
 */
static int rebuild_refcounts(Chk *c)
{
    VdCheckResult *res = c->res;
    uint64_t cs = c->cluster_size;
    uint64_t file_clusters = div_round_up(c->file_size, cs);
    uint8_t *block = NULL;
    uint64_t *table = NULL;
    int ret;

    /* Forget the old structure's own references: it becomes free space. */
    if (c->reftable_entries) {
        uint64_t bytes = c->reftable_entries * 8;
        uint64_t o = c->reftable_offset;
        if (!(o + bytes > c->file_size && o + bytes - c->file_size >= cs)) {
            for (uint64_t k = o >> c->cluster_bits; k <= (o + bytes - 1) >> c->cluster_bits; k++) {
                if (k < c->refs_alloc && c->refs[k]) {
                    c->refs[k]--;
                }
            }
        }
    }
    for (uint64_t i = 0; i < c->reftable_entries; i++) {
        if (refblock_usable(c, i, file_clusters)) {
            uint64_t k = (c->reftable[i] & QCOW2_REFT_OFFSET_MASK) >> c->cluster_bits;
            if (k < c->refs_alloc && c->refs[k]) {
                c->refs[k]--;
            }
        }
    }

    uint64_t e = file_clusters > c->nb_clusters ? file_clusters : c->nb_clusters;
    uint64_t per_rb = 1ULL << c->rb_bits;
    uint64_t nrb = 0, nrt = 0, prev;
    do {
        prev = nrb + nrt;
        nrb = div_round_up(e + nrb + nrt, per_rb);
        nrt = div_round_up(nrb * 8, cs);
    } while (nrb + nrt != prev);
    if (nrt * cs > QCOW2_MAX_REFTABLE_SIZE) {
        say(c, "ERROR allocating reftable: %s\n", strerror(EFBIG));
        res->check_errors++;
        return -EFBIG;
    }
    uint64_t new_end = (e + nrb + nrt) * cs;
    uint64_t rt_offset = (e + nrb) * cs;

    block = malloc(cs);
    table = calloc(nrt * cs / 8, 8);
    if (!block || !table) {
        res->check_errors++;
        ret = -ENOMEM;
        goto out;
    }
    VdError *local_err = NULL;
    ret = vd_truncate(c->file, new_end, false, VD_PREALLOC_OFF, &local_err);
    if (ret < 0) {
        say(c, "ERROR allocating refblock: %s\n", vd_error_msg(local_err));
        vd_error_free(local_err);
        res->check_errors++;
        goto out;
    }
    int64_t len = vd_getlength(c->file);
    if (len < 0 || (uint64_t)len < new_end) {
        ret = len < 0 ? (int)len : -EIO;
        say(c, "ERROR allocating refblock: file did not grow\n");
        res->check_errors++;
        goto out;
    }
    c->file_size = (uint64_t)len;
    c->rb_valid = false;
    c->rb_dirty = false;

    for (uint64_t b = 0; b < nrb; b++) {
        memset(block, 0, cs);
        for (uint64_t j = 0; j < per_rb; j++) {
            uint64_t k = b * per_rb + j;
            uint64_t v = 0;
            if (k >= e && k < e + nrb + nrt) {
                v = 1;
            } else if (k < e && k < c->refs_alloc) {
                v = c->refs[k];
            }
            if (v) {
                rb_set(block, j, c->refcount_order, v);
            }
        }
        uint64_t rb_off = (e + b) * cs;
        ret = vd_pwrite(c->file, rb_off, cs, block, 0);
        if (ret < 0) {
            say(c, "ERROR writing refblock: %s\n", strerror(-ret));
            res->check_errors++;
            goto out;
        }
        table[b] = htobe64(rb_off);
    }
    ret = vd_pwrite(c->file, rt_offset, nrt * cs, table, 0);
    if (ret < 0) {
        say(c, "ERROR writing reftable: %s\n", strerror(-ret));
        res->check_errors++;
        goto out;
    }
    ret = vd_flush(c->file);
    if (ret < 0) {
        say(c, "ERROR writing reftable: %s\n", strerror(-ret));
        res->check_errors++;
        goto out;
    }
    uint8_t hp[12];
    qcow2_put_be64(hp, rt_offset);
    qcow2_put_be32(hp + 8, (uint32_t)nrt);
    ret = vd_pwrite(c->file, 48, sizeof(hp), hp, 0);
    if (ret == 0) {
        ret = vd_flush(c->file);
    }
    if (ret < 0) {
        say(c, "ERROR setting reftable: %s\n", strerror(-ret));
        res->check_errors++;
        goto out;
    }
    /* Switch the in-memory view to the new structure. */
    for (uint64_t i = 0; i < nrt * cs / 8; i++) {
        table[i] = be64toh(table[i]);
    }
    free(c->reftable);
    c->reftable = table;
    table = NULL;
    c->reftable_entries = nrt * cs / 8;
    c->reftable_offset = rt_offset;
    c->h.refcount_table_offset = rt_offset;
    c->h.refcount_table_clusters = (uint32_t)nrt;
    ret = 0;
out:
    free(block);
    free(table);
    return ret;
}

/* OFLAG_COPIED must be set exactly when the stored refcount is 1 (active L1 and its L2s). */
static int check_oflag_copied(Chk *c, int fix)
{
    VdCheckResult *res = c->res;
    /* With only leak fixing allowed, flip flags only on an otherwise clean image (as QEMU). */
    bool fixing = (fix & VD_FIX_ERRORS) ||
                  ((fix & VD_FIX_LEAKS) && !res->check_errors && !res->corruptions && !res->leaks);
    uint8_t *l2 = malloc(c->cluster_size);
    int ret = 0;
    if (!l2) {
        res->check_errors++;
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < c->l1_size; i++) {
        uint64_t l1e = c->l1[i];
        uint64_t l2_offset = l1e & QCOW2_L1E_OFFSET_MASK;
        uint64_t refcount;
        bool l2_dirty = false;
        if (!l2_offset) {
            continue;
        }
        if (stored_refcount(c, l2_offset >> c->cluster_bits, &refcount) < 0) {
            continue; /* already reported by compare_refcounts */
        }
        if ((refcount == 1) != ((l1e & QCOW2_OFLAG_COPIED) != 0)) {
            say(c, "%s OFLAG_COPIED L2 cluster: l1_index=%" PRIu32 " l1_entry=%" PRIx64
                   " refcount=%" PRIu64 "\n", fixing ? "Repairing" : "ERROR", i, l1e, refcount);
            if (fixing) {
                uint64_t ne = refcount == 1 ? l1e | QCOW2_OFLAG_COPIED : l1e & ~QCOW2_OFLAG_COPIED;
                uint8_t b[8];
                qcow2_put_be64(b, ne);
                ret = write_file(c, c->l1_offset + (uint64_t)i * 8, 8, b);
                if (ret < 0) {
                    say(c, "ERROR: Could not write L1 entry: %s\n", strerror(-ret));
                    res->check_errors++;
                    goto out;
                }
                c->l1[i] = ne;
                res->corruptions_fixed++;
            } else {
                res->corruptions++;
            }
        }
        ret = read_padded(c, l2_offset, c->cluster_size, l2);
        if (ret < 0) {
            say(c, "ERROR: Could not read L2 table: %s\n", strerror(-ret));
            res->check_errors++;
            goto out;
        }
        for (uint64_t j = 0; j < c->l2_entries; j++) {
            uint8_t *p = l2 + j * c->l2_entry_size;
            uint64_t e = qcow2_be64(p);
            Qcow2ClusterType t = l2_type(c, e);
            if (t != QCOW2_CLUSTER_NORMAL && t != QCOW2_CLUSTER_ZERO_ALLOC) {
                continue;
            }
            if (c->data_file) {
                continue; /* data clusters live in the data file: not refcounted */
            }
            uint64_t data_offset = e & QCOW2_L2E_OFFSET_MASK;
            if (stored_refcount(c, data_offset >> c->cluster_bits, &refcount) < 0) {
                continue;
            }
            if ((refcount == 1) != ((e & QCOW2_OFLAG_COPIED) != 0)) {
                say(c, "%s OFLAG_COPIED data cluster: l2_entry=%" PRIx64 " refcount=%" PRIu64
                       "\n", fixing ? "Repairing" : "ERROR", e, refcount);
                if (fixing) {
                    qcow2_put_be64(p, refcount == 1 ? e | QCOW2_OFLAG_COPIED
                                                    : e & ~QCOW2_OFLAG_COPIED);
                    l2_dirty = true;
                    res->corruptions_fixed++;
                } else {
                    res->corruptions++;
                }
            }
        }
        if (l2_dirty) {
            if (off_in_cluster(c, l2_offset) || overlaps_metadata(c, l2_offset, c->cluster_size)) {
                say(c, "ERROR: Could not write L2 table; metadata overlap check failed: %s\n",
                    strerror(EIO));
                res->check_errors++;
                ret = -EIO;
                goto out;
            }
            ret = write_file(c, l2_offset, c->cluster_size, l2);
            if (ret < 0) {
                say(c, "ERROR: Could not write L2 table: %s\n", strerror(-ret));
                res->check_errors++;
                goto out;
            }
        }
    }
    ret = 0;
out:
    free(l2);
    return ret;
}

/* Is stored-refcount cluster k backed by a usable refcount block (so its refcount can be set)? */
static bool has_refblock(Chk *c, uint64_t k)
{
    uint64_t rt = k >> c->rb_bits;
    if (rt >= c->reftable_entries) {
        return false;
    }
    uint64_t file_clusters = div_round_up(c->file_size, c->cluster_size);
    return refblock_usable(c, rt, file_clusters);
}

/*
 * Write the kept snapshot entries (extra data completed to the 24 bytes v3 defines, oversized
 * extra data dropped) to free clusters, account them, switch the header, then release the old
 * table. Only clusters that nothing references and whose stored refcount is 0 are used.
 */
static int rewrite_snapshot_table(Chk *c)
{
    VdCheckResult *res = c->res;
    uint64_t cs = c->cluster_size;
    uint64_t size = 0;
    uint8_t *buf = NULL;
    int ret;

    for (uint32_t i = 0; i < c->nb_snaps; i++) {
        ChkSnapshot *sn = &c->snaps[i];
        uint32_t ext = sn->extra_size < 24 ? 24 : sn->extra_size;
        size += 40 + (uint64_t)ext + sn->id_size + sn->name_size;
        size = (size + 7) & ~7ULL;
    }
    uint64_t n = div_round_up(size, cs);
    uint64_t start = 0;
    if (n) {
        buf = calloc(n, cs);
        if (!buf) {
            res->check_errors++;
            return -ENOMEM;
        }
        uint64_t p = 0;
        for (uint32_t i = 0; i < c->nb_snaps; i++) {
            ChkSnapshot *sn = &c->snaps[i];
            uint32_t ext = sn->extra_size < 24 ? 24 : sn->extra_size;
            uint8_t *e = buf + p;
            memcpy(e, sn->hdr, 40);
            qcow2_put_be32(e + 36, ext);
            memcpy(e + 40, sn->extra, sn->extra_size);
            if (sn->extra_size < 8) {
                qcow2_put_be64(e + 40, qcow2_be32(sn->hdr + 32)); /* vm_state_size_large */
            }
            if (sn->extra_size < 16) {
                qcow2_put_be64(e + 48, c->h.size); /* disk_size: the current size */
            }
            if (sn->extra_size < 24) {
                qcow2_put_be64(e + 56, UINT64_MAX); /* icount: unknown */
            }
            p += 40 + ext;
            memcpy(buf + p, sn->id, sn->id_size);
            p += sn->id_size;
            memcpy(buf + p, sn->name, sn->name_size);
            p += sn->name_size;
            p = (p + 7) & ~7ULL;
        }
        /* find n free clusters whose refcounts can be recorded */
        uint64_t file_clusters = div_round_up(c->file_size, cs);
        uint64_t limit = (file_clusters > c->nb_clusters ? file_clusters : c->nb_clusters) + n;
        uint64_t run = 0;
        for (uint64_t k = 1; k < limit && run < n; k++) {
            uint64_t stored = 1;
            bool ok = (k >= c->refs_alloc || c->refs[k] == 0) && has_refblock(c, k) &&
                      stored_refcount(c, k, &stored) == 0 && stored == 0;
            run = ok ? run + 1 : 0;
            if (run == n) {
                start = k + 1 - n;
            }
        }
        if (run < n) {
            say(c, "ERROR failed to update snapshot table: %s\n", strerror(ENOSPC));
            res->check_errors++;
            free(buf);
            return -ENOSPC;
        }
        uint64_t end = (start + n) * cs;
        if (end > c->file_size) {
            VdError *lerr = NULL;
            ret = vd_truncate(c->file, end, false, VD_PREALLOC_OFF, &lerr);
            vd_error_free(lerr);
            int64_t len = vd_getlength(c->file);
            if (ret < 0 || len < 0 || (uint64_t)len < end) {
                ret = ret < 0 ? ret : -EIO;
                goto fail;
            }
            c->file_size = (uint64_t)len;
        }
        for (uint64_t k = start; k < start + n; k++) {
            ret = set_stored_refcount(c, k, 1);
            if (ret < 0) {
                goto fail;
            }
        }
        ret = rb_writeback(c);
        if (ret == 0) {
            ret = write_file(c, start * cs, n * cs, buf);
        }
        if (ret == 0) {
            ret = vd_flush(c->file);
        }
        if (ret < 0) {
            goto fail;
        }
    }
    uint8_t hp[12];
    qcow2_put_be32(hp, c->nb_snaps);
    qcow2_put_be64(hp + 4, start * cs);
    ret = vd_pwrite(c->file, 60, sizeof(hp), hp, 0);
    if (ret == 0) {
        ret = vd_flush(c->file);
    }
    if (ret < 0) {
        goto fail;
    }
    /* the old table is no longer referenced: release the clusters it was counted in */
    uint64_t o = c->snapshots_offset, sz = c->snapshots_size;
    if (sz && !(o + sz > c->file_size && o + sz - c->file_size >= cs)) {
        for (uint64_t k = o >> c->cluster_bits; k <= (o + sz - 1) >> c->cluster_bits; k++) {
            uint64_t r;
            if (stored_refcount(c, k, &r) == 0 && r > 0) {
                set_stored_refcount(c, k, r - 1);
            }
        }
        rb_writeback(c);
        vd_flush(c->file);
    }
    c->snapshots_offset = start * cs;
    c->snapshots_size = size;
    c->h.nb_snapshots = c->nb_snaps;
    res->corruptions_fixed += c->snap_corruptions;
    res->corruptions -= c->snap_corruptions;
    c->snap_corruptions = 0;
    free(buf);
    return 0;
fail:
    say(c, "ERROR failed to update snapshot table: %s\n", strerror(-ret));
    res->check_errors++;
    free(buf);
    return ret;
}

/* ---- one check pass ---- */

static void chk_free_tables(Chk *c)
{
    free(c->reftable);
    c->reftable = NULL;
    free(c->l1);
    c->l1 = NULL;
    free_snapshots(c);
    free(c->refs);
    c->refs = NULL;
    c->refs_alloc = 0;
    free(c->rb_buf);
    c->rb_buf = NULL;
    c->rb_valid = false;
}

/* Load header and tables; refusals and unreadable tables set errp. */
static int chk_load(Chk *c, VdError **errp)
{
    int64_t len = vd_getlength(c->file);
    if (len < 0) {
        c->res->check_errors++;
        vd_error_setg_errno(errp, (int)-len, "Could not get the image file length");
        return (int)len;
    }
    c->file_size = (uint64_t)len;
    int ret = parse_header(c, errp);
    if (ret < 0) {
        return ret;
    }
    c->rb_buf = malloc(c->cluster_size);
    if (!c->rb_buf) {
        c->res->check_errors++;
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    ret = load_u64_table(c, c->reftable_offset, c->reftable_entries, &c->reftable);
    if (ret < 0) {
        c->res->check_errors++;
        vd_error_setg_errno(errp, -ret, "Could not read the refcount table");
        return ret;
    }
    ret = load_u64_table(c, c->l1_offset, c->l1_size, &c->l1);
    if (ret < 0) {
        c->res->check_errors++;
        vd_error_setg_errno(errp, -ret, "Could not read the L1 table");
        return ret;
    }
    return read_snapshots(c, errp);
}

static int chk_pass(Chk *c, int fix, VdError **errp)
{
    VdCheckResult *res = c->res;
    bool rebuild = false;
    uint64_t highest = 0;
    int ret;

    c->fix = fix;
    ret = chk_load(c, errp);
    if (ret < 0) {
        return ret;
    }
    if (c->snap_reduced) {
        ret = write_snapshot_count(c);
        if (ret < 0) {
            vd_error_setg_errno(errp, -ret, "Could not update the snapshot count");
            return ret;
        }
    }
    if (c->file_size / c->cluster_size + 2 > CHK_MAX_CLUSTERS) {
        res->check_errors++;
        vd_error_setg(errp, EFBIG, "Image file too large to check (%" PRIu64 " clusters)",
                      c->file_size / c->cluster_size);
        return -EFBIG;
    }
    res->total_clusters = div_round_up(c->h.size & ~511ULL, c->cluster_size);

    ret = calculate_refcounts(c, &rebuild);
    if (ret < 0) {
        goto fail;
    }
    VdCheckResult pre_compare = *res;
    compare_refcounts(c, 0, &rebuild, &highest);

    if (rebuild && (fix & VD_FIX_ERRORS)) {
        VdCheckResult old = *res;
        say(c, "Rebuilding refcount structure\n");
        ret = rebuild_refcounts(c);
        if (ret < 0) {
            goto fail;
        }
        res->corruptions = c->snap_corruptions; /* the snapshot table is repaired later */
        res->leaks = 0;
        rebuild = false;
        /* The fix pass already repaired L2 entries; count again against the new structure. */
        VdCheckResult keep_frag = *res;
        ret = calculate_refcounts(c, &rebuild);
        if (ret < 0) {
            goto fail;
        }
        /* The statistics of the first count stand; the recount only finds what remains. */
        res->allocated_clusters = keep_frag.allocated_clusters;
        res->fragmented_clusters = keep_frag.fragmented_clusters;
        res->compressed_clusters = keep_frag.compressed_clusters;
        VdCheckResult saved = *res;
        compare_refcounts(c, fix & VD_FIX_LEAKS, &rebuild, &highest);
        if (rebuild) {
            say(c, "ERROR rebuilt refcount structure is still broken\n");
        }
        int fresh_leaks = res->leaks;
        int fresh_corruptions = res->corruptions - saved.corruptions;
        *res = saved;
        if (res->corruptions < old.corruptions) {
            res->corruptions_fixed += old.corruptions - res->corruptions;
        }
        if (res->leaks < old.leaks) {
            res->leaks_fixed += old.leaks - res->leaks;
        }
        res->leaks += fresh_leaks;
        res->corruptions += fresh_corruptions;
    } else if (fix) {
        if (rebuild) {
            say(c, "ERROR need to rebuild refcount structures\n");
            res->check_errors++;
            vd_error_setg(errp, EIO, "The refcount structures need rebuilding (use -r all)");
            ret = -EIO;
            goto fail;
        }
        if (res->leaks || res->corruptions) {
            *res = pre_compare;
            compare_refcounts(c, fix, &rebuild, &highest);
        }
    }
    ret = rb_writeback(c);
    if (ret < 0) {
        say(c, "ERROR writing refblock: %s\n", strerror(-ret));
        res->check_errors++;
        goto fail;
    }
    ret = check_oflag_copied(c, fix);
    if (ret < 0) {
        goto fail;
    }
    if ((fix & VD_FIX_ERRORS) && c->snap_corruptions) {
        ret = rewrite_snapshot_table(c);
        if (ret < 0) {
            goto fail;
        }
    }
    res->image_end_offset = (highest + 1) * c->cluster_size;
    if (fix) {
        ret = vd_flush(c->file);
        if (ret < 0) {
            res->check_errors++;
            goto fail;
        }
    }
    return 0;
fail:
    rb_writeback(c);
    if (errp && !*errp) {
        vd_error_setg_errno(errp, -ret, "Check failed");
    }
    return ret;
}

/* Clear the dirty and corrupt bits (v3 only) after a repair that left the image consistent. */
static int mark_clean(BlockNode *file, VdError **errp)
{
    uint8_t b[8];
    int ret = vd_pread(file, 72, 8, b);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "Could not read the header");
        return ret;
    }
    uint64_t incompat = qcow2_be64(b);
    uint64_t clean = incompat & ~(QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT);
    if (clean == incompat) {
        return 0;
    }
    qcow2_put_be64(b, clean);
    ret = vd_pwrite(file, 72, 8, b, 0);
    if (ret == 0) {
        ret = vd_flush(file);
    }
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "Could not clear the dirty flag");
    }
    return ret;
}

int qcow2_check_file(BlockNode *file, VdCheckResult *res, int fix, VdError **errp)
{
    bool quiet = (fix & QCOW2_CHECK_QUIET) != 0;
    fix &= VD_FIX_LEAKS | VD_FIX_ERRORS;

    char *filename = res->filename;
    const char *format = res->format;
    memset(res, 0, sizeof(*res));
    res->filename = filename;
    res->format = format;

    Chk c = { .file = file, .res = res, .quiet = quiet };
    int ret = chk_pass(&c, fix, errp);
    chk_free_tables(&c);
    if (ret < 0 || !fix) {
        return ret;
    }
    int version = (int)c.h.version;

    if (res->leaks_fixed || res->corruptions_fixed) {
        /* Double-check the repaired image; report what remains plus what was repaired. */
        int leaks_fixed = res->leaks_fixed;
        int corruptions_fixed = res->corruptions_fixed;
        memset(res, 0, sizeof(*res));
        res->filename = filename;
        res->format = format;
        /* Quietly: every problem was reported by the repair pass (and callers that re-check,
         * like the check command, print the remaining ones themselves). */
        Chk c2 = { .file = file, .res = res, .quiet = true };
        ret = chk_pass(&c2, 0, errp);
        chk_free_tables(&c2);
        res->leaks_fixed = leaks_fixed;
        res->corruptions_fixed = corruptions_fixed;
        if (ret < 0) {
            return ret;
        }
    }
    if (version >= 3 && res->corruptions == 0 && res->check_errors == 0) {
        ret = mark_clean(file, errp);
        if (ret < 0) {
            res->check_errors++;
            return ret;
        }
    }
    return 0;
}
