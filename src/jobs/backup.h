/*
 * backup.h - blockdev-backup: a point-in-time copy of a running disk onto a target node (the
 * target ends up reading what the source read when the job started, whatever guests write
 * meanwhile). See backup.c for the mechanism.
 */
#ifndef VDISK_JOBS_BACKUP_H
#define VDISK_JOBS_BACKUP_H

#include <stdbool.h>
#include <stdint.h>

#include "util/error.h"

/* QAPI BitmapSyncMode, in its order. */
typedef enum BackupBitmapMode { BITMAP_ON_SUCCESS, BITMAP_NEVER, BITMAP_ALWAYS } BackupBitmapMode;

/* blockdev-backup's arguments, typed (src/qmp/ fills it; strings borrowed; defaults noted). */
typedef struct BackupRequest {
    const char *job_id;           /* NULL = device */
    const char *device, *target;  /* required: node names */
    int sync;                     /* MirrorSync (jobs/job.h): top, full, none, incremental,
                                   * bitmap */
    int64_t speed;                /* 0 */
    const char *bitmap;           /* on the device's node */
    bool has_bitmap_mode;
    int bitmap_mode;              /* BackupBitmapMode */
    bool compress;                /* refused: vdiskd writes no compressed clusters in jobs */
    int on_source_error, on_target_error; /* JobErrorAction, default JOB_ERR_REPORT */
    bool auto_finalize, auto_dismiss;     /* default true */
    const char *filter_node_name; /* NULL = generated */
    bool has_x_perf;              /* accepted, ignored (QEMU's unstable tuning knobs) */
} BackupRequest;

/* Check, insert the copy-before-write filter in front of the device (under drain) and start the
 * job. 0, or -errno with *errp set (QEMU's texts) and nothing changed. QMP thread. */
int backup_request_start(const BackupRequest *r, VdError **errp);

#endif
