/*
 * blockops.h - live chain reshaping in vdiskd: external snapshots (blockdev-snapshot-sync,
 * blockdev-snapshot), block-stream and block-commit (non-active and active), and the helpers they
 * share (switching NBD exports under drain, the backing name to record, per-node job claims).
 * Everything here that reshapes a chain does it with every export of the affected chain drained,
 * so a guest request sees either the old chain or the new one, never half of a change.
 */
#ifndef VDISK_JOBS_BLOCKOPS_H
#define VDISK_JOBS_BLOCKOPS_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "block/block.h"
#include "nbd/nbd-server.h"
#include "util/error.h"

/* The exports that served one node, drained (new requests wait, in-flight ones finished). */
typedef struct BlockopsExports {
    NbdExport **exps;
    size_t n;
} BlockopsExports;

/* Drain every export serving node (none when no NBD server runs). -ENOMEM on failure. */
int blockops_exports_drain(BlockNode *node, BlockopsExports *set);
/* Point the drained exports at new_node (NULL = keep their node), resume them, free the set. */
void blockops_exports_resume(BlockopsExports *set, BlockNode *new_node);

/*
 * The backing name to record in overlay's header for base: base's name relative to overlay's
 * directory when base was named relatively, else its absolute name (QEMU records base->filename,
 * which is the same in the usual case of one directory). malloc'ed; NULL on ENOMEM.
 */
char *blockops_backing_name(BlockNode *overlay, BlockNode *base);
/* Set bs's in-memory backing_file/backing_format/full_backing_filename (no header write). */
int blockops_set_backing_strings(BlockNode *bs, const char *name, const char *fmt);
/* A second, read-write node of bs's image with the same node name and bs's backing child. */
BlockNode *blockops_open_rw(BlockNode *bs, VdError **errp);
/* Same, read-only (fresh metadata after a writer changed the image). */
BlockNode *blockops_open_ro(BlockNode *bs, VdError **errp);

/*
 * One stream/commit job per chain at a time: claim the device (the node guests use) for a job.
 * -EBUSY with QEMU's "Node '%s' is busy: block device is in use by block job: %s" otherwise.
 */
int blockops_claim(BlockNode *dev, const char *job_type, VdError **errp);
void blockops_release(BlockNode *dev);
/* The type of the job that claimed dev ("stream", "commit"), or NULL. */
const char *blockops_busy(BlockNode *dev);

/* QMP handlers (QMP thread). Return {} or NULL with *errp set. */
json_t *snapshot_qmp_sync(json_t *args, VdError **errp);
json_t *snapshot_qmp_blockdev(json_t *args, VdError **errp);
json_t *stream_qmp_start(json_t *args, VdError **errp);
json_t *commit_qmp_start(json_t *args, VdError **errp);

/*
 * Register block-stream, block-commit, blockdev-snapshot-sync and blockdev-snapshot with
 * qmp_register_command. vdiskd's main calls it once before qmp_server_start (next to
 * jobs_qmp_register). Defined in src/qmp/qmp-commands-blockjobs2.c.
 */
void blockops_qmp_register(void);

#endif
