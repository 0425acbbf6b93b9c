/*
 * nbd.c - the "nbd" client protocol (vd_drv_nbd): a protocol node on an NBD server's export,
 * spoken through libnbd (never a hand-written client).
 *
 * Promises: every byte moves through libnbd; requests larger than the server's maximum block size
 * (or 32 MiB) are split, and requests not aligned to its minimum block size are widened with a
 * read-modify-write, so any byte range works on any server. Reads past the export's end return
 * zeroes (formats read partial last clusters); writes past it fail -ENOSPC (an export cannot
 * grow). A read-only export makes a read-only node (-EPERM).
 * Threads: libnbd's synchronous calls hold the handle for the whole round trip (one command in
 * flight per handle), which over a link with latency caps throughput at one request per round
 * trip. So commands go through libnbd's aio calls: each connection has a pump thread that owns the
 * socket's readiness (poll + nbd_aio_notify_*); a caller submits, kicks the pump and sleeps until
 * its completion callback ran. Concurrent callers (copy workers, NBD server threads) and the
 * pieces of one split request are all in flight together. When the server advertises multi-conn
 * (its cache, if any, is shared by all connections, so flush/FUA on one covers all) and the socket
 * is local (not TCP: conn_is_tcp), up to NBD_MAX_CONNS connections are opened and requests spread
 * over them round robin. Unaligned writes
 * take rmw_lock exclusively (aligned ones shared), so a read-modify-write never writes stale bytes
 * back over a concurrent write.
 * A lost link (the connection closes or resets, or nothing moves on the socket for the stall
 * timeout while commands are outstanding) never hangs a caller and never returns wrong data: the
 * pump drops the connection (its commands fail) and reconnects in the background; commands that
 * failed on the link wait for the new connection up to reconnect-delay after the loss and are sent
 * again (all NBD commands are idempotent), else fail with EIO (QEMU's reconnect-delay semantics).
 * Lock order: NbdConn.hlock (shared by submitters, exclusive for the pump's handle swap), libnbd's
 * handle lock, then NbdConn.lock (a leaf).
 */
#include <errno.h>
#include <jansson.h>
#include <libnbd.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "block/block.h"
#include "protocols/nbd.h"
#include "util/log.h"
#include "util/lock.h"
#include "util/thread-cache.h"
#include "util/tls-creds.h"

#define NBD_MAX_CONNS 4
/* Largest read/write payload per command when the server does not say (the spec's safe size). */
#define NBD_IO_MAX (32U << 20)
/* Largest zero/trim/block-status length per command (no payload; the wire field is 32 bits). */
#define NBD_CMD_MAX (1U << 30)
/* Extra multi-conn connections must be up within this, or the node makes do with fewer. */
#define NBD_EXTRA_CONNECT_MS 2000
/* Commands one caller has in flight at once (the pieces of one split request). */
#define NBD_BATCH 16
/* Default stall timeout (x-stall-timeout): commands outstanding and the socket silent this long. */
#define NBD_STALL_DEFAULT_S 60
/* One reconnection attempt (connect + handshake) gives up after this; the pump then retries. */
#define NBD_RECONNECT_TRY_MS 2000
/* Pause between failed reconnection attempts grows up to this. */
#define NBD_RECONNECT_PAUSE_MAX_MS 1000
/* A command is sent again at most this often after link losses, then fails. */
#define NBD_MAX_RESENDS 16

typedef struct NbdState NbdState;

/* One connection: the handle and the thread that moves its socket (and replaces it when lost). */
typedef struct NbdConn {
    NbdState *s;
    struct nbd_handle *h;     /* NULL while the link is down; changed only by the pump, under hlock */
    pthread_rwlock_t hlock;   /* shared: a submitter calling libnbd on h; exclusive: swapping h */
    int wake_fd;              /* eventfd: a submission may have changed the socket's direction */
    bool pump_started;
    bool stop;                /* atomic: the pump exits */
    pthread_t pump;
    pthread_mutex_t lock;     /* guards NbdReq.done/err of this connection's commands, up, down_ms */
    pthread_cond_t cond;      /* a command completed, or the link came back (CLOCK_MONOTONIC) */
    bool up;                  /* h is a live connection (written under lock, atomically) */
    int64_t down_ms;          /* when the link was lost (!up) */
    unsigned long epoch;      /* connections made after losses: which one a command went on */
    bool killing;             /* the pump reset this connection for a stall (until link_lost) */
    int64_t killed_ms;        /* when */
    bool wrong_export;        /* the last reconnection reached a server with another export */
} NbdConn;

typedef enum { OP_READ, OP_WRITE, OP_ZERO, OP_TRIM, OP_FLUSH, OP_STATUS } NbdOp;

/* One command and its outcome, filled in by its completion callback (or a failed submission). */
typedef struct NbdReq {
    NbdConn *c;
    NbdOp op;
    uint64_t off, len;
    uint8_t *buf;
    uint32_t flags;
    nbd_extent_callback *ext;
    int err;                  /* errno, 0 = success */
    bool done;
    int64_t fence_until;      /* failed on a stall kill: the server may still hold it this long */
} NbdReq;

/* A range the server may still write: a write of a connection reset for a stall (fence_add). */
typedef struct NbdFence {
    uint64_t off, len;
    int64_t until_ms;
} NbdFence;

#define NBD_MAX_FENCES 32

/*
 * What must not change when the connection is made again (conn_identity): a server that answers
 * differently is serving another export (or the same one configured otherwise).
 */
typedef struct NbdIdentity {
    int64_t size;
    unsigned flags;           /* NBD_ID_*: libnbd's can_... and is_... answers */
    int64_t block_min, block_pref, block_max;
    char *name;               /* canonical export name (NBD_INFO_NAME), or what we asked for */
    char *descr;              /* NBD_INFO_DESCRIPTION, NULL if the server offers none */
} NbdIdentity;

struct NbdState {
    NbdConn conn[NBD_MAX_CONNS];
    int nconns;
    unsigned next;            /* round-robin cursor (atomic) */
    uint64_t size;            /* export size, fixed for the node's life */
    uint32_t align;           /* server's minimum block size (power of two), 1 = byte granular */
    uint32_t max_io;          /* largest read/write payload, a multiple of align */
    bool read_only;           /* the export is read-only, or the node was opened read-only */
    bool export_read_only;    /* the server said so (a reconnection must say the same) */
    bool can_flush, can_fua, can_trim, can_zero, can_fast_zero, has_base_alloc, multi_conn;
    bool lock_init;
    pthread_rwlock_t rmw_lock; /* only used when align > 1, see header comment */
    VdTlsCreds *tls;          /* NBD over TLS with these credentials (ref held), or NULL */
    char *uri;                /* libnbd's URI (vdisk's own query parameters removed) */
    int64_t reconnect_ms;     /* reconnect-delay: how long commands wait for a lost link */
    int64_t open_timeout_ms;  /* open-timeout: first connection retried this long (0: once) */
    int64_t stall_ms;         /* x-stall-timeout: a silent link with commands outstanding; 0 off */
    char *tcp_cc;             /* x-tcp-congestion: the connections' TCP congestion control */
    NbdIdentity id;           /* the export as the first connection saw it */
    BlockNode *bs;            /* the node (its name for events) */
    pthread_mutex_t fence_lock; /* guards fences (nfences also read atomically, unlocked) */
    NbdFence fences[NBD_MAX_FENCES];
    int nfences;
};

static NbdState *ns_of(BlockNode *bs)
{
    return bs->opaque;
}

/* Round robin over the connections, passing over those whose link is down (if any is up). */
static NbdConn *conn_pick(NbdState *s)
{
    if (s->nconns == 1) {
        return &s->conn[0];
    }
    unsigned i = __atomic_fetch_add(&s->next, 1, __ATOMIC_RELAXED);
    for (unsigned k = 0; k < (unsigned)s->nconns; k++) {
        NbdConn *c = &s->conn[(i + k) % (unsigned)s->nconns];
        if (__atomic_load_n(&c->up, __ATOMIC_RELAXED)) {
            return c;
        }
    }
    return &s->conn[i % (unsigned)s->nconns];
}

/* -errno for a command's errno e (server errors arrive as errno values). */
static int errno_ret(int e)
{
    /*
     * A lost connection is an I/O error for our callers (as in QEMU). Passing ESHUTDOWN on would
     * be wrong once re-exported: NBD_ESHUTDOWN tells a client that *that* server is going away.
     */
    if (e <= 0 || e == ESHUTDOWN || e == ENOTCONN || e == EPIPE || e == ECONNRESET ||
        e == ECONNABORTED) {
        return -EIO;
    }
    return -e;
}

/* -errno of the last failed libnbd call on this thread. */
static int nbd_ret(void)
{
    return errno_ret(nbd_get_errno());
}

/* libnbd's message without its "nbd_connect_uri: " style function prefix. */
static const char *nbd_msg(void)
{
    const char *m = nbd_get_error();
    if (!m) {
        return "unknown error";
    }
    if (!strncmp(m, "nbd_", 4)) {
        const char *c = strstr(m, ": ");
        if (c) {
            return c + 2;
        }
    }
    return m;
}

