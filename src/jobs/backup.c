/*
 * backup.c - blockdev-backup: a point-in-time copy of a running disk, copying before write.
 * Promise: when the job completes, the target reads (in every cluster the sync mode covers)
 * exactly what the source read at the moment the job started.
 * Mechanism: at start, under drain of the device's exports, a "to copy" bit is set per cluster
 * (the sync mode's choice: everything, the top's allocation, a user bitmap's dirty clusters, or -
 * sync=none - every cluster, copied only before it is overwritten), the job hooks every write to
 * the source (block/write-hooks.h: whoever issues it - the exports, an export or a node added
 * later, another job) and the exports are switched to a "backup-top" filter node (a pure
 * pass-through, as QEMU's graph shows one). The hook holds each write's clusters exclusively in
 * the job's tracker (widened to the job's cluster size) and, before the write reaches the source,
 * copies those of its clusters still marked from the source (still the old data) to the target
 * and unmarks them. The job thread copies the remaining marked clusters, each run holding its
 * range BT_SHARED in the same tracker, so no write can change a cluster while it is copied, and
 * a cluster is copied once, old data only.
 * A failed copy-before-write never fails the guest's write (the guest comes first): it fails the
 * job instead (QEMU 7.2's default, on-cbw-error=break-guest-write, fails the guest write).
 */
#include "jobs/backup.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/claims.h"
#include "block/dirty-bitmap.h"
#include "block/graph.h"
#include "block/tracking.h"
#include "block/users.h"
#include "block/write-hooks.h"
#include "jobs/blockops.h"
#include "jobs/job.h"
#include "util/lock.h"
#include "util/log.h"

#define BACKUP_MIN_CLUSTER (64 * 1024)
#define BACKUP_RUN_MAX (1024 * 1024) /* largest background copy */

typedef struct Backup {
    Job *job;
    BlockNode *source, *target, *filter; /* refs */
    BlockTracker *tracker;               /* the job's: its write hook and its copies */
    uint64_t len, cluster, nclusters;
    int sync;                            /* MirrorSync */
    JobErrorAction on_source_error, on_target_error;
    VdDrainedUsers exports;             /* switched to the filter (drained during setup) */
    bool filter_in, claimed;             /* claimed: source and target (owner b) */
    bool hooked;                         /* the source's write hook is in */
    char *bm_name;                       /* user bitmap (busy while the job runs), or NULL */
    int bm_mode;
    VdBitmapSaved *bm_saved;             /* its bits at the start */
    pthread_mutex_t lock;                /* guards the fields below */
    pthread_cond_t cond;                 /* sync=none: wakes the waiting job thread */
    uint8_t *todo;                       /* one bit per cluster: still to copy */
    uint64_t copied;
    int cbw_error;                       /* first failed copy-before-write (fails the job) */
} Backup;

static bool todo_get(const Backup *b, uint64_t i)
{
    return (b->todo[i / 8] >> (i % 8)) & 1;
}

static void todo_set(Backup *b, uint64_t i, bool v)
{
    b->todo[i / 8] = v ? (uint8_t)(b->todo[i / 8] | (1u << (i % 8)))
                       : (uint8_t)(b->todo[i / 8] & ~(1u << (i % 8)));
}

/*
 * Copy clusters [first, first+n) from source to target (caller holds their range, so the source
 * holds the data of the job's start there). Ranges that read as zero are written as zeroes
 * unless the target already reads zero. *is_read says which side failed.
 */
static int copy_clusters(Backup *b, uint64_t first, uint64_t n, uint8_t *buf, bool *is_read)
{
    uint64_t off = first * b->cluster;
    uint64_t end = (first + n) * b->cluster;
    if (end > b->len) {
        end = b->len;
    }
    while (off < end) {
        uint64_t pnum = 0;
        VdBlockStatus st = {0};
        *is_read = true;
        int r = vd_block_status_above(b->source, NULL, off, end - off, &pnum, &st);
        if (r < 0) {
            return r;
        }
        if (pnum == 0 || pnum > end - off) {
            pnum = end - off;
        }
        if (st.flags & VD_BS_ZERO) {
            uint64_t tnum = 0;
            VdBlockStatus ts = {0};
            *is_read = false;
            r = vd_block_status_above(b->target, NULL, off, pnum, &tnum, &ts);
            if (r < 0) {
                return r;
            }
            if (tnum == 0 || tnum > pnum) {
                tnum = pnum;
            }
            r = (ts.flags & VD_BS_ZERO) ? 0 : vd_pwrite_zeroes(b->target, off, tnum, 0);
            pnum = tnum;
        } else {
            r = vd_pread(b->source, off, pnum, buf);
            if (r == 0) {
                *is_read = false;
                r = vd_pwrite(b->target, off, pnum, buf, 0);
            }
        }
        if (r < 0) {
            return r;
        }
        off += pnum;
    }
    return 0;
}

