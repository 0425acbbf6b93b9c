/*
 * nbd-server.c - the NBD server: listening socket, accept thread, connection threads, the export
 * registry and export drain (quiesce) for node pivots.
 * Locking: srv.lock guards the export list, the connection list and every export's refcnt/clients/
 * deleted fields; exp->lock guards an export's node, tracker, quiesce and in_flight. Never take
 * srv.lock while holding exp->lock. srv.lock is recursive so nbd_export_foreach callbacks may use
 * the accessors and finders. A connection thread owns its NbdConn; others only shutdown() its fd.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "block/dirty-bitmap.h"
#include "nbd/nbd-protocol.h"
#include "util/log.h"
#include "util/lock.h"
#include "util/thread-cache.h"
#include "util/sockperm.h"

#define NBD_HANDSHAKE_TIMEOUT_S 30
#define NBD_SEND_TIMEOUT_S 30
#define NBD_POOL_THREADS 4 /* workers for CPU-bound requests; more start for blocking I/O */
#define NBD_STOP_GRACE_S 5 /* time clients get to take their last replies at stop */

static struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;      /* signalled when a connection ends or an export loses a client */
    bool running;
    bool stopping;
    int listen_fd;
    int wake[2];              /* accept thread wake-up pipe */
    pthread_t accept_thread;
    char *unix_path;          /* unlinked on stop */
    uint32_t max_conns;
    VdTlsCreds *tls_creds;    /* ref held while running; NULL = no TLS */
    VdAuthz *tls_authz;       /* ref held; NULL = no authz */
    unsigned nconns;
    NbdConn *conns;
    NbdExport **exports;
    size_t nexports;
} srv = {
    /* Recursive so that an nbd_export_foreach callback may still use the accessors/finders. */
    .lock = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP,
    .cond = PTHREAD_COND_INITIALIZER,
    .listen_fd = -1,
    .wake = {-1, -1},
};

/* ---------------- exports ---------------- */

static void export_free(NbdExport *exp)
{
    for (uint32_t i = 0; i < exp->nbitmaps; i++) {
        NbdExportBitmap *b = &exp->bitmaps[i];
        if (b->node) { /* busy and referenced once the export was set up */
            vd_bitmap_set_busy(b->node, b->name, false, NULL);
            vd_node_unref(b->node);
        }
        free(b->name);
    }
    free(exp->bitmaps);
    block_tracker_put(exp->tracker);
    if (exp->node) {
        vd_node_unref(exp->node);
    }
    pthread_mutex_destroy(&exp->lock);
    pthread_cond_destroy(&exp->cond);
    free(exp->id);
    free(exp->name);
    free(exp->description);
    free(exp);
}

/* srv.lock held */
static void export_unref_locked(NbdExport *exp)
{
    if (--exp->refcnt == 0) {
        export_free(exp);
    }
}

void nbd_export_unref(NbdExport *exp)
{
    if (!exp) {
        return;
    }
    vd_mutex_lock(&srv.lock);
    export_unref_locked(exp);
    vd_mutex_unlock(&srv.lock);
}

static NbdExport *find_locked(const char *id, const char *name)
{
    for (size_t i = 0; i < srv.nexports; i++) {
        NbdExport *e = srv.exports[i];
        if ((id && strcmp(e->id, id) == 0) || (name && strcmp(e->name, name) == 0)) {
            return e;
        }
    }
    return NULL;
}

NbdExport *nbd_server_get_export(const char *name)
{
    vd_mutex_lock(&srv.lock);
    NbdExport *e = srv.stopping ? NULL : find_locked(NULL, name);
    if (e) {
        e->refcnt++;
    }
    vd_mutex_unlock(&srv.lock);
    return e;
}

void nbd_server_list_exports(void (*cb)(NbdExport *exp, void *opaque), void *opaque)
{
    /* Snapshot with refs so cb (which writes to a socket) runs without srv.lock. */
    vd_mutex_lock(&srv.lock);
    size_t n = srv.nexports;
    NbdExport **copy = n ? calloc(n, sizeof(*copy)) : NULL;
    if (n && !copy) {
        n = 0;
    }
    for (size_t i = 0; i < n; i++) {
        copy[i] = srv.exports[i];
        copy[i]->refcnt++;
    }
    vd_mutex_unlock(&srv.lock);
    for (size_t i = 0; i < n; i++) {
        cb(copy[i], opaque);
        nbd_export_unref(copy[i]);
    }
    free(copy);
}