/* ---- URIs ---- */

static bool uri_unreserved(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '-' || c == '.' || c == '_' || c == '~';
}

/* Append s percent-encoded (keep_slash: '/' stays literal, for socket paths). */
static char *pct_append(char *out, const char *s, bool keep_slash)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (uri_unreserved(*p) || (keep_slash && *p == '/')) {
            *out++ = (char)*p;
        } else {
            out += sprintf(out, "%%%02X", *p);
        }
    }
    *out = '\0';
    return out;
}

char *vd_nbd_make_uri(const char *host, const char *port, const char *unix_path,
                      const char *export_name)
{
    bool has_host = host && *host;
    bool has_unix = unix_path && *unix_path;
    if (has_host == has_unix) {
        errno = EINVAL;
        return NULL;
    }
    if (!export_name) {
        export_name = "";
    }
    if (!port || !*port) {
        port = VD_NBD_DEFAULT_PORT;
    }
    for (const char *p = port; *p; p++) {
        if (*p < '0' || *p > '9') {
            errno = EINVAL;
            return NULL;
        }
    }
    /* Worst case every byte becomes %XX. */
    size_t cap = 64 + 3 * strlen(export_name) + (has_host ? 3 * strlen(host) + strlen(port)
                                                          : 3 * strlen(unix_path));
    char *uri = malloc(cap);
    if (!uri) {
        errno = ENOMEM;
        return NULL;
    }
    char *o = uri;
    if (has_host) {
        bool v6 = strchr(host, ':') != NULL && host[0] != '[';
        o += sprintf(o, "nbd://%s", v6 ? "[" : "");
        if (v6) {
            o += sprintf(o, "%s]", host); /* an IPv6 literal: hex digits and colons */
        } else {
            o = pct_append(o, host, false);
        }
        o += sprintf(o, ":%s/", port);
        o = pct_append(o, export_name, false);
    } else {
        o += sprintf(o, "nbd+unix:///");
        o = pct_append(o, export_name, false);
        o += sprintf(o, "?socket=");
        o = pct_append(o, unix_path, true);
    }
    return uri;
}

/* ---- connecting ---- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * One connection to uri with base:allocation requested. timeout_ms < 0 blocks (the first
 * connection: the user waits for the server as qemu-img does); otherwise gives up after it.
 */
/*
 * TLS required, with the credentials of a tls-creds object (QEMU's layout: x509 dir with
 * ca-cert.pem and client-{cert,key}.pem, or dir/keys.psk and a user name). -1 = libnbd error.
 */
static int conn_set_tls(struct nbd_handle *h, const VdTlsCreds *tls)
{
    if (nbd_set_tls(h, LIBNBD_TLS_REQUIRE) == -1) {
        return -1;
    }
    if (!vd_tls_creds_is_psk(tls)) {
        if (nbd_set_tls_certificates(h, vd_tls_creds_dir(tls)) == -1) {
            return -1;
        }
        return nbd_set_tls_verify_peer(h, vd_tls_creds_verify_peer(tls));
    }
    char *psk = NULL;
    if (asprintf(&psk, "%s/keys.psk", vd_tls_creds_dir(tls)) < 0) {
        errno = ENOMEM;
        return -1;
    }
    int r = nbd_set_tls_psk_file(h, psk);
    free(psk);
    return r == -1 ? -1 : nbd_set_tls_username(h, vd_tls_creds_username(tls));
}

static struct nbd_handle *conn_open_uri(const char *uri, const VdTlsCreds *tls, int timeout_ms,
                                        int *perr, VdError **errp)
{
    struct nbd_handle *h = nbd_create();
    if (!h) {
        *perr = ENOMEM;
        vd_error_setg(errp, ENOMEM, "Could not open '%s': %s", uri, nbd_msg());
        return NULL;
    }
    /* full info: the export's name and description too, part of its identity (identity_of). */
    if (nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1 ||
        nbd_set_full_info(h, true) == -1 || (tls && conn_set_tls(h, tls) == -1)) {
        goto fail;
    }
    if (timeout_ms < 0) {
        if (nbd_connect_uri(h, uri) == -1) {
            goto fail;
        }
        return h;
    }
    if (nbd_aio_connect_uri(h, uri) == -1) {
        goto fail;
    }
    int64_t deadline = now_ms() + timeout_ms;
    while (nbd_aio_is_connecting(h)) {
        int64_t left = deadline - now_ms();
        if (left <= 0) {
            *perr = ETIMEDOUT;
            vd_error_setg(errp, ETIMEDOUT, "Could not open '%s': the server did not complete "
                          "the connection and handshake within %d ms", uri, timeout_ms);
            nbd_close(h);
            return NULL;
        }
        if (nbd_poll(h, (int)left) == -1) {
            goto fail;
        }
    }
    if (!nbd_aio_is_ready(h)) {
        *perr = EIO;
        vd_error_setg(errp, EIO, "Could not open '%s': the handshake did not complete", uri);
        nbd_close(h);
        return NULL;
    }
    return h;

fail:;
    int err = nbd_get_errno();
    *perr = err > 0 ? err : EIO;
    vd_error_setg(errp, *perr, "Could not open '%s': %s", uri, nbd_msg());
    nbd_close(h);
    return NULL;
}

/*
 * x-tcp-congestion: this connection's TCP congestion control (TCP_CONGESTION on its socket
 * only; the host's default stays). -1 with *perr set when the kernel refuses the name.
 */
static int conn_set_congestion(NbdState *s, struct nbd_handle *h, int *perr, VdError **errp)
{
    int fd = nbd_aio_get_fd(h);
    if (fd < 0 || setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, s->tcp_cc,
                             (socklen_t)strlen(s->tcp_cc)) < 0) {
        int e = fd < 0 ? EIO : errno;
        *perr = e;
        vd_error_setg(errp, e, "Could not open '%s': x-tcp-congestion=%s: %s%s", s->uri,
                      s->tcp_cc, strerror(e), e == EOPNOTSUPP ? " (not a TCP connection)"
                      : e == EPERM ? " (not in net.ipv4.tcp_allowed_congestion_control, "
                      "and no CAP_NET_ADMIN)" : "");
        return -1;
    }
    return 0;
}

/*
 * Whether h's socket is TCP. Extra multi-conn connections are opened only over a local socket
 * (unix, vsock): since commands go through the aio pump, one connection already carries every
 * request in flight, and over TCP more connections are only more flows sharing the same link,
 * each probing for its share. Across a 1 Gbit/s tbf link (+5 ms) a mirror reached 94 MiB/s
 * with one connection and 84 MiB/s with four (medians, one ahead in 4 pairs of 4); QEMU's
 * client uses one.
 */
static bool conn_is_tcp(struct nbd_handle *h)
{
    int fd = nbd_aio_get_fd(h);
    int dom = 0;
    socklen_t len = sizeof(dom);
    return fd >= 0 && getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &dom, &len) == 0 &&
           (dom == AF_INET || dom == AF_INET6);
}

/* One connection of node s (its URI, TLS and socket options), see conn_open_uri. */
static struct nbd_handle *conn_open(NbdState *s, int timeout_ms, int *perr, VdError **errp)
{
    struct nbd_handle *h = conn_open_uri(s->uri, s->tls, timeout_ms, perr, errp);
    if (h && s->tcp_cc && conn_set_congestion(s, h, perr, errp) < 0) {
        nbd_close(h);
        return NULL;
    }
    return h;
}

static void conn_close(struct nbd_handle *h)
{
    if (h) {
        /* A clean NBD_CMD_DISC, so servers do not log an aborted client. */
        nbd_shutdown(h, 0);
        nbd_close(h);
    }
}

/* ---- the pump: one thread per connection moves its socket ---- */

static void pump_kick(NbdConn *c)
{
    uint64_t one = 1;
    /* A full counter (EAGAIN) has a wake-up pending already. */
    if (write(c->wake_fd, &one, sizeof(one)) < 0) {
        return;
    }
}

static bool pump_stopping(NbdConn *c)
{
    return __atomic_load_n(&c->stop, __ATOMIC_ACQUIRE);
}

