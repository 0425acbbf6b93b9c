/*
 * virsh-qmp.c - a small blocking QMP client for the online `vdisk` commands: connect to a UNIX
 * socket, read the greeting, negotiate, execute commands with an id, and queue every event that
 * arrives meanwhile so the caller can wait for job events without races (QEMU and vdiskd send an
 * event caused by a command before that command's reply). Single-threaded; messages are lines.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "tools/virsh.h"

/* A reply that takes longer than this means the server is stuck: give up rather than hang. */
#define QMPC_REPLY_TIMEOUT_MS 120000
/* One message may be large (query-named-block-nodes of a deep chain) but not unbounded. */
#define QMPC_MAX_LINE (64u << 20)

struct QmpConn {
    int fd;
    char *buf;       /* bytes received, not yet split into lines */
    size_t len, cap;
    json_t *events;  /* queued events, oldest first */
    long next_id;
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

const char *virsh_socket_path(const char *opt)
{
    if (opt && *opt) {
        return opt;
    }
    const char *env = getenv("VDISK_SOCKET");
    return env && *env ? env : VIRSH_DEFAULT_SOCKET;
}

/* A failed poll/recv: -EINTR when a signal interrupted it (not an error here), else -errno with
 * "<what> failed" in *errp. */
static int sys_failed(const char *what, VdError **errp)
{
    int e = errno;
    if (e == EINTR) {
        return -EINTR;
    }
    vd_error_setg_errno(errp, e, "QMP %s failed", what);
    return -e;
}

/*
 * Read whatever is available within timeout_ms into c->buf. 1 = got bytes, 0 = timeout,
 * -EINTR = interrupted by a signal, other -errno = error (EOF is -ECONNRESET).
 */
static int fill(QmpConn *c, int timeout_ms, VdError **errp)
{
    struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
    int r = poll(&pfd, 1, timeout_ms);
    if (r < 0) {
        return sys_failed("poll", errp);
    }
    if (r == 0) {
        return 0;
    }
    if (c->cap - c->len < 65536) {
        if (c->cap >= QMPC_MAX_LINE) {
            vd_error_setg(errp, EPROTO, "QMP message too long");
            return -EPROTO;
        }
        size_t ncap = c->cap ? c->cap * 2 : 131072;
        char *nb = realloc(c->buf, ncap);
        if (!nb) {
            vd_error_setg(errp, ENOMEM, "Out of memory");
            return -ENOMEM;
        }
        c->buf = nb;
        c->cap = ncap;
    }
    ssize_t n = recv(c->fd, c->buf + c->len, c->cap - c->len - 1, 0);
    if (n < 0) {
        return sys_failed("read", errp);
    }
    if (n == 0) {
        vd_error_setg(errp, ECONNRESET, "QMP connection closed by the server");
        return -ECONNRESET;
    }
    c->len += (size_t)n;
    return 1;
}

/* Pop one complete line as JSON; NULL if no complete line is buffered (or it was junk: *bad). */
static json_t *pop_message(QmpConn *c, bool *bad)
{
    *bad = false;
    for (;;) {
        char *nl = c->len ? memchr(c->buf, '\n', c->len) : NULL;
        if (!nl) {
            return NULL;
        }
        size_t linelen = (size_t)(nl - c->buf);
        json_error_t jerr;
        json_t *msg = NULL;
        /* Skip blank lines (a bare CRLF). */
        size_t i = 0;
        while (i < linelen && (c->buf[i] == ' ' || c->buf[i] == '\r' || c->buf[i] == '\t')) {
            i++;
        }
        if (i < linelen) {
            msg = json_loadb(c->buf, linelen, 0, &jerr);
        }
        memmove(c->buf, nl + 1, c->len - linelen - 1);
        c->len -= linelen + 1;
        if (i == linelen) {
            continue;
        }
        if (!msg || !json_is_object(msg)) {
            json_decref(msg);
            *bad = true;
            return NULL;
        }
        return msg;
    }
}

/* Next message within deadline (absolute ms); NULL on timeout (*errp stays NULL) or error. */
static json_t *next_message(QmpConn *c, int64_t deadline, int *rc, VdError **errp)
{
    *rc = 0;
    for (;;) {
        bool bad;
        json_t *msg = pop_message(c, &bad);
        if (msg) {
            return msg;
        }
        if (bad) {
            vd_error_setg(errp, EPROTO, "QMP server sent malformed JSON");
            *rc = -EPROTO;
            return NULL;
        }
        int64_t left = deadline - now_ms();
        if (left <= 0) {
            return NULL;
        }
        int r = fill(c, (int)left, errp);
        if (r < 0 && r != -EINTR) {
            *rc = r;
            return NULL;
        }
        if (r == -EINTR) {
            *rc = -EINTR;
            return NULL;
        }
    }
}

static int send_all(QmpConn *c, const char *s, size_t n, VdError **errp)
{
    while (n) {
        ssize_t w = send(c->fd, s, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) {
                continue;
            }
            vd_error_setg_errno(errp, errno, "QMP write failed");
            return -errno;
        }
        s += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Send {"execute": cmd, "arguments": args, "id": id} and wait for the reply with that id. */
static json_t *execute_raw(QmpConn *c, const char *cmd, json_t *args, VdError **errp)
{
    long id = ++c->next_id;
    json_t *req = json_pack("{s:s,s:i}", "execute", cmd, "id", (json_int_t)id);
    if (!req) {
        json_decref(args);
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return NULL;
    }
    if (args) {
        json_object_set_new(req, "arguments", args);
    }
    char *text = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    if (!text) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return NULL;
    }
    size_t tl = strlen(text);
    int r = send_all(c, text, tl, errp);
    if (r == 0) {
        r = send_all(c, "\n", 1, errp);
    }
    free(text);
    if (r < 0) {
        return NULL;
    }
    int64_t deadline = now_ms() + QMPC_REPLY_TIMEOUT_MS;
    for (;;) {
        int rc;
        json_t *msg = next_message(c, deadline, &rc, errp);
        if (!msg) {
            if (rc == -EINTR) {
                continue; /* a reply must still be read: the caller handles the signal later */
            }
            if (rc == 0) {
                vd_error_setg(errp, ETIMEDOUT, "No reply to '%s' from the QMP server", cmd);
            }
            return NULL;
        }
        if (json_object_get(msg, "event")) {
            json_array_append_new(c->events, msg);
            continue;
        }
        json_t *rid = json_object_get(msg, "id");
        if (!json_is_integer(rid) || json_integer_value(rid) != id) {
            /* A reply without our id: QEMU answers a request it could not parse without one. */
            if (!rid && json_object_get(msg, "error")) {
                /* fall through: report it as our error */
            } else {
                json_decref(msg);
                continue;
            }
        }
        return msg;
    }
}

json_t *qmpc_execute(QmpConn *c, const char *cmd, json_t *args, VdError **errp)
{
    json_t *msg = execute_raw(c, cmd, args, errp);
    if (!msg) {
        return NULL;
    }
    json_t *err = json_object_get(msg, "error");
    if (err) {
        const char *cls = json_string_value(json_object_get(err, "class"));
        const char *desc = json_string_value(json_object_get(err, "desc"));
        int code = EIO;
        if (cls && !strcmp(cls, "DeviceNotFound")) {
            code = ENOENT;
        } else if (cls && !strcmp(cls, "CommandNotFound")) {
            code = ENOSYS;
        }
        vd_error_setg(errp, code, "%s", desc ? desc : "unknown QMP error");
        json_decref(msg);
        return NULL;
    }
    json_t *ret = json_object_get(msg, "return");
    if (!ret) {
        json_decref(msg);
        vd_error_setg(errp, EPROTO, "QMP reply to '%s' has neither return nor error", cmd);
        return NULL;
    }
    json_incref(ret);
    json_decref(msg);
    return ret;
}

QmpConn *qmpc_connect(const char *path, VdError **errp)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof(sa.sun_path)) {
        vd_error_setg(errp, ENAMETOOLONG, "Socket path '%s' is too long", path);
        return NULL;
    }
    strcpy(sa.sun_path, path);
    QmpConn *c = calloc(1, sizeof(*c));
    if (!c || !(c->events = json_array())) {
        free(c);
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return NULL;
    }
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        vd_error_setg_errno(errp, errno, "Failed to create a socket");
        qmpc_close(c);
        return NULL;
    }
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        vd_error_setg_errno(errp, errno, "Failed to connect to QMP socket '%s'", path);
        qmpc_close(c);
        return NULL;
    }
    int rc;
    json_t *greeting = NULL;
    do {
        greeting = next_message(c, now_ms() + 10000, &rc, errp);
    } while (!greeting && rc == -EINTR);
    if (!greeting || !json_object_get(greeting, "QMP")) {
        /* First error wins: a transport error already set stays; otherwise say what is wrong. */
        vd_error_setg(errp, EPROTO, "'%s' did not send a QMP greeting", path);
        json_decref(greeting);
        qmpc_close(c);
        return NULL;
    }
    json_decref(greeting);
    json_t *r = qmpc_execute(c, "qmp_capabilities", NULL, errp);
    if (!r) {
        vd_error_prepend(errp, "QMP negotiation failed: ");
        qmpc_close(c);
        return NULL;
    }
    json_decref(r);
    return c;
}

