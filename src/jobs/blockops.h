/*
 * blockops.h - live chain reshaping in vdiskd: external snapshots (blockdev-snapshot-sync,
 * blockdev-snapshot), block-stream and block-commit (non-active and active), and the helpers they
 * share (per-node job claims; block/ has the rest: chain.h, claims.h, users.h).
 * Everything here that reshapes a chain does it with every export of the affected chain drained,
 * so a guest request sees either the old chain or the new one, never half of a change.
 */
#ifndef VDISK_JOBS_BLOCKOPS_H
#define VDISK_JOBS_BLOCKOPS_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "block/block.h"
#include "block/chain.h"
#include "jobs/journal.h"
#include "util/error.h"

/*
 * One job per chain at a time: claim the device (the node guests use) for a stream/commit job in
 * the claims registry (block/claims.h), also refused while an export serves a mirror's filter over
 * it. -EBUSY with QEMU's "Node '%s' is busy: block device is in use by block job: %s" otherwise.
 */
int blockops_claim(BlockNode *dev, const char *job_type, VdError **errp);
void blockops_release(BlockNode *dev);
/* The same for several nodes held by owner (backup: target, source), all or none, the first busy
 * node named; vd_release_claims(owner) releases them. */
int blockops_claim_nodes(const void *owner, const char *job_type, BlockNode *const *nodes,
                         size_t n, VdError **errp);
/* The type of the job that claimed dev ("stream", "commit"), or NULL. */
const char *blockops_busy(BlockNode *dev);

/*
 * The requests below are the commands' arguments, typed: src/qmp/ checks the JSON and fills them
 * (absent strings NULL, defaults as noted). Strings are borrowed. Each *_start / snapshot_* runs
 * on the QMP thread and returns 0, or -errno with *errp set and nothing changed.
 */
typedef struct StreamRequest { /* block-stream */
    const char *job_id;                 /* NULL = device */
    const char *device;                 /* required */
    const char *base, *base_node, *bottom, *backing_file;
    int64_t speed;
    int on_error;                       /* JobErrorAction, default JOB_ERR_REPORT */
    bool has_filter_node_name;          /* refused */
    bool auto_finalize, auto_dismiss;   /* default true */
    JobJournal *resume;                 /* stream_resume_journal: re-create the job, PAUSED */
} StreamRequest;
int stream_request_start(const StreamRequest *r, VdError **errp);

typedef struct CommitRequest { /* block-commit */
    const char *job_id;                 /* NULL = device */
    const char *device;                 /* required */
    const char *base_node, *base, *top_node, *top, *backing_file;
    int64_t speed;
    int on_error;                       /* JobErrorAction, default JOB_ERR_REPORT */
    bool has_filter_node_name;          /* refused */
    bool auto_finalize, auto_dismiss;   /* default true */
    JobJournal *resume;                 /* commit_resume_journal: re-create the job, PAUSED */
} CommitRequest;
int commit_request_start(const CommitRequest *r, VdError **errp);

/*
 * vdiskd --state-dir (docs/resumable.md): a stream or commit started with a state directory keeps
 * a journal there (the request with its names resolved to files, and for commit a segment map);
 * after a restart these re-create the job from it, PAUSED. 0: the job owns j; else j is the
 * caller's (kept on disk) and *errp says why it does not resume.
 */
int stream_resume_journal(JobJournal *j, VdError **errp);
int commit_resume_journal(JobJournal *j, VdError **errp);

typedef struct SnapshotSyncRequest { /* blockdev-snapshot-sync */
    const char *device, *node_name;     /* one of them names the node to snapshot */
    const char *snapshot_file;          /* required */
    const char *snapshot_node_name;
    const char *format;                 /* NULL = qcow2 */
    bool mode_existing;                 /* mode=existing (else absolute-paths: create it) */
    bool mode_absolute;                 /* mode=absolute-paths given: record the old top by an
                                         * absolute name (omitted: relative, vdisk's default) */
} SnapshotSyncRequest;
int snapshot_sync(const SnapshotSyncRequest *r, VdError **errp);
/* blockdev-snapshot: put the named overlay node on top of node. */
int snapshot_blockdev(const char *node, const char *overlay, VdError **errp);

/*
 * The same in two steps, for QMP transaction's all-or-nothing: *_prepare checks everything and
 * (blockdev-snapshot-sync) creates, opens and registers the overlay, switching nothing;
 * snapshot_commit then switches the guest onto it, or snapshot_abort undoes the prepare (the
 * overlay closed and out of the graph; an image file it created stays, as QEMU's). Until then
 * the old node counts as the overlay's backing (a second snapshot of it is refused as busy).
 * *p must stay where it is between prepare and commit / abort.
 */
typedef struct SnapshotPrepared {
    BlockNode *old, *overlay; /* overlay: a reference held (sync) or the graph's (blockdev) */
    bool set_backing;         /* blockdev-snapshot: link overlay -> old at the switch */
    struct SnapshotPrepared *next; /* the prepared, not yet committed ones (QMP thread) */
} SnapshotPrepared;
int snapshot_sync_prepare(const SnapshotSyncRequest *r, SnapshotPrepared *p, VdError **errp);
int snapshot_blockdev_prepare(const char *node, const char *overlay, SnapshotPrepared *p,
                              VdError **errp);
int snapshot_commit(SnapshotPrepared *p, VdError **errp);
void snapshot_abort(SnapshotPrepared *p);

#endif
