/*
 * qcow2-snapshot.c - qcow2 internal snapshots: the snapshot table (read, rewrite), create, apply
 * (goto), delete, list (qemu-img info's JSON) and loading one read-only in place of the active L1.
 *
 * Refcounts count references per L1 table walk (QEMU's rule): a snapshot adds one to every L2
 * table and data cluster its L1 copy reaches. OFLAG_COPIED is kept exact in the active L1 and its
 * owned L2 tables (set iff refcount == 1), so the data path copies anything shared before writing.
 * VM state (vm_state_size, and the clusters past the disk size that hold it) is carried along
 * untouched: the L1 copy covers the whole active L1, and unknown extra data is written back as read.
 *
 * Crash safety (s->lock held, every step flushed before the next one that depends on it):
 *  - the table is rewritten copy-on-write: new table written and flushed, then one 12-byte header
 *    write switches nb_snapshots + snapshots_offset, then the old table is freed;
 *  - create: L1 copy written, refcounts raised (durable), COPIED cleared, only then the table entry;
 *  - goto: the snapshot's refcounts raised (durable) before the active L1 is overwritten; the old
 *    L1's references dropped after;
 *  - delete: the table entry disappears first, references are dropped after.
 * A crash between steps leaves leaks (and COPIED flags that `check -r all` fixes) at worst, never a
 * cluster referenced without its refcount.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

#include "formats/qcow2.h"
#include "util/lock.h"

#define Q2_SNAP_MAX_EXTRA 1024 /* QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA */
#define Q2_SNAP_EXTRA_SIZE 24  /* vm_state_size_large, disk_size, icount (what QEMU 7.2 writes) */
#define Q2_SNAP_MAX_TABLE (64ULL << 20) /* QEMU's QCOW_MAX_SNAPSHOTS_SIZE */

typedef struct Q2Snapshot {
    uint64_t l1_offset;
    uint32_t l1_size;
    char *id;
    char *name;
    uint32_t date_sec;
    uint32_t date_nsec;
    uint64_t vm_clock_nsec;
    uint32_t vm_state_size32;
    uint32_t extra_len;
    uint8_t *extra; /* extra_len bytes, as read (unknown fields kept) */
} Q2Snapshot;

typedef struct Q2SnapTable {
    Q2Snapshot *sn;
    uint32_t n;
} Q2SnapTable;

static void table_free(Q2SnapTable *t)
{
    for (uint32_t i = 0; i < t->n; i++) {
        free(t->sn[i].id);
        free(t->sn[i].name);
        free(t->sn[i].extra);
    }
    free(t->sn);
    t->sn = NULL;
    t->n = 0;
}

static uint64_t entry_bytes(const Q2Snapshot *sn)
{
    return (40ULL + sn->extra_len + strlen(sn->id) + strlen(sn->name) + 7) & ~7ULL;
}

static uint64_t sn_vm_state_size(const Q2Snapshot *sn)
{
    return sn->extra_len >= 8 ? qcow2_be64(sn->extra) : sn->vm_state_size32;
}

/* The virtual size recorded with the snapshot, or the image's when the entry has none. */
static uint64_t sn_disk_size(const Qcow2State *s, const Q2Snapshot *sn)
{
    return sn->extra_len >= 16 ? qcow2_be64(sn->extra + 8) : s->h.size;
}

static char *read_string(Qcow2State *s, uint64_t off, uint32_t len, int *ret)
{
    char *p = calloc(1, (size_t)len + 1);
    if (!p) {
        *ret = -ENOMEM;
        return NULL;
    }
    if (len && (*ret = vd_pread(s->bs->file, off, len, p)) < 0) {
        free(p);
        return NULL;
    }
    return p;
}

/*
 * Read the table as the header describes it. A table past EOF (snapshots_damaged) reads as
 * zeroes, as in QEMU, so info lists that many empty snapshots. Lock held.
 */
