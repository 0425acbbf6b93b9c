/*
 * mirror-request.c - drive-mirror / blockdev-mirror: resolve a typed MirrorRequest against the
 * graph (source, base, existing or new target and its backing), create/open the target, and start
 * the job (mirror.c). On error nothing is left behind: a target it created is unregistered.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "block/chain.h"
#include "block/claims.h"
#include "block/graph.h"
#include "block/users.h"
#include "jobs/mirror.h"
#include "util/log.h"

/*
 * A layer under another node that no export serves could only pivot by rewriting that node's
 * backing, which the mirror does not do: refuse it rather than "complete" without any effect.
 */
static int check_not_middle_layer(BlockNode *source, VdError **errp)
{
    BlockNode *parent = vd_node_user_count(source) == 0 ? graph_backing_parent(source) : NULL;
    if (parent) {
        vd_error_setg(errp, EINVAL, "Node '%s' is a backing layer of '%s' and no export serves "
                      "it: its copy could not pivot (copy the disk's top image instead)",
                      source->node_name, parent->node_name ? parent->node_name : "");
        return -EINVAL;
    }
    return 0;
}

/* Is `path` (a resolved backing name) the file of node n? */
static bool node_is_file(BlockNode *n, const char *path)
{
    char *a = realpath(n->filename, NULL), *b = realpath(path, NULL);
    bool same = a && b && !strcmp(a, b);
    free(a);
    free(b);
    return same;
}

/*
 * drive-mirror onto an existing target (mode=existing, no base-node). Its header's backing chain is
 * what the file reads once the job is over, so the copy must fill in everything the guest reads
 * and that chain does not hold:
 *  - backing = an image of the source's chain: copy everything above that image (as base-node
 *    does; also for sync=top when it lies deeper than the source's backing), header untouched;
 *  - sync=full, backing elsewhere: open it as the target's backing and copy every byte;
 *  - sync=top, backing elsewhere or none: refused, unless the caller vouches that it reads like
 *    the source's backing (x-backing-matches): then it stays the target's backing, not copied.
 * Sets o->base / o->keep_target_backing / o->backing_matches and target's in-memory backing.
 */
static int existing_target_backing(MirrorOptions *o, BlockNode *target, bool matches,
                                   VdError **errp)
{
    if (o->base_is_source) {
        return 0; /* sync=none: only new writes are copied; the target is the caller's business */
    }
    const char *tb = target->backing_file && target->backing_file[0] &&
                     target->drv->supports_backing ? target->full_backing_filename : NULL;
    bool shallow = o->base != NULL;
    if (!tb) {
        if (shallow && !matches) {
            vd_error_setg(errp, EINVAL, "Target '%s' has no backing file: a shallow copy would "
                          "leave out what '%s' and its backing hold (copy everything, or pass "
                          "x-backing-matches if the target holds that data already)",
                          target->filename, o->base->filename);
            return -EINVAL;
        }
        o->keep_target_backing = true; /* none, as its header says */
        o->backing_matches = matches;
        return 0;
    }
    for (BlockNode *n = o->source->backing; n; n = n->backing) {
        if (node_is_file(n, tb)) {
            o->base = n;
            return 0;
        }
    }
    if (node_is_file(o->source, tb)) {
        vd_error_setg(errp, EINVAL, "Target '%s' is backed by the source '%s' itself",
                      target->filename, o->source->filename);
        return -EINVAL;
    }
    if (shallow && !matches) {
        vd_error_setg(errp, EINVAL, "Target '%s' has backing file '%s', which is not part of the "
                      "source's backing chain: its content cannot be assumed to match '%s' (pass "
                      "x-backing-matches, or vdisk blockcopy --backing-matches, if it does)",
                      target->filename, target->backing_file, o->base->filename);
        return -EINVAL;
    }
    BlockNode *chain = vd_open_image(tb, target->backing_format, 0, errp);
    if (!chain) {
        vd_error_prepend(errp, "Could not open the target's backing file: ");
        return -EIO;
    }
    vd_node_set_backing(target, chain);
    vd_node_unref(chain);
    o->keep_target_backing = true;
    o->backing_matches = shallow; /* full: nothing shared, every byte copied */
    return 0;
}