void qmpc_close(QmpConn *c)
{
    if (!c) {
        return;
    }
    if (c->fd >= 0) {
        close(c->fd);
    }
    free(c->buf);
    json_decref(c->events);
    free(c);
}

int qmpc_wait(QmpConn *c, int timeout_ms, VdError **errp)
{
    int rc;
    json_t *msg = next_message(c, now_ms() + timeout_ms, &rc, errp);
    if (!msg) {
        return rc;
    }
    if (json_object_get(msg, "event")) {
        json_array_append_new(c->events, msg);
    } else {
        json_decref(msg); /* a stray reply: nothing waits for it */
    }
    /* Queue whatever else is already buffered. */
    for (;;) {
        bool bad;
        msg = pop_message(c, &bad);
        if (!msg) {
            break;
        }
        if (json_object_get(msg, "event")) {
            json_array_append_new(c->events, msg);
        } else {
            json_decref(msg);
        }
    }
    return 1;
}

json_t *qmpc_take_event(QmpConn *c, const char *const *names, const char *device)
{
    size_t i;
    json_t *ev;
    json_array_foreach(c->events, i, ev) {
        const char *name = json_string_value(json_object_get(ev, "event"));
        bool match = false;
        for (int k = 0; name && names[k]; k++) {
            if (!strcmp(name, names[k])) {
                match = true;
            }
        }
        if (!match) {
            continue;
        }
        if (device) {
            json_t *data = json_object_get(ev, "data");
            const char *dev = json_string_value(json_object_get(data, "device"));
            if (!dev) {
                dev = json_string_value(json_object_get(data, "id"));
            }
            if (!dev || strcmp(dev, device)) {
                continue;
            }
        }
        json_incref(ev);
        json_array_remove(c->events, i);
        return ev;
    }
    return NULL;
}
