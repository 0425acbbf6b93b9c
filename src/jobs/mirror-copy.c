/*
 * mirror-copy.c - what a live copy (mirror.c) writes: the initial dirty bitmap, copying a range
 * source -> target (zeroes as zeroes; against a target keeping a backing of its own, only what
 * differs from it), the copy engine's callbacks (pick a dirty range, copy a chunk, reap it), the
 * target's flushes and x-verify. Locking: m->lock is a leaf, never held across a vd_* call.
 */
#include "jobs/mirror.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "block/tracking.h"
#include "jobs/copy.h"
#include "jobs/mirror-internal.h"
#include "util/lock.h"
#include "util/log.h"

/* ---- copying ---- */

/*
 * Does [offset, offset+bytes) of the target read zeroes once it has its final backing? *pnum gets
 * the length of the first extent with one answer. Only the target's own layer is consulted: during
 * the copy its in-memory backing is the source.
 */
static int target_reads_zero(Mirror *m, uint64_t offset, uint64_t bytes, uint64_t *pnum, bool *zero,
                             bool *allocated)
{
    uint64_t n = bytes, map = 0;
    BlockNode *file = NULL;
    int flags = 0;
    if (m->target->drv->block_status) {
        flags = m->target->drv->block_status(m->target, offset, bytes, &n, &map, &file);
        if (flags < 0) {
            return flags;
        }
    } else {
        flags = VD_BS_DATA | VD_BS_ALLOCATED;
    }
    if (n == 0 || n > bytes) {
        n = bytes;
    }
    bool alloc = (flags & (VD_BS_ALLOCATED | VD_BS_DATA | VD_BS_ZERO)) ||
                 !m->target->drv->supports_backing;
    *allocated = alloc && !(!m->target->drv->supports_backing && (flags & VD_BS_ZERO));
    if (alloc) {
        *zero = (flags & VD_BS_ZERO) != 0;
    } else if (m->final_backing) {
        /* unallocated: reads the final backing (zeroes past its end) */
        int64_t fblen = vd_getlength(m->final_backing);
        if (fblen < 0) {
            return (int)fblen;
        }
        *zero = offset >= (uint64_t)fblen;
        if (!*zero) {
            uint64_t fn = 0;
            VdBlockStatus st = {0};
            n = n < (uint64_t)fblen - offset ? n : (uint64_t)fblen - offset;
            int r = vd_block_status_above(m->final_backing, NULL, offset, n, &fn, &st);
            if (r < 0) {
                return r;
            }
            n = fn && fn < n ? fn : n;
            *zero = (st.flags & VD_BS_ZERO) || !(st.flags & VD_BS_ALLOCATED);
        }
    } else {
        /* no backing: zeroes - unless the caller vouched (x-backing-matches) that below the
         * target lies what base holds */
        *zero = !m->backing_unseen;
    }
    *pnum = n;
    return 0;
}

/* A copy of ours reached the target (or may have, on error): the next flush must cover it. */
static void target_written(Mirror *m)
{
    __atomic_add_fetch(&m->target_gen, 1, __ATOMIC_SEQ_CST);
}

int mirror_flush_target(Mirror *m)
{
    uint64_t gen = __atomic_load_n(&m->target_gen, __ATOMIC_SEQ_CST);
    if (gen == m->flushed_gen) {
        return 0;
    }
    int r = vd_flush_own(m->target);
    if (r == 0) {
        m->flushed_gen = gen;
    }
    return r;
}

int mirror_flush_target_all(Mirror *m)
{
    uint64_t guest = __atomic_load_n(&m->guest_gen, __ATOMIC_SEQ_CST);
    if (guest == m->guest_flushed_gen) {
        return mirror_flush_target(m);
    }
    uint64_t gen = __atomic_load_n(&m->target_gen, __ATOMIC_SEQ_CST);
    int r = vd_flush_own(m->target);
    if (r == 0) {
        m->flushed_gen = gen;
        m->guest_flushed_gen = guest;
    }
    return r;
}

static int copy_data(Mirror *m, BlockNode *from, uint64_t offset, uint64_t bytes, uint8_t *buf,
                     bool *is_read)
{
    while (bytes > 0) {
        uint64_t n = bytes < m->chunk ? bytes : m->chunk;
        *is_read = true;
        int r = vd_pread(from, offset, n, buf);
        if (r < 0) {
            return r;
        }
        *is_read = false;
        r = vd_pwrite(m->target, offset, n, buf, 0);
        target_written(m);
        if (r < 0) {
            return r;
        }
        offset += n;
        bytes -= n;
    }
    return 0;
}

