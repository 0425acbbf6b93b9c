/*
 * qcow2-bitmap.c - the qcow2 bitmaps extension (docs/interop/qcow2.txt "Bitmaps"): persistent
 * dirty bitmaps read at open and written back at close, compatible with QEMU in both directions.
 *
 * Invariants (QEMU's semantics): the extension counts only while autoclear bit 0 is set; while a
 * writable open holds the bitmaps in memory they are marked in_use on disk, so after a crash they
 * read as inconsistent; a clean store writes new tables, data and directory, makes them durable,
 * then switches the header to them and only then frees the old clusters (a crash leaks at worst).
 * Every directory is validated completely before anything is written. Lock: s->lock held inside.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "formats/qcow2.h"
#include "util/lock.h"
#include "util/log.h"

#define BM_EXT_LEN 24
#define BM_ENTRY_FIXED 24
#define BM_FLAG_IN_USE 1u
#define BM_FLAG_AUTO 2u
#define BM_FLAG_EXTRA_COMPAT 4u
#define BM_FLAGS_KNOWN (BM_FLAG_IN_USE | BM_FLAG_AUTO | BM_FLAG_EXTRA_COMPAT)
#define BM_TYPE_DIRTY 1
#define BM_MAX_BITMAPS 65535u
#define BM_MAX_NAME 1023u
#define BM_MAX_DIR_SIZE (1024ULL * BM_MAX_BITMAPS)
#define BM_MIN_GRAN_BITS 9
#define BM_MAX_GRAN_BITS 31
#define BM_MAX_DATA (64ULL << 20) /* bytes of bitmap data per bitmap (qcow2-check.c agrees) */
#define BM_TE_OFFSET_MASK 0x00fffffffffffe00ULL
#define BM_TE_RESERVED_MASK 0xff000000000001feULL
#define BM_TE_ALL_ONES 1ULL

typedef struct BmEntry {
    uint64_t table_offset;
    uint32_t table_size;
    uint32_t flags;
    uint8_t type;
    uint8_t gran_bits;
    char *name;
    uint8_t *extra;
    uint32_t extra_size;
} BmEntry;

typedef struct BmDir {
    BmEntry *e;
    uint32_t n;
    uint64_t offset, size; /* where the directory lies (0, 0 = none) */
} BmDir;

static void dir_clear(BmDir *d)
{
    for (uint32_t i = 0; i < d->n; i++) {
        free(d->e[i].name);
        free(d->e[i].extra);
    }
    free(d->e);
    memset(d, 0, sizeof(*d));
}

static int find_ext(Qcow2State *s)
{
    for (int i = 0; i < s->nb_exts; i++) {
        if (s->exts[i].type == QCOW2_EXT_BITMAPS) {
            return i;
        }
    }
    return -1;
}

/* Bytes of bitmap data for a bitmap of the image's size at 2^gran_bits. */
static uint64_t data_bytes(const Qcow2State *s, uint32_t gran_bits)
{
    uint64_t nbits = (s->h.size + (1ULL << gran_bits) - 1) >> gran_bits;
    return (nbits + 7) / 8;
}

static uint64_t clusters_for(const Qcow2State *s, uint64_t bytes)
{
    return (bytes + s->cluster_size - 1) >> s->cluster_bits;
}

static int corrupt(VdError **errp, const char *fmt, const char *name)
{
    vd_error_setg(errp, EINVAL, fmt, name);
    return -EINVAL;
}