bool nbd_server_shutting_down(void)
{
    vd_mutex_lock(&srv.lock);
    bool s = srv.stopping;
    vd_mutex_unlock(&srv.lock);
    return s;
}

/* The export as a user of its node (block/users.h): block jobs drain and repoint it there. */
static NbdExport *user_export(VdNodeUser *u)
{
    return (NbdExport *)((char *)u - offsetof(NbdExport, user));
}

static BlockNode *user_node(VdNodeUser *u)
{
    return nbd_export_node(user_export(u));
}

static void user_drain_begin(VdNodeUser *u)
{
    nbd_export_drain_begin(user_export(u));
}

static void user_set_node(VdNodeUser *u, BlockNode *node)
{
    nbd_export_set_node(user_export(u), node);
}

static void user_drain_end(VdNodeUser *u)
{
    nbd_export_drain_end(user_export(u));
}

static const VdNodeUserOps export_user_ops = {
    .node = user_node,
    .drain_begin = user_drain_begin,
    .set_node = user_set_node,
    .drain_end = user_drain_end,
};

NbdExport *nbd_export_add(const char *id, const char *name, BlockNode *node, bool writable,
                          const char *description, VdError **errp)
{
    return nbd_export_add_bitmaps(id, name, node, writable, description, NULL, 0, errp);
}

/* Check the bitmaps an export is to serve, as QEMU's nbd_export_create does (same errors). */
static int check_export_bitmaps(const VdBitmapRef *bitmaps, size_t n, bool writable,
                                VdError **errp)
{
    for (size_t i = 0; i < n; i++) {
        int r = vd_bitmap_check_usable(bitmaps[i].node, bitmaps[i].name, errp);
        if (r < 0) {
            return r;
        }
        /* a read-only export of a bitmap still recording the node's writes: its view moves */
        if (!writable && !bitmaps[i].node->read_only &&
            vd_bitmap_is_recording(bitmaps[i].node, bitmaps[i].name) == 1) {
            vd_error_setg(errp, EINVAL, "Enabled bitmap '%s' incompatible with readonly export",
                          bitmaps[i].name);
            return -EINVAL;
        }
    }
    return 0;
}

NbdExport *nbd_export_add_bitmaps(const char *id, const char *name, BlockNode *node,
                                  bool writable, const char *description,
                                  const VdBitmapRef *bitmaps, size_t nbitmaps, VdError **errp)
{
    return nbd_export_add_full(id, name, node, writable, description, bitmaps, nbitmaps, false,
                               errp);
}

