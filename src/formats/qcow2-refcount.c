/*
 * qcow2-refcount.c - qcow2 metadata caches, refcount table/blocks (1..64-bit entries) and the
 * cluster allocator (first-fit from a free-cluster cursor, so freed clusters are reused).
 *
 * Promises: a cluster is handed out only with its refcount already raised in the cache, and the
 * L2 cache is made to depend on the refcount cache (increments reach disk before any L2 entry
 * that uses them); decrements make the refcount cache depend on the L2 cache (the entry that
 * dropped the reference reaches disk first). New refcount blocks and a grown refcount table are
 * written and flushed before anything points at them. With lazy refcounts and the dirty bit set
 * (q2_refcounts_lazy), increments carry no dependency: they reach the disk at flush, close or
 * eviction. All functions run under s->lock.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2.h"

/* ------------------------------------------------------------------------------------------ */
/* Metadata cache                                                                              */
/* ------------------------------------------------------------------------------------------ */

static uint32_t cache_hash(const Qcow2Cache *c, uint64_t offset)
{
    return (uint32_t)(((offset >> 9) * 0x9E3779B97F4A7C15ULL) >> 40) & (uint32_t)(c->nbuckets - 1);
}

int q2_cache_init(Qcow2Cache *c, int entries, uint64_t cluster_size, bool is_l2)
{
    memset(c, 0, sizeof(*c));
    c->is_l2 = is_l2;
    c->n = entries;
    c->nbuckets = 1;
    while (c->nbuckets < entries * 2) {
        c->nbuckets <<= 1;
    }
    c->e = calloc((size_t)entries, sizeof(*c->e));
    c->buckets = malloc(sizeof(int) * (size_t)c->nbuckets);
    if (!c->e || !c->buckets) {
        q2_cache_destroy(c);
        return -ENOMEM;
    }
    for (int i = 0; i < c->nbuckets; i++) {
        c->buckets[i] = -1;
    }
    void *p;
    if (posix_memalign(&p, 4096, cluster_size * (uint64_t)entries) != 0) {
        q2_cache_destroy(c);
        return -ENOMEM;
    }
    c->base = p;
    c->cs = cluster_size;
    for (int i = 0; i < entries; i++) {
        c->e[i].data = c->base + (uint64_t)i * cluster_size;
        c->e[i].hnext = -1;
    }
    return 0;
}

void q2_cache_destroy(Qcow2Cache *c)
{
    free(c->base);
    free(c->e);
    free(c->buckets);
    memset(c, 0, sizeof(*c));
}

static int cache_lookup(const Qcow2Cache *c, uint64_t offset)
{
    for (int i = c->buckets[cache_hash(c, offset)]; i >= 0; i = c->e[i].hnext) {
        if (c->e[i].offset == offset) {
            return i;
        }
    }
    return -1;
}

static void cache_unhash(Qcow2Cache *c, int idx)
{
    int *pp = &c->buckets[cache_hash(c, c->e[idx].offset)];
    while (*pp >= 0) {
        if (*pp == idx) {
            *pp = c->e[idx].hnext;
            break;
        }
        pp = &c->e[*pp].hnext;
    }
    c->e[idx].hnext = -1;
    c->e[idx].offset = 0;
    c->e[idx].dirty = false;
}

int q2_file_flush(Qcow2State *s)
{
    bool data = s->data_dirty;
    s->data_dirty = false;
    /* cache=unsafe: ordering flushes are skipped too (a crash may lose anything, as in QEMU). */
    if (s->bs->open_flags & VD_OPEN_NO_FLUSH) {
        return 0;
    }
    if (data && s->has_data_file) {
        /* guest data lives in the data file: it must be stable before metadata points at it */
        int ret = s->bs->data_file ? vd_flush(s->bs->data_file) : -EIO;
        if (ret < 0) {
            s->data_dirty = true;
            return ret;
        }
    }
    return vd_flush(s->bs->file);
}