/* Validate one entry's fixed fields against the image (QEMU's constraints). */
static int check_entry(Qcow2State *s, const BmEntry *e, int64_t flen, VdError **errp)
{
    if (e->type != BM_TYPE_DIRTY) {
        return corrupt(errp, "qcow2: bitmap '%s' has an unsupported type", e->name);
    }
    if (e->flags & ~BM_FLAGS_KNOWN) {
        return corrupt(errp, "qcow2: bitmap '%s' has unknown flags", e->name);
    }
    if (e->gran_bits < BM_MIN_GRAN_BITS || e->gran_bits > BM_MAX_GRAN_BITS) {
        return corrupt(errp, "qcow2: bitmap '%s' has an unsupported granularity", e->name);
    }
    if (e->extra_size && !(e->flags & BM_FLAG_EXTRA_COMPAT)) {
        return corrupt(errp, "qcow2: bitmap '%s' has incompatible extra data", e->name);
    }
    /* an in-use entry's size may be outdated (spec): e.g. a resize, then a crash */
    uint64_t need = clusters_for(s, data_bytes(s, e->gran_bits));
    bool size_ok = e->table_size == need || ((e->flags & BM_FLAG_IN_USE) && e->table_size);
    if ((e->table_offset & (s->cluster_size - 1)) || !e->table_offset || !size_ok || (uint64_t)e->table_size * s->cluster_size > BM_MAX_DATA ||
        e->table_offset >= (uint64_t)flen ||
        (uint64_t)e->table_size * 8 > (uint64_t)flen - e->table_offset) {
        return corrupt(errp, "qcow2: bitmap '%s' has an invalid bitmap table", e->name);
    }
    return 0;
}

/*
 * Read and validate the directory the header points at. No extension, or one a program without
 * bitmap support left behind (autoclear bit clear): d->n == 0. Lock held.
 */
static int read_dir(Qcow2State *s, BmDir *d, VdError **errp)
{
    memset(d, 0, sizeof(*d));
    int x = find_ext(s);
    if (x < 0 || s->h.version < 3 || !(s->h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS)) {
        return 0;
    }
    const Qcow2Ext *ext = &s->exts[x];
    if (ext->len != BM_EXT_LEN) {
        vd_error_setg(errp, EINVAL, "qcow2: bitmaps_ext: invalid extension length");
        return -EINVAL;
    }
    uint32_t nb = qcow2_be32(ext->data);
    uint64_t size = qcow2_be64(ext->data + 8);
    uint64_t offset = qcow2_be64(ext->data + 16);
    int64_t flen = vd_getlength(s->bs->file);
    if (flen < 0) {
        vd_error_setg_errno(errp, (int)-flen, "qcow2: cannot get the file size");
        return (int)flen;
    }
    if (nb == 0 || nb > BM_MAX_BITMAPS || qcow2_be32(ext->data + 4) != 0 ||
        size < BM_ENTRY_FIXED || size > BM_MAX_DIR_SIZE || (offset & (s->cluster_size - 1)) ||
        offset == 0 || offset >= (uint64_t)flen || size > (uint64_t)flen - offset) {
        vd_error_setg(errp, EINVAL, "qcow2: bitmaps_ext: invalid bitmap directory (%" PRIu32
                      " bitmaps, offset 0x%" PRIx64 ", %" PRIu64 " bytes)", nb, offset, size);
        return -EINVAL;
    }
    uint8_t *buf = malloc(size);
    d->e = calloc(nb, sizeof(*d->e));
    if (!buf || !d->e) {
        free(buf);
        free(d->e);
        d->e = NULL;
        vd_error_setg(errp, ENOMEM, "qcow2: out of memory");
        return -ENOMEM;
    }
    int ret = vd_pread(s->bs->file, offset, size, buf);
    if (ret < 0) {
        free(buf);
        free(d->e);
        d->e = NULL;
        vd_error_setg_errno(errp, -ret, "qcow2: could not read the bitmap directory");
        return ret;
    }
    d->offset = offset;
    d->size = size;
    uint64_t pos = 0;
    for (uint32_t i = 0; i < nb && ret == 0; i++) {
        if (size - pos < BM_ENTRY_FIXED) {
            vd_error_setg(errp, EINVAL, "qcow2: bitmap directory is truncated");
            ret = -EINVAL;
            break;
        }
        const uint8_t *p = buf + pos;
        BmEntry *e = &d->e[i];
        e->table_offset = qcow2_be64(p);
        e->table_size = qcow2_be32(p + 8);
        e->flags = qcow2_be32(p + 12);
        e->type = p[16];
        e->gran_bits = p[17];
        uint32_t name_size = (uint32_t)(p[18] << 8 | p[19]);
        e->extra_size = qcow2_be32(p + 20);
        uint64_t len = ((uint64_t)BM_ENTRY_FIXED + e->extra_size + name_size + 7) & ~7ULL;
        if (name_size == 0 || name_size > BM_MAX_NAME || e->extra_size > BM_MAX_DIR_SIZE ||
            len > size - pos) {
            vd_error_setg(errp, EINVAL, "qcow2: bitmap directory entry %" PRIu32 " is invalid",
                          i);
            ret = -EINVAL;
            break;
        }
        d->n = i + 1;
        e->name = strndup((const char *)p + BM_ENTRY_FIXED + e->extra_size, name_size);
        e->extra = malloc(e->extra_size ? e->extra_size : 1);
        if (!e->name || !e->extra) {
            vd_error_setg(errp, ENOMEM, "qcow2: out of memory");
            ret = -ENOMEM;
            break;
        }
        memcpy(e->extra, p + BM_ENTRY_FIXED, e->extra_size);
        if (strlen(e->name) != name_size) {
            ret = corrupt(errp, "qcow2: bitmap name '%s' contains a NUL byte", e->name);
            break;
        }
        for (uint32_t j = 0; j < i; j++) {
            if (strcmp(d->e[j].name, e->name) == 0) {
                ret = corrupt(errp, "qcow2: duplicate bitmap name '%s'", e->name);
            }
        }
        if (ret == 0) {
            ret = check_entry(s, e, flen, errp);
        }
        pos += len;
    }
    if (ret == 0 && pos != size) {
        vd_error_setg(errp, EINVAL, "qcow2: bitmap directory size does not match its entries");
        ret = -EINVAL;
    }
    free(buf);
    if (ret < 0) {
        dir_clear(d);
    }
    return ret;
}

