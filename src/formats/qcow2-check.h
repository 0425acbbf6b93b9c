/*
 * qcow2-check.h - offline qcow2 consistency check / repair and size estimation (qemu-img check and
 * qemu-img measure semantics), working only on the on-disk structures through the protocol node.
 * The qcow2 driver calls these from its .check and .measure, and when opening a dirty image with
 * lazy refcounts (after flushing its own caches; nobody else may write the file meanwhile).
 */
#ifndef VDISK_FORMATS_QCOW2_CHECK_H
#define VDISK_FORMATS_QCOW2_CHECK_H

#include <stdbool.h>
#include <stdint.h>

#include "block/block.h"
#include "util/error.h"

/*
 * Extra bit for the `fix` argument of qcow2_check_file (beside VD_FIX_LEAKS / VD_FIX_ERRORS):
 * do not print the per-problem lines on stderr (for the automatic repair done at open).
 */
#define QCOW2_CHECK_QUIET VD_CHECK_QUIET

/*
 * Check (and with fix, repair) the qcow2 image stored in `file`. Fills *res like qemu-img check
 * (res is cleared first; res->filename/format are left to the caller). Per-problem lines go to
 * stderr in qemu-img's wording. With a fix, the image is re-checked after repairing and *res holds
 * the remaining problems plus the *_fixed counts of the repair pass; the dirty and corrupt bits
 * are cleared when no corruption and no check error remain. Without a fix nothing is written.
 *
 * Returns 0 when the check ran (whatever it found), or -errno when it could not run: a header that
 * is not a usable qcow2 header (-EINVAL, -ENOTSUP), an unreadable snapshot table, I/O errors,
 * out of memory, or a repair that needs rebuilding but was only allowed to fix leaks (-EIO).
 * errp gets a message in every failing case.
 */
int qcow2_check_file(BlockNode *file, VdCheckResult *res, int fix, VdError **errp);

/*
 * qemu-img measure for qcow2: *required = bytes a new image created with opts needs to hold src's
 * data (src == NULL: an empty image of opts->size), *fully_allocated = bytes with every cluster
 * allocated. src is read through vd_block_status_above(src, NULL, ...).
 */
int qcow2_measure(const VdCreateOptions *opts, BlockNode *src, uint64_t *required,
                  uint64_t *fully_allocated, VdError **errp);

/*
 * The on-disk part of qcow2 amend, on an image nobody has open (qcow2-check-amend.c): write a new
 * refcount structure with refcount_bits-bit entries (0: keep the width) and, with
 * expand_zeroes, turn every zero cluster (active and snapshot L2 tables) into a form version 2
 * reads as zeroes: unallocated when there is no backing file, else a zeroed cluster. Refuses an
 * image with errors (leaks are fine: they become free space). progress: per L2 table.
 */
typedef struct Qcow2AmendFile {
    uint32_t refcount_bits;
    bool expand_zeroes;
    bool has_backing;
    void (*progress)(void *opaque, uint64_t done, uint64_t total);
    /* a width change's steps: QEMU's three walks over the old refcount table, one per entry */
    void (*refcount_progress)(void *opaque, uint64_t done, uint64_t total);
    void *opaque;
} Qcow2AmendFile;
int qcow2_amend_file(BlockNode *file, const Qcow2AmendFile *a, VdError **errp);

/* Bytes of refcount table + blocks needed to count `clusters` clusters plus themselves. */
uint64_t qcow2_refcount_metadata_size(uint64_t clusters, uint64_t cluster_size,
                                      unsigned refcount_order);

#endif