static int table_read(Qcow2State *s, Q2SnapTable *t)
{
    int ret = 0;
    t->sn = NULL;
    t->n = 0;
    if (!s->h.nb_snapshots) {
        return 0;
    }
    t->sn = calloc(s->h.nb_snapshots, sizeof(Q2Snapshot));
    if (!t->sn) {
        return -ENOMEM;
    }
    uint64_t off = s->h.snapshots_offset;
    for (uint32_t i = 0; i < s->h.nb_snapshots; i++) {
        uint8_t fix[40];
        Q2Snapshot *sn = &t->sn[i];
        ret = vd_pread(s->bs->file, off, sizeof(fix), fix);
        if (ret < 0) {
            goto fail;
        }
        t->n = i + 1;
        sn->l1_offset = qcow2_be64(fix);
        sn->l1_size = qcow2_be32(fix + 8);
        uint32_t id_len = ((uint32_t)fix[12] << 8) | fix[13];
        uint32_t name_len = ((uint32_t)fix[14] << 8) | fix[15];
        sn->date_sec = qcow2_be32(fix + 16);
        sn->date_nsec = qcow2_be32(fix + 20);
        sn->vm_clock_nsec = qcow2_be64(fix + 24);
        sn->vm_state_size32 = qcow2_be32(fix + 32);
        sn->extra_len = qcow2_be32(fix + 36);
        if (sn->extra_len > Q2_SNAP_MAX_EXTRA) {
            ret = -EINVAL;
            goto fail;
        }
        sn->extra = calloc(1, sn->extra_len ? sn->extra_len : 1);
        if (!sn->extra) {
            ret = -ENOMEM;
            goto fail;
        }
        if (sn->extra_len && (ret = vd_pread(s->bs->file, off + 40, sn->extra_len,
                                             sn->extra)) < 0) {
            goto fail;
        }
        sn->id = read_string(s, off + 40 + sn->extra_len, id_len, &ret);
        sn->name = sn->id ? read_string(s, off + 40 + sn->extra_len + id_len, name_len, &ret)
                          : NULL;
        if (!sn->name) {
            goto fail;
        }
        off += (40ULL + sn->extra_len + id_len + name_len + 7) & ~7ULL;
        if (off - s->h.snapshots_offset > Q2_SNAP_MAX_TABLE) {
            ret = -EFBIG;
            goto fail;
        }
    }
    return 0;
fail:
    table_free(t);
    return ret;
}

/* Bytes of a table as it is stored (entries padded to 8 bytes). */
static uint64_t table_bytes(const Q2SnapTable *t)
{
    uint64_t size = 0;
    for (uint32_t i = 0; i < t->n; i++) {
        size += entry_bytes(&t->sn[i]);
    }
    return size;
}

/*
 * Write t as the new snapshot table (copy-on-write, see the header comment) and make it the
 * image's. On success the old table's clusters are freed. Lock held.
 */
