/*
 * qmp-server.c - the QMP monitor: a UNIX socket (0600) served by one thread with poll(); any number
 * of clients, each answered once per JSON value it sends (errors included), never disconnected for
 * bad input. Commands run on this thread one at a time. Events from other threads go through a
 * locked queue + wake pipe; events emitted on this thread go out at once (before the reply).
 * Deferred callbacks (qmp_defer: job completion, i.e. graph changes from other threads) use the same
 * queue lock and wake pipe and run on this thread between commands, so the graph has one writer.
 */
#include "qmp/qmp.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "qmp/qmp-args.h"
#include "qmp/qmp-internal.h"
#include "util/lock.h"
#include "util/log.h"
#include "util/sockperm.h"
#include "util/thread-cache.h"

#define QMP_MAX_VALUE (16u << 20)   /* one JSON value from a client */
#define QMP_MAX_DEPTH 1024          /* nesting of one value */
#define QMP_MAX_OUTPUT (64u << 20)  /* unsent output before a client is dropped */
#define QMP_DEFAULT_MAX_CLIENTS 64
#define QMP_READ_CHUNK 65536
#define QMP_DUMP_FLAGS (JSON_ENSURE_ASCII | JSON_PRESERVE_ORDER)

/* ---- command registry (registration may happen on any thread before/while serving) ---- */

typedef struct QmpCmd {
    char *name;
    const QmpArgSpec *args; /* NULL: the handler checks its arguments itself */
    QmpCommandFn fn;
} QmpCmd;

static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static QmpCmd *cmds;
static size_t ncmds, cmds_cap;
static void (*quit_fn)(void);

void qmp_register_command(const char *name, const QmpArgSpec *args, QmpCommandFn fn)
{
    if (!name || !fn) {
        return;
    }
    vd_mutex_lock(&reg_lock);
    for (size_t i = 0; i < ncmds; i++) {
        if (!strcmp(cmds[i].name, name)) {
            cmds[i].fn = fn; /* re-registering replaces: the last one wins */
            cmds[i].args = args;
            vd_mutex_unlock(&reg_lock);
            return;
        }
    }
    if (ncmds == cmds_cap) {
        size_t nc = cmds_cap ? cmds_cap * 2 : 32;
        QmpCmd *n = realloc(cmds, nc * sizeof(*n));
        if (!n) {
            vd_mutex_unlock(&reg_lock);
            vd_log(VD_LOG_ERROR, "out of memory registering QMP command '%s'", name);
            return;
        }
        cmds = n;
        cmds_cap = nc;
    }
    char *dup = strdup(name);
    if (dup) {
        cmds[ncmds].name = dup;
        cmds[ncmds].fn = fn;
        cmds[ncmds].args = args;
        ncmds++;
    }
    vd_mutex_unlock(&reg_lock);
}

/* The handler of name (NULL if none) and its argument table (*args; NULL: checks its own). */
static QmpCommandFn find_command(const char *name, const QmpArgSpec **args)
{
    QmpCommandFn fn = NULL;
    vd_mutex_lock(&reg_lock);
    for (size_t i = 0; i < ncmds; i++) {
        if (!strcmp(cmds[i].name, name)) {
            fn = cmds[i].fn;
            *args = cmds[i].args;
            break;
        }
    }
    vd_mutex_unlock(&reg_lock);
    return fn;
}

json_t *qmp_command_list(void)
{
    json_t *list = json_array();
    if (!list) {
        return NULL;
    }
    vd_mutex_lock(&reg_lock);
    for (size_t i = 0; i < ncmds; i++) {
        if (json_array_append_new(list, json_pack("{s:s}", "name", cmds[i].name)) < 0) {
            json_decref(list);
            list = NULL;
            break;
        }
    }
    vd_mutex_unlock(&reg_lock);
    return list;
}

void qmp_set_quit_handler(void (*fn)(void))
{
    vd_mutex_lock(&reg_lock);
    quit_fn = fn;
    vd_mutex_unlock(&reg_lock);
}

void (*qmp_quit_handler(void))(void)
{
    vd_mutex_lock(&reg_lock);
    void (*fn)(void) = quit_fn;
    vd_mutex_unlock(&reg_lock);
    return fn;
}

