/*
 * write-hooks.h - a node's write hooks. Every write-like request to a node (vd_pwrite,
 * vd_pwrite_zeroes, vd_pdiscard, vd_pwrite_compressed, vd_copy_range's destination), whoever issues
 * it - an NBD export on the node or on any node above it, a job, a parent node added over QMP -
 * passes the node's hooks. A job that must see every write to its source (mirror, backup) registers
 * here rather than relying on the path a write takes (a filter node only sees writes made through it).
 *
 * Per request, hooks run nested in registration order: hook i's tracker range (if it has a tracker)
 * is taken BT_EXCLUSIVE, then its before() runs (it may block: copy-before-write, a journal's
 * write-ahead mark); innermost, the request reaches the driver; then, unwinding, each after() runs
 * with the result and its range is released. So a job whose copies hold the same tracker BT_SHARED
 * never interleaves with a write: the write finished (after() ran) before the copy began, or it
 * begins after the copy ended.
 * Adding or removing a hook waits for the hooked requests in flight on that node (a read-write lock:
 * requests share it, add/remove take it alone): once add returns every later request passes the
 * hook, once remove returns none is inside it. So never add or remove from inside a hook, nor while
 * holding anything a hooked request in flight may wait for. Requests that fail their checks
 * (read-only node, out of range, empty) never reach the hooks.
 */
#ifndef VDISK_BLOCK_WRITE_HOOKS_H
#define VDISK_BLOCK_WRITE_HOOKS_H

#include <stdint.h>

#include "block/block.h"
#include "block/tracking.h"

typedef enum {
    VD_WRITE_DATA,    /* buf holds the data; NULL for an offloaded copy (vd_copy_range) */
    VD_WRITE_ZEROES,
    VD_WRITE_DISCARD,
} VdWriteKind;

typedef struct VdWriteReq {
    VdWriteKind kind;
    uint64_t offset, bytes;
    const void *buf;
    int flags; /* VD_REQ_* as the driver gets them */
} VdWriteReq;

typedef struct VdWriteHook {
    BlockTracker *tracker; /* held BT_EXCLUSIVE around before..after (NULL: none) */
    void (*before)(void *opaque, const VdWriteReq *w);            /* NULL: none */
    void (*after)(void *opaque, const VdWriteReq *w, int ret);    /* NULL: none */
    void *opaque;
} VdWriteHook;

/*
 * Register a copy of *h on bs (see above for when it takes effect). -ENOMEM, nothing added;
 * -EINVAL on a node that has no hook list (one not made by block.c, e.g. a stack placeholder).
 */
int vd_write_hook_add(BlockNode *bs, const VdWriteHook *h);
/* Unregister the hook with this opaque (a no-op when none is registered). */
void vd_write_hook_remove(BlockNode *bs, void *opaque);

/*
 * For block.c and io.c: vd_write_hooks_init gives a new node its (empty) list before anyone can
 * write to it, so every write holds the list's lock shared even while no hook is registered and
 * the first add waits for the writes in flight like any other; -ENOMEM. vd_write_hooks_run runs
 * io(bs, w) inside bs's hooks (directly on a node without a list) and returns its result.
 * vd_write_hooks_free: at the node's end, when nobody can write to it any more.
 */
int vd_write_hooks_init(BlockNode *bs);
int vd_write_hooks_run(BlockNode *bs, const VdWriteReq *w,
                       int (*io)(BlockNode *bs, const VdWriteReq *w));
void vd_write_hooks_free(BlockNode *bs);

#endif