/*
 * The source's allocation says nothing about what the target's final backing holds: a copy with
 * no base in the source's chain (a raw or NBD source, sync=full) onto a target that keeps a
 * backing of its own. There every unit the source reads is compared with what the target reads
 * on its own (its layer, else that backing) and only a unit that differs is written - the source
 * text's third case: "compare the read data with the data in base to decide if a copy is needed".
 */
static bool compare_with_final_backing(const Mirror *m)
{
    return m->base == NULL && m->final_backing != NULL;
}

/* copy_data where compare_with_final_backing: write only the granularity units that differ. */
static int copy_differing(Mirror *m, BlockNode *from, uint64_t offset, uint64_t bytes,
                          uint8_t *buf, bool *is_read)
{
    uint8_t *cmp = malloc(m->chunk);
    int r = cmp ? 0 : -ENOMEM;
    *is_read = false;
    while (r == 0 && bytes > 0) {
        uint64_t n = bytes < m->chunk ? bytes : m->chunk;
        *is_read = true;
        if ((r = vd_pread(from, offset, n, buf)) < 0) {
            break;
        }
        *is_read = false;
        if ((r = mirror_target_final_pread(m, offset, n, cmp)) < 0) {
            break;
        }
        for (uint64_t pos = 0; r == 0 && pos < n;) {
            uint64_t unit = m->granularity - (offset + pos) % m->granularity;
            unit = unit < n - pos ? unit : n - pos;
            uint64_t run = 0; /* units that differ, written at once */
            while (pos + run < n && memcmp(buf + pos + run, cmp + pos + run, unit) != 0) {
                run += unit;
                unit = m->granularity < n - pos - run ? m->granularity : n - pos - run;
            }
            if (run) {
                r = vd_pwrite(m->target, offset + pos, run, buf + pos, 0);
                target_written(m);
                pos += run;
            } else {
                pos += unit;
            }
        }
        offset += n;
        bytes -= n;
    }
    free(cmp);
    return r;
}

/*
 * Make the target's [offset, offset+bytes) read what the source reads, for the content above base;
 * what the source takes from base (and the target will too) is skipped, zeroes stay sparse.
 * The caller holds the range (the job's tracker) or has drained every writer.
 */
static int mirror_copy_range(Mirror *m, uint64_t offset, uint64_t bytes, uint8_t *buf,
                             bool *is_read)
{
    uint64_t end = offset + bytes;
    while (offset < end) {
        uint64_t pnum = 0;
        VdBlockStatus st;
        *is_read = true;
        int r;
        if (m->base_is_source) {
            /* sync=none: every dirty range is data the guest wrote after the start. */
            st.flags = VD_BS_ALLOCATED | VD_BS_DATA;
            pnum = end - offset;
        } else if ((r = vd_block_status_above(m->source, m->base, offset, end - offset, &pnum,
                                              &st)) < 0) {
            return r;
        }
        if (pnum == 0 || pnum > end - offset) {
            pnum = end - offset;
        }
        bool src_zero = (st.flags & VD_BS_ZERO) ||
                        (!(st.flags & VD_BS_ALLOCATED) && m->base == NULL);
        if ((st.flags & VD_BS_ALLOCATED) && !src_zero) {
            BlockNode *from = m->base_is_source ? m->source
                                                : copy_read_layer(m->source, st.layer, offset, pnum);
            r = compare_with_final_backing(m) ? copy_differing(m, from, offset, pnum, buf, is_read)
                                              : copy_data(m, from, offset, pnum, buf, is_read);
            if (r < 0) {
                return r;
            }
        } else {
            /* Source reads zero, or (unallocated above base) reads base: check the target. */
            for (uint64_t pos = offset; pos < offset + pnum;) {
                uint64_t tn;
                bool tzero, talloc;
                *is_read = false;
                if (target_reads_zero(m, pos, offset + pnum - pos, &tn, &tzero, &talloc) < 0) {
                    /* Unknown target status (an optimisation): write what the source reads. */
                    tn = offset + pnum - pos;
                    tzero = false;
                    talloc = true;
                }
                if (src_zero && !tzero) {
                    r = vd_pwrite_zeroes(m->target, pos, tn, m->unmap ? VD_REQ_MAY_UNMAP : 0);
                    target_written(m);
                } else if (!src_zero && talloc && !m->target_holds_base) {
                    /* The target holds its own data where the source shows base: copy base. */
                    r = copy_data(m, m->source, pos, tn, buf, is_read);
                } else {
                    r = 0;
                }
                if (r < 0) {
                    return r;
                }
                pos += tn;
            }
        }
        offset += pnum;
    }
    return 0;
}