static int cache_flush_dependency(Qcow2State *s, Qcow2Cache *c)
{
    Qcow2Cache *dep = c->depends;
    c->depends = NULL;
    int ret = q2_cache_flush(s, dep);
    if (ret < 0) {
        c->depends = dep;
        return ret;
    }
    return q2_file_flush(s);
}

/* flags: 0, or VD_REQ_FUA for a table that must be durable when this returns. */
static int cache_write_entry(Qcow2State *s, Qcow2Cache *c, int idx, int flags)
{
    Qcow2CacheEntry *e = &c->e[idx];
    int ret;
    if (!e->dirty) {
        return 0;
    }
    if (c->depends) {
        ret = cache_flush_dependency(s, c);
        if (ret < 0) {
            return ret;
        }
    } else if (c->is_l2 && s->data_dirty) {
        /* guest data must be stable before an L2 entry pointing at it */
        ret = q2_file_flush(s);
        if (ret < 0) {
            return ret;
        }
    }
    ret = vd_pwrite(s->bs->file, e->offset, s->cluster_size, e->data, flags);
    if (ret < 0) {
        return ret;
    }
    e->dirty = false;
    return 0;
}

static int cache_write_all(Qcow2State *s, Qcow2Cache *c, int flags)
{
    int result = 0;
    for (int i = 0; i < c->n; i++) {
        if (c->e[i].offset && c->e[i].dirty) {
            int ret = cache_write_entry(s, c, i, flags);
            if (ret < 0 && result == 0) {
                result = ret;
            }
        }
    }
    return result;
}

int q2_cache_flush(Qcow2State *s, Qcow2Cache *c)
{
    return cache_write_all(s, c, 0);
}

int q2_cache_write_durable(Qcow2State *s, Qcow2Cache *c)
{
    return cache_write_all(s, c, VD_REQ_FUA);
}

int q2_cache_set_dependency(Qcow2State *s, Qcow2Cache *c, Qcow2Cache *dep)
{
    int ret;
    if (c->depends == dep) {
        return 0;
    }
    if (dep->depends) {
        /* breaking a would-be cycle: settle dep's own dependency now */
        ret = cache_flush_dependency(s, dep);
        if (ret < 0) {
            return ret;
        }
    }
    if (c->depends) {
        ret = cache_flush_dependency(s, c);
        if (ret < 0) {
            return ret;
        }
    }
    c->depends = dep;
    return 0;
}

static int cache_find_victim(Qcow2State *s, Qcow2Cache *c, int *out)
{
    for (int step = 0; step < 3 * c->n + 1; step++) {
        int i = c->hand;
        c->hand = (c->hand + 1) % c->n;
        Qcow2CacheEntry *e = &c->e[i];
        if (e->ref > 0) {
            continue;
        }
        if (e->offset == 0) {
            *out = i;
            return 0;
        }
        if (e->referenced) {
            e->referenced = false;
            continue;
        }
        int ret = cache_write_entry(s, c, i, 0);
        if (ret < 0) {
            return ret;
        }
        cache_unhash(c, i);
        *out = i;
        return 0;
    }
    return -ENOSPC; /* every entry pinned: a bug */
}

static int cache_do_get(Qcow2State *s, Qcow2Cache *c, uint64_t offset, uint8_t **table, bool read)
{
    int i = cache_lookup(c, offset);
    if (i < 0) {
        int ret = cache_find_victim(s, c, &i);
        if (ret < 0) {
            return ret;
        }
        if (read) {
            ret = vd_pread(s->bs->file, offset, s->cluster_size, c->e[i].data);
            if (ret < 0) {
                return ret;
            }
        } else {
            memset(c->e[i].data, 0, s->cluster_size);
        }
        c->e[i].offset = offset;
        c->e[i].dirty = false;
        uint32_t h = cache_hash(c, offset);
        c->e[i].hnext = c->buckets[h];
        c->buckets[h] = i;
    } else if (!read) {
        memset(c->e[i].data, 0, s->cluster_size);
    }
    c->e[i].ref++;
    c->e[i].referenced = true;
    *table = c->e[i].data;
    return 0;
}

