/*
 * qcow2.c - the qcow2 format driver (vd_drv_qcow2): open/close with header and extension
 * parsing, create (qemu-img's layout), truncate, backing-file change, info, check, vtable.
 *
 * Locking: one pthread mutex per image (s->lock) is held for each whole request, with two
 * exceptions. Compressed writes compress each cluster without the lock and take it per cluster
 * for allocation, data write and L2 update only (so convert -c compresses in parallel).
 * Lockless data I/O: pread of NORMAL clusters and pwrite that overwrites allocated clusters in
 * place (COPIED, not compressed, no zero flag, all subclusters allocated: no allocation, no COW,
 * the mapping stays) look the mapping up under the lock, count themselves in
 * s->lockless_inflight, drop the lock for the data pread/pwrite, then re-take it and uncount.
 * Invariants that make this safe without any range serialization by the caller:
 *  - a host cluster is freed or repurposed (refcount decrement, discard, unmapping zero-write,
 *    COW release of shared/compressed clusters, truncate, check/repair) only while
 *    lockless_inflight == 0 and s->lock is held: those requests call q2_lockless_wait_idle()
 *    at their start, before changing anything, and keep the lock to the end; the deferred COW
 *    frees are applied only when nothing is in flight (else the list grows and the next write /
 *    flush applies it after waiting). New lockless I/O maps through the current L2 entries,
 *    which no longer point at a cluster whose reference was dropped, so the allocator never
 *    hands out a cluster a lockless I/O is still using.
 *  - while a thread waits for idle (lockless_waiters > 0) new data I/O is done under the lock,
 *    so the wait ends.
 *  - allocating writes (qcow2_pwrite) map, read copy-on-write data that is not the backing
 *    file's, allocate and later set their L2 entries under the lock, but write the data (and read
 *    copy-on-write data from the backing file) without it, counted in lockless_inflight and
 *    registered in s->allocs: another allocating write of the same guest clusters waits on
 *    alloc_done and redoes its step on the new mapping, so two writers never both allocate one
 *    guest cluster. Data is written before its L2 entry, as before.
 *  - compressed writes, zero writes and other reads stay under the lock;
 *    metadata-only frees (old L2 / L1 / refcount tables) need no wait: data I/O never maps there.
 *  - data_dirty is set before and after a lockless write, so the next flush syncs the file.
 *  - getlength reads s->size_pub atomically (no lock); it is updated under the lock wherever
 *    h.size changes (open, truncate, check reload).
 *
 * Metadata ordering (crash safety; after kill -9 `qemu-img check` shows at most leaks):
 *  - allocating: the refcount increment is made in the refcount-block cache and the L2 cache is
 *    made to depend on it; guest data is written to the new cluster; the L2 entry is updated in
 *    the L2 cache. Before any dirty L2 table is written, the refcount cache is written and the file
 *    flushed (and the file is flushed if data was written since the last flush). So on disk:
 *    data and refcount before L2 entry.
 *  - new L2 tables, refcount blocks, L1 and refcount tables are written and flushed, with their
 *    own refcounts already durable, before the L1 entry / refcount-table entry / header field that
 *    points at them is written.
 *  - freeing: the entry (L2 or L1) that dropped the reference is updated first; the refcount
 *    cache is made to depend on the L2 cache, so the decrement is written only after the L2
 *    tables and a flush. Conflicting dependencies are settled by flushing eagerly. Clusters
 *    replaced by copy-on-write are released in batches (at flush, or every 512), so overwriting
 *    shared or compressed data does not flush per cluster; a crash before that only leaks.
 *  - .flush applies batched frees, writes the L2 cache (after its dependency), then the
 *    refcount cache, then flushes the file.
 *  - lazy refcounts (compat bit, read-write): the first write sets the dirty bit and flushes it;
 *    then refcount increments are not ordered before L2 entries / new L2 tables (they are
 *    written at flush, close or eviction). A clean close flushes everything, then clears the
 *    bit. A dirty image opened read-write is repaired with qcow2_check_file() first, then the
 *    bit is cleared (that is the crash recovery of lazy refcounts).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

#include "formats/qcow2-check.h"
#include "formats/qcow2.h"
#include "util/lock.h"

static const struct {
    uint8_t type, bit;
    const char *name;
} q2_features[] = {
    { 0, 0, "dirty bit" },
    { 0, 1, "corrupt bit" },
    { 0, 2, "external data file" },
    { 0, 3, "compression type" },
    { 0, 4, "extended L2 entries" },
    { 1, 0, "lazy refcounts" },
    { 2, 0, "bitmaps" },
    { 2, 1, "raw external data" },
};

int q2_write_header_field(Qcow2State *s, uint64_t off, const void *data, uint32_t len)
{
    return vd_pwrite(s->bs->file, off, len, data, 0);
}

static void free_exts(Qcow2State *s)
{
    for (int i = 0; i < s->nb_exts; i++) {
        free(s->exts[i].data);
    }
    free(s->exts);
    s->exts = NULL;
    s->nb_exts = 0;
}

static int add_ext(Qcow2State *s, uint32_t type, const uint8_t *data, uint32_t len)
{
    Qcow2Ext *n = realloc(s->exts, sizeof(Qcow2Ext) * (size_t)(s->nb_exts + 1));
    if (!n) {
        return -ENOMEM;
    }
    s->exts = n;
    uint8_t *d = malloc(len ? len : 1);
    if (!d) {
        return -ENOMEM;
    }
    memcpy(d, data, len);
    s->exts[s->nb_exts].type = type;
    s->exts[s->nb_exts].len = len;
    s->exts[s->nb_exts].data = d;
    s->nb_exts++;
    return 0;
}

static int build_header(Qcow2State *s, uint8_t *buf);

int q2_update_header_ext(Qcow2State *s, uint32_t type, const uint8_t *data, uint32_t len,
                         uint64_t autoclear)
{
    int i = 0;
    while (i < s->nb_exts && s->exts[i].type != type) {
        i++;
    }
    if (i < s->nb_exts) {
        free(s->exts[i].data);
        memmove(&s->exts[i], &s->exts[i + 1], sizeof(Qcow2Ext) * (size_t)(s->nb_exts - i - 1));
        s->nb_exts--;
    }
    int ret = data ? add_ext(s, type, data, len) : 0;
    uint8_t *buf = malloc(s->cluster_size);
    if (ret < 0 || !buf) {
        free(buf);
        return -ENOMEM;
    }
    s->h.autoclear_features = autoclear;
    ret = build_header(s, buf);
    if (ret == 0) {
        ret = vd_pwrite(s->bs->file, 0, s->cluster_size, buf, 0);
    }
    if (ret == 0) {
        ret = q2_file_flush(s);
    }
    free(buf);
    return ret;
}

static int add_feature_table(Qcow2State *s)
{
    size_t n = sizeof(q2_features) / sizeof(q2_features[0]);
    uint8_t *t = calloc(n, 48);
    if (!t) {
        return -ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        t[i * 48] = q2_features[i].type;
        t[i * 48 + 1] = q2_features[i].bit;
        strncpy((char *)t + i * 48 + 2, q2_features[i].name, 46);
    }
    int ret = add_ext(s, QCOW2_EXT_FEATURE_TABLE, t, (uint32_t)(n * 48));
    free(t);
    return ret;
}

/*
 * Build the whole header cluster from s (fixed header, backing format, preserved extensions,
 * end marker, backing file name). -ENOSPC if it does not fit in the first cluster.
 */
