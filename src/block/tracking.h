/*
 * tracking.h - in-flight request tracking and range serialisation for one block node.
 *
 * Every user of a node that must not race with other users of the same byte range (the NBD server's
 * requests, the live copy job's copy ranges) brackets its I/O with block_tracker_begin/end. Ranges
 * are widened to the tracker's granularity (4 KiB, or the node's cluster size when larger) so that
 * two writes into one cluster never run an allocation/COW concurrently.
 *
 * Rules:
 *  - BT_SHARED requests (reads, block status) run concurrently with each other.
 *  - BT_EXCLUSIVE requests (writes, write-zeroes, discards, copy-job copies) wait until no
 *    overlapping request of any kind that began earlier is still in flight, and block overlapping
 *    requests that begin later. So a read never observes a half-done discard or write, and two
 *    overlapping writes land in begin order.
 *  - Waiting is FIFO per range: a request only waits for requests that began before it, so there is
 *    no starvation and no deadlock as long as the thread that calls begin also runs the I/O (never
 *    begin a request on behalf of work queued behind you).
 *  - block_tracker_wait_idle waits until nothing is in flight (a drain); combined with the caller's
 *    own admission control (e.g. nbd_export_drain_begin) it yields a quiescent node.
 *
 * Trackers are per node and shared: block_tracker_get(node) returns the one tracker of that node
 * (created on first use) with a new reference; block_tracker_put drops it. Thread safe.
 */
#ifndef VDISK_BLOCK_TRACKING_H
#define VDISK_BLOCK_TRACKING_H

#include <stdbool.h>
#include <stdint.h>

#include "block/block.h"

typedef struct BlockTracker BlockTracker;

typedef enum { BT_SHARED, BT_EXCLUSIVE } BtKind;

/* Caller-owned record of one tracked request (lives on the caller's stack until end). */
typedef struct BtRequest {
    uint64_t start, end;   /* widened range [start, end) */
    uint64_t offset, bytes; /* as the caller gave them (for write notifiers) */
    BtKind kind;
    uint64_t t_begin;       /* CLOCK_MONOTONIC ns at begin (latency statistics) */
    bool job;               /* block_tracker_begin_job: not in block_tracker_stats */
    struct BtRequest *prev, *next;
} BtRequest;

/* The tracker of node (created on first use), with a new reference; NULL on ENOMEM. */
BlockTracker *block_tracker_get(BlockNode *node);
void block_tracker_put(BlockTracker *t);
/*
 * A tracker of no node (a job's own, e.g. for its write hook: block/write-hooks.h), ranges widened
 * to granularity (a power of two, at least 4096). refcnt 1 (block_tracker_put frees); NULL on ENOMEM.
 */
BlockTracker *block_tracker_new(uint64_t granularity);

/* Wait until [offset, offset+bytes) may proceed as kind, then mark it in flight. bytes 0 = 1. */
void block_tracker_begin(BlockTracker *t, BtRequest *req, uint64_t offset, uint64_t bytes,
                         BtKind kind);
/*
 * The same for a job's own request (a copy engine's copy): ordered like any other, but left out
 * of block_tracker_stats, which then describes only the other users (the guest's requests).
 */
void block_tracker_begin_job(BlockTracker *t, BtRequest *req, uint64_t offset, uint64_t bytes,
                             BtKind kind);
/* Mark finished; wakes requests waiting on it. */
void block_tracker_end(BlockTracker *t, BtRequest *req);
/* Wait until no request is in flight on this tracker. */
void block_tracker_wait_idle(BlockTracker *t);
/* Number of requests in flight (begun, not ended), for tests and diagnostics. */
unsigned block_tracker_in_flight(BlockTracker *t);
/*
 * Requests other than a job's own (block_tracker_begin_job) ended since the tracker was created,
 * the sum of their latencies (begin -> end, waits for earlier requests included) and how many are
 * in flight now, for the copy engine's guest-priority budget (jobs/copy.h). Read together under
 * the tracker's lock, so a job's copy ending meanwhile never shows up in them.
 */
void block_tracker_stats(BlockTracker *t, uint64_t *ended, uint64_t *lat_ns, unsigned *in_flight);
/* The granularity ranges are widened to (a power of two, >= 4096). */
uint64_t block_tracker_granularity(BlockTracker *t);

/*
 * Write notifiers: called from block_tracker_end of every BT_EXCLUSIVE request, with the caller's
 * original (unwidened) range, while the request still holds its range - so a copy job that marks the
 * range dirty cannot miss it: any overlapping copy either finished before the write began, or starts
 * after this notification. Called on the writer's thread, under the notifier lock: keep it short and
 * do not call add/remove (or begin/end on this tracker) from it. The NBD server's requests notify;
 * a copy job's own BT_EXCLUSIVE copies notify too (it can recognise them by opaque/thread if needed).
 */
typedef void BtWriteNotifier(void *opaque, uint64_t offset, uint64_t bytes);
int block_tracker_add_write_notifier(BlockTracker *t, BtWriteNotifier *fn, void *opaque);
void block_tracker_remove_write_notifier(BlockTracker *t, BtWriteNotifier *fn, void *opaque);

#endif
