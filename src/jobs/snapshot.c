/*
 * snapshot.c - external snapshots of a running guest (blockdev-snapshot-sync, blockdev-snapshot)
 * and the stream/commit claims (blockops.h). The switch to the overlay happens with every user of
 * the old top (NBD exports, block/users.h) drained:
 * requests admitted before it finished on the old top, requests after it go to the overlay, so no
 * guest write is lost or reordered across the switch. Runs on the QMP thread; the claims registry
 * (block/claims.c) has its own mutex.
 */
#include "jobs/blockops.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "block/claims.h"
#include "block/graph.h"
#include "block/users.h"
#include "util/log.h"

/* ---- claims (block/claims.h), and served mirror filters ---- */

/* Is dev behind a mirror filter some user serves (a mirror that has released its claims)? */
static bool mirror_filter_over(BlockNode *n, void *dev)
{
    return n && n->drv && !strcmp(n->drv->name, "mirror-top") && n->backing == dev;
}

static bool mirror_exported_over(BlockNode *dev)
{
    return vd_node_users_any(mirror_filter_over, dev);
}

int blockops_claim_nodes(const void *owner, const char *job_type, BlockNode *const *nodes,
                         size_t n, VdError **errp)
{
    for (size_t i = 0; i < n; i++) {
        /* The registry first: a mirror's claims hold whether or not an export serves the node. */
        const char *holder = vd_claimed_by(nodes[i]);
        if (holder || mirror_exported_over(nodes[i])) {
            vd_error_setg(errp, EBUSY, "Node '%s' is busy: block device is in use by block job: "
                          "%s", nodes[i]->node_name, holder ? holder : "mirror");
            return -EBUSY;
        }
    }
    return vd_claim_nodes(owner, job_type, nodes, n, errp);
}

int blockops_claim(BlockNode *dev, const char *job_type, VdError **errp)
{
    return blockops_claim_nodes(dev, job_type, &dev, 1, errp);
}

void blockops_release(BlockNode *dev)
{
    vd_release_claims(dev);
}

const char *blockops_busy(BlockNode *dev)
{
    const char *holder = vd_claimed_by(dev);
    return holder ? holder : mirror_exported_over(dev) ? "mirror" : NULL;
}

/* ---- the switch ---- */

/* Is bs some graph node's backing (or file) child? */
typedef struct ParentScan {
    BlockNode *bs;
    BlockNode *parent;
} ParentScan;

static void parent_cb(BlockNode *root, void *opaque)
{
    ParentScan *p = opaque;
    for (BlockNode *n = root; n && !p->parent; n = n->backing) {
        if (n->backing == p->bs || n->file == p->bs) {
            p->parent = n;
        }
    }
}

/*
 * Snapshots prepared in a QMP transaction and not yet committed or aborted (QMP thread only):
 * their old node counts as the overlay's backing already, as QEMU switches in its prepare step,
 * so a later action on the same node gets QEMU's "busy" refusal.
 */
static SnapshotPrepared *pending;

static BlockNode *find_parent(BlockNode *bs)
{
    for (SnapshotPrepared *p = pending; p; p = p->next) {
        if (p->old == bs) {
            return p->overlay;
        }
    }
    ParentScan p = {.bs = bs};
    graph_foreach(parent_cb, &p);
    return p.parent;
}

/*
 * May an overlay go on old? Not while a job holds it, nor while it is another node's backing.
 * The job's claim first (as QEMU's op blockers): a drive-mirror target has the source as its
 * backing while the copy runs, which would otherwise be reported instead.
 */
static int check_not_busy(BlockNode *old, VdError **errp)
{
    const char *job_type = blockops_busy(old);
    if (job_type) {
        vd_error_setg(errp, EBUSY, "Node '%s' is busy: block device is in use by block job: %s",
                      old->node_name, job_type);
        return -EBUSY;
    }
    BlockNode *parent = find_parent(old);
    if (parent) {
        vd_error_setg(errp, EBUSY, "Node '%s' is busy: node is used as backing hd of '%s'",
                      old->node_name, parent->node_name);
        return -EBUSY;
    }
    return 0;
}

static void pending_add(SnapshotPrepared *prep)
{
    prep->next = pending;
    pending = prep;
}

