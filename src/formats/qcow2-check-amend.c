/*
 * qcow2-check-amend.c - the on-disk half of qcow2 amend (qemu-img amend): a new refcount width
 * and the expansion of zero clusters a version 2 image cannot express, done on the closed image
 * with the checker's machinery (count every reference, write a whole new refcount structure).
 * Crash safety: new clusters are counted in the new refcount structure (switched to by one header
 * write) before any L2 entry points at them, so an interruption leaves leaks at worst.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2-check-int.h"

/* The distinct L2 tables of the active L1 and every snapshot L1, sorted (host offsets). */
typedef struct L2Set {
    uint64_t *off;
    size_t n, cap;
} L2Set;

static int l2set_add_l1(Chk *c, L2Set *set, const uint64_t *l1, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        uint64_t off = l1[i] & QCOW2_L1E_OFFSET_MASK;
        if (!off) {
            continue;
        }
        if (set->n == set->cap) {
            size_t cap = set->cap ? set->cap * 2 : 64;
            uint64_t *o = realloc(set->off, cap * sizeof(*o));
            if (!o) {
                return -ENOMEM;
            }
            set->off = o;
            set->cap = cap;
        }
        set->off[set->n++] = off;
    }
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int l2set_collect(Chk *c, L2Set *set)
{
    int ret = l2set_add_l1(c, set, c->l1, c->l1_size);
    for (uint32_t i = 0; ret == 0 && i < c->nb_snaps; i++) {
        uint64_t *l1 = NULL;
        ret = chk_load_u64_table(c, c->snaps[i].l1_offset, c->snaps[i].l1_size, &l1);
        if (ret == 0) {
            ret = l2set_add_l1(c, set, l1, c->snaps[i].l1_size);
        }
        free(l1);
    }
    if (ret < 0) {
        return ret;
    }
    if (set->n == 0) {
        return 0;
    }
    qsort(set->off, set->n, sizeof(*set->off), cmp_u64);
    size_t w = 0;
    for (size_t i = 0; i < set->n; i++) {
        if (w == 0 || set->off[w - 1] != set->off[i]) {
            set->off[w++] = set->off[i];
        }
    }
    set->n = w;
    return 0;
}

static uint64_t refs_of(const uint32_t *refs, uint64_t n, uint32_t bits, uint64_t host)
{
    uint64_t k = host >> bits;
    return k < n ? refs[k] : 0;
}

/* What the expansion does with one zero entry. */
enum { Z_KEEP, Z_UNALLOC, Z_IN_PLACE, Z_NEW };

/*
 * orig: the counted references before the expansion (both walks decide alike from them).
 * A cluster used only through this table is zeroed in place; a shared one is left to its other
 * users and the entry gets a new cluster.
 */
static int zero_action(const Chk *c, const uint32_t *orig, uint64_t norig, uint64_t e,
                       uint64_t paths, bool has_backing)
{
    if ((e & QCOW2_OFLAG_COMPRESSED) || !(e & QCOW2_OFLAG_ZERO)) {
        return Z_KEEP;
    }
    uint64_t host = e & QCOW2_L2E_OFFSET_MASK;
    if (!host) {
        return has_backing ? Z_NEW : Z_UNALLOC;
    }
    return refs_of(orig, norig, c->cluster_bits, host) == paths ? Z_IN_PLACE : Z_NEW;
}

typedef struct Expand {
    L2Set set;
    uint32_t *orig;   /* c->refs before the plan */
    uint64_t norig;
    uint64_t first;   /* host offset of the first new cluster */
    uint64_t need;    /* new clusters */
} Expand;

/* Make c->refs cover cluster index k. */
static int refs_reserve(Chk *c, uint64_t k)
{
    if (k + 2 <= c->refs_alloc) {
        return 0;
    }
    if (k + 2 > CHK_MAX_CLUSTERS) {
        return -EFBIG;
    }
    uint64_t n = (k + 2) * 2 < CHK_MAX_CLUSTERS ? (k + 2) * 2 : CHK_MAX_CLUSTERS;
    uint32_t *r = realloc(c->refs, n * sizeof(*r));
    if (!r) {
        return -ENOMEM;
    }
    memset(r + c->refs_alloc, 0, (n - c->refs_alloc) * sizeof(*r));
    c->refs = r;
    c->refs_alloc = n;
    return 0;
}