static int build_header(Qcow2State *s, uint8_t *buf)
{
    uint64_t cs = s->cluster_size;
    uint32_t hlen = s->h.version >= 3 ? s->h.header_length : QCOW2_V2_HEADER_SIZE;
    memset(buf, 0, cs);
    if (s->hdr_raw && s->h.version >= 3 && s->hdr_raw_len == hlen) {
        memcpy(buf, s->hdr_raw, hlen); /* keeps fields we do not know */
    }
    qcow2_put_be32(buf + 0, QCOW2_MAGIC);
    qcow2_put_be32(buf + 4, s->h.version);
    qcow2_put_be32(buf + 20, s->h.cluster_bits);
    qcow2_put_be64(buf + 24, s->h.size);
    qcow2_put_be32(buf + 32, 0);
    qcow2_put_be32(buf + 36, s->l1_size);
    qcow2_put_be64(buf + 40, s->l1_offset);
    qcow2_put_be64(buf + 48, s->reftable_offset);
    qcow2_put_be32(buf + 56, s->h.refcount_table_clusters);
    qcow2_put_be32(buf + 60, s->h.nb_snapshots);
    qcow2_put_be64(buf + 64, s->h.snapshots_offset);
    if (s->h.version >= 3) {
        qcow2_put_be64(buf + 72, s->h.incompatible_features);
        qcow2_put_be64(buf + 80, s->h.compatible_features);
        qcow2_put_be64(buf + 88, s->h.autoclear_features);
        qcow2_put_be32(buf + 96, s->h.refcount_order);
        qcow2_put_be32(buf + 100, hlen);
        if (hlen > 104) {
            buf[104] = s->compression_type;
        }
    }
    uint64_t off = hlen;
    if (s->backing_fmt) {
        uint32_t l = (uint32_t)strlen(s->backing_fmt);
        uint64_t need = 8 + ((l + 7ULL) & ~7ULL);
        if (off + need + 8 > cs) {
            return -ENOSPC;
        }
        qcow2_put_be32(buf + off, QCOW2_EXT_BACKING_FORMAT);
        qcow2_put_be32(buf + off + 4, l);
        memcpy(buf + off + 8, s->backing_fmt, l);
        off += need;
    }
    for (int i = 0; i < s->nb_exts; i++) {
        uint64_t need = 8 + ((s->exts[i].len + 7ULL) & ~7ULL);
        if (off + need + 8 > cs) {
            return -ENOSPC;
        }
        qcow2_put_be32(buf + off, s->exts[i].type);
        qcow2_put_be32(buf + off + 4, s->exts[i].len);
        memcpy(buf + off + 8, s->exts[i].data, s->exts[i].len);
        off += need;
    }
    off += 8; /* end of extensions */
    if (s->backing_file) {
        uint64_t l = strlen(s->backing_file);
        if (l > Q2_MAX_BACKING_NAME || off + l > cs) {
            return -ENOSPC;
        }
        memcpy(buf + off, s->backing_file, l);
        qcow2_put_be64(buf + 8, off);
        qcow2_put_be32(buf + 16, (uint32_t)l);
    } else {
        qcow2_put_be64(buf + 8, 0);
        qcow2_put_be32(buf + 16, 0);
    }
    return 0;
}

static const char *feature_name(Qcow2State *s, int type, int bit, char *tmp, size_t tmplen)
{
    for (int i = 0; i < s->nb_exts; i++) {
        if (s->exts[i].type != QCOW2_EXT_FEATURE_TABLE) {
            continue;
        }
        for (uint32_t o = 0; o + 48 <= s->exts[i].len; o += 48) {
            const uint8_t *e = s->exts[i].data + o;
            if (e[0] == type && e[1] == bit) {
                snprintf(tmp, tmplen, "%.46s", (const char *)e + 2);
                return tmp;
            }
        }
    }
    snprintf(tmp, tmplen, "Unknown incompatible feature: %llx", 1ULL << bit);
    return tmp;
}

static void q2_free_state(Qcow2State *s)
{
    q2_cache_destroy(&s->l2_cache);
    q2_cache_destroy(&s->rb_cache);
    free(s->l1);
    s->l1 = NULL;
    free(s->reftable);
    s->reftable = NULL;
    free(s->hdr_raw);
    s->hdr_raw = NULL;
    free(s->pending_frees);
    s->pending_frees = NULL;
    s->nb_pending_frees = 0;
    s->cap_pending_frees = 0;
    free_exts(s);
    free(s->backing_file);
    s->backing_file = NULL;
    free(s->backing_fmt);
    s->backing_fmt = NULL;
}

static int load_l1(Qcow2State *s, VdError **errp)
{
    free(s->l1);
    s->l1 = calloc(s->l1_size ? s->l1_size : 1, sizeof(uint64_t));
    if (!s->l1) {
        vd_error_setg(errp, ENOMEM, "qcow2: cannot allocate the L1 table");
        return -ENOMEM;
    }
    if (!s->l1_size) {
        return 0;
    }
    uint8_t *raw = malloc((size_t)s->l1_size * 8);
    if (!raw) {
        vd_error_setg(errp, ENOMEM, "qcow2: cannot allocate the L1 table");
        return -ENOMEM;
    }
    int ret = vd_pread(s->bs->file, s->l1_offset, (uint64_t)s->l1_size * 8, raw);
    if (ret < 0) {
        free(raw);
        vd_error_setg_errno(errp, -ret, "qcow2: could not read the L1 table");
        return ret;
    }
    for (uint32_t i = 0; i < s->l1_size; i++) {
        s->l1[i] = qcow2_be64(raw + 8 * i);
    }
    free(raw);
    return 0;
}

