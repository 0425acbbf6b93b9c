/*
 * dirty-bitmap.c - named dirty bitmaps of a node (contract in dirty-bitmap.h).
 *
 * Representation: one bit per granule, LSB first in each byte (the qcow2 on-disk order, so loading
 * and storing copy bytes). Invariants: bits past the last granule are zero; names are unique per
 * node; the list (newest first) and every bitmap's bits change only under the list's mutex.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "block/dirty-bitmap.h"
#include "util/lock.h"

typedef struct VdDirtyBitmap {
    char *name;
    uint32_t gran_bits;
    uint64_t size;   /* bytes of the node it covers */
    uint64_t nbits;
    uint8_t *bits;
    bool enabled, persistent, inconsistent, readonly;
    int busy;        /* users holding it */
    int64_t slot;    /* its place in the image's bitmap directory; -1: not stored yet */
    struct VdDirtyBitmap *next;
} VdDirtyBitmap;

struct VdBitmapList {
    pthread_mutex_t lock;
    VdDirtyBitmap *head;
};

static uint64_t nbits_for(uint64_t size, uint32_t gran_bits)
{
    return (size + (1ULL << gran_bits) - 1) >> gran_bits;
}

static size_t bytes_for(uint64_t nbits)
{
    return (size_t)((nbits + 7) / 8);
}

static bool bit_get(const uint8_t *b, uint64_t i)
{
    return (b[i / 8] >> (i % 8)) & 1;
}

/* Set (or clear) bits [first, last]. */
static void bits_fill(uint8_t *b, uint64_t first, uint64_t last, bool set)
{
    while (first <= last && (first % 8)) {
        b[first / 8] = set ? (uint8_t)(b[first / 8] | (1u << (first % 8)))
                           : (uint8_t)(b[first / 8] & ~(1u << (first % 8)));
        first++;
    }
    if (first + 8 <= last + 1) {
        uint64_t whole = (last + 1 - first) / 8;
        memset(b + first / 8, set ? 0xff : 0, (size_t)whole);
        first += whole * 8;
    }
    while (first <= last) {
        b[first / 8] = set ? (uint8_t)(b[first / 8] | (1u << (first % 8)))
                           : (uint8_t)(b[first / 8] & ~(1u << (first % 8)));
        first++;
    }
}

static void bitmap_free(VdDirtyBitmap *bm)
{
    if (bm) {
        free(bm->name);
        free(bm->bits);
        free(bm);
    }
}

static VdDirtyBitmap *bitmap_new(const char *name, uint32_t gran_bits, uint64_t size)
{
    VdDirtyBitmap *bm = calloc(1, sizeof(*bm));
    if (!bm) {
        return NULL;
    }
    bm->name = strdup(name);
    bm->slot = -1;
    bm->gran_bits = gran_bits;
    bm->size = size;
    bm->nbits = nbits_for(size, gran_bits);
    bm->bits = calloc(1, bytes_for(bm->nbits) + 1);
    if (!bm->name || !bm->bits) {
        bitmap_free(bm);
        return NULL;
    }
    return bm;
}

/* The node's list, created on first use (QMP thread or open). NULL on ENOMEM. */
static VdBitmapList *list_get(BlockNode *bs)
{
    VdBitmapList *l = __atomic_load_n(&bs->bitmaps, __ATOMIC_ACQUIRE);
    if (l) {
        return l;
    }
    l = calloc(1, sizeof(*l));
    if (!l) {
        return NULL;
    }
    pthread_mutex_init(&l->lock, NULL);
    VdBitmapList *expected = NULL;
    if (!__atomic_compare_exchange_n(&bs->bitmaps, &expected, l, false, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE)) {
        pthread_mutex_destroy(&l->lock);
        free(l);
        return expected;
    }
    return l;
}

static VdDirtyBitmap *find_locked(VdBitmapList *l, const char *name)
{
    for (VdDirtyBitmap *bm = l->head; bm; bm = bm->next) {
        if (strcmp(bm->name, name) == 0) {
            return bm;
        }
    }
    return NULL;
}