static int table_write(Qcow2State *s, const Q2SnapTable *t)
{
    uint64_t size = table_bytes(t);
    if (size > Q2_SNAP_MAX_TABLE) {
        return -EFBIG;
    }
    uint64_t cs = s->cluster_size;
    uint64_t alloc = (size + cs - 1) & ~(cs - 1);
    uint64_t off = 0;
    int ret;
    if (alloc) {
        uint8_t *buf = calloc(1, alloc);
        if (!buf) {
            return -ENOMEM;
        }
        uint8_t *p = buf;
        for (uint32_t i = 0; i < t->n; i++) {
            const Q2Snapshot *sn = &t->sn[i];
            size_t il = strlen(sn->id), nl = strlen(sn->name);
            qcow2_put_be64(p, sn->l1_offset);
            qcow2_put_be32(p + 8, sn->l1_size);
            p[12] = (uint8_t)(il >> 8);
            p[13] = (uint8_t)il;
            p[14] = (uint8_t)(nl >> 8);
            p[15] = (uint8_t)nl;
            qcow2_put_be32(p + 16, sn->date_sec);
            qcow2_put_be32(p + 20, sn->date_nsec);
            qcow2_put_be64(p + 24, sn->vm_clock_nsec);
            qcow2_put_be32(p + 32, sn->vm_state_size32);
            qcow2_put_be32(p + 36, sn->extra_len);
            memcpy(p + 40, sn->extra, sn->extra_len);
            memcpy(p + 40 + sn->extra_len, sn->id, il);
            memcpy(p + 40 + sn->extra_len + il, sn->name, nl);
            p += entry_bytes(sn);
        }
        ret = q2_alloc_clusters(s, alloc / cs, &off);
        if (ret == 0) {
            ret = q2_flush_all(s); /* the new table's refcount before the header points at it */
        }
        if (ret == 0) {
            ret = vd_pwrite(s->bs->file, off, alloc, buf, 0);
        }
        free(buf);
        if (ret == 0) {
            ret = q2_file_flush(s);
        }
        if (ret < 0) {
            return ret;
        }
    }
    uint8_t hdr[12];
    qcow2_put_be32(hdr, t->n);
    qcow2_put_be64(hdr + 4, off);
    ret = q2_write_header_field(s, 60, hdr, sizeof(hdr));
    if (ret == 0) {
        ret = q2_file_flush(s);
    }
    if (ret < 0) {
        return ret; /* the new table leaks; the header may point at either one */
    }
    s->h.nb_snapshots = t->n;
    s->h.snapshots_offset = off;
    return 0;
}

/* Replace the table (old = what is on disk now) with t, then free the old table's clusters. */
static int table_replace(Qcow2State *s, const Q2SnapTable *old, const Q2SnapTable *t)
{
    uint64_t old_off = s->h.snapshots_offset;
    uint64_t old_bytes = table_bytes(old);
    int ret = table_write(s, t);
    if (ret == 0 && old_off && old_bytes) {
        uint64_t cs = s->cluster_size;
        ret = q2_free_clusters(s, old_off, (old_bytes + cs - 1) & ~(cs - 1));
    }
    return ret;
}

/* ---- reference walks ---- */

static uint64_t l2_entry(const Qcow2State *s, const uint8_t *l2, uint64_t i)
{
    return qcow2_be64(l2 + i * s->l2e_size);
}

/*
 * Add addend (+1 / -1) to the refcount of every L2 table and host cluster that l1 (host order,
 * n entries) reaches, stopping after *budget refcount updates when *budget >= 0 (a rollback
 * replays exactly what succeeded). *done counts the updates made. With addend > 0, COPIED is
 * cleared in the L2 entries (the clusters become shared). Lock held.
 */
static int walk_refs(Qcow2State *s, const uint64_t *l1, uint32_t n, int addend, int64_t budget,
                     int64_t *done)
{
    int ret = 0;
    *done = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t l2off = l1[i] & QCOW2_L1E_OFFSET_MASK;
        if (!l2off) {
            continue;
        }
        uint8_t *l2;
        ret = q2_cache_get(s, &s->l2_cache, l2off, &l2);
        if (ret < 0) {
            return ret;
        }
        for (uint64_t j = 0; j < s->l2_entries; j++) {
            uint64_t e = l2_entry(s, l2, j);
            uint64_t off, len;
            if (e & QCOW2_OFLAG_COMPRESSED) {
                qcow2_compressed_extent(e & ~(QCOW2_OFLAG_COPIED | QCOW2_OFLAG_COMPRESSED),
                                        s->cluster_bits, &off, &len);
            } else {
                off = e & QCOW2_L2E_OFFSET_MASK;
                len = s->cluster_size;
            }
            if (!off) {
                continue;
            }
            if (budget >= 0 && *done >= budget) {
                q2_cache_put(&s->l2_cache, &l2);
                return 0;
            }
            if (addend > 0 && (e & QCOW2_OFLAG_COPIED)) {
                qcow2_put_be64(l2 + j * s->l2e_size, e & ~QCOW2_OFLAG_COPIED);
                q2_cache_mark_dirty(&s->l2_cache, l2);
            }
            ret = q2_update_refcount(s, off, len, addend);
            if (ret < 0) {
                q2_cache_put(&s->l2_cache, &l2);
                return ret;
            }
            (*done)++;
        }
        q2_cache_put(&s->l2_cache, &l2);
        if (budget >= 0 && *done >= budget) {
            return 0;
        }
        ret = q2_update_refcount(s, l2off, s->cluster_size, addend);
        if (ret < 0) {
            return ret;
        }
        (*done)++;
    }
    return 0;
}

