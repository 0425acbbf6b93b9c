/*
 * nbd-transmission.c - the transmission phase. Per connection: a reader thread parses requests (and
 * write payloads) from a receive buffer and hands them, in batches, to a shared worker pool, which
 * runs the I/O and builds each reply whole; the last request of a batch, read when nothing more is
 * buffered, the reader runs itself (batch_flush). A worker with a finished reply sends it itself,
 * non-blocking, together with whatever other workers queued meanwhile, unless another thread owns
 * the send side already (then that one sends it); what the socket does not take goes to the
 * connection's writer thread, the only one that blocks on the socket. So replies go out possibly
 * out of order, and a client that stops reading stalls only itself. Over TLS (nbd-tls.c) a record
 * cannot be sent in part without blocking, so every reply goes through the writer thread there.
 * A malformed request gets an error reply, or - when the stream cannot be resynchronised (bad magic,
 * oversize write payload) - that client alone is disconnected after its in-flight requests finish.
 * Every request is admitted against export drain (nbd_export_enter_n) and bracketed by the node's
 * range tracker, so overlapping writes serialise and reads never see half-done writes/discards.
 */
#include <errno.h>
#include <semaphore.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "nbd/nbd-protocol.h"
#include "util/log.h"
#include "util/lock.h"
#include "util/thread-cache.h"

#define NBD_MAX_QUEUED_BYTES (64u << 20) /* write payload buffered per connection before we stall */
#define NBD_ZERO_GRAIN 4096              /* granularity of OFFSET_HOLE detection in read replies */

typedef struct NbdRequest {
    NbdConn *conn;
    uint16_t flags, type;
    uint64_t cookie, offset;
    uint32_t len;
    uint8_t *data;        /* write payload */
    BlockNode *node;      /* from nbd_export_enter_n, valid until nbd_export_leave */
    BlockTracker *tracker;
    bool may_block;       /* waits for a device or the network: see the worker pool */
    struct NbdRequest *next;
} NbdRequest;

/* ---------------- worker pool ---------------- */

/*
 * The pool runs at most cpu_workers (nbd_pool_start's count) requests that keep a CPU busy
 * (page-cache I/O: more would only add context switches on a small machine; measured 4 vs 16
 * workers: 77k vs 60k 4k-read IOPS), plus requests that wait for a device or the network (O_DIRECT,
 * an NBD-client node, flushes, FUA): those do not use a CPU while they wait, so the pool wakes or
 * starts further workers for them, up to NBD_POOL_MAX_WORKERS, to keep that many in flight at the
 * device (O_DIRECT 4k reads: ~23k IOPS with 4 workers, ~32k with 16 or 64). Workers are started
 * on demand and stay until the pool stops.
 */
#define NBD_POOL_MAX_WORKERS 16

/*
 * An idle worker sleeps on its own semaphore; a submitter hands it a request directly (one futex
 * wake, and the worker starts without touching pool.lock). Requests nobody is woken for wait in
 * pool.head for the next worker that finishes.
 */
typedef struct PoolWorker {
    pthread_t thread;
    sem_t sem;
    NbdRequest *req;            /* handed over by a submitter; NULL = look at the queue */
    struct PoolWorker *next_idle;
} PoolWorker;

static struct {
    pthread_mutex_t lock;
    NbdRequest *head, *tail;  /* requests no worker was woken for */
    PoolWorker workers[NBD_POOL_MAX_WORKERS];
    PoolWorker *idle;         /* stack: the most recently idle (cache-warm) first */
    unsigned nthreads;        /* started */
    unsigned nidle;
    unsigned cpu_workers;     /* how many may run CPU-bound requests at once */
    unsigned blocking;        /* running (or handed) a request that may wait for a device/network */
    bool stop;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER};

static void handle_request(NbdRequest *req);

static void *pool_worker(void *arg)
{
    PoolWorker *w = arg;
    vd_thread_name("nbd-pool");
    vd_mutex_lock(&pool.lock);
    for (;;) {
        NbdRequest *req = pool.head;
        if (req) {
            pool.head = req->next;
            if (!pool.head) {
                pool.tail = NULL;
            }
            pool.blocking += req->may_block;
            vd_mutex_unlock(&pool.lock);
        } else if (pool.stop) {
            break;
        } else {
            w->next_idle = pool.idle;
            pool.idle = w;
            pool.nidle++;
            vd_mutex_unlock(&pool.lock);
            while (sem_wait(&w->sem) < 0 && errno == EINTR) {
            }
            /* the submitter took us off the idle stack and counted the request in blocking */
            req = w->req;
            w->req = NULL;
            if (!req) {
                vd_mutex_lock(&pool.lock); /* woken by nbd_pool_stop */
                continue;
            }
        }
        bool may_block = req->may_block;
        handle_request(req); /* frees req */
        vd_mutex_lock(&pool.lock);
        pool.blocking -= may_block;
    }
    vd_mutex_unlock(&pool.lock);
    return NULL;
}