/* ---- copy before write (any writer's thread, holding [offset, offset+bytes) widened exclusively) ---- */

static void copy_before_write(Backup *b, uint64_t offset, uint64_t bytes)
{
    if (bytes == 0 || offset >= b->len) {
        return;
    }
    uint64_t first = offset / b->cluster;
    uint64_t last = (offset + bytes - 1) / b->cluster;
    if (last >= b->nclusters) {
        last = b->nclusters - 1;
    }
    uint8_t *buf = NULL;
    uint64_t copied = 0;
    for (uint64_t i = first; i <= last; i++) {
        vd_mutex_lock(&b->lock);
        bool todo = todo_get(b, i) && !b->cbw_error;
        vd_mutex_unlock(&b->lock);
        if (!todo) {
            continue;
        }
        if (!buf && !(buf = malloc(b->cluster))) {
            vd_mutex_lock(&b->lock);
            b->cbw_error = b->cbw_error ? b->cbw_error : -ENOMEM;
            vd_cond_broadcast(&b->cond);
            vd_mutex_unlock(&b->lock);
            return;
        }
        bool is_read;
        int r = copy_clusters(b, i, 1, buf, &is_read);
        vd_mutex_lock(&b->lock);
        if (r == 0) {
            todo_set(b, i, false);
            b->copied += b->cluster;
            copied += b->cluster;
        } else if (!b->cbw_error) {
            b->cbw_error = r; /* the point-in-time copy is broken: the job fails */
        }
        vd_cond_broadcast(&b->cond);
        vd_mutex_unlock(&b->lock);
    }
    free(buf);
    Job *job = __atomic_load_n(&b->job, __ATOMIC_ACQUIRE); /* NULL while the job is created */
    if (job && copied) {
        job_progress_update(job, copied);
    }
}

/* The source's write hook (block/write-hooks.h): old data out before any write lands. */
static void source_before_write(void *opaque, const VdWriteReq *w)
{
    copy_before_write(opaque, w->offset, w->bytes);
}

static const BlockDriver backup_top_driver = {
    .name = "backup-top",
    .supports_backing = true,
    .pread = vd_filter_pread,
    .pwrite = vd_filter_pwrite,
    .pwrite_zeroes = vd_filter_pwrite_zeroes,
    .pdiscard = vd_filter_pdiscard,
    .flush = vd_filter_flush,
    .block_status = vd_filter_block_status,
    .getlength = vd_filter_getlength,
    .cluster_size = vd_filter_cluster_size,
};

/* ---- the job ---- */

static uint64_t todo_bytes(Backup *b)
{
    uint64_t n = 0;
    for (uint64_t i = 0; i < b->nclusters; i++) {
        n += todo_get(b, i);
    }
    return n * b->cluster;
}

/* The next run of marked clusters from *pos (at most max clusters); 0 when none is left. */
static uint64_t next_run(Backup *b, uint64_t *pos, uint64_t max)
{
    vd_mutex_lock(&b->lock);
    uint64_t i = *pos;
    while (i < b->nclusters && !todo_get(b, i)) {
        i++;
    }
    uint64_t n = 0;
    while (i + n < b->nclusters && n < max && todo_get(b, i + n)) {
        n++;
    }
    vd_mutex_unlock(&b->lock);
    *pos = i;
    return n;
}

static int cbw_error(Backup *b)
{
    vd_mutex_lock(&b->lock);
    int e = b->cbw_error;
    vd_mutex_unlock(&b->lock);
    return e;
}