json_t *qmp_version_object(void)
{
    return json_pack("{s:{s:i,s:i,s:i},s:s}", "qemu", "micro", QMP_QEMU_MICRO, "minor",
                     QMP_QEMU_MINOR, "major", QMP_QEMU_MAJOR, "package", "vdisk-" VDISK_QMP_PACKAGE_VERSION);
}

/* ---- clients ---- */

typedef struct QmpClient {
    int fd;
    bool negotiated;
    bool dead;
    /* input scanner state for the JSON value being collected */
    char *in;
    size_t in_len, in_cap;
    bool started;   /* a value has begun */
    bool scalar;    /* the value is a bare top-level scalar (not {..} / [..] / "..") */
    bool in_str, esc;
    int depth;
    uint64_t last_active; /* srv.activity when this client last sent something */
    bool overflow;  /* too big or too deep: being skipped, answered with an error at its end */
    bool too_deep;
    /* pending output */
    char *out;
    size_t out_off, out_len, out_cap;
} QmpClient;

static struct {
    bool running;
    pthread_t thread;
    int listen_fd;
    int wake[2];
    char *path;
    bool stop; /* set under ev_lock, read by the thread after a wake-up */
    uint64_t activity; /* counts reads from clients: the recency of each client's last input */
    QmpClient **clients;
    size_t nclients;
} srv = {.listen_fd = -1, .wake = {-1, -1}};

/* Event queue: text lines waiting for the QMP thread. */
typedef struct QmpEv {
    struct QmpEv *next;
    char *text;
} QmpEv;

static pthread_mutex_t ev_lock = PTHREAD_MUTEX_INITIALIZER;
static QmpEv *ev_head, *ev_tail;
static bool ev_accepting; /* the server runs: queue events and poke the wake pipe */
static QmpDeferred *bh_head, *bh_tail; /* ev_lock; only while ev_accepting */

int qmp_defer(QmpDeferred *d)
{
    vd_mutex_lock(&ev_lock);
    if (!ev_accepting) {
        vd_mutex_unlock(&ev_lock);
        return -ESRCH;
    }
    d->next = NULL;
    if (bh_tail) {
        bh_tail->next = d;
    } else {
        bh_head = d;
    }
    bh_tail = d;
    /* Under the lock so the pipe cannot be closed under us by qmp_server_stop. */
    ssize_t w = write(srv.wake[1], "b", 1);
    (void)w; /* a full pipe already means "wake up" */
    vd_mutex_unlock(&ev_lock);
    return 0;
}

bool qmp_on_thread(void)
{
    vd_mutex_lock(&ev_lock);
    bool on = ev_accepting && pthread_equal(pthread_self(), srv.thread);
    vd_mutex_unlock(&ev_lock);
    return on;
}

/* Run every queued callback (QMP thread, or the stopping thread after the join), in order. */
static void run_deferred(void)
{
    for (;;) {
        vd_mutex_lock(&ev_lock);
        QmpDeferred *d = bh_head;
        if (d) {
            bh_head = d->next;
            if (!bh_head) {
                bh_tail = NULL;
            }
        }
        vd_mutex_unlock(&ev_lock);
        if (!d) {
            return;
        }
        /* d may be freed by fn: read it first. */
        void (*fn)(void *) = d->fn;
        void *opaque = d->opaque;
        fn(opaque);
    }
}

static void client_flush(QmpClient *c)
{
    if (c->fd < 0) {
        c->out_off = c->out_len = 0; /* a socketless session (qmp_session_run): answers dropped */
        return;
    }
    while (!c->dead && c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                c->dead = true;
            }
            break;
        }
        c->out_off += (size_t)n;
    }
    if (c->out_off == c->out_len) {
        c->out_off = c->out_len = 0;
    }
}

/* Queue text (a line without its terminator) for the client and try to send it now. */
static void client_send_text(QmpClient *c, const char *text)
{
    if (c->dead) {
        return;
    }
    size_t len = strlen(text);
    size_t need = c->out_len + len + 2;
    if (need - c->out_off > QMP_MAX_OUTPUT) {
        vd_log(VD_LOG_WARN, "QMP client does not read its replies; disconnecting it");
        c->dead = true;
        return;
    }
    if (c->out_off > 0 && need > c->out_cap) {
        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off;
        c->out_off = 0;
        need = c->out_len + len + 2;
    }
    if (need > c->out_cap) {
        size_t nc = c->out_cap ? c->out_cap : 4096;
        while (nc < need) {
            nc *= 2;
        }
        char *n = realloc(c->out, nc);
        if (!n) {
            c->dead = true;
            return;
        }
        c->out = n;
        c->out_cap = nc;
    }
    memcpy(c->out + c->out_len, text, len);
    /* QEMU ends every line with CRLF; clients split on '\n' either way. */
    memcpy(c->out + c->out_len + len, "\r\n", 2);
    c->out_len += len + 2;
    client_flush(c);
}