/*
 * One walk over the zero entries of every L2 table. plan (apply false): validate, count the new
 * clusters and move the references in c->refs (a shared cluster loses the tables that stop using
 * it; new clusters get theirs). apply: rewrite the entries, zero the clusters kept in place.
 */
static int walk_zero_entries(Chk *c, Expand *x, bool has_backing, bool apply,
                             const Qcow2AmendFile *a, VdError **errp)
{
    uint64_t cs = c->cluster_size, next = x->first;
    uint8_t *l2 = malloc(cs), *zero = calloc(1, cs);
    int ret = 0;
    if (!l2 || !zero) {
        ret = -ENOMEM;
        vd_error_setg(errp, ENOMEM, "Out of memory");
        goto out;
    }
    x->need = apply ? x->need : 0;
    for (size_t t = 0; t < x->set.n; t++) {
        /* how many L1 tables reach this table: each of them references its clusters */
        uint64_t paths = refs_of(x->orig, x->norig, c->cluster_bits, x->set.off[t]);
        bool dirty = false, zeroed = false;
        ret = chk_read_padded(c, x->set.off[t], cs, l2);
        if (ret < 0) {
            vd_error_setg_errno(errp, -ret, "Could not read an L2 table");
            goto out;
        }
        for (uint64_t i = 0; i < c->l2_entries; i++) {
            uint64_t e = qcow2_be64(l2 + 8 * i), host = e & QCOW2_L2E_OFFSET_MASK, ne = e;
            if ((e & QCOW2_OFLAG_COMPRESSED) && c->h.compression_type != QCOW2_COMPRESSION_ZLIB) {
                vd_error_setg(errp, ENOTSUP, "Cannot downgrade an image with zstd compression "
                              "type and existing compressed clusters");
                ret = -ENOTSUP;
                goto out;
            }
            switch (zero_action(c, x->orig, x->norig, e, paths, has_backing)) {
            case Z_KEEP:
                continue;
            case Z_UNALLOC:
                ne = 0; /* unallocated reads as zeroes without a backing file */
                break;
            case Z_IN_PLACE:
                ne = e & ~QCOW2_OFLAG_ZERO;
                if (apply && (ret = vd_pwrite(c->file, host, cs, zero, 0)) < 0) {
                    vd_error_setg_errno(errp, -ret, "Could not write zeroes");
                    goto out;
                }
                zeroed = apply;
                break;
            case Z_NEW:
                if (!apply) {
                    uint64_t k = (x->first >> c->cluster_bits) + x->need++;
                    if ((ret = refs_reserve(c, k)) < 0) {
                        vd_error_setg_errno(errp, -ret, "Cannot count the new clusters");
                        goto out;
                    }
                    c->refs[k] = (uint32_t)paths;
                    if (host) {
                        c->refs[host >> c->cluster_bits] -= (uint32_t)paths;
                    }
                } else {
                    ne = next | (paths == 1 ? QCOW2_OFLAG_COPIED : 0);
                    next += cs;
                }
                break;
            }
            if (apply && ne != e) {
                qcow2_put_be64(l2 + 8 * i, ne);
                dirty = true;
            }
        }
        /* the zeroes are durable before the entry stops saying "zero": a crash in between
         * must not show a former zero cluster's old contents */
        if (zeroed && (ret = vd_flush(c->file)) < 0) {
            vd_error_setg_errno(errp, -ret, "Could not flush");
            goto out;
        }
        if (dirty && (ret = vd_pwrite(c->file, x->set.off[t], cs, l2, 0)) < 0) {
            vd_error_setg_errno(errp, -ret, "Could not write an L2 table");
            goto out;
        }
        if (apply && a->progress && t + 1 < x->set.n) {
            a->progress(a->opaque, t + 1, x->set.n);
        }
    }
    if (apply && a->progress) {
        a->progress(a->opaque, 1, 1); /* QEMU reports the end of the expansion even when empty */
    }
out:
    free(l2);
    free(zero);
    return ret;
}

