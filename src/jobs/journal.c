/*
 * journal.c - a block job's durable progress: DIR/<id>.json (what the job is, written once by
 * rename) and DIR/<id>.map (the segment map, two checksummed slots written alternately, one
 * fdatasync per write, so a torn write leaves the previous map readable). Invariant: every bit
 * clear in `durable` is clear in what the file may hold after a crash only if the job cleared it
 * by the rules of clear_collect/clear_commit; a mark returns only once it is in `durable`.
 */
#include "jobs/journal.h"

#include <dirent.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "block/block.h"
#include "jobs/job.h"
#include "util/lock.h"
#include "util/log.h"

#define MAP_MAGIC "VDJMAP01"
#define MAP_HDR 40          /* magic 8, instance 8, seq 8, nseg 8, crc 4, pad 4 */
#define SEGMENT_MAX (64ULL << 20)

static char *state_dir;
static bool keep_all;

struct JobJournal {
    char *id, *dir, *json_path, *map_path;
    json_t *desc;
    uint64_t len, segment, nseg, nwords, instance;
    int map_fd;
    size_t slot_size;
    const char *map_lost;  /* job_journal_open: why no map was read (NULL: one was) */

    pthread_mutex_t lock;  /* everything below */
    pthread_cond_t cond;
    uint64_t *mem;         /* the state the next map write carries */
    uint64_t *durable;     /* bits set in every version the file may hold */
    uint64_t *snap;        /* the map being written */
    uint64_t *cand;        /* clear candidates (clear_collect .. clear_commit) */
    uint64_t *epoch;       /* per segment: bumped when a write or copy starts there */
    uint64_t *cand_epoch;
    uint32_t *writes_in, *copies_in; /* per segment: guest writes / copies in flight */
    bool writing;          /* one map write at a time */
    bool dead;             /* removed (job over) or failed: marks and clears are no-ops */
    uint64_t seq, nwrites;
    uint8_t *buf;          /* slot buffer (the writer's) */
};

int job_journal_set_dir(const char *dir, VdError **errp)
{
    char *abs = dir ? realpath(dir, NULL) : NULL;
    if (dir && !abs) {
        vd_error_setg_errno(errp, errno, "--state-dir '%s'", dir);
        return -EINVAL;
    }
    free(state_dir);
    state_dir = abs;
    return 0;
}

const char *job_journal_dir(void)
{
    return state_dir;
}

void job_journal_keep_all(void)
{
    __atomic_store_n(&keep_all, true, __ATOMIC_SEQ_CST);
}

bool job_journal_keeping_all(void)
{
    return __atomic_load_n(&keep_all, __ATOMIC_SEQ_CST);
}

uint64_t job_journal_segment_size(uint64_t len, uint64_t granularity)
{
    uint64_t s = SEGMENT_MAX;
    while (s > granularity && s * 100 > len) {
        s /= 2;
    }
    return s < granularity ? granularity : s;
}

/* ---- files ---- */

static int fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        return -errno;
    }
    int r = fsync(fd) < 0 ? -errno : 0;
    close(fd);
    return r;
}

static int write_all(int fd, const void *buf, size_t n, off_t off)
{
    const uint8_t *p = buf;
    while (n > 0) {
        ssize_t w = pwrite(fd, p, n, off);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w <= 0) {
            return w < 0 ? -errno : -EIO;
        }
        p += w;
        n -= (size_t)w;
        off += w;
    }
    return 0;
}