/* Parse and validate the header; fills s->h, geometry, extensions and backing names. */
static int parse_header(BlockNode *bs, Qcow2State *s, int flags, VdError **errp)
{
    int64_t flen = vd_getlength(bs->file);
    if (flen < 0) {
        vd_error_setg_errno(errp, (int)-flen, "qcow2: could not get the size of '%s'",
                            bs->filename);
        return (int)flen;
    }
    uint8_t fix[QCOW2_HEADER_DECODE_SIZE];
    memset(fix, 0, sizeof(fix));
    if (flen < QCOW2_V2_HEADER_SIZE) {
        vd_error_setg(errp, EINVAL, "Image is not in qcow2 format (file too short)");
        return -EINVAL;
    }
    uint64_t rd = (uint64_t)flen < sizeof(fix) ? (uint64_t)flen : sizeof(fix);
    int ret = vd_pread(bs->file, 0, rd, fix);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "qcow2: could not read the header");
        return ret;
    }
    Qcow2Header *h = &s->h;
    qcow2_header_decode(fix, h);
    if (h->magic != QCOW2_MAGIC) {
        vd_error_setg(errp, EINVAL, "Image is not in qcow2 format");
        return -EINVAL;
    }
    if (h->version == 1) {
        vd_error_setg(errp, ENOTSUP, "Unsupported image format: qcow (version 1) images are "
                      "not supported");
        return -ENOTSUP;
    }
    if (h->version != 2 && h->version != 3) {
        vd_error_setg(errp, ENOTSUP, "Unsupported qcow2 version %" PRIu32, h->version);
        return -ENOTSUP;
    }
    if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS || h->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
        vd_error_setg(errp, EINVAL, "Unsupported cluster size: 2^%" PRIu32, h->cluster_bits);
        return -EINVAL;
    }
    uint64_t cs = 1ULL << h->cluster_bits;
    if (h->version == 3) {
        if ((uint64_t)flen < QCOW2_V3_HEADER_SIZE) {
            vd_error_setg(errp, EINVAL, "qcow2 header truncated");
            return -EINVAL;
        }
        if (h->header_length < QCOW2_V3_HEADER_SIZE) {
            vd_error_setg(errp, EINVAL, "qcow2 header too small");
            return -EINVAL;
        }
        if (h->header_length > cs) {
            vd_error_setg(errp, EINVAL, "qcow2 header exceeds cluster size");
            return -EINVAL;
        }
    }
    if (h->refcount_order > 6) {
        vd_error_setg(errp, EINVAL, "qcow2: refcount width 2^%" PRIu32 " bits is not supported",
                      h->refcount_order);
        return -EINVAL;
    }

    /* the header cluster: extensions and backing name must lie inside it */
    uint64_t hc = (uint64_t)flen < cs ? (uint64_t)flen : cs;
    uint8_t *hbuf = calloc(1, cs);
    if (!hbuf) {
        vd_error_setg(errp, ENOMEM, "qcow2: out of memory");
        return -ENOMEM;
    }
    ret = vd_pread(bs->file, 0, hc, hbuf);
    if (ret < 0) {
        free(hbuf);
        vd_error_setg_errno(errp, -ret, "qcow2: could not read the header");
        return ret;
    }
    free(s->hdr_raw);
    s->hdr_raw_len = h->header_length;
    s->hdr_raw = malloc(h->header_length);
    if (!s->hdr_raw) {
        free(hbuf);
        return -ENOMEM;
    }
    memcpy(s->hdr_raw, hbuf, h->header_length);

    free_exts(s);
    free(s->backing_fmt);
    s->backing_fmt = NULL;
    free(s->backing_file);
    s->backing_file = NULL;
    uint64_t off = h->header_length;
    uint64_t ext_end = h->backing_file_offset && h->backing_file_offset < cs
                           ? h->backing_file_offset : cs;
    ret = 0;
    while (off + 8 <= ext_end) {
        uint32_t type = qcow2_be32(hbuf + off);
        uint32_t len = qcow2_be32(hbuf + off + 4);
        if (type == QCOW2_EXT_END) {
            break;
        }
        if (len > ext_end - off - 8) {
            vd_error_setg(errp, EINVAL, "qcow2: header extension 0x%08" PRIx32
                          " extends past the header cluster", type);
            ret = -EINVAL;
            break;
        }
        if (type == QCOW2_EXT_BACKING_FORMAT) {
            if (len > 1023) {
                vd_error_setg(errp, EINVAL, "qcow2: backing format name too long");
                ret = -EINVAL;
                break;
            }
            s->backing_fmt = strndup((const char *)hbuf + off + 8, len);
            if (!s->backing_fmt) {
                ret = -ENOMEM;
                break;
            }
        } else {
            ret = add_ext(s, type, hbuf + off + 8, len);
            if (ret < 0) {
                break;
            }
        }
        off += 8 + ((len + 7ULL) & ~7ULL);
    }
    if (ret == 0 && h->backing_file_offset) {
        if (h->backing_file_size > Q2_MAX_BACKING_NAME ||
            h->backing_file_offset > cs - h->backing_file_size ||
            h->backing_file_offset + h->backing_file_size > hc) {
            vd_error_setg(errp, EINVAL, "qcow2: backing file name is invalid or too long");
            ret = -EINVAL;
        } else if (h->backing_file_size) {
            s->backing_file = strndup((const char *)hbuf + h->backing_file_offset,
                                      h->backing_file_size);
            if (!s->backing_file) {
                ret = -ENOMEM;
            }
        }
    }
    free(hbuf);
    if (ret < 0) {
        if (ret == -ENOMEM) {
            vd_error_setg(errp, ENOMEM, "qcow2: out of memory");
        }
        return ret;
    }

    /* features */
    if (h->crypt_method != 0) {
        vd_error_setg(errp, ENOTSUP, "qcow2: encrypted images are not supported "
                      "(encryption method %" PRIu32 ")", h->crypt_method);
        return -ENOTSUP;
    }
    if (h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
        vd_error_setg(errp, ENOTSUP, "qcow2: images with an external data file are not "
                      "supported");
        return -ENOTSUP;
    }
    uint64_t unknown = h->incompatible_features & ~QCOW2_INCOMPAT_KNOWN;
    if (unknown) {
        char msg[512] = "", tmp[80];
        for (int b = 0; b < 64; b++) {
            if (unknown & (1ULL << b)) {
                size_t l = strlen(msg);
                snprintf(msg + l, sizeof(msg) - l, "%s%s", l ? ", " : "",
                         feature_name(s, 0, b, tmp, sizeof(tmp)));
            }
        }
        vd_error_setg(errp, ENOTSUP, "Unsupported qcow2 feature(s): %s", msg);
        return -ENOTSUP;
    }
    bool rw = flags & VD_OPEN_RDWR;
    if ((h->incompatible_features & QCOW2_INCOMPAT_CORRUPT) && rw && !(flags & VD_OPEN_CHECK)) {
        vd_error_setg(errp, EACCES, "qcow2: image is corrupt; cannot be opened read/write "
                      "(run 'check -r all' to repair it)");
        return -EACCES;
    }
    s->compression_type = h->compression_type;
    if (s->compression_type > QCOW2_COMPRESSION_ZSTD) {
        vd_error_setg(errp, ENOTSUP, "qcow2: unknown compression type %u", s->compression_type);
        return -ENOTSUP;
    }
    if (s->compression_type != 0 && !(h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION)) {
        vd_error_setg(errp, EINVAL, "qcow2: compression type set without its feature bit");
        return -EINVAL;
    }
    s->extl2 = (h->incompatible_features & QCOW2_INCOMPAT_EXTL2) != 0;
    if (s->extl2 && h->cluster_bits < 14) {
        vd_error_setg(errp, EINVAL, "qcow2: extended L2 entries need clusters of 16k or more");
        return -EINVAL;
    }

    /* geometry */
    s->cluster_bits = h->cluster_bits;
    s->cluster_size = cs;
    s->l2e_size = s->extl2 ? 16 : 8;
    s->l2_bits = h->cluster_bits - (s->extl2 ? 4 : 3);
    s->l2_entries = 1ULL << s->l2_bits;
    s->sc_size = s->extl2 ? cs / QCOW2_EXTL2_SUBCLUSTERS : cs;
    s->csize_shift = 62 - (h->cluster_bits - 8);
    s->csize_mask = (1ULL << (h->cluster_bits - 8)) - 1;
    s->cluster_offset_mask = (1ULL << s->csize_shift) - 1;
    s->refcount_order = h->refcount_order;
    s->rb_bits = h->cluster_bits + 3 - h->refcount_order;
    s->refcount_max = h->refcount_order == 6 ? UINT64_MAX
                                             : (1ULL << (1u << h->refcount_order)) - 1;

    /* sizes and table locations */
    if (h->size > (1ULL << 62)) {
        vd_error_setg(errp, EFBIG, "qcow2: virtual size too large");
        return -EFBIG;
    }
    uint64_t per_l1 = cs * s->l2_entries;
    uint64_t need_l1 = (h->size + per_l1 - 1) / per_l1;
    if ((uint64_t)h->l1_size * 8 > QCOW2_MAX_L1_SIZE) {
        vd_error_setg(errp, EFBIG, "qcow2: active L1 table too large");
        return -EFBIG;
    }
    if (h->l1_size < need_l1) {
        vd_error_setg(errp, EINVAL, "qcow2: L1 table is too small for the image size");
        return -EINVAL;
    }
    /*
     * Tables that lie outside the file (cut short, offset past EOF or 0) are damage that check
     * diagnoses from the raw file, and that qemu-img info tolerates (QEMU validates these lazily).
     * For a check or a read-only open we note it and go on (s->damaged: I/O then fails with
     * -EIO); a read-write open must refuse, since any write could make things worse.
     * Misaligned offsets and absurd sizes stay fatal, as in QEMU.
     */
    bool tolerate = (flags & VD_OPEN_CHECK) || !rw;
    s->damaged = false;
    s->snapshots_damaged = false;
    if (h->l1_size && (h->l1_table_offset & (cs - 1))) {
        vd_error_setg(errp, EINVAL, "qcow2: L1 table offset invalid");
        return -EINVAL;
    }
    if (h->l1_size && (h->l1_table_offset == 0 ||
                       h->l1_table_offset >= (uint64_t)flen ||
                       (uint64_t)h->l1_size * 8 > (uint64_t)flen - h->l1_table_offset)) {
        if (!tolerate) {
            vd_error_setg(errp, EINVAL, "qcow2: L1 table offset invalid");
            return -EINVAL;
        }
        s->damaged = true;
    }
    if (h->refcount_table_clusters == 0 ||
        (uint64_t)h->refcount_table_clusters * cs > QCOW2_MAX_REFTABLE_SIZE) {
        vd_error_setg(errp, EINVAL, "qcow2: reference count table size invalid");
        return -EINVAL;
    }
    if (h->refcount_table_offset & (cs - 1)) {
        vd_error_setg(errp, EINVAL, "qcow2: reference count table offset invalid");
        return -EINVAL;
    }
    if (h->refcount_table_offset == 0 || h->refcount_table_offset >= (uint64_t)flen ||
        (uint64_t)h->refcount_table_clusters * cs > (uint64_t)flen - h->refcount_table_offset) {
        if (!tolerate) {
            vd_error_setg(errp, EINVAL, "qcow2: reference count table offset invalid");
            return -EINVAL;
        }
        s->damaged = true;
    }
    if (h->nb_snapshots > Q2_MAX_SNAPSHOTS) {
        vd_error_setg(errp, EINVAL, "qcow2: too many snapshots");
        return -EINVAL;
    }
    if (h->nb_snapshots && ((h->snapshots_offset & (cs - 1)) || !h->snapshots_offset)) {
        vd_error_setg(errp, EINVAL, "qcow2: snapshot table offset invalid");
        return -EINVAL;
    }
    if (h->nb_snapshots && h->snapshots_offset >= (uint64_t)flen) {
        if (!tolerate) {
            vd_error_setg(errp, EINVAL, "qcow2: snapshot table offset invalid");
            return -EINVAL;
        }
        s->snapshots_damaged = true;
    }
    s->l1_size = h->l1_size;
    s->l1_offset = h->l1_table_offset;
    return 0;
}

static int init_caches(Qcow2State *s, VdError **errp)
{
    uint64_t cs = s->cluster_size;
    uint64_t per_l2 = cs * s->l2_entries;
    uint64_t tables = (s->h.size + per_l2 - 1) / per_l2;
    uint64_t maxe = Q2_L2_CACHE_MAX_BYTES / cs;
    uint64_t l2e = tables + 2;
    if (l2e > maxe) {
        l2e = maxe;
    }
    if (l2e < 8) {
        l2e = 8;
    }
    uint64_t rbe_cov = (1ULL << s->rb_bits) * cs;
    uint64_t rbs = (s->h.size + rbe_cov - 1) / rbe_cov + 4;
    uint64_t rmax = (8ULL << 20) / cs;
    if (rbs > rmax) {
        rbs = rmax;
    }
    if (rbs < Q2_RB_CACHE_MIN_ENTRIES) {
        rbs = cs >= (1ULL << 20) ? 8 : Q2_RB_CACHE_MIN_ENTRIES;
    }
    if (q2_cache_init(&s->l2_cache, (int)l2e, cs, true) < 0 ||
        q2_cache_init(&s->rb_cache, (int)rbs, cs, false) < 0) {
        vd_error_setg(errp, ENOMEM, "qcow2: cannot allocate metadata caches");
        return -ENOMEM;
    }
    return 0;
}

