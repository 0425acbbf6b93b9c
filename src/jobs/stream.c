/*
 * stream.c - block-stream: copy what the intermediate images (between the device's top and base)
 * decide into the top while the guest keeps writing to it, then record base as the top's backing
 * (header and chain) and drop the intermediates.
 * Promise: a copy of old backing data never overwrites a newer guest write. Each chunk is copied
 * holding the top's tracker range BT_EXCLUSIVE (the same tracker NBD requests use), and the top's
 * allocation is re-checked under it: only ranges the top does not decide are filled. A guest write
 * either finished before (the range is allocated: skipped) or waits until the copy ended (and then
 * overwrites it). The intermediates are read-only, so what is copied cannot change meanwhile.
 * Resumable (vdiskd --state-dir, docs/resumable.md): the progress is the top's allocation itself
 * (a copied cluster is allocated in the top and skipped by a later sweep; one a crash lost with an
 * unflushed qcow2 cache is copied again), so the journal records only the request, with its base
 * resolved to a file, and is deleted when the job ends.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "block/graph.h"
#include "block/tracking.h"
#include "block/users.h"
#include "jobs/blockops.h"
#include "jobs/copy.h"
#include "jobs/job.h"
#include "util/log.h"

typedef struct Stream {
    Job *job;
    BlockNode *top;           /* ref: the device node, written */
    BlockNode *base;          /* ref or NULL: first node kept below the top */
    char *backing_name;       /* recorded at the end (NULL: no backing) */
    char *backing_fmt;
    BlockTracker *tracker;    /* the top's */
    CopyEngine *engine;       /* copies chunks holding the top's range BT_EXCLUSIVE */
    uint64_t len, gran, unit;
    JobErrorAction on_error;
    bool claimed;
    JobJournal *journal;      /* NULL: no --state-dir */
    bool resumed;             /* re-created from its journal after a restart */
    uint64_t copied;          /* bytes written into the top (atomic; query-block-jobs) */
} Stream;

/*
 * Fill [off, off+n) of the top from its backing where the top does not decide the content and some
 * layer above base does. Caller holds the range exclusively. *is_read tells which side failed.
 */
static int stream_range(Stream *s, uint64_t off, uint64_t n, uint8_t *buf, bool *is_read,
                        uint64_t *copied)
{
    uint64_t end = off + n;
    while (off < end) {
        uint64_t pnum = 0;
        VdBlockStatus st;
        *is_read = false;
        int r = vd_block_status(s->top, off, end - off, &pnum, &st);
        if (r < 0) {
            return r;
        }
        if (pnum == 0 || pnum > end - off) {
            pnum = end - off;
        }
        if ((st.flags & VD_BS_ALLOCATED) || !s->top->backing || s->top->backing == s->base) {
            off += pnum; /* the top (the guest, or an earlier copy) decides: keep it */
            continue;
        }
        uint64_t p2 = 0;
        VdBlockStatus st2;
        *is_read = true;
        r = vd_block_status_above(s->top->backing, s->base, off, pnum, &p2, &st2);
        if (r < 0) {
            return r;
        }
        if (p2 == 0 || p2 > pnum) {
            p2 = pnum;
        }
        if (!(st2.flags & VD_BS_ALLOCATED)) {
            /* From base (or nothing): still what the guest reads once base is the backing. */
            off += p2;
            continue;
        }
        if (st2.flags & VD_BS_ZERO) {
            *is_read = false;
            r = vd_pwrite_zeroes(s->top, off, p2, 0);
        } else {
            /* From the deciding intermediate itself: see copy_read_layer. */
            r = vd_pread(copy_read_layer(s->top->backing, st2.layer, off, p2), off, p2, buf);
            if (r == 0) {
                *is_read = false;
                r = vd_pwrite(s->top, off, p2, buf, 0);
            }
        }
        if (r < 0) {
            return r;
        }
        *copied += p2;
        off += p2;
    }
    return 0;
}

/* One chunk, on a copy worker holding [off, off+bytes) of the top exclusively. */
static void stream_copy_chunk(void *opaque, CopyChunk *c, uint8_t *buf, uint64_t buf_size)
{
    Stream *s = opaque;
    c->ret = stream_range(s, c->off, c->bytes, buf, &c->is_read, &c->copied);
    __atomic_add_fetch(&s->copied, c->copied, __ATOMIC_RELAXED);
}

/*
 * What the intermediates (read-only while the job runs) do not decide needs no copy: skipped
 * without holding the top's range. stream_range re-checks everything else under the range.
 */