/* An absolute CLOCK_MONOTONIC deadline ms from now (the clock NbdConn.cond waits on). */
static struct timespec deadline_in(int64_t ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (ms % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    return ts;
}

/* Sleep up to ms, or until the node closes (the wake-up eventfd). */
static void pump_pause(NbdConn *c, int64_t ms)
{
    struct pollfd p = {.fd = c->wake_fd, .events = POLLIN};
    if (poll(&p, 1, (int)ms) > 0) {
        uint64_t n;
        if (read(c->wake_fd, &n, sizeof(n)) < 0) {
            n = 0;
        }
    }
}

/*
 * A link that stays silent with commands outstanding: make the socket fail, so libnbd retires
 * them with an error and the pump reconnects. SO_LINGER 0: when libnbd closes the socket the
 * kernel resets the connection and drops what it still had queued, so no write of this
 * connection can reach the server later, after its retry on the next connection.
 */
static void conn_kill(NbdConn *c, int fd)
{
    struct linger l = {.l_onoff = 1, .l_linger = 0};
    (void)setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
    (void)shutdown(fd, SHUT_RDWR);
}

/* The connection died: close it (its commands have all failed) and mark the link down. */
static void link_lost(NbdConn *c)
{
    vd_rwlock_wrlock(&c->hlock); /* no submitter is inside libnbd on it any more */
    struct nbd_handle *old = c->h;
    c->h = NULL;
    vd_rwlock_unlock(&c->hlock);
    if (old) {
        nbd_close(old);
    }
    vd_mutex_lock(&c->lock);
    __atomic_store_n(&c->up, false, __ATOMIC_RELAXED); /* also read unlocked by conn_pick */
    c->killing = false; /* every command of the old handle has completed by now */
    c->down_ms = now_ms();
    vd_cond_broadcast(&c->cond);
    vd_mutex_unlock(&c->lock);
    vd_log(VD_LOG_WARN, "nbd: lost the connection to '%s'; reconnecting (commands wait %lld ms)",
           c->s->uri, (long long)c->s->reconnect_ms);
}

static struct nbd_handle *conn_open(NbdState *s, int timeout_ms, int *perr, VdError **errp);
static void conn_close(struct nbd_handle *h);

enum {
    NBD_ID_READ_ONLY = 1 << 0, NBD_ID_FLUSH = 1 << 1, NBD_ID_FUA = 1 << 2,
    NBD_ID_ROTATIONAL = 1 << 3, NBD_ID_TRIM = 1 << 4, NBD_ID_ZERO = 1 << 5,
    NBD_ID_FAST_ZERO = 1 << 6, NBD_ID_DF = 1 << 7, NBD_ID_MULTI_CONN = 1 << 8,
    NBD_ID_CACHE = 1 << 9, NBD_ID_BASE_ALLOC = 1 << 10,
};

static const struct {
    unsigned bit;
    const char *what;
    int (*get)(struct nbd_handle *h);
} nbd_id_flags[] = {
    {NBD_ID_READ_ONLY, "read-only", nbd_is_read_only},
    {NBD_ID_FLUSH, "flush", nbd_can_flush},
    {NBD_ID_FUA, "FUA", nbd_can_fua},
    {NBD_ID_ROTATIONAL, "rotational", nbd_is_rotational},
    {NBD_ID_TRIM, "trim", nbd_can_trim},
    {NBD_ID_ZERO, "write zeroes", nbd_can_zero},
    {NBD_ID_FAST_ZERO, "fast zero", nbd_can_fast_zero},
    {NBD_ID_DF, "structured replies (DF)", nbd_can_df},
    {NBD_ID_MULTI_CONN, "multi-conn", nbd_can_multi_conn},
    {NBD_ID_CACHE, "cache", nbd_can_cache},
};

static void identity_free(NbdIdentity *id)
{
    free(id->name);
    free(id->descr);
    id->name = id->descr = NULL;
}

/* Everything a connected h says about its export that must not change on a reconnection. */
static void identity_of(struct nbd_handle *h, NbdIdentity *id)
{
    id->size = nbd_get_size(h);
    id->flags = 0;
    for (size_t i = 0; i < sizeof(nbd_id_flags) / sizeof(nbd_id_flags[0]); i++) {
        id->flags |= nbd_id_flags[i].get(h) == 1 ? nbd_id_flags[i].bit : 0;
    }
    if (nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1) {
        id->flags |= NBD_ID_BASE_ALLOC;
    }
    id->block_min = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
    id->block_pref = nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED);
    id->block_max = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
    id->name = nbd_get_canonical_export_name(h);
    id->descr = nbd_get_export_description(h);
}

static bool str_differ(const char *a, const char *b)
{
    return (a == NULL) != (b == NULL) || (a && strcmp(a, b));
}

/* What differs between the export a and b (a static description), NULL if nothing. */
static const char *identity_diff(const NbdIdentity *a, const NbdIdentity *b)
{
    if (a->size != b->size) {
        return "size";
    }
    for (size_t i = 0; i < sizeof(nbd_id_flags) / sizeof(nbd_id_flags[0]); i++) {
        if ((a->flags ^ b->flags) & nbd_id_flags[i].bit) {
            return nbd_id_flags[i].what;
        }
    }
    if ((a->flags ^ b->flags) & NBD_ID_BASE_ALLOC) {
        return "meta context base:allocation";
    }
    if (a->block_min != b->block_min || a->block_pref != b->block_pref ||
        a->block_max != b->block_max) {
        return "block sizes";
    }
    if (str_differ(a->name, b->name)) {
        return "export name";
    }
    if (str_differ(a->descr, b->descr)) {
        return "export description";
    }
    return NULL;
}

/* A new connection must serve the same export: NULL if it does, else what differs. */
static const char *conn_other_export(NbdState *s, struct nbd_handle *h)
{
    NbdIdentity now;
    identity_of(h, &now);
    const char *d = identity_diff(&s->id, &now);
    identity_free(&now);
    return d;
}

static VdNbdEventSink *event_sink; /* vd_nbd_set_event_sink */

void vd_nbd_set_event_sink(VdNbdEventSink *fn)
{
    __atomic_store_n(&event_sink, fn, __ATOMIC_RELEASE);
}

static void nbd_event(const char *name, json_t *data)
{
    VdNbdEventSink *fn = __atomic_load_n(&event_sink, __ATOMIC_ACQUIRE);
    if (fn && data) {
        fn(name, data);
    } else {
        json_decref(data);
    }
}

/* Connect again until it works or the node closes; attempts are spaced out, never given up. */
static void link_restore(NbdConn *c)
{
    NbdState *s = c->s;
    int64_t pause = 50;
    while (!pump_stopping(c)) {
        int err = 0;
        VdError *local = NULL;
        struct nbd_handle *h = conn_open(s, NBD_RECONNECT_TRY_MS, &err, &local);
        vd_error_free(local);
        const char *other = h ? conn_other_export(s, h) : NULL;
        if (h && !other) {
            vd_rwlock_wrlock(&c->hlock);
            c->h = h;
            vd_rwlock_unlock(&c->hlock);
            vd_mutex_lock(&c->lock);
            __atomic_store_n(&c->up, true, __ATOMIC_RELAXED);
            c->epoch++;
            c->wrong_export = false;
            vd_cond_broadcast(&c->cond);
            vd_mutex_unlock(&c->lock);
            vd_log(VD_LOG_WARN, "nbd: reconnected to '%s'", s->uri);
            return;
        }
        if (other) {
            /* Not the export the node was opened on: its commands fail now, none is sent. */
            vd_mutex_lock(&c->lock);
            bool first = !c->wrong_export;
            c->wrong_export = true;
            vd_cond_broadcast(&c->cond);
            vd_mutex_unlock(&c->lock);
            if (first) {
                vd_log(VD_LOG_ERROR, "nbd: the server now at '%s' serves a different export "
                       "(its %s changed): I/O fails until the original export answers again",
                       s->uri, other);
                nbd_event("X_NBD_EXPORT_CHANGED",
                          json_pack("{s:s,s:s,s:s}", "node-name",
                                    s->bs->node_name ? s->bs->node_name : "", "uri", s->uri,
                                    "changed", other));
            }
        }
        conn_close(h);
        pump_pause(c, pause);
        pause = pause * 2 > NBD_RECONNECT_PAUSE_MAX_MS ? NBD_RECONNECT_PAUSE_MAX_MS : pause * 2;
    }
}

/*
 * Wait until the socket can move the way libnbd wants (or a submission kicked us), then let
 * libnbd read or write. A connection that died (libnbd has failed its commands) or stalled is
 * replaced; only the pump changes c->h, so it reads it without the lock.
 */