static int fix_copied(Qcow2State *s);

/*
 * walk_refs(+1) that undoes its increments when one fails (refcount overflow), and then restores
 * the COPIED flags it cleared: the image is left as it was (a failed undo only leaks).
 */
static int add_refs(Qcow2State *s, const uint64_t *l1, uint32_t n)
{
    int64_t done, undone;
    int ret = walk_refs(s, l1, n, 1, -1, &done);
    if (ret < 0) {
        if (done > 0) {
            walk_refs(s, l1, n, -1, done, &undone);
        }
        if (q2_flush_all(s) == 0) {
            fix_copied(s);
        }
    }
    return ret;
}

/* Write the whole active L1 table (s->l1) over its place in the file, durably. Lock held. */
static int write_l1(Qcow2State *s)
{
    if (!s->l1_size) {
        return 0;
    }
    uint64_t *be = malloc((size_t)s->l1_size * 8);
    if (!be) {
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < s->l1_size; i++) {
        be[i] = htobe64(s->l1[i]);
    }
    int ret = vd_pwrite(s->bs->file, s->l1_offset, (uint64_t)s->l1_size * 8, be, 0);
    free(be);
    return ret < 0 ? ret : q2_file_flush(s);
}

/*
 * Make OFLAG_COPIED exact again in the active L1 and the L2 tables it owns (refcount 1), after
 * refcounts changed. Refcounts must be durable first (the caller flushed). Lock held.
 */
static int fix_copied(Qcow2State *s)
{
    bool l1_changed = false;
    int ret;
    for (uint32_t i = 0; i < s->l1_size; i++) {
        uint64_t l2off = s->l1[i] & QCOW2_L1E_OFFSET_MASK;
        uint64_t rc;
        if (!l2off) {
            continue;
        }
        ret = q2_get_refcount(s, l2off >> s->cluster_bits, &rc);
        if (ret < 0) {
            return ret;
        }
        uint64_t ne = rc == 1 ? s->l1[i] | QCOW2_OFLAG_COPIED : s->l1[i] & ~QCOW2_OFLAG_COPIED;
        if (ne != s->l1[i]) {
            s->l1[i] = ne;
            l1_changed = true;
        }
        if (rc != 1) {
            continue; /* shared: every cluster it maps is shared too, COPIED already clear */
        }
        uint8_t *l2;
        ret = q2_cache_get(s, &s->l2_cache, l2off, &l2);
        if (ret < 0) {
            return ret;
        }
        for (uint64_t j = 0; j < s->l2_entries; j++) {
            uint64_t e = l2_entry(s, l2, j);
            uint64_t off = e & QCOW2_L2E_OFFSET_MASK;
            if ((e & QCOW2_OFLAG_COMPRESSED) || !off) {
                continue;
            }
            ret = q2_get_refcount(s, off >> s->cluster_bits, &rc);
            if (ret < 0) {
                q2_cache_put(&s->l2_cache, &l2);
                return ret;
            }
            uint64_t n2 = rc == 1 ? e | QCOW2_OFLAG_COPIED : e & ~QCOW2_OFLAG_COPIED;
            if (n2 != e) {
                qcow2_put_be64(l2 + j * s->l2e_size, n2);
                q2_cache_mark_dirty(&s->l2_cache, l2);
            }
        }
        q2_cache_put(&s->l2_cache, &l2);
    }
    ret = q2_flush_all(s);
    if (ret == 0 && l1_changed) {
        ret = write_l1(s);
    }
    return ret;
}

/* ---- helpers shared by the operations ---- */

