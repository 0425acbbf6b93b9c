/*
 * defer.h - work handed to another thread's loop ("bottom half"): the caller owns the struct and
 * keeps it valid until fn has run. vdiskd's QMP thread runs such work (qmp_defer); lower layers
 * (jobs) take the queueing function from whoever hosts them, so they never name the QMP server.
 */
#ifndef VDISK_UTIL_DEFER_H
#define VDISK_UTIL_DEFER_H

typedef struct VdDeferred {
    void (*fn)(void *opaque);
    void *opaque;
    struct VdDeferred *next; /* private to the queue that runs it */
} VdDeferred;

/* Queue d on the hosting loop: 0, or -ESRCH when none runs (the caller runs fn itself). */
typedef int VdDeferFn(VdDeferred *d);

#endif