NbdExport *nbd_export_add_full(const char *id, const char *name, BlockNode *node, bool writable,
                               const char *description, const VdBitmapRef *bitmaps,
                               size_t nbitmaps, bool alloc_depth, VdError **errp)
{
    if (!id || !*id || !node) {
        vd_error_setg(errp, EINVAL, "export id and node are required");
        return NULL;
    }
    if (!name) {
        name = node->node_name ? node->node_name : id; /* QEMU: defaults to the node name */
    }
    if (strlen(name) > NBD_MAX_STRING || (description && strlen(description) > NBD_MAX_STRING)) {
        vd_error_setg(errp, EINVAL, "export name or description too long");
        return NULL;
    }
    if (writable && node->read_only) {
        vd_error_setg(errp, EPERM, "node '%s' is read-only, cannot export it writable",
                      node->node_name ? node->node_name : "?");
        return NULL;
    }
    NbdExport *exp = calloc(1, sizeof(*exp));
    if (!exp) {
        vd_error_setg(errp, ENOMEM, "out of memory");
        return NULL;
    }
    exp->id = strdup(id);
    exp->name = strdup(name);
    exp->description = description ? strdup(description) : NULL;
    exp->tracker = block_tracker_get(node);
    if (!exp->id || !exp->name || (description && !exp->description) || !exp->tracker) {
        block_tracker_put(exp->tracker);
        free(exp->id);
        free(exp->name);
        free(exp->description);
        free(exp);
        vd_error_setg(errp, ENOMEM, "out of memory");
        return NULL;
    }
    exp->writable = writable;
    exp->alloc_depth = alloc_depth;
    exp->refcnt = 1;
    pthread_mutex_init(&exp->lock, NULL);
    pthread_cond_init(&exp->cond, NULL);
    if (check_export_bitmaps(bitmaps, nbitmaps, writable, errp) < 0) {
        export_free(exp);
        return NULL;
    }
    exp->bitmaps = calloc(nbitmaps ? nbitmaps : 1, sizeof(*exp->bitmaps));
    if (!exp->bitmaps) {
        export_free(exp);
        vd_error_setg(errp, ENOMEM, "out of memory");
        return NULL;
    }
    for (size_t i = 0; i < nbitmaps; i++) {
        NbdExportBitmap *b = &exp->bitmaps[exp->nbitmaps++];
        b->name = strdup(bitmaps[i].name);
        if (!b->name) {
            export_free(exp);
            vd_error_setg(errp, ENOMEM, "out of memory");
            return NULL;
        }
        /* checked above; the QMP thread alone changes bitmaps, so this cannot fail now */
        vd_bitmap_set_busy(bitmaps[i].node, b->name, true, NULL);
        vd_node_ref(bitmaps[i].node);
        b->node = bitmaps[i].node;
    }

    vd_mutex_lock(&srv.lock);
    int err = 0;
    if (!srv.running || srv.stopping) {
        err = ENOTCONN;
        vd_error_setg(errp, err, "NBD server not running");
    } else if (find_locked(id, NULL)) {
        err = EEXIST;
        vd_error_setg(errp, err, "export id '%s' already exists", id);
    } else if (find_locked(NULL, name)) {
        err = EEXIST;
        vd_error_setg(errp, err, "export name '%s' already exists", name);
    } else {
        NbdExport **n = realloc(srv.exports, (srv.nexports + 1) * sizeof(*n));
        if (!n) {
            err = ENOMEM;
            vd_error_setg(errp, err, "out of memory");
        } else {
            srv.exports = n;
            srv.exports[srv.nexports++] = exp;
        }
    }
    vd_mutex_unlock(&srv.lock);
    if (err) {
        exp->node = NULL;
        export_free(exp);
        return NULL;
    }
    vd_node_ref(node);
    vd_mutex_lock(&exp->lock);
    exp->node = node;
    vd_mutex_unlock(&exp->lock);
    exp->user.ops = &export_user_ops;
    vd_node_user_add(&exp->user);
    return exp;
}

/* srv.lock held: take exp out of the list (its list reference is dropped by the caller). */
static void export_unlist_locked(NbdExport *exp)
{
    for (size_t i = 0; i < srv.nexports; i++) {
        if (srv.exports[i] == exp) {
            memmove(&srv.exports[i], &srv.exports[i + 1],
                    (srv.nexports - i - 1) * sizeof(*srv.exports));
            srv.nexports--;
            vd_node_user_remove(&exp->user);
            break;
        }
    }
    exp->deleted = true;
}

/* srv.lock held: hard-disconnect every client of exp and wait until they are gone. */
static void export_kick_clients_locked(NbdExport *exp)
{
    for (NbdConn *c = srv.conns; c; c = c->next) {
        if (c->exp == exp) {
            shutdown(c->fd, SHUT_RDWR);
        }
    }
    while (exp->clients > 0) {
        vd_cond_wait(&srv.cond, &srv.lock);
    }
}

/*
 * srv.lock held: has the peer of c closed its end? Such a client only finishes its in-flight
 * requests and goes; its connection thread may just not have run yet.
 */