static void client_send_json(QmpClient *c, json_t *obj)
{
    char *text = obj ? json_dumps(obj, QMP_DUMP_FLAGS) : NULL;
    if (!text) {
        client_send_text(c, "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Out of memory\"}}");
        return;
    }
    client_send_text(c, text);
    free(text);
}

static void client_send_error(QmpClient *c, json_t *id, const char *cls, const char *desc)
{
    json_t *reply = json_object();
    json_t *err = json_pack("{s:s,s:s}", "class", cls, "desc", desc ? desc : "Unknown error");
    if (reply && id) {
        json_object_set(reply, "id", id);
    }
    if (reply && err) {
        json_object_set_new(reply, "error", err);
        err = NULL;
    }
    client_send_json(c, reply);
    json_decref(err);
    json_decref(reply);
}

/* Wait (bounded) until the client's output is sent: used before acting on "quit". */
static void client_flush_blocking(QmpClient *c, int timeout_ms)
{
    while (!c->dead && c->out_len > c->out_off && timeout_ms > 0) {
        struct pollfd p = {.fd = c->fd, .events = POLLOUT};
        int r = poll(&p, 1, 50);
        if (r < 0 && errno != EINTR) {
            break;
        }
        client_flush(c);
        timeout_ms -= 50;
    }
}

static void deliver_event_text(const char *text)
{
    for (size_t i = 0; i < srv.nclients; i++) {
        if (srv.clients[i]->negotiated) {
            client_send_text(srv.clients[i], text);
        }
    }
}

static void drain_event_queue(void)
{
    vd_mutex_lock(&ev_lock);
    QmpEv *list = ev_head;
    ev_head = ev_tail = NULL;
    vd_mutex_unlock(&ev_lock);
    while (list) {
        QmpEv *next = list->next;
        deliver_event_text(list->text);
        free(list->text);
        free(list);
        list = next;
    }
}

void qmp_event_emit(const char *name, json_t *data)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    json_t *ev = json_pack("{s:{s:I,s:I},s:s}", "timestamp", "seconds", (json_int_t)tv.tv_sec,
                           "microseconds", (json_int_t)tv.tv_usec, "event", name ? name : "");
    if (ev && data) {
        json_object_set(ev, "data", data);
    }
    json_decref(data);
    char *text = ev ? json_dumps(ev, QMP_DUMP_FLAGS) : NULL;
    json_decref(ev);
    if (!text) {
        vd_log(VD_LOG_WARN, "out of memory emitting QMP event %s", name ? name : "");
        return;
    }

    vd_mutex_lock(&ev_lock);
    bool on_thread = ev_accepting && pthread_equal(pthread_self(), srv.thread);
    if (on_thread) {
        /* From a command handler: keep order with earlier queued events, then send now. */
        vd_mutex_unlock(&ev_lock);
        drain_event_queue();
        deliver_event_text(text);
        free(text);
        return;
    }
    if (!ev_accepting) {
        vd_mutex_unlock(&ev_lock);
        free(text);
        return;
    }
    QmpEv *e = calloc(1, sizeof(*e));
    if (!e) {
        vd_mutex_unlock(&ev_lock);
        free(text);
        return;
    }
    e->text = text;
    if (ev_tail) {
        ev_tail->next = e;
    } else {
        ev_head = e;
    }
    ev_tail = e;
    /* Written under the lock so the pipe cannot be closed under us by qmp_server_stop. */
    ssize_t w = write(srv.wake[1], "e", 1);
    (void)w; /* a full pipe already means "wake up" */
    vd_mutex_unlock(&ev_lock);
}

/* ---- dispatch ---- */