/* Copy one run under its range; on an error, the action the policy asks for. */
static int copy_run(Backup *b, uint64_t first, uint64_t n, uint8_t *buf, JobErrorAction *act)
{
    BtRequest req;
    uint64_t off = first * b->cluster;
    block_tracker_begin(b->tracker, &req, off, n * b->cluster, BT_SHARED);
    /* under the range, only we change these bits: copy the still-marked sub-runs */
    int r = 0;
    bool is_read = false;
    uint64_t done = 0;
    for (uint64_t i = first; i < first + n && r == 0;) {
        vd_mutex_lock(&b->lock);
        uint64_t k = 0;
        while (i + k < first + n && todo_get(b, i + k)) {
            k++;
        }
        vd_mutex_unlock(&b->lock);
        if (k == 0) {
            i++;
            continue;
        }
        r = copy_clusters(b, i, k, buf, &is_read);
        if (r == 0) {
            vd_mutex_lock(&b->lock);
            for (uint64_t j = i; j < i + k; j++) {
                todo_set(b, j, false);
            }
            b->copied += k * b->cluster;
            vd_mutex_unlock(&b->lock);
            job_progress_update(b->job, k * b->cluster);
            done += k * b->cluster;
        }
        i += k;
    }
    block_tracker_end(b->tracker, &req);
    job_rate_limit(b->job, done); /* may sleep or pause: never while holding the range */
    if (r < 0) {
        *act = job_handle_io_error(b->job, is_read ? b->on_source_error : b->on_target_error,
                                   is_read, r);
    }
    return r;
}

static int backup_run(Job *job, VdError **errp)
{
    Backup *b = job_opaque(job);
    uint8_t *buf = malloc(BACKUP_RUN_MAX > b->cluster ? BACKUP_RUN_MAX : b->cluster);
    if (!buf) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    uint64_t max = BACKUP_RUN_MAX / b->cluster ? BACKUP_RUN_MAX / b->cluster : 1;
    int ret = 0;
    uint64_t pos = 0;
    while (ret == 0 && b->sync != MIRROR_SYNC_NONE) {
        job_pause_point(job);
        if (job_is_cancelled(job)) {
            ret = -ECANCELED;
            break;
        }
        if ((ret = cbw_error(b)) < 0) {
            break;
        }
        uint64_t from = pos;
        uint64_t n = next_run(b, &pos, max);
        if (n == 0) {
            if (from == 0) {
                break; /* nothing marked anywhere: done */
            }
            pos = 0; /* skipped (ignored errors) or copied before writes meanwhile: rescan */
            continue;
        }
        JobErrorAction act = JOB_ERR_REPORT;
        int r = copy_run(b, pos, n, buf, &act);
        if (r < 0 && act == JOB_ERR_REPORT) {
            ret = r;
        } else if (r < 0 && act == JOB_ERR_IGNORE) {
            pos += n; /* left marked: retried after the next rescan */
            if (pos >= b->nclusters) {
                ret = r; /* a whole pass without progress on it: a hole in the backup */
            }
        }
        /* STOP: the job is paused; the pause point waits, then the run is retried */
    }
    /* sync=none: copy before write until cancelled (the image-fleecing use) */
    while (ret == 0 && b->sync == MIRROR_SYNC_NONE) {
        job_set_busy(job, false);
        job_sleep_ns(job, 100000000ULL);
        job_set_busy(job, true);
        if (job_cancel_requested(job)) {
            ret = -ECANCELED;
        } else {
            ret = cbw_error(b);
        }
    }
    if (ret == 0) {
        ret = cbw_error(b);
    }
    free(buf);
    if (ret < 0 && ret != -ECANCELED) {
        vd_error_setg(errp, -ret, "Backup failed: %s", strerror(-ret));
    }
    return ret;
}

static int backup_prepare(Job *job, VdError **errp)
{
    Backup *b = job_opaque(job);
    int r = vd_flush(b->target);
    if (r < 0) {
        vd_error_setg(errp, -r, "Could not flush the backup target: %s", strerror(-r));
    }
    return r;
}

