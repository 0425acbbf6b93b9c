/*
 * tracking.c - per-node in-flight request tracking and range serialisation (see tracking.h).
 * Invariants: a tracker's list holds every begun-but-not-ended request in begin order; an entry
 * proceeds only when no earlier entry overlaps it with a conflicting kind. One mutex per tracker
 * guards its list; a global mutex guards the node -> tracker registry and refcounts.
 */
#include "block/tracking.h"
#include "util/lock.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct BlockTracker {
    BlockNode *node;        /* key only: no reference held (the user holds the node) */
    int refcnt;             /* registry lock */
    uint64_t granularity;   /* power of two */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    BtRequest *head, *tail; /* begin order */
    unsigned count;
    unsigned others;        /* in flight, not a job's own (block_tracker_begin_job) */
    uint64_t ended, lat_ns; /* block_tracker_stats: requests not a job's own */
    BlockTracker *next_tracker;
    pthread_mutex_t notifier_lock; /* guards the notifier array and is held while calling them */
    struct {
        BtWriteNotifier *fn;
        void *opaque;
    } *notifiers;
    size_t nnotifiers;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static BlockTracker *registry;

static BlockTracker *tracker_alloc(BlockNode *node, uint64_t granularity)
{
    BlockTracker *t = calloc(1, sizeof(*t));
    if (!t) {
        return NULL;
    }
    t->node = node;
    t->refcnt = 1;
    t->granularity = granularity;
    pthread_mutex_init(&t->lock, NULL);
    pthread_mutex_init(&t->notifier_lock, NULL);
    pthread_cond_init(&t->cond, NULL);
    return t;
}

BlockTracker *block_tracker_new(uint64_t granularity)
{
    if (granularity < 4096 || (granularity & (granularity - 1))) {
        granularity = 4096;
    }
    return tracker_alloc(NULL, granularity);
}

BlockTracker *block_tracker_get(BlockNode *node)
{
    vd_mutex_lock(&registry_lock);
    for (BlockTracker *t = registry; t; t = t->next_tracker) {
        if (t->node == node) {
            t->refcnt++;
            vd_mutex_unlock(&registry_lock);
            return t;
        }
    }
    /* Widen to the cluster so concurrent allocating writes into one cluster serialise. */
    uint64_t g = 4096;
    if (node && node->drv && node->drv->cluster_size) {
        uint64_t cs = node->drv->cluster_size(node);
        if (cs > g && (cs & (cs - 1)) == 0 && cs <= (64u << 20)) {
            g = cs;
        }
    }
    BlockTracker *t = tracker_alloc(node, g);
    if (!t) {
        vd_mutex_unlock(&registry_lock);
        return NULL;
    }
    t->next_tracker = registry;
    registry = t;
    vd_mutex_unlock(&registry_lock);
    return t;
}

void block_tracker_put(BlockTracker *t)
{
    if (!t) {
        return;
    }
    vd_mutex_lock(&registry_lock);
    if (--t->refcnt > 0) {
        vd_mutex_unlock(&registry_lock);
        return;
    }
    for (BlockTracker **pp = &registry; *pp; pp = &(*pp)->next_tracker) {
        if (*pp == t) {
            *pp = t->next_tracker;
            break;
        }
    }
    vd_mutex_unlock(&registry_lock);
    pthread_mutex_destroy(&t->lock);
    pthread_mutex_destroy(&t->notifier_lock);
    pthread_cond_destroy(&t->cond);
    free(t->notifiers);
    free(t);
}

static bool conflicts(const BtRequest *a, const BtRequest *b)
{
    if (a->kind == BT_SHARED && b->kind == BT_SHARED) {
        return false;
    }
    return a->start < b->end && b->start < a->end;
}

/* Is there an earlier request in the list that req must wait for? (tracker lock held) */
static bool must_wait(const BtRequest *req)
{
    for (const BtRequest *o = req->prev; o; o = o->prev) {
        if (conflicts(o, req)) {
            return true;
        }
    }
    return false;
}

