/*
 * nbd-connection.c - the NBD client's connections (for nbd.c, the driver): connecting (URI, TLS,
 * socket options), the pump thread of each connection, commands in flight, and a lost link's
 * reconnection and resends.
 *
 * Threads: libnbd's synchronous calls hold the handle for the whole round trip (one command in
 * flight per handle), which over a link with latency caps throughput at one request per round
 * trip. So commands go through libnbd's aio calls: each connection has a pump thread that owns the
 * socket's readiness (poll + nbd_aio_notify_*); a caller submits, kicks the pump and sleeps until
 * its completion callback ran. Concurrent callers (copy workers, NBD server threads) and the
 * pieces of one split request are all in flight together. When the server advertises multi-conn
 * (its cache, if any, is shared by all connections, so flush/FUA on one covers all) and the socket
 * is local (not TCP: nbdc_conn_is_tcp), up to NBD_MAX_CONNS connections are opened and requests
 * spread over them round robin.
 * A lost link (the connection closes or resets, or nothing moves on the socket for the stall
 * timeout while commands are outstanding) never hangs a caller and never returns wrong data: the
 * pump drops the connection (its commands fail) and reconnects in the background; commands that
 * failed on the link wait for the new connection up to reconnect-delay after the loss and are sent
 * again (all NBD commands are idempotent), else fail with EIO (QEMU's reconnect-delay semantics).
 * Lock order: NbdConn.hlock (shared by submitters, exclusive for the pump's handle swap), libnbd's
 * handle lock, then NbdConn.lock (a leaf).
 */
#include "protocols/nbd-connection.h"

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

#include "protocols/nbd.h"
#include "util/log.h"
#include "util/lock.h"
#include "util/thread-cache.h"

NbdConn *nbdc_conn_pick(NbdState *s)
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

int nbdc_ret(void)
{
    return errno_ret(nbd_get_errno());
}

const char *nbdc_msg(void)
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

/* ---- connecting ---- */

int64_t nbdc_now_ms(void)
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

/* s[0, n) percent-decoded into a new string (NULL: out of memory). */
static char *pct_decode(const char *s, size_t n)
{
    char *out = malloc(n + 1), *o = out;
    for (size_t i = 0; out && i < n; i++) {
        unsigned v;
        if (s[i] == '%' && i + 2 < n && sscanf(s + i + 1, "%2x", &v) == 1) {
            *o++ = (char)v;
            i += 2;
        } else {
            *o++ = s[i];
        }
    }
    if (out) {
        *o = '\0';
    }
    return out;
}

/*
 * The server's address as QEMU names it in its connect errors: "HOST:PORT" (no IPv6 brackets;
 * NBD's port 10809 when the URI has none) or a unix socket's path. NULL: not a URI of these.
 */
static char *conn_addr(const char *uri)
{
    const char *p = strstr(uri, "://");
    if (!p || strncmp(uri, "nbd", 3)) {
        return NULL;
    }
    size_t sl = (size_t)(p - uri); /* the scheme's length */
    p += 3;
    if (sl >= 5 && !memcmp(p - 8, "+unix", 5)) {
        const char *q = strchr(p, '?');
        while (q && strncmp(q + 1, "socket=", 7)) {
            q = strchr(q + 1, '&');
        }
        return q ? pct_decode(q + 8, strcspn(q + 8, "&#")) : NULL;
    }
    if (sl >= 6 && !memcmp(p - 9, "+vsock", 6)) {
        return NULL;
    }
    size_t auth = strcspn(p, "/?#");
    const char *at = memchr(p, '@', auth); /* user@host */
    if (at) {
        auth -= (size_t)(at + 1 - p);
        p = at + 1;
    }
    const char *end = p + auth, *hs = p, *he, *port = NULL;
    if (*p == '[') { /* an IPv6 literal */
        const char *rb = memchr(p, ']', auth);
        if (!rb) {
            return NULL;
        }
        hs = p + 1;
        he = rb;
        port = rb + 1 < end && rb[1] == ':' ? rb + 2 : NULL;
    } else {
        const char *colon = memchr(p, ':', auth);
        he = colon ? colon : end;
        port = colon ? colon + 1 : NULL;
    }
    int plen = port ? (int)(end - port) : 0;
    if (he == hs) {
        return NULL; /* "nbd://": libnbd's error, which names the URI */
    }
    char *host = pct_decode(hs, (size_t)(he - hs));
    char *out = NULL;
    if (host && asprintf(&out, "%s:%.*s", host, plen ? plen : 5, plen ? port : "10809") < 0) {
        out = NULL;
    }
    free(host);
    return out;
}

/*
 * A failed connection's error: libnbd's, or, where the socket did not connect or the host name
 * did not resolve, QEMU's words (qemu-img and qemu-storage-daemon say the same).
 */
static void conn_error(const char *uri, int err, VdError **errp)
{
    const char *m = nbdc_msg();
    char *addr = NULL;
    if (!strncmp(m, "connect: ", 9) && (addr = conn_addr(uri))) {
        vd_error_setg(errp, err, "Failed to connect to '%s': %s", addr, strerror(err));
    } else if (!strncmp(m, "getaddrinfo: ", 13) && (addr = conn_addr(uri))) {
        const char *why = strrchr(m, ':'); /* "getaddrinfo: hostname "H" port "P": WHY" */
        vd_error_setg(errp, err, "address resolution failed for %s: %s", addr, why + 2);
    } else {
        vd_error_setg(errp, err, "Could not open '%s': %s", uri, m);
    }
    free(addr);
}