int q2_cache_get(Qcow2State *s, Qcow2Cache *c, uint64_t offset, uint8_t **table)
{
    if (offset == 0 || (offset & (s->cluster_size - 1))) {
        return -EIO;
    }
    return cache_do_get(s, c, offset, table, true);
}

int q2_cache_get_empty(Qcow2State *s, Qcow2Cache *c, uint64_t offset, uint8_t **table)
{
    if (offset == 0 || (offset & (s->cluster_size - 1))) {
        return -EIO;
    }
    return cache_do_get(s, c, offset, table, false);
}

static int cache_index_of(const Qcow2Cache *c, const uint8_t *table)
{
    if (!c->base || table < c->base || table >= c->base + c->cs * (uint64_t)c->n) {
        return -1;
    }
    return (int)((uint64_t)(table - c->base) / c->cs);
}

void q2_cache_put(Qcow2Cache *c, uint8_t **table)
{
    if (!*table) {
        return;
    }
    int i = cache_index_of(c, *table);
    if (i >= 0 && c->e[i].ref > 0) {
        c->e[i].ref--;
    }
    *table = NULL;
}

void q2_cache_mark_dirty(Qcow2Cache *c, uint8_t *table)
{
    int i = cache_index_of(c, table);
    if (i >= 0) {
        c->e[i].dirty = true;
        c->dirtied++;
    }
}

void q2_cache_discard(Qcow2Cache *c, uint64_t offset)
{
    int i = cache_lookup(c, offset);
    if (i >= 0 && c->e[i].ref == 0) {
        cache_unhash(c, i);
    } else if (i >= 0) {
        c->e[i].dirty = false; /* pinned by a caller that is about to drop it */
    }
}

int q2_cache_empty(Qcow2State *s, Qcow2Cache *c, bool flush)
{
    if (flush) {
        int ret = q2_cache_flush(s, c);
        if (ret < 0) {
            return ret;
        }
    }
    for (int i = 0; i < c->n; i++) {
        if (c->e[i].offset) {
            cache_unhash(c, i);
        }
        c->e[i].ref = 0;
    }
    c->depends = NULL;
    return 0;
}

int q2_writeback_all(Qcow2State *s)
{
    int ret = q2_apply_pending_frees(s);
    if (ret == 0) {
        ret = q2_cache_flush(s, &s->l2_cache);
    }
    if (ret == 0) {
        ret = q2_cache_flush(s, &s->rb_cache);
    }
    if (ret == 0) {
        /*
         * Every table dirty until now went out in dependency order (each L2 write preceded by its
         * data and refcounts and a file flush), so none of these dependencies is pending; what is
         * dirtied from here on sets its own. Only the final file flush remains, which may run
         * without the lock (qcow2_flush).
         */
        s->data_dirty = false;
        s->l2_cache.depends = NULL;
        s->rb_cache.depends = NULL;
    }
    return ret;
}

int q2_flush_all(Qcow2State *s)
{
    int ret = q2_writeback_all(s);
    if (ret == 0) {
        ret = q2_file_flush(s);
    }
    return ret;
}

/* ------------------------------------------------------------------------------------------ */
/* Refcount entries                                                                            */
/* ------------------------------------------------------------------------------------------ */

uint64_t q2_refblock_get(const Qcow2State *s, const uint8_t *rb, uint64_t i)
{
    switch (s->refcount_order) {
    case 0:
        return (rb[i / 8] >> (i % 8)) & 1;
    case 1:
        return (rb[i / 4] >> (2 * (i % 4))) & 3;
    case 2:
        return (rb[i / 2] >> (4 * (i % 2))) & 15;
    case 3:
        return rb[i];
    case 4:
        return ((uint64_t)rb[2 * i] << 8) | rb[2 * i + 1];
    case 5:
        return qcow2_be32(rb + 4 * i);
    default:
        return qcow2_be64(rb + 8 * i);
    }
}