/* pool.lock held */
static int pool_spawn_locked(void)
{
    if (pool.nthreads >= NBD_POOL_MAX_WORKERS) {
        return -EAGAIN;
    }
    PoolWorker *w = &pool.workers[pool.nthreads];
    w->req = NULL;
    if (sem_init(&w->sem, 0, 0) < 0) {
        return -errno;
    }
    int r = pthread_create(&w->thread, NULL, pool_worker, w);
    if (r != 0) {
        sem_destroy(&w->sem);
        return -r;
    }
    pool.nthreads++;
    return 0;
}

int nbd_pool_start(unsigned nthreads)
{
    if (nthreads == 0 || nthreads > NBD_POOL_MAX_WORKERS) {
        return -EINVAL;
    }
    vd_mutex_lock(&pool.lock);
    pool.stop = false;
    pool.nthreads = pool.nidle = pool.blocking = 0;
    pool.idle = NULL;
    pool.cpu_workers = nthreads;
    int r = 0;
    for (unsigned i = 0; i < nthreads && r == 0; i++) {
        r = pool_spawn_locked();
    }
    if (pool.nthreads > 0) {
        r = 0; /* fewer workers still work */
    }
    vd_mutex_unlock(&pool.lock);
    return r;
}

void nbd_pool_stop(void)
{
    vd_mutex_lock(&pool.lock);
    pool.stop = true;
    /* nobody submits any more: no worker is started after this, none goes idle again */
    while (pool.idle) {
        PoolWorker *w = pool.idle;
        pool.idle = w->next_idle;
        pool.nidle--;
        w->req = NULL;
        sem_post(&w->sem);
    }
    unsigned n = pool.nthreads;
    vd_mutex_unlock(&pool.lock);
    for (unsigned i = 0; i < n; i++) {
        pthread_join(pool.workers[i].thread, NULL);
        sem_destroy(&pool.workers[i].sem);
    }
    pool.nthreads = 0;
}

/* Hand out a list of requests (linked by next, n of them), waking the workers they need. */
static void pool_submit(NbdRequest *head, unsigned n)
{
    PoolWorker *wake[NBD_POOL_MAX_WORKERS];
    unsigned nwake = 0;
    vd_mutex_lock(&pool.lock);
    for (unsigned i = 0; i < n; i++) {
        NbdRequest *req = head;
        head = req->next;
        req->next = NULL;
        /*
         * A worker of its own unless enough are running: a running worker takes the next queued
         * request when it finishes, so CPU-bound requests beyond cpu_workers just wait their turn
         * (no extra wake-up). Requests that may block get a worker of their own, started if none
         * is idle.
         */
        unsigned running = pool.nthreads - pool.nidle;
        if (req->may_block || running - pool.blocking < pool.cpu_workers) {
            if (pool.idle) {
                PoolWorker *w = pool.idle;
                pool.idle = w->next_idle;
                pool.nidle--;
                w->req = req;
                pool.blocking += req->may_block;
                wake[nwake++] = w;
                continue;
            }
            pool_spawn_locked(); /* at the limit: a running worker takes it from the queue */
        }
        if (pool.tail) {
            pool.tail->next = req;
        } else {
            pool.head = req;
        }
        pool.tail = req;
    }
    vd_mutex_unlock(&pool.lock);
    for (unsigned i = 0; i < nwake; i++) {
        sem_post(&wake[i]->sem);
    }
}

/* ---------------- replies ---------------- */

/*
 * A complete reply (simple, or every chunk of a structured one) in one buffer. Workers build them;
 * the connection's writer thread sends them, so a client that stops reading stalls only itself.
 */
typedef struct NbdReply {
    struct NbdReply *next;
    uint64_t reserve;  /* bytes of the connection's memory budget released once sent */
    size_t off;        /* what is left to send: buf[off .. off + len) */
    size_t len;
    uint8_t *buf;      /* freed when sent */
    size_t bufsize;    /* for nbd_buf_free */
} NbdReply;

/*
 * Payload buffers (read data, write payloads) are all NBD_BUF_ALIGN aligned, so O_DIRECT needs no
 * bounce copy at any size. Up to NBD_BUF_SMALL_MAX they come from malloc. Larger ones (typically
 * 1 MiB sequential I/O) are mmap'ed in multiples of NBD_BUF_LARGE_GRAIN and, once freed, kept in a
 * small cache shared by all threads for the next request of the same size class:
 * - a fresh mmap per request would fault its pages in every time (measured: 1 MiB sequential I/O
 *   at half the rate);
 * - malloc'ed ones were kept by each thread's malloc arena (workers allocate read buffers, readers
 *   write payloads) and fragmented the heaps: 26-47 MiB peak RSS for 8 x 1 MiB in flight;
 * - unaligned ones made O_DIRECT go through the file layer's per-thread 1 MiB bounce buffers.
 * The cache holds only buffers that were in use at once before, so the daemon's footprint stays
 * at its peak of data in flight (bounded by the per-connection admission window).
 */