static int qcow2_open(BlockNode *bs, const VdOpenOptions *opts, VdError **errp)
{
    Qcow2State *s = q2_state(bs);
    int flags = opts ? opts->flags : bs->open_flags;
    bool rw = (flags & VD_OPEN_RDWR) != 0;
    int ret;
    bool repaired = false;

    memset(s, 0, sizeof(*s));
    s->bs = bs;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->lockless_idle, NULL);
    pthread_cond_init(&s->alloc_done, NULL);
    if (!bs->file) {
        vd_error_setg(errp, EINVAL, "qcow2: '%s' has no file child", bs->filename);
        return -EINVAL;
    }
again:
    ret = parse_header(bs, s, flags, errp);
    if (ret < 0) {
        goto fail;
    }
    if ((s->h.incompatible_features & QCOW2_INCOMPAT_DIRTY) && rw && !(flags & VD_OPEN_CHECK)) {
        if (repaired) {
            vd_error_setg(errp, EIO, "qcow2: could not clear the dirty bit");
            ret = -EIO;
            goto fail;
        }
        /* refcounts may be stale (lazy refcounts): repair before trusting them */
        VdCheckResult res;
        memset(&res, 0, sizeof(res));
        ret = qcow2_check_file(bs->file, &res, VD_FIX_LEAKS | VD_FIX_ERRORS | QCOW2_CHECK_QUIET,
                               errp);
        free(res.filename);
        if (ret < 0) {
            vd_error_prepend(errp, "qcow2: repairing the dirty image failed: ");
            goto fail;
        }
        uint8_t be[8];
        qcow2_put_be64(be, s->h.incompatible_features & ~QCOW2_INCOMPAT_DIRTY);
        ret = vd_pwrite(bs->file, 72, 8, be, 0);
        if (ret == 0) {
            ret = vd_flush(bs->file);
        }
        if (ret < 0) {
            vd_error_setg_errno(errp, -ret, "qcow2: could not clear the dirty bit");
            goto fail;
        }
        repaired = true;
        goto again;
    }
    if (!s->damaged) {
        ret = load_l1(s, errp);
        if (ret == 0) {
            ret = q2_load_reftable(s, errp);
        }
    }
    if (ret == 0) {
        ret = init_caches(s, errp);
    }
    if (ret < 0) {
        goto fail;
    }
    s->read_only = !rw;
    s->metadata_prealloc = -1;
    q2_publish_size(s);
    if (opts && opts->snapshot && (ret = q2_snapshot_load(s, opts->snapshot, errp)) < 0) {
        goto fail;
    }
    s->lazy_refcounts = rw && s->h.version >= 3 &&
                        (s->h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS);
    s->set_dirty = false;
    free(bs->backing_file);
    bs->backing_file = NULL;
    free(bs->backing_format);
    bs->backing_format = NULL;
    if (s->backing_file && !(bs->backing_file = strdup(s->backing_file))) {
        ret = -ENOMEM;
        goto fail;
    }
    if (s->backing_fmt && !(bs->backing_format = strdup(s->backing_fmt))) {
        ret = -ENOMEM;
        goto fail;
    }
    return 0;
fail:
    q2_free_state(s);
    pthread_cond_destroy(&s->lockless_idle);
    pthread_cond_destroy(&s->alloc_done);
    pthread_mutex_destroy(&s->lock);
    return ret;
}

static int clear_dirty(Qcow2State *s);

static void qcow2_close(BlockNode *bs)
{
    Qcow2State *s = q2_state(bs);
    vd_mutex_lock(&s->lock);
    q2_lockless_wait_idle(s); /* none by contract (no request runs across close) */
    if (!s->read_only && !s->damaged) {
        /* a failed flush keeps the dirty bit: the next open repairs what did not reach disk */
        if (q2_flush_all(s) == 0) {
            clear_dirty(s);
        }
    }
    q2_free_state(s);
    vd_mutex_unlock(&s->lock);
    pthread_cond_destroy(&s->lockless_idle);
    pthread_cond_destroy(&s->alloc_done);
    pthread_mutex_destroy(&s->lock);
}

/*
 * Any file with the qcow magic is claimed, whatever its version: QEMU probes version 1 as qcow
 * and >= 2 as qcow2, and then fails to open what it does not support. Probing such a file as
 * raw instead would expose its metadata as guest data (and let writes destroy it), so the open
 * refuses it with "Unsupported qcow2 version N" / the qcow (v1) message.
 */
static int qcow2_probe(const uint8_t *buf, size_t len, const char *filename)
{
    if (len >= 8 && qcow2_be32(buf) == QCOW2_MAGIC) {
        return 100;
    }
    return 0;
}

/*
 * Before the first modification: autoclear features we do not maintain are cleared, telling
 * other programs those structures are stale (per spec); the bitmaps bit stays when qcow2-bitmap.c
 * holds the bitmaps (they are in use on disk and stored at close). With lazy refcounts, the
 * dirty bit is set and flushed before any refcount update is deferred.
 */
int q2_first_write(Qcow2State *s)
{
    int ret;
    uint64_t keep = s->bitmaps_loaded ? QCOW2_AUTOCLEAR_BITMAPS : 0;
    if (s->h.version >= 3 && (s->h.autoclear_features & ~keep)) {
        uint8_t be[8];
        qcow2_put_be64(be, s->h.autoclear_features & keep);
        ret = vd_pwrite(s->bs->file, 88, 8, be, 0);
        if (ret == 0) {
            ret = q2_file_flush(s);
        }
        if (ret < 0) {
            return ret;
        }
        s->h.autoclear_features &= keep;
    }
    if (s->lazy_refcounts && !(s->h.incompatible_features & QCOW2_INCOMPAT_DIRTY)) {
        uint8_t be[8];
        qcow2_put_be64(be, s->h.incompatible_features | QCOW2_INCOMPAT_DIRTY);
        ret = vd_pwrite(s->bs->file, 72, 8, be, 0);
        if (ret == 0) {
            ret = q2_file_flush(s);
        }
        if (ret < 0) {
            return ret;
        }
        s->h.incompatible_features |= QCOW2_INCOMPAT_DIRTY;
        s->set_dirty = true;
    }
    return 0;
}

/*
 * Clean close (or the end of a lazy period): with every cache written and flushed, the refcounts
 * on disk are exact again, so the dirty bit this open set can go. Lock held.
 */
static int clear_dirty(Qcow2State *s)
{
    if (!s->set_dirty || !(s->h.incompatible_features & QCOW2_INCOMPAT_DIRTY)) {
        return 0;
    }
    int ret = q2_flush_all(s);
    if (ret < 0) {
        return ret;
    }
    uint8_t be[8];
    qcow2_put_be64(be, s->h.incompatible_features & ~QCOW2_INCOMPAT_DIRTY);
    ret = vd_pwrite(s->bs->file, 72, 8, be, 0);
    if (ret == 0) {
        ret = q2_file_flush(s);
    }
    if (ret == 0) {
        s->h.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY;
        s->set_dirty = false;
    }
    return ret;
}

/*
 * ---- I/O entry points: each holds s->lock for the whole request, except lockless data I/O;
 * those that may free or repurpose host clusters first wait for it to drain ----
 */

static int qcow2_pread(BlockNode *bs, uint64_t offset, uint64_t bytes, void *buf)
{
    Qcow2State *s = q2_state(bs);
    if (s->damaged) {
        return -EIO;
    }
    vd_mutex_lock(&s->lock);
    int ret = q2_read_unlocked_data(s, offset, bytes, buf);
    vd_mutex_unlock(&s->lock);
    return ret;
}

static int qcow2_pwrite(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf, int flags)
{
    Qcow2State *s = q2_state(bs);
    if (s->read_only) {
        return -EROFS;
    }
    if (s->damaged) {
        return -EIO;
    }
    vd_mutex_lock(&s->lock);
    int ret = q2_first_write(s);
    if (ret == 0 && s->nb_pending_frees >= Q2_MAX_PENDING_FREES) {
        /* frees deferred while lockless I/O was in flight: apply them now that it is safe */
        q2_lockless_wait_idle(s);
        ret = q2_apply_pending_frees(s);
    }
    if (ret == 0) {
        ret = q2_write_unlocked_data(s, offset, bytes, buf);
    }
    if (ret == 0 && (flags & VD_REQ_FUA)) {
        q2_lockless_wait_idle(s); /* q2_flush_all applies deferred frees */
        ret = q2_flush_all(s);
    }
    vd_mutex_unlock(&s->lock);
    return ret;
}

static int qcow2_pwrite_zeroes(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    Qcow2State *s = q2_state(bs);
    if (s->read_only) {
        return -EROFS;
    }
    if (s->damaged) {
        return -EIO;
    }
    vd_mutex_lock(&s->lock);
    q2_lockless_wait_idle(s); /* may unmap / free clusters */
    int ret = q2_first_write(s);
    if (ret == 0) {
        ret = q2_zero(s, offset, bytes, flags);
    }
    if (ret == 0 && (flags & VD_REQ_FUA)) {
        ret = q2_flush_all(s);
    }
    vd_mutex_unlock(&s->lock);
    return ret;
}