/* path.tmp written, synced, renamed over path, directory synced. */
static int write_file_atomic(const char *dir, const char *path, const char *text)
{
    char *tmp = NULL;
    if (asprintf(&tmp, "%s.tmp", path) < 0) {
        return -ENOMEM;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    int r = fd < 0 ? -errno : write_all(fd, text, strlen(text), 0);
    if (r == 0 && fsync(fd) < 0) {
        r = -errno;
    }
    if (fd >= 0 && close(fd) < 0 && r == 0) {
        r = -errno;
    }
    if (r == 0 && rename(tmp, path) < 0) {
        r = -errno;
    }
    if (r < 0) {
        unlink(tmp);
    }
    free(tmp);
    return r == 0 ? fsync_dir(dir) : r;
}

static uint32_t slot_crc(const uint8_t *slot, size_t body)
{
    uLong c = crc32(0L, Z_NULL, 0);
    c = crc32(c, slot, 32);
    return (uint32_t)crc32(c, slot + MAP_HDR, (uInt)body);
}

/* Read the newer valid slot into j->mem; false if none (then every segment stays marked). */
static bool map_load(JobJournal *j)
{
    size_t body = j->nwords * 8;
    bool found = false;
    uint64_t best = 0;
    for (int s = 0; s < 2; s++) {
        ssize_t n = pread(j->map_fd, j->buf, j->slot_size, (off_t)(s * j->slot_size));
        if (n < (ssize_t)(MAP_HDR + body) || memcmp(j->buf, MAP_MAGIC, 8)) {
            continue;
        }
        uint64_t inst, seq, nseg;
        uint32_t crc;
        memcpy(&inst, j->buf + 8, 8);
        memcpy(&seq, j->buf + 16, 8);
        memcpy(&nseg, j->buf + 24, 8);
        memcpy(&crc, j->buf + 32, 4);
        if (le64toh(inst) != j->instance || le64toh(nseg) != j->nseg ||
            le32toh(crc) != slot_crc(j->buf, body) || (found && le64toh(seq) <= best)) {
            continue;
        }
        found = true;
        best = le64toh(seq);
        for (uint64_t w = 0; w < j->nwords; w++) {
            uint64_t v;
            memcpy(&v, j->buf + MAP_HDR + w * 8, 8);
            j->mem[w] = le64toh(v);
        }
    }
    j->seq = best;
    return found;
}

/* Write snap as map version ++seq (writer only; no lock held). */
static int map_write(JobJournal *j)
{
    size_t body = j->nwords * 8;
    memset(j->buf, 0, j->slot_size);
    memcpy(j->buf, MAP_MAGIC, 8);
    uint64_t seq = ++j->seq, v;
    v = htole64(j->instance);
    memcpy(j->buf + 8, &v, 8);
    v = htole64(seq);
    memcpy(j->buf + 16, &v, 8);
    v = htole64(j->nseg);
    memcpy(j->buf + 24, &v, 8);
    for (uint64_t w = 0; w < j->nwords; w++) {
        v = htole64(j->snap[w]);
        memcpy(j->buf + MAP_HDR + w * 8, &v, 8);
    }
    uint32_t crc = htole32(slot_crc(j->buf, body));
    memcpy(j->buf + 32, &crc, 4);
    int r = write_all(j->map_fd, j->buf, j->slot_size, (off_t)((seq % 2) * j->slot_size));
    if (r == 0 && fdatasync(j->map_fd) < 0) {
        r = -errno;
    }
    j->nwrites++;
    return r;
}

static void set_all(uint64_t *words, uint64_t nwords, uint64_t nbits)
{
    memset(words, 0xff, nwords * 8);
    if (nbits % 64) {
        words[nwords - 1] = (1ULL << (nbits % 64)) - 1;
    }
}

static bool bit(const uint64_t *w, uint64_t i)
{
    return w[i / 64] & (1ULL << (i % 64));
}

static JobJournal *journal_alloc(const char *dir, const char *id, uint64_t len, uint64_t segment)
{
    JobJournal *j = calloc(1, sizeof(*j));
    if (!j) {
        return NULL;
    }
    j->map_fd = -1;
    j->len = len;
    j->segment = segment;
    j->nseg = len ? (len + segment - 1) / segment : 1;
    j->nwords = (j->nseg + 63) / 64;
    j->slot_size = (MAP_HDR + j->nwords * 8 + 4095) / 4096 * 4096;
    pthread_mutex_init(&j->lock, NULL);
    pthread_cond_init(&j->cond, NULL);
    j->id = strdup(id);
    j->dir = strdup(dir);
    if (!j->id || !j->dir || asprintf(&j->json_path, "%s/%s.json", dir, id) < 0 ||
        asprintf(&j->map_path, "%s/%s.map", dir, id) < 0) {
        j->json_path = j->map_path = NULL;
        job_journal_close(j);
        return NULL;
    }
    j->mem = calloc(j->nwords, 8);
    j->durable = calloc(j->nwords, 8);
    j->snap = calloc(j->nwords, 8);
    j->cand = calloc(j->nwords, 8);
    j->epoch = calloc(j->nseg, 8);
    j->cand_epoch = calloc(j->nseg, 8);
    j->writes_in = calloc(j->nseg, 4);
    j->copies_in = calloc(j->nseg, 4);
    j->buf = aligned_alloc(4096, j->slot_size);
    if (!j->mem || !j->durable || !j->snap || !j->cand || !j->epoch || !j->cand_epoch ||
        !j->writes_in || !j->copies_in || !j->buf) {
        job_journal_close(j);
        return NULL;
    }
    set_all(j->mem, j->nwords, j->nseg);
    set_all(j->durable, j->nwords, j->nseg);
    return j;
}

int job_journal_create(const char *dir, const char *id, json_t *desc, uint64_t len,
                       uint64_t segment, JobJournal **out, VdError **errp)
{
    *out = NULL;
    dir = dir ? dir : state_dir;
    if (!dir) {
        return 0;
    }
    JobJournal *j = journal_alloc(dir, id, len, segment);
    if (!j) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    j->instance = ((uint64_t)ts.tv_sec << 30) ^ (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 48);
    char inst[17];
    snprintf(inst, sizeof(inst), "%016llx", (unsigned long long)j->instance);
    j->desc = json_deep_copy(desc);
    int r = j->desc && !json_object_set_new(j->desc, "id", json_string(id)) &&
            !json_object_set_new(j->desc, "instance", json_string(inst)) &&
            !json_object_set_new(j->desc, "len", json_integer((json_int_t)len)) &&
            !json_object_set_new(j->desc, "segment", json_integer((json_int_t)segment))
                ? 0 : -ENOMEM;
    /* A map left by an earlier job of this id is not ours: start empty (= every bit marked). */
    j->map_fd = r ? -1 : open(j->map_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (r == 0 && (j->map_fd < 0 || fsync(j->map_fd) < 0)) {
        r = -errno;
    }
    char *text = r ? NULL : json_dumps(j->desc, JSON_SORT_KEYS | JSON_INDENT(1));
    if (r == 0 && !text) {
        r = -ENOMEM;
    }
    if (r == 0) {
        r = write_file_atomic(dir, j->json_path, text);
    }
    free(text);
    if (r < 0) {
        vd_error_setg(errp, -r, "Cannot write the job journal '%s': %s", j->json_path,
                      strerror(-r));
        if (j->map_fd >= 0) {
            unlink(j->map_path);
        }
        job_journal_close(j);
        return r;
    }
    *out = j;
    return 0;
}

JobJournal *job_journal_open(const char *json_path, VdError **errp)
{
    json_error_t je;
    json_t *desc = json_load_file(json_path, 0, &je);
    const char *id = desc ? json_string_value(json_object_get(desc, "id")) : NULL;
    const char *inst = desc ? json_string_value(json_object_get(desc, "instance")) : NULL;
    json_int_t len = desc ? json_integer_value(json_object_get(desc, "len")) : 0;
    json_int_t seg = desc ? json_integer_value(json_object_get(desc, "segment")) : 0;
    if (!desc || !id || !inst || len <= 0 || seg <= 0 || (seg & (seg - 1))) {
        vd_error_setg(errp, EINVAL, "Job journal '%s' is not readable%s%s", json_path,
                      desc ? "" : ": ", desc ? "" : je.text);
        json_decref(desc);
        return NULL;
    }
    char *dir = strdup(json_path);
    char *slash = dir ? strrchr(dir, '/') : NULL;
    if (slash) {
        *slash = 0;
    }
    JobJournal *j = dir ? journal_alloc(slash ? dir : ".", id, (uint64_t)len, (uint64_t)seg) : NULL;
    free(dir);
    if (!j) {
        json_decref(desc);
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return NULL;
    }
    j->desc = desc;
    j->instance = strtoull(inst, NULL, 16);
    j->map_fd = open(j->map_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (j->map_fd < 0) {
        vd_error_setg_errno(errp, errno, "Cannot open the job journal '%s'", j->map_path);
        job_journal_close(j);
        return NULL;
    }
    if (!map_load(j)) {
        /* The caller says whether it matters: a stream never writes its map (stream.c). */
        struct stat st;
        j->map_lost = fstat(j->map_fd, &st) == 0 && st.st_size == 0
                          ? "none was written" : "damaged, or another job's";
    }
    memcpy(j->durable, j->mem, j->nwords * 8);
    return j;
}

void job_journal_close(JobJournal *j)
{
    if (!j) {
        return;
    }
    if (j->map_fd >= 0) {
        close(j->map_fd);
    }
    json_decref(j->desc);
    free(j->id);
    free(j->dir);
    free(j->json_path);
    free(j->map_path);
    free(j->mem);
    free(j->durable);
    free(j->snap);
    free(j->cand);
    free(j->epoch);
    free(j->cand_epoch);
    free(j->writes_in);
    free(j->copies_in);
    free(j->buf);
    pthread_mutex_destroy(&j->lock);
    pthread_cond_destroy(&j->cond);
    free(j);
}

/* Delete the files (description first: without it there is no job to resume). */
static void remove_files(JobJournal *j)
{
    if (unlink(j->json_path) < 0 && errno != ENOENT) {
        vd_log(VD_LOG_ERROR, "job journal '%s': cannot delete it: %s", j->json_path,
               strerror(errno));
    }
    unlink(j->map_path);
    fsync_dir(j->dir);
}

void job_journal_remove(JobJournal *j)
{
    if (!j) {
        return;
    }
    vd_mutex_lock(&j->lock);
    while (j->writing) {
        vd_cond_wait(&j->cond, &j->lock);
    }
    j->dead = true;
    vd_cond_broadcast(&j->cond);
    vd_mutex_unlock(&j->lock);
    remove_files(j);
}

const char *job_journal_id(const JobJournal *j) { return j->id; }
json_t *job_journal_desc(const JobJournal *j) { return j->desc; }
uint64_t job_journal_len(const JobJournal *j) { return j->len; }
uint64_t job_journal_segment(const JobJournal *j) { return j->segment; }
uint64_t job_journal_nsegments(const JobJournal *j) { return j->nseg; }
const char *job_journal_map_lost(const JobJournal *j) { return j->map_lost; }

bool job_journal_marked(JobJournal *j, uint64_t i)
{
    vd_mutex_lock(&j->lock);
    bool b = i < j->nseg && bit(j->mem, i);
    vd_mutex_unlock(&j->lock);
    return b;
}

uint64_t job_journal_marked_bytes(JobJournal *j)
{
    uint64_t total = 0;
    vd_mutex_lock(&j->lock);
    for (uint64_t i = 0; i < j->nseg; i++) {
        if (bit(j->mem, i)) {
            uint64_t end = (i + 1) * j->segment;
            total += (end > j->len ? j->len : end) - i * j->segment;
        }
    }
    vd_mutex_unlock(&j->lock);
    return total;
}

uint64_t job_journal_writes(JobJournal *j)
{
    vd_mutex_lock(&j->lock);
    uint64_t n = j->nwrites;
    vd_mutex_unlock(&j->lock);
    return n;
}

/* ---- map writes: one writer at a time, later changes ride on the next write ---- */

/*
 * Write mem as it is now (lock held on entry and exit, dropped for the I/O). Bits that this write
 * clears stop counting as durable from its start: after a crash the file may hold either version.
 */
static int write_locked(JobJournal *j)
{
    j->writing = true;
    memcpy(j->snap, j->mem, j->nwords * 8);
    for (uint64_t w = 0; w < j->nwords; w++) {
        j->durable[w] &= j->snap[w];
    }
    vd_mutex_unlock(&j->lock);
    int r = map_write(j);
    vd_mutex_lock(&j->lock);
    j->writing = false;
    if (r == 0) {
        memcpy(j->durable, j->snap, j->nwords * 8);
    } else if (!j->dead) {
        /* A map we cannot write cannot promise anything: the job goes on, not resumable. */
        vd_log(VD_LOG_ERROR, "job journal '%s': cannot write the segment map (%s): the job is "
               "no longer resumable", j->map_path, strerror(-r));
        j->dead = true;
        vd_mutex_unlock(&j->lock);
        remove_files(j);
        vd_mutex_lock(&j->lock);
    }
    vd_cond_broadcast(&j->cond);
    return r;
}

static void seg_range(JobJournal *j, uint64_t off, uint64_t bytes, uint64_t *first, uint64_t *last)
{
    uint64_t end = off + (bytes ? bytes : 1);
    *first = off / j->segment;
    *last = (end - 1) / j->segment;
    *last = *last >= j->nseg ? j->nseg - 1 : *last;
    *first = *first > *last ? *last : *first;
}

static bool all_durable(JobJournal *j, uint64_t first, uint64_t last)
{
    for (uint64_t i = first; i <= last; i++) {
        if (!bit(j->durable, i)) {
            return false;
        }
    }
    return true;
}

/*
 * Count one operation into [off, off+bytes) in the per-segment counters `in` and bump the
 * segments' epochs; a guest write (mark) also marks them and returns once the marks are on disk.
 * NULL j (no journal): nothing.
 */
static void begin_op(JobJournal *j, uint32_t *in, uint64_t off, uint64_t bytes, bool mark)
{
    if (!j) {
        return;
    }
    uint64_t first, last;
    seg_range(j, off, bytes, &first, &last);
    vd_mutex_lock(&j->lock);
    for (uint64_t i = first; i <= last; i++) {
        in[i]++;
        j->epoch[i]++;
        if (mark) {
            j->mem[i / 64] |= 1ULL << (i % 64);
        }
    }
    while (mark && !j->dead && !all_durable(j, first, last)) {
        if (!j->writing) {
            write_locked(j);
        } else {
            vd_cond_wait(&j->cond, &j->lock);
        }
    }
    vd_mutex_unlock(&j->lock);
}

/* Count one in-flight operation out of [off, off+bytes) in the per-segment counters `in`. */
static void end_op(JobJournal *j, uint32_t *in, uint64_t off, uint64_t bytes)
{
    if (!j) {
        return;
    }
    uint64_t first, last;
    seg_range(j, off, bytes, &first, &last);
    vd_mutex_lock(&j->lock);
    for (uint64_t i = first; i <= last; i++) {
        in[i]--;
    }
    vd_mutex_unlock(&j->lock);
}

void job_journal_write_begin(JobJournal *j, uint64_t off, uint64_t bytes)
{
    begin_op(j, j ? j->writes_in : NULL, off, bytes, true);
}

void job_journal_write_end(JobJournal *j, uint64_t off, uint64_t bytes)
{
    end_op(j, j ? j->writes_in : NULL, off, bytes);
}

void job_journal_copy_begin(JobJournal *j, uint64_t off, uint64_t bytes)
{
    begin_op(j, j ? j->copies_in : NULL, off, bytes, false);
}

void job_journal_copy_end(JobJournal *j, uint64_t off, uint64_t bytes)
{
    end_op(j, j ? j->copies_in : NULL, off, bytes);
}

/* ---- clearing ---- */

uint64_t job_journal_clear_collect(JobJournal *j, JobJournalDirtyFn *still_dirty, void *opaque)
{
    if (!j) {
        return 0;
    }
    uint64_t n = 0;
    vd_mutex_lock(&j->lock);
    memset(j->cand, 0, j->nwords * 8);
    for (uint64_t i = 0; !j->dead && i < j->nseg; i++) {
        if (bit(j->mem, i) && j->writes_in[i] == 0 && j->copies_in[i] == 0) {
            /* The epoch first, the job's dirty state after: a write or copy starting in
             * between changes the epoch and keeps the mark. */
            j->cand[i / 64] |= 1ULL << (i % 64);
            j->cand_epoch[i] = j->epoch[i];
            n++;
        }
    }
    vd_mutex_unlock(&j->lock);
    for (uint64_t i = 0; n && i < j->nseg; i++) {
        if (bit(j->cand, i)) {
            uint64_t end = (i + 1) * j->segment;
            end = end > j->len ? j->len : end;
            if (still_dirty(opaque, i * j->segment, end - i * j->segment)) {
                j->cand[i / 64] &= ~(1ULL << (i % 64)); /* only the job thread uses cand */
                n--;
            }
        }
    }
    return n;
}

int job_journal_clear_commit(JobJournal *j)
{
    if (!j) {
        return 0;
    }
    uint64_t cleared = 0;
    vd_mutex_lock(&j->lock);
    for (uint64_t i = 0; !j->dead && i < j->nseg; i++) {
        if (bit(j->cand, i) && j->epoch[i] == j->cand_epoch[i] && j->writes_in[i] == 0 &&
            j->copies_in[i] == 0 && bit(j->mem, i)) {
            j->mem[i / 64] &= ~(1ULL << (i % 64));
            cleared++;
        }
    }
    memset(j->cand, 0, j->nwords * 8);
    int r = 0;
    if (cleared) {
        while (j->writing) {
            vd_cond_wait(&j->cond, &j->lock);
        }
        r = j->dead ? 0 : write_locked(j);
    }
    vd_mutex_unlock(&j->lock);
    return r < 0 ? r : (int)(cleared > INT32_MAX ? INT32_MAX : cleared);
}

int job_journal_resume_scan(JobJournal *j, const JobJournalScan *scan)
{
    uint64_t seg = job_journal_segment(j), unit = scan->unit, len = job_journal_len(j);
    uint8_t *a = malloc(unit), *b = malloc(unit);
    int r = a && b ? 0 : -ENOMEM;
    for (uint64_t i = 0; r == 0 && i < job_journal_nsegments(j); i++) {
        if (!job_journal_marked(j, i)) {
            continue;
        }
        uint64_t end = (i + 1) * seg > len ? len : (i + 1) * seg;
        for (uint64_t off = i * seg; r == 0 && off < end; off += unit) {
            if (job_is_cancelled(scan->job)) {
                r = -ECANCELED;
                break;
            }
            uint64_t n = end - off < unit ? end - off : unit;
            if ((r = vd_pread(scan->source, off, n, a)) < 0 ||
                (r = scan->read_dest ? scan->read_dest(scan->opaque, off, n, b)
                                     : vd_pread(scan->dest, off, n, b)) < 0) {
                break;
            }
            for (uint64_t g = 0; g < n; g += scan->granularity) {
                uint64_t gn = n - g < scan->granularity ? n - g : scan->granularity;
                if (memcmp(a + g, b + g, gn) != 0) {
                    scan->differs(scan->opaque, off + g, gn);
                }
            }
        }
    }
    free(a);
    free(b);
    return r;
}