static struct nbd_handle *conn_open_uri(const char *uri, const VdTlsCreds *tls, int timeout_ms,
                                        int *perr, VdError **errp)
{
    struct nbd_handle *h = nbd_create();
    if (!h) {
        *perr = ENOMEM;
        vd_error_setg(errp, ENOMEM, "Could not open '%s': %s", uri, nbdc_msg());
        return NULL;
    }
    /* full info: the export's name and description too, part of its identity (nbdc_identity_of). */
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
    int64_t deadline = nbdc_now_ms() + timeout_ms;
    while (nbd_aio_is_connecting(h)) {
        int64_t left = deadline - nbdc_now_ms();
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
    conn_error(uri, *perr, errp);
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

bool nbdc_conn_is_tcp(struct nbd_handle *h)
{
    int fd = nbd_aio_get_fd(h);
    int dom = 0;
    socklen_t len = sizeof(dom);
    return fd >= 0 && getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &dom, &len) == 0 &&
           (dom == AF_INET || dom == AF_INET6);
}

struct nbd_handle *nbdc_conn_open(NbdState *s, int timeout_ms, int *perr, VdError **errp)
{
    struct nbd_handle *h = conn_open_uri(s->uri, s->tls, timeout_ms, perr, errp);
    if (h && s->tcp_cc && conn_set_congestion(s, h, perr, errp) < 0) {
        nbd_close(h);
        return NULL;
    }
    return h;
}

void nbdc_conn_close(struct nbd_handle *h)
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
    __atomic_store_n(&c->up, false, __ATOMIC_RELAXED); /* also read unlocked by nbdc_conn_pick */
    c->killing = false; /* every command of the old handle has completed by now */
    c->down_ms = nbdc_now_ms();
    vd_cond_broadcast(&c->cond);
    vd_mutex_unlock(&c->lock);
    vd_log(VD_LOG_WARN, "nbd: lost the connection to '%s'; reconnecting (commands wait %lld ms)",
           c->s->uri, (long long)c->s->reconnect_ms);
}

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

void nbdc_identity_free(NbdIdentity *id)
{
    free(id->name);
    free(id->descr);
    id->name = id->descr = NULL;
}

void nbdc_identity_of(struct nbd_handle *h, NbdIdentity *id)
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

const char *nbdc_conn_other_export(NbdState *s, struct nbd_handle *h)
{
    NbdIdentity now;
    nbdc_identity_of(h, &now);
    const char *d = identity_diff(&s->id, &now);
    nbdc_identity_free(&now);
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
        struct nbd_handle *h = nbdc_conn_open(s, NBD_RECONNECT_TRY_MS, &err, &local);
        vd_error_free(local);
        const char *other = h ? nbdc_conn_other_export(s, h) : NULL;
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
        nbdc_conn_close(h);
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
    int64_t moved = nbdc_now_ms();
    while (!pump_stopping(c)) {
        if (!c->h || nbd_aio_is_dead(c->h) == 1 || nbd_aio_is_closed(c->h) == 1) {
            link_lost(c);
            link_restore(c);
            moved = nbdc_now_ms();
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
            moved = nbdc_now_ms();
        } else if ((ev & (POLLOUT | POLLHUP | POLLERR)) && (dir & LIBNBD_AIO_DIRECTION_WRITE)) {
            nbd_aio_notify_write(c->h);
            moved = nbdc_now_ms();
        } else if (nbd_aio_in_flight(c->h) <= 0) {
            moved = nbdc_now_ms(); /* an idle link is not a stalled one */
        } else if (stall_ms && fd >= 0 && nbdc_now_ms() - moved >= stall_ms) {
            vd_log(VD_LOG_WARN, "nbd: no progress on '%s' for %lld ms with commands outstanding",
                   c->s->uri, (long long)stall_ms);
            vd_mutex_lock(&c->lock);
            c->killing = true; /* its failing writes are fenced (req_done_cb) */
            c->killed_ms = nbdc_now_ms();
            vd_mutex_unlock(&c->lock);
            conn_kill(c, fd);
            moved = nbdc_now_ms();
        }
    }
    return NULL;
}

int nbdc_conn_start(NbdState *s, NbdConn *c, struct nbd_handle *h)
{
    memset(c, 0, sizeof(*c));
    c->s = s;
    c->h = h;
    c->up = true;
    c->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->wake_fd < 0) {
        nbdc_conn_close(h);
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
        nbdc_conn_close(h);
        c->h = NULL;
        return -r;
    }
    c->pump_started = true;
    return 0;
}

void nbdc_conn_stop(NbdConn *c)
{
    if (!c->pump_started) {
        return;
    }
    __atomic_store_n(&c->stop, true, __ATOMIC_RELEASE);
    pump_kick(c);
    pthread_join(c->pump, NULL);
    nbdc_conn_close(c->h); /* nbd_shutdown drives the socket itself now the pump is gone */
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
    int64_t notice_by = nbdc_now_ms() + 1000;
    bool ok = false;
    while (!c->wrong_export) {
        int64_t now = nbdc_now_ms();
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
           (unsigned long long)len, s->uri, (long long)(until_ms - nbdc_now_ms()));
}

void nbdc_fence_wait(NbdState *s, uint64_t off, uint64_t len)
{
    if (__atomic_load_n(&s->nfences, __ATOMIC_ACQUIRE) == 0) {
        return;
    }
    for (;;) {
        int64_t now = nbdc_now_ms(), until = 0;
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

int nbdc_run_cmds(NbdConn *c, NbdOp op, uint64_t off, uint64_t len, uint8_t *buf,
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

int nbdc_run_one(NbdConn *c, NbdOp op, uint64_t off, uint64_t len, uint32_t flags,
                 nbd_extent_callback *ext)
{
    NbdReq r = {.op = op, .off = off, .len = len, .flags = flags, .ext = ext};
    return reqs_run(c, &r, 1);
}
