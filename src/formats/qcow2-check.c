/*
 * qcow2-check.c - offline qcow2 check/repair (qemu-img check semantics; measure: qcow2-measure.c).
 * Reads the image only through the protocol node; every on-disk size/offset is bounded (file size,
 * format limits) before it drives a loop or an allocation. A check without fix never writes; a
 * rebuild writes new refcount structures past EOF, flushes, and only then switches the header.
 * This half loads the header, tables and snapshots and runs the passes; the reference counting and
 * refcount repair are qcow2-check-refcount.c (shared state in qcow2-check-int.h).
 */
#include "formats/qcow2-check-int.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2-format.h"

void chk_say(Chk *c, const char *fmt, ...)
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

int chk_read_padded(Chk *c, uint64_t offset, uint64_t len, void *buf)
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

int chk_write_file(Chk *c, uint64_t offset, uint64_t len, const void *buf)
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
    int ret = chk_read_padded(c, 0, end, buf);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "Could not read header extensions");
        free(buf);
        return ret;
    }
    uint64_t off = start;
    Qcow2ExtView e;
    /* QEMU's qcow2_read_extensions: an overlong extension is refused even as the end marker. */
    while (qcow2_ext_next(buf, end, &off, &e)) {
        if (!e.fits) {
            vd_error_setg(errp, EINVAL, "Header extension too large");
            free(buf);
            return -EINVAL;
        }
        if (e.type == QCOW2_EXT_END) {
            break;
        }
        const uint8_t *d = e.data;
        if (e.type == QCOW2_EXT_BITMAPS) {
            if (e.len != 24) {
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
        } else if (e.type == QCOW2_EXT_CRYPTO) {
            if (e.len != 16) {
                vd_error_setg(errp, EINVAL, "Invalid encryption header extension length");
                free(buf);
                return -EINVAL;
            }
            c->crypto_offset = qcow2_be64(d);
            c->crypto_length = qcow2_be64(d + 8);
        }
    }
    free(buf);
    return 0;
}

static int parse_header(Chk *c, VdError **errp)
{
    Qcow2Header *h = &c->h;
    uint8_t hdr[QCOW2_HEADER_DECODE_SIZE];

    int ret = chk_read_padded(c, 0, sizeof(hdr), hdr);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "Could not read qcow2 header");
        return ret;
    }
    qcow2_header_decode(hdr, h);
    uint8_t *cl = NULL;
    uint64_t cl_len = 0;
    if (h->cluster_bits >= QCOW2_MIN_CLUSTER_BITS && h->cluster_bits <= QCOW2_MAX_CLUSTER_BITS) {
        cl_len = 1ULL << h->cluster_bits; /* where unknown features may be named */
        cl = malloc(cl_len);
        if (!cl) {
            vd_error_setg(errp, ENOMEM, "Out of memory reading the qcow2 header");
            return -ENOMEM;
        }
        ret = chk_read_padded(c, 0, cl_len, cl);
        if (ret < 0) {
            free(cl);
            vd_error_setg_errno(errp, -ret, "Could not read qcow2 header");
            return ret;
        }
    }
    ret = qcow2_header_validate(h, cl, cl_len, QCOW2_VALIDATE_REPAIR, errp);
    free(cl);
    if (ret < 0) {
        return ret;
    }
    c->cluster_bits = h->cluster_bits;
    c->cluster_size = 1ULL << h->cluster_bits;

    /* Where QEMU's check differs from its open: an image without a data file refuses the
       data-file-raw bit only when it will do I/O. */
    if ((h->autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW) &&
        !(h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE)) {
        vd_error_setg(errp, EINVAL, "data-file-raw requires a data file");
        return -EINVAL;
    }
    c->extl2 = (h->incompatible_features & QCOW2_INCOMPAT_EXTL2) != 0;
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

    c->l1_size = h->l1_size;
    c->l1_offset = h->l1_table_offset;
    c->reftable_offset = h->refcount_table_offset;
    c->reftable_entries = ((uint64_t)h->refcount_table_clusters << c->cluster_bits) / 8;
    c->snapshots_offset = h->snapshots_offset;
    return parse_extensions(c, errp);
}