static int64_t node_size(BlockNode *bs, VdError **errp)
{
    int64_t len = vd_getlength(bs);
    if (len < 0) {
        vd_error_setg_errno(errp, (int)-len, "Cannot get the size of '%s'", bs->node_name);
    }
    return len;
}

/* ---- life cycle ---- */

int vd_bitmaps_load(BlockNode *bs, VdError **errp)
{
    if (!bs->drv->bitmaps_load) {
        return 0;
    }
    VdStoredBitmap *list = NULL;
    size_t n = 0;
    int ret = bs->drv->bitmaps_load(bs, &list, &n, errp);
    if (ret < 0 || n == 0) {
        vd_stored_bitmaps_free(list, n);
        return ret;
    }
    int64_t size = node_size(bs, errp);
    VdBitmapList *l = size < 0 ? NULL : list_get(bs);
    if (size >= 0 && !l) {
        vd_error_setg(errp, ENOMEM, "Out of memory loading bitmaps");
    }
    ret = size < 0 ? (int)size : (l ? 0 : -ENOMEM);
    for (size_t i = 0; i < n && ret == 0; i++) {
        VdDirtyBitmap *bm = bitmap_new(list[i].name, list[i].granularity_bits, (uint64_t)size);
        if (!bm) {
            vd_error_setg(errp, ENOMEM, "Out of memory loading bitmap '%s'", list[i].name);
            ret = -ENOMEM;
            break;
        }
        if (list[i].data) {
            memcpy(bm->bits, list[i].data, bytes_for(bm->nbits));
            if (bm->nbits % 8) {
                bm->bits[bm->nbits / 8] &= (uint8_t)((1u << (bm->nbits % 8)) - 1);
            }
        }
        bm->persistent = true;
        bm->slot = (int64_t)i;
        bm->enabled = list[i].enabled && !list[i].inconsistent; /* QEMU: not recording */
        bm->inconsistent = list[i].inconsistent;
        bm->readonly = bs->read_only;
        vd_mutex_lock(&l->lock);
        bm->next = l->head; /* newest first: image order reversed, as QEMU lists them */
        l->head = bm;
        vd_mutex_unlock(&l->lock);
    }
    vd_stored_bitmaps_free(list, n);
    return ret;
}

int vd_bitmaps_store(BlockNode *bs, VdError **errp)
{
    VdBitmapList *l = __atomic_load_n(&bs->bitmaps, __ATOMIC_ACQUIRE);
    if (bs->read_only || !bs->drv->bitmaps_store) {
        return 0;
    }
    if (l) {
        vd_mutex_lock(&l->lock);
    }
    size_t n = 0;
    for (VdDirtyBitmap *bm = l ? l->head : NULL; bm; bm = bm->next) {
        n += bm->persistent;
    }
    VdStoredBitmap *out = calloc(n ? n : 1, sizeof(*out));
    VdDirtyBitmap **ord = calloc(n ? n : 1, sizeof(*ord));
    int ret = out && ord ? 0 : -ENOMEM;
    /*
     * QEMU's directory order: what the image holds keeps its place, bitmaps new since then
     * follow in list order (newest first).
     */
    size_t k = 0;
    for (VdDirtyBitmap *bm = l ? l->head : NULL; bm && ret == 0; bm = bm->next) {
        if (bm->persistent && bm->slot >= 0) {
            size_t j = k++; /* insertion by slot */
            for (; j > 0 && ord[j - 1]->slot > bm->slot; j--) {
                ord[j] = ord[j - 1];
            }
            ord[j] = bm;
        }
    }
    for (VdDirtyBitmap *bm = l ? l->head : NULL; bm && ret == 0; bm = bm->next) {
        if (bm->persistent && bm->slot < 0) {
            ord[k++] = bm;
        }
    }
    for (size_t i = 0; i < k && ret == 0; i++) {
        VdDirtyBitmap *bm = ord[i];
        bm->slot = (int64_t)i;
        VdStoredBitmap *sb = &out[i];
        sb->name = strdup(bm->name);
        sb->granularity_bits = bm->gran_bits;
        sb->enabled = bm->enabled;
        sb->inconsistent = bm->inconsistent;
        sb->data = malloc(bytes_for(bm->nbits) + 1);
        if (!sb->name || !sb->data) {
            ret = -ENOMEM;
            break;
        }
        memcpy(sb->data, bm->bits, bytes_for(bm->nbits));
    }
    if (l) {
        vd_mutex_unlock(&l->lock);
    }
    if (ret < 0) {
        vd_error_setg(errp, ENOMEM, "Out of memory storing bitmaps");
    } else {
        ret = bs->drv->bitmaps_store(bs, out, n, errp);
    }
    free(ord);
    vd_stored_bitmaps_free(out, n);
    return ret;
}