/* The bitmap table of e, validated (host byte order). */
static int read_table(Qcow2State *s, const BmEntry *e, uint64_t **out, VdError **errp)
{
    uint64_t *t = malloc((size_t)e->table_size * 8 + 8);
    if (!t) {
        vd_error_setg(errp, ENOMEM, "qcow2: out of memory");
        return -ENOMEM;
    }
    int ret = vd_pread(s->bs->file, e->table_offset, (uint64_t)e->table_size * 8, t);
    if (ret < 0) {
        free(t);
        vd_error_setg_errno(errp, -ret, "qcow2: could not read the table of bitmap '%s'",
                            e->name);
        return ret;
    }
    for (uint32_t i = 0; i < e->table_size; i++) {
        t[i] = be64toh(t[i]);
        uint64_t off = t[i] & BM_TE_OFFSET_MASK;
        if ((t[i] & BM_TE_RESERVED_MASK) || (off && (t[i] & BM_TE_ALL_ONES)) ||
            (off & (s->cluster_size - 1))) {
            free(t);
            return corrupt(errp, "qcow2: bitmap '%s' has an invalid bitmap table entry",
                           e->name);
        }
    }
    *out = t;
    return 0;
}

/* The data of e as one buffer (data_bytes long). */
static int read_data(Qcow2State *s, const BmEntry *e, uint8_t **out, VdError **errp)
{
    uint64_t *t;
    int ret = read_table(s, e, &t, errp);
    if (ret < 0) {
        return ret;
    }
    uint64_t total = data_bytes(s, e->gran_bits);
    uint8_t *data = calloc(1, total + 1);
    if (!data) {
        free(t);
        vd_error_setg(errp, ENOMEM, "qcow2: out of memory");
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < e->table_size && ret == 0; i++) {
        uint64_t pos = (uint64_t)i * s->cluster_size;
        uint64_t n = total - pos < s->cluster_size ? total - pos : s->cluster_size;
        uint64_t off = t[i] & BM_TE_OFFSET_MASK;
        if (off) {
            ret = vd_pread(s->bs->file, off, n, data + pos);
            if (ret < 0) {
                vd_error_setg_errno(errp, -ret, "qcow2: could not read bitmap '%s'", e->name);
            }
        } else if (t[i] & BM_TE_ALL_ONES) {
            memset(data + pos, 0xff, n);
        }
    }
    free(t);
    if (ret < 0) {
        free(data);
        return ret;
    }
    *out = data;
    return 0;
}

/* Release e's table and data clusters (after nothing on disk points at them any more). */
static void free_bitmap_clusters(Qcow2State *s, const BmEntry *e)
{
    uint64_t *t;
    if (read_table(s, e, &t, NULL) < 0) {
        return; /* leaks, never frees what it cannot see */
    }
    for (uint32_t i = 0; i < e->table_size; i++) {
        uint64_t off = t[i] & BM_TE_OFFSET_MASK;
        if (off) {
            q2_free_clusters(s, off, s->cluster_size);
        }
    }
    free(t);
    q2_free_clusters(s, e->table_offset, (uint64_t)e->table_size * 8);
}