void q2_refblock_set(const Qcow2State *s, uint8_t *rb, uint64_t i, uint64_t v)
{
    unsigned sh;
    switch (s->refcount_order) {
    case 0:
        sh = i % 8;
        rb[i / 8] = (uint8_t)((rb[i / 8] & ~(1u << sh)) | ((v & 1) << sh));
        break;
    case 1:
        sh = 2 * (i % 4);
        rb[i / 4] = (uint8_t)((rb[i / 4] & ~(3u << sh)) | ((v & 3) << sh));
        break;
    case 2:
        sh = 4 * (i % 2);
        rb[i / 2] = (uint8_t)((rb[i / 2] & ~(15u << sh)) | ((v & 15) << sh));
        break;
    case 3:
        rb[i] = (uint8_t)v;
        break;
    case 4:
        rb[2 * i] = (uint8_t)(v >> 8);
        rb[2 * i + 1] = (uint8_t)v;
        break;
    case 5:
        qcow2_put_be32(rb + 4 * i, (uint32_t)v);
        break;
    default:
        qcow2_put_be64(rb + 8 * i, v);
        break;
    }
}

int q2_load_reftable(Qcow2State *s, VdError **errp)
{
    uint64_t bytes = (uint64_t)s->h.refcount_table_clusters << s->cluster_bits;
    uint8_t *raw = malloc(bytes);
    uint64_t *t = malloc(bytes);
    if (!raw || !t) {
        free(raw);
        free(t);
        vd_error_setg(errp, ENOMEM, "qcow2: cannot allocate the refcount table");
        return -ENOMEM;
    }
    int ret = vd_pread(s->bs->file, s->h.refcount_table_offset, bytes, raw);
    if (ret < 0) {
        free(raw);
        free(t);
        vd_error_setg_errno(errp, -ret, "qcow2: cannot read the refcount table");
        return ret;
    }
    uint64_t n = bytes / 8;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t e = qcow2_be64(raw + 8 * i) & QCOW2_REFT_OFFSET_MASK;
        if (e & (s->cluster_size - 1)) {
            free(raw);
            free(t);
            vd_error_setg(errp, EIO,
                          "qcow2: refcount block %llu offset 0x%llx is not cluster aligned; "
                          "image is corrupt", (unsigned long long)i, (unsigned long long)e);
            return -EIO;
        }
        t[i] = e;
    }
    free(raw);
    free(s->reftable);
    s->reftable = t;
    s->reftable_size = n;
    s->reftable_offset = s->h.refcount_table_offset;
    return 0;
}

int q2_get_refcount(Qcow2State *s, uint64_t ci, uint64_t *refcount)
{
    uint64_t ri = ci >> s->rb_bits;
    *refcount = 0;
    if (ri >= s->reftable_size || !s->reftable[ri]) {
        return 0;
    }
    uint8_t *rb;
    int ret = q2_cache_get(s, &s->rb_cache, s->reftable[ri], &rb);
    if (ret < 0) {
        return ret;
    }
    *refcount = q2_refblock_get(s, rb, ci & ((1ULL << s->rb_bits) - 1));
    q2_cache_put(&s->rb_cache, &rb);
    return 0;
}

