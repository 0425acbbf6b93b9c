/*
 * nbd-transmission.c - the transmission phase. Per connection: a reader thread parses requests (and
 * write payloads) and hands them to a small shared worker pool, which runs the I/O and builds each
 * reply whole; the connection's writer thread sends replies (under its send lock), possibly out of
 * order, except that a worker whose reply finds the queue empty and nobody sending sends it itself,
 * non-blocking, and queues the rest. Workers never block on a socket, so a client that stops
 * reading stalls only itself.
 * A malformed request gets an error reply, or - when the stream cannot be resynchronised (bad magic,
 * oversize write payload) - that client alone is disconnected after its in-flight requests finish.
 * Every request is admitted against export drain (nbd_export_enter) and bracketed by the node's
 * range tracker, so overlapping writes serialise and reads never see half-done writes/discards.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "nbd/nbd-protocol.h"
#include "util/log.h"

#define NBD_MAX_QUEUED_BYTES (64u << 20) /* write payload buffered per connection before we stall */
#define NBD_ZERO_GRAIN 4096              /* granularity of OFFSET_HOLE detection in read replies */

typedef struct NbdRequest {
    NbdConn *conn;
    uint16_t flags, type;
    uint64_t cookie, offset;
    uint32_t len;
    uint8_t *data;        /* write payload */
    BlockNode *node;      /* from nbd_export_enter, valid until nbd_export_leave */
    BlockTracker *tracker;
    struct NbdRequest *next;
} NbdRequest;

/* ---------------- worker pool ---------------- */

static struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    NbdRequest *head, *tail;
    pthread_t *threads;
    unsigned nthreads;
    bool stop;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER};

static void handle_request(NbdRequest *req);

static void *pool_worker(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        while (!pool.head && !pool.stop) {
            pthread_cond_wait(&pool.cond, &pool.lock);
        }
        if (!pool.head) {
            break; /* stop requested and queue empty */
        }
        NbdRequest *req = pool.head;
        pool.head = req->next;
        if (!pool.head) {
            pool.tail = NULL;
        }
        pthread_mutex_unlock(&pool.lock);
        handle_request(req);
        pthread_mutex_lock(&pool.lock);
    }
    pthread_mutex_unlock(&pool.lock);
    return NULL;
}

int nbd_pool_start(unsigned nthreads)
{
    pool.threads = calloc(nthreads, sizeof(*pool.threads));
    if (!pool.threads) {
        return -ENOMEM;
    }
    pool.stop = false;
    pool.nthreads = 0;
    for (unsigned i = 0; i < nthreads; i++) {
        int r = pthread_create(&pool.threads[i], NULL, pool_worker, NULL);
        if (r != 0) {
            if (i == 0) {
                free(pool.threads);
                pool.threads = NULL;
                return -r;
            }
            break; /* fewer workers still work */
        }
        pool.nthreads++;
    }
    return 0;
}

void nbd_pool_stop(void)
{
    pthread_mutex_lock(&pool.lock);
    pool.stop = true;
    pthread_cond_broadcast(&pool.cond);
    pthread_mutex_unlock(&pool.lock);
    for (unsigned i = 0; i < pool.nthreads; i++) {
        pthread_join(pool.threads[i], NULL);
    }
    free(pool.threads);
    pool.threads = NULL;
    pool.nthreads = 0;
}

static void pool_submit(NbdRequest *req)
{
    pthread_mutex_lock(&pool.lock);
    req->next = NULL;
    if (pool.tail) {
        pool.tail->next = req;
    } else {
        pool.head = req;
    }
    pool.tail = req;
    pthread_cond_signal(&pool.cond);
    pthread_mutex_unlock(&pool.lock);
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
} NbdReply;

/*
 * Payload buffers up to NBD_BUF_ALIGN_MAX are aligned like this, so O_DIRECT reads/writes of
 * small requests need no bounce buffer. Larger ones use plain malloc: glibc serves big aligned
 * allocations with a fresh mmap each time (measured: 1 MiB sequential I/O at half the rate, from
 * page faults), while malloc's dynamic mmap threshold reuses heap memory; for those the file
 * layer's per-thread bounce copy costs far less.
 */
#define NBD_BUF_ALIGN 4096
#define NBD_BUF_ALIGN_MAX (64 * 1024)

static void *aligned_alloc_buf(size_t len)
{
    if (len > NBD_BUF_ALIGN_MAX) {
        return malloc(len);
    }
    void *p = NULL;
    return posix_memalign(&p, NBD_BUF_ALIGN, len ? len : 1) == 0 ? p : NULL;
}

static void put_simple(uint8_t *p, uint64_t cookie, uint32_t err)
{
    nbd_put32(p, NBD_SIMPLE_REPLY_MAGIC);
    nbd_put32(p + 4, err);
    nbd_put64(p + 8, cookie);
}

