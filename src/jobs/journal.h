/*
 * journal.h - the durable progress of a block job (docs/resumable.md): a description written once
 * (DIR/<id>.json) and a write-ahead segment map (DIR/<id>.map), one bit per segment, set = "the
 * copy's source and destination may differ there". Promise: a segment is clean on disk only if the
 * job cleared it after a destination flush that covers every copy into it and no guest write was
 * in flight there; a guest write to a clean segment waits until its mark is on disk. Thread-safe.
 */
#ifndef VDISK_JOBS_JOURNAL_H
#define VDISK_JOBS_JOURNAL_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "util/error.h"

typedef struct JobJournal JobJournal;

/* vdiskd --state-dir: where jobs keep their journals (NULL: jobs are not journalled). */
int job_journal_set_dir(const char *dir, VdError **errp);
const char *job_journal_dir(void);
/* Daemon shutdown (SIGTERM): jobs that end from now on keep their journals (resumed next time). */
void job_journal_keep_all(void);
bool job_journal_keeping_all(void);

/*
 * Segment size for a disk of len bytes: 64 MiB, but at most 1 % of the disk (a power of two) and
 * at least granularity.
 */
uint64_t job_journal_segment_size(uint64_t len, uint64_t granularity);

/*
 * Start the journal of job `id` in `dir`: desc (a JSON object the caller defines; "len" and
 * "segment" are added) is written durably, every segment marked. NULL dir = job_journal_dir();
 * *out = NULL (and 0) when there is no state directory.
 */
int job_journal_create(const char *dir, const char *id, json_t *desc, uint64_t len,
                       uint64_t segment, JobJournal **out, VdError **errp);
/* Open DIR/<id>.json and its map (a missing or damaged map: every segment marked). */
JobJournal *job_journal_open(const char *json_path, VdError **errp);
/* After job_journal_open: NULL if a valid map was read, else why not ("none was written"...). */
const char *job_journal_map_lost(const JobJournal *j);
/* Release the memory; the files stay. NULL is a no-op. */
void job_journal_close(JobJournal *j);
/* Delete both files durably (the job is over); the journal then marks and clears nothing. */
void job_journal_remove(JobJournal *j);

const char *job_journal_id(const JobJournal *j);
json_t *job_journal_desc(const JobJournal *j); /* borrowed */
uint64_t job_journal_len(const JobJournal *j);
uint64_t job_journal_segment(const JobJournal *j);
uint64_t job_journal_nsegments(const JobJournal *j);
/* Is segment i marked (in the journal's current state)? */
bool job_journal_marked(JobJournal *j, uint64_t i);
/* Marked bytes (whole segments, clipped to len). */
uint64_t job_journal_marked_bytes(JobJournal *j);

/*
 * A guest write to [off, off+bytes) starts: mark its segments and return once the marks are on
 * disk (at once when they already are). write_end when the write (and the job's bookkeeping of it)
 * is over. A journal that failed is dropped (files deleted) and these become no-ops.
 */
void job_journal_write_begin(JobJournal *j, uint64_t off, uint64_t bytes);
void job_journal_write_end(JobJournal *j, uint64_t off, uint64_t bytes);
/* A copy into [off, off+bytes) starts (before the job forgets the range is dirty) / is over. */
void job_journal_copy_begin(JobJournal *j, uint64_t off, uint64_t bytes);
void job_journal_copy_end(JobJournal *j, uint64_t off, uint64_t bytes);

/*
 * Clearing, on the job's thread: clear_collect picks the marked segments with nothing in flight
 * and asks still_dirty (called without the journal's lock) whether the job still has work there;
 * the caller then flushes the destination; clear_commit clears the candidates nothing touched
 * since and writes the map. Returns how many segments it cleared (or -errno of the write).
 */
typedef bool JobJournalDirtyFn(void *opaque, uint64_t off, uint64_t bytes);
uint64_t job_journal_clear_collect(JobJournal *j, JobJournalDirtyFn *still_dirty, void *opaque);
int job_journal_clear_commit(JobJournal *j);

/*
 * A job re-created from its journal, on its thread before it copies: only the marked segments may
 * differ between its source and its destination. resume_scan reads both there, `unit` bytes at a
 * time, and calls differs() for every piece of `granularity` bytes where they differ, so the job
 * copies what was left, not what the coarse segments cover. Returns 0, -ENOMEM, the first failed
 * read's -errno, or -ECANCELED once the job is cancelled.
 */
typedef struct JobJournalScan {
    struct Job *job;
    struct BlockNode *source, *dest;
    /* The destination as the job compares it, when that is not vd_pread(dest) (else NULL). */
    int (*read_dest)(void *opaque, uint64_t off, uint64_t bytes, uint8_t *buf);
    void (*differs)(void *opaque, uint64_t off, uint64_t bytes);
    void *opaque;
    uint64_t unit, granularity;
} JobJournalScan;
int job_journal_resume_scan(JobJournal *j, const JobJournalScan *scan);

/* How many map writes (each one fdatasync) the journal made: tests and benchmarks count them. */
uint64_t job_journal_writes(JobJournal *j);

#endif