static void pending_remove(SnapshotPrepared *prep)
{
    for (SnapshotPrepared **pp = &pending; *pp; pp = &(*pp)->next) {
        if (*pp == prep) {
            *pp = prep->next;
            return;
        }
    }
}

/*
 * Put overlay (backing = old, already set up by the caller on its own or via vd_open) in front of
 * old for every export: drain, swap, resume. The overlay is registered in the graph first so that
 * a failure leaves nothing switched.
 */
static int switch_to_overlay(BlockNode *old, BlockNode *overlay, bool set_backing, VdError **errp)
{
    /*
     * Sync what the guest wrote so far while it still runs: the flush under drain below then only
     * has the writes of the last moment to sync, and the guest waits for that much alone.
     */
    int r = vd_flush(old);
    if (r < 0) {
        vd_log(VD_LOG_WARN, "snapshot: flushing '%s' failed: %s", old->filename, strerror(-r));
    }
    VdDrainedUsers set;
    if (vd_node_users_drain(old, &set) < 0) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    if (set_backing) {
        /* Drained: no request of these exports reads through overlay yet. */
        vd_node_set_backing(overlay, old);
    }
    /* Data the guest wrote before the switch must be durable below anything the overlay adds. */
    r = vd_flush(old);
    if (r < 0) {
        vd_log(VD_LOG_WARN, "snapshot: flushing '%s' failed: %s", old->filename, strerror(-r));
    }
    vd_node_users_resume(&set, overlay);
    vd_log(VD_LOG_INFO, "snapshot: '%s' now on overlay '%s' (%s)", old->node_name,
           overlay->node_name, overlay->filename);
    return 0;
}

static BlockNode *find_dev(const char *device, const char *node_name, VdError **errp)
{
    BlockNode *bs = NULL;
    if (device) {
        bs = graph_find_node(device);
    } else if (node_name) {
        bs = graph_find_node(node_name);
    }
    if (!bs) {
        vd_error_setg(errp, EINVAL, "Cannot find device='%s' nor node-name='%s'",
                      device ? device : "", device ? "" : node_name ? node_name : "");
    }
    return bs;
}

int snapshot_sync_prepare(const SnapshotSyncRequest *req, SnapshotPrepared *prep, VdError **errp)
{
    *prep = (SnapshotPrepared){0};
    const char *device = req->device, *node_name = req->node_name;
    const char *file = req->snapshot_file, *snap_name = req->snapshot_node_name;
    const char *format = req->format;
    bool existing = req->mode_existing;
    if (!format) {
        format = "qcow2";
    }

    BlockNode *old = find_dev(device, node_name, errp);
    if (!old) {
        return -EINVAL;
    }
    if (node_name && !snap_name) {
        vd_error_setg(errp, EINVAL, "New overlay node-name missing");
        return -EINVAL;
    }
    if (snap_name && graph_find_node(snap_name)) {
        vd_error_setg(errp, EEXIST, "New overlay node-name already in use");
        return -EEXIST;
    }
    if (!vd_find_driver(format) || vd_find_driver(format)->is_protocol) {
        vd_error_setg(errp, EINVAL, "Unknown driver '%s'", format);
        return -EINVAL;
    }
    if (check_not_busy(old, errp) < 0) {
        return -EBUSY;
    }
    if (!existing) {
        if (!vd_find_driver(format)->supports_backing) {
            vd_error_setg(errp, ENOTSUP, "Backing file not supported for file format '%s'",
                          format);
            return -ENOTSUP;
        }
        /* Relative to the overlay unless the caller asked for absolute-paths explicitly. */
        char *bname = req->mode_absolute ? vd_backing_name_absolute(old)
                           : vd_backing_name(&(BlockNode){.filename = (char *)file}, old);
        int64_t len = vd_getlength(old);
        if (!bname || len < 0) {
            free(bname);
            vd_error_setg(errp, bname ? EIO : ENOMEM, "Cannot read the size of '%s'",
                          old->filename);
            return bname ? -EIO : -ENOMEM;
        }
        VdCreateOptions co = {.format = format, .size = (uint64_t)len, .size_given = true,
                              .backing_file = bname, .backing_fmt = old->drv->name,
                              .unsafe = true};
        int r = vd_create(&co, file, errp);
        free(bname);
        if (r < 0) {
            return r;
        }
    }
    VdOpenOptions oo = {.filename = file, .format = format, .node_name = snap_name,
                        .flags = VD_OPEN_RDWR | (old->open_flags & VD_OPEN_DIRECT),
                        .backing = old};
    BlockNode *overlay = vd_open(&oo, errp);
    if (overlay && !overlay->drv->supports_backing) {
        vd_error_setg(errp, ENOTSUP, "The overlay does not support backing images");
        vd_node_unref(overlay);
        overlay = NULL;
    }
    /* vd_open already linked overlay -> old (a reference of its own). */
    if (overlay && graph_register(overlay, errp) < 0) {
        vd_node_unref(overlay);
        overlay = NULL;
    }
    if (!overlay) {
        if (!existing) {
            unlink(file); /* we created it: a failed snapshot leaves nothing behind */
        }
        return -EIO;
    }
    *prep = (SnapshotPrepared){.old = old, .overlay = overlay};
    pending_add(prep);
    return 0;
}