/* Find n free clusters starting at the cursor; the cursor moves past them. */
static int find_free(Qcow2State *s, uint64_t n, uint64_t *start)
{
    uint64_t idx = s->free_cluster_index;
    uint64_t j = 0;
    while (j < n) {
        uint64_t rc;
        uint64_t ci = idx + j;
        uint64_t ri = ci >> s->rb_bits;
        if (ri >= s->reftable_size || !s->reftable[ri]) {
            /* a whole uncovered refcount block is free: skip to its end */
            uint64_t next = (ri + 1) << s->rb_bits;
            j = next - idx;
            continue;
        }
        /* scan this refcount block in one go */
        uint8_t *rb;
        int ret = q2_cache_get(s, &s->rb_cache, s->reftable[ri], &rb);
        if (ret < 0) {
            return ret;
        }
        uint64_t rbmask = (1ULL << s->rb_bits) - 1;
        uint64_t blk_end = (ri + 1) << s->rb_bits;
        while (j < n && ci < blk_end) {
            rc = q2_refblock_get(s, rb, ci & rbmask);
            if (rc) {
                if (ci > s->scan_limit) {
                    /* refcounts claim clusters far past the end of the file: damaged table */
                    int64_t flen = vd_getlength(s->bs->file);
                    s->scan_limit = (flen > 0 ? (uint64_t)flen >> s->cluster_bits : 0) + n +
                                    (1ULL << 16);
                    if (ci > s->scan_limit) {
                        q2_cache_put(&s->rb_cache, &rb);
                        return -EIO;
                    }
                }
                idx = ci + 1;
                j = 0;
            } else {
                j++;
            }
            ci = idx + j;
        }
        q2_cache_put(&s->rb_cache, &rb);
    }
    if (((idx + n) << s->cluster_bits) > Q2_MAX_HOST_OFFSET || idx + n < idx) {
        return -EFBIG;
    }
    s->free_cluster_index = idx + n;
    *start = idx;
    return 0;
}

static int alloc_refblock(Qcow2State *s, uint64_t ri);

/*
 * Grow the refcount table so that it has entry ri. New refcount blocks (covering the new
 * structures) and the new table go at the first cluster not coverable by the old table (so
 * everything there is free), are written and flushed, then the header is switched over.
 */
static int grow_reftable(Qcow2State *s, uint64_t ri)
{
    uint64_t cs = s->cluster_size;
    uint64_t old_size = s->reftable_size;
    uint64_t c0 = old_size << s->rb_bits;
    uint64_t p = c0 > s->free_cluster_index ? c0 : s->free_cluster_index;
    uint64_t first_rb = p >> s->rb_bits;
    uint64_t nb_rb = 1, rt_cl = 1, entries = 0;
    int ret;

    for (int iter = 0;; iter++) {
        if (iter > 64) {
            return -EIO;
        }
        uint64_t end = p + nb_rb + rt_cl;
        uint64_t last_rb = (end - 1) >> s->rb_bits;
        uint64_t need_rb = last_rb - first_rb + 1;
        uint64_t need = (ri > last_rb ? ri : last_rb) + 1;
        if (need < first_rb + nb_rb) {
            need = first_rb + nb_rb;
        }
        entries = need + need / 2;
        uint64_t need_cl = (entries * 8 + cs - 1) / cs;
        if (need_cl <= rt_cl && need_rb <= nb_rb) {
            entries = rt_cl * cs / 8;
            break;
        }
        if (need_cl > rt_cl) {
            rt_cl = need_cl;
        }
        if (need_rb > nb_rb) {
            nb_rb = need_rb;
        }
    }
    if (rt_cl * cs > QCOW2_MAX_REFTABLE_SIZE) {
        return -EFBIG;
    }
    if (((p + nb_rb + rt_cl) << s->cluster_bits) > Q2_MAX_HOST_OFFSET) {
        return -EFBIG;
    }

    uint8_t *blocks = calloc(nb_rb, cs);
    uint8_t *table = calloc(rt_cl, cs);
    uint64_t *newt = calloc(entries, sizeof(uint64_t));
    if (!blocks || !table || !newt) {
        free(blocks);
        free(table);
        free(newt);
        return -ENOMEM;
    }
    uint64_t rbmask = (1ULL << s->rb_bits) - 1;
    for (uint64_t c = p; c < p + nb_rb + rt_cl; c++) {
        uint64_t b = (c >> s->rb_bits) - first_rb;
        q2_refblock_set(s, blocks + b * cs, c & rbmask, 1);
    }
    memcpy(newt, s->reftable, old_size * sizeof(uint64_t));
    for (uint64_t b = 0; b < nb_rb; b++) {
        newt[first_rb + b] = (p + b) << s->cluster_bits;
    }
    for (uint64_t i = 0; i < entries; i++) {
        qcow2_put_be64(table + 8 * i, newt[i]);
    }
    uint64_t table_off = (p + nb_rb) << s->cluster_bits;
    ret = vd_pwrite(s->bs->file, p << s->cluster_bits, nb_rb * cs, blocks, 0);
    if (ret == 0) {
        ret = vd_pwrite(s->bs->file, table_off, rt_cl * cs, table, 0);
    }
    free(blocks);
    free(table);
    if (ret == 0) {
        /* existing refcount blocks may be dirty in the cache: make them durable too */
        ret = q2_cache_flush(s, &s->rb_cache);
    }
    if (ret == 0) {
        ret = q2_file_flush(s);
    }
    if (ret < 0) {
        free(newt);
        return ret;
    }
    uint8_t hdr[12];
    qcow2_put_be64(hdr, table_off);
    qcow2_put_be32(hdr + 8, (uint32_t)rt_cl);
    ret = q2_write_header_field(s, 48, hdr, 12);
    if (ret == 0) {
        ret = q2_file_flush(s);
    }
    if (ret < 0) {
        free(newt);
        return ret;
    }
    uint64_t old_off = s->reftable_offset;
    uint64_t old_cl = s->h.refcount_table_clusters;
    free(s->reftable);
    s->reftable = newt;
    s->reftable_size = entries;
    s->reftable_offset = table_off;
    s->h.refcount_table_offset = table_off;
    s->h.refcount_table_clusters = (uint32_t)rt_cl;
    return q2_update_refcount(s, old_off, old_cl * cs, -1);
}