static uint64_t *read_l1(Qcow2State *s, uint64_t off, uint32_t n, uint32_t alloc_n, int *ret)
{
    uint64_t *l1 = calloc(alloc_n ? alloc_n : 1, sizeof(uint64_t));
    if (!l1) {
        *ret = -ENOMEM;
        return NULL;
    }
    if (n && (*ret = vd_pread(s->bs->file, off, (uint64_t)n * 8, l1)) < 0) {
        free(l1);
        return NULL;
    }
    for (uint32_t i = 0; i < n; i++) {
        l1[i] = be64toh(l1[i]);
    }
    *ret = 0;
    return l1;
}

/* Find a snapshot: by id first, then by name (QEMU's find_snapshot_by_id_or_name). */
static int find_snapshot(const Q2SnapTable *t, const char *id_or_name)
{
    for (uint32_t i = 0; i < t->n; i++) {
        if (!strcmp(t->sn[i].id, id_or_name)) {
            return (int)i;
        }
    }
    for (uint32_t i = 0; i < t->n; i++) {
        if (!strcmp(t->sn[i].name, id_or_name)) {
            return (int)i;
        }
    }
    return -1;
}

/* Common entry of the modifying operations: lock, drain lockless I/O, refuse what cannot work. */
static int begin_modify(Qcow2State *s, VdError **errp)
{
    if (s->read_only) {
        vd_error_setg(errp, EROFS, "qcow2: image is read-only");
        return -EROFS;
    }
    if (s->damaged || s->snapshots_damaged) {
        vd_error_setg(errp, EIO, "qcow2: image is corrupt; run 'check -r all'");
        return -EIO;
    }
    vd_mutex_lock(&s->lock);
    q2_lockless_wait_idle(s);
    int ret = q2_first_write(s);
    if (ret == 0) {
        ret = q2_flush_all(s);
    }
    if (ret < 0) {
        vd_mutex_unlock(&s->lock);
        vd_error_setg_errno(errp, -ret, "qcow2: could not flush the image");
    }
    return ret;
}

/* ---- operations ---- */
/*
 * The last step of goto and delete: drop the references an L1 table (no longer reachable) held,
 * free that table's own clusters when it had some (l1_off != 0), make it durable, then restore
 * COPIED where the active image is the only user again. Lock held.
 */
static int drop_refs(Qcow2State *s, const uint64_t *l1, uint32_t n, uint64_t l1_off)
{
    int64_t done;
    uint64_t cs = s->cluster_size;
    int ret = walk_refs(s, l1, n, -1, -1, &done);
    if (ret == 0 && l1_off && n) {
        ret = q2_free_clusters(s, l1_off, ((uint64_t)n * 8 + cs - 1) & ~(cs - 1));
    }
    if (ret == 0) {
        ret = q2_flush_all(s);
    }
    return ret < 0 ? ret : fix_copied(s);
}

/* Common exit of the modifying operations: unlock, and give a failure its message. */
static int end_modify(Qcow2State *s, int ret, VdError **errp, const char *what)
{
    vd_mutex_unlock(&s->lock);
    if (ret < 0 && errp && !*errp) {
        vd_error_setg_errno(errp, -ret, "%s", what);
    }
    return ret;
}