int chk_load_u64_table(Chk *c, uint64_t offset, uint64_t entries, uint64_t **out)
{
    *out = NULL;
    if (entries == 0) {
        return 0;
    }
    uint64_t *t = malloc(entries * 8);
    if (!t) {
        return -ENOMEM;
    }
    int ret = chk_read_padded(c, offset, entries * 8, t);
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
    *ret = chk_read_padded(c, off, len, s);
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
    /* As qemu-img check (its error_report lines): the check stops, "Check failed: <errno>". */
    if (off_in_cluster(c, off)) {
        chk_say(c, "%s: ERROR snapshot table offset invalid\n", program_invocation_short_name);
        c->res->check_errors++;
        return -EINVAL;
    }
    if (nb == 0) {
        return 0;
    }
    if (nb > CHK_MAX_SNAPSHOTS) {
        if (!repair) {
            chk_say(c, "%s: ERROR snapshot table too large\n", program_invocation_short_name);
            chk_say(c,
                "You can force-remove all %u overhanging snapshots with qemu-img check -r all\n",
                nb - CHK_MAX_SNAPSHOTS);
            c->res->check_errors++;
            return -EFBIG;
        }
        chk_say(c, "Discarding %u overhanging snapshots\n", nb - CHK_MAX_SNAPSHOTS);
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
        ret = chk_read_padded(c, pos, sizeof(sn->hdr), sn->hdr);
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
                chk_say(c, "ERROR failed to read the snapshot table: Too much extra metadata in "
                       "snapshot table entry %u\n", i);
                chk_say(c, "You can force-remove this extra metadata with qemu-img check -r all\n");
                c->res->check_errors++;
                vd_error_setg(errp, EFBIG, "Too much extra metadata in snapshot table entry %u",
                              i);
                return -EFBIG;
            }
            chk_say(c, "Discarding too much extra metadata in snapshot table entry %u (%" PRIu32
                   " > %u)\n", i, extra_size, CHK_MAX_SNAPSHOT_EXTRA);
            c->snap_corruptions++;
            sn->extra_size = 24; /* keep only the fields this format defines */
        }
        sn->extra = calloc(1, sn->extra_size ? sn->extra_size : 1);
        if (!sn->extra) {
            ret = -ENOMEM;
            goto io_fail;
        }
        ret = chk_read_padded(c, pos, sn->extra_size, sn->extra);
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
                chk_say(c, "ERROR failed to read the snapshot table: Snapshot table exceeds the "
                       "maximum supported size\n");
                c->res->check_errors++;
                vd_error_setg(errp, EFBIG, "Snapshot table exceeds the maximum supported size");
                return -EFBIG;
            }
            chk_say(c, "Discarding %u overhanging snapshots (snapshot table is too big)\n", nb - i);
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
                chk_say(c, "%s snapshot table entry %u is incomplete\n",
                    repair ? "Repairing" : "ERROR", i);
            }
        }
    }
    return 0;

io_fail:
    chk_say(c, "ERROR failed to read the snapshot table: %s\n", strerror(-ret));
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
        chk_say(c, "ERROR failed to update the snapshot count in the image header: %s\n",
            strerror(-ret));
        c->res->check_errors++;
        return ret;
    }
    c->h.nb_snapshots = c->nb_snaps;
    c->res->corruptions_fixed += (int)c->snap_reduced;
    return 0;
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
            bool ok = (k >= c->refs_alloc || c->refs[k] == 0) && chk_has_refblock(c, k) &&
                      chk_stored_refcount(c, k, &stored) == 0 && stored == 0;
            run = ok ? run + 1 : 0;
            if (run == n) {
                start = k + 1 - n;
            }
        }
        if (run < n) {
            chk_say(c, "ERROR failed to update snapshot table: %s\n", strerror(ENOSPC));
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
            ret = chk_set_stored_refcount(c, k, 1);
            if (ret < 0) {
                goto fail;
            }
        }
        ret = chk_rb_writeback(c);
        if (ret == 0) {
            ret = chk_write_file(c, start * cs, n * cs, buf);
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
            if (chk_stored_refcount(c, k, &r) == 0 && r > 0) {
                chk_set_stored_refcount(c, k, r - 1);
            }
        }
        chk_rb_writeback(c);
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
    chk_say(c, "ERROR failed to update snapshot table: %s\n", strerror(-ret));
    res->check_errors++;
    free(buf);
    return ret;
}

/* ---- one check pass ---- */

void chk_free_tables(Chk *c)
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

int chk_load(Chk *c, VdError **errp)
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
    ret = chk_load_u64_table(c, c->reftable_offset, c->reftable_entries, &c->reftable);
    if (ret < 0) {
        c->res->check_errors++;
        vd_error_setg_errno(errp, -ret, "Could not read the refcount table");
        return ret;
    }
    ret = chk_load_u64_table(c, c->l1_offset, c->l1_size, &c->l1);
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

    ret = chk_calculate_refcounts(c, &rebuild);
    if (ret < 0) {
        goto fail;
    }
    VdCheckResult pre_compare = *res;
    chk_compare_refcounts(c, 0, &rebuild, &highest);

    if (rebuild && (fix & VD_FIX_ERRORS)) {
        VdCheckResult old = *res;
        chk_say(c, "Rebuilding refcount structure\n");
        ret = chk_rebuild_refcounts(c);
        if (ret < 0) {
            goto fail;
        }
        res->corruptions = c->snap_corruptions; /* the snapshot table is repaired later */
        res->leaks = 0;
        rebuild = false;
        /* The fix pass already repaired L2 entries; count again against the new structure. */
        VdCheckResult keep_frag = *res;
        ret = chk_calculate_refcounts(c, &rebuild);
        if (ret < 0) {
            goto fail;
        }
        /* The statistics of the first count stand; the recount only finds what remains. */
        res->allocated_clusters = keep_frag.allocated_clusters;
        res->fragmented_clusters = keep_frag.fragmented_clusters;
        res->compressed_clusters = keep_frag.compressed_clusters;
        VdCheckResult saved = *res;
        chk_compare_refcounts(c, fix & VD_FIX_LEAKS, &rebuild, &highest);
        if (rebuild) {
            chk_say(c, "ERROR rebuilt refcount structure is still broken\n");
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
            chk_say(c, "ERROR need to rebuild refcount structures\n");
            res->check_errors++;
            vd_error_setg(errp, EIO, "The refcount structures need rebuilding (use -r all)");
            ret = -EIO;
            goto fail;
        }
        if (res->leaks || res->corruptions) {
            *res = pre_compare;
            chk_compare_refcounts(c, fix, &rebuild, &highest);
        }
    }
    ret = chk_rb_writeback(c);
    if (ret < 0) {
        chk_say(c, "ERROR writing refblock: %s\n", strerror(-ret));
        res->check_errors++;
        goto fail;
    }
    ret = chk_check_oflag_copied(c, fix);
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
    chk_rb_writeback(c);
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