static void handle_request(QmpClient *c, json_t *req)
{
    if (!json_is_object(req)) {
        client_send_error(c, NULL, "GenericError", "QMP input must be a JSON object");
        return;
    }
    json_t *id = json_object_get(req, "id");
    const char *key;
    json_t *val;
    json_object_foreach(req, key, val) {
        char msg[256];
        if (!strcmp(key, "execute")) {
            if (!json_is_string(val)) {
                client_send_error(c, id, "GenericError",
                                  "QMP input member 'execute' must be a string");
                return;
            }
        } else if (!strcmp(key, "arguments")) {
            if (!json_is_object(val)) {
                client_send_error(c, id, "GenericError",
                                  "QMP input member 'arguments' must be an object");
                return;
            }
        } else if (strcmp(key, "id") != 0) {
            /* exec-oob included: out-of-band execution is not offered in the greeting. */
            snprintf(msg, sizeof(msg), "QMP input member '%.200s' is unexpected", key);
            client_send_error(c, id, "GenericError", msg);
            return;
        }
    }
    json_t *exec = json_object_get(req, "execute");
    if (!exec) {
        client_send_error(c, id, "GenericError", "QMP input lacks member 'execute'");
        return;
    }
    const char *name = json_string_value(exec);
    json_t *args = json_object_get(req, "arguments");
    json_t *empty = NULL;
    if (!args) {
        args = empty = json_object();
    }
    json_t *ret = NULL;
    VdError *err = NULL;
    const char *cls = "GenericError";

    if (!strcmp(name, "qmp_capabilities")) {
        static const QmpArgSpec spec[] = {{"enable", QA_ARRAY}, {NULL}};
        if (c->negotiated) {
            cls = "CommandNotFound";
            vd_error_setg(&err, EINVAL,
                          "Capabilities negotiation is already complete, command ignored");
        } else if (qmp_args_check1(args, "", spec, &err) == 0) {
            json_t *en = json_object_get(args, "enable");
            size_t i;
            json_t *cap;
            json_array_foreach(en, i, cap) {
                if (!json_is_string(cap)) {
                    vd_error_setg(&err, EINVAL,
                                  "Invalid parameter type for 'enable[%zu]', expected: string", i);
                } else if (!strcmp(json_string_value(cap), "oob")) {
                    vd_error_setg(&err, EINVAL, "Capability 'oob' not available");
                } else {
                    vd_error_setg(&err, EINVAL, "Parameter 'enable[%zu]' does not accept value "
                                  "'%s'", i, json_string_value(cap));
                }
                break;
            }
            if (!err) {
                c->negotiated = true;
                ret = json_object();
            }
        }
    } else if (!c->negotiated) {
        cls = "CommandNotFound";
        vd_error_setg(&err, EINVAL, "Expecting capabilities negotiation with 'qmp_capabilities'");
    } else {
        const QmpArgSpec *spec = NULL;
        QmpCommandFn fn = find_command(name, &spec);
        if (!fn) {
            cls = "CommandNotFound";
            vd_error_setg(&err, EINVAL, "The command %s has not been found", name);
        } else if (!spec || qmp_args_check1(args, "", spec, &err) == 0) {
            ret = fn(args, &err);
            if (!ret) {
                if (!err) {
                    vd_error_setg(&err, EIO, "Command %s failed", name);
                }
                if (vd_error_code(err) == ENOENT) {
                    cls = "DeviceNotFound";
                } else if (vd_error_code(err) == ENODEV) {
                    cls = "DeviceNotActive"; /* QEMU's class for a missing block job */
                }
            }
        }
    }

    if (ret) {
        json_t *reply = json_object();
        if (reply) {
            json_object_set_new(reply, "return", ret);
            ret = NULL;
            if (id) {
                json_object_set(reply, "id", id);
            }
        }
        client_send_json(c, reply);
        json_decref(reply);
        json_decref(ret);
        if (!strcmp(name, "quit")) {
            void (*fn)(void) = qmp_quit_handler();
            client_flush_blocking(c, 1000);
            if (fn) {
                fn();
            }
        }
    } else {
        client_send_error(c, id, cls, vd_error_msg(err));
        vd_error_free(err);
    }
    json_decref(empty);
}