#define NBD_BUF_ALIGN 4096
#define NBD_BUF_SMALL_MAX (64 * 1024)
#define NBD_BUF_LARGE_GRAIN (64 * 1024)
#define NBD_BUF_CACHE_MAX (16u << 20)
#define NBD_BUF_CACHE_SLOTS 32

static struct {
    pthread_mutex_t lock;
    size_t bytes;
    unsigned n;
    struct {
        void *p;
        size_t size;
    } e[NBD_BUF_CACHE_SLOTS];
} bufcache = {.lock = PTHREAD_MUTEX_INITIALIZER};

static size_t buf_size_class(size_t len)
{
    if (len <= NBD_BUF_SMALL_MAX) {
        return len;
    }
    return (len + NBD_BUF_LARGE_GRAIN - 1) / NBD_BUF_LARGE_GRAIN * NBD_BUF_LARGE_GRAIN;
}

/* An aligned buffer of at least len bytes; free it with nbd_buf_free(p, len) (the same len). */
static void *nbd_buf_alloc(size_t len)
{
    size_t size = buf_size_class(len);
    if (size <= NBD_BUF_SMALL_MAX) {
        void *p = NULL;
        return posix_memalign(&p, NBD_BUF_ALIGN, len ? len : 1) == 0 ? p : NULL;
    }
    vd_mutex_lock(&bufcache.lock);
    for (unsigned i = bufcache.n; i-- > 0;) { /* the most recently freed first: its pages are warm */
        if (bufcache.e[i].size == size) {
            void *p = bufcache.e[i].p;
            bufcache.e[i] = bufcache.e[--bufcache.n];
            bufcache.bytes -= size;
            vd_mutex_unlock(&bufcache.lock);
            return p;
        }
    }
    vd_mutex_unlock(&bufcache.lock);
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

/* Free a buffer: len as given to nbd_buf_alloc, or 0 for one from plain malloc. */
static void nbd_buf_free(void *p, size_t len)
{
    size_t size = buf_size_class(len);
    if (!p || size <= NBD_BUF_SMALL_MAX) {
        free(p);
        return;
    }
    vd_mutex_lock(&bufcache.lock);
    if (bufcache.n < NBD_BUF_CACHE_SLOTS && bufcache.bytes + size <= NBD_BUF_CACHE_MAX) {
        bufcache.e[bufcache.n].p = p;
        bufcache.e[bufcache.n].size = size;
        bufcache.n++;
        bufcache.bytes += size;
        p = NULL;
    }
    vd_mutex_unlock(&bufcache.lock);
    if (p) {
        munmap(p, size);
    }
}

static void put_simple(uint8_t *p, uint64_t cookie, uint32_t err)
{
    nbd_put32(p, NBD_SIMPLE_REPLY_MAGIC);
    nbd_put32(p + 4, err);
    nbd_put64(p + 8, cookie);
}

/* Build a structured error chunk, or a simple error reply, into a new buffer. */
static uint8_t *build_error(NbdConn *c, uint64_t cookie, uint32_t err, const char *msg,
                            bool chunk, size_t *len)
{
    size_t ml = chunk && msg ? strlen(msg) : 0;
    *len = chunk ? NBD_CHUNK_HEADER_SIZE + 6 + ml : NBD_SIMPLE_REPLY_SIZE;
    uint8_t *b = malloc(*len);
    if (!b) {
        return NULL;
    }
    if (chunk) {
        nbd_put_chunk(b, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, (uint32_t)(6 + ml));
        nbd_put32(b + NBD_CHUNK_HEADER_SIZE, err);
        nbd_put16(b + NBD_CHUNK_HEADER_SIZE + 4, (uint16_t)ml);
        memcpy(b + NBD_CHUNK_HEADER_SIZE + 6, msg, ml);
    } else {
        put_simple(b, cookie, err);
    }
    return b;
}

static bool all_zero(const uint8_t *p, size_t n)
{
    return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

/* Room needed to turn len bytes of data into structured chunks (headers included). */
static size_t structured_read_cap(size_t len)
{
    return len + (len / NBD_ZERO_GRAIN + 2) * (NBD_CHUNK_HEADER_SIZE + 12);
}

/*
 * In place: buf (cap bytes) holds the data in its last len bytes; rewrite it from the front as
 * OFFSET_DATA / OFFSET_HOLE chunks (zero runs aligned to NBD_ZERO_GRAIN become holes). The output
 * never overtakes the input: at most one header per grain, and cap leaves room for all of them.
 */
static size_t build_read_chunks(uint8_t *buf, size_t cap, uint64_t cookie, uint64_t off,
                                size_t len)
{
    const uint8_t *src = buf + cap - len;
    size_t out = 0, pos = 0;
    if (len == 0) {
        nbd_put_chunk(buf, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0);
        return NBD_CHUNK_HEADER_SIZE;
    }
    while (pos < len) {
        size_t end = pos;
        bool zero = false, first = true;
        while (end < len) {
            size_t next = (size_t)(((off + end) / NBD_ZERO_GRAIN + 1) * NBD_ZERO_GRAIN - off);
            if (next > len) {
                next = len;
            }
            bool z = (next - end == NBD_ZERO_GRAIN) && all_zero(src + end, next - end);
            if (first) {
                zero = z;
                first = false;
            } else if (z != zero) {
                break;
            }
            end = next;
        }
        uint16_t flags = end == len ? NBD_REPLY_FLAG_DONE : 0;
        if (zero) {
            nbd_put_chunk(buf + out, cookie, flags, NBD_REPLY_TYPE_OFFSET_HOLE, 12);
            nbd_put64(buf + out + NBD_CHUNK_HEADER_SIZE, off + pos);
            nbd_put32(buf + out + NBD_CHUNK_HEADER_SIZE + 8, (uint32_t)(end - pos));
            out += NBD_CHUNK_HEADER_SIZE + 12;
        } else {
            nbd_put_chunk(buf + out, cookie, flags, NBD_REPLY_TYPE_OFFSET_DATA,
                      (uint32_t)(8 + end - pos));
            nbd_put64(buf + out + NBD_CHUNK_HEADER_SIZE, off + pos);
            out += NBD_CHUNK_HEADER_SIZE + 8;
            memmove(buf + out, src + pos, end - pos);
            out += end - pos;
        }
        pos = end;
    }
    return out;
}

/* Account a reply as finished (sent or dropped). c->lock held. */
static void reply_done(NbdConn *c, uint64_t reserve)
{
    c->in_flight--;
    c->queued_bytes -= reserve;
    vd_cond_broadcast(&c->cond);
}

/* A send failed: stop serving this client. c->lock held. */
static void conn_fail(NbdConn *c)
{
    if (!c->dead) {
        c->dead = true;
        shutdown(c->fd, SHUT_RDWR); /* wakes the reader; later replies are dropped */
    }
}

/*
 * Send as much of buf as the socket takes now, never blocking (invariant 4: a client that stops
 * reading must not stall a pool worker). Returns bytes sent (< len when the socket is full) or
 * -errno.
 */
static ssize_t send_nonblocking(int fd, const uint8_t *buf, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = send(fd, buf + done, len - done, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                break;
            }
            return -errno;
        }
        done += (size_t)n;
    }
    return (ssize_t)done;
}