static void *pump_main(void *opaque)
{
    NbdConn *c = opaque;
    vd_thread_name("nbd-pump");
    int64_t stall_ms = c->s->stall_ms;
    int64_t moved = now_ms();
    while (!pump_stopping(c)) {
        if (!c->h || nbd_aio_is_dead(c->h) == 1 || nbd_aio_is_closed(c->h) == 1) {
            link_lost(c);
            link_restore(c);
            moved = now_ms();
            continue;
        }
        int fd = nbd_aio_get_fd(c->h);
        unsigned dir = fd >= 0 ? nbd_aio_get_direction(c->h) : 0;
        struct pollfd p[2] = {{.fd = c->wake_fd, .events = POLLIN}, {.fd = -1}};
        if (fd >= 0 && dir) {
            p[1].fd = fd;
            p[1].events = (short)(((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                                  ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0));
        }
        int wait_ms = stall_ms ? (stall_ms < 1000 ? (int)stall_ms : 1000) : -1;
        int n = poll(p, 2, wait_ms);
        if (n < 0) {
            continue; /* EINTR */
        }
        if (p[0].revents & POLLIN) {
            uint64_t v;
            if (read(c->wake_fd, &v, sizeof(v)) < 0) {
                v = 0; /* another read drained it */
            }
        }
        short ev = p[1].revents;
        if ((ev & (POLLIN | POLLHUP | POLLERR)) && (dir & LIBNBD_AIO_DIRECTION_READ)) {
            nbd_aio_notify_read(c->h);
            moved = now_ms();
        } else if ((ev & (POLLOUT | POLLHUP | POLLERR)) && (dir & LIBNBD_AIO_DIRECTION_WRITE)) {
            nbd_aio_notify_write(c->h);
            moved = now_ms();
        } else if (nbd_aio_in_flight(c->h) <= 0) {
            moved = now_ms(); /* an idle link is not a stalled one */
        } else if (stall_ms && fd >= 0 && now_ms() - moved >= stall_ms) {
            vd_log(VD_LOG_WARN, "nbd: no progress on '%s' for %lld ms with commands outstanding",
                   c->s->uri, (long long)stall_ms);
            vd_mutex_lock(&c->lock);
            c->killing = true; /* its failing writes are fenced (req_done_cb) */
            c->killed_ms = now_ms();
            vd_mutex_unlock(&c->lock);
            conn_kill(c, fd);
            moved = now_ms();
        }
    }
    return NULL;
}

/* Take over a connected handle: start its pump. On failure the handle is closed. */
static int conn_start(NbdState *s, NbdConn *c, struct nbd_handle *h)
{
    memset(c, 0, sizeof(*c));
    c->s = s;
    c->h = h;
    c->up = true;
    c->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->wake_fd < 0) {
        conn_close(h);
        c->h = NULL;
        return -errno;
    }
    pthread_condattr_t ca;
    int r = pthread_condattr_init(&ca);
    if (r == 0) {
        r = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        if (r == 0 && (r = pthread_cond_init(&c->cond, &ca)) == 0) {
            if ((r = pthread_mutex_init(&c->lock, NULL)) != 0) {
                pthread_cond_destroy(&c->cond);
            } else if ((r = pthread_rwlock_init(&c->hlock, NULL)) != 0) {
                pthread_mutex_destroy(&c->lock);
                pthread_cond_destroy(&c->cond);
            }
        }
        pthread_condattr_destroy(&ca);
    }
    if (r == 0 && (r = pthread_create(&c->pump, NULL, pump_main, c)) != 0) {
        pthread_rwlock_destroy(&c->hlock);
        pthread_mutex_destroy(&c->lock);
        pthread_cond_destroy(&c->cond);
    }
    if (r != 0) {
        close(c->wake_fd);
        conn_close(h);
        c->h = NULL;
        return -r;
    }
    c->pump_started = true;
    return 0;
}

/* Stop the pump (no command may be in flight), disconnect cleanly, free. */
static void conn_stop(NbdConn *c)
{
    if (!c->pump_started) {
        return;
    }
    __atomic_store_n(&c->stop, true, __ATOMIC_RELEASE);
    pump_kick(c);
    pthread_join(c->pump, NULL);
    conn_close(c->h); /* nbd_shutdown drives the socket itself now the pump is gone */
    c->h = NULL;
    close(c->wake_fd);
    pthread_rwlock_destroy(&c->hlock);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cond);
    c->pump_started = false;
}

static int req_done_cb(void *opaque, int *error)
{
    NbdReq *r = opaque;
    NbdConn *c = r->c;
    vd_mutex_lock(&c->lock);
    if (*error && c->killing) {
        r->fence_until = c->killed_ms + c->s->stall_ms;
    }
    r->err = *error;
    r->done = true; /* the waiter may return (and free r) as soon as the lock is dropped */
    vd_cond_broadcast(&c->cond);
    vd_mutex_unlock(&c->lock);
    return 1; /* retire the command */
}

/*
 * Submit r (its op and range set) on c; its outcome lands in r. A submission libnbd refuses never
 * calls the callback later (it may have run already, if the connection died while sending): r is
 * then done with that error; ENOTCONN when the link is down.
 */
static void req_submit(NbdConn *c, NbdReq *r)
{
    r->c = c;
    r->err = 0;
    r->done = false;
    r->fence_until = 0;
    nbd_completion_callback cb = {.callback = req_done_cb, .user_data = r};
    int64_t cookie = -1;
    int e = ENOTCONN;
    vd_rwlock_rdlock(&c->hlock);
    struct nbd_handle *h = c->h;
    if (h) {
        switch (r->op) {
        case OP_READ:
            cookie = nbd_aio_pread(h, r->buf, (size_t)r->len, r->off, cb, r->flags);
            break;
        case OP_WRITE:
            cookie = nbd_aio_pwrite(h, r->buf, (size_t)r->len, r->off, cb, r->flags);
            break;
        case OP_ZERO:
            cookie = nbd_aio_zero(h, r->len, r->off, cb, r->flags);
            break;
        case OP_TRIM:
            cookie = nbd_aio_trim(h, r->len, r->off, cb, r->flags);
            break;
        case OP_FLUSH:
            cookie = nbd_aio_flush(h, cb, r->flags);
            break;
        default:
            cookie = nbd_aio_block_status(h, r->len, r->off, *r->ext, cb, r->flags);
            break;
        }
        if (cookie == -1) {
            e = nbd_get_errno();
            if (nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1) {
                e = ENOTCONN; /* the pump saw the server go: libnbd calls that a wrong state */
            }
        }
    }
    vd_rwlock_unlock(&c->hlock);
    if (cookie == -1) {
        vd_mutex_lock(&c->lock);
        if (!r->done) {
            r->done = true;
            r->err = e > 0 ? e : EIO;
        }
        vd_mutex_unlock(&c->lock);
        return;
    }
    pump_kick(c);
}

/* Wait for n commands submitted on c. */
static void reqs_wait(NbdConn *c, NbdReq *r, size_t n)
{
    vd_mutex_lock(&c->lock);
    for (size_t i = 0; i < n; i++) {
        while (!r[i].done) {
            vd_cond_wait(&c->cond, &c->lock);
        }
    }
    vd_mutex_unlock(&c->lock);
}

/* Did a command fail because the connection went, rather than by the server's answer? */
static bool link_error(int e)
{
    return e == ENOTCONN || e == EPIPE || e == ECONNRESET || e == ECONNABORTED ||
           e == ESHUTDOWN || e == ETIMEDOUT;
}

static unsigned long link_generation(NbdConn *c)
{
    vd_mutex_lock(&c->lock);
    unsigned long g = c->epoch;
    vd_mutex_unlock(&c->lock);
    return g;
}

/*
 * Commands sent on connection `gen` (or while it was down) failed on the link: wait until a newer
 * connection is up and not_before (ms, a fence's end) has passed (true), or reconnect-delay has
 * passed since the loss, or the server answering is another export (false: they fail). The pump
 * may not have seen the loss yet (still up, same connection): it will at its next wake-up, give
 * it a second.
 */
static bool link_wait(NbdConn *c, unsigned long gen, int64_t not_before)
{
    vd_mutex_lock(&c->lock);
    int64_t notice_by = now_ms() + 1000;
    bool ok = false;
    while (!c->wrong_export) {
        int64_t now = now_ms();
        bool newer = c->up && c->epoch != gen;
        if (newer && now >= not_before) {
            ok = true;
            break;
        }
        int64_t give_up = c->up && !newer ? notice_by : c->down_ms + c->s->reconnect_ms;
        if (now >= give_up) {
            break;
        }
        int64_t wake = newer && not_before < give_up ? not_before : give_up;
        struct timespec dl = deadline_in(wake - now);
        vd_cond_timedwait(&c->cond, &c->lock, &dl);
    }
    vd_mutex_unlock(&c->lock);
    return ok;
}

/* ---- fences: writes a stall kill left with a server that may still apply them ---- */

static bool is_write_op(NbdOp op)
{
    return op == OP_WRITE || op == OP_ZERO || op == OP_TRIM;
}

/* The server may write [off, off+len) until until_ms: no write of ours may land there before. */
static void fence_add(NbdState *s, uint64_t off, uint64_t len, int64_t until_ms)
{
    vd_mutex_lock(&s->fence_lock);
    int n = s->nfences;
    if (n == NBD_MAX_FENCES) {
        /* Full: one fence over the whole export, lasting as long as the longest. */
        int64_t last = until_ms;
        for (int i = 0; i < n; i++) {
            last = s->fences[i].until_ms > last ? s->fences[i].until_ms : last;
        }
        off = 0;
        len = s->size;
        until_ms = last;
        n = 0;
    }
    s->fences[n] = (NbdFence){.off = off, .len = len, .until_ms = until_ms};
    __atomic_store_n(&s->nfences, n + 1, __ATOMIC_RELEASE);
    vd_mutex_unlock(&s->fence_lock);
    vd_log(VD_LOG_WARN, "nbd: a write to [%llu, +%llu) may still be applied by the server of "
           "'%s' (its connection was reset): writes there wait %lld ms", (unsigned long long)off,
           (unsigned long long)len, s->uri, (long long)(until_ms - now_ms()));
}