static void tracker_begin(BlockTracker *t, BtRequest *req, uint64_t offset, uint64_t bytes,
                          BtKind kind, bool job)
{
    uint64_t g = t->granularity;
    if (bytes == 0) {
        bytes = 1;
    }
    uint64_t end = offset + bytes < offset ? UINT64_MAX : offset + bytes;
    req->start = offset & ~(g - 1);
    req->end = end > UINT64_MAX - (g - 1) ? UINT64_MAX : (end + g - 1) & ~(g - 1);
    req->kind = kind;
    req->offset = offset;
    req->bytes = bytes;
    req->next = NULL;
    req->t_begin = now_ns();
    req->job = job;

    vd_mutex_lock(&t->lock);
    req->prev = t->tail;
    if (t->tail) {
        t->tail->next = req;
    } else {
        t->head = req;
    }
    t->tail = req;
    t->count++;
    t->others += !job;
    while (must_wait(req)) {
        vd_cond_wait(&t->cond, &t->lock);
    }
    vd_mutex_unlock(&t->lock);
}

void block_tracker_begin(BlockTracker *t, BtRequest *req, uint64_t offset, uint64_t bytes,
                         BtKind kind)
{
    tracker_begin(t, req, offset, bytes, kind, false);
}

void block_tracker_begin_job(BlockTracker *t, BtRequest *req, uint64_t offset, uint64_t bytes,
                             BtKind kind)
{
    tracker_begin(t, req, offset, bytes, kind, true);
}

void block_tracker_end(BlockTracker *t, BtRequest *req)
{
    if (req->kind == BT_EXCLUSIVE) {
        /* Still holding the range: see the ordering argument in tracking.h. */
        vd_mutex_lock(&t->notifier_lock);
        for (size_t i = 0; i < t->nnotifiers; i++) {
            t->notifiers[i].fn(t->notifiers[i].opaque, req->offset, req->bytes);
        }
        vd_mutex_unlock(&t->notifier_lock);
    }
    vd_mutex_lock(&t->lock);
    if (req->prev) {
        req->prev->next = req->next;
    } else {
        t->head = req->next;
    }
    if (req->next) {
        req->next->prev = req->prev;
    } else {
        t->tail = req->prev;
    }
    t->count--;
    if (!req->job) {
        t->others--;
        t->ended++;
        uint64_t now = now_ns();
        t->lat_ns += now > req->t_begin ? now - req->t_begin : 0;
    }
    /* Broadcast: waiters re-check; lists are short (bounded by in-flight requests). */
    vd_cond_broadcast(&t->cond);
    vd_mutex_unlock(&t->lock);
}

void block_tracker_wait_idle(BlockTracker *t)
{
    vd_mutex_lock(&t->lock);
    while (t->count > 0) {
        vd_cond_wait(&t->cond, &t->lock);
    }
    vd_mutex_unlock(&t->lock);
}

void block_tracker_stats(BlockTracker *t, uint64_t *ended, uint64_t *lat_ns, unsigned *in_flight)
{
    vd_mutex_lock(&t->lock);
    *ended = t->ended;
    *lat_ns = t->lat_ns;
    *in_flight = t->others;
    vd_mutex_unlock(&t->lock);
}

unsigned block_tracker_in_flight(BlockTracker *t)
{
    vd_mutex_lock(&t->lock);
    unsigned n = t->count;
    vd_mutex_unlock(&t->lock);
    return n;
}

uint64_t block_tracker_granularity(BlockTracker *t)
{
    return t->granularity;
}

int block_tracker_add_write_notifier(BlockTracker *t, BtWriteNotifier *fn, void *opaque)
{
    vd_mutex_lock(&t->notifier_lock);
    void *n = realloc(t->notifiers, (t->nnotifiers + 1) * sizeof(*t->notifiers));
    if (!n) {
        vd_mutex_unlock(&t->notifier_lock);
        return -ENOMEM;
    }
    t->notifiers = n;
    t->notifiers[t->nnotifiers].fn = fn;
    t->notifiers[t->nnotifiers].opaque = opaque;
    t->nnotifiers++;
    vd_mutex_unlock(&t->notifier_lock);
    return 0;
}

void block_tracker_remove_write_notifier(BlockTracker *t, BtWriteNotifier *fn, void *opaque)
{
    vd_mutex_lock(&t->notifier_lock);
    for (size_t i = 0; i < t->nnotifiers; i++) {
        if (t->notifiers[i].fn == fn && t->notifiers[i].opaque == opaque) {
            memmove(&t->notifiers[i], &t->notifiers[i + 1],
                    (t->nnotifiers - i - 1) * sizeof(*t->notifiers));
            t->nnotifiers--;
            break;
        }
    }
    vd_mutex_unlock(&t->notifier_lock);
}