static int qcow2_pdiscard(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    Qcow2State *s = q2_state(bs);
    if (s->read_only) {
        return -EROFS;
    }
    if (s->damaged) {
        return -EIO;
    }
    vd_mutex_lock(&s->lock);
    q2_lockless_wait_idle(s); /* frees clusters */
    int ret = q2_first_write(s);
    if (ret == 0) {
        ret = q2_discard(s, offset, bytes, flags);
    }
    vd_mutex_unlock(&s->lock);
    return ret;
}

static int qcow2_pwrite_compressed(BlockNode *bs, uint64_t offset, uint64_t bytes,
                                   const void *buf)
{
    Qcow2State *s = q2_state(bs);
    if (s->read_only) {
        return -EROFS;
    }
    if (s->damaged) {
        return -EIO;
    }
    if (offset & (s->cluster_size - 1)) {
        return -EINVAL;
    }
    uint8_t *in = malloc(s->cluster_size);
    uint8_t *out = malloc(s->cluster_size);
    if (!in || !out) {
        free(in);
        free(out);
        return -ENOMEM;
    }
    /*
     * Compression (the costly part) runs without s->lock, so convert -c's worker threads
     * compress in parallel; the lock covers only allocation, the data write and the L2 update.
     */
    const uint8_t *p = buf;
    int ret = 0;
    while (bytes > 0 && ret == 0) {
        uint64_t n = bytes < s->cluster_size ? bytes : s->cluster_size;
        int clen = q2_compress_cluster(s, offset, n, p, in, out);
        if (clen < 0) {
            ret = clen;
            break;
        }
        vd_mutex_lock(&s->lock);
        q2_lockless_wait_idle(s); /* replaces (frees) the old cluster */
        ret = q2_first_write(s);
        if (ret == 0) {
            ret = q2_write_compressed_cluster(s, offset, n, p, out, clen);
        }
        vd_mutex_unlock(&s->lock);
        offset += n;
        bytes -= n;
        p += n;
    }
    free(in);
    free(out);
    return ret;
}

/*
 * Before a flush takes the lock: sync the guest data written so far WITHOUT the lock. Writing
 * back a dirty L2 table needs the data it points at (and the refcounts of its new clusters)
 * durable first, and that sync, made under the lock, covered everything written since the last
 * one (after a stream or a mirror, hundreds of MiB: measured 0.3-0.6 s with every allocating
 * guest write waiting for the lock). So each pass writes the dirty refcount blocks (pwrites only,
 * under the lock) and syncs the file without it; if nothing was written meanwhile (data_gen and
 * the refcount cache's dirtied unchanged), data_dirty and the L2 cache's dependency are settled
 * and the write-back under the lock makes no sync before its L2 writes (the same number of syncs
 * as before, one of them moved out of the lock). Under a busy writer the next pass syncs only what
 * was written during the previous one (at most Q2_PRESYNC_PASSES, another only while one took
 * over 25 ms: a backlog whose sync under the lock would stall guests), so the sync left under
 * the lock is short, while a flush-heavy guest with little written between flushes pays no extra
 * sync.
 */