static void client_value_done(QmpClient *c)
{
    if (c->overflow) {
        client_send_error(c, NULL, "GenericError",
                          c->too_deep ? "JSON parse error, nesting too deep"
                                                   : "JSON parse error, input too large");
    } else {
        json_error_t jerr;
        json_t *v = json_loadb(c->in, c->in_len, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &jerr);
        if (!v) {
            char msg[300];
            /* QEMU's wording where it is short and stable; jansson's otherwise. */
            snprintf(msg, sizeof(msg), "JSON parse error, %s",
                     strncmp(jerr.text, "duplicate object key", 20) ? jerr.text : "duplicate key");
            client_send_error(c, NULL, "GenericError", msg);
        } else {
            handle_request(c, v);
            json_decref(v);
        }
    }
    c->in_len = 0;
    c->started = c->scalar = c->in_str = c->esc = c->overflow = c->too_deep = false;
    c->depth = 0;
}

static void client_append(QmpClient *c, char ch)
{
    if (c->overflow) {
        return;
    }
    if (c->in_len + 1 > QMP_MAX_VALUE) {
        c->overflow = true;
        return;
    }
    if (c->in_len + 1 > c->in_cap) {
        size_t nc = c->in_cap ? c->in_cap * 2 : 1024;
        char *n = realloc(c->in, nc);
        if (!n) {
            c->overflow = true;
            return;
        }
        c->in = n;
        c->in_cap = nc;
    }
    c->in[c->in_len++] = ch;
}

static bool is_ws(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n';
}

/* Feed received bytes through the value scanner; completed values are handled at once. */
static void client_feed(QmpClient *c, const char *buf, size_t len)
{
    for (size_t i = 0; i < len && !c->dead; i++) {
        char ch = buf[i];
        if (c->started && c->scalar) {
            /* A bare scalar ends at whitespace or where a structured value would begin. */
            if (is_ws(ch) || strchr("{}[]\"", ch)) {
                client_value_done(c);
                if (is_ws(ch)) {
                    continue;
                }
            } else {
                client_append(c, ch);
                continue;
            }
        }
        if (!c->started) {
            if (is_ws(ch)) {
                continue;
            }
            if (ch == '}' || ch == ']') {
                client_send_error(c, NULL, "GenericError", "JSON parse error, expecting value");
                continue;
            }
            c->started = true;
            client_append(c, ch);
            if (ch == '{' || ch == '[') {
                c->depth = 1;
            } else if (ch == '"') {
                c->in_str = true;
            } else {
                c->scalar = true;
            }
            continue;
        }
        client_append(c, ch);
        if (c->in_str) {
            if (c->esc) {
                c->esc = false;
            } else if (ch == '\\') {
                c->esc = true;
            } else if (ch == '"') {
                c->in_str = false;
                if (c->depth == 0) {
                    client_value_done(c);
                }
            }
        } else if (ch == '"') {
            c->in_str = true;
        } else if (ch == '{' || ch == '[') {
            if (++c->depth > QMP_MAX_DEPTH) {
                c->overflow = c->too_deep = true;
                if (c->depth > (1 << 28)) {
                    c->dead = true; /* endless nesting: no end of value to resync on */
                }
            }
        } else if (ch == '}' || ch == ']') {
            if (--c->depth == 0) {
                client_value_done(c);
            }
        }
    }
}

static void client_free(QmpClient *c)
{
    if (c->fd >= 0) {
        close(c->fd);
    }
    free(c->in);
    free(c->out);
    free(c);
}

static unsigned max_clients = QMP_DEFAULT_MAX_CLIENTS;

void qmp_server_set_max_clients(unsigned n)
{
    max_clients = n ? n : 1;
}

/*
 * At the limit, the client that has been quiet longest makes room for the new one: idle or
 * stuck connections can never lock the management client out (a refusal would), and only the
 * socket's owner (mode 0600/0660) can connect at all.
 */
static void make_room(void)
{
    size_t live = 0;
    QmpClient *quietest = NULL;
    for (size_t i = 0; i < srv.nclients; i++) {
        QmpClient *c = srv.clients[i];
        if (c->dead) {
            continue;
        }
        live++;
        if (!quietest || c->last_active < quietest->last_active) {
            quietest = c;
        }
    }
    if (live >= max_clients && quietest) {
        vd_log(VD_LOG_WARN, "QMP: %zu clients (the limit): closing the one quiet longest", live);
        quietest->dead = true;
        shutdown(quietest->fd, SHUT_RDWR);
    }
}