/* Take the filter and the hook out: exports back onto the source, writes pass straight through. */
static void backup_detach(Backup *b)
{
    VdDrainedUsers set;
    bool drained = b->filter_in && vd_node_users_drain(b->filter, &set) == 0;
    b->filter_in = false;
    if (b->hooked) {
        /*
         * Waits for the writes inside the hook. Done while the exports are drained: their writes
         * each hold the hook's lock shared, and a guest writing without pause could otherwise keep
         * the exclusive remove waiting (glibc's rwlock prefers readers) and the job from ending.
         */
        vd_write_hook_remove(b->source, b);
        b->hooked = false;
    }
    if (drained) {
        vd_node_users_resume(&set, b->source);
    }
}

/* The user bitmap at the end: success leaves what guests dirtied since the start (on-success,
 * always); otherwise the start's bits come back (never, on-success), or only those not copied
 * (always). */
static void backup_bitmap_finish(Backup *b, bool success)
{
    if (!b->bm_name) {
        return;
    }
    vd_bitmap_set_busy(b->source, b->bm_name, false, NULL);
    if (b->bm_mode == BITMAP_NEVER || (!success && b->bm_mode == BITMAP_ON_SUCCESS)) {
        vd_bitmap_restore(b->source, b->bm_name, b->bm_saved);
    } else if (!success) { /* always */
        for (uint64_t i = 0; i < b->nclusters; i++) {
            if (!todo_get(b, i)) {
                vd_bitmap_saved_reset(b->bm_saved, i * b->cluster, b->cluster);
            }
        }
        vd_bitmap_restore(b->source, b->bm_name, b->bm_saved);
    } else {
        vd_bitmap_saved_free(b->bm_saved);
    }
    b->bm_saved = NULL;
    free(b->bm_name);
    b->bm_name = NULL;
}

static void backup_commit(Job *job)
{
    backup_bitmap_finish(job_opaque(job), true);
}

static void backup_abort(Job *job)
{
    backup_bitmap_finish(job_opaque(job), false);
}

static void backup_clean(Job *job)
{
    Backup *b = job_opaque(job);
    backup_detach(b);
    if (b->claimed) {
        vd_release_claims(b);
        b->claimed = false;
    }
}

static void backup_kick(Job *job)
{
    Backup *b = job_opaque(job);
    vd_mutex_lock(&b->lock);
    vd_cond_broadcast(&b->cond);
    vd_mutex_unlock(&b->lock);
}

static void backup_free_state(Backup *b)
{
    if (!b) {
        return;
    }
    backup_detach(b);
    backup_bitmap_finish(b, false);
    if (b->claimed) {
        vd_release_claims(b);
    }
    if (b->tracker) {
        block_tracker_put(b->tracker);
    }
    vd_node_unref(b->filter);
    vd_node_unref(b->source);
    vd_node_unref(b->target);
    free(b->todo);
    pthread_mutex_destroy(&b->lock);
    pthread_cond_destroy(&b->cond);
    free(b);
}

static void backup_free(Job *job)
{
    backup_free_state(job_opaque(job));
}

static void backup_query(Job *job, json_t *info)
{
    (void)job, (void)info; /* QEMU's members only */
}

static const JobDriver backup_driver = {
    .type = "backup",
    .run = backup_run,
    .prepare = backup_prepare,
    .commit = backup_commit,
    .abort = backup_abort,
    .clean = backup_clean,
    .kick = backup_kick,
    .query = backup_query,
    .free = backup_free,
};

/* ---- start ---- */

/* Mark what the sync mode copies (exports drained: the source does not change meanwhile). */
static int mark_todo(Backup *b, VdError **errp)
{
    for (uint64_t i = 0; i < b->nclusters; i++) {
        uint64_t off = i * b->cluster;
        uint64_t n = off + b->cluster > b->len ? b->len - off : b->cluster;
        bool mark = true;
        for (uint64_t pos = off; pos < off + n && b->sync != MIRROR_SYNC_FULL &&
                                 b->sync != MIRROR_SYNC_NONE;) {
            uint64_t pnum = 0;
            bool hit = false;
            int r;
            if (b->sync == MIRROR_SYNC_TOP) {
                VdBlockStatus st = {0};
                r = vd_block_status(b->source, pos, off + n - pos, &pnum, &st);
                hit = st.flags & VD_BS_ALLOCATED;
            } else {
                r = vd_bitmap_saved_status(b->bm_saved, pos, off + n - pos, &pnum, &hit);
            }
            if (r < 0) {
                vd_error_setg(errp, -r, "Could not read the allocation of '%s': %s",
                              b->source->node_name, strerror(-r));
                return r;
            }
            mark = hit;
            if (hit || pnum == 0) {
                break;
            }
            pos += pnum;
        }
        todo_set(b, i, mark);
    }
    return 0;
}

