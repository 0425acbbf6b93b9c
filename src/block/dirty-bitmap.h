/*
 * dirty-bitmap.h - named dirty bitmaps of a block node: QEMU's block-dirty-bitmap-* model.
 *
 * A bitmap has a name (unique on its node), a granularity (a power of two >= 512) and one bit per
 * granule of the node's virtual size: a set bit means "written since the bit was last cleared".
 * An enabled ("recording") bitmap is set by every write, write-zeroes and discard that reaches the
 * node through vd_pwrite & co (block/io.c calls vd_bitmaps_note_write after the driver succeeded),
 * so bitmaps see guest writes over NBD, job writes and offline `vdisk io` writes alike.
 *
 * Persistent bitmaps live in the image (the qcow2 bitmaps extension, via the driver's bitmaps_*
 * hooks): vd_bitmaps_load at open (block.c), vd_bitmaps_store at the last unref before the driver
 * closes, and at vd_bitmaps_store calls of commands that change the stored set. A bitmap that was
 * in use in the image when it was opened (a crash) is loaded "inconsistent": it can only be
 * removed. Bitmaps of a read-only node are read-only (enable/disable only, as QEMU). A "busy"
 * bitmap (exported over NBD, used by a job) cannot be changed or removed.
 *
 * Threads: each node's list has its own mutex; note_write may run on any I/O thread while the
 * QMP thread adds, removes or reads bitmaps. The list object lives until the node is freed.
 */
#ifndef VDISK_BLOCK_DIRTY_BITMAP_H
#define VDISK_BLOCK_DIRTY_BITMAP_H

#include <stdbool.h>
#include <stdint.h>

#include "block/block.h"

#define VD_BITMAP_MIN_GRANULARITY 512ULL
#define VD_BITMAP_MAX_GRANULARITY (1ULL << 31)

/* ---- node life cycle (block.c, io.c) ---- */
/* Load the bitmaps the format stores (marks them in use on a writable image). */
int vd_bitmaps_load(BlockNode *bs, VdError **errp);
/* Write every persistent bitmap of bs to its format (no-op for a read-only node or none). */
int vd_bitmaps_store(BlockNode *bs, VdError **errp);
/* Free the list (the node is going away; nothing may use it any more). */
void vd_bitmaps_free(BlockNode *bs);
/* A write to [offset, offset+bytes) of bs completed: set it in every enabled bitmap. */
void vd_bitmaps_note_write(BlockNode *bs, uint64_t offset, uint64_t bytes);
/* bs's virtual size changed: every bitmap follows (new granules clean). */
int vd_bitmaps_resize(BlockNode *bs, uint64_t size);
/* Can bs's format store persistent bitmaps in this image (QEMU: qcow2 v3, not v2 nor raw)? */
bool vd_bitmaps_persistent_supported(BlockNode *bs);
/* Does bs hold any bitmap (persistent ones count for resize checks too)? */
bool vd_bitmaps_any(BlockNode *bs);

/* ---- the QMP operations (errors as QEMU words them) ---- */
/* granularity 0 = the default (the node's cluster size, at least 4 KiB; 64 KiB without one). */
int vd_bitmap_add(BlockNode *bs, const char *name, uint64_t granularity, bool persistent,
                  bool disabled, VdError **errp);
int vd_bitmap_remove(BlockNode *bs, const char *name, VdError **errp);
int vd_bitmap_clear(BlockNode *bs, const char *name, VdError **errp);
int vd_bitmap_enable(BlockNode *bs, const char *name, bool enable, VdError **errp);
/* One source of a merge: a bitmap on some node. */
typedef struct VdBitmapRef {
    BlockNode *node;
    const char *name;
} VdBitmapRef;
/* Merge (OR) the sources into target on bs; all or nothing. */
int vd_bitmap_merge(BlockNode *bs, const char *target, const VdBitmapRef *srcs, size_t n,
                    VdError **errp);

/* ---- readers ---- */
/* query-named-block-nodes' "dirty-bitmaps" (newest first, as QEMU), or NULL when none; new ref. */
json_t *vd_bitmaps_info(BlockNode *bs);
/* Does bitmap name exist on bs? 0, or -ENOENT with QEMU's "Dirty bitmap '%s' not found". */
int vd_bitmap_check_exists(BlockNode *bs, const char *name, VdError **errp);
/* Check that name exists and may be exported (not inconsistent); sets QEMU's errors. */
int vd_bitmap_check_usable(BlockNode *bs, const char *name, VdError **errp);
/* Could block-dirty-bitmap-clear clear it (exists, not busy, read-only or inconsistent)? */
int vd_bitmap_check_clearable(BlockNode *bs, const char *name, VdError **errp);
/* 1 when name on bs records writes, 0 when disabled, -ENOENT when absent. */
int vd_bitmap_is_recording(BlockNode *bs, const char *name);
/* The node of bs's backing chain (bs first) holding a bitmap called name, or NULL (QEMU's lookup
 * of a bare bitmap name for an NBD export). */
BlockNode *vd_bitmap_find_in_chain(BlockNode *bs, const char *name);
/* Mark busy (an NBD export, a job holds it) or free again. */
int vd_bitmap_set_busy(BlockNode *bs, const char *name, bool busy, VdError **errp);
/*
 * Dirty status of the extent starting at offset: *dirty and *pnum (> 0, <= bytes) bytes sharing
 * it, granule-aligned except at the ends of the request. -ENOENT when the bitmap is gone.
 */
int vd_bitmap_status(BlockNode *bs, const char *name, uint64_t offset, uint64_t bytes,
                     uint64_t *pnum, bool *dirty);

/*
 * A job's private copy of a bitmap (blockdev-backup with a bitmap): save_and_clear takes the bits
 * and empties the bitmap, which goes on recording; restore ORs a copy back (no checks: the job
 * holds the bitmap busy) and frees it. saved_reset clears the granules wholly inside a range
 * (copied, under bitmap-mode=always).
 */
typedef struct VdDirtyBitmap VdBitmapSaved;
VdBitmapSaved *vd_bitmap_save_and_clear(BlockNode *bs, const char *name, VdError **errp);
int vd_bitmap_saved_status(const VdBitmapSaved *saved, uint64_t offset, uint64_t bytes,
                           uint64_t *pnum, bool *dirty);
void vd_bitmap_saved_reset(VdBitmapSaved *saved, uint64_t offset, uint64_t bytes);
void vd_bitmap_restore(BlockNode *bs, const char *name, VdBitmapSaved *saved);
void vd_bitmap_saved_free(VdBitmapSaved *saved);

#endif