/*
 * Replies a worker sends itself before handing the send side to the writer thread: bounds how long
 * a worker that owns the socket keeps sending other workers' replies instead of taking requests.
 */
#define NBD_DIRECT_SEND_MAX 16

/*
 * Hand a finished reply, buf[off .. off + len) (buf may be NULL on ENOMEM: then the client is
 * dropped), to the client.
 * The reply is appended to the connection's queue. If nobody owns the send side, this worker takes
 * it and sends the queue itself, non-blocking (no wake-up, no context switch), including replies
 * other workers append meanwhile (they find the send side owned and just return); if somebody owns
 * it, the owner will send this reply too. Whatever the socket does not take at once stays at the
 * head of the queue (it is mid-stream) and the writer thread takes over with blocking sends, so a
 * worker never blocks on a client.
 */
static void queue_reply(NbdConn *c, uint8_t *buf, size_t bufsize, size_t off, size_t len,
                        uint64_t reserve)
{
    NbdReply *r = buf ? malloc(sizeof(*r)) : NULL;
    vd_mutex_lock(&c->lock);
    if (!r) {
        /* Cannot reply and the client would wait for ever: disconnect it instead. */
        nbd_buf_free(buf, bufsize);
        c->dead = true;
        reply_done(c, reserve);
        vd_mutex_unlock(&c->lock);
        shutdown(c->fd, SHUT_RDWR);
        return;
    }
    r->next = NULL;
    r->buf = buf;
    r->bufsize = bufsize;
    r->off = off;
    r->len = len;
    r->reserve = reserve;
    if (c->dead) {
        nbd_buf_free(buf, bufsize);
        free(r);
        reply_done(c, reserve);
        vd_mutex_unlock(&c->lock);
        return;
    }
    if (c->rq_tail) {
        c->rq_tail->next = r;
    } else {
        c->rq_head = r;
    }
    c->rq_tail = r;
    if (c->sending) {
        vd_mutex_unlock(&c->lock); /* the owner of the send side sends it */
        return;
    }
    if (c->tls) {
        /* A TLS record cannot be sent in part without blocking: the writer sends it. */
        vd_cond_signal(&c->wcond);
        vd_mutex_unlock(&c->lock);
        return;
    }
    c->sending = true;
    for (unsigned sent = 0;; sent++) {
        r = c->rq_head;
        if (!r) {
            c->sending = false;
            break;
        }
        if (sent == NBD_DIRECT_SEND_MAX || c->dead) {
            /* hand the rest to the writer (it also drops them if the connection is dead) */
            c->sending = false;
            vd_cond_signal(&c->wcond);
            break;
        }
        c->rq_head = r->next;
        if (!c->rq_head) {
            c->rq_tail = NULL;
        }
        vd_mutex_unlock(&c->lock);
        vd_mutex_lock(&c->send_lock);
        ssize_t n = send_nonblocking(c->fd, r->buf + r->off, r->len);
        vd_mutex_unlock(&c->send_lock);
        vd_mutex_lock(&c->lock);
        if (n >= 0 && (size_t)n < r->len) {
            /* the socket is full: the rest of this reply goes out first, by the writer */
            r->off += (size_t)n;
            r->len -= (size_t)n;
            r->next = c->rq_head;
            c->rq_head = r;
            if (!c->rq_tail) {
                c->rq_tail = r;
            }
            c->sending = false;
            vd_cond_signal(&c->wcond);
            break;
        }
        if (n < 0) {
            conn_fail(c);
        }
        nbd_buf_free(r->buf, r->bufsize);
        reply_done(c, r->reserve);
        free(r);
    }
    vd_mutex_unlock(&c->lock);
}