int mirror_scan(Mirror *m)
{
    if (m->base_is_source) {
        return 0;
    }
    for (uint64_t off = 0; off < m->len;) {
        if (job_is_cancelled(m->job)) {
            return -ECANCELED;
        }
        uint64_t pnum = 0;
        VdBlockStatus st;
        int r = vd_block_status_above(m->source, m->base, off, m->len - off, &pnum, &st);
        if (r < 0) {
            return r;
        }
        if (pnum == 0) {
            pnum = m->len - off;
        }
        /* A target that will not share the source's base must get every byte. */
        bool src_needs = (st.flags & VD_BS_ALLOCATED) != 0 || !m->shares_base;
        for (uint64_t pos = off; pos < off + pnum;) {
            uint64_t tn = off + pnum - pos;
            bool tzero = true, talloc = false;
            if ((!m->target_new || m->skip_target_allocated) &&
                target_reads_zero(m, pos, tn, &tn, &tzero, &talloc) < 0) {
                /*
                 * The target's block status is an optimisation: when it fails, assume the
                 * least (the target may hold anything there) and copy every byte the source
                 * decides; a real target failure shows up on the copy's writes.
                 */
                tn = off + pnum - pos;
                tzero = false;
                talloc = !m->skip_target_allocated;
            }
            /* A layerless target vouched for by x-backing-matches holds base's data already. */
            talloc = talloc && !(m->target_holds_base && !src_needs);
            bool dirty = m->skip_target_allocated ? (src_needs && !talloc)
                                                  : (src_needs || talloc);
            if (dirty) {
                vd_mutex_lock(&m->lock);
                mirror_bm_set(m, pos, tn, true);
                vd_mutex_unlock(&m->lock);
            }
            pos += tn;
        }
        off += pnum;
    }
    return 0;
}

void mirror_update_progress(Mirror *m, bool ready)
{
    vd_mutex_lock(&m->lock);
    uint64_t rem = mirror_dirty_bytes_locked(m);
    vd_mutex_unlock(&m->lock);
    /* libvirt reads offset == len as "ready": never show it before READY. */
    job_progress_set_remaining(m->job, (!ready && rem == 0) ? 1 : rem);
}

int mirror_io_error(Mirror *m, int r, bool is_read, VdError **errp)
{
    JobErrorAction a = job_handle_io_error(m->job, is_read ? m->on_source_error : m->on_target_error,
                                           is_read, r);
    if (a == JOB_ERR_REPORT) {
        vd_error_setg(errp, -r, "Mirror %s error: %s", is_read ? "read" : "write", strerror(-r));
        return r;
    }
    if (a == JOB_ERR_STOP) {
        job_pause_point(m->job);
        /*
         * Resumed: target errors recorded by guest writes while we were stopped (their ranges are
         * dirty, so they are re-copied) are stale: the user resumed because the target is fixed.
         */
        vd_mutex_lock(&m->lock);
        __atomic_add_fetch(&m->stop_epoch, 1, __ATOMIC_RELEASE);
        m->pending_target_error = 0;
        vd_mutex_unlock(&m->lock);
    } else {
        job_sleep_ns(m->job, 10000000); /* ignore: retry, but do not spin */
    }
    return 0;
}

/* ---- the copy loop: the coordinator (job thread) picks dirty ranges, the engine copies them ---- */

void mirror_copy_chunk(void *opaque, CopyChunk *c, uint8_t *buf, uint64_t buf_size)
{
    Mirror *m = opaque;
    JobJournal *j = c->tracked ? m->journal : NULL; /* (prepare's tail needs no bookkeeping) */
    job_journal_copy_begin(j, c->off, c->bytes);    /* before the range stops counting dirty */
    if (c->tracked) {
        vd_mutex_lock(&m->lock);
        mirror_bm_set(m, c->off, c->bytes, false);
        vd_mutex_unlock(&m->lock);
    }
    c->ret = mirror_copy_range(m, c->off, c->bytes, buf, &c->is_read);
    if (c->ret == 0) {
        __atomic_add_fetch(&m->copied_total, c->bytes, __ATOMIC_RELAXED);
    }
    if (c->ret < 0 && c->tracked) {
        /* A failed chunk goes back to dirty: retried after the error policy's stop/ignore. */
        vd_mutex_lock(&m->lock);
        mirror_bm_set(m, c->off, c->bytes, true);
        vd_mutex_unlock(&m->lock);
    }
    job_journal_copy_end(j, c->off, c->bytes);
    c->copied = c->bytes;
}