/* Accept one pending connection: false when none is left. */
static bool accept_client(void)
{
    int fd = accept4(srv.listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
        return false;
    }
    make_room();
    QmpClient *c = calloc(1, sizeof(*c));
    QmpClient **n = realloc(srv.clients, (srv.nclients + 1) * sizeof(*n));
    if (!c || !n) {
        free(c);
        if (n) {
            srv.clients = n;
        }
        close(fd);
        return false;
    }
    srv.clients = n;
    c->fd = fd;
    c->last_active = ++srv.activity;
    srv.clients[srv.nclients++] = c;
    json_t *greet = json_pack("{s:{s:o,s:[]}}", "QMP", "version", qmp_version_object(),
                              "capabilities");
    client_send_json(c, greet);
    json_decref(greet);
    return true;
}

static void *server_thread(void *arg)
{
    (void)arg;
    vd_thread_name("qmp");
    struct pollfd *pfds = NULL;
    size_t pfds_cap = 0;
    for (;;) {
        vd_mutex_lock(&ev_lock);
        bool stop = srv.stop;
        vd_mutex_unlock(&ev_lock);
        if (stop) {
            break;
        }
        size_t n = 2 + srv.nclients;
        if (n > pfds_cap) {
            struct pollfd *np = realloc(pfds, n * sizeof(*np));
            if (!np) {
                poll(NULL, 0, 100); /* out of memory: back off and retry */
                continue;
            }
            pfds = np;
            pfds_cap = n;
        }
        pfds[0] = (struct pollfd){.fd = srv.wake[0], .events = POLLIN};
        pfds[1] = (struct pollfd){.fd = srv.listen_fd, .events = POLLIN};
        for (size_t i = 0; i < srv.nclients; i++) {
            QmpClient *c = srv.clients[i];
            pfds[2 + i] = (struct pollfd){
                .fd = c->fd, .events = POLLIN | (c->out_len > c->out_off ? POLLOUT : 0)};
        }
        int r = poll(pfds, n, -1);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            vd_log(VD_LOG_ERROR, "QMP: poll: %s", strerror(errno));
            break;
        }
        if (pfds[0].revents) {
            char buf[256];
            while (read(srv.wake[0], buf, sizeof(buf)) > 0) {
            }
            drain_event_queue();
            run_deferred();
        }
        /* Clients first: the array may grow in accept_client, and pfds matches the old one. */
        size_t nold = srv.nclients;
        for (size_t i = 0; i < nold; i++) {
            QmpClient *c = srv.clients[i];
            short re = pfds[2 + i].revents;
            if (re & POLLOUT) {
                client_flush(c);
            }
            if (re & (POLLIN | POLLHUP | POLLERR)) {
                char buf[QMP_READ_CHUNK];
                ssize_t got = recv(c->fd, buf, sizeof(buf), MSG_DONTWAIT);
                if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR &&
                                 errno != EWOULDBLOCK)) {
                    c->dead = true;
                } else if (got > 0) {
                    c->last_active = ++srv.activity;
                    client_feed(c, buf, (size_t)got);
                }
            }
        }
        /* Every pending connection (bounded: a flood must not starve the clients). */
        for (int i = 0; i < 256 && (pfds[1].revents & POLLIN) && accept_client(); i++) {
        }
        size_t k = 0;
        for (size_t i = 0; i < srv.nclients; i++) {
            if (srv.clients[i]->dead) {
                client_free(srv.clients[i]);
            } else {
                srv.clients[k++] = srv.clients[i];
            }
        }
        srv.nclients = k;
    }
    free(pfds);
    return NULL;
}

/* ---- start / stop ---- */

static int prepare_path(const char *path, VdError **errp)
{
    struct stat st;
    if (lstat(path, &st) < 0) {
        return 0;
    }
    if (!S_ISSOCK(st.st_mode)) {
        vd_error_setg(errp, EEXIST, "QMP socket path '%s' exists and is not a socket", path);
        return -EEXIST;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        int e = errno;
        vd_error_setg_errno(errp, e, "Failed to create socket");
        return -e;
    }
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    memcpy(sa.sun_path, path, strlen(path) + 1);
    int r = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
    close(fd);
    if (r == 0) {
        vd_error_setg(errp, EADDRINUSE, "QMP socket '%s' is in use by another process", path);
        return -EADDRINUSE;
    }
    /* Nobody listens: a stale socket from a daemon that died. */
    unlink(path);
    return 0;
}