/*
 * The connection's writer thread: sends, with blocking sends, the replies a worker could not send
 * without blocking, in queue order. It owns the send side while it sends.
 */
static void writer_thread(void *arg)
{
    NbdConn *c = arg;
    vd_thread_name("nbd-writer fd%d", c->fd);
    vd_mutex_lock(&c->lock);
    for (;;) {
        /* a worker sending directly owns the socket and sends what is queued */
        while ((!c->rq_head || c->sending) && !c->writer_exit) {
            vd_cond_wait(&c->wcond, &c->lock);
        }
        if (c->sending) {
            break; /* writer_exit: nothing is in flight, so nobody can be sending */
        }
        NbdReply *r = c->rq_head;
        if (!r) {
            break;
        }
        c->rq_head = r->next;
        if (!c->rq_head) {
            c->rq_tail = NULL;
        }
        bool dead = c->dead;
        c->sending = true;
        vd_mutex_unlock(&c->lock);

        int ret = 0;
        if (!dead) {
            vd_mutex_lock(&c->send_lock);
            ret = nbd_conn_write(c, r->buf + r->off, r->len);
            vd_mutex_unlock(&c->send_lock);
        }
        nbd_buf_free(r->buf, r->bufsize);

        vd_mutex_lock(&c->lock);
        c->sending = false;
        if (ret < 0) {
            conn_fail(c);
        }
        reply_done(c, r->reserve);
        free(r);
    }
    c->writer_done = true; /* the last touch of c: the reader frees it once it sees this */
    vd_cond_broadcast(&c->cond);
    vd_mutex_unlock(&c->lock);
}

/* ---------------- request handling ---------------- */

static uint32_t errno_to_nbd(int err)
{
    switch (err) {
    case 0:
        return 0;
    case EPERM:
    case EROFS:
        return NBD_EPERM;
    case ENOMEM:
        return NBD_ENOMEM;
    case EINVAL:
        return NBD_EINVAL;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
        return NBD_ENOSPC;
    case EOVERFLOW:
        return NBD_EOVERFLOW;
    case ENOTSUP:
        return NBD_ENOTSUP;
    case ESHUTDOWN:
        return NBD_ESHUTDOWN;
    default:
        return NBD_EIO;
    }
}

static bool is_write_cmd(uint16_t t)
{
    return t == NBD_CMD_WRITE || t == NBD_CMD_TRIM || t == NBD_CMD_WRITE_ZEROES;
}

/* Validate a request against the connection and the export; 0 or an NBD error. */
static uint32_t validate(NbdRequest *req, int64_t size)
{
    NbdConn *c = req->conn;
    uint16_t known = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_DF |
                     NBD_CMD_FLAG_REQ_ONE | NBD_CMD_FLAG_FAST_ZERO;
    if (req->flags & ~known) {
        return NBD_EINVAL;
    }
    switch (req->type) {
    case NBD_CMD_READ:
    case NBD_CMD_WRITE:
    case NBD_CMD_CACHE:
    case NBD_CMD_TRIM:
    case NBD_CMD_WRITE_ZEROES:
    case NBD_CMD_BLOCK_STATUS:
    case NBD_CMD_FLUSH:
        break;
    default:
        return NBD_EINVAL;
    }
    if ((req->flags & NBD_CMD_FLAG_FAST_ZERO) && req->type != NBD_CMD_WRITE_ZEROES) {
        return NBD_EINVAL;
    }
    if (is_write_cmd(req->type) && (c->tflags & NBD_FLAG_READ_ONLY)) {
        return NBD_EPERM;
    }
    if (req->type == NBD_CMD_READ && req->len > NBD_MAX_PAYLOAD) {
        return NBD_EINVAL;
    }
    if (req->type == NBD_CMD_BLOCK_STATUS && (!nbd_meta_any(c) || req->len == 0)) {
        return NBD_EINVAL;
    }
    if (req->type == NBD_CMD_FLUSH) {
        return 0;
    }
    if (size < 0) {
        return NBD_EIO;
    }
    if (req->offset > (uint64_t)size || req->len > (uint64_t)size - req->offset) {
        return is_write_cmd(req->type) ? NBD_ENOSPC : NBD_EINVAL;
    }
    return 0;
}