static void put_chunk(uint8_t *p, uint64_t cookie, uint16_t flags, uint16_t type, uint32_t len)
{
    nbd_put32(p, NBD_STRUCTURED_REPLY_MAGIC);
    nbd_put16(p + 4, flags);
    nbd_put16(p + 6, type);
    nbd_put64(p + 8, cookie);
    nbd_put32(p + 16, len);
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
        put_chunk(b, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, (uint32_t)(6 + ml));
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
        put_chunk(buf, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0);
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
            put_chunk(buf + out, cookie, flags, NBD_REPLY_TYPE_OFFSET_HOLE, 12);
            nbd_put64(buf + out + NBD_CHUNK_HEADER_SIZE, off + pos);
            nbd_put32(buf + out + NBD_CHUNK_HEADER_SIZE + 8, (uint32_t)(end - pos));
            out += NBD_CHUNK_HEADER_SIZE + 12;
        } else {
            put_chunk(buf + out, cookie, flags, NBD_REPLY_TYPE_OFFSET_DATA,
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
    pthread_cond_broadcast(&c->cond);
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
 * Hand a finished reply, buf[off .. off + len) (buf may be NULL on ENOMEM: then the client is
 * dropped), to the client.
 * When nothing is queued and nobody is sending, the worker sends it itself, non-blocking (saves
 * a wake-up and a context switch per reply); whatever the socket does not take at once is queued
 * (at the head: it is mid-stream) for the writer thread, so the worker never blocks on a client.
 */
static void queue_reply(NbdConn *c, uint8_t *buf, size_t off, size_t len, uint64_t reserve)
{
    NbdReply *r = buf ? malloc(sizeof(*r)) : NULL;
    pthread_mutex_lock(&c->lock);
    if (!r) {
        /* Cannot reply and the client would wait for ever: disconnect it instead. */
        free(buf);
        c->dead = true;
        reply_done(c, reserve);
        pthread_mutex_unlock(&c->lock);
        shutdown(c->fd, SHUT_RDWR);
        return;
    }
    r->next = NULL;
    r->buf = buf;
    r->off = off;
    r->len = len;
    r->reserve = reserve;
    if (c->dead) {
        free(buf);
        free(r);
        reply_done(c, reserve);
        pthread_mutex_unlock(&c->lock);
        return;
    }
    if (!c->rq_head && !c->sending) {
        c->sending = true;
        pthread_mutex_unlock(&c->lock);
        pthread_mutex_lock(&c->send_lock);
        ssize_t n = send_nonblocking(c->fd, buf + off, len);
        pthread_mutex_unlock(&c->send_lock);
        pthread_mutex_lock(&c->lock);
        c->sending = false;
        if (n < 0 || (size_t)n == len) {
            if (n < 0) {
                conn_fail(c);
            }
            free(buf);
            free(r);
            reply_done(c, reserve);
            if (c->rq_head) {
                pthread_cond_signal(&c->wcond); /* queued while we were sending */
            }
            pthread_mutex_unlock(&c->lock);
            return;
        }
        r->off = off + (size_t)n;
        r->len = len - (size_t)n;
        r->next = c->rq_head; /* the rest of this reply goes out before any other */
        c->rq_head = r;
        if (!c->rq_tail) {
            c->rq_tail = r;
        }
        pthread_cond_signal(&c->wcond);
        pthread_mutex_unlock(&c->lock);
        return;
    }
    if (c->rq_tail) {
        c->rq_tail->next = r;
    } else {
        c->rq_head = r;
    }
    c->rq_tail = r;
    pthread_cond_signal(&c->wcond);
    pthread_mutex_unlock(&c->lock);
}

/* The connection's writer thread: sends queued replies in queue order. */
static void *writer_thread(void *arg)
{
    NbdConn *c = arg;
    pthread_mutex_lock(&c->lock);
    for (;;) {
        /* a worker sending directly owns the socket until it has queued its remainder */
        while ((!c->rq_head || c->sending) && !c->writer_exit) {
            pthread_cond_wait(&c->wcond, &c->lock);
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
        pthread_mutex_unlock(&c->lock);

        int ret = 0;
        if (!dead) {
            pthread_mutex_lock(&c->send_lock);
            ret = nbd_write_full(c->fd, r->buf + r->off, r->len);
            pthread_mutex_unlock(&c->send_lock);
        }
        free(r->buf);

        pthread_mutex_lock(&c->lock);
        c->sending = false;
        if (ret < 0) {
            conn_fail(c);
        }
        reply_done(c, r->reserve);
        free(r);
    }
    pthread_mutex_unlock(&c->lock);
    return NULL;
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

static uint32_t bs_to_nbd(int bs)
{
    /* Like qemu-nbd: a range without data reads from nowhere (hole); ZERO says it reads zero. */
    return (bs & VD_BS_DATA ? 0 : NBD_STATE_HOLE) | (bs & VD_BS_ZERO ? NBD_STATE_ZERO : 0);
}

/* Collect base:allocation extents; returns count or -errno. desc holds (len, flags) pairs. */
static int collect_extents(NbdRequest *req, uint8_t *desc)
{
    uint64_t pos = req->offset, end = req->offset + req->len;
    int n = 0;
    uint32_t cur_len = 0, cur_flags = 0;
    while (pos < end) {
        uint64_t pnum = 0;
        VdBlockStatus st = {0};
        int r = vd_block_status_above(req->node, NULL, pos, end - pos, &pnum, &st);
        if (r < 0) {
            return r;
        }
        if (pnum == 0) {
            return -EIO; /* a driver that makes no progress must not loop us for ever */
        }
        if (pnum > end - pos) {
            pnum = end - pos;
        }
        uint32_t f = bs_to_nbd(st.flags);
        if (n > 0 && f == cur_flags) {
            cur_len += (uint32_t)pnum; /* total <= req->len < 2^32 */
        } else {
            if (n > 0) {
                nbd_put32(desc + 8 * (n - 1), cur_len);
                nbd_put32(desc + 8 * (n - 1) + 4, cur_flags);
                if ((req->flags & NBD_CMD_FLAG_REQ_ONE) || n == NBD_MAX_EXTENTS) {
                    return n;
                }
            }
            n++;
            cur_len = (uint32_t)pnum;
            cur_flags = f;
        }
        pos += pnum;
    }
    nbd_put32(desc + 8 * (n - 1), cur_len);
    nbd_put32(desc + 8 * (n - 1) + 4, cur_flags);
    return n;
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
    if (req->type == NBD_CMD_BLOCK_STATUS && (!c->meta_base_alloc || req->len == 0)) {
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
        rbuf = aligned_alloc_buf(cap);
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
    case NBD_CMD_BLOCK_STATUS: {
        size_t hdr = NBD_CHUNK_HEADER_SIZE + 4;
        rbuf = malloc(hdr + 8 * NBD_MAX_EXTENTS);
        if (!rbuf) {
            err = -ENOMEM;
            break;
        }
        block_tracker_begin(req->tracker, &tr, req->offset, req->len, BT_SHARED);
        int n = collect_extents(req, rbuf + hdr);
        block_tracker_end(req->tracker, &tr);
        if (n < 0) {
            err = n;
            break;
        }
        rlen = hdr + 8 * (size_t)n;
        put_chunk(rbuf, req->cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
                  (uint32_t)(rlen - NBD_CHUNK_HEADER_SIZE));
        nbd_put32(rbuf + NBD_CHUNK_HEADER_SIZE, NBD_META_ID_BASE_ALLOCATION);
        break;
    }
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
    free(req->data);
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
        free(rbuf);
        rbuf_off = 0;
        rbuf = build_error(c, req->cookie, nerr, msg, chunked, &rlen);
    } else if (!rbuf) {
        /* success without payload (also zero-length reads: no data follows) */
        if (chunked) {
            rbuf = malloc(NBD_CHUNK_HEADER_SIZE);
            if (rbuf) {
                put_chunk(rbuf, req->cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0);
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
    queue_reply(c, rbuf, rbuf_off, rlen, request_reserve(req));
    free(req);
}

/* ---------------- reader loop ---------------- */

void nbd_transmission(NbdConn *c)
{
    if (pthread_create(&c->writer, NULL, writer_thread, c) != 0) {
        return; /* cannot serve: the caller closes the connection */
    }
    for (;;) {
        /* Back-pressure: stop reading while this client has too much outstanding. */
        pthread_mutex_lock(&c->lock);
        while ((c->in_flight >= NBD_MAX_INFLIGHT_PER_CONN ||
                c->queued_bytes >= NBD_MAX_QUEUED_BYTES) && !c->dead) {
            pthread_cond_wait(&c->cond, &c->lock);
        }
        bool dead = c->dead;
        pthread_mutex_unlock(&c->lock);
        if (dead) {
            break;
        }

        uint8_t h[NBD_REQUEST_SIZE];
        if (nbd_read_full(c->fd, h, sizeof(h)) < 0) {
            break;
        }
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
                req->data = aligned_alloc_buf(req->len); /* O_DIRECT-ready */
                if (!req->data || nbd_read_full(c->fd, req->data, req->len) < 0) {
                    free(req->data);
                    free(req);
                    break;
                }
            }
        }
        pthread_mutex_lock(&c->lock);
        c->in_flight++;
        c->queued_bytes += request_reserve(req);
        pthread_mutex_unlock(&c->lock);
        nbd_export_enter(c->exp, &req->node, &req->tracker);
        pool_submit(req);
    }
    /* Let every request already handed out finish and reply before the socket closes. */
    pthread_mutex_lock(&c->lock);
    while (c->in_flight > 0) {
        pthread_cond_wait(&c->cond, &c->lock);
    }
    c->writer_exit = true;
    pthread_cond_signal(&c->wcond);
    pthread_mutex_unlock(&c->lock);
    pthread_join(c->writer, NULL);
}