void vd_bitmaps_free(BlockNode *bs)
{
    VdBitmapList *l = bs->bitmaps;
    if (!l) {
        return;
    }
    while (l->head) {
        VdDirtyBitmap *bm = l->head;
        l->head = bm->next;
        bitmap_free(bm);
    }
    pthread_mutex_destroy(&l->lock);
    free(l);
    bs->bitmaps = NULL;
}

void vd_stored_bitmaps_free(VdStoredBitmap *list, size_t n)
{
    for (size_t i = 0; list && i < n; i++) {
        free(list[i].name);
        free(list[i].data);
    }
    free(list);
}

void vd_bitmaps_note_write(BlockNode *bs, uint64_t offset, uint64_t bytes)
{
    VdBitmapList *l = __atomic_load_n(&bs->bitmaps, __ATOMIC_ACQUIRE);
    if (!l || bytes == 0) {
        return;
    }
    vd_mutex_lock(&l->lock);
    for (VdDirtyBitmap *bm = l->head; bm; bm = bm->next) {
        if (!bm->enabled || bm->inconsistent || offset >= bm->size) {
            continue;
        }
        uint64_t end = bytes > bm->size - offset ? bm->size : offset + bytes;
        bits_fill(bm->bits, offset >> bm->gran_bits, (end - 1) >> bm->gran_bits, true);
    }
    vd_mutex_unlock(&l->lock);
}

int vd_bitmaps_resize(BlockNode *bs, uint64_t size)
{
    VdBitmapList *l = __atomic_load_n(&bs->bitmaps, __ATOMIC_ACQUIRE);
    if (!l) {
        return 0;
    }
    int ret = 0;
    vd_mutex_lock(&l->lock);
    for (VdDirtyBitmap *bm = l->head; bm && ret == 0; bm = bm->next) {
        uint64_t nbits = nbits_for(size, bm->gran_bits);
        uint8_t *nb = calloc(1, bytes_for(nbits) + 1);
        if (!nb) {
            ret = -ENOMEM;
            break;
        }
        uint64_t keep = nbits < bm->nbits ? nbits : bm->nbits;
        memcpy(nb, bm->bits, bytes_for(keep));
        if (keep % 8) {
            nb[keep / 8] &= (uint8_t)((1u << (keep % 8)) - 1);
        }
        free(bm->bits);
        bm->bits = nb;
        bm->nbits = nbits;
        bm->size = size;
    }
    vd_mutex_unlock(&l->lock);
    return ret;
}

bool vd_bitmaps_persistent_supported(BlockNode *bs)
{
    const BlockDriver *drv = bs->drv;
    return drv->bitmaps_can_store && (!drv->bitmaps_supported || drv->bitmaps_supported(bs));
}

bool vd_bitmaps_any(BlockNode *bs)
{
    VdBitmapList *l = __atomic_load_n(&bs->bitmaps, __ATOMIC_ACQUIRE);
    if (!l) {
        return false;
    }
    vd_mutex_lock(&l->lock);
    bool any = l->head != NULL;
    vd_mutex_unlock(&l->lock);
    return any;
}

/* ---- operations ---- */

enum { CHECK_RO = 1, CHECK_BUSY = 2, CHECK_INCONSISTENT = 4, CHECK_ALL = 7 };