int mirror_request_start(const MirrorRequest *r, VdError **errp)
{
    const char *device = r->device, *target_name = r->target;
    if (r->has_replaces) {
        vd_error_setg(errp, ENOTSUP, "Parameter 'replaces' is not supported");
        return -ENOTSUP;
    }
    BlockNode *source = graph_find_node(device);
    if (!source) {
        vd_error_setg(errp, EINVAL, "Cannot find device='%s' nor node-name='%s'", device, device);
        return -EINVAL;
    }
    /* A job on this chain (block/claims.h) excludes a mirror of it. */
    const char *other = vd_claimed_by(source);
    if (other) {
        vd_error_setg(errp, EBUSY, "Node '%s' is busy: block device is in use by block job: %s",
                      source->node_name, other);
        return -EBUSY;
    }
    if (check_not_middle_layer(source, errp) < 0) {
        return -EINVAL;
    }
    const char *job_id = r->job_id;
    if (!job_id) {
        job_id = device;
    }
    /* Refuse a bad or taken job id before any image is created. */
    Job *existing_job = job_find(job_id);
    if (existing_job || !job_id_wellformed(job_id)) {
        job_unref(existing_job);
        vd_error_setg(errp, EINVAL, existing_job ? "Job ID '%s' already in use"
                                                 : "Invalid job ID '%s'", job_id);
        return -EINVAL;
    }
    MirrorOptions o = {.job_id = job_id, .source = source, .auto_finalize = r->auto_finalize,
                       .auto_dismiss = r->auto_dismiss, .filter_node_name = r->filter_node_name,
                       .speed = r->speed, .granularity = r->granularity,
                       .on_source_error = (JobErrorAction)r->on_source_error,
                       .on_target_error = (JobErrorAction)r->on_target_error,
                       .write_blocking = r->write_blocking, .verify = r->verify};
    if (o.speed < 0) {
        vd_error_setg(errp, EINVAL, "Invalid parameter 'speed'");
        return -EINVAL;
    }
    if (r->buf_size < 0) {
        vd_error_setg(errp, EINVAL, "Invalid parameter 'buf-size'");
        return -EINVAL;
    }
    o.buf_size = (uint64_t)r->buf_size;

    /* What the target shares: sync picks it, base-node (vdisk) overrides. */
    const char *base_node = r->base_node;
    if (r->sync == MIRROR_SYNC_FULL) {
        o.base = NULL;
    } else if (r->sync == MIRROR_SYNC_TOP) {
        o.base = source->backing;
    } else if (r->sync == MIRROR_SYNC_NONE) {
        o.base_is_source = true;
    } else {
        vd_error_setg(errp, ENOTSUP, "Sync mode '%s' not supported",
                      r->sync == MIRROR_SYNC_BITMAP ? "bitmap" : "incremental");
        return -ENOTSUP;
    }
    if (base_node) {
        BlockNode *b = vd_chain_find(source, base_node);
        if (!b || b == source) {
            vd_error_setg(errp, EINVAL, "Node '%s' is not a backing node of '%s'", base_node,
                          device);
            return -EINVAL;
        }
        o.base = b;
        o.base_is_source = false;
        o.skip_target_allocated = true;
    }
    BlockNode *share = o.base_is_source ? source : o.base;
    /* The name a target records for share: as the user writes names (vd_backing_name). */
    char *share_name = NULL;

    BlockNode *target = NULL;
    Job *job = NULL;
    bool created = false;
    if (r->blockdev) {
        target = graph_find_node(target_name);
        if (!target) {
            vd_error_setg(errp, EINVAL, "Cannot find device='%s' nor node-name='%s'",
                          target_name, target_name);
            goto out;
        }
        vd_node_ref(target);
        /* A node a stream/commit works on cannot be written by a mirror either. */
        const char *busy = vd_claimed_by(target);
        if (busy) {
            vd_error_setg(errp, EBUSY, "Node '%s' is busy: block device is in use by block job: "
                          "%s", target->node_name, busy);
            goto out;
        }
        /* blockdev-mirror leaves the target's backing chain as the user built it... */
        o.rewrite_backing = false;
        o.keep_target_backing = !base_node;
        /* x-backing-matches: that chain reads like base, which is then not copied (shallow) */
        o.backing_matches = r->backing_matches && o.base;
        if (base_node) {
            /* ...except with base-node, whose promise is "the target's backing is base". */
            o.rewrite_backing = true;
            share_name = vd_backing_name(target, share);
            if (!share_name) {
                vd_error_setg(errp, ENOMEM, "Out of memory");
                goto out;
            }
            o.backing_name = share_name;
            o.backing_fmt = share->drv->name;
        }
    } else {
        const char *format = r->format;
        bool existing = r->mode_existing;
        const char *nn = r->node_name;
        if (nn && graph_find_node(nn)) {
            vd_error_setg(errp, EEXIST, "Duplicate nodes with node-name='%s'", nn);
            goto out;
        }
        if (!format) {
            format = existing ? NULL : source->drv->name;
        }
        if (format && strcmp(format, "qcow2") && strcmp(format, "raw")) {
            vd_error_setg(errp, EINVAL, "Unsupported target format '%s'", format);
            goto out;
        }
        char *tpath = realpath(target_name, NULL);
        bool in_chain = false;
        for (BlockNode *b = source; tpath && b; b = b->backing) {
            char *bp = realpath(b->filename, NULL);
            in_chain |= bp && !strcmp(bp, tpath);
            free(bp);
        }
        free(tpath);
        if (in_chain) {
            vd_error_setg(errp, EINVAL, "Target '%s' is an image of the source's chain", target_name);
            goto out;
        }
        if (!existing) {
            if (share && format && !strcmp(format, "raw")) {
                vd_error_setg(errp, EINVAL, "A raw target cannot have a backing file: use "
                              "sync=full or format=qcow2");
                goto out;
            }
            /* Relative to the target, unless the caller asked for absolute-paths explicitly. */
            share_name = !share ? NULL : r->mode_absolute ? vd_backing_name_absolute(share)
                       : vd_backing_name(&(BlockNode){.filename = (char *)target_name},
                                               share);
            if (share && !share_name) {
                vd_error_setg(errp, ENOMEM, "Out of memory");
                goto out;
            }
            VdCreateOptions co = {.format = format, .size = (uint64_t)vd_getlength(source),
                                  .size_given = true, .unsafe = true,
                                  .backing_file = share_name,
                                  .backing_fmt = share ? share->drv->name : NULL};
            if (vd_create(&co, target_name, errp) < 0) {
                goto out;
            }
            created = true;
        }
        VdOpenOptions oo = {.filename = target_name, .format = format,
                            .node_name = nn,
                            .flags = VD_OPEN_RDWR | VD_OPEN_NO_BACKING};
        target = vd_open(&oo, errp);
        if (!target) {
            goto out;
        }
        if (existing && !base_node &&
            existing_target_backing(&o, target, r->backing_matches, errp) < 0) {
            goto out;
        }
        /*
         * A fresh target already names its backing. An existing one keeps what the user recorded
         * (existing_target_backing), except that base-node promises "backing = base".
         */
        o.rewrite_backing = base_node != NULL;
        if (o.rewrite_backing && share && !share_name) {
            share_name = vd_backing_name(target, share);
            if (!share_name) {
                vd_error_setg(errp, ENOMEM, "Out of memory");
                goto out;
            }
        }
        o.backing_name = share_name;
        o.backing_fmt = share ? share->drv->name : NULL;
        if (o.rewrite_backing && target->full_backing_filename && share &&
            node_is_file(share, target->full_backing_filename)) {
            o.rewrite_backing = false; /* already right */
        }
        if (o.rewrite_backing && !share && !target->backing_file) {
            o.rewrite_backing = false;
        }
        if (!strcmp(target->drv->name, "raw")) {
            o.rewrite_backing = false;
        }
    }
    o.target = target;
    o.target_new = created;
    o.resume = r->resume;
    o.journal_desc = !r->resume && job_journal_dir() ? mirror_request_to_json(r) : NULL;
    if (!r->resume && job_journal_dir() && !o.journal_desc) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        goto out;
    }
    /*
     * unmap (drive-mirror only, as in QEMU; default true): where the source reads zeroes, the
     * target's clusters may be unmapped; false writes zeroes and keeps its allocation.
     */
    job = mirror_start_ex(&o, r->unmap, errp);
    /*
     * As in QEMU, the new target is a named node of the graph while the job runs and after a pivot
     * (query-named-block-nodes shows what exports serve). Without a pivot mirror_clean drops it
     * again; that runs on this (QMP) thread after this handler returned, so it sees drop_target.
     */
    if (job && !r->blockdev) {
        VdError *e = NULL;
        if (graph_register(target, &e) < 0) {
            vd_log(VD_LOG_WARN, "mirror '%s': cannot register node '%s': %s", job_id,
                   target->node_name, vd_error_msg(e));
            vd_error_free(e);
        } else {
            mirror_drop_target_at_end(job);
        }
    }
out:
    json_decref(o.journal_desc);
    vd_node_unref(target);
    free(share_name);
    if (job) {
        return 0;
    }
    return errp && *errp && vd_error_code(*errp) > 0 ? -vd_error_code(*errp) : -EINVAL;
}