static bool conn_leaving_locked(NbdConn *c)
{
    if (c->fd < 0) {
        return true;
    }
    struct pollfd p = {.fd = c->fd, .events = POLLRDHUP};
    return poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

/*
 * srv.lock held. Safe-mode delete right after a client disconnected (qemu-io has exited) must not
 * see that client as connected: wait, bounded, for clients whose peer has gone to unwind. Returns
 * the clients still attached (0: the export is free).
 */
#define NBD_LEAVING_WAIT_S 5
static unsigned export_wait_leaving_locked(NbdExport *exp)
{
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += NBD_LEAVING_WAIT_S;
    while (exp->clients > 0) {
        for (NbdConn *c = srv.conns; c; c = c->next) {
            if (c->exp == exp && c->attached && !conn_leaving_locked(c)) {
                return exp->clients; /* a client is still connected */
            }
        }
        if (vd_cond_timedwait(&srv.cond, &srv.lock, &deadline) == ETIMEDOUT) {
            break;
        }
    }
    return exp->clients;
}

int nbd_export_del(const char *id, bool force, VdError **errp)
{
    vd_mutex_lock(&srv.lock);
    NbdExport *exp = id ? find_locked(id, NULL) : NULL;
    if (!exp) {
        vd_mutex_unlock(&srv.lock);
        vd_error_setg(errp, ENOENT, "export '%s' not found", id ? id : "");
        return -ENOENT;
    }
    exp->refcnt++; /* the wait drops srv.lock: keep exp alive, see whether it is still listed */
    unsigned busy = force ? 0 : export_wait_leaving_locked(exp);
    bool gone = exp->deleted; /* a server stop took it meanwhile */
    export_unref_locked(exp);
    if (gone) {
        vd_mutex_unlock(&srv.lock);
        vd_error_setg(errp, ENOENT, "export '%s' not found", id);
        return -ENOENT;
    }
    if (busy > 0) {
        vd_mutex_unlock(&srv.lock);
        vd_error_setg(errp, EBUSY, "export '%s' still in use (use mode='hard' to force client "
                      "disconnect)", id);
        return -EBUSY;
    }
    export_unlist_locked(exp);
    export_kick_clients_locked(exp);
    export_unref_locked(exp);
    vd_mutex_unlock(&srv.lock);
    return 0;
}

NbdExport *nbd_export_find(const char *id)
{
    vd_mutex_lock(&srv.lock);
    NbdExport *e = id ? find_locked(id, NULL) : NULL;
    vd_mutex_unlock(&srv.lock);
    return e;
}

NbdExport *nbd_export_find_by_name(const char *name)
{
    vd_mutex_lock(&srv.lock);
    NbdExport *e = name ? find_locked(NULL, name) : NULL;
    vd_mutex_unlock(&srv.lock);
    return e;
}

void nbd_export_foreach(void (*cb)(NbdExport *exp, void *opaque), void *opaque)
{
    vd_mutex_lock(&srv.lock);
    for (size_t i = 0; i < srv.nexports; i++) {
        cb(srv.exports[i], opaque);
    }
    vd_mutex_unlock(&srv.lock);
}

const char *nbd_export_id(const NbdExport *exp) { return exp->id; }
const char *nbd_export_name(const NbdExport *exp) { return exp->name; }
bool nbd_export_writable(const NbdExport *exp) { return exp->writable; }

BlockNode *nbd_export_node(const NbdExport *exp)
{
    NbdExport *e = (NbdExport *)exp;
    vd_mutex_lock(&e->lock);
    BlockNode *n = e->node;
    vd_mutex_unlock(&e->lock);
    return n;
}

unsigned nbd_export_client_count(const NbdExport *exp)
{
    vd_mutex_lock(&srv.lock);
    unsigned n = exp->clients;
    vd_mutex_unlock(&srv.lock);
    return n;
}

int nbd_conn_attach(NbdConn *conn, NbdExport *exp)
{
    vd_mutex_lock(&srv.lock);
    int r = exp->deleted ? -ENOENT : srv.stopping ? -ESHUTDOWN : 0;
    if (r < 0 || conn->exp) {
        export_unref_locked(exp);
        vd_mutex_unlock(&srv.lock);
        return r < 0 ? r : -EINVAL;
    }
    conn->exp = exp;
    conn->attached = true;
    exp->clients++;
    vd_mutex_unlock(&srv.lock);
    return 0;
}

void nbd_export_enter_n(NbdExport *exp, unsigned n, BlockNode **node, BlockTracker **tracker)
{
    vd_mutex_lock(&exp->lock);
    while (exp->quiesce > 0) {
        vd_cond_wait(&exp->cond, &exp->lock);
    }
    exp->in_flight += n;
    *node = exp->node;
    *tracker = exp->tracker;
    vd_mutex_unlock(&exp->lock);
}

void nbd_export_leave(NbdExport *exp)
{
    vd_mutex_lock(&exp->lock);
    if (--exp->in_flight == 0) {
        vd_cond_broadcast(&exp->cond);
    }
    vd_mutex_unlock(&exp->lock);
}

void nbd_export_drain_begin(NbdExport *exp)
{
    vd_mutex_lock(&exp->lock);
    exp->quiesce++;
    while (exp->in_flight > 0) {
        vd_cond_wait(&exp->cond, &exp->lock);
    }
    vd_mutex_unlock(&exp->lock);
}

void nbd_export_set_node(NbdExport *exp, BlockNode *node)
{
    BlockTracker *t = block_tracker_get(node);
    if (!t) {
        return; /* ENOMEM: keep serving the old node rather than crash */
    }
    vd_node_ref(node);
    vd_mutex_lock(&exp->lock);
    BlockNode *old = exp->node;
    BlockTracker *old_t = exp->tracker;
    exp->node = node;
    exp->tracker = t;
    vd_mutex_unlock(&exp->lock);
    block_tracker_put(old_t);
    if (old) {
        vd_node_unref(old);
    }
}

void nbd_export_drain_end(NbdExport *exp)
{
    vd_mutex_lock(&exp->lock);
    if (exp->quiesce > 0 && --exp->quiesce == 0) {
        vd_cond_broadcast(&exp->cond);
    }
    vd_mutex_unlock(&exp->lock);
}

/* ---------------- connections ---------------- */

static void set_timeout(int fd, int optname, int seconds)
{
    struct timeval tv = {.tv_sec = seconds};
    setsockopt(fd, SOL_SOCKET, optname, &tv, sizeof(tv));
}

static void conn_free(NbdConn *c)
{
    pthread_mutex_destroy(&c->send_lock);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cond);
    pthread_cond_destroy(&c->wcond);
    free(c->meta_export);
    nbd_meta_reset(c);
    free(c);
}

