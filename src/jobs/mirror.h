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
#include "jobs/journal.h"
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
    /* x-verify: compare source and target (as it reads on its own) before finishing. */
    bool verify;
    uint64_t granularity;      /* 0 = default (target cluster size within [4 KiB, 64 KiB]) */
    uint64_t buf_size;         /* 0 = default 16 MiB: largest copy in flight */
    int64_t speed;
    bool write_blocking;       /* copy-mode write-blocking from the start */
    JobErrorAction on_source_error, on_target_error;
    bool auto_finalize, auto_dismiss;
    const char *filter_node_name; /* blockdev-mirror filter-node-name; NULL = generated */
    /* vdiskd --state-dir: the request as the journal records it (borrowed; NULL = none) */
    json_t *journal_desc;
    /* Re-create the job from this journal (PAUSED; ownership passes to the job on success). */
    JobJournal *resume;
} MirrorOptions;

/*
 * Insert the filter in front of source (switching every export that serves source to it) and
 * start the job. On error nothing is left changed.
 */
Job *mirror_start(const MirrorOptions *opts, VdError **errp);
/* mirror_start with drive-mirror's `unmap` (false: zero writes never unmap the target). */
Job *mirror_start_ex(const MirrorOptions *opts, bool unmap, VdError **errp);
/* drive-mirror registered the new target: mirror_clean unregisters it unless pivoted. */
void mirror_drop_target_at_end(Job *job);

/*
 * block-job-change (QEMU 8.2): switch a mirror's copy mode. Only background -> write-blocking, as
 * QEMU; the same mode is a no-op. -EINVAL for a job of another type.
 */
int mirror_change_copy_mode(Job *job, bool write_blocking, VdError **errp);

/* The filter node guests write through (tests drive it directly); NULL once detached. */
BlockNode *mirror_filter_node(Job *job);

/*
 * drive-mirror / blockdev-mirror as the user asked for it, typed (src/qmp/ checks the JSON and
 * fills this; absent members keep the defaults written next to them). Strings are borrowed.
 */
typedef struct MirrorRequest {
    bool blockdev;                /* true: target names a node; false: a file (drive-mirror) */
    const char *job_id;           /* NULL = device */
    const char *device, *target;  /* required */
    const char *format;           /* drive-mirror: NULL = the source's (or probed if existing) */
    const char *node_name;        /* drive-mirror: the new target node's name */
    bool has_replaces;            /* refused: vdiskd replaces nothing but the source */
    int sync;                     /* MirrorSync */
    bool mode_existing;           /* drive-mirror mode=existing (else absolute-paths: create) */
    bool mode_absolute;           /* mode=absolute-paths given: the target names its backing by
                                   * an absolute path (omitted: relative, vdisk's default) */
    int64_t speed;                /* 0 */
    uint32_t granularity;         /* 0 = default */
    int64_t buf_size;             /* 0 = default */
    int on_source_error, on_target_error; /* JobErrorAction, default JOB_ERR_REPORT */
    bool unmap;                   /* drive-mirror, default true */
    bool write_blocking;          /* copy-mode write-blocking (default background) */
    bool auto_finalize, auto_dismiss; /* default true */
    const char *filter_node_name; /* blockdev-mirror; NULL = generated */
    const char *base_node;        /* vdisk's extension: share what comes from this backing node */
    /* vdisk's extension (drive-mirror x-backing-matches): the caller vouches that an existing
     * target's own backing reads like the source's (existing_target_backing, mirror-request.c). */
    bool backing_matches;
    bool verify;                  /* vdisk's extension x-verify (see MirrorOptions.verify) */
    JobJournal *resume;           /* mirror_resume_journals: the job's journal (not from QMP) */
} MirrorRequest;

/*
 * Resolve a request's names against the graph, create/open the target (drive-mirror) and start
 * the job. 0, or -errno with *errp set and nothing left behind. QMP thread.
 */
int mirror_request_start(const MirrorRequest *r, VdError **errp);

/* ---- resumable copies (mirror-journal.c; docs/resumable.md) ---- */

/* The request as a journal records it / read back (strings borrowed from j). */
json_t *mirror_request_to_json(const MirrorRequest *r);
int mirror_request_from_json(json_t *j, MirrorRequest *r, VdError **errp);
/*
 * vdiskd at start, after --blockdev and before --export: re-create every mirror the state
 * directory holds a journal of, PAUSED. A journal that cannot be resumed is logged and kept.
 * Returns how many were resumed.
 */
int mirror_resume_journals(void);
/* The filter of a running mirror of `source` (exports created later serve it), else NULL. */
BlockNode *mirror_filter_of_source(BlockNode *source);

#endif