static uint64_t stream_skip(void *opaque, uint64_t off, uint64_t max)
{
    Stream *s = opaque;
    if (!s->top->backing || s->top->backing == s->base) {
        return max;
    }
    uint64_t pnum = 0;
    VdBlockStatus st;
    if (vd_block_status_above(s->top->backing, s->base, off, max, &pnum, &st) < 0 ||
        (st.flags & VD_BS_ALLOCATED) || pnum > max) {
        return 0; /* copy (an error shows up, with its policy, in the copy) */
    }
    return pnum;
}

static int stream_run(Job *job, VdError **errp)
{
    Stream *s = job_opaque(job);
    if (s->resumed) {
        job_pause_point(job); /* re-created PAUSED: nothing runs before job-resume */
    }
    job_progress_set_remaining(job, s->len);
    CopySweep sw = {.job = job, .engine = s->engine, .len = s->len, .unit = s->unit,
                    .align = s->gran, .on_error = s->on_error, .skip = stream_skip, .opaque = s};
    int r = copy_sweep_run(&sw);
    if (r == -ECANCELED) {
        return r;
    }
    int error = r < 0 ? r : sw.ignored;
    if (error) {
        /* Ignored errors too: the backing cannot be dropped with a hole in the copy. */
        vd_error_setg(errp, -error, "Stream failed: %s", strerror(-error));
    }
    return error;
}

static void stream_kick(Job *job)
{
    copy_engine_kick(((Stream *)job_opaque(job))->engine);
}

/*
 * Finalization: with the top's exports drained, record base and drop the intermediates.
 * Every copy is made durable BEFORE the drain (run has returned: the job writes nothing more), so
 * the flush under drain only syncs what guests wrote meanwhile (the tail): it keeps the old order
 * "everything in the top is durable, then the header names base" at the cost of a short sync.
 */
static int stream_prepare(Job *job, VdError **errp)
{
    Stream *s = job_opaque(job);
    int r = vd_flush(s->top);
    if (r < 0) {
        vd_error_setg(errp, -r, "Could not flush '%s': %s", s->top->filename, strerror(-r));
        return r;
    }
    uint64_t t0 = job_now_ns();
    VdDrainedUsers set;
    if (vd_node_users_drain(s->top, &set) < 0) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    uint64_t syncs0 = vd_flush_thread_syncs(); /* syncs this (QMP) thread makes while drained */
    block_tracker_wait_idle(s->tracker);
    /*
     * Only the header is written while guests wait. It relies on what the stream copied, durable
     * since the flush above; what guests wrote since is theirs (a cluster they allocated after
     * it reads from the new backing exactly as from the old one if the allocation is lost: the
     * stream had already put every cluster the dropped layers held into top). The header is
     * synced below, with guests running, before COMPLETED (after which the dropped layers may
     * be deleted); a crash before that leaves the old header, whose backing is still there.
     */
    r = vd_change_backing_file_flags(s->top, s->backing_name,
                                     s->backing_name ? s->backing_fmt : NULL, VD_BACKING_UNSYNCED,
                                     errp);
    if (r == 0) {
        vd_node_set_backing(s->top, s->base);
    }
    uint64_t syncs = vd_flush_thread_syncs() - syncs0;
    vd_node_users_resume(&set, NULL);
    uint64_t us = (job_now_ns() - t0) / 1000;
    if (r == 0) {
        r = vd_flush(s->top);
        if (r < 0) {
            vd_error_setg(errp, -r, "Could not flush '%s': %s", s->top->filename, strerror(-r));
        }
    }
    if (r == 0) {
        vd_log(VD_LOG_INFO, "stream '%s': '%s' now backed by %s; guest I/O paused %llu.%03llu ms "
               "(%llu syncs while paused)", job_id(job), s->top->node_name,
               s->base ? s->base->node_name : "nothing", (unsigned long long)(us / 1000),
               (unsigned long long)(us % 1000), (unsigned long long)syncs);
    }
    return r;
}

static void stream_clean(Job *job)
{
    Stream *s = job_opaque(job);
    if (s->claimed) {
        blockops_release(s->top);
        s->claimed = false;
    }
    if (!job_journal_keeping_all()) {
        job_journal_remove(s->journal); /* over (vdiskd's shutdown keeps it: resumed next time) */
    }
}

static void stream_query(Job *job, json_t *info)
{
    Stream *s = job_opaque(job);
    json_object_set_new(info, "vdisk-copied-bytes",
                        json_integer((json_int_t)__atomic_load_n(&s->copied, __ATOMIC_RELAXED)));
    if (s->resumed) {
        json_object_set_new(info, "vdisk-resumed", json_true());
    }
}