static void conn_thread(void *arg)
{
    NbdConn *c = arg;
    vd_thread_name("nbd-conn fd%d", c->fd);
    /* A client that stalls the handshake only holds its own thread, and not for ever. */
    set_timeout(c->fd, SO_RCVTIMEO, NBD_HANDSHAKE_TIMEOUT_S);
    int r = nbd_handshake(c);
    if (r < 0 && r != -ECONNABORTED) {
        vd_log(VD_LOG_INFO, "nbd: client dropped during handshake: %s", strerror(-r));
    }
    if (r == 0 && c->attached) {
        vd_log(VD_LOG_DEBUG, "nbd: client attached to export '%s'", c->exp->name);
        set_timeout(c->fd, SO_RCVTIMEO, 0);
        nbd_transmission(c);
    }
    vd_mutex_lock(&srv.lock);
    if (c->attached) {
        c->exp->clients--;
        c->attached = false;
    }
    for (NbdConn **pp = &srv.conns; *pp; pp = &(*pp)->next) {
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    }
    nbd_tls_close(c);
    close(c->fd);
    c->fd = -1;
    if (c->exp) {
        export_unref_locked(c->exp);
        c->exp = NULL;
    }
    conn_free(c); /* before nconns drops: nbd_server_stop's return means every conn is freed */
    srv.nconns--;
    vd_cond_broadcast(&srv.cond);
    vd_mutex_unlock(&srv.lock);
}

