/*
 * status.c - block status of one layer and across a backing chain (map, convert, commit, rebase,
 * NBD base:allocation and live copy all build on these).
 *
 * Conventions: a driver's DATA or ZERO answer means the layer decides the content, so it implies
 * VD_BS_ALLOCATED (as in QEMU); a driver returns neither for ranges it leaves to its backing.
 * Protocol and backing-less formats (raw) decide everything. An extent never mixes statuses: each
 * answer is clipped to the shortest extent seen (and to the backing's end), so callers may
 * advance by *pnum and ask again. No locks: drivers protect their own metadata.
 *
 * depth: for an allocated extent, the index of the deciding layer (0 = top). For an unallocated
 * one, the number of layers visited, so qemu-img map's "depth" (index of the last layer it
 * looked at) is st.depth - 1 there; checked against qemu-img map in tests/unit/test_block.c.
 */
#include <errno.h>
#include <string.h>

#include "block/block.h"

int vd_block_status(BlockNode *bs, uint64_t offset, uint64_t bytes, uint64_t *pnum,
                    VdBlockStatus *st)
{
    memset(st, 0, sizeof(*st));
    *pnum = 0;
    if (!bs || !bs->drv) {
        return -EINVAL;
    }
    if (bytes == 0) {
        return 0;
    }
    int64_t len = vd_getlength(bs);
    if (len < 0) {
        return (int)len;
    }
    if (offset >= (uint64_t)len) {
        return -EINVAL;
    }
    if (bytes > (uint64_t)len - offset) {
        bytes = (uint64_t)len - offset;
    }

    uint64_t n = bytes;
    uint64_t map = 0;
    BlockNode *file = NULL;
    int flags;
    if (bs->drv->block_status) {
        flags = bs->drv->block_status(bs, offset, bytes, &n, &map, &file);
        if (flags < 0) {
            return flags;
        }
        if (n == 0 || n > bytes) {
            return -EIO; /* driver bug: never loop forever or overrun */
        }
    } else {
        /* No information: everything is data that this layer holds. */
        flags = VD_BS_DATA;
    }

    if ((flags & (VD_BS_DATA | VD_BS_ZERO)) || bs->drv->is_protocol ||
        !bs->drv->supports_backing) {
        flags |= VD_BS_ALLOCATED;
    } else {
        flags &= ~VD_BS_ALLOCATED;
        /* Unallocated: reads fall through to the backing, or read zero where it has nothing. */
        if (!bs->backing) {
            flags |= VD_BS_ZERO;
        } else {
            int64_t blen = vd_getlength(bs->backing);
            if (blen < 0) {
                return (int)blen;
            }
            if (offset >= (uint64_t)blen) {
                flags |= VD_BS_ZERO;
            } else if (n > (uint64_t)blen - offset) {
                n = (uint64_t)blen - offset; /* the rest (past the backing's end) is zero */
            }
        }
    }
    if ((flags & VD_BS_OFFSET_VALID) && !file) {
        file = bs->file ? bs->file : bs;
    }
    if ((flags & VD_BS_RECURSE) && (flags & VD_BS_DATA) && !(flags & VD_BS_ZERO) &&
        (flags & VD_BS_OFFSET_VALID) && file != bs) {
        /* Preallocated data clusters may still be holes in the file: those read as zeroes. */
        int64_t flen = vd_getlength(file);
        if (flen >= 0 && map >= (uint64_t)flen) {
            flags |= VD_BS_ZERO; /* wholly past the file's end */
        } else if (flen >= 0) {
            VdBlockStatus fst;
            uint64_t fn;
            if (vd_block_status(file, map, n, &fn, &fst) == 0 && fn > 0) {
                n = fn;
                flags |= fst.flags & VD_BS_ZERO;
            }
        }
    }
    flags &= ~VD_BS_RECURSE;
    st->flags = flags;
    st->depth = 0;
    if (flags & VD_BS_OFFSET_VALID) {
        st->offset = map;
        st->file = file;
    }
    st->layer = (flags & VD_BS_ALLOCATED) ? bs : NULL;
    *pnum = n;
    return 0;
}

int vd_block_status_above(BlockNode *top, BlockNode *base, uint64_t offset, uint64_t bytes,
                          uint64_t *pnum, VdBlockStatus *st)
{
    memset(st, 0, sizeof(*st));
    *pnum = 0;
    if (!top) {
        return -EINVAL;
    }
    if (top == base) {
        /* Nothing above base: every byte defers to it. Still validate the range. */
        int64_t len = vd_getlength(top);
        if (len < 0) {
            return (int)len;
        }
        if (bytes && offset >= (uint64_t)len) {
            return -EINVAL;
        }
        *pnum = bytes < (uint64_t)len - offset ? bytes : (uint64_t)len - offset;
        return 0;
    }
    uint64_t n = bytes;
    int visited = 0;
    for (BlockNode *p = top; p && p != base; p = p->backing) {
        VdBlockStatus lst;
        uint64_t pn;
        int ret = vd_block_status(p, offset, n, &pn, &lst);
        if (ret < 0) {
            return ret;
        }
        visited++;
        if (pn == 0) {
            return 0; /* bytes == 0 */
        }
        if (lst.flags & VD_BS_ALLOCATED) {
            *st = lst;
            st->depth = visited - 1;
            st->layer = p;
            *pnum = pn;
            return 0;
        }
        n = pn;
        if (lst.flags & VD_BS_ZERO) {
            /* The chain ends here for this range (no backing, or past its end). */
            st->flags = VD_BS_ZERO;
            st->depth = visited;
            *pnum = n;
            return 0;
        }
    }
    /* Every layer above base defers: the content comes from base (or below). */
    st->flags = 0;
    st->depth = visited;
    *pnum = n;
    return 0;
}

int vd_is_allocated_above(BlockNode *top, BlockNode *base, uint64_t offset, uint64_t bytes,
                          uint64_t *pnum)
{
    VdBlockStatus st;
    int ret = vd_block_status_above(top, base, offset, bytes, pnum, &st);
    if (ret < 0) {
        return ret;
    }
    return (st.flags & VD_BS_ALLOCATED) ? 1 : 0;
}