int q2_snapshot_create(BlockNode *bs, const char *name, VdError **errp)
{
    Qcow2State *s = q2_state(bs);
    Q2SnapTable t = { 0 }, nt = { 0 };
    uint64_t *copy = NULL;
    uint64_t l1off = 0, l1bytes = 0;
    int ret = begin_modify(s, errp);
    if (ret < 0) {
        return ret;
    }
    if (strlen(name) > 65535) {
        ret = -EINVAL;
        goto out;
    }
    ret = table_read(s, &t);
    if (ret < 0) {
        goto out;
    }
    if (t.n >= Q2_MAX_SNAPSHOTS) {
        ret = -EFBIG;
        goto out;
    }
    if (s->refcount_order == 0) {
        ret = -EINVAL; /* a refcount of 1 cannot be shared (QEMU fails the same way) */
        goto out;
    }
    if (s->has_data_file) {
        ret = -ENOTSUP; /* data file clusters cannot be shared (QEMU fails the same way) */
        goto out;
    }
    /* the new id: one more than the largest numeric id (QEMU's find_new_snapshot_id) */
    unsigned long max_id = 0;
    for (uint32_t i = 0; i < t.n; i++) {
        unsigned long v = strtoul(t.sn[i].id, NULL, 10);
        max_id = v > max_id ? v : max_id;
    }
    nt.sn = calloc((size_t)t.n + 1, sizeof(Q2Snapshot));
    if (!nt.sn) {
        ret = -ENOMEM;
        goto out;
    }
    if (t.n) {
        memcpy(nt.sn, t.sn, (size_t)t.n * sizeof(Q2Snapshot));
    }
    nt.n = t.n + 1;
    Q2Snapshot *sn = &nt.sn[t.n];
    char idbuf[32];
    snprintf(idbuf, sizeof(idbuf), "%lu", max_id + 1);
    sn->id = strdup(idbuf);
    sn->name = strdup(name);
    sn->extra = calloc(1, Q2_SNAP_EXTRA_SIZE);
    if (!sn->id || !sn->name || !sn->extra) {
        ret = -ENOMEM;
        goto out_new;
    }
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    sn->date_sec = (uint32_t)now.tv_sec;
    sn->date_nsec = (uint32_t)(now.tv_nsec / 1000 * 1000); /* QEMU's clock is microseconds */
    sn->extra_len = Q2_SNAP_EXTRA_SIZE;
    qcow2_put_be64(sn->extra + 8, s->h.size); /* disk_size; vm state 0, icount 0 */
    sn->l1_size = s->l1_size;

    /* 1. the L1 copy (COPIED cleared: it is never written through) */
    uint64_t cs = s->cluster_size;
    l1bytes = ((uint64_t)s->l1_size * 8 + cs - 1) & ~(cs - 1);
    if (!l1bytes) {
        l1bytes = cs;
    }
    copy = calloc(1, l1bytes);
    if (!copy) {
        ret = -ENOMEM;
        goto out_new;
    }
    for (uint32_t i = 0; i < s->l1_size; i++) {
        copy[i] = htobe64(s->l1[i] & ~QCOW2_OFLAG_COPIED);
    }
    ret = q2_alloc_clusters(s, l1bytes / cs, &l1off);
    if (ret == 0) {
        ret = vd_pwrite(s->bs->file, l1off, l1bytes, copy, 0);
    }
    if (ret < 0) {
        goto out_new;
    }
    sn->l1_offset = l1off;
    /* 2. refcounts up (durable), then COPIED off in the active L1 */
    ret = add_refs(s, s->l1, s->l1_size);
    if (ret == -ERANGE) {
        ret = -EINVAL; /* what QEMU reports when a refcount would overflow */
    }
    if (ret == 0) {
        ret = q2_flush_all(s);
    }
    if (ret < 0) {
        goto out_new;
    }
    for (uint32_t i = 0; i < s->l1_size; i++) {
        s->l1[i] &= ~QCOW2_OFLAG_COPIED;
    }
    ret = write_l1(s);
    /* 3. the table entry makes the snapshot exist */
    if (ret == 0) {
        ret = table_replace(s, &t, &nt);
    }
    if (ret == 0) {
        l1off = 0; /* owned by the snapshot now */
    }
out_new:
    if (l1off) {
        q2_free_clusters(s, l1off, l1bytes);
    }
    free(nt.sn[t.n].id);
    free(nt.sn[t.n].name);
    free(nt.sn[t.n].extra);
    free(nt.sn);
out:
    if (ret == 0) {
        ret = q2_flush_all(s);
    }
    free(copy);
    table_free(&t);
    return end_modify(s, ret, errp, "qcow2: could not create the snapshot");
}

