/*
 * nbd-meta.c - the NBD server's metadata contexts: base:allocation (block status of the chain),
 * QEMU's qemu:dirty-bitmap:NAME (bit 0 = dirty) for each bitmap the export was created with, and
 * QEMU's qemu:allocation-depth when the export was created with allocation-depth.
 * Context ids are fixed per export: 1 base:allocation, i + 2 the export's bitmap i, then
 * nbitmaps + 2 qemu:allocation-depth. A
 * BLOCK_STATUS reply has one chunk per selected context, in id order, the last one flagged DONE;
 * extents never run past the request, merge equal neighbours, at most NBD_MAX_EXTENTS a chunk.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "block/dirty-bitmap.h"
#include "nbd/nbd-protocol.h"

static bool is(const uint8_t *q, uint32_t ql, const char *s)
{
    return ql == strlen(s) && memcmp(q, s, ql) == 0;
}

uint32_t nbd_meta_count(const NbdExport *exp)
{
    return 1 + exp->nbitmaps + (exp->alloc_depth ? 1 : 0);
}

static bool is_depth_ctx(const NbdExport *exp, uint32_t i)
{
    return exp->alloc_depth && i == 1 + exp->nbitmaps;
}

void nbd_meta_match(const NbdExport *exp, const uint8_t *q, uint32_t ql, bool list, bool *sel)
{
    if (exp->alloc_depth &&
        (is(q, ql, NBD_META_ALLOCATION_DEPTH) || (list && is(q, ql, "qemu:")))) {
        sel[1 + exp->nbitmaps] = true;
    }
    const size_t pl = strlen(NBD_META_DIRTY_BITMAP);
    if (is(q, ql, NBD_META_BASE_ALLOCATION) || (list && is(q, ql, "base:"))) {
        sel[0] = true;
    }
    bool all_bitmaps = list && (is(q, ql, "qemu:") || is(q, ql, NBD_META_DIRTY_BITMAP));
    bool one_bitmap = ql > pl && memcmp(q, NBD_META_DIRTY_BITMAP, pl) == 0;
    for (uint32_t i = 0; i < exp->nbitmaps && (all_bitmaps || one_bitmap); i++) {
        if (all_bitmaps || is(q + pl, ql - (uint32_t)pl, exp->bitmaps[i].name)) {
            sel[i + 1] = true;
        }
    }
}

size_t nbd_meta_name(const NbdExport *exp, uint32_t i, char *buf)
{
    if (is_depth_ctx(exp, i)) {
        strcpy(buf, NBD_META_ALLOCATION_DEPTH);
        return strlen(NBD_META_ALLOCATION_DEPTH);
    }
    const char *name = i == 0 ? NBD_META_BASE_ALLOCATION : exp->bitmaps[i - 1].name;
    size_t pl = i == 0 ? 0 : strlen(NBD_META_DIRTY_BITMAP);
    size_t nl = strlen(name);
    if (pl + nl > NBD_MAX_STRING) {
        nl = NBD_MAX_STRING - pl; /* cannot happen: bitmap names are at most 1023 bytes */
    }
    memcpy(buf, NBD_META_DIRTY_BITMAP, pl);
    memcpy(buf + pl, name, nl);
    buf[pl + nl] = 0;
    return pl + nl;
}

void nbd_meta_reset(NbdConn *c)
{
    free(c->meta_sel);
    c->meta_sel = NULL;
    c->meta_nsel = 0;
}

bool nbd_meta_any(const NbdConn *c)
{
    for (uint32_t i = 0; i < c->meta_nsel; i++) {
        if (c->meta_sel[i]) {
            return true;
        }
    }
    return false;
}

/* The status of one context at pos: *pnum bytes (> 0, <= bytes) share the NBD flags *flags. */
typedef int StatusFn(const NbdExport *exp, uint32_t ctx, BlockNode *node, uint64_t pos,
                     uint64_t bytes, uint64_t *pnum, uint32_t *flags);

static int allocation_status(const NbdExport *exp, uint32_t ctx, BlockNode *node, uint64_t pos,
                             uint64_t bytes, uint64_t *pnum, uint32_t *flags)
{
    (void)exp;
    (void)ctx;
    VdBlockStatus st = {0};
    int r = vd_block_status_above(node, NULL, pos, bytes, pnum, &st);
    /* Like qemu-nbd: a range without data reads from nowhere (hole); ZERO says it reads zero. */
    *flags = (st.flags & VD_BS_DATA ? 0 : NBD_STATE_HOLE) |
             (st.flags & VD_BS_ZERO ? NBD_STATE_ZERO : 0);
    return r;
}

/*
 * QEMU's allocation depth: 0 where no layer of the chain decides (the chain's end reads zero),
 * else 1 + the number of backing steps from the export's node to the deciding layer. A job's
 * filter node (no driver open: a write hook) is not a layer of the image and is not counted.
 */
