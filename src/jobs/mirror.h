/*
 * mirror.h - live block copy (drive-mirror / blockdev-mirror): copy a source chain's top (above a
 * base) to a target while guests keep writing through a "mirror-top" filter node, then pivot every
 * NBD export from the source to the target. See mirror.c for the mechanism and its invariants.
 */
#ifndef VDISK_JOBS_MIRROR_H
#define VDISK_JOBS_MIRROR_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "block/block.h"
#include "jobs/job.h"
#include "util/error.h"

typedef struct MirrorOptions {
    const char *job_id;        /* required */
    BlockNode *source;         /* the node exports serve (a ref is taken) */
    BlockNode *target;         /* open, writable (a ref is taken) */
    /*
     * What the target's backing is once the copy is complete (NULL = none). Everything the source
     * chain decides above `base` is copied; what comes from base is shared, not copied.
     */
    BlockNode *base;
    bool base_is_source;       /* sync=none: only new writes are copied (base == source) */
    /* At the pivot, record backing_name/backing_fmt in the target's header (NULL name = none). */
    bool rewrite_backing;
    const char *backing_name;
    const char *backing_fmt;
    /* Seed semantics (base-node): clusters already allocated in the target are not copied. */
    bool skip_target_allocated;
    /* The target was just created by us (all unallocated): the initial scan skips it. */
    bool target_new;
    /* blockdev-mirror: after the pivot the target keeps its own backing instead of base. */
    bool keep_target_backing;
    /* The caller vouches that the target's own backing reads like base: base is not copied. */
    bool backing_matches;
    uint64_t granularity;      /* 0 = default (target cluster size within [4 KiB, 64 KiB]) */
    uint64_t buf_size;         /* 0 = default 16 MiB: largest copy in flight */
    int64_t speed;
    bool write_blocking;       /* copy-mode write-blocking from the start */
    JobErrorAction on_source_error, on_target_error;
    bool auto_finalize, auto_dismiss;
    const char *filter_node_name; /* blockdev-mirror filter-node-name; NULL = generated */
} MirrorOptions;

/*
 * Insert the filter in front of source (switching every export that serves source to it) and
 * start the job. On error nothing is left changed.
 */
Job *mirror_start(const MirrorOptions *opts, VdError **errp);

/* Is node the source or target of a mirror job that has not finished (for other jobs' claims)? */
bool mirror_node_busy(BlockNode *node);

/* The filter node guests write through (tests drive it directly); NULL once detached. */
BlockNode *mirror_filter_node(Job *job);

/* QMP drive-mirror (blockdev = false) / blockdev-mirror (true). Returns {} or NULL + *errp. */
json_t *mirror_qmp_start(json_t *args, bool blockdev, VdError **errp);

#endif