int q2_snapshot_goto(BlockNode *bs, const char *id_or_name, VdError **errp)
{
    Qcow2State *s = q2_state(bs);
    Q2SnapTable t = { 0 };
    uint64_t *snl1 = NULL, *old = NULL;
    int ret = begin_modify(s, errp);
    if (ret < 0) {
        return ret;
    }
    ret = table_read(s, &t);
    if (ret < 0) {
        goto out;
    }
    int idx = find_snapshot(&t, id_or_name);
    if (idx < 0) {
        ret = -ENOENT;
        goto out;
    }
    const Q2Snapshot *sn = &t.sn[idx];
    if ((uint64_t)sn->l1_size * 8 > QCOW2_MAX_L1_SIZE) {
        ret = -EFBIG;
        goto out;
    }
    ret = q2_grow_l1(s, sn->l1_size);
    if (ret < 0) {
        goto out;
    }
    snl1 = read_l1(s, sn->l1_offset, sn->l1_size, s->l1_size, &ret);
    old = calloc(s->l1_size ? s->l1_size : 1, sizeof(uint64_t));
    if (!snl1 || !old) {
        ret = snl1 ? -ENOMEM : ret;
        goto out;
    }
    for (uint32_t i = 0; i < s->l1_size; i++) {
        snl1[i] &= ~QCOW2_OFLAG_COPIED; /* shared until fix_copied proves otherwise */
    }
    /* 1. the snapshot's clusters gain the active L1's reference, durably */
    ret = add_refs(s, snl1, sn->l1_size);
    if (ret == 0) {
        ret = q2_flush_all(s);
    }
    if (ret < 0) {
        goto out;
    }
    /* 2. switch the active L1 (and the size the snapshot had) */
    memcpy(old, s->l1, (size_t)s->l1_size * 8);
    memcpy(s->l1, snl1, (size_t)s->l1_size * 8);
    ret = write_l1(s);
    if (ret < 0) {
        memcpy(s->l1, old, (size_t)s->l1_size * 8);
        goto out;
    }
    uint64_t size = sn_disk_size(s, sn);
    if (size != s->h.size) {
        uint8_t be[8];
        qcow2_put_be64(be, size);
        ret = q2_write_header_field(s, 24, be, 8);
        if (ret == 0) {
            s->h.size = size;
            q2_publish_size(s);
        }
    }
    /* 3. the old active L1's references go; then COPIED where refcounts are 1 again */
    if (ret == 0) {
        ret = drop_refs(s, old, s->l1_size, 0);
    }
out:
    free(snl1);
    free(old);
    table_free(&t);
    return end_modify(s, ret, errp, "Failed to load snapshot");
}

int q2_snapshot_delete(BlockNode *bs, const char *id, const char *name, VdError **errp)
{
    Qcow2State *s = q2_state(bs);
    Q2SnapTable t = { 0 }, nt = { 0 };
    uint64_t *snl1 = NULL;
    int ret = begin_modify(s, errp);
    if (ret < 0) {
        return ret;
    }
    ret = table_read(s, &t);
    if (ret < 0) {
        goto out;
    }
    int idx = -1;
    for (uint32_t i = 0; i < t.n && idx < 0; i++) {
        if ((!id || !strcmp(t.sn[i].id, id)) && (!name || !strcmp(t.sn[i].name, name))) {
            idx = (int)i;
        }
    }
    if (idx < 0) {
        vd_error_setg(errp, ENOENT, "Can't find the snapshot");
        ret = -ENOENT;
        goto out;
    }
    Q2Snapshot sn = t.sn[idx];
    snl1 = read_l1(s, sn.l1_offset, sn.l1_size, sn.l1_size, &ret);
    if (!snl1) {
        goto out;
    }
    /* 1. the entry goes (the snapshot no longer exists) */
    nt.sn = calloc(t.n, sizeof(Q2Snapshot));
    if (!nt.sn) {
        ret = -ENOMEM;
        goto out;
    }
    for (uint32_t i = 0; i < t.n; i++) {
        if ((int)i != idx) {
            nt.sn[nt.n++] = t.sn[i];
        }
    }
    ret = table_replace(s, &t, &nt);
    free(nt.sn);
    if (ret < 0) {
        goto out;
    }
    /* 2. its references and its L1 copy go; what only the active image uses is COPIED again */
    ret = drop_refs(s, snl1, sn.l1_size, sn.l1_offset);
out:
    free(snl1);
    table_free(&t);
    return end_modify(s, ret, errp, "qcow2: could not delete the snapshot");
}

