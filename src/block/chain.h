/*
 * chain.h - helpers for jobs that reshape a chain (stream, commit, snapshots, mirror): the backing
 * name to record (vd_set_backing_strings, block.h, sets it in memory), reopening an image read-write or read-only.
 */
#ifndef VDISK_BLOCK_CHAIN_H
#define VDISK_BLOCK_CHAIN_H

#include <stdbool.h>

#include "block/block.h"

/*
 * The backing name to record in overlay's header for base: absolute when overlay's header names
 * its backing by an absolute name now, else relative to overlay's directory (a new image, with no
 * backing name yet, gets a relative one). Names stay as the user wrote them (QEMU writes
 * base->filename, absolute when the images were opened by absolute paths). URIs and other names
 * that are not host paths (rbd:...) are unchanged. malloc'ed; NULL on ENOMEM.
 */
char *vd_backing_name(BlockNode *overlay, BlockNode *base);
/* base's canonical absolute name (mode=absolute-paths); malloc'ed, NULL on ENOMEM. */
char *vd_backing_name_absolute(BlockNode *base);
/*
 * A second node of bs's image, read-write or read-only (fresh metadata after a writer changed the
 * image), with the same node name, direct flag and bs's backing child.
 */
BlockNode *vd_reopen(BlockNode *bs, bool rw, VdError **errp);

#endif