/* Bytes of the connection's memory budget a request holds until its reply is sent. */
static uint64_t request_reserve(const NbdRequest *req)
{
    if (req->type == NBD_CMD_WRITE || (req->type == NBD_CMD_READ && req->len <= NBD_MAX_PAYLOAD)) {
        return req->len;
    }
    return 0;
}

static void handle_request(NbdRequest *req)
{
    NbdConn *c = req->conn;
    NbdExport *exp = c->exp;
    uint8_t *rbuf = NULL; /* the reply being built */
    size_t rbuf_size = 0; /* as allocated by nbd_buf_alloc; 0 = plain malloc */
    size_t rbuf_off = 0;  /* it starts here in rbuf */
    size_t rlen = 0;
    int err = 0;
    uint32_t nerr = validate(req, vd_getlength(req->node));
    bool do_io = nerr == 0 && (req->len > 0 || req->type == NBD_CMD_FLUSH);
    bool chunked = c->structured && req->type == NBD_CMD_READ;
    BtRequest tr;
    bool fua = req->flags & NBD_CMD_FLAG_FUA;

    switch (do_io ? req->type : 0xffff) {
    case NBD_CMD_READ: {
        /*
         * Read straight into the reply buffer, behind the room its headers need, rounded up so
         * the data starts aligned (O_DIRECT then reads into it without a bounce buffer).
         */
        size_t room = chunked ? structured_read_cap(req->len) - req->len : NBD_SIMPLE_REPLY_SIZE;
        room = (room + NBD_BUF_ALIGN - 1) / NBD_BUF_ALIGN * NBD_BUF_ALIGN;
        size_t cap = room + req->len;
        rbuf = nbd_buf_alloc(cap);
        rbuf_size = cap;
        if (!rbuf) {
            err = -ENOMEM;
            break;
        }
        block_tracker_begin(req->tracker, &tr, req->offset, req->len, BT_SHARED);
        err = vd_pread(req->node, req->offset, req->len, rbuf + room);
        block_tracker_end(req->tracker, &tr);
        if (err == 0 && chunked) {
            rlen = build_read_chunks(rbuf, cap, req->cookie, req->offset, req->len);
        } else if (err == 0) {
            /* the header right before the data, sent from there (rbuf_off) */
            rbuf_off = room - NBD_SIMPLE_REPLY_SIZE;
            put_simple(rbuf + rbuf_off, req->cookie, 0);
            rlen = NBD_SIMPLE_REPLY_SIZE + req->len;
        }
        break;
    }
    case NBD_CMD_WRITE:
        block_tracker_begin(req->tracker, &tr, req->offset, req->len, BT_EXCLUSIVE);
        err = vd_pwrite(req->node, req->offset, req->len, req->data, 0);
        block_tracker_end(req->tracker, &tr);
        break;
    case NBD_CMD_TRIM:
        block_tracker_begin(req->tracker, &tr, req->offset, req->len, BT_EXCLUSIVE);
        err = vd_pdiscard(req->node, req->offset, req->len, 0);
        block_tracker_end(req->tracker, &tr);
        break;
    case NBD_CMD_WRITE_ZEROES: {
        int f = (req->flags & NBD_CMD_FLAG_NO_HOLE) ? 0 : VD_REQ_MAY_UNMAP;
        if (req->flags & NBD_CMD_FLAG_FAST_ZERO) {
            f |= VD_REQ_NO_FALLBACK;
        }
        block_tracker_begin(req->tracker, &tr, req->offset, req->len, BT_EXCLUSIVE);
        err = vd_pwrite_zeroes(req->node, req->offset, req->len, f);
        block_tracker_end(req->tracker, &tr);
        if (err == -EOPNOTSUPP) {
            err = -ENOTSUP; /* FAST_ZERO could not be fast: the client falls back */
        }
        break;
    }
    case NBD_CMD_FLUSH:
        err = vd_flush(req->node);
        break;
    case NBD_CMD_CACHE:
        break; /* advisory; the host page cache does the work */
    case NBD_CMD_BLOCK_STATUS:
        block_tracker_begin(req->tracker, &tr, req->offset, req->len, BT_SHARED);
        err = nbd_meta_block_status(c, req->node, req->cookie, req->offset, req->len,
                                    req->flags & NBD_CMD_FLAG_REQ_ONE, &rbuf, &rlen);
        block_tracker_end(req->tracker, &tr);
        break;
    default:
        break;
    }
    /*
     * FUA as a flush of the whole node after the write: correct for every format (a qcow2
     * allocating write also needs its metadata durable), and what VD_REQ_FUA costs anyway.
     */
    if (do_io && err == 0 && fua && is_write_cmd(req->type)) {
        err = vd_flush(req->node);
    }
    /* The node is no longer used: let a drain proceed before the reply goes out. */
    nbd_export_leave(exp);
    nbd_buf_free(req->data, req->len);
    req->data = NULL;

    const char *msg = NULL;
    if (err) {
        nerr = errno_to_nbd(-err);
        msg = strerror(-err);
    } else if (nerr) {
        msg = nerr == NBD_EPERM    ? "export is read-only"
              : nerr == NBD_ENOSPC ? "request beyond the end of the export"
                                   : "invalid request";
    }
    if (nerr) {
        nbd_buf_free(rbuf, rbuf_size);
        rbuf_size = 0;
        rbuf_off = 0;
        rbuf = build_error(c, req->cookie, nerr, msg, chunked, &rlen);
    } else if (!rbuf) {
        /* success without payload (also zero-length reads: no data follows) */
        if (chunked) {
            rbuf = malloc(NBD_CHUNK_HEADER_SIZE);
            if (rbuf) {
                nbd_put_chunk(rbuf, req->cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0);
            }
            rlen = NBD_CHUNK_HEADER_SIZE;
        } else {
            rbuf = malloc(NBD_SIMPLE_REPLY_SIZE);
            if (rbuf) {
                put_simple(rbuf, req->cookie, 0);
            }
            rlen = NBD_SIMPLE_REPLY_SIZE;
        }
    }
    queue_reply(c, rbuf, rbuf_size, rbuf_off, rlen, request_reserve(req));
    free(req);
}