/*
 * Serve a snapshot instead of the active image (qemu-nbd -l): the read-only open's L1 becomes the
 * snapshot's, and the virtual size the snapshot's. Called from qcow2_open. Lock not needed yet.
 */
int q2_snapshot_load(Qcow2State *s, const char *id_or_name, VdError **errp)
{
    Q2SnapTable t = { 0 };
    if (!s->read_only) {
        vd_error_setg(errp, EINVAL, "qcow2: a snapshot can only be opened read-only");
        return -EINVAL;
    }
    int ret = table_read(s, &t);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "qcow2: could not read the snapshot table");
        return ret;
    }
    int idx = find_snapshot(&t, id_or_name);
    if (idx < 0) {
        table_free(&t);
        vd_error_setg(errp, ENOENT, "Can't find snapshot '%s'", id_or_name);
        return -ENOENT;
    }
    const Q2Snapshot *sn = &t.sn[idx];
    uint64_t size = sn_disk_size(s, sn);
    uint64_t per_l1 = s->cluster_size * s->l2_entries;
    if ((uint64_t)sn->l1_size * 8 > QCOW2_MAX_L1_SIZE ||
        (sn->l1_offset & (s->cluster_size - 1)) ||
        (uint64_t)sn->l1_size < (size + per_l1 - 1) / per_l1) {
        table_free(&t);
        vd_error_setg(errp, EINVAL, "qcow2: snapshot '%s' has an invalid L1 table",
                      id_or_name);
        return -EINVAL;
    }
    uint64_t *l1 = read_l1(s, sn->l1_offset, sn->l1_size, sn->l1_size, &ret);
    if (!l1) {
        table_free(&t);
        vd_error_setg_errno(errp, -ret, "qcow2: could not read the snapshot's L1 table");
        return ret;
    }
    free(s->l1);
    s->l1 = l1;
    s->l1_size = sn->l1_size;
    s->l1_offset = sn->l1_offset;
    s->h.size = size;
    q2_publish_size(s);
    table_free(&t);
    return 0;
}

/* ---- listing (qemu-img info's "snapshots") ---- */

json_t *q2_get_snapshots(BlockNode *bs)
{
    Qcow2State *s = q2_state(bs);
    Q2SnapTable t;
    vd_mutex_lock(&s->lock);
    int ret = table_read(s, &t);
    vd_mutex_unlock(&s->lock);
    if (ret < 0 || !t.n) {
        return NULL;
    }
    json_t *arr = json_array();
    for (uint32_t i = 0; arr && i < t.n; i++) {
        const Q2Snapshot *sn = &t.sn[i];
        json_t *o = json_object();
        if (!o || json_array_append_new(arr, o) < 0) {
            json_decref(arr);
            arr = NULL;
            break;
        }
        /* key order as qemu-img 7.2 prints it; icount only when the entry records it */
        if (sn->extra_len >= 24 && qcow2_be64(sn->extra + 16) != UINT64_MAX) {
            json_object_set_new(o, "icount", json_integer((json_int_t)qcow2_be64(sn->extra + 16)));
        }
        json_object_set_new(o, "vm-clock-nsec",
                            json_integer((json_int_t)(sn->vm_clock_nsec % 1000000000)));
        json_object_set_new(o, "name", json_string(sn->name));
        json_object_set_new(o, "date-sec", json_integer(sn->date_sec));
        json_object_set_new(o, "date-nsec", json_integer(sn->date_nsec));
        json_object_set_new(o, "vm-clock-sec",
                            json_integer((json_int_t)(sn->vm_clock_nsec / 1000000000)));
        json_object_set_new(o, "id", json_string(sn->id));
        json_object_set_new(o, "vm-state-size", json_integer((json_int_t)sn_vm_state_size(sn)));
    }
    table_free(&t);
    return arr;
}