/* Create refcount block ri (it must not exist yet). */
static int alloc_refblock(Qcow2State *s, uint64_t ri)
{
    int ret;
    if (ri >= s->reftable_size) {
        ret = grow_reftable(s, ri);
        if (ret < 0) {
            return ret;
        }
        if (s->reftable[ri]) {
            return 0;
        }
    }
    uint64_t b;
    ret = find_free(s, 1, &b);
    if (ret < 0) {
        return ret;
    }
    uint8_t *buf = calloc(1, s->cluster_size);
    if (!buf) {
        return -ENOMEM;
    }
    if ((b >> s->rb_bits) == ri) {
        q2_refblock_set(s, buf, b & ((1ULL << s->rb_bits) - 1), 1); /* describes itself */
    } else {
        ret = q2_update_refcount(s, b << s->cluster_bits, s->cluster_size, 1);
        if (ret < 0) {
            free(buf);
            return ret;
        }
    }
    if (ri >= s->reftable_size || s->reftable[ri]) {
        /* the nested allocation grew the table and created this block meanwhile */
        free(buf);
        if (s->reftable[ri]) {
            return q2_update_refcount(s, b << s->cluster_bits, s->cluster_size, -1);
        }
        return -EIO;
    }
    ret = vd_pwrite(s->bs->file, b << s->cluster_bits, s->cluster_size, buf, 0);
    free(buf);
    if (ret == 0) {
        ret = q2_cache_flush(s, &s->rb_cache);
    }
    if (ret == 0) {
        ret = q2_file_flush(s);
    }
    if (ret < 0) {
        return ret;
    }
    /*
     * Durable at once (FUA): a caller may make a refcount in this block durable with a FUA write
     * of the block alone (a new L2 table, get_l2_for_write) and then point L1 at the cluster; the
     * block is reachable only through this entry. Rare: once per refcount block.
     */
    uint8_t be[8];
    qcow2_put_be64(be, b << s->cluster_bits);
    ret = vd_pwrite(s->bs->file, s->reftable_offset + ri * 8, 8, be, VD_REQ_FUA);
    if (ret < 0) {
        return ret;
    }
    s->reftable[ri] = b << s->cluster_bits;
    return 0;
}