static void register_commands(void)
{
    qmp_commands_core_register();
    qmp_commands_transaction_register();
    qmp_commands_block_register();
    qmp_commands_nbd_register();
    qmp_commands_object_register();
    qmp_commands_jobs_register();
    qmp_commands_blockops_register();
    qmp_commands_bitmap_register();
}

int qmp_session_run(const char *buf, size_t len, VdError **errp)
{
    if (srv.running) {
        vd_error_setg(errp, EBUSY, "The QMP server runs: its thread runs the commands");
        return -EBUSY;
    }
    static bool registered;
    if (!registered) {
        register_commands();
        registered = true;
    }
    QmpClient c = {.fd = -1};
    client_feed(&c, buf, len);
    free(c.in); /* a value cut off by the end of input is dropped, as at a disconnect */
    free(c.out);
    return 0;
}

int qmp_server_start(const char *socket_path, VdError **errp)
{
    if (srv.running) {
        vd_error_setg(errp, EEXIST, "The QMP server is already running");
        return -EEXIST;
    }
    if (!socket_path || !*socket_path) {
        vd_error_setg(errp, EINVAL, "No QMP socket path given");
        return -EINVAL;
    }
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(socket_path) >= sizeof(sa.sun_path)) {
        vd_error_setg(errp, ENAMETOOLONG, "UNIX socket path '%s' is too long", socket_path);
        return -ENAMETOOLONG;
    }
    memcpy(sa.sun_path, socket_path, strlen(socket_path) + 1);
    int r = prepare_path(socket_path, errp);
    if (r < 0) {
        return r;
    }

    register_commands();

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        r = -errno;
        vd_error_setg_errno(errp, -r, "Failed to create QMP socket");
        return r;
    }
    if ((r = vd_socket_listen_unix(fd, socket_path, 16, "QMP socket", errp)) < 0) {
        close(fd);
        return r;
    }
    if (pipe2(srv.wake, O_CLOEXEC | O_NONBLOCK) < 0) {
        r = -errno;
        vd_error_setg_errno(errp, -r, "Failed to create a pipe");
        close(fd);
        unlink(socket_path);
        return r;
    }
    srv.path = strdup(socket_path);
    srv.listen_fd = fd;
    srv.stop = false;
    vd_mutex_lock(&ev_lock);
    ev_accepting = true;
    /* Hold ev_lock across creation so srv.thread is set before emitters compare with it. */
    r = pthread_create(&srv.thread, NULL, server_thread, NULL);
    if (r != 0) {
        ev_accepting = false;
        vd_mutex_unlock(&ev_lock);
        vd_error_setg_errno(errp, r, "Failed to start the QMP thread");
        close(fd);
        close(srv.wake[0]);
        close(srv.wake[1]);
        srv.wake[0] = srv.wake[1] = srv.listen_fd = -1;
        unlink(socket_path);
        free(srv.path);
        srv.path = NULL;
        return -r;
    }
    vd_mutex_unlock(&ev_lock);
    srv.running = true;
    return 0;
}

void qmp_server_stop(void)
{
    if (!srv.running) {
        return;
    }
    vd_mutex_lock(&ev_lock);
    srv.stop = true;
    ssize_t w = write(srv.wake[1], "s", 1);
    (void)w;
    vd_mutex_unlock(&ev_lock);
    pthread_join(srv.thread, NULL);

    vd_mutex_lock(&ev_lock);
    ev_accepting = false;
    close(srv.wake[1]);
    srv.wake[1] = -1;
    vd_mutex_unlock(&ev_lock);
    drain_event_queue(); /* sends what was queued before the stop */
    /*
     * Queued before ev_accepting went false: run them here (no QMP thread any more, and later
     * qmp_defer calls fail, so their callers run their work themselves).
     */
    run_deferred();
    close(srv.wake[0]);
    srv.wake[0] = -1;

    for (size_t i = 0; i < srv.nclients; i++) {
        client_flush(srv.clients[i]); /* best effort, never blocks */
        client_free(srv.clients[i]);
    }
    free(srv.clients);
    srv.clients = NULL;
    srv.nclients = 0;
    close(srv.listen_fd);
    srv.listen_fd = -1;
    if (srv.path) {
        unlink(srv.path);
        free(srv.path);
        srv.path = NULL;
    }
    srv.running = false;
}