int snapshot_commit(SnapshotPrepared *prep, VdError **errp)
{
    pending_remove(prep);
    int r = switch_to_overlay(prep->old, prep->overlay, prep->set_backing, errp);
    if (r < 0) {
        snapshot_abort(prep);
        return r;
    }
    if (!prep->set_backing) {
        vd_node_unref(prep->overlay); /* the graph and the exports hold theirs */
    }
    *prep = (SnapshotPrepared){0};
    return 0;
}

void snapshot_abort(SnapshotPrepared *prep)
{
    pending_remove(prep);
    if (prep->overlay && !prep->set_backing) {
        /* blockdev-snapshot-sync's own overlay: out of the graph and closed; the image file it
         * created stays, as QEMU leaves it */
        graph_unregister(prep->overlay);
        vd_node_unref(prep->overlay);
    }
    *prep = (SnapshotPrepared){0};
}

int snapshot_sync(const SnapshotSyncRequest *req, VdError **errp)
{
    SnapshotPrepared prep;
    int r = snapshot_sync_prepare(req, &prep, errp);
    return r < 0 ? r : snapshot_commit(&prep, errp);
}

int snapshot_blockdev_prepare(const char *node, const char *ov, SnapshotPrepared *prep,
                              VdError **errp)
{
    *prep = (SnapshotPrepared){0};
    BlockNode *old = graph_find_node(node);
    if (!old) {
        vd_error_setg(errp, EINVAL, "Cannot find device='%s' nor node-name='%s'", node, node);
        return -EINVAL;
    }
    if (check_not_busy(old, errp) < 0) {
        return -EBUSY;
    }
    /* the overlay is looked up after the node's blockers, as QEMU's */
    BlockNode *overlay = graph_find_node(ov);
    if (!overlay) {
        vd_error_setg(errp, EINVAL, "Cannot find device='%s' nor node-name='%s'", ov, ov);
        return -EINVAL;
    }
    if (!overlay->drv->supports_backing || overlay->drv->is_protocol) {
        vd_error_setg(errp, ENOTSUP, "The overlay does not support backing images");
        return -ENOTSUP;
    }
    if (overlay->backing) {
        vd_error_setg(errp, EINVAL, "The overlay already has a backing image");
        return -EINVAL;
    }
    if (find_parent(overlay) || vd_node_user_count(overlay) > 0) {
        vd_error_setg(errp, EBUSY, "The overlay is already in use");
        return -EBUSY;
    }
    if (overlay->read_only) {
        vd_error_setg(errp, EPERM, "The overlay '%s' is read-only", ov);
        return -EPERM;
    }
    int64_t olen = vd_getlength(overlay), len = vd_getlength(old);
    if (olen < 0 || len < 0 || olen < len) {
        vd_error_setg(errp, EINVAL, "The overlay is smaller than '%s'", node);
        return -EINVAL;
    }
    /* QEMU leaves the overlay's header as the user created it: only the graph changes. */
    *prep = (SnapshotPrepared){.old = old, .overlay = overlay, .set_backing = true};
    pending_add(prep);
    return 0;
}

int snapshot_blockdev(const char *node, const char *ov, VdError **errp)
{
    SnapshotPrepared prep;
    int r = snapshot_blockdev_prepare(node, ov, &prep, errp);
    return r < 0 ? r : snapshot_commit(&prep, errp);
}