/*
 * Write dir (entries only; offset/size are set here) as the image's directory: a new copy of the
 * directory, durable together with everything allocated before, then the header pointing at it.
 * n == 0 removes the extension and the autoclear bit. The old directory is freed afterwards.
 */
static int write_dir(Qcow2State *s, BmDir *dir, const BmDir *old, VdError **errp)
{
    uint64_t size = 0;
    for (uint32_t i = 0; i < dir->n; i++) {
        size += ((uint64_t)BM_ENTRY_FIXED + dir->e[i].extra_size + strlen(dir->e[i].name) + 7) &
                ~7ULL;
    }
    uint8_t ext[BM_EXT_LEN] = { 0 };
    uint64_t off = 0;
    int ret = 0;
    if (dir->n) {
        uint8_t *buf = calloc(1, clusters_for(s, size) << s->cluster_bits);
        if (!buf) {
            vd_error_setg(errp, ENOMEM, "qcow2: out of memory");
            return -ENOMEM;
        }
        uint64_t pos = 0;
        for (uint32_t i = 0; i < dir->n; i++) {
            const BmEntry *e = &dir->e[i];
            size_t nl = strlen(e->name);
            uint8_t *p = buf + pos;
            qcow2_put_be64(p, e->table_offset);
            qcow2_put_be32(p + 8, e->table_size);
            qcow2_put_be32(p + 12, e->flags);
            p[16] = e->type;
            p[17] = e->gran_bits;
            p[18] = (uint8_t)(nl >> 8);
            p[19] = (uint8_t)nl;
            qcow2_put_be32(p + 20, e->extra_size);
            memcpy(p + BM_ENTRY_FIXED, e->extra, e->extra_size);
            memcpy(p + BM_ENTRY_FIXED + e->extra_size, e->name, nl);
            pos += ((uint64_t)BM_ENTRY_FIXED + e->extra_size + nl + 7) & ~7ULL;
        }
        ret = q2_alloc_clusters(s, clusters_for(s, size), &off);
        if (ret == 0) {
            ret = vd_pwrite(s->bs->file, off, clusters_for(s, size) << s->cluster_bits, buf, 0);
        }
        free(buf);
        qcow2_put_be32(ext, dir->n);
        qcow2_put_be64(ext + 8, size);
        qcow2_put_be64(ext + 16, off);
    }
    if (ret == 0) {
        uint64_t autoclear = dir->n ? s->h.autoclear_features | QCOW2_AUTOCLEAR_BITMAPS
                                    : s->h.autoclear_features & ~QCOW2_AUTOCLEAR_BITMAPS;
        /* tables, data and directory (and their refcounts) durable before the header */
        ret = q2_flush_all(s);
        if (ret == 0) {
            ret = q2_update_header_ext(s, QCOW2_EXT_BITMAPS, dir->n ? ext : NULL,
                                       dir->n ? BM_EXT_LEN : 0, autoclear);
        }
    }
    if (ret < 0) {
        if (off) {
            q2_free_clusters(s, off, size); /* never referenced by the header */
        }
        vd_error_setg_errno(errp, -ret, "qcow2: could not write the bitmap directory");
        return ret;
    }
    dir->offset = off;
    dir->size = size;
    if (old && old->offset) {
        /* made durable at once: an open that is killed right after must not leak it */
        q2_free_clusters(s, old->offset, old->size);
        if (q2_flush_all(s) < 0) {
            vd_log(VD_LOG_WARN, "qcow2: freeing the old bitmap directory did not reach the disk");
        }
    }
    return 0;
}

static int copy_entry(BmEntry *dst, const BmEntry *src)
{
    *dst = *src;
    dst->name = strdup(src->name);
    dst->extra = malloc(src->extra_size ? src->extra_size : 1);
    if (!dst->name || !dst->extra) {
        free(dst->name);
        free(dst->extra);
        dst->name = NULL;
        dst->extra = NULL;
        return -ENOMEM;
    }
    memcpy(dst->extra, src->extra, src->extra_size);
    return 0;
}