#define Q2_PRESYNC_PASSES 3
static int presync_data(BlockNode *bs, Qcow2State *s)
{
    if (bs->open_flags & VD_OPEN_NO_FLUSH) {
        return 0;
    }
    for (int pass = 0; pass < Q2_PRESYNC_PASSES; pass++) {
        vd_mutex_lock(&s->lock);
        bool dirty = s->data_dirty;
        uint64_t gen = s->data_gen;
        /* refcounts first only when they depend on nothing (else the lock's write-back orders) */
        bool rb = s->l2_cache.depends == &s->rb_cache && !s->rb_cache.depends;
        int ret = rb ? q2_cache_flush(s, &s->rb_cache) : 0;
        uint64_t rgen = s->rb_cache.dirtied;
        vd_mutex_unlock(&s->lock);
        if (ret < 0) {
            return ret;
        }
        if (!dirty && !rb) {
            return 0;
        }
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        ret = vd_flush(bs->file);
        if (ret < 0) {
            return ret;
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        vd_mutex_lock(&s->lock);
        /* a write in flight during the sync bumps data_gen when it ends (lockless ones too) */
        if (s->data_gen == gen) {
            s->data_dirty = false; /* everything written before the sync began is durable */
        }
        if (rb && s->rb_cache.dirtied == rgen && s->l2_cache.depends == &s->rb_cache) {
            s->l2_cache.depends = NULL; /* the refcounts written above are durable */
        }
        vd_mutex_unlock(&s->lock);
        int64_t ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
        if (ms < 25) {
            break;
        }
    }
    return 0;
}

static int qcow2_flush(BlockNode *bs)
{
    Qcow2State *s = q2_state(bs);
    if (s->read_only || s->damaged) {
        return 0;
    }
    int ret = presync_data(bs, s);
    vd_mutex_lock(&s->lock);
    q2_lockless_wait_idle(s); /* q2_writeback_all applies deferred frees */
    if (ret == 0) {
        ret = q2_writeback_all(s);
    }
    vd_mutex_unlock(&s->lock);
    /*
     * The file's own flush (an fdatasync: milliseconds to seconds) runs without the image lock,
     * as QEMU's qcow2 flushes to the OS under its lock and the file after it: guest writes and
     * allocations go on meanwhile instead of stalling behind the sync. Everything written before
     * this flush was called is in the file already, so this sync makes it durable; later writes
     * order themselves (they set their own dependencies and data_dirty).
     */
    if (ret == 0 && !(bs->open_flags & VD_OPEN_NO_FLUSH)) {
        ret = vd_flush(bs->file);
    }
    return ret;
}

/*
 * Does the image look metadata-preallocated? As QEMU: count clusters with a non-zero refcount
 * up to the end of the file; if that reaches max(stored * 10 / 9, stored + 2), where stored is
 * the number of clusters the host file really stores, many referenced clusters are holes.
 * Returns 1 / 0, or -errno. Lock held.
 */
static int detect_metadata_prealloc(Qcow2State *s)
{
    BlockNode *file = s->bs->file;
    int64_t flen = vd_getlength(file);
    if (flen < 0) {
        return (int)flen;
    }
    if (!file->drv->allocated_size) {
        return 0;
    }
    int64_t real = file->drv->allocated_size(file);
    if (real < 0) {
        return 0; /* unknown (e.g. NBD): no recursion, as QEMU when it cannot tell */
    }
    uint64_t real_clusters = (uint64_t)real / s->cluster_size;
    uint64_t threshold = real_clusters * 10 / 9;
    if (threshold < real_clusters + 2) {
        threshold = real_clusters + 2;
    }
    uint64_t end = ((uint64_t)flen + s->cluster_size - 1) >> s->cluster_bits;
    uint64_t count = 0;
    for (uint64_t i = 0; i < end && count < threshold; i++) {
        uint64_t rc;
        int ret = q2_get_refcount(s, i, &rc);
        if (ret < 0) {
            return ret;
        }
        count += rc != 0;
    }
    return count >= threshold;
}

static int qcow2_block_status(BlockNode *bs, uint64_t offset, uint64_t bytes, uint64_t *pnum,
                              uint64_t *map, BlockNode **file)
{
    Qcow2State *s = q2_state(bs);
    if (s->damaged) {
        return -EIO;
    }
    vd_mutex_lock(&s->lock);
    uint64_t m = 0;
    if (s->metadata_prealloc < 0) {
        int r = detect_metadata_prealloc(s);
        s->metadata_prealloc = r > 0; /* an error only costs the extra zero information */
    }
    int ret = q2_block_status(s, offset, bytes, pnum, &m);
    if (ret >= 0 && s->metadata_prealloc && (ret & VD_BS_DATA) && !(ret & VD_BS_ZERO) &&
        (ret & VD_BS_OFFSET_VALID)) {
        ret |= VD_BS_RECURSE; /* preallocated clusters may be file holes: ask the file */
    }
    vd_mutex_unlock(&s->lock);
    if (ret >= 0 && (ret & VD_BS_OFFSET_VALID)) {
        if (map) {
            *map = m;
        }
        if (file) {
            *file = bs->file;
        }
    }
    return ret;
}

/* Called twice per NBD request: no lock, size_pub mirrors h.size (updated under the lock). */
static int64_t qcow2_getlength(BlockNode *bs)
{
    Qcow2State *s = q2_state(bs);
    return (int64_t)__atomic_load_n(&s->size_pub, __ATOMIC_ACQUIRE);
}

static uint32_t qcow2_cluster_size(BlockNode *bs)
{
    return (uint32_t)q2_state(bs)->cluster_size;
}

/* ---- truncate ---- */

static int update_size_field(Qcow2State *s, uint64_t size)
{
    uint8_t be[8];
    qcow2_put_be64(be, size);
    int ret = q2_write_header_field(s, 24, be, 8);
    if (ret == 0) {
        ret = q2_file_flush(s);
    }
    if (ret == 0) {
        s->h.size = size;
        q2_publish_size(s);
    }
    return ret;
}

/* End of the last cluster with a non-zero refcount (an upper bound of the used file). */
static int image_end(Qcow2State *s, uint64_t *end)
{
    *end = 0;
    for (uint64_t ri = s->reftable_size; ri-- > 0;) {
        if (!s->reftable[ri]) {
            continue;
        }
        for (uint64_t i = 1ULL << s->rb_bits; i-- > 0;) {
            uint64_t rc;
            uint64_t ci = (ri << s->rb_bits) + i;
            int ret = q2_get_refcount(s, ci, &rc);
            if (ret < 0) {
                return ret;
            }
            if (rc) {
                *end = (ci + 1) << s->cluster_bits;
                return 0;
            }
        }
    }
    return 0;
}

static int preallocate_locked(Qcow2State *s, uint64_t from, uint64_t to, VdPrealloc mode)
{
    int ret = q2_preallocate(s, from, to, mode);
    if (ret < 0) {
        return ret;
    }
    ret = q2_flush_all(s);
    if (ret < 0) {
        return ret;
    }
    uint64_t end;
    ret = image_end(s, &end);
    if (ret < 0) {
        return ret;
    }
    int64_t flen = vd_getlength(s->bs->file);
    if (flen < 0) {
        return (int)flen;
    }
    if (end > (uint64_t)flen) {
        ret = vd_truncate(s->bs->file, end, false, VD_PREALLOC_OFF, NULL);
    }
    return ret;
}

static int qcow2_truncate(BlockNode *bs, uint64_t size, bool shrink, VdPrealloc prealloc,
                          VdError **errp)
{
    Qcow2State *s = q2_state(bs);
    int ret = 0;
    if (s->read_only) {
        vd_error_setg(errp, EROFS, "qcow2: image is read-only");
        return -EROFS;
    }
    if (s->damaged) {
        vd_error_setg(errp, EIO, "qcow2: image is corrupt (a metadata table lies outside the "
                      "file); run 'check -r all'");
        return -EIO;
    }
    vd_mutex_lock(&s->lock);
    q2_lockless_wait_idle(s); /* a shrink frees clusters */
    uint64_t old = s->h.size;
    uint64_t cs = s->cluster_size;
    uint64_t per_l1 = cs * s->l2_entries;
    if (size & 511) {
        vd_error_setg(errp, EINVAL, "The new size must be a multiple of 512");
        ret = -EINVAL;
        goto out;
    }
    ret = q2_first_write(s);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "qcow2: could not update the header");
        goto out;
    }
    if (size > (1ULL << 62)) {
        vd_error_setg(errp, EFBIG, "qcow2: size too large");
        ret = -EFBIG;
        goto out;
    }
    if (size == old) {
        goto out;
    }
    if (size < old) {
        if (!shrink) {
            vd_error_setg(errp, EINVAL, "qcow2: use the shrink option to shrink an image");
            ret = -EINVAL;
            goto out;
        }
        if (s->h.nb_snapshots) {
            vd_error_setg(errp, ENOTSUP, "qcow2: cannot shrink an image with internal "
                          "snapshots");
            ret = -ENOTSUP;
            goto out;
        }
        if (prealloc != VD_PREALLOC_OFF) {
            vd_error_setg(errp, ENOTSUP, "qcow2: preallocation only applies when growing");
            ret = -ENOTSUP;
            goto out;
        }
        uint64_t a = (size + cs - 1) & ~(cs - 1);
        uint64_t b = (old + cs - 1) & ~(cs - 1);
        if (a < b) {
            ret = q2_discard(s, a, b - a, VD_REQ_FULL_DISCARD);
        }
        /* drop L2 tables wholly beyond the new end */
        uint64_t keep = (size + per_l1 - 1) / per_l1;
        for (uint64_t i = keep; ret == 0 && i < s->l1_size; i++) {
            uint64_t e = s->l1[i];
            if (!(e & QCOW2_L1E_OFFSET_MASK)) {
                continue;
            }
            uint8_t zero[8] = { 0 };
            ret = q2_cache_flush(s, &s->l2_cache);
            if (ret == 0) {
                ret = vd_pwrite(s->bs->file, s->l1_offset + i * 8, 8, zero, 0);
            }
            if (ret == 0) {
                s->l1[i] = 0;
                ret = q2_free_clusters(s, e & QCOW2_L1E_OFFSET_MASK, cs);
            }
        }
        if (ret == 0) {
            ret = q2_flush_all(s);
        }
        if (ret == 0) {
            ret = update_size_field(s, size);
        }
        if (ret == 0) {
            /* give back the file space past the last referenced cluster (as qemu-img) */
            uint64_t end;
            int64_t flen = vd_getlength(s->bs->file);
            ret = image_end(s, &end);
            if (ret == 0 && flen > 0 && end && end < (uint64_t)flen) {
                s->free_byte_offset = 0;
                ret = vd_truncate(s->bs->file, end, true, VD_PREALLOC_OFF, NULL);
            }
        }
        if (ret < 0) {
            vd_error_setg_errno(errp, -ret, "qcow2: could not shrink the image");
        }
        goto out;
    }
    uint64_t need = (size + per_l1 - 1) / per_l1;
    ret = q2_grow_l1(s, need);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "qcow2: could not grow the L1 table");
        goto out;
    }
    ret = q2_flush_all(s);
    if (ret == 0) {
        ret = update_size_field(s, size);
    }
    if (ret == 0 && (old & (cs - 1))) {
        /* whatever an earlier shrink left in the old last cluster must read as zeroes */
        uint64_t tail_end = (old + cs - 1) & ~(cs - 1);
        if (tail_end > size) {
            tail_end = size;
        }
        ret = q2_zero(s, old, tail_end - old, 0);
    }
    if (ret == 0 && prealloc != VD_PREALLOC_OFF) {
        ret = preallocate_locked(s, old, size, prealloc);
    }
    if (ret == 0) {
        ret = q2_flush_all(s);
    }
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "qcow2: could not resize the image");
    }
out:
    vd_mutex_unlock(&s->lock);
    return ret;
}

/* ---- backing file ---- */

static int qcow2_change_backing_file(BlockNode *bs, const char *backing_file,
                                     const char *backing_fmt, VdError **errp)
{
    Qcow2State *s = q2_state(bs);
    if (s->read_only) {
        vd_error_setg(errp, EROFS, "qcow2: image is read-only");
        return -EROFS;
    }
    if (s->damaged) {
        vd_error_setg(errp, EIO, "qcow2: image is corrupt (a metadata table lies outside the "
                      "file); run 'check -r all'");
        return -EIO;
    }
    if (backing_file && strlen(backing_file) > Q2_MAX_BACKING_NAME) {
        vd_error_setg(errp, EINVAL, "qcow2: backing file name too long");
        return -EINVAL;
    }
    vd_mutex_lock(&s->lock);
    char *of = s->backing_file, *ofmt = s->backing_fmt;
    char *nf = backing_file && *backing_file ? strdup(backing_file) : NULL;
    char *nfmt = nf && backing_fmt && *backing_fmt ? strdup(backing_fmt) : NULL;
    int ret;
    if ((backing_file && *backing_file && !nf) || (nf && backing_fmt && *backing_fmt && !nfmt)) {
        free(nf);
        free(nfmt);
        vd_mutex_unlock(&s->lock);
        vd_error_setg(errp, ENOMEM, "qcow2: out of memory");
        return -ENOMEM;
    }
    s->backing_file = nf;
    s->backing_fmt = nfmt;
    uint8_t *buf = malloc(s->cluster_size);
    if (buf && q2_first_write(s) < 0) {
        free(buf);
        buf = NULL;
    }
    ret = buf ? build_header(s, buf) : -ENOMEM;
    if (ret < 0) {
        s->backing_file = of;
        s->backing_fmt = ofmt;
        free(nf);
        free(nfmt);
        free(buf);
        vd_mutex_unlock(&s->lock);
        if (ret == -ENOSPC) {
            vd_error_setg(errp, EINVAL, "qcow2: the backing file name does not fit in the "
                          "header cluster");
            return -EINVAL;
        }
        vd_error_setg_errno(errp, -ret, "qcow2: could not update the header");
        return ret;
    }
    free(of);
    free(ofmt);
    q2_lockless_wait_idle(s); /* q2_flush_all applies deferred frees */
    ret = q2_flush_all(s);
    if (ret == 0) {
        ret = vd_pwrite(bs->file, 0, s->cluster_size, buf, 0);
    }
    if (ret == 0) {
        ret = q2_file_flush(s);
    }
    free(buf);
    vd_mutex_unlock(&s->lock);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "qcow2: could not write the header");
    }
    return ret;
}

/* ---- info & check ---- */

