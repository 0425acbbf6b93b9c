/*
 * write-hooks.c - a node's write hooks (write-hooks.h). The list hangs off the node from its
 * creation to its end; requests hold its read-write lock shared for their whole run, add/remove
 * hold it alone, so a hook is never removed under a request inside it, and the first add waits for
 * the writes already in flight (a list made lazily on the first add let a write that had found none
 * run on unhooked after the add returned: a mirror's first copy could read its range before it
 * landed, and no hook marked it). A node without hooks costs one uncontended read lock per write.
 * The lock prefers its writer: glibc's default lets new readers in while add/remove waits, so
 * guests writing without pause (whose requests overlap) could hold it off for ever where the job
 * could not drain them first. A waiting add/remove now waits for the writes in flight only.
 * Requests never nest on one node's lock (a hook or a driver writes other nodes), which a
 * writer-preferring lock needs: a thread re-taking it shared behind a waiting writer would block.
 */
#include "block/write-hooks.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>


struct VdWriteHooks {
    pthread_rwlock_t lock; /* shared by requests, exclusive for add/remove */
    VdWriteHook *v;
    size_t n;
};

int vd_write_hooks_init(BlockNode *bs)
{
    VdWriteHooks *h = calloc(1, sizeof(*h));
    if (!h) {
        return -ENOMEM;
    }
    pthread_rwlockattr_t a;
    pthread_rwlockattr_init(&a);
    pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&h->lock, &a);
    pthread_rwlockattr_destroy(&a);
    bs->write_hooks = h;
    return 0;
}

int vd_write_hook_add(BlockNode *bs, const VdWriteHook *hook)
{
    VdWriteHooks *h = bs->write_hooks;
    if (!h) {
        return -EINVAL;
    }
    pthread_rwlock_wrlock(&h->lock);
    VdWriteHook *v = realloc(h->v, (h->n + 1) * sizeof(*v));
    if (v) {
        v[h->n++] = *hook;
        h->v = v;
    }
    pthread_rwlock_unlock(&h->lock);
    return v ? 0 : -ENOMEM;
}

void vd_write_hook_remove(BlockNode *bs, void *opaque)
{
    VdWriteHooks *h = bs->write_hooks;
    if (!h) {
        return;
    }
    pthread_rwlock_wrlock(&h->lock);
    for (size_t i = 0; i < h->n; i++) {
        if (h->v[i].opaque == opaque) {
            memmove(&h->v[i], &h->v[i + 1], (h->n - i - 1) * sizeof(*h->v));
            h->n--;
            break;
        }
    }
    pthread_rwlock_unlock(&h->lock);
}

/* Hooks i.. around the request (the list is held shared by the caller). */
static int run_from(BlockNode *bs, VdWriteHooks *h, size_t i, const VdWriteReq *w,
                    int (*io)(BlockNode *bs, const VdWriteReq *w))
{
    if (i == h->n) {
        return io(bs, w);
    }
    const VdWriteHook *hook = &h->v[i];
    BtRequest req;
    if (hook->tracker) {
        block_tracker_begin(hook->tracker, &req, w->offset, w->bytes, BT_EXCLUSIVE);
    }
    if (hook->before) {
        hook->before(hook->opaque, w);
    }
    int ret = run_from(bs, h, i + 1, w, io);
    if (hook->after) {
        hook->after(hook->opaque, w, ret);
    }
    if (hook->tracker) {
        block_tracker_end(hook->tracker, &req);
    }
    return ret;
}

int vd_write_hooks_run(BlockNode *bs, const VdWriteReq *w,
                       int (*io)(BlockNode *bs, const VdWriteReq *w))
{
    VdWriteHooks *h = bs->write_hooks;
    if (!h) {
        return io(bs, w);
    }
    pthread_rwlock_rdlock(&h->lock);
    int ret = run_from(bs, h, 0, w, io);
    pthread_rwlock_unlock(&h->lock);
    return ret;
}

void vd_write_hooks_free(BlockNode *bs)
{
    VdWriteHooks *h = bs->write_hooks;
    if (h) {
        pthread_rwlock_destroy(&h->lock);
        free(h->v);
        free(h);
        bs->write_hooks = NULL;
    }
}