int q2_bitmaps_load(BlockNode *bs, VdStoredBitmap **list, size_t *n, VdError **errp)
{
    Qcow2State *s = q2_state(bs);
    *list = NULL;
    *n = 0;
    if (s->damaged) {
        return 0;
    }
    vd_mutex_lock(&s->lock);
    BmDir d;
    int ret = read_dir(s, &d, errp);
    if (ret == 0 && !s->read_only && d.n == 0 && find_ext(s) >= 0) {
        /* left by a program without bitmap support: stale, dropped (as QEMU; clusters leak) */
        ret = q2_update_header_ext(s, QCOW2_EXT_BITMAPS, NULL, 0,
                                   s->h.autoclear_features & ~QCOW2_AUTOCLEAR_BITMAPS);
        if (ret < 0) {
            vd_error_setg_errno(errp, -ret, "qcow2: could not drop a stale bitmaps extension");
        }
    }
    VdStoredBitmap *out = ret == 0 && d.n ? calloc(d.n, sizeof(*out)) : NULL;
    if (ret == 0 && d.n && !out) {
        vd_error_setg(errp, ENOMEM, "qcow2: out of memory");
        ret = -ENOMEM;
    }
    bool mark = false;
    for (uint32_t i = 0; i < d.n && ret == 0; i++) {
        const BmEntry *e = &d.e[i];
        out[i].name = strdup(e->name);
        out[i].granularity_bits = e->gran_bits;
        out[i].enabled = (e->flags & BM_FLAG_AUTO) != 0;
        out[i].inconsistent = (e->flags & BM_FLAG_IN_USE) != 0;
        if (!out[i].name) {
            vd_error_setg(errp, ENOMEM, "qcow2: out of memory");
            ret = -ENOMEM;
        } else if (!out[i].inconsistent) {
            ret = read_data(s, e, &out[i].data, errp);
            mark = true;
        }
    }
    if (ret == 0 && mark && !s->read_only) {
        /* from now on the image's copy is stale until bitmaps_store: say so on disk */
        BmDir nd = { .e = calloc(d.n, sizeof(BmEntry)), .n = 0 };
        ret = nd.e ? 0 : -ENOMEM;
        for (uint32_t i = 0; i < d.n && ret == 0; i++) {
            ret = copy_entry(&nd.e[i], &d.e[i]);
            nd.n += ret == 0;
            nd.e[i].flags |= BM_FLAG_IN_USE;
        }
        if (ret < 0) {
            vd_error_setg(errp, ENOMEM, "qcow2: out of memory");
        } else {
            ret = write_dir(s, &nd, &d, errp);
        }
        dir_clear(&nd);
    }
    if (ret == 0) {
        s->bitmaps_loaded = true;
    }
    vd_mutex_unlock(&s->lock);
    uint32_t count = d.n;
    dir_clear(&d);
    if (ret < 0) {
        vd_stored_bitmaps_free(out, count);
        return ret;
    }
    *list = out;
    *n = count;
    return 0;
}

/* Write one bitmap's data and table; fills e's table fields. */
static int write_bitmap(Qcow2State *s, const VdStoredBitmap *b, BmEntry *e)
{
    uint64_t total = data_bytes(s, b->granularity_bits);
    uint64_t tsize = clusters_for(s, total);
    uint64_t *t = calloc(tsize ? tsize : 1, 8);
    uint8_t *chunk = malloc(s->cluster_size);
    uint64_t toff = 0;
    int ret = t && chunk ? 0 : -ENOMEM;
    for (uint64_t i = 0; i < tsize && ret == 0; i++) {
        uint64_t pos = i * s->cluster_size;
        uint64_t n = total - pos < s->cluster_size ? total - pos : s->cluster_size;
        memset(chunk, 0, s->cluster_size);
        if (b->data) {
            memcpy(chunk, b->data + pos, n);
        }
        bool zero = true;
        for (uint64_t j = 0; j < n && zero; j++) {
            zero = chunk[j] == 0;
        }
        if (zero) {
            continue;
        }
        uint64_t off;
        ret = q2_alloc_clusters(s, 1, &off);
        if (ret == 0) {
            t[i] = htobe64(off);
            ret = vd_pwrite(s->bs->file, off, s->cluster_size, chunk, 0);
        }
    }
    if (ret == 0) {
        ret = q2_alloc_clusters(s, clusters_for(s, tsize * 8), &toff);
    }
    if (ret == 0) {
        ret = vd_pwrite(s->bs->file, toff, tsize * 8, t, 0);
    }
    e->table_offset = toff;
    e->table_size = (uint32_t)tsize;
    e->type = BM_TYPE_DIRTY;
    e->gran_bits = (uint8_t)b->granularity_bits;
    e->flags = b->enabled ? BM_FLAG_AUTO : 0;
    if (ret < 0) {
        /* nothing points at these yet: give them back (a failure here only leaks) */
        for (uint64_t i = 0; t && i < tsize; i++) {
            if (t[i]) {
                q2_free_clusters(s, be64toh(t[i]), s->cluster_size);
            }
        }
        if (toff) {
            q2_free_clusters(s, toff, tsize * 8);
        }
    }
    free(t);
    free(chunk);
    return ret;
}