/* The order a refcount change needs: increments before the L2 entries, decrements after. */
static int refcount_order(Qcow2State *s, int64_t addend)
{
    if (addend < 0) {
        return q2_cache_set_dependency(s, &s->rb_cache, &s->l2_cache);
    }
    if (!q2_refcounts_lazy(s)) {
        return q2_cache_set_dependency(s, &s->l2_cache, &s->rb_cache);
    }
    return 0; /* lazy: the dirty bit covers increments that are not on disk yet */
}

int q2_update_refcount(Qcow2State *s, uint64_t offset, uint64_t length, int64_t addend)
{
    int ret;
    if (length == 0 || addend == 0) {
        return 0;
    }
    ret = refcount_order(s, addend);
    if (ret < 0) {
        return ret;
    }
    uint64_t start = offset >> s->cluster_bits;
    uint64_t last = (offset + length - 1) >> s->cluster_bits;
    uint64_t rbmask = (1ULL << s->rb_bits) - 1;
    uint64_t ci = start;
    while (ci <= last) {
        uint64_t ri = ci >> s->rb_bits;
        if (ri >= s->reftable_size || !s->reftable[ri]) {
            if (addend < 0) {
                return -EIO; /* freeing a cluster that has no refcount: corrupt */
            }
            /*
             * A grown table releases the old one: that decrement turned the order around (the
             * refcount cache waits for the L2 cache). Our increments need theirs back, or an L2
             * entry could reach the disk before the refcount of the cluster it points at.
             */
            ret = alloc_refblock(s, ri);
            if (ret == 0) {
                ret = refcount_order(s, addend);
            }
            if (ret < 0) {
                return ret;
            }
        }
        uint8_t *rb;
        ret = q2_cache_get(s, &s->rb_cache, s->reftable[ri], &rb);
        if (ret < 0) {
            return ret;
        }
        uint64_t blk_end = ((ri + 1) << s->rb_bits) - 1;
        uint64_t stop = last < blk_end ? last : blk_end;
        for (; ci <= stop; ci++) {
            uint64_t old = q2_refblock_get(s, rb, ci & rbmask);
            uint64_t nv;
            if (addend > 0) {
                if (old > s->refcount_max - (uint64_t)addend) {
                    q2_cache_put(&s->rb_cache, &rb);
                    return -ERANGE;
                }
                nv = old + (uint64_t)addend;
            } else {
                if (old < (uint64_t)(-addend)) {
                    q2_cache_put(&s->rb_cache, &rb);
                    return -EIO;
                }
                nv = old - (uint64_t)(-addend);
            }
            q2_refblock_set(s, rb, ci & rbmask, nv);
            if (nv == 0) {
                if (ci < s->free_cluster_index) {
                    s->free_cluster_index = ci;
                }
                if (s->free_byte_offset && (s->free_byte_offset >> s->cluster_bits) == ci) {
                    s->free_byte_offset = 0;
                }
                /* a freed metadata table must never be written back over new data */
                q2_cache_discard(&s->l2_cache, ci << s->cluster_bits);
            }
        }
        q2_cache_mark_dirty(&s->rb_cache, rb);
        q2_cache_put(&s->rb_cache, &rb);
    }
    return 0;
}

int q2_alloc_clusters(Qcow2State *s, uint64_t n, uint64_t *host)
{
    uint64_t idx;
    int ret = find_free(s, n, &idx);
    if (ret < 0) {
        return ret;
    }
    ret = q2_update_refcount(s, idx << s->cluster_bits, n << s->cluster_bits, 1);
    if (ret < 0) {
        return ret;
    }
    *host = idx << s->cluster_bits;
    return 0;
}