/* QEMU's argument checks, in its order, with its texts. */
static int check_request(const BackupRequest *r, BlockNode **src, BlockNode **tgt, VdError **errp)
{
    *src = graph_find_node(r->device);
    if (!*src) {
        vd_error_setg(errp, EINVAL, "Cannot find device='%s' nor node-name='%s'", r->device,
                      r->device);
        return -EINVAL;
    }
    *tgt = graph_find_node(r->target);
    if (!*tgt) {
        vd_error_setg(errp, EINVAL, "Cannot find device='%s' nor node-name='%s'", r->target,
                      r->target);
        return -EINVAL;
    }
    if (r->bitmap) {
        if (vd_bitmap_is_recording(*src, r->bitmap) < 0) {
            vd_error_setg(errp, ENOENT, "Bitmap '%s' could not be found", r->bitmap);
            return -ENOENT;
        }
        if (!r->has_bitmap_mode && r->sync != MIRROR_SYNC_INCREMENTAL) {
            vd_error_setg(errp, EINVAL, "Bitmap sync mode must be given when providing a bitmap");
            return -EINVAL;
        }
        if (r->sync == MIRROR_SYNC_INCREMENTAL && r->has_bitmap_mode &&
            r->bitmap_mode != BITMAP_ON_SUCCESS) {
            vd_error_setg(errp, EINVAL, "Bitmap sync mode must be 'on-success' when using sync "
                          "mode 'incremental'");
            return -EINVAL;
        }
        int ret = vd_bitmap_check_usable(*src, r->bitmap, errp);
        if (ret < 0) {
            return ret;
        }
    } else if (r->has_bitmap_mode) {
        vd_error_setg(errp, EINVAL, "Cannot specify bitmap sync mode without a bitmap");
        return -EINVAL;
    }
    if ((r->sync == MIRROR_SYNC_BITMAP || r->sync == MIRROR_SYNC_INCREMENTAL) && !r->bitmap) {
        vd_error_setg(errp, EINVAL, "must provide a valid bitmap name for '%s' sync mode",
                      r->sync == MIRROR_SYNC_BITMAP ? "bitmap" : "incremental");
        return -EINVAL;
    }
    if (r->bitmap && r->sync == MIRROR_SYNC_NONE) {
        vd_error_setg(errp, EINVAL, "a bitmap was given to backup_job_create, but it received an "
                      "incompatible sync_mode (none)");
        return -EINVAL;
    }
    if (*src == *tgt) {
        vd_error_setg(errp, EINVAL, "Source and target cannot be the same");
        return -EINVAL;
    }
    if (r->compress) {
        vd_error_setg(errp, ENOTSUP, "'compress' is not supported by vdiskd's backup");
        return -ENOTSUP;
    }
    if (r->speed < 0) {
        vd_error_setg(errp, EINVAL, "Invalid parameter 'speed'");
        return -EINVAL;
    }
    if ((*tgt)->read_only) {
        vd_error_setg(errp, EPERM, "Block node '%s' is read-only", r->target);
        return -EPERM;
    }
    int64_t sl = vd_getlength(*src), tl = vd_getlength(*tgt);
    if (sl < 0 || tl < 0 || tl < sl) {
        vd_error_setg(errp, EINVAL, "Target '%s' is smaller than the source", r->target);
        return -EINVAL;
    }
    return 0;
}