/* ---------------- reader loop ---------------- */

/* Does I/O on this node wait for a device or the network (O_DIRECT, an NBD client) below it? */
static bool node_may_block(const BlockNode *n)
{
    for (; n; n = n->file) {
        if ((n->open_flags & VD_OPEN_DIRECT) || n->drv->may_block) {
            return true;
        }
    }
    return false;
}

/*
 * The reader's receive buffer: one recv takes every request the client has sent so far (and
 * small write payloads), instead of one recv per header and one per payload; large payloads are
 * read straight into their own buffer.
 */
#define NBD_RBUF_SIZE (64 * 1024)
#define NBD_SUBMIT_BATCH 16 /* requests parsed from the buffer before they are handed out */

typedef struct {
    uint8_t *buf;
    size_t start, end;
} RecvBuf;

static size_t rbuf_avail(const RecvBuf *b)
{
    return b->end - b->start;
}

/* Have at least n (<= NBD_RBUF_SIZE) bytes buffered; blocks. 0, -errno or -EPIPE at EOF. */
static int rbuf_need(NbdConn *c, RecvBuf *b, size_t n)
{
    if (rbuf_avail(b) >= n) {
        return 0;
    }
    if (b->start > 0) {
        memmove(b->buf, b->buf + b->start, rbuf_avail(b));
        b->end -= b->start;
        b->start = 0;
    }
    while (b->end < n) {
        ssize_t r = nbd_conn_recv(c, b->buf + b->end, NBD_RBUF_SIZE - b->end);
        if (r < 0) {
            return (int)r;
        }
        if (r == 0) {
            return -EPIPE;
        }
        b->end += (size_t)r;
    }
    return 0;
}

/* Read len bytes: what is buffered first, the rest straight from the socket. */
static int rbuf_read(NbdConn *c, RecvBuf *b, uint8_t *dst, size_t len)
{
    size_t have = rbuf_avail(b) < len ? rbuf_avail(b) : len;
    memcpy(dst, b->buf + b->start, have);
    b->start += have;
    return have < len ? nbd_conn_read(c, dst + have, len - have) : 0;
}

typedef struct {
    NbdRequest *head, *tail;
    unsigned n;
    uint64_t reserve;
} ReqBatch;

/*
 * Admit the parsed requests and hand them to the pool. Called before the reader can block (on the
 * socket, on back-pressure), so a parsed request never waits for the next one to arrive, and a
 * drain never waits for requests the reader holds (they are not counted in_flight until here;
 * nbd_export_enter_n may wait for a drain to end).
 * serve_last: the reader has nothing more buffered and would next wait for the client, so it
 * serves the batch's last request itself, unless that one may wait for a device or the network,
 * instead of waking a worker for it and going to sleep (two thread switches saved per request;
 * QEMU's server runs the request in the coroutine that read it). A lone request - the usual case
 * for a client with one request in flight, and often at queue depth 16 on a loaded host - so never
 * leaves the reader. The request goes through exactly what a worker would do (admitted above,
 * the tracker, the node's write hooks, its reply through queue_reply), so drains, a job's export
 * swap and FLUSH see no difference; only reading the next requests waits until it is done.
 */