/* QEMU's bdrv_dirty_bitmap_check: may this bitmap be used / changed? */
static int bitmap_check(const VdDirtyBitmap *bm, int what, VdError **errp)
{
    if ((what & CHECK_BUSY) && bm->busy) {
        vd_error_setg(errp, EBUSY, "Bitmap '%s' is currently in use by another operation and "
                      "cannot be used", bm->name);
        return -EBUSY;
    }
    if ((what & CHECK_RO) && bm->readonly) {
        vd_error_setg(errp, EPERM, "Bitmap '%s' is readonly and cannot be modified", bm->name);
        return -EPERM;
    }
    if ((what & CHECK_INCONSISTENT) && bm->inconsistent) {
        vd_error_setg(errp, EINVAL, "Bitmap '%s' is inconsistent and cannot be used", bm->name);
        return -EINVAL;
    }
    return 0;
}

/* Look name up with the list locked (on success the caller unlocks l). */
static VdDirtyBitmap *lookup_locked(BlockNode *bs, const char *name, VdBitmapList **pl,
                                    VdError **errp)
{
    VdBitmapList *l = __atomic_load_n(&bs->bitmaps, __ATOMIC_ACQUIRE);
    if (l) {
        vd_mutex_lock(&l->lock);
        VdDirtyBitmap *bm = find_locked(l, name);
        if (bm) {
            *pl = l;
            return bm;
        }
        vd_mutex_unlock(&l->lock);
    }
    vd_error_setg(errp, ENOENT, "Dirty bitmap '%s' not found", name);
    return NULL;
}

static uint32_t default_granularity_bits(BlockNode *bs)
{
    uint32_t cs = bs->drv->cluster_size ? bs->drv->cluster_size(bs) : 0;
    if (!cs) {
        return 16;
    }
    uint32_t bits = 12;
    while ((1ULL << bits) < cs && bits < 31) {
        bits++;
    }
    return bits;
}

int vd_bitmap_add(BlockNode *bs, const char *name, uint64_t granularity, bool persistent,
                  bool disabled, VdError **errp)
{
    if (!name || !*name) {
        vd_error_setg(errp, EINVAL, "Bitmap name cannot be empty");
        return -EINVAL;
    }
    uint32_t gbits = default_granularity_bits(bs);
    if (granularity) {
        if (granularity < VD_BITMAP_MIN_GRANULARITY || (granularity & (granularity - 1)) ||
            granularity > VD_BITMAP_MAX_GRANULARITY) {
            vd_error_setg(errp, EINVAL, "Granularity must be power of 2 and at least 512");
            return -EINVAL;
        }
        gbits = (uint32_t)__builtin_ctzll(granularity);
    }
    VdBitmapList *l = list_get(bs);
    if (!l) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    vd_mutex_lock(&l->lock);
    bool exists = find_locked(l, name) != NULL;
    vd_mutex_unlock(&l->lock);
    if (exists) {
        vd_error_setg(errp, EEXIST, "Bitmap already exists: %s", name);
        return -EEXIST;
    }
    if (persistent) {
        if (!bs->drv->bitmaps_can_store) {
            vd_error_setg(errp, ENOTSUP, "Can't store persistent bitmaps to %s: Operation not "
                          "supported", bs->node_name);
            return -ENOTSUP;
        }
        int ret = bs->drv->bitmaps_can_store(bs, name, gbits, errp);
        if (ret < 0) {
            vd_error_prepend(errp, "Can't make bitmap '%s' persistent in '%s': ", name,
                             bs->node_name);
            return ret;
        }
    }
    int64_t size = node_size(bs, errp);
    if (size < 0) {
        return (int)size;
    }
    VdDirtyBitmap *bm = bitmap_new(name, gbits, (uint64_t)size);
    if (!bm) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    bm->enabled = !disabled;
    bm->persistent = persistent;
    bm->readonly = bs->read_only;
    vd_mutex_lock(&l->lock);
    if (find_locked(l, name)) { /* only the QMP thread adds: cannot happen, but stay exact */
        vd_mutex_unlock(&l->lock);
        bitmap_free(bm);
        vd_error_setg(errp, EEXIST, "Bitmap already exists: %s", name);
        return -EEXIST;
    }
    bm->next = l->head;
    l->head = bm;
    vd_mutex_unlock(&l->lock);
    return 0;
}