/* Wait until no fence covers [off, off+len) (expired fences are dropped). */
static void fence_wait(NbdState *s, uint64_t off, uint64_t len)
{
    if (__atomic_load_n(&s->nfences, __ATOMIC_ACQUIRE) == 0) {
        return;
    }
    for (;;) {
        int64_t now = now_ms(), until = 0;
        vd_mutex_lock(&s->fence_lock);
        int k = 0;
        for (int i = 0; i < s->nfences; i++) {
            NbdFence f = s->fences[i];
            if (f.until_ms <= now) {
                continue;
            }
            s->fences[k++] = f;
            if (f.off < off + len && off < f.off + f.len && f.until_ms > until) {
                until = f.until_ms;
            }
        }
        __atomic_store_n(&s->nfences, k, __ATOMIC_RELEASE);
        vd_mutex_unlock(&s->fence_lock);
        if (!until) {
            return;
        }
        int64_t ms = until - now;
        struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
}

/*
 * Run n prepared commands on c: all in flight at once; those that failed on the link are sent
 * again on the restored one (bounded). The first error (-errno), else 0.
 */
static int reqs_run(NbdConn *c, NbdReq *r, size_t n)
{
    unsigned long gen = link_generation(c);
    for (size_t i = 0; i < n; i++) {
        req_submit(c, &r[i]);
    }
    reqs_wait(c, r, n);
    for (unsigned round = 0; round < NBD_MAX_RESENDS; round++) {
        size_t lost = 0;
        int64_t not_before = 0;
        for (size_t i = 0; i < n; i++) {
            if (!r[i].err || !link_error(r[i].err)) {
                continue;
            }
            lost++;
            /*
             * Reset for a stall, the old connection may still hold this write inside a live
             * server, which can apply it late: not sent again, and no write of ours lands on
             * its range, before the fence ends (see docs/rbd-and-hosts.md, "Link failures").
             */
            if (r[i].fence_until && is_write_op(r[i].op)) {
                fence_add(c->s, r[i].off, r[i].len, r[i].fence_until);
                not_before = r[i].fence_until > not_before ? r[i].fence_until : not_before;
            }
        }
        if (lost == 0 || !link_wait(c, gen, not_before)) {
            break;
        }
        gen = link_generation(c);
        for (size_t i = 0; i < n; i++) {
            if (r[i].err && link_error(r[i].err)) {
                req_submit(c, &r[i]);
            }
        }
        reqs_wait(c, r, n);
    }
    for (size_t i = 0; i < n; i++) {
        if (r[i].err) {
            return errno_ret(r[i].err);
        }
    }
    return 0;
}

/*
 * op over [off, off+len) as commands of at most `piece` bytes, up to NBD_BATCH in flight at
 * once (buf advances with off; NULL for commands without payload).
 */
static int run_cmds(NbdConn *c, NbdOp op, uint64_t off, uint64_t len, uint8_t *buf,
                    uint64_t piece, uint32_t flags)
{
    NbdReq r[NBD_BATCH];
    int ret = 0;
    while (len > 0 && ret == 0) {
        size_t n = 0;
        for (; n < NBD_BATCH && len > 0; n++) {
            uint64_t k = len < piece ? len : piece;
            r[n] = (NbdReq){.op = op, .off = off, .len = k, .buf = buf, .flags = flags};
            off += k;
            len -= k;
            buf = buf ? buf + k : NULL;
        }
        ret = reqs_run(c, r, n);
    }
    return ret;
}

/* One command without a range to split (flush, block status). */
static int run_one(NbdConn *c, NbdOp op, uint64_t off, uint64_t len, uint32_t flags,
                   nbd_extent_callback *ext)
{
    NbdReq r = {.op = op, .off = off, .len = len, .flags = flags, .ext = ext};
    return reqs_run(c, &r, 1);
}

static int first_connect_timeout_ms = -1; /* vd_nbd_set_connect_timeout */

void vd_nbd_set_connect_timeout(int timeout_ms)
{
    __atomic_store_n(&first_connect_timeout_ms, timeout_ms < 0 ? -1 : timeout_ms,
                     __ATOMIC_RELAXED);
}

/*
 * vdisk's own URI query parameters (seconds; the blockdev-add options of the same names become
 * these): "reconnect-delay", "open-timeout", "x-stall-timeout". They are taken out of the URI
 * (into s) and the rest, libnbd's, stays in s->uri.
 */
static const struct {
    const char *key;
    size_t at;
} nbd_uri_opts[] = {
    {"reconnect-delay", offsetof(NbdState, reconnect_ms)},
    {"open-timeout", offsetof(NbdState, open_timeout_ms)},
    {"x-stall-timeout", offsetof(NbdState, stall_ms)},
};

/* A string one: the TCP congestion control of the node's connections (conn_set_congestion). */
#define NBD_URI_CC "x-tcp-congestion"

static int uri_take_options(NbdState *s, const char *in, VdError **errp)
{
    s->stall_ms = NBD_STALL_DEFAULT_S * 1000;
    s->uri = strdup(in);
    if (!s->uri) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    char *q = strchr(s->uri, '?');
    if (!q) {
        return 0;
    }
    char *out = q; /* kept parameters are copied down over the taken ones */
    char *p = q + 1;
    while (*p) {
        size_t n = strcspn(p, "&");
        char save = p[n];
        p[n] = '\0';
        bool taken = false;
        if (!strncmp(p, NBD_URI_CC "=", strlen(NBD_URI_CC) + 1)) {
            const char *v = p + strlen(NBD_URI_CC) + 1;
            /* A kernel name (TCP_CA_NAME_MAX 16): letters, digits, '_' (reno, cubic, bbr...). */
            if (!*v || strlen(v) >= 16 || strspn(v, "abcdefghijklmnopqrstuvwxyz0123456789_") !=
                                              strlen(v)) {
                vd_error_setg(errp, EINVAL, "NBD URI parameter '%s': expected the name of a TCP "
                              "congestion control algorithm, got '%s'", NBD_URI_CC, v);
                return -EINVAL;
            }
            free(s->tcp_cc);
            s->tcp_cc = strdup(v);
            if (!s->tcp_cc) {
                vd_error_setg(errp, ENOMEM, "Out of memory");
                return -ENOMEM;
            }
            taken = true;
        }
        for (size_t i = 0; i < sizeof(nbd_uri_opts) / sizeof(nbd_uri_opts[0]); i++) {
            size_t kl = strlen(nbd_uri_opts[i].key);
            if (strncmp(p, nbd_uri_opts[i].key, kl) || p[kl] != '=') {
                continue;
            }
            char *end;
            errno = 0;
            unsigned long v = strtoul(p + kl + 1, &end, 10);
            if (!p[kl + 1] || *end || errno || v > 86400 * 365) {
                vd_error_setg(errp, EINVAL, "NBD URI parameter '%s': expected seconds, got "
                              "'%s'", nbd_uri_opts[i].key, p + kl + 1);
                return -EINVAL;
            }
            *(int64_t *)((char *)s + nbd_uri_opts[i].at) = (int64_t)v * 1000;
            taken = true;
        }
        if (!taken) {
            *out = out == q ? '?' : '&';
            out++;
            memmove(out, p, n + 1);
            out += n;
        }
        p += n + (save ? 1 : 0);
    }
    *out = '\0';
    return 0;
}

/*
 * The first connection: tried once (timeout_ms: vdiskd --nbd-connect-timeout, -1 blocks), or,
 * with open-timeout, again and again until that has passed (QEMU's open-timeout).
 */
static struct nbd_handle *first_conn_open(NbdState *s, int *perr, VdError **errp)
{
    int timeout_ms = __atomic_load_n(&first_connect_timeout_ms, __ATOMIC_RELAXED);
    int64_t deadline = now_ms() + s->open_timeout_ms;
    for (unsigned tries = 1;; tries++) {
        int64_t left = deadline - now_ms();
        int t = timeout_ms;
        if (s->open_timeout_ms > 0 && (t < 0 || t > left)) {
            t = left > 0 ? (int)left : 1;
        }
        VdError *local = NULL;
        struct nbd_handle *h = conn_open(s, t, perr, &local);
        if (h || s->open_timeout_ms <= 0 || deadline - now_ms() <= 0 || tries >= 100000) {
            vd_error_propagate(errp, local);
            return h;
        }
        vd_error_free(local);
        struct timespec pause = {.tv_nsec = 200 * 1000000L};
        nanosleep(&pause, NULL);
    }
}

static int nbd_drv_open_conns(BlockNode *bs, const VdOpenOptions *opts, VdError **errp);

static int nbd_drv_open(BlockNode *bs, const VdOpenOptions *opts, VdError **errp)
{
    NbdState *s = ns_of(bs);
    memset(s, 0, sizeof(*s));
    s->bs = bs;
    if (!opts->filename || !*opts->filename) {
        vd_error_setg(errp, EINVAL, "The 'nbd' protocol needs a URI (nbd://HOST[:PORT]/EXPORT "
                      "or nbd+unix:///EXPORT?socket=PATH)");
        return -EINVAL;
    }
    if (opts->tls_creds && !(s->tls = vd_tls_creds_get(opts->tls_creds, false, errp))) {
        return -EINVAL;
    }
    int r = 0;
    /*
     * libnbd 1.14 checks a server's certificate only against a host name, which a unix socket
     * has not: it would accept any certificate there. QEMU checks the chain; refuse rather than
     * connect unauthenticated (PSK authenticates both ends by itself).
     */
    if (s->tls && !vd_tls_creds_is_psk(s->tls) && vd_tls_creds_verify_peer(s->tls) &&
        opts->filename && !strncmp(opts->filename, "nbds+unix:", 10)) {
        vd_error_setg(errp, ENOTSUP, "x509 TLS over a unix socket is not supported by vdiskd: "
                      "libnbd 1.14 does not verify the server's certificate there (use TCP, "
                      "tls-creds-psk, or verify-peer=off on '%s' to accept any server)",
                      opts->tls_creds);
        r = -ENOTSUP;
    }
    if (r == 0) {
        r = uri_take_options(s, opts->filename, errp);
    }
    if (r == 0) {
        r = nbd_drv_open_conns(bs, opts, errp);
    }
    if (r < 0) {
        vd_tls_creds_unref(s->tls);
        s->tls = NULL;
        free(s->uri);
        s->uri = NULL;
        free(s->tcp_cc);
        s->tcp_cc = NULL;
    }
    return r;
}

static int nbd_drv_open_conns(BlockNode *bs, const VdOpenOptions *opts, VdError **errp)
{
    NbdState *s = ns_of(bs);
    const char *uri = s->uri;
    int cerr = 0;
    struct nbd_handle *h = first_conn_open(s, &cerr, errp);
    if (!h) {
        return -cerr;
    }
    int64_t size = nbd_get_size(h);
    if (size < 0) {
        int err = nbd_ret();
        vd_error_setg(errp, -err, "Could not open '%s': could not get the export size: %s", uri,
                      nbd_msg());
        conn_close(h);
        return err;
    }
    s->size = (uint64_t)size;
    identity_of(h, &s->id);
    s->export_read_only = nbd_is_read_only(h) == 1;
    s->read_only = s->export_read_only || !(opts->flags & VD_OPEN_RDWR);
    s->can_flush = nbd_can_flush(h) == 1;
    s->can_fua = nbd_can_fua(h) == 1;
    s->can_trim = nbd_can_trim(h) == 1;
    s->can_zero = nbd_can_zero(h) == 1;
    s->can_fast_zero = nbd_can_fast_zero(h) == 1;
    s->multi_conn = nbd_can_multi_conn(h) == 1;
    bool extra_conns = s->multi_conn && !conn_is_tcp(h);
    s->has_base_alloc = nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;

    int64_t minb = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
    int64_t maxb = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
    s->align = 1;
    if (minb > 1 && minb <= 65536 && (minb & (minb - 1)) == 0) {
        s->align = (uint32_t)minb;
    }
    s->max_io = NBD_IO_MAX;
    if (maxb > 0 && (uint64_t)maxb < s->max_io) {
        s->max_io = (uint32_t)maxb;
    }
    s->max_io -= s->max_io % s->align;
    if (s->max_io == 0) {
        s->max_io = s->align;
    }
    if (pthread_rwlock_init(&s->rmw_lock, NULL) != 0) {
        vd_error_setg(errp, ENOMEM, "Could not open '%s': out of resources", uri);
        identity_free(&s->id);
        conn_close(h);
        return -ENOMEM;
    }
    if (pthread_mutex_init(&s->fence_lock, NULL) != 0) {
        vd_error_setg(errp, ENOMEM, "Could not open '%s': out of resources", uri);
        pthread_rwlock_destroy(&s->rmw_lock);
        identity_free(&s->id);
        conn_close(h);
        return -ENOMEM;
    }
    s->lock_init = true;
    int r = conn_start(s, &s->conn[0], h);
    if (r < 0) {
        vd_error_setg(errp, -r, "Could not open '%s': %s", uri, strerror(-r));
        pthread_rwlock_destroy(&s->rmw_lock);
        pthread_mutex_destroy(&s->fence_lock);
        identity_free(&s->id);
        s->lock_init = false;
        return r;
    }
    s->nconns = 1;

    if (extra_conns) {
        for (int i = 1; i < NBD_MAX_CONNS; i++) {
            VdError *local = NULL;
            struct nbd_handle *x = conn_open(s, NBD_EXTRA_CONNECT_MS, &cerr, &local);
            if (!x) {
                vd_log(VD_LOG_DEBUG, "nbd: using %d connection(s) to '%s': %s", s->nconns, uri,
                       vd_error_msg(local));
                vd_error_free(local);
                break;
            }
            /* The same export must answer; anything else is not a usable extra connection. */
            if (conn_other_export(s, x)) {
                conn_close(x);
                break;
            }
            if (conn_start(s, &s->conn[s->nconns], x) < 0) {
                break;
            }
            s->nconns++;
        }
    }
    bs->read_only = s->read_only;
    return 0;
}

static void nbd_drv_close(BlockNode *bs)
{
    NbdState *s = ns_of(bs);
    for (int i = 0; i < s->nconns; i++) {
        conn_stop(&s->conn[i]);
    }
    s->nconns = 0;
    if (s->lock_init) {
        pthread_rwlock_destroy(&s->rmw_lock);
        pthread_mutex_destroy(&s->fence_lock);
        identity_free(&s->id);
        s->lock_init = false;
    }
    vd_tls_creds_unref(s->tls);
    s->tls = NULL;
    free(s->uri);
    s->uri = NULL;
    free(s->tcp_cc);
    s->tcp_cc = NULL;
}

int vd_nbd_connection_count(BlockNode *bs)
{
    if (!bs || bs->drv != &vd_drv_nbd) {
        return 0;
    }
    return ns_of(bs)->nconns;
}

/* ---- I/O ---- */

/* Read [off, off+len) where off is aligned and len is aligned or reaches the export's end. */
static int read_direct(NbdState *s, NbdConn *c, uint64_t off, uint64_t len, uint8_t *buf)
{
    return run_cmds(c, OP_READ, off, len, buf, s->max_io, 0);
}

static int write_direct(NbdState *s, NbdConn *c, uint64_t off, uint64_t len,
                        const uint8_t *buf, uint32_t nflags)
{
    /* libnbd only reads a write's buffer. */
    return run_cmds(c, OP_WRITE, off, len, (uint8_t *)buf, s->max_io, nflags);
}

/* The server block containing off: [*start, *start + *blen), clipped at the export's end. */
static void block_around(NbdState *s, uint64_t off, uint64_t *start, uint64_t *blen)
{
    *start = off - off % s->align;
    *blen = s->size - *start < s->align ? s->size - *start : s->align;
}

static int nbd_drv_pread(BlockNode *bs, uint64_t offset, uint64_t bytes, void *buf)
{
    NbdState *s = ns_of(bs);
    uint8_t *out = buf;
    /* Past the end reads zeroes, like a file's tail (formats read whole clusters). */
    if (offset >= s->size) {
        memset(out, 0, bytes);
        return 0;
    }
    if (bytes > s->size - offset) {
        memset(out + (s->size - offset), 0, bytes - (s->size - offset));
        bytes = s->size - offset;
    }
    NbdConn *c = conn_pick(s);
    if (s->align == 1) {
        return read_direct(s, c, offset, bytes, out);
    }
    uint8_t *bounce = NULL;
    int ret = 0;
    while (bytes > 0 && ret == 0) {
        uint64_t in = offset % s->align;
        uint64_t n;
        if (in == 0 && (bytes >= s->align || offset + bytes == s->size)) {
            n = bytes >= s->align ? bytes - bytes % s->align : bytes;
            ret = read_direct(s, c, offset, n, out);
        } else {
            /* A partial server block: read it whole, copy the caller's part. */
            uint64_t start, blen;
            block_around(s, offset, &start, &blen);
            if (!bounce && !(bounce = malloc(s->align))) {
                return -ENOMEM;
            }
            n = blen - in < bytes ? blen - in : bytes;
            ret = read_direct(s, c, start, blen, bounce);
            if (ret == 0) {
                memcpy(out, bounce + in, n);
            }
        }
        out += n;
        offset += n;
        bytes -= n;
    }
    free(bounce);
    return ret;
}

static int nbd_drv_flush(BlockNode *bs);

/* Write (align > 1 aware); nflags are libnbd command flags for every command sent. */
static int do_write(NbdState *s, uint64_t offset, uint64_t bytes, const uint8_t *in,
                    uint32_t nflags)
{
    NbdConn *c = conn_pick(s);
    if (s->align == 1) {
        return write_direct(s, c, offset, bytes, in, nflags);
    }
    uint8_t *bounce = NULL;
    int ret = 0;
    while (bytes > 0 && ret == 0) {
        uint64_t in_off = offset % s->align;
        uint64_t n;
        if (in_off == 0 && (bytes >= s->align || offset + bytes == s->size)) {
            n = bytes >= s->align ? bytes - bytes % s->align : bytes;
            vd_rwlock_rdlock(&s->rmw_lock);
            ret = write_direct(s, c, offset, n, in, nflags);
            vd_rwlock_unlock(&s->rmw_lock);
        } else {
            uint64_t start, blen;
            block_around(s, offset, &start, &blen);
            if (!bounce && !(bounce = malloc(s->align))) {
                return -ENOMEM;
            }
            n = blen - in_off < bytes ? blen - in_off : bytes;
            vd_rwlock_wrlock(&s->rmw_lock);
            ret = read_direct(s, c, start, blen, bounce);
            if (ret == 0) {
                memcpy(bounce + in_off, in, n);
                ret = write_direct(s, c, start, blen, bounce, nflags);
            }
            vd_rwlock_unlock(&s->rmw_lock);
        }
        in += n;
        offset += n;
        bytes -= n;
    }
    free(bounce);
    return ret;
}

/* A write, zero or trim may go ahead (once no fence covers its range). */
static int check_write(NbdState *s, uint64_t offset, uint64_t bytes)
{
    if (s->read_only) {
        return -EPERM;
    }
    if (offset > s->size || bytes > s->size - offset) {
        return -ENOSPC; /* an NBD export cannot grow */
    }
    fence_wait(s, offset, bytes);
    return 0;
}

static int nbd_drv_pwrite(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf,
                          int flags)
{
    NbdState *s = ns_of(bs);
    int ret = check_write(s, offset, bytes);
    if (ret < 0) {
        return ret;
    }
    bool fua = (flags & VD_REQ_FUA) && s->can_fua;
    ret = do_write(s, offset, bytes, buf, fua ? LIBNBD_CMD_FLAG_FUA : 0);
    if (ret == 0 && (flags & VD_REQ_FUA) && !fua) {
        ret = nbd_drv_flush(bs);
    }
    return ret;
}

static int nbd_drv_pwrite_zeroes(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    NbdState *s = ns_of(bs);
    int ret = check_write(s, offset, bytes);
    if (ret < 0) {
        return ret;
    }
    if (!s->can_zero) {
        return -ENOTSUP; /* the generic layer writes zero buffers */
    }
    if ((flags & VD_REQ_NO_FALLBACK) && !s->can_fast_zero) {
        return -ENOTSUP;
    }
    bool fua = (flags & VD_REQ_FUA) && s->can_fua;
    uint32_t nflags = fua ? LIBNBD_CMD_FLAG_FUA : 0;
    if (!(flags & VD_REQ_MAY_UNMAP)) {
        nflags |= LIBNBD_CMD_FLAG_NO_HOLE;
    }
    if ((flags & VD_REQ_NO_FALLBACK) && s->can_fast_zero) {
        nflags |= LIBNBD_CMD_FLAG_FAST_ZERO;
    }
    /* Partial server blocks at the edges go through the write path (read-modify-write). */
    uint64_t head = (s->align - offset % s->align) % s->align;
    if (head > bytes) {
        head = bytes;
    }
    uint64_t tail = (bytes - head) % s->align;
    if (offset + bytes == s->size) {
        tail = 0; /* a short last block is a whole block */
    }
    if ((head || tail) && (flags & VD_REQ_NO_FALLBACK)) {
        return -ENOTSUP;
    }
    uint8_t *zero = NULL;
    if (head || tail) {
        zero = calloc(1, s->align);
        if (!zero) {
            return -ENOMEM;
        }
    }
    uint32_t wflags = fua ? LIBNBD_CMD_FLAG_FUA : 0;
    if (head) {
        ret = do_write(s, offset, head, zero, wflags);
    }
    uint64_t off = offset + head;
    uint64_t mid = bytes - head - tail;
    if (ret == 0 && mid > 0) {
        /* Shared like any aligned write, so a concurrent read-modify-write cannot undo it. */
        if (s->align > 1) {
            vd_rwlock_rdlock(&s->rmw_lock);
        }
        ret = run_cmds(conn_pick(s), OP_ZERO, off, mid, NULL, NBD_CMD_MAX, nflags);
        /* Servers refuse FAST_ZERO with ENOTSUP (some say EOPNOTSUPP). */
        ret = ret == -EOPNOTSUPP ? -ENOTSUP : ret;
        off += mid;
        if (s->align > 1) {
            vd_rwlock_unlock(&s->rmw_lock);
        }
    }
    if (ret == 0 && tail) {
        ret = do_write(s, off, tail, zero, wflags);
    }
    free(zero);
    if (ret == 0 && (flags & VD_REQ_FUA) && !fua) {
        ret = nbd_drv_flush(bs);
    }
    return ret;
}

static int nbd_drv_pdiscard(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    NbdState *s = ns_of(bs);
    int ret = check_write(s, offset, bytes);
    if (ret < 0) {
        return ret;
    }
    if (!s->can_trim) {
        return -ENOTSUP; /* discard is advisory: the generic layer makes it a no-op */
    }
    /* Trim only whole server blocks; the edges are simply left alone (advisory). */
    uint64_t start = (offset + s->align - 1) / s->align * s->align;
    uint64_t end = offset + bytes;
    if (end != s->size) {
        end -= end % s->align;
    }
    if (start >= end) {
        return 0;
    }
    ret = run_cmds(conn_pick(s), OP_TRIM, start, end - start, NULL, NBD_CMD_MAX, 0);
    return ret == -EOPNOTSUPP ? -ENOTSUP : ret;
}

static int nbd_drv_flush(BlockNode *bs)
{
    NbdState *s = ns_of(bs);
    if (s->read_only || !s->can_flush || s->nconns == 0) {
        return 0; /* nothing we wrote, or a server that does not cache */
    }
    /* With multi-conn a flush on one connection covers writes completed on all of them. */
    return run_one(conn_pick(s), OP_FLUSH, 0, 0, 0, NULL);
}

typedef struct ExtentFirst {
    uint32_t len;
    uint32_t flags;
    bool got;
} ExtentFirst;

static int extent_cb(void *opaque, const char *metacontext, uint64_t offset, uint32_t *entries,
                     size_t nr_entries, int *error)
{
    ExtentFirst *f = opaque;
    /* Servers may send other contexts (or, if buggy, repeat ours): keep base:allocation's first. */
    if (strcmp(metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0 || f->got || nr_entries < 2) {
        return 0;
    }
    f->len = entries[0];
    f->flags = entries[1];
    f->got = true;
    return 0;
}

static int nbd_drv_block_status(BlockNode *bs, uint64_t offset, uint64_t bytes, uint64_t *pnum,
                                uint64_t *map, BlockNode **file)
{
    NbdState *s = ns_of(bs);
    /* Like QEMU's nbd driver: the node maps identically onto itself. */
    int ret = VD_BS_ALLOCATED | VD_BS_OFFSET_VALID;
    *map = offset;
    *file = bs;
    *pnum = bytes;
    if (!s->has_base_alloc || offset >= s->size) {
        return ret | VD_BS_DATA;
    }
    uint64_t count = bytes < NBD_CMD_MAX ? bytes : NBD_CMD_MAX;
    if (count > s->size - offset) {
        count = s->size - offset;
    }
    if (s->align > 1) {
        /* The server only answers for whole blocks: call a partial block data. */
        uint64_t in = offset % s->align;
        if (in) {
            uint64_t n = s->align - in;
            *pnum = n < bytes ? n : bytes;
            return ret | VD_BS_DATA;
        }
        if (offset + count != s->size) {
            count -= count % s->align;
        }
        if (count == 0) {
            return ret | VD_BS_DATA;
        }
    }
    ExtentFirst f = { 0 };
    nbd_extent_callback cb = { .callback = extent_cb, .user_data = &f };
    int r = run_one(conn_pick(s), OP_STATUS, offset, count, LIBNBD_CMD_FLAG_REQ_ONE, &cb);
    if (r < 0) {
        return r;
    }
    if (!f.got || f.len == 0) {
        return ret | VD_BS_DATA; /* no answer for this range: assume data (always safe) */
    }
    *pnum = f.len < bytes ? f.len : bytes;
    if (!(f.flags & LIBNBD_STATE_HOLE)) {
        ret |= VD_BS_DATA;
    }
    if (f.flags & LIBNBD_STATE_ZERO) {
        ret |= VD_BS_ZERO;
    }
    return ret;
}

static int64_t nbd_drv_getlength(BlockNode *bs)
{
    return (int64_t)ns_of(bs)->size;
}

/*
 * An export cannot grow: "resizing" to at most its size is a no-op (a format's file may be
 * smaller than the export that holds it, as qcow2 on a block device), growing is refused.
 */
static int nbd_drv_truncate(BlockNode *bs, uint64_t size, bool shrink, VdPrealloc prealloc,
                            VdError **errp)
{
    NbdState *s = ns_of(bs);
    if (size > s->size) {
        vd_error_setg(errp, ENOTSUP, "Cannot grow NBD export '%s' (%llu bytes) to %llu bytes",
                      bs->filename, (unsigned long long)s->size, (unsigned long long)size);
        return -ENOTSUP;
    }
    return 0;
}

/*
 * "Creating" an image on an export (qemu-img create/convert onto nbd://): the export exists
 * already; check it is writable and large enough, and zero its first sector so an old format
 * header cannot be probed later (what QEMU's generic protocol create does).
 */
static int nbd_drv_create(const char *filename, const VdCreateOptions *opts, VdError **errp)
{
    VdOpenOptions o = { .filename = filename, .format = "nbd", .flags = VD_OPEN_RDWR };
    VdError *local = NULL;
    BlockNode *bs = vd_open(&o, &local);
    if (!bs) {
        int code = vd_error_code(local);
        vd_error_propagate(errp, local);
        return code > 0 ? -code : -EIO;
    }
    NbdState *s = ns_of(bs);
    int ret = 0;
    if (s->read_only) {
        vd_error_setg(errp, EPERM, "Could not create '%s': the NBD export is read-only",
                      filename);
        ret = -EPERM;
    } else if (opts->size > s->size) {
        vd_error_setg(errp, ENOSPC, "Could not create '%s': the NBD export has %llu bytes, "
                      "%llu needed", filename, (unsigned long long)s->size,
                      (unsigned long long)opts->size);
        ret = -ENOSPC;
    } else if (s->size > 0) {
        ret = vd_pwrite_zeroes(bs, 0, s->size < 512 ? s->size : 512, 0);
        if (ret < 0) {
            vd_error_setg_errno(errp, -ret, "Could not create '%s': writing the first sector "
                                "failed", filename);
        }
    }
    vd_node_unref(bs);
    return ret;
}

/* The schemes libnbd's nbd_connect_uri takes (TLS: nbds; a Unix socket: +unix; vsock). */
static const char *const nbd_uri_schemes[] = {
    "nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock", NULL,
};

static int nbd_drv_probe(const uint8_t *buf, size_t len, const char *filename)
{
    return 0; /* a protocol, never a format guess */
}

/* BlockdevOptionsNbd; tls-creds names a tls-creds object (VdOpenOptions.tls_creds). */
static const VdOptSpec nbd_blockdev_options[] = {
    {"server", VD_OPT_SOCKADDR, true},
    {"export", VD_OPT_STR},
    {"tls-creds", VD_OPT_STR},
    {"tls-hostname", VD_OPT_STR, .unsupported = " (libnbd 1.14 can check the server's "
                                                "certificate against server.host only)"},
    {"x-dirty-bitmap", VD_OPT_STR},
    {"reconnect-delay", VD_OPT_U32},
    {"open-timeout", VD_OPT_U32},
    {"x-stall-timeout", VD_OPT_U32},
    {NBD_URI_CC, VD_OPT_STR},
    {NULL}};

/*
 * The libnbd URI of a blockdev-add nbd node: percent-encoded, so any export name works; nbds://
 * (TLS) with tls-creds, whose files nbd_drv_open gives libnbd itself.
 */
static char *nbd_blockdev_filename(const VdOptReader *o, VdError **errp)
{
    const char *type = o->str(o, "server.type");
    bool is_unix = type && !strcmp(type, "unix");
    const char *exp = o->str(o, "export");
    char *uri = vd_nbd_make_uri(is_unix ? NULL : o->str(o, "server.host"),
                                is_unix ? NULL : o->str(o, "server.port"),
                                is_unix ? o->str(o, "server.path") : NULL, exp ? exp : "");
    if (uri && o->str(o, "tls-creds")) {
        char *tls_uri = NULL; /* "nbd://..." / "nbd+unix://...": the same with "nbds" */
        if (asprintf(&tls_uri, "nbds%s", uri + 3) < 0) {
            tls_uri = NULL;
            errno = ENOMEM;
        }
        free(uri);
        uri = tls_uri;
    }
    /* The link options travel in the URI as vdisk's own parameters (uri_take_options). */
    for (size_t i = 0; uri && i < sizeof(nbd_uri_opts) / sizeof(nbd_uri_opts[0]); i++) {
        unsigned long long v;
        if (!o->num(o, nbd_uri_opts[i].key, &v)) {
            continue;
        }
        char *with = NULL;
        if (asprintf(&with, "%s%c%s=%llu", uri, strchr(uri, '?') ? '&' : '?',
                     nbd_uri_opts[i].key, v) < 0) {
            with = NULL;
            errno = ENOMEM;
        }
        free(uri);
        uri = with;
    }
    const char *cc = uri ? o->str(o, NBD_URI_CC) : NULL;
    if (cc && (!*cc || strspn(cc, "abcdefghijklmnopqrstuvwxyz0123456789_") != strlen(cc))) {
        vd_error_setg(errp, EINVAL, "Parameter '%s' expects the name of a TCP congestion "
                      "control algorithm", NBD_URI_CC);
        free(uri);
        return NULL;
    }
    if (cc) {
        char *with = NULL;
        if (asprintf(&with, "%s%c%s=%s", uri, strchr(uri, '?') ? '&' : '?', NBD_URI_CC, cc) < 0) {
            with = NULL;
            errno = ENOMEM;
        }
        free(uri);
        uri = with;
    }
    if (!uri) {
        if (errno == EINVAL) {
            vd_error_setg(errp, EINVAL, "NBD server: invalid %s", is_unix ? "socket path"
                          : "host or port");
        } else {
            vd_error_setg(errp, ENOMEM, "Out of memory");
        }
    }
    return uri;
}

const BlockDriver vd_drv_nbd = {
    .name = "nbd",
    .is_protocol = true,
    .supports_backing = false,
    .uri_schemes = nbd_uri_schemes,
    .blockdev_options = nbd_blockdev_options,
    .blockdev_filename = nbd_blockdev_filename,
    .may_block = true,
    .state_size = sizeof(NbdState),
    .probe = nbd_drv_probe,
    .open = nbd_drv_open,
    .close = nbd_drv_close,
    .pread = nbd_drv_pread,
    .pwrite = nbd_drv_pwrite,
    .pwrite_zeroes = nbd_drv_pwrite_zeroes,
    .pdiscard = nbd_drv_pdiscard,
    .flush = nbd_drv_flush,
    .block_status = nbd_drv_block_status,
    .getlength = nbd_drv_getlength,
    .truncate = nbd_drv_truncate,
    .create = nbd_drv_create,
};

/* ---- opening from options (blockdev-add) ---- */

BlockNode *vd_nbd_open(const char *host, const char *port, const char *unix_path,
                       const char *export_name, const char *node_name, int flags,
                       VdError **errp)
{
    bool has_host = host && *host;
    bool has_unix = unix_path && *unix_path;
    if (has_host == has_unix) {
        vd_error_setg(errp, EINVAL, "NBD server: give exactly one of a host (inet) or a "
                      "socket path (unix)");
        return NULL;
    }
    char *uri = vd_nbd_make_uri(host, port, unix_path, export_name);
    if (!uri) {
        if (errno == EINVAL) {
            vd_error_setg(errp, EINVAL, "NBD server: invalid port '%s'", port ? port : "");
        } else {
            vd_error_setg(errp, ENOMEM, "Out of memory");
        }
        return NULL;
    }
    VdOpenOptions o = { .filename = uri, .format = "nbd", .node_name = node_name,
                        .flags = flags };
    BlockNode *bs = vd_open(&o, errp);
    free(uri);
    return bs;
}

BlockNode *vd_nbd_open_qmp(json_t *options, int flags, VdError **errp)
{
    if (!json_is_object(options)) {
        vd_error_setg(errp, EINVAL, "nbd: options must be an object");
        return NULL;
    }
    json_t *server = json_object_get(options, "server");
    if (!json_is_object(server)) {
        vd_error_setg(errp, EINVAL, "nbd: parameter 'server' is missing");
        return NULL;
    }
    const char *type = json_string_value(json_object_get(server, "type"));
    const char *host = NULL, *path = NULL;
    char portbuf[24];
    const char *port = NULL;
    if (!type) {
        vd_error_setg(errp, EINVAL, "nbd: parameter 'server.type' is missing");
        return NULL;
    }
    if (!strcmp(type, "inet")) {
        host = json_string_value(json_object_get(server, "host"));
        json_t *jp = json_object_get(server, "port");
        if (json_is_string(jp)) {
            port = json_string_value(jp);
        } else if (json_is_integer(jp)) {
            snprintf(portbuf, sizeof(portbuf), "%lld", (long long)json_integer_value(jp));
            port = portbuf;
        } else if (jp) {
            vd_error_setg(errp, EINVAL, "nbd: 'server.port' must be a string or an integer");
            return NULL;
        }
        if (!host || !*host) {
            vd_error_setg(errp, EINVAL, "nbd: parameter 'server.host' is missing");
            return NULL;
        }
    } else if (!strcmp(type, "unix")) {
        path = json_string_value(json_object_get(server, "path"));
        if (!path || !*path) {
            vd_error_setg(errp, EINVAL, "nbd: parameter 'server.path' is missing");
            return NULL;
        }
    } else {
        vd_error_setg(errp, EINVAL, "nbd: unsupported server type '%s' (inet or unix)", type);
        return NULL;
    }
    json_t *jexp = json_object_get(options, "export");
    if (jexp && !json_is_string(jexp)) {
        vd_error_setg(errp, EINVAL, "nbd: 'export' must be a string");
        return NULL;
    }
    if (json_is_true(json_object_get(options, "read-only"))) {
        flags &= ~VD_OPEN_RDWR;
    }
    const char *node_name = json_string_value(json_object_get(options, "node-name"));
    return vd_nbd_open(host, port, path, json_string_value(jexp), node_name, flags, errp);
}
