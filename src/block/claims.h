/*
 * claims.h - the one registry of nodes block jobs hold ("busy"): a job claims its nodes before it
 * starts (mirror: source, target and its filter; stream/commit: the device) and releases them when
 * it ends, so two jobs never work on one node. Its own mutex: callable from any thread.
 */
#ifndef VDISK_BLOCK_CLAIMS_H
#define VDISK_BLOCK_CLAIMS_H

#include <stddef.h>

#include "block/block.h"

/*
 * Claim nodes[0..n) (NULL entries skipped) for owner, a job of type job_type ("mirror", "stream",
 * "commit"; a static string). All or none: -EBUSY with QEMU's "Node '%s' is busy: block device is
 * in use by block job: %s" (the first node already claimed, by whom) and nothing claimed.
 */
int vd_claim_nodes(const void *owner, const char *job_type, BlockNode *const *nodes, size_t n,
                   VdError **errp);
/* Release every node owner claimed (none: no-op). */
void vd_release_claims(const void *owner);
/* The type of the job holding node, or NULL. */
const char *vd_claimed_by(const BlockNode *node);

#endif