int vd_bitmap_remove(BlockNode *bs, const char *name, VdError **errp)
{
    VdBitmapList *l;
    VdDirtyBitmap *bm = lookup_locked(bs, name, &l, errp);
    if (!bm) {
        return -ENOENT;
    }
    int ret = bitmap_check(bm, CHECK_BUSY | CHECK_RO, errp);
    if (ret == 0) {
        for (VdDirtyBitmap **pp = &l->head; *pp; pp = &(*pp)->next) {
            if (*pp == bm) {
                *pp = bm->next;
                break;
            }
        }
    }
    vd_mutex_unlock(&l->lock);
    if (ret < 0) {
        return ret;
    }
    /* As QEMU: a persistent bitmap leaves the image at once, not at close. */
    if (bm->persistent && !bs->read_only && bs->drv->bitmaps_remove) {
        ret = bs->drv->bitmaps_remove(bs, bm->name, errp);
    }
    bitmap_free(bm);
    return ret;
}

/* Look name up, run the checks, then op (may be NULL) on it, all under the list's lock. */
typedef void BitmapOp(VdDirtyBitmap *bm, int arg);

static int bitmap_apply(BlockNode *bs, const char *name, int checks, BitmapOp *op, int arg,
                        VdError **errp)
{
    VdBitmapList *l;
    VdDirtyBitmap *bm = lookup_locked(bs, name, &l, errp);
    if (!bm) {
        return -ENOENT;
    }
    int ret = bitmap_check(bm, checks, errp);
    if (ret == 0 && op) {
        op(bm, arg);
    }
    vd_mutex_unlock(&l->lock);
    return ret;
}

static void op_clear(VdDirtyBitmap *bm, int arg)
{
    (void)arg;
    memset(bm->bits, 0, bytes_for(bm->nbits));
}

static void op_enable(VdDirtyBitmap *bm, int enable)
{
    bm->enabled = enable != 0;
}

static void op_busy(VdDirtyBitmap *bm, int delta)
{
    if (bm->busy + delta >= 0) {
        bm->busy += delta;
    }
}

int vd_bitmap_clear(BlockNode *bs, const char *name, VdError **errp)
{
    return bitmap_apply(bs, name, CHECK_ALL, op_clear, 0, errp);
}

int vd_bitmap_enable(BlockNode *bs, const char *name, bool enable, VdError **errp)
{
    /* QEMU lets read-only bitmaps be enabled/disabled (nothing is written) */
    return bitmap_apply(bs, name, CHECK_BUSY | CHECK_INCONSISTENT, op_enable, enable, errp);
}

/*
 * Copy the bits of a source bitmap (any node, any granularity) as byte ranges; the caller ORs
 * them into the target. Returns a copy of the source's geometry and bits, or NULL with errp.
 */
static VdDirtyBitmap *snapshot_source(const VdBitmapRef *r, uint64_t dst_size, VdError **errp)
{
    VdBitmapList *l;
    VdDirtyBitmap *src = lookup_locked(r->node, r->name, &l, errp);
    if (!src) {
        return NULL;
    }
    VdDirtyBitmap *copy = NULL;
    if (bitmap_check(src, CHECK_BUSY | CHECK_INCONSISTENT, errp) < 0) {
        goto out;
    }
    if (src->size != dst_size) {
        vd_error_setg(errp, EINVAL, "Bitmaps are of different sizes (destination size is %"
                      PRIu64 ", source size is %" PRIu64 ") and can't be merged", dst_size,
                      src->size);
        goto out;
    }
    copy = bitmap_new(src->name, src->gran_bits, src->size);
    if (!copy) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        goto out;
    }
    memcpy(copy->bits, src->bits, bytes_for(src->nbits));
out:
    vd_mutex_unlock(&l->lock);
    return copy;
}

/* OR src (any granularity, same size) into dst's bits. */
static void or_into(uint8_t *dst, uint32_t dst_gbits, const VdDirtyBitmap *src)
{
    for (uint64_t i = 0; i < src->nbits; i++) {
        if (!src->bits[i / 8]) {
            i |= 7; /* skip a clean byte */
            continue;
        }
        if (bit_get(src->bits, i)) {
            uint64_t start = i << src->gran_bits;
            uint64_t end = ((i + 1) << src->gran_bits) - 1;
            if (end >= src->size) {
                end = src->size - 1;
            }
            bits_fill(dst, start >> dst_gbits, end >> dst_gbits, true);
        }
    }
}