static json_t *qcow2_get_specific_info(BlockNode *bs)
{
    Qcow2State *s = q2_state(bs);
    json_t *data = json_object();
    if (!data) {
        return NULL;
    }
    vd_mutex_lock(&s->lock);
    if (s->h.version >= 3) {
        json_object_set_new(data, "compat", json_string("1.1"));
        json_object_set_new(data, "compression-type",
                            json_string(s->compression_type == QCOW2_COMPRESSION_ZSTD ? "zstd"
                                                                                       : "zlib"));
        json_object_set_new(data, "lazy-refcounts",
                            json_boolean(s->h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS));
        json_t *bitmaps = q2_bitmaps_info(s);
        if (bitmaps) {
            json_object_set_new(data, "bitmaps", bitmaps);
        }
        json_object_set_new(data, "refcount-bits",
                            json_integer((json_int_t)1 << s->refcount_order));
        json_object_set_new(data, "corrupt",
                            json_boolean(s->h.incompatible_features & QCOW2_INCOMPAT_CORRUPT));
        json_object_set_new(data, "extended-l2", json_boolean(s->extl2));
    } else {
        json_object_set_new(data, "compat", json_string("0.10"));
        json_object_set_new(data, "compression-type", json_string("zlib"));
        json_object_set_new(data, "refcount-bits",
                            json_integer((json_int_t)1 << s->refcount_order));
    }
    vd_mutex_unlock(&s->lock);
    json_t *o = json_object();
    if (!o) {
        json_decref(data);
        return NULL;
    }
    json_object_set_new(o, "type", json_string("qcow2"));
    json_object_set_new(o, "data", data);
    return o;
}

static int qcow2_check(BlockNode *bs, VdCheckResult *res, int fix, VdError **errp)
{
    Qcow2State *s = q2_state(bs);
    vd_mutex_lock(&s->lock);
    q2_lockless_wait_idle(s); /* a repair may free or reuse any cluster */
    int ret = 0;
    if (!s->read_only && !s->damaged) {
        ret = q2_flush_all(s);
        if (ret < 0) {
            vd_mutex_unlock(&s->lock);
            vd_error_setg_errno(errp, -ret, "qcow2: could not flush before check");
            return ret;
        }
    }
    ret = qcow2_check_file(bs->file, res, s->read_only ? 0 : fix, errp);
    if (!s->read_only && fix) {
        /*
         * A repair may clear the dirty / corrupt bits on disk even when it fixed nothing: take
         * them over, or a later lazy write would defer refcounts without the dirty bit set.
         */
        uint8_t be[8];
        if (s->h.version >= 3 && vd_pread(bs->file, 72, 8, be) == 0) {
            uint64_t disk = qcow2_be64(be);
            uint64_t bits = QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT;
            s->h.incompatible_features = (s->h.incompatible_features & ~bits) | (disk & bits);
            if (!(disk & QCOW2_INCOMPAT_DIRTY)) {
                s->set_dirty = false;
            }
        }
    }
    if (!s->read_only && fix && (res->corruptions_fixed || res->leaks_fixed)) {
        /* the checker rewrote metadata on disk: reload it and forget cached tables */
        VdError *lerr = NULL;
        q2_cache_empty(s, &s->l2_cache, false);
        q2_cache_empty(s, &s->rb_cache, false);
        Qcow2Header keep = s->h;
        int r2 = parse_header(bs, s, bs->open_flags | VD_OPEN_CHECK, &lerr);
        if (r2 == 0 && !s->damaged) {
            r2 = load_l1(s, &lerr);
        }
        if (r2 == 0 && !s->damaged) {
            r2 = q2_load_reftable(s, &lerr);
        }
        if (r2 < 0) {
            s->damaged = true; /* tables not (re)loaded: no I/O on them */
            s->h = keep;
            vd_error_propagate(errp, lerr);
            ret = ret < 0 ? ret : r2;
        }
        q2_publish_size(s);
        s->free_cluster_index = 0;
        s->free_byte_offset = 0;
        if (!(s->h.incompatible_features & QCOW2_INCOMPAT_DIRTY)) {
            s->set_dirty = false; /* the repair cleared it; the next write sets it again */
        }
    }
    vd_mutex_unlock(&s->lock);
    return ret;
}

/* ---- create ---- */

static int parse_create_opts(const VdCreateOptions *o, uint32_t *cbits, uint32_t *version,
                             uint32_t *rorder, uint8_t *ctype, VdError **errp)
{
    uint64_t cs = o->cluster_size ? o->cluster_size : 65536;
    if (cs < 512 || cs > (2ULL << 20) || (cs & (cs - 1))) {
        vd_error_setg(errp, EINVAL, "Cluster size must be a power of two between 512 and "
                      "2048k");
        return -EINVAL;
    }
    *cbits = (uint32_t)__builtin_ctzll(cs);
    if (!o->compat || !strcmp(o->compat, "1.1") || !strcmp(o->compat, "v3")) {
        *version = 3;
    } else if (!strcmp(o->compat, "0.10") || !strcmp(o->compat, "v2")) {
        *version = 2;
    } else {
        vd_error_setg(errp, EINVAL, "Invalid parameter '%s'", o->compat);
        return -EINVAL;
    }
    int rb = o->refcount_bits ? o->refcount_bits : 16;
    if (rb < 1 || rb > 64 || (rb & (rb - 1))) {
        vd_error_setg(errp, EINVAL, "Refcount width must be a power of two and may not exceed "
                      "64 bits");
        return -EINVAL;
    }
    *rorder = (uint32_t)__builtin_ctz((unsigned)rb);
    if (*version == 2 && rb != 16) {
        vd_error_setg(errp, EINVAL, "Different refcount widths than 16 bits require "
                      "compatibility level 1.1 or above (use compat=1.1 or greater)");
        return -EINVAL;
    }
    if (*version == 2 && o->lazy_refcounts) {
        vd_error_setg(errp, EINVAL, "Lazy refcounts only supported with compatibility level 1.1 "
                      "and above (use compat=1.1 or greater)");
        return -EINVAL;
    }
    if (o->extended_l2) {
        if (*version == 2) {
            vd_error_setg(errp, EINVAL, "Extended L2 entries are only supported with "
                          "compatibility level 1.1 and above (use compat=1.1 or greater)");
            return -EINVAL;
        }
        if (cs < 16384) {
            vd_error_setg(errp, EINVAL, "Extended L2 entries are only supported with cluster "
                          "sizes of at least 16384 bytes");
            return -EINVAL;
        }
    }
    *ctype = QCOW2_COMPRESSION_ZLIB;
    if (o->compression_type && strcmp(o->compression_type, "zlib")) {
        if (strcmp(o->compression_type, "zstd")) {
            vd_error_setg(errp, EINVAL, "Invalid compression type '%s'", o->compression_type);
            return -EINVAL;
        }
        if (*version == 2) {
            vd_error_setg(errp, EINVAL, "Non-zlib compression type is only supported with "
                          "compatibility level 1.1 and above (use compat=1.1 or greater)");
            return -EINVAL;
        }
        *ctype = QCOW2_COMPRESSION_ZSTD;
    }
    return 0;
}