/*
 * Start changing the stored set: 1 when this image's bitmaps are not ours to write (read-only,
 * damaged, not loaded); else lock and read the current directory into *old (the lock stays held,
 * also when reading fails).
 */
static int lock_dir(Qcow2State *s, BmDir *old, VdError **errp)
{
    if (s->read_only || s->damaged || !s->bitmaps_loaded) {
        return 1;
    }
    vd_mutex_lock(&s->lock);
    return read_dir(s, old, errp);
}

int q2_bitmaps_store(BlockNode *bs, const VdStoredBitmap *list, size_t n, VdError **errp)
{
    Qcow2State *s = q2_state(bs);
    BmDir old, nd = { 0 };
    int ret = lock_dir(s, &old, errp);
    if (ret > 0) {
        return 0;
    }
    if (ret == 0 && old.n == 0 && n == 0) {
        vd_mutex_unlock(&s->lock);
        return 0;
    }
    bool *kept = calloc(old.n + 1, sizeof(bool));
    nd.e = calloc(n + 1, sizeof(BmEntry));
    if (ret == 0 && (!kept || !nd.e)) {
        vd_error_setg(errp, ENOMEM, "qcow2: out of memory");
        ret = -ENOMEM;
    }
    for (size_t i = 0; i < n && ret == 0; i++) {
        BmEntry *e = &nd.e[nd.n];
        const BmEntry *prev = NULL;
        for (uint32_t j = 0; j < old.n; j++) {
            if (strcmp(old.e[j].name, list[i].name) == 0) {
                prev = &old.e[j];
                if (list[i].inconsistent) {
                    kept[j] = true;
                }
            }
        }
        if (list[i].inconsistent) {
            if (!prev) {
                continue; /* nothing to keep */
            }
            ret = copy_entry(e, prev); /* stays in use: its contents are unknown */
            nd.n += ret == 0;
            continue;
        }
        e->name = strdup(list[i].name);
        e->extra = malloc(1);
        if (!e->name || !e->extra) {
            free(e->name);
            free(e->extra);
            ret = -ENOMEM;
            break;
        }
        nd.n++;
        ret = write_bitmap(s, &list[i], e);
        if (ret < 0) {
            vd_error_setg_errno(errp, -ret, "qcow2: could not write bitmap '%s'", e->name);
        }
    }
    if (ret == -ENOMEM) {
        vd_error_setg(errp, ENOMEM, "qcow2: out of memory");
    }
    if (ret == 0) {
        ret = write_dir(s, &nd, &old, errp);
    }
    if (ret == 0) {
        for (uint32_t j = 0; j < old.n; j++) {
            if (!kept[j]) {
                free_bitmap_clusters(s, &old.e[j]);
            }
        }
        ret = q2_flush_all(s);
        if (ret < 0) {
            vd_error_setg_errno(errp, -ret, "qcow2: could not flush after storing bitmaps");
        }
    } else {
        for (uint32_t i = 0; i < nd.n; i++) {
            bool reused = false;
            for (uint32_t j = 0; j < old.n; j++) {
                reused |= old.e[j].table_offset == nd.e[i].table_offset;
            }
            if (!reused && nd.e[i].table_offset) {
                free_bitmap_clusters(s, &nd.e[i]);
            }
        }
    }
    vd_mutex_unlock(&s->lock);
    free(kept);
    dir_clear(&old);
    dir_clear(&nd);
    return ret;
}