int vd_bitmap_merge(BlockNode *bs, const char *target, const VdBitmapRef *srcs, size_t n,
                    VdError **errp)
{
    VdBitmapList *l;
    VdDirtyBitmap *dst = lookup_locked(bs, target, &l, errp);
    if (!dst) {
        return -ENOENT;
    }
    int ret = bitmap_check(dst, CHECK_ALL, errp);
    uint64_t dst_size = dst->size;
    uint32_t dst_gbits = dst->gran_bits;
    vd_mutex_unlock(&l->lock);
    if (ret < 0) {
        return ret;
    }
    /* Build the union aside, then apply it in one step: all or nothing. */
    VdDirtyBitmap *acc = bitmap_new(target, dst_gbits, dst_size);
    if (!acc) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        VdDirtyBitmap *copy = snapshot_source(&srcs[i], dst_size, errp);
        if (!copy) {
            bitmap_free(acc);
            return -EINVAL;
        }
        or_into(acc->bits, dst_gbits, copy);
        bitmap_free(copy);
    }
    dst = lookup_locked(bs, target, &l, errp);
    if (!dst) {
        bitmap_free(acc);
        return -ENOENT;
    }
    ret = bitmap_check(dst, CHECK_ALL, errp);
    if (ret == 0) {
        for (size_t i = 0; i < bytes_for(dst->nbits); i++) {
            dst->bits[i] |= acc->bits[i];
        }
    }
    vd_mutex_unlock(&l->lock);
    bitmap_free(acc);
    return ret;
}

static uint64_t count_bytes(const VdDirtyBitmap *bm)
{
    uint64_t count = 0;
    for (uint64_t i = 0; i < bm->nbits; i++) {
        if (!bm->bits[i / 8]) {
            i |= 7;
            continue;
        }
        if (bit_get(bm->bits, i)) {
            uint64_t start = i << bm->gran_bits;
            uint64_t len = 1ULL << bm->gran_bits;
            count += start + len > bm->size ? bm->size - start : len;
        }
    }
    return count;
}

json_t *vd_bitmaps_info(BlockNode *bs)
{
    VdBitmapList *l = __atomic_load_n(&bs->bitmaps, __ATOMIC_ACQUIRE);
    if (!l) {
        return NULL;
    }
    json_t *arr = json_array();
    if (!arr) {
        return NULL;
    }
    vd_mutex_lock(&l->lock);
    for (VdDirtyBitmap *bm = l->head; bm; bm = bm->next) {
        json_t *o = json_object();
        if (!o) {
            continue;
        }
        json_object_set_new(o, "name", json_string(bm->name));
        json_object_set_new(o, "recording", json_boolean(bm->enabled));
        json_object_set_new(o, "persistent", json_boolean(bm->persistent));
        json_object_set_new(o, "busy", json_boolean(bm->busy > 0));
        json_object_set_new(o, "granularity", json_integer((json_int_t)1 << bm->gran_bits));
        json_object_set_new(o, "count", json_integer((json_int_t)count_bytes(bm)));
        if (bm->inconsistent) {
            json_object_set_new(o, "inconsistent", json_true());
        }
        json_array_append_new(arr, o);
    }
    vd_mutex_unlock(&l->lock);
    if (json_array_size(arr) == 0) {
        json_decref(arr);
        return NULL;
    }
    return arr;
}

int vd_bitmap_check_exists(BlockNode *bs, const char *name, VdError **errp)
{
    return bitmap_apply(bs, name, 0, NULL, 0, errp);
}

int vd_bitmap_check_usable(BlockNode *bs, const char *name, VdError **errp)
{
    return bitmap_apply(bs, name, CHECK_BUSY | CHECK_INCONSISTENT, NULL, 0, errp);
}

int vd_bitmap_check_clearable(BlockNode *bs, const char *name, VdError **errp)
{
    return bitmap_apply(bs, name, CHECK_ALL, NULL, 0, errp);
}