int q2_alloc_bytes(Qcow2State *s, uint64_t bytes, uint64_t *host)
{
    uint64_t cs = s->cluster_size;
    uint64_t fbo = s->free_byte_offset;
    int ret;
    if (bytes > cs) {
        return -EINVAL;
    }
    if (fbo && (fbo & (cs - 1))) {
        uint64_t rc, cur = fbo >> s->cluster_bits;
        ret = q2_get_refcount(s, cur, &rc);
        if (ret < 0) {
            return ret;
        }
        if (rc > 0 && rc < s->refcount_max) {
            uint64_t next = 0;
            if (cs - (fbo & (cs - 1)) < bytes) {
                /* spill into the next cluster if it is free (packs like qemu) */
                ret = find_free(s, 1, &next);
                if (ret < 0) {
                    return ret;
                }
                if (next != cur + 1) {
                    ret = q2_update_refcount(s, next << s->cluster_bits, cs, 1);
                    if (ret < 0) {
                        return ret;
                    }
                    *host = next << s->cluster_bits;
                    fbo = *host + bytes;
                    s->free_byte_offset = (fbo & (cs - 1)) ? fbo : 0;
                    return 0;
                }
            }
            ret = q2_update_refcount(s, cur << s->cluster_bits, cs, 1);
            if (ret == 0 && next) {
                ret = q2_update_refcount(s, next << s->cluster_bits, cs, 1);
            }
            if (ret < 0) {
                return ret;
            }
            *host = fbo;
            fbo += bytes;
            s->free_byte_offset = (fbo & (cs - 1)) ? fbo : 0;
            return 0;
        }
    }
    uint64_t h;
    ret = q2_alloc_clusters(s, (bytes + cs - 1) >> s->cluster_bits, &h);
    if (ret < 0) {
        return ret;
    }
    *host = h;
    fbo = h + bytes;
    s->free_byte_offset = (fbo & (cs - 1)) ? fbo : 0;
    return 0;
}

int q2_free_clusters(Qcow2State *s, uint64_t offset, uint64_t length)
{
    return q2_update_refcount(s, offset, length, -1);
}

int q2_free_l2_entry_cluster(Qcow2State *s, uint64_t e)
{
    if (s->has_data_file) {
        return 0; /* data file clusters are not refcounted (the data stays where it was) */
    }
    if (e & QCOW2_OFLAG_COMPRESSED) {
        uint64_t off, nb;
        qcow2_compressed_extent(e, s->cluster_bits, &off, &nb);
        return q2_update_refcount(s, off, nb, -1);
    }
    uint64_t off = e & QCOW2_L2E_OFFSET_MASK;
    if (!off) {
        return 0;
    }
    return q2_update_refcount(s, off, s->cluster_size, -1);
}

int q2_apply_pending_frees(Qcow2State *s)
{
    int ret = 0;
    size_t n = s->nb_pending_frees;
    s->nb_pending_frees = 0;
    for (size_t i = 0; i < n; i++) {
        int r = q2_free_l2_entry_cluster(s, s->pending_frees[i]);
        if (r < 0 && ret == 0) {
            ret = r; /* keep going: the rest would otherwise leak */
        }
    }
    return ret;
}

/*
 * The list holds Q2_MAX_PENDING_FREES entries; it is applied when full, unless lockless data I/O
 * is in flight (it may still use one of these clusters, mapped before the L2 entry changed):
 * then it grows and is applied by the next write or flush that waited for idle.
 */
int q2_defer_free_l2_entry(Qcow2State *s, uint64_t e)
{
    if (s->nb_pending_frees >= s->cap_pending_frees) {
        size_t cap = s->cap_pending_frees ? s->cap_pending_frees * 2 : Q2_MAX_PENDING_FREES;
        uint64_t *n = realloc(s->pending_frees, cap * sizeof(uint64_t));
        if (!n) {
            if (s->lockless_inflight > 0) {
                return 0; /* cannot free safely now: leak it (check reclaims leaks) */
            }
            return q2_free_l2_entry_cluster(s, e);
        }
        s->pending_frees = n;
        s->cap_pending_frees = cap;
    }
    s->pending_frees[s->nb_pending_frees++] = e;
    if (s->nb_pending_frees >= Q2_MAX_PENDING_FREES && s->lockless_inflight == 0) {
        return q2_apply_pending_frees(s);
    }
    return 0;
}