bool mirror_pick(Mirror *m, uint64_t *cursor, uint64_t max_bytes, uint64_t a, uint64_t *off,
                 uint64_t *n)
{
    uint64_t g = m->granularity, from = *cursor;
    unsigned tries = copy_engine_max_in_flight(m->engine) + 2;
    bool found = false;
    vd_mutex_lock(&m->lock);
    for (unsigned t = 0; t < tries && !found; t++) {
        uint64_t first;
        if (!mirror_bm_next(m, from >= m->nbits ? 0 : from, &first)) {
            break;
        }
        uint64_t start = first * g / a * a;
        uint64_t limit = start + max_bytes;
        limit = limit < (first + 1) * g ? (first + 1) * g : limit;
        uint64_t last = first;
        while (last + 1 < m->nbits && (last + 2) * g <= limit && mirror_bm_get(m, last + 1)) {
            last++;
        }
        uint64_t end = ((last + 1) * g + a - 1) / a * a;
        end = end > limit ? limit : end;
        end = end > m->len ? m->len : end;
        uint64_t skip = 0;
        uint64_t e2 = copy_engine_clip(m->engine, start, end, &skip);
        if (e2 == 0) {
            from = skip / g;
            continue;
        }
        *off = start;
        *n = e2 - start;
        *cursor = e2 / g;
        found = true;
    }
    vd_mutex_unlock(&m->lock);
    return found;
}

void mirror_reaped(void *opaque, const CopyChunk *c)
{
    MirrorReap *mr = opaque;
    if (c->ret < 0) {
        /* Its range is dirty again; only the first failure is reported (the others retry). */
        if (!mr->failed) {
            mr->failed = true;
            mr->first_failure = *c;
        }
        return;
    }
    mr->window_copied += c->bytes;
    job_progress_update(mr->m->job, c->bytes);
    mirror_update_progress(mr->m, job_is_ready(mr->m->job));
    if (job_get_speed(mr->m->job)) {
        mr->to_account += c->bytes;
    }
}

int mirror_target_final_pread(Mirror *m, uint64_t off, uint64_t n, uint8_t *buf)
{
    while (n > 0) {
        uint64_t pnum = n;
        bool zero, alloc;
        int r = target_reads_zero(m, off, n, &pnum, &zero, &alloc);
        if (r < 0) {
            return r;
        }
        pnum = pnum ? pnum : n;
        BlockNode *fb = m->final_backing;
        int64_t fblen = fb ? vd_getlength(fb) : 0;
        if (alloc || zero) {
            r = alloc ? vd_pread(m->target, off, pnum, buf) : (memset(buf, 0, pnum), 0);
        } else if (fblen < 0) {
            r = (int)fblen;
        } else {
            uint64_t in = (uint64_t)fblen > off ? (uint64_t)fblen - off : 0;
            in = in < pnum ? in : pnum;
            memset(buf + in, 0, pnum - in);
            r = in ? vd_pread(fb, off, in, buf) : 0;
        }
        if (r < 0) {
            return r;
        }
        off += pnum;
        buf += pnum;
        n -= pnum;
    }
    return 0;
}

int mirror_verify(Mirror *m, VdError **errp)
{
    uint64_t unit = m->chunk;
    uint8_t *a = malloc(unit), *b = malloc(unit);
    int r = a && b ? 0 : -ENOMEM;
    uint64_t bad = UINT64_MAX;
    for (uint64_t off = 0; r == 0 && off < m->len; off += unit) {
        if (job_is_cancelled(m->job)) {
            r = -ECANCELED;
            break;
        }
        uint64_t n = m->len - off < unit ? m->len - off : unit;
        BtRequest req;
        block_tracker_begin(m->tracker, &req, off, n, BT_SHARED);
        vd_mutex_lock(&m->lock);
        bool dirty = mirror_bm_set(m, off, n, false) > 0;
        vd_mutex_unlock(&m->lock);
        bool is_read = false;
        if (dirty && (r = mirror_copy_range(m, off, n, a, &is_read)) < 0) {
            vd_mutex_lock(&m->lock);
            mirror_bm_set(m, off, n, true);
            vd_mutex_unlock(&m->lock);
        }
        if (r == 0 && (r = vd_pread(m->source, off, n, a)) == 0) {
            r = mirror_target_final_pread(m, off, n, b);
        }
        block_tracker_end(m->tracker, &req);
        for (uint64_t i = 0; r == 0 && i < n && bad == UINT64_MAX; i++) {
            bad = a[i] != b[i] ? off + i : bad;
        }
        if (bad != UINT64_MAX) {
            break;
        }
    }
    free(a);
    free(b);
    if (bad != UINT64_MAX) {
        vd_error_setg(errp, EIO, "Verification failed: source and target differ at offset %llu; "
                      "not pivoting", (unsigned long long)bad);
        return -EIO;
    }
    if (r < 0 && r != -ECANCELED) {
        vd_error_setg(errp, -r, "Verification could not read: %s", strerror(-r));
    }
    return r == 0 ? mirror_flush_target(m) : r;
}