static void accept_one(int fd)
{
    vd_mutex_lock(&srv.lock);
    bool refuse = srv.stopping || (srv.max_conns && srv.nconns >= srv.max_conns);
    vd_mutex_unlock(&srv.lock);
    if (refuse) {
        close(fd);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)); /* fails harmlessly on unix */
    /* A client that stops reading replies must not hold a worker for ever. */
    set_timeout(fd, SO_SNDTIMEO, NBD_SEND_TIMEOUT_S);

    NbdConn *c = calloc(1, sizeof(*c));
    if (!c) {
        close(fd);
        return;
    }
    c->fd = fd;
    c->tls_creds = srv.tls_creds; /* set before the server runs, dropped after its last client */
    c->tls_authz = srv.tls_authz;
    pthread_mutex_init(&c->send_lock, NULL);
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->cond, NULL);
    pthread_cond_init(&c->wcond, NULL);

    vd_mutex_lock(&srv.lock);
    c->next = srv.conns;
    srv.conns = c;
    srv.nconns++;
    /* a recycled thread: clients that connect for one command each do not cost a thread */
    if (vd_thread_run(conn_thread, c) < 0) {
        srv.conns = c->next;
        srv.nconns--;
        vd_mutex_unlock(&srv.lock);
        close(fd);
        conn_free(c);
        return;
    }
    vd_mutex_unlock(&srv.lock);
}

static void *accept_thread(void *arg)
{
    (void)arg;
    vd_thread_name("nbd-accept");
    for (;;) {
        struct pollfd p[2] = {{.fd = srv.listen_fd, .events = POLLIN},
                              {.fd = srv.wake[0], .events = POLLIN}};
        int n = poll(p, 2, -1);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            break;
        }
        if (p[1].revents) {
            break;
        }
        if (p[0].revents & POLLIN) {
            int fd = accept4(srv.listen_fd, NULL, NULL, SOCK_CLOEXEC);
            if (fd < 0) {
                if (errno == EMFILE || errno == ENFILE || errno == ENOMEM) {
                    usleep(100000); /* out of resources: back off instead of spinning */
                }
                continue;
            }
            accept_one(fd);
        }
    }
    return NULL;
}

int nbd_server_add_client(int fd)
{
    if (!nbd_server_running()) {
        close(fd);
        return -ESRCH;
    }
    accept_one(fd);
    return 0;
}

static int listen_unix(const char *path, VdError **errp)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (!path || strlen(path) >= sizeof(sa.sun_path)) {
        vd_error_setg(errp, EINVAL, "invalid unix socket path");
        return -EINVAL;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        int e = errno;
        vd_error_setg_errno(errp, e, "socket");
        return -e;
    }
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) {
        unlink(path); /* stale socket from an earlier run */
    }
    int r = vd_socket_listen_unix(fd, path, 64, "NBD socket", errp);
    if (r < 0) {
        close(fd);
        return r;
    }
    return fd;
}

static int listen_inet(const char *host, const char *port, VdError **errp)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE};
    struct addrinfo *res = NULL;
    int r = getaddrinfo(host, port, &hints, &res);
    if (r != 0) {
        vd_error_setg(errp, EINVAL, "cannot resolve %s:%s: %s", host, port, gai_strerror(r));
        return -EINVAL;
    }
    int err = EADDRNOTAVAIL;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 64) == 0) {
            freeaddrinfo(res);
            return fd;
        }
        err = errno;
        close(fd);
    }
    freeaddrinfo(res);
    vd_error_setg_errno(errp, err, "cannot listen on %s:%s", host, port);
    return -err;
}

int nbd_server_start(const NbdServerAddress *addr, uint32_t max_connections, VdError **errp)
{
    return nbd_server_start_tls(addr, max_connections, NULL, NULL, errp);
}