/* Plan the expansion and write the zeroed new clusters past the end of the file. */
static int expand_plan(Chk *c, Expand *x, bool has_backing, const Qcow2AmendFile *a,
                       VdError **errp)
{
    int ret = l2set_collect(c, &x->set);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "Could not read the L1 tables");
        return ret;
    }
    x->norig = c->refs_alloc;
    x->orig = malloc(x->norig * sizeof(*x->orig));
    if (!x->orig) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    memcpy(x->orig, c->refs, x->norig * sizeof(*x->orig));
    x->first = div_round_up(c->file_size, c->cluster_size) * c->cluster_size;
    ret = walk_zero_entries(c, x, has_backing, false, a, errp);
    if (ret < 0 || x->need == 0) {
        return ret;
    }
    ret = vd_pwrite_zeroes(c->file, x->first, x->need * c->cluster_size, 0);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "Could not allocate clusters for zeroes");
        return ret;
    }
    c->nb_clusters = (x->first >> c->cluster_bits) + x->need;
    c->file_size = c->nb_clusters * c->cluster_size;
    return 0;
}

/*
 * QEMU's steps for a refcount width change (walk_over_reftable): walk `walk` of `walks` reports
 * each entry of the old refcount table as it comes to it, then the walk's end. QEMU walks twice
 * to allocate the new structure and once to write it (one more allocating walk, and a larger
 * total, when its second walk still had to allocate: not seen on the images tested, not shown).
 */
static void refcount_walk_progress(const Qcow2AmendFile *a, uint64_t entries, uint64_t walk,
                                   uint64_t walks)
{
    if (!a->refcount_progress) {
        return;
    }
    for (uint64_t i = 0; i < entries; i++) {
        a->refcount_progress(a->opaque, walk * entries + i, walks * entries);
    }
    a->refcount_progress(a->opaque, (walk + 1) * entries, walks * entries);
}

int qcow2_amend_file(BlockNode *file, const Qcow2AmendFile *a, VdError **errp)
{
    VdCheckResult res;
    memset(&res, 0, sizeof(res));
    Chk c = { .file = file, .res = &res, .quiet = true };
    Expand x = { 0 };
    bool rebuild = false;
    uint64_t highest;
    int ret = chk_load(&c, errp);
    if (ret < 0) {
        goto out;
    }
    ret = chk_calculate_refcounts(&c, &rebuild);
    if (ret == 0) {
        chk_compare_refcounts(&c, 0, &rebuild, &highest);
    }
    if (ret < 0 || rebuild || res.corruptions || res.check_errors) {
        vd_error_setg(errp, EIO, "The image has errors: repair it with 'check -r all' first");
        ret = -EIO;
        goto out;
    }
    uint32_t order = a->refcount_bits ? (uint32_t)__builtin_ctz(a->refcount_bits) : c.refcount_order;
    uint64_t max = order == 6 ? UINT64_MAX : (1ULL << (1u << order)) - 1;
    for (uint64_t k = 0; k < c.nb_clusters; k++) {
        if (c.refs[k] > max) {
            vd_error_setg(errp, EINVAL, "Cannot decrease refcount entry width to %u bits: "
                          "Cluster at offset %#" PRIx64 " has a refcount of %" PRIu32,
                          1u << order, k << c.cluster_bits, c.refs[k]);
            ret = -EINVAL;
            goto out;
        }
    }
    bool new_width = order != c.refcount_order;
    uint64_t old_entries = c.reftable_entries;
    if (new_width) { /* QEMU's allocating walks (vdisk counted above) */
        refcount_walk_progress(a, old_entries, 0, 3);
        refcount_walk_progress(a, old_entries, 1, 3);
    }
    /* (a new cluster gets as many references as its L2 table has: checked above) */
    if (a->expand_zeroes && (ret = expand_plan(&c, &x, a->has_backing, a, errp)) < 0) {
        goto out;
    }
    /* the new refcount structure: new width, expansion clusters counted */
    c.refcount_order = order;
    c.refcount_max = max;
    c.refs_cap = max > UINT32_MAX ? UINT32_MAX : (uint32_t)max;
    c.rb_bits = c.cluster_bits + 3 - order;
    ret = chk_rebuild_refcounts(&c);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "Could not write the new refcount structure");
        goto out;
    }
    if (new_width) {
        refcount_walk_progress(a, old_entries, 2, 3);
    }
    if (a->expand_zeroes) {
        ret = walk_zero_entries(&c, &x, a->has_backing, true, a, errp);
        if (ret == 0 && (ret = vd_flush(file)) < 0) {
            vd_error_setg_errno(errp, -ret, "Could not flush");
        }
    }
out:
    free(x.set.off);
    free(x.orig);
    chk_free_tables(&c);
    return ret;
}
