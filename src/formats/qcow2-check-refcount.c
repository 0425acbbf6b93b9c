/*
 * qcow2-check-refcount.c - the checker's reference counting: every cluster the header, L1/L2
 * tables, snapshots and bitmaps reference is counted (check_l1/check_l2 also check the entries),
 * then compared with the stored refcounts, repaired, or rebuilt from scratch past the end of the
 * file (flushed before the header switches to it). Reads and writes only through Chk's file.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2-check-int.h"

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

int chk_rb_writeback(Chk *c)
{
    if (!c->rb_valid || !c->rb_dirty) {
        return 0;
    }
    int ret = chk_write_file(c, c->rb_offset, c->cluster_size, c->rb_buf);
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
    int ret = chk_rb_writeback(c);
    if (ret < 0) {
        return ret;
    }
    c->rb_valid = false;
    ret = chk_read_padded(c, offset, c->cluster_size, c->rb_buf);
    if (ret < 0) {
        return ret;
    }
    c->rb_offset = offset;
    c->rb_valid = true;
    return 0;
}

/* Stored refcount of cluster idx (0 when its refcount block is absent). */
int chk_stored_refcount(Chk *c, uint64_t idx, uint64_t *val)
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
int chk_set_stored_refcount(Chk *c, uint64_t idx, uint64_t val)
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
        chk_say(c,
            "ERROR: counting reference for region exceeding the end of the file by one cluster "
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
            chk_say(c, "ERROR: overflow cluster offset=0x%" PRIx64 "\n", k << c->cluster_bits);
            chk_say(c,
                "Use qemu-img amend to increase the refcount entry width or qemu-img convert "
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
        chk_say(c, "ERROR: Overlap check failed\n");
        c->res->check_errors++;
        return -EIO;
    }
    int ret = chk_write_file(c, at, c->l2_entry_size, p);
    if (ret < 0) {
        chk_say(c, "ERROR: Failed to overwrite L2 table entry: %s\n", strerror(-ret));
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
    int ret = chk_read_padded(c, l2_offset, c->cluster_size, l2);
    if (ret < 0) {
        chk_say(c, "ERROR: I/O error in check_refcounts_l2\n");
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
            chk_say(c, "ERROR found l2 entry with reserved bits set: %" PRIx64 "\n", e);
            res->corruptions++;
        }
        switch (type) {
        case QCOW2_CLUSTER_COMPRESSED: {
            if (e & QCOW2_OFLAG_COPIED) {
                chk_say(c, "ERROR: coffset=0x%" PRIx64 ": copied flag must never be set for "
                       "compressed clusters\n", e & c->cluster_offset_mask);
                e &= ~QCOW2_OFLAG_COPIED;
                res->corruptions++;
            }
            if (c->data_file) {
                chk_say(c, "ERROR compressed cluster %" PRIu64 " with data file, entry=0x%" PRIx64
                       "\n", i, e);
                res->corruptions++;
                break;
            }
            if (bm) {
                chk_say(c,
                    "ERROR compressed cluster %" PRIu64 " with non-zero subcluster allocation "
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
                chk_say(c, "ERROR offset=%" PRIx64 ": Allocated cluster has corrupted subcluster "
                       "allocation bitmap\n", offset);
            }
            if (off_in_cluster(c, offset)) {
                bool has_data = c->extl2 ? (bm & QCOW2_L2_BITMAP_ALL_ALLOC) != 0
                                         : !(e & QCOW2_OFLAG_ZERO);
                res->corruptions++;
                if (!has_data) {
                    bool fixing = (c->fix & VD_FIX_ERRORS) != 0;
                    chk_say(c,
                        "%s offset=%" PRIx64 ": Preallocated cluster is not properly aligned; "
                        "L2 entry corrupted.\n", fixing ? "Repairing" : "ERROR", offset);
                    if (fixing && fix_l2_entry_by_zero(c, l2_offset, l2, i) == 0) {
                        continue; /* the cluster is not referenced any more */
                    }
                } else {
                    chk_say(c, "ERROR offset=%" PRIx64 ": Data cluster is not properly aligned; L2 "
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
                chk_say(c, "ERROR: Unallocated cluster has non-zero subcluster allocation map\n");
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
        ret = chk_load_u64_table(c, l1_offset, in_file, &l1);
        if (ret < 0) {
            chk_say(c, "ERROR: I/O error in check_refcounts_l1\n");
            res->check_errors++;
            return ret;
        }
    }
    for (uint32_t i = 0; i < in_file; i++) {
        if (!l1[i]) {
            continue;
        }
        if (l1[i] & QCOW2_L1E_RESERVED_MASK) {
            chk_say(c, "ERROR found L1 entry with reserved bits set: %" PRIx64 "\n", l1[i]);
            res->corruptions++;
        }
        uint64_t l2_offset = l1[i] & QCOW2_L1E_OFFSET_MASK;
        inc_refs(c, l2_offset, c->cluster_size);
        if (off_in_cluster(c, l2_offset)) {
            chk_say(c, "ERROR l2_offset=%" PRIx64 ": Table is not cluster aligned; L1 entry "
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
        chk_say(c, "ERROR bitmap directory too small\n");
        res->corruptions++;
        return 0;
    }
    uint8_t *dir = malloc(c->bm_dir_size);
    if (!dir) {
        res->check_errors++;
        return -ENOMEM;
    }
    int ret = chk_read_padded(c, c->bm_dir_offset, c->bm_dir_size, dir);
    if (ret < 0) {
        chk_say(c, "ERROR: could not read the bitmap directory: %s\n", strerror(-ret));
        res->check_errors++;
        free(dir);
        return ret;
    }
    uint64_t pos = 0;
    for (uint32_t n = 0; n < c->nb_bitmaps; n++) {
        if (c->bm_dir_size - pos < CHK_BITMAP_DIR_ENTRY_SIZE) {
            chk_say(c, "ERROR bitmap directory is truncated (bitmap %u)\n", n);
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
            chk_say(c, "ERROR bitmap directory entry %u exceeds the directory\n", n);
            res->corruptions++;
            break;
        }
        pos += entry_len;

        uint64_t table_bytes = (uint64_t)table_size * 8;
        /* As QEMU: a bitmap may cover at most 64 MiB of bitmap data (bounds the table too). */
        if (off_in_cluster(c, table_offset) || table_size == 0 ||
            (uint64_t)table_size * c->cluster_size > CHK_MAX_BITMAP_DATA ||
            table_offset > (uint64_t)INT64_MAX) {
            chk_say(c, "ERROR bitmap %u has an invalid bitmap table (offset 0x%" PRIx64 ", %" PRIu32
                   " entries)\n", n, table_offset, table_size);
            res->corruptions++;
            continue;
        }
        inc_refs(c, table_offset, table_bytes);
        uint64_t *table = NULL;
        ret = chk_load_u64_table(c, table_offset, table_size, &table);
        if (ret < 0) {
            chk_say(c, "ERROR: could not read bitmap table %u: %s\n", n, strerror(-ret));
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
            chk_say(c, "ERROR refcount table entry %" PRIu64 " has reserved bits set\n", i);
            res->corruptions++;
            *rebuild = true;
            continue;
        }
        if (off_in_cluster(c, off)) {
            chk_say(c,
                "ERROR refcount block %" PRIu64 " is not cluster aligned; refcount table entry "
                "corrupted\n", i);
            res->corruptions++;
            *rebuild = true;
            continue;
        }
        if (cluster >= file_clusters) {
            /* QEMU grows the file here; we rebuild instead (never write beyond EOF blindly). */
            chk_say(c, "ERROR refcount block %" PRIu64 " is outside image\n", i);
            res->corruptions++;
            if (c->fix & VD_FIX_ERRORS) {
                *rebuild = true;
            }
            continue;
        }
        if (off) {
            inc_refs(c, off, c->cluster_size);
            if (c->refs[cluster] != 1) {
                chk_say(c, "ERROR refcount block %" PRIu64 " refcount=%" PRIu32 "\n", i,
                    c->refs[cluster]);
                res->corruptions++;
                *rebuild = true;
            }
        }
    }
    return 0;
}

/* Fill c->refs from scratch (the in-memory refcount table). */
int chk_calculate_refcounts(Chk *c, bool *rebuild)
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
        chk_say(c, "ERROR %u snapshots in image with data file\n", c->nb_snaps);
        res->corruptions++;
    }
    for (uint32_t i = 0; i < c->nb_snaps; i++) {
        ChkSnapshot *sn = &c->snaps[i];
        if (off_in_cluster(c, sn->l1_offset)) {
            chk_say(c, "ERROR snapshot %s (%s) l1_offset=%#" PRIx64 ": L1 table is not cluster "
                   "aligned; snapshot table entry corrupted\n", sn->id, sn->name, sn->l1_offset);
            res->corruptions++;
            continue;
        }
        if (sn->l1_size > QCOW2_MAX_L1_SIZE / 8) {
            chk_say(c,
                "ERROR snapshot %s (%s) l1_size=%#" PRIx32 ": L1 table is too large; snapshot "
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
void chk_compare_refcounts(Chk *c, int fix, bool *rebuild, uint64_t *highest)
{
    VdCheckResult *res = c->res;
    *highest = 0;
    for (uint64_t i = 0; i < c->nb_clusters; i++) {
        uint64_t r1, r2 = c->refs[i];
        int ret = chk_stored_refcount(c, i, &r1);
        if (ret < 0) {
            chk_say(c, "Can't get refcount for cluster %" PRIu64 ": %s\n", i, strerror(-ret));
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
        chk_say(c, "%s cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64 "\n",
            num_fixed ? "Repairing" : r1 < r2 ? "ERROR" : "Leaked", i, r1, r2);
        if (num_fixed && chk_set_stored_refcount(c, i, r2) == 0) {
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
int chk_rebuild_refcounts(Chk *c)
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
        chk_say(c, "ERROR allocating reftable: %s\n", strerror(EFBIG));
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
        chk_say(c, "ERROR allocating refblock: %s\n", vd_error_msg(local_err));
        vd_error_free(local_err);
        res->check_errors++;
        goto out;
    }
    int64_t len = vd_getlength(c->file);
    if (len < 0 || (uint64_t)len < new_end) {
        ret = len < 0 ? (int)len : -EIO;
        chk_say(c, "ERROR allocating refblock: file did not grow\n");
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
            chk_say(c, "ERROR writing refblock: %s\n", strerror(-ret));
            res->check_errors++;
            goto out;
        }
        table[b] = htobe64(rb_off);
    }
    ret = vd_pwrite(c->file, rt_offset, nrt * cs, table, 0);
    if (ret < 0) {
        chk_say(c, "ERROR writing reftable: %s\n", strerror(-ret));
        res->check_errors++;
        goto out;
    }
    ret = vd_flush(c->file);
    if (ret < 0) {
        chk_say(c, "ERROR writing reftable: %s\n", strerror(-ret));
        res->check_errors++;
        goto out;
    }
    /* [48, 100): reftable offset and size, and (amend) the refcount order, in one write */
    uint8_t hp[52];
    bool new_order = c->refcount_order != c->h.refcount_order;
    ret = new_order ? chk_read_padded(c, 48, sizeof(hp), hp) : 0;
    qcow2_put_be64(hp, rt_offset);
    qcow2_put_be32(hp + 8, (uint32_t)nrt);
    qcow2_put_be32(hp + 48, c->refcount_order);
    if (ret == 0) {
        ret = vd_pwrite(c->file, 48, new_order ? sizeof(hp) : 12, hp, 0);
    }
    if (ret == 0) {
        ret = vd_flush(c->file);
    }
    if (ret < 0) {
        chk_say(c, "ERROR setting reftable: %s\n", strerror(-ret));
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
    c->h.refcount_order = c->refcount_order;
    ret = 0;
out:
    free(block);
    free(table);
    return ret;
}

/* OFLAG_COPIED must be set exactly when the stored refcount is 1 (active L1 and its L2s). */
int chk_check_oflag_copied(Chk *c, int fix)
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
        if (chk_stored_refcount(c, l2_offset >> c->cluster_bits, &refcount) < 0) {
            continue; /* already reported by compare_refcounts */
        }
        if ((refcount == 1) != ((l1e & QCOW2_OFLAG_COPIED) != 0)) {
            chk_say(c, "%s OFLAG_COPIED L2 cluster: l1_index=%" PRIu32 " l1_entry=%" PRIx64
                   " refcount=%" PRIu64 "\n", fixing ? "Repairing" : "ERROR", i, l1e, refcount);
            if (fixing) {
                uint64_t ne = refcount == 1 ? l1e | QCOW2_OFLAG_COPIED : l1e & ~QCOW2_OFLAG_COPIED;
                uint8_t b[8];
                qcow2_put_be64(b, ne);
                ret = chk_write_file(c, c->l1_offset + (uint64_t)i * 8, 8, b);
                if (ret < 0) {
                    chk_say(c, "ERROR: Could not write L1 entry: %s\n", strerror(-ret));
                    res->check_errors++;
                    goto out;
                }
                c->l1[i] = ne;
                res->corruptions_fixed++;
            } else {
                res->corruptions++;
            }
        }
        ret = chk_read_padded(c, l2_offset, c->cluster_size, l2);
        if (ret < 0) {
            chk_say(c, "ERROR: Could not read L2 table: %s\n", strerror(-ret));
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
            if (chk_stored_refcount(c, data_offset >> c->cluster_bits, &refcount) < 0) {
                continue;
            }
            if ((refcount == 1) != ((e & QCOW2_OFLAG_COPIED) != 0)) {
                chk_say(c, "%s OFLAG_COPIED data cluster: l2_entry=%" PRIx64 " refcount=%" PRIu64
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
                chk_say(c, "ERROR: Could not write L2 table; metadata overlap check failed: %s\n",
                    strerror(EIO));
                res->check_errors++;
                ret = -EIO;
                goto out;
            }
            ret = chk_write_file(c, l2_offset, c->cluster_size, l2);
            if (ret < 0) {
                chk_say(c, "ERROR: Could not write L2 table: %s\n", strerror(-ret));
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
bool chk_has_refblock(Chk *c, uint64_t k)
{
    uint64_t rt = k >> c->rb_bits;
    if (rt >= c->reftable_entries) {
        return false;
    }
    uint64_t file_clusters = div_round_up(c->file_size, c->cluster_size);
    return refblock_usable(c, rt, file_clusters);
}