int nbd_server_start_tls(const NbdServerAddress *addr, uint32_t max_connections,
                         VdTlsCreds *tls_creds, VdAuthz *tls_authz, VdError **errp)
{
    vd_mutex_lock(&srv.lock);
    if (srv.running) {
        vd_mutex_unlock(&srv.lock);
        vd_error_setg(errp, EEXIST, "NBD server already running");
        return -EEXIST;
    }
    vd_mutex_unlock(&srv.lock);

    int fd;
    char *upath = NULL;
    if (addr && addr->type == NBD_ADDR_UNIX) {
        fd = listen_unix(addr->path, errp);
        if (fd >= 0 && !(upath = strdup(addr->path))) {
            close(fd);
            unlink(addr->path);
            vd_error_setg(errp, ENOMEM, "out of memory");
            return -ENOMEM;
        }
    } else {
        const char *host = addr && addr->host ? addr->host : "127.0.0.1";
        const char *port = addr && addr->port ? addr->port : "10809";
        fd = listen_inet(host, port, errp);
    }
    if (fd < 0) {
        return fd;
    }
    int r = nbd_pool_start(NBD_POOL_THREADS);
    if (r < 0 || pipe2(srv.wake, O_CLOEXEC) < 0) {
        if (r == 0) {
            r = -errno;
            nbd_pool_stop();
        }
        close(fd);
        if (upath) {
            unlink(upath);
        }
        free(upath);
        vd_error_setg_errno(errp, -r, "cannot start the NBD server");
        return r;
    }
    vd_mutex_lock(&srv.lock);
    srv.listen_fd = fd;
    srv.unix_path = upath;
    srv.max_conns = max_connections;
    srv.tls_creds = tls_creds;
    srv.tls_authz = tls_authz;
    srv.stopping = false;
    srv.running = true;
    r = pthread_create(&srv.accept_thread, NULL, accept_thread, NULL);
    if (r != 0) {
        srv.running = false;
        srv.tls_creds = NULL;
        srv.tls_authz = NULL;
        vd_mutex_unlock(&srv.lock);
        nbd_pool_stop();
        close(fd);
        close(srv.wake[0]);
        close(srv.wake[1]);
        if (upath) {
            unlink(upath);
        }
        free(upath);
        srv.unix_path = NULL;
        vd_error_setg_errno(errp, r, "cannot start the NBD accept thread");
        return -r;
    }
    vd_mutex_unlock(&srv.lock);
    return 0;
}

void nbd_server_stop(void)
{
    vd_mutex_lock(&srv.lock);
    if (!srv.running || srv.stopping) {
        vd_mutex_unlock(&srv.lock);
        return;
    }
    srv.stopping = true;
    vd_mutex_unlock(&srv.lock);

    /* 1. stop accepting */
    ssize_t w = write(srv.wake[1], "x", 1);
    (void)w;
    pthread_join(srv.accept_thread, NULL);
    close(srv.listen_fd);
    srv.listen_fd = -1;
    close(srv.wake[0]);
    close(srv.wake[1]);
    srv.wake[0] = srv.wake[1] = -1;
    if (srv.unix_path) {
        unlink(srv.unix_path);
        free(srv.unix_path);
        srv.unix_path = NULL;
    }

    /* 2. stop reading from clients; each finishes its in-flight requests, replies, and exits */
    vd_mutex_lock(&srv.lock);
    for (NbdConn *c = srv.conns; c; c = c->next) {
        shutdown(c->fd, SHUT_RD);
    }
    /* A client that does not read its replies would hold us up to the send timeout: cut it off. */
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += NBD_STOP_GRACE_S;
    while (srv.nconns > 0) {
        if (vd_cond_timedwait(&srv.cond, &srv.lock, &deadline) == ETIMEDOUT) {
            for (NbdConn *c = srv.conns; c; c = c->next) {
                shutdown(c->fd, SHUT_RDWR);
            }
            deadline.tv_sec += 3600;
        }
    }
    vd_mutex_unlock(&srv.lock);

    /* 3. no request can be queued any more */
    nbd_pool_stop();

    /* 4. drop the exports */
    vd_mutex_lock(&srv.lock);
    while (srv.nexports > 0) {
        NbdExport *e = srv.exports[srv.nexports - 1];
        export_unlist_locked(e);
        export_unref_locked(e);
    }
    free(srv.exports);
    srv.exports = NULL;
    vd_tls_creds_unref(srv.tls_creds);
    vd_authz_unref(srv.tls_authz);
    srv.tls_creds = NULL;
    srv.tls_authz = NULL;
    srv.running = false;
    srv.stopping = false;
    vd_mutex_unlock(&srv.lock);
}

bool nbd_server_running(void)
{
    vd_mutex_lock(&srv.lock);
    bool r = srv.running && !srv.stopping;
    vd_mutex_unlock(&srv.lock);
    return r;
}
