/*
 * write-hooks.c - a node's write hooks (write-hooks.h). The list hangs off the node, created on the
 * first add and kept until the node is freed; requests hold its read-write lock shared for their
 * whole run, add/remove hold it alone, so a hook is never removed under a request inside it.
 * A node without hooks costs one atomic load per write.
 */
#include "block/write-hooks.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "util/lock.h"

struct VdWriteHooks {
    pthread_rwlock_t lock; /* shared by requests, exclusive for add/remove */
    VdWriteHook *v;
    size_t n;
};

/* Serialises the creation of a node's list (rare: once per node that ever gets a hook). */
static pthread_mutex_t create_lock = PTHREAD_MUTEX_INITIALIZER;

static VdWriteHooks *hooks_get(BlockNode *bs, bool create)
{
    VdWriteHooks *h = __atomic_load_n(&bs->write_hooks, __ATOMIC_ACQUIRE);
    if (h || !create) {
        return h;
    }
    vd_mutex_lock(&create_lock);
    h = bs->write_hooks;
    if (!h && (h = calloc(1, sizeof(*h)))) {
        pthread_rwlock_init(&h->lock, NULL);
        __atomic_store_n(&bs->write_hooks, h, __ATOMIC_RELEASE);
    }
    vd_mutex_unlock(&create_lock);
    return h;
}

int vd_write_hook_add(BlockNode *bs, const VdWriteHook *hook)
{
    VdWriteHooks *h = hooks_get(bs, true);
    if (!h) {
        return -ENOMEM;
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
    VdWriteHooks *h = hooks_get(bs, false);
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
    VdWriteHooks *h = hooks_get(bs, false);
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