static void batch_flush(NbdConn *c, ReqBatch *b, bool serve_last)
{
    if (b->n == 0) {
        return;
    }
    vd_mutex_lock(&c->lock);
    c->in_flight += b->n;
    c->queued_bytes += b->reserve;
    vd_mutex_unlock(&c->lock);
    /* all at once: a drain must not start between two of them (it would wait for the first) */
    BlockNode *node;
    BlockTracker *tracker;
    nbd_export_enter_n(c->exp, b->n, &node, &tracker);
    bool slow = node_may_block(node);
    for (NbdRequest *req = b->head; req; req = req->next) {
        req->node = node;
        req->tracker = tracker;
        req->may_block = slow || req->type == NBD_CMD_FLUSH || (req->flags & NBD_CMD_FLAG_FUA);
    }
    NbdRequest *mine = serve_last && !b->tail->may_block ? b->tail : NULL;
    if (mine && b->n > 1) {
        NbdRequest *prev = b->head;
        while (prev->next != mine) {
            prev = prev->next;
        }
        prev->next = NULL;
    }
    if (b->n > (mine ? 1u : 0u)) {
        pool_submit(b->head, b->n - (mine ? 1 : 0));
    }
    b->head = b->tail = NULL;
    b->n = 0;
    b->reserve = 0;
    if (mine) {
        handle_request(mine); /* frees it */
    }
}

void nbd_transmission(NbdConn *c)
{
    RecvBuf rb = {.buf = malloc(NBD_RBUF_SIZE)};
    if (!rb.buf) {
        return;
    }
    if (vd_thread_run(writer_thread, c) < 0) {
        free(rb.buf);
        return; /* cannot serve: the caller closes the connection */
    }
    ReqBatch batch = {0};
    for (;;) {
        /* Back-pressure: stop reading while this client has too much outstanding. */
        vd_mutex_lock(&c->lock);
        bool full = c->in_flight + batch.n >= NBD_MAX_INFLIGHT_PER_CONN ||
                    c->queued_bytes + batch.reserve >= NBD_MAX_QUEUED_BYTES;
        vd_mutex_unlock(&c->lock);
        bool drained = rbuf_avail(&rb) < NBD_REQUEST_SIZE;
        if (full || batch.n >= NBD_SUBMIT_BATCH || drained) {
            batch_flush(c, &batch, drained && !full);
        }
        vd_mutex_lock(&c->lock);
        while ((c->in_flight >= NBD_MAX_INFLIGHT_PER_CONN ||
                c->queued_bytes >= NBD_MAX_QUEUED_BYTES) && !c->dead) {
            vd_cond_wait(&c->cond, &c->lock);
        }
        bool dead = c->dead;
        vd_mutex_unlock(&c->lock);
        if (dead) {
            break;
        }

        if (rbuf_need(c, &rb, NBD_REQUEST_SIZE) < 0) {
            break;
        }
        const uint8_t *h = rb.buf + rb.start;
        if (nbd_get32(h) != NBD_REQUEST_MAGIC) {
            vd_log(VD_LOG_INFO, "nbd: bad request magic 0x%08x, dropping client", nbd_get32(h));
            break; /* cannot find the next request: drop this client */
        }
        NbdRequest *req = calloc(1, sizeof(*req));
        if (!req) {
            break;
        }
        req->conn = c;
        req->flags = nbd_get16(h + 4);
        req->type = nbd_get16(h + 6);
        req->cookie = nbd_get64(h + 8);
        req->offset = nbd_get64(h + 16);
        req->len = nbd_get32(h + 24);
        rb.start += NBD_REQUEST_SIZE;
        if (req->type == NBD_CMD_DISC) {
            free(req);
            break;
        }
        if (req->type == NBD_CMD_WRITE) {
            if (req->len > NBD_MAX_PAYLOAD) {
                vd_log(VD_LOG_INFO, "nbd: write of %u bytes exceeds the 32 MiB limit, dropping client",
                       req->len);
                free(req);
                break; /* we will not buffer it and cannot skip it safely: disconnect */
            }
            if (req->len) {
                if (rbuf_avail(&rb) < req->len) {
                    batch_flush(c, &batch, false); /* the rest of the payload may take a while */
                }
                req->data = nbd_buf_alloc(req->len); /* O_DIRECT-ready */
                if (!req->data || rbuf_read(c, &rb, req->data, req->len) < 0) {
                    nbd_buf_free(req->data, req->len);
                    free(req);
                    break;
                }
            }
        }
        req->next = NULL;
        if (batch.tail) {
            batch.tail->next = req;
        } else {
            batch.head = req;
        }
        batch.tail = req;
        batch.n++;
        batch.reserve += request_reserve(req);
    }
    batch_flush(c, &batch, false); /* requests read before a disconnect are still answered */
    free(rb.buf);
    /* Let every request already handed out finish and reply before the socket closes. */
    vd_mutex_lock(&c->lock);
    while (c->in_flight > 0) {
        vd_cond_wait(&c->cond, &c->lock);
    }
    c->writer_exit = true;
    vd_cond_signal(&c->wcond);
    while (!c->writer_done) {
        vd_cond_wait(&c->cond, &c->lock);
    }
    vd_mutex_unlock(&c->lock);
}