static Backup *backup_new(const BackupRequest *r, BlockNode *src, BlockNode *tgt,
                          VdError **errp)
{
    Backup *b = calloc(1, sizeof(*b));
    if (!b) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return NULL;
    }
    pthread_mutex_init(&b->lock, NULL);
    pthread_cond_init(&b->cond, NULL);
    b->source = src;
    vd_node_ref(src);
    b->target = tgt;
    vd_node_ref(tgt);
    b->sync = r->sync;
    b->on_source_error = (JobErrorAction)r->on_source_error;
    b->on_target_error = (JobErrorAction)r->on_target_error;
    b->bm_mode = r->has_bitmap_mode ? r->bitmap_mode : BITMAP_ON_SUCCESS;
    b->len = (uint64_t)vd_getlength(src);
    uint32_t tcs = tgt->drv->cluster_size ? tgt->drv->cluster_size(tgt) : 0;
    b->cluster = tcs > BACKUP_MIN_CLUSTER ? tcs : BACKUP_MIN_CLUSTER;
    b->nclusters = (b->len + b->cluster - 1) / b->cluster;
    b->todo = calloc(b->nclusters / 8 + 1, 1);
    char *generated = NULL;
    if (!r->filter_node_name &&
        asprintf(&generated, "#backup-top-%s", r->job_id ? r->job_id : r->device) < 0) {
        generated = NULL;
    }
    const char *fname = r->filter_node_name ? r->filter_node_name : generated;
    b->filter = fname ? vd_filter_new(&backup_top_driver, src, fname) : NULL;
    free(generated);
    if (!b->todo || !b->filter) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        backup_free_state(b);
        return NULL;
    }
    /* Whole backup clusters, and whole source clusters (allocating writes into one serialise). */
    uint32_t scs = src->drv->cluster_size ? src->drv->cluster_size(src) : 0;
    b->tracker = block_tracker_new(scs > b->cluster ? scs : b->cluster);
    if (!b->tracker) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        backup_free_state(b);
        return NULL;
    }
    return b;
}

int backup_request_start(const BackupRequest *r, VdError **errp)
{
    BlockNode *src, *tgt;
    int ret = check_request(r, &src, &tgt, errp);
    if (ret < 0) {
        return ret;
    }
    Backup *b = backup_new(r, src, tgt, errp);
    if (!b) {
        return -ENOMEM;
    }
    /* the target first: QEMU names it when both are taken */
    BlockNode *const nodes[] = {tgt, src};
    if ((ret = blockops_claim_nodes(b, "backup", nodes, 2, errp)) < 0) {
        backup_free_state(b);
        return ret;
    }
    b->claimed = true;
    /* the point in time: guests are held while the marks are made and the filter goes in */
    if (vd_node_users_drain(src, &b->exports) < 0) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        backup_free_state(b);
        return -ENOMEM;
    }
    if (r->bitmap) {
        b->bm_name = strdup(r->bitmap);
        b->bm_saved = b->bm_name ? vd_bitmap_save_and_clear(src, r->bitmap, errp) : NULL;
        if (!b->bm_saved) {
            free(b->bm_name);
            b->bm_name = NULL;
            ret = -ENOMEM;
        } else {
            vd_bitmap_set_busy(src, r->bitmap, true, NULL);
        }
    }
    if (ret == 0) {
        ret = mark_todo(b, errp);
    }
    VdWriteHook hook = {.tracker = b->tracker, .before = source_before_write, .opaque = b};
    if (ret == 0 && (ret = vd_write_hook_add(src, &hook)) < 0) {
        vd_error_setg(errp, -ret, "Out of memory");
    }
    b->hooked = ret == 0;
    if (ret < 0) {
        vd_node_users_resume(&b->exports, NULL);
        backup_free_state(b);
        return ret;
    }
    vd_node_users_resume(&b->exports, b->filter);
    b->filter_in = true;
    JobOptions jo = {.id = r->job_id ? r->job_id : r->device, .speed = r->speed,
                     .auto_finalize = r->auto_finalize, .auto_dismiss = r->auto_dismiss,
                     .node = b->source->node_name};
    Job *job = job_create(&backup_driver, &jo, b, errp);
    if (!job) {
        backup_free_state(b);
        return -EINVAL;
    }
    __atomic_store_n(&b->job, job, __ATOMIC_RELEASE);
    job_progress_set_remaining(job, todo_bytes(b));
    vd_log(VD_LOG_INFO, "backup '%s': %s -> %s, %llu bytes to copy", jo.id, src->node_name,
           tgt->node_name, (unsigned long long)todo_bytes(b));
    return job_start(job, errp);
}