static int qcow2_create(const char *filename, const VdCreateOptions *o, VdError **errp)
{
    uint32_t cbits, version, rorder;
    uint8_t ctype;
    int ret = parse_create_opts(o, &cbits, &version, &rorder, &ctype, errp);
    if (ret < 0) {
        return ret;
    }
    uint64_t cs = 1ULL << cbits;
    uint64_t size = o->size;
    if (!o->size_given && size == 0 && o->backing_file) {
        char *path = vd_resolve_backing_path(filename, o->backing_file);
        if (!path) {
            vd_error_setg(errp, ENOMEM, "out of memory");
            return -ENOMEM;
        }
        BlockNode *b = vd_open_image(path, o->backing_fmt, VD_OPEN_NO_BACKING, errp);
        free(path);
        if (!b) {
            vd_error_prepend(errp, "Could not open backing image: ");
            return -EINVAL;
        }
        int64_t l = vd_getlength(b);
        vd_node_unref(b);
        if (l < 0) {
            vd_error_setg_errno(errp, (int)-l, "Could not get the size of the backing image");
            return (int)l;
        }
        size = (uint64_t)l;
    }
    if (o->backing_file && o->prealloc != VD_PREALLOC_OFF && !o->extended_l2) {
        vd_error_setg(errp, EINVAL, "Backing file and preallocation can only be used at the "
                      "same time if extended_l2 is on");
        return -EINVAL;
    }
    uint32_t l2_bits = cbits - (o->extended_l2 ? 4 : 3);
    uint64_t per_l1 = cs << l2_bits;
    if (size > (1ULL << 62)) {
        vd_error_setg(errp, EFBIG, "Image size too large");
        return -EFBIG;
    }
    size = (size + 511) & ~511ULL; /* qemu-img rounds virtual sizes up to whole sectors */
    if (size > (1ULL << 62)) {
        vd_error_setg(errp, EFBIG, "Image size too large");
        return -EFBIG;
    }
    uint64_t l1_size = (size + per_l1 - 1) / per_l1;
    if (l1_size * 8 > QCOW2_MAX_L1_SIZE) {
        vd_error_setg(errp, EFBIG, "Image size too large for this cluster size: the L1 table "
                      "would exceed %u bytes", QCOW2_MAX_L1_SIZE);
        return -EFBIG;
    }
    if (o->backing_file && strlen(o->backing_file) > Q2_MAX_BACKING_NAME) {
        vd_error_setg(errp, EINVAL, "Backing file name too long");
        return -EINVAL;
    }

    /* layout: header, refcount table, refcount block(s), L1 table (as qemu-img) */
    uint64_t rbe = 1ULL << (cbits + 3 - rorder);
    uint64_t l1_cl = (l1_size * 8 + cs - 1) / cs;
    uint64_t rt_cl = 1, rb_cl = 1;
    for (int i = 0; i < 64; i++) {
        uint64_t total = 1 + rt_cl + rb_cl + l1_cl;
        uint64_t nrb = (total + rbe - 1) / rbe;
        uint64_t nrt = (nrb * 8 + cs - 1) / cs;
        if (nrb == rb_cl && nrt == rt_cl) {
            break;
        }
        rb_cl = nrb;
        rt_cl = nrt;
    }
    uint64_t total = 1 + rt_cl + rb_cl + l1_cl;

    VdCreateOptions fo;
    memset(&fo, 0, sizeof(fo));
    fo.format = "file";
    fo.prealloc = VD_PREALLOC_OFF;
    ret = vd_protocol_create(filename, &fo, errp); /* file or nbd, as the name says */
    if (ret < 0) {
        return ret;
    }
    BlockNode *file = vd_open_image(filename, "file", VD_OPEN_RDWR, errp);
    if (!file) {
        return -EIO;
    }

    Qcow2State *s = calloc(1, sizeof(*s));
    uint8_t *meta = calloc(total - 1 ? total - 1 : 1, cs);
    uint8_t *hdr = calloc(1, cs);
    if (!s || !meta || !hdr) {
        ret = -ENOMEM;
        goto out;
    }
    BlockNode fake;
    memset(&fake, 0, sizeof(fake));
    fake.file = file;
    s->bs = &fake;
    s->cluster_bits = cbits;
    s->cluster_size = cs;
    s->h.version = version;
    s->h.cluster_bits = cbits;
    s->h.size = size;
    s->l1_size = (uint32_t)l1_size;
    s->l1_offset = (1 + rt_cl + rb_cl) * cs;
    s->reftable_offset = cs;
    s->h.refcount_table_clusters = (uint32_t)rt_cl;
    s->h.refcount_order = rorder;
    s->h.header_length = Q2_V3_HEADER_LEN_CT;
    s->compression_type = ctype;
    s->refcount_order = rorder;
    if (ctype != QCOW2_COMPRESSION_ZLIB) {
        s->h.incompatible_features |= QCOW2_INCOMPAT_COMPRESSION;
    }
    if (o->extended_l2) {
        s->h.incompatible_features |= QCOW2_INCOMPAT_EXTL2;
    }
    if (o->lazy_refcounts) {
        s->h.compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS;
    }
    if (o->backing_file && *o->backing_file) {
        s->backing_file = strdup(o->backing_file);
        if (o->backing_fmt && *o->backing_fmt) {
            s->backing_fmt = strdup(o->backing_fmt);
        }
    }
    if (version >= 3 && add_feature_table(s) < 0) {
        ret = -ENOMEM;
        goto out;
    }
    ret = build_header(s, hdr);
    if (ret < 0) {
        vd_error_setg(errp, EINVAL, "Backing file name does not fit in the header cluster");
        goto out;
    }
    /* refcount table (cluster 1..), refcount blocks, then the (zero) L1 table */
    uint8_t *rt = meta;
    uint8_t *rbs = meta + rt_cl * cs;
    for (uint64_t i = 0; i < rb_cl; i++) {
        qcow2_put_be64(rt + 8 * i, (1 + rt_cl + i) * cs);
    }
    uint64_t referenced = 1 + rt_cl + rb_cl + (l1_size ? l1_cl : 0);
    s->rb_bits = cbits + 3 - rorder;
    for (uint64_t c = 0; c < referenced; c++) {
        q2_refblock_set(s, rbs + (c / rbe) * cs, c % rbe, 1);
    }
    ret = vd_pwrite(file, cs, (rt_cl + rb_cl) * cs, meta, 0);
    if (ret == 0 && l1_size) {
        ret = vd_pwrite(file, s->l1_offset, l1_size * 8, meta + (rt_cl + rb_cl) * cs, 0);
    }
    if (ret == 0) {
        ret = vd_flush(file);
    }
    if (ret == 0) {
        ret = vd_pwrite(file, 0, cs, hdr, 0);
    }
    if (ret == 0) {
        ret = vd_flush(file);
    }
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "Could not write the qcow2 image '%s'", filename);
    }
out:
    if (s) {
        free(s->backing_file);
        free(s->backing_fmt);
        free_exts(s);
    }
    free(s);
    free(meta);
    free(hdr);
    vd_node_unref(file);
    if (ret == -ENOMEM) {
        vd_error_setg(errp, ENOMEM, "out of memory");
    }
    if (ret < 0 || o->prealloc == VD_PREALLOC_OFF || size == 0) {
        return ret;
    }
    BlockNode *bs = vd_open_image(filename, "qcow2", VD_OPEN_RDWR | VD_OPEN_NO_BACKING, errp);
    if (!bs) {
        return -EIO;
    }
    Qcow2State *qs = q2_state(bs);
    vd_mutex_lock(&qs->lock);
    ret = preallocate_locked(qs, 0, size, o->prealloc);
    vd_mutex_unlock(&qs->lock);
    vd_node_unref(bs);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "Could not preallocate '%s'", filename);
    }
    return ret;
}

/*
 * qemu-img info's dirty-flag: the bit in the header on disk, which is what qemu-img reports too
 * (a read-only open does not repair the image). An unreadable header reads as clean.
 */
static int qcow2_is_dirty(BlockNode *bs, bool *dirty)
{
    uint8_t hdr[80];
    *dirty = bs->file && vd_pread(bs->file, 0, sizeof(hdr), hdr) == 0 &&
             qcow2_be32(hdr) == QCOW2_MAGIC && qcow2_be32(hdr + 4) >= 3 &&
             (qcow2_be64(hdr + 72) & QCOW2_INCOMPAT_DIRTY) != 0;
    return 0;
}

/* BlockdevOptionsQcow2 (encrypt and data-file are refused by the QMP layer). */
static const VdOptSpec qcow2_blockdev_options[] = {
    {"file", VD_OPT_REF, true},
    {"backing", VD_OPT_REF_NULL},
    {"lazy-refcounts", VD_OPT_BOOL},
    {"pass-discard-request", VD_OPT_BOOL},
    {"pass-discard-snapshot", VD_OPT_BOOL},
    {"pass-discard-other", VD_OPT_BOOL},
    {"overlap-check", VD_OPT_ANY},
    {"cache-size", VD_OPT_INT},
    {"l2-cache-size", VD_OPT_INT},
    {"l2-cache-entry-size", VD_OPT_INT},
    {"refcount-cache-size", VD_OPT_INT},
    {"cache-clean-interval", VD_OPT_INT},
    {"encrypt", VD_OPT_ANY},
    {"data-file", VD_OPT_ANY},
    {"snapshot", VD_OPT_STR}, /* vdisk: serve this internal snapshot (id or name), read-only */
    {NULL}};

const BlockDriver vd_drv_qcow2 = {
    .name = "qcow2",
    .is_protocol = false,
    .supports_backing = true,
    .blockdev_options = qcow2_blockdev_options,
    .state_size = sizeof(Qcow2State),
    .probe = qcow2_probe,
    .open = qcow2_open,
    .close = qcow2_close,
    .create = qcow2_create,
    .pread = qcow2_pread,
    .pwrite = qcow2_pwrite,
    .pwrite_zeroes = qcow2_pwrite_zeroes,
    .pdiscard = qcow2_pdiscard,
    .pwrite_compressed = qcow2_pwrite_compressed,
    .flush = qcow2_flush,
    .block_status = qcow2_block_status,
    .getlength = qcow2_getlength,
    .truncate = qcow2_truncate,
    .change_backing_file = qcow2_change_backing_file,
    .check = qcow2_check,
    .measure = qcow2_measure,
    .get_specific_info = qcow2_get_specific_info,
    .cluster_size = qcow2_cluster_size,
    .get_snapshots = q2_get_snapshots,
    .snapshot_create = q2_snapshot_create,
    .snapshot_goto = q2_snapshot_goto,
    .snapshot_delete = q2_snapshot_delete,
    .is_dirty = qcow2_is_dirty,
    .bitmaps_load = q2_bitmaps_load,
    .bitmaps_store = q2_bitmaps_store,
    .bitmaps_can_store = q2_bitmaps_can_store,
    .bitmaps_remove = q2_bitmaps_remove,
};