static void stream_free_state(Stream *s)
{
    if (!s) {
        return;
    }
    if (s->claimed) {
        blockops_release(s->top);
    }
    copy_engine_free(s->engine);
    if (s->tracker) {
        block_tracker_put(s->tracker);
    }
    vd_node_unref(s->top);
    vd_node_unref(s->base);
    job_journal_close(s->journal);
    free(s->backing_name);
    free(s->backing_fmt);
    free(s);
}

static void stream_free(Job *job)
{
    stream_free_state(job_opaque(job));
}

static const JobDriver stream_driver = {
    .type = "stream",
    .run = stream_run,
    .prepare = stream_prepare,
    .clean = stream_clean,
    .kick = stream_kick,
    .query = stream_query,
    .free = stream_free,
};

/*
 * The job's journal: the one it is resumed from if it still fits (the same top file and length:
 * the base is found again by its file), else a new one when vdiskd has a state directory.
 */
static int stream_journal_open(Stream *s, const StreamRequest *r, const char *job_id,
                               VdError **errp)
{
    if (r->resume) {
        const char *top = json_string_value(json_object_get(job_journal_desc(r->resume), "top"));
        if (!top || strcmp(top, s->top->filename) || job_journal_len(r->resume) != s->len) {
            vd_error_setg(errp, EINVAL, "Job journal of '%s' does not fit the images (top '%s', "
                          "%llu bytes; now '%s', %llu bytes)", job_id, top ? top : "?",
                          (unsigned long long)job_journal_len(r->resume), s->top->filename,
                          (unsigned long long)s->len);
            return -EINVAL;
        }
        s->journal = r->resume;
        s->resumed = true;
        return 0;
    }
    if (!job_journal_dir()) {
        return 0;
    }
    /* Names resolved: the base by its file (node names of a chain opened from headers vary). */
    json_t *desc = json_pack("{s:s, s:s, s:{s:s, s:s, s:s?, s:s?, s:I, s:i, s:b, s:b}}",
                             "type", "stream", "top", s->top->filename, "request",
                             "job-id", job_id, "device", r->device,
                             "base", s->base ? s->base->filename : NULL,
                             "backing-file", s->backing_name, "speed", (json_int_t)r->speed,
                             "on-error", r->on_error, "auto-finalize", r->auto_finalize,
                             "auto-dismiss", r->auto_dismiss);
    int ret = desc ? job_journal_create(NULL, job_id, desc, s->len,
                                        job_journal_segment_size(s->len, s->gran), &s->journal,
                                        errp)
                   : -ENOMEM;
    if (!desc) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
    }
    json_decref(desc);
    return ret;
}