int vd_bitmap_is_recording(BlockNode *bs, const char *name)
{
    VdBitmapList *l;
    VdDirtyBitmap *bm = lookup_locked(bs, name, &l, NULL);
    if (!bm) {
        return -ENOENT;
    }
    int enabled = bm->enabled;
    vd_mutex_unlock(&l->lock);
    return enabled;
}

BlockNode *vd_bitmap_find_in_chain(BlockNode *bs, const char *name)
{
    for (; bs; bs = bs->backing) {
        if (vd_bitmap_is_recording(bs, name) >= 0) {
            return bs;
        }
    }
    return NULL;
}

int vd_bitmap_set_busy(BlockNode *bs, const char *name, bool busy, VdError **errp)
{
    return bitmap_apply(bs, name, 0, op_busy, busy ? 1 : -1, errp);
}

/* The extent of bm starting at offset (see vd_bitmap_status). */
static int extent_of(const VdDirtyBitmap *bm, uint64_t offset, uint64_t bytes, uint64_t *pnum,
                     bool *dirty)
{
    if (offset >= bm->size || bytes == 0) {
        return -EINVAL;
    }
    uint64_t end = bytes > bm->size - offset ? bm->size : offset + bytes;
    uint64_t i = offset >> bm->gran_bits;
    bool d = bit_get(bm->bits, i);
    uint64_t pos = (i + 1) << bm->gran_bits;
    for (i++; pos < end && bit_get(bm->bits, i) == d; i++) {
        pos += 1ULL << bm->gran_bits;
    }
    *pnum = (pos < end ? pos : end) - offset;
    *dirty = d;
    return 0;
}

int vd_bitmap_status(BlockNode *bs, const char *name, uint64_t offset, uint64_t bytes,
                     uint64_t *pnum, bool *dirty)
{
    VdBitmapList *l;
    VdDirtyBitmap *bm = lookup_locked(bs, name, &l, NULL);
    if (!bm) {
        return -ENOENT;
    }
    int r = extent_of(bm, offset, bytes, pnum, dirty);
    vd_mutex_unlock(&l->lock);
    return r;
}

VdBitmapSaved *vd_bitmap_save_and_clear(BlockNode *bs, const char *name, VdError **errp)
{
    VdBitmapList *l;
    VdDirtyBitmap *bm = lookup_locked(bs, name, &l, errp);
    if (!bm) {
        return NULL;
    }
    VdDirtyBitmap *copy = bitmap_new(bm->name, bm->gran_bits, bm->size);
    if (copy) {
        memcpy(copy->bits, bm->bits, bytes_for(bm->nbits));
        memset(bm->bits, 0, bytes_for(bm->nbits));
    } else {
        vd_error_setg(errp, ENOMEM, "Out of memory");
    }
    vd_mutex_unlock(&l->lock);
    return copy;
}

int vd_bitmap_saved_status(const VdBitmapSaved *saved, uint64_t offset, uint64_t bytes,
                           uint64_t *pnum, bool *dirty)
{
    return extent_of(saved, offset, bytes, pnum, dirty);
}

void vd_bitmap_saved_reset(VdBitmapSaved *saved, uint64_t offset, uint64_t bytes)
{
    if (bytes == 0 || offset >= saved->size) {
        return;
    }
    uint64_t end = bytes > saved->size - offset ? saved->size : offset + bytes;
    /* only granules entirely inside the range: a partly covered one keeps its bit */
    uint64_t g = 1ULL << saved->gran_bits;
    uint64_t first = (offset + g - 1) >> saved->gran_bits;
    uint64_t last_end = end == saved->size ? saved->nbits : end >> saved->gran_bits;
    if (last_end > first) {
        bits_fill(saved->bits, first, last_end - 1, false);
    }
}

void vd_bitmap_restore(BlockNode *bs, const char *name, VdBitmapSaved *saved)
{
    VdBitmapList *l;
    VdDirtyBitmap *bm = saved ? lookup_locked(bs, name, &l, NULL) : NULL;
    if (bm) {
        if (bm->size == saved->size) {
            or_into(bm->bits, bm->gran_bits, saved);
        }
        vd_mutex_unlock(&l->lock);
    }
    bitmap_free(saved);
}

void vd_bitmap_saved_free(VdBitmapSaved *saved)
{
    bitmap_free(saved);
}