int q2_bitmaps_remove(BlockNode *bs, const char *name, VdError **errp)
{
    Qcow2State *s = q2_state(bs);
    BmDir old, nd = { 0 };
    int ret = lock_dir(s, &old, errp);
    if (ret > 0) {
        return 0;
    }
    int gone = -1;
    for (uint32_t i = 0; ret == 0 && i < old.n; i++) {
        if (strcmp(old.e[i].name, name) == 0) {
            gone = (int)i;
        }
    }
    if (ret == 0 && gone >= 0) {
        nd.e = calloc(old.n, sizeof(BmEntry));
        ret = nd.e ? 0 : -ENOMEM;
        for (uint32_t i = 0; i < old.n && ret == 0; i++) {
            if ((int)i != gone) {
                ret = copy_entry(&nd.e[nd.n], &old.e[i]);
                nd.n += ret == 0;
            }
        }
        if (ret < 0) {
            vd_error_setg(errp, ENOMEM, "qcow2: out of memory");
        } else {
            ret = write_dir(s, &nd, &old, errp);
        }
        if (ret == 0) {
            free_bitmap_clusters(s, &old.e[gone]);
        }
    }
    vd_mutex_unlock(&s->lock);
    dir_clear(&old);
    dir_clear(&nd);
    return ret;
}

bool q2_bitmaps_supported(BlockNode *bs)
{
    return q2_state(bs)->h.version >= 3;
}

int q2_bitmaps_can_store(BlockNode *bs, const char *name, uint32_t granularity_bits,
                         VdError **errp)
{
    Qcow2State *s = q2_state(bs);
    if (!q2_bitmaps_supported(bs)) {
        vd_error_setg(errp, ENOTSUP, "Cannot store dirty bitmaps in qcow2 v2 files");
        return -ENOTSUP;
    }
    if (strlen(name) > BM_MAX_NAME) {
        vd_error_setg(errp, EINVAL, "Name length exceeds maximum (%u characters)", BM_MAX_NAME);
        return -EINVAL;
    }
    if (granularity_bits > BM_MAX_GRAN_BITS) {
        vd_error_setg(errp, EINVAL, "Granularity exceeds maximum (%llu bytes)",
                      1ULL << BM_MAX_GRAN_BITS);
        return -EINVAL;
    }
    if (clusters_for(s, data_bytes(s, granularity_bits)) * s->cluster_size > BM_MAX_DATA) {
        vd_error_setg(errp, EFBIG, "Too large bitmap: its data exceeds %llu bytes",
                      (unsigned long long)BM_MAX_DATA);
        return -EFBIG;
    }
    vd_mutex_lock(&s->lock);
    BmDir d;
    int ret = read_dir(s, &d, errp);
    if (ret == 0 && d.n >= BM_MAX_BITMAPS) {
        vd_error_setg(errp, ENOSPC, "Maximum number of persistent bitmaps is already reached");
        ret = -ENOSPC;
    }
    vd_mutex_unlock(&s->lock);
    dir_clear(&d);
    return ret;
}

json_t *q2_bitmaps_info(Qcow2State *s)
{
    BmDir d;
    if (read_dir(s, &d, NULL) < 0 || d.n == 0) {
        return NULL;
    }
    json_t *arr = json_array();
    for (uint32_t i = 0; arr && i < d.n; i++) {
        json_t *flags = json_array();
        if (d.e[i].flags & BM_FLAG_IN_USE) {
            json_array_append_new(flags, json_string("in-use"));
        }
        if (d.e[i].flags & BM_FLAG_AUTO) {
            json_array_append_new(flags, json_string("auto"));
        }
        json_t *o = json_object();
        json_object_set_new(o, "flags", flags);
        json_object_set_new(o, "name", json_string(d.e[i].name));
        json_object_set_new(o, "granularity", json_integer((json_int_t)1 << d.e[i].gran_bits));
        json_array_append_new(arr, o);
    }
    dir_clear(&d);
    return arr;
}