int stream_request_start(const StreamRequest *r, VdError **errp)
{
    const char *device = r->device, *job_id = r->job_id, *base_name = r->base;
    const char *base_node = r->base_node, *bottom = r->bottom, *backing_file = r->backing_file;
    int64_t speed = r->speed;

    if (base_name && base_node) {
        vd_error_setg(errp, EINVAL, "'base' and 'base-node' cannot be specified at the same time");
        return -EINVAL;
    }
    if (base_name && bottom) {
        vd_error_setg(errp, EINVAL, "'base' and 'bottom' cannot be specified at the same time");
        return -EINVAL;
    }
    if (bottom && base_node) {
        vd_error_setg(errp, EINVAL, "'bottom' and 'base-node' cannot be specified at the same "
                      "time");
        return -EINVAL;
    }
    if (r->has_filter_node_name) {
        vd_error_setg(errp, ENOTSUP, "Parameter 'filter-node-name' is not supported");
        return -ENOTSUP;
    }
    BlockNode *top = graph_find_node(device);
    if (!top) {
        vd_error_setg(errp, EINVAL, "Cannot find device='%s' nor node-name='%s'", device, device);
        return -EINVAL;
    }
    if (!job_id) {
        job_id = device;
    }
    BlockNode *base = NULL;
    if (base_name) {
        base = vd_chain_find(top->backing, base_name);
        if (!base) {
            vd_error_setg(errp, EINVAL, "Can't find '%s' in the backing chain", base_name);
            return -EINVAL;
        }
    } else if (base_node) {
        BlockNode *b = graph_find_node(base_node);
        if (!b) {
            vd_error_setg(errp, EINVAL, "Cannot find device='%s' nor node-name='%s'", base_node,
                          base_node);
            return -EINVAL;
        }
        if (b == top || vd_chain_depth(top, b) < 0) {
            vd_error_setg(errp, EINVAL, "Node '%s' is not a backing image of '%s'", base_node,
                          device);
            return -EINVAL;
        }
        base = b;
    } else if (bottom) {
        BlockNode *b = graph_find_node(bottom);
        if (!b || b == top || vd_chain_depth(top, b) < 0) {
            vd_error_setg(errp, EINVAL, "Node '%s' is not a backing image of '%s'", bottom,
                          device);
            return -EINVAL;
        }
        base = b->backing;
    }
    if (!base && backing_file) {
        vd_error_setg(errp, EINVAL, "backing file specified, but streaming the entire chain");
        return -EINVAL;
    }
    if (top->read_only) {
        vd_error_setg(errp, EPERM, "Block node '%s' is read-only", device);
        return -EPERM;
    }
    if (speed < 0) {
        vd_error_setg(errp, EINVAL, "Invalid parameter 'speed'");
        return -EINVAL;
    }
    JobErrorAction on_err = (JobErrorAction)r->on_error;
    int64_t len = vd_getlength(top);
    if (len < 0) {
        vd_error_setg(errp, EIO, "Cannot get the length of '%s'", device);
        return -EIO;
    }

    Stream *s = calloc(1, sizeof(*s));
    if (!s) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    s->top = top;
    vd_node_ref(top);
    s->base = base;
    vd_node_ref(base);
    s->len = (uint64_t)len;
    s->on_error = on_err;
    if (base) {
        s->backing_name = backing_file ? strdup(backing_file) : vd_backing_name(top, base);
        s->backing_fmt = strdup(base->drv->name);
    }
    s->tracker = block_tracker_get(top);
    if (!s->tracker || (base && (!s->backing_name || !s->backing_fmt))) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        stream_free_state(s);
        return -ENOMEM;
    }
    s->gran = block_tracker_granularity(s->tracker);
    /* Whole tracker blocks (the top's clusters) per copy: copies in flight never share one. */
    uint64_t unit = copy_engine_default_unit();
    s->unit = unit < s->gran ? s->gran : unit / s->gran * s->gran;
    CopyEngineOptions eo = {.workers = copy_engine_default_workers(), .buf_size = s->unit,
                            .align = s->gran, .tracker = s->tracker, .kind = BT_EXCLUSIVE,
                            .fn = stream_copy_chunk, .opaque = s};
    /* The top's data reaches the disk while streaming: prepare's flush finds little left. */
    eo.writeback = copy_engine_writeback_node(top, &eo.writeback_every);
    s->engine = copy_engine_new(&eo);
    if (!s->engine) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        stream_free_state(s);
        return -ENOMEM;
    }
    int ret = blockops_claim(top, "stream", errp);
    if (ret < 0) {
        stream_free_state(s);
        return ret;
    }
    s->claimed = true;
    ret = stream_journal_open(s, r, job_id, errp);
    if (ret < 0) {
        stream_free_state(s);
        return ret;
    }
    JobOptions jo = {.id = job_id, .speed = speed, .auto_finalize = r->auto_finalize,
                     .auto_dismiss = r->auto_dismiss, .node = s->top->node_name};
    Job *job = job_create(&stream_driver, &jo, s, errp);
    if (!job) {
        if (s->resumed) {
            s->journal = NULL; /* the caller's again: kept for the next start */
        }
        job_journal_remove(s->journal);
        stream_free_state(s);
        return -EINVAL;
    }
    s->job = job;
    job_progress_set_remaining(job, s->len); /* query-block-jobs shows len from the start */
    if (s->resumed) {
        job_user_pause(job, NULL); /* offered back PAUSED: job-resume continues it */
    }
    ret = job_start(job, errp);
    if (ret == 0 && s->resumed) {
        job_wait_paused(job);
    }
    return ret;
}

int stream_resume_journal(JobJournal *j, VdError **errp)
{
    json_t *req = json_object_get(job_journal_desc(j), "request");
    StreamRequest r = {.resume = j};
    json_error_t je;
    json_int_t speed = 0;
    json_t *base = NULL, *bf = NULL;
    int fin = 0, dis = 0;
    if (json_unpack_ex(req, &je, 0, "{s:s, s:s, s:o, s:o, s:I, s:i, s:b, s:b}", "job-id",
                       &r.job_id, "device", &r.device, "base", &base, "backing-file",
                       &bf, "speed", &speed, "on-error", &r.on_error,
                       "auto-finalize", &fin, "auto-dismiss", &dis) < 0) {
        vd_error_setg(errp, EINVAL, "Job journal: %s", je.text);
        return -EINVAL;
    }
    r.base = json_string_value(base); /* null: stream the whole chain */
    r.backing_file = json_string_value(bf);
    r.speed = speed;
    r.auto_finalize = fin;
    r.auto_dismiss = dis;
    return stream_request_start(&r, errp);
}