static int depth_status(const NbdExport *exp, uint32_t ctx, BlockNode *node, uint64_t pos,
                        uint64_t bytes, uint64_t *pnum, uint32_t *flags)
{
    (void)exp;
    (void)ctx;
    VdBlockStatus st = {0};
    int r = vd_block_status_above(node, NULL, pos, bytes, pnum, &st);
    uint32_t depth = 0;
    if (r == 0 && (st.flags & VD_BS_ALLOCATED)) {
        for (BlockNode *p = node; p; p = p->backing) {
            depth += p->drv->open ? 1 : 0;
            if (p == st.layer) {
                break;
            }
        }
    }
    *flags = depth;
    return r;
}

static int bitmap_status(const NbdExport *exp, uint32_t ctx, BlockNode *node, uint64_t pos,
                         uint64_t bytes, uint64_t *pnum, uint32_t *flags)
{
    (void)node; /* the bitmap stays on the node it was exported from, even across a pivot */
    const NbdExportBitmap *b = &exp->bitmaps[ctx - 1];
    bool dirty = false;
    int r = vd_bitmap_status(b->node, b->name, pos, bytes, pnum, &dirty);
    if (r == -EINVAL) { /* past the bitmap's end (the node shrank under it): clean */
        *pnum = bytes;
        r = 0;
    }
    *flags = dirty ? NBD_STATE_DIRTY : 0;
    return r;
}

/* Extents of [offset, offset+len) as (length, flags) pairs at desc; their count or -errno. */
static int collect_extents(const NbdExport *exp, uint32_t ctx, BlockNode *node, uint64_t offset,
                           uint32_t len, bool req_one, uint8_t *desc)
{
    StatusFn *fn = ctx == 0 ? allocation_status
                   : is_depth_ctx(exp, ctx) ? depth_status : bitmap_status;
    uint64_t pos = offset, end = offset + len;
    int n = 0;
    uint32_t cur_len = 0, cur_flags = 0;
    while (pos < end) {
        uint64_t pnum = 0;
        uint32_t f = 0;
        int r = fn(exp, ctx, node, pos, end - pos, &pnum, &f);
        if (r < 0) {
            return r;
        }
        if (pnum == 0) {
            return -EIO; /* a driver that makes no progress must not loop us for ever */
        }
        if (pnum > end - pos) {
            pnum = end - pos;
        }
        if (n > 0 && f == cur_flags) {
            cur_len += (uint32_t)pnum; /* total <= len < 2^32 */
        } else {
            if (n > 0) {
                nbd_put32(desc + 8 * (n - 1), cur_len);
                nbd_put32(desc + 8 * (n - 1) + 4, cur_flags);
                if (req_one || n == NBD_MAX_EXTENTS) {
                    return n;
                }
            }
            n++;
            cur_len = (uint32_t)pnum;
            cur_flags = f;
        }
        pos += pnum;
    }
    nbd_put32(desc + 8 * (n - 1), cur_len);
    nbd_put32(desc + 8 * (n - 1) + 4, cur_flags);
    return n;
}

int nbd_meta_block_status(NbdConn *c, BlockNode *node, uint64_t cookie, uint64_t offset,
                          uint32_t len, bool req_one, uint8_t **buf, size_t *blen)
{
    const NbdExport *exp = c->exp;
    const size_t hdr = NBD_CHUNK_HEADER_SIZE + 4, chunk_max = hdr + 8 * NBD_MAX_EXTENTS;
    uint32_t nsel = 0, last = 0;
    /* a selection made against an export of the same name that changed since: ignore extras */
    uint32_t limit = c->meta_nsel < nbd_meta_count(exp) ? c->meta_nsel : nbd_meta_count(exp);
    for (uint32_t i = 0; i < limit; i++) {
        if (c->meta_sel[i]) {
            nsel++;
            last = i;
        }
    }
    if (nsel == 0) {
        return -EINVAL;
    }
    uint8_t *out = malloc(chunk_max * nsel);
    if (!out) {
        return -ENOMEM;
    }
    size_t pos = 0;
    for (uint32_t i = 0; i <= last; i++) {
        if (!c->meta_sel[i]) {
            continue;
        }
        int n = collect_extents(exp, i, node, offset, len, req_one, out + pos + hdr);
        if (n < 0) {
            free(out);
            return n;
        }
        size_t clen = hdr + 8 * (size_t)n;
        nbd_put_chunk(out + pos, cookie, i == last ? NBD_REPLY_FLAG_DONE : 0,
                      NBD_REPLY_TYPE_BLOCK_STATUS, (uint32_t)(clen - NBD_CHUNK_HEADER_SIZE));
        nbd_put32(out + pos + NBD_CHUNK_HEADER_SIZE, i + 1);
        pos += clen;
    }
    *buf = out;
    *blen = pos;
    return 0;
}
