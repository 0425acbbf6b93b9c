/*
 * test_qmp.c - the QMP server in-process: lifecycle, socket mode, custom command registration
 * and error classes, the quit handler, and events emitted from many threads at once (none lost,
 * none torn, only to negotiated clients).
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "qmp/qmp.h"

static char sock_path[108];

typedef struct Conn {
    int fd;
    char buf[1 << 16];
    size_t len;
} Conn;

static void conn_open(Conn *c)
{
    c->fd = socket(AF_UNIX, SOCK_STREAM, 0);
    assert_true(c->fd >= 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strcpy(sa.sun_path, sock_path);
    assert_int_equal(connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    struct timeval tv = {.tv_sec = 10};
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    c->len = 0;
}

/* Next line as parsed JSON (new reference); fails the test on timeout or EOF. */
static json_t *conn_recv(Conn *c)
{
    for (;;) {
        char *nl = memchr(c->buf, '\n', c->len);
        if (nl) {
            size_t n = (size_t)(nl - c->buf) + 1;
            json_error_t err;
            json_t *v = json_loadb(c->buf, n, 0, &err);
            if (!v) {
                fail_msg("bad JSON line from server: %s: %.*s", err.text, (int)n, c->buf);
            }
            memmove(c->buf, c->buf + n, c->len - n);
            c->len -= n;
            return v;
        }
        assert_true(c->len < sizeof(c->buf));
        ssize_t r = recv(c->fd, c->buf + c->len, sizeof(c->buf) - c->len, 0);
        if (r <= 0) {
            fail_msg("server closed or timed out (%zd, %s)", r, strerror(errno));
        }
        c->len += (size_t)r;
    }
}

static void conn_send(Conn *c, const char *s)
{
    assert_int_equal(send(c->fd, s, strlen(s), MSG_NOSIGNAL), (ssize_t)strlen(s));
}

static json_t *conn_cmd(Conn *c, const char *s)
{
    conn_send(c, s);
    return conn_recv(c);
}

static void conn_negotiate(Conn *c)
{
    json_t *g = conn_recv(c);
    assert_non_null(json_object_get(g, "QMP"));
    json_decref(g);
    json_t *r = conn_cmd(c, "{\"execute\": \"qmp_capabilities\"}\n");
    assert_non_null(json_object_get(r, "return"));
    json_decref(r);
}

static json_t *cmd_ok(json_t *args, VdError **errp)
{
    return json_pack("{s:O}", "echo", args);
}

static json_t *cmd_enoent(json_t *args, VdError **errp)
{
    vd_error_setg(errp, ENOENT, "Block job 'j' not found");
    return NULL;
}

static json_t *cmd_enodev(json_t *args, VdError **errp)
{
    vd_error_setg(errp, ENODEV, "Block job 'j' not found");
    return NULL;
}

static json_t *cmd_silent_fail(json_t *args, VdError **errp)
{
    return NULL;
}

static int quit_calls;
static void on_quit(void)
{
    __atomic_add_fetch(&quit_calls, 1, __ATOMIC_SEQ_CST);
}

static int setup(void **state)
{
    snprintf(sock_path, sizeof(sock_path), "/tmp/vdisk-test-qmp-%d.sock", (int)getpid());
    unlink(sock_path);
    qmp_register_command("x-ok", NULL, cmd_ok);
    qmp_register_command("x-enoent", NULL, cmd_enoent);
    qmp_register_command("x-silent", NULL, cmd_silent_fail);
    qmp_register_command("x-enodev", NULL, cmd_enodev);
    qmp_set_quit_handler(on_quit);
    VdError *err = NULL;
    int r = qmp_server_start(sock_path, &err);
    if (r < 0) {
        fprintf(stderr, "qmp_server_start: %s\n", vd_error_msg(err));
        vd_error_free(err);
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    qmp_server_stop();
    return 0;
}

static void test_lifecycle(void **state)
{
    struct stat st;
    assert_int_equal(stat(sock_path, &st), 0);
    assert_true(S_ISSOCK(st.st_mode));
    assert_int_equal(st.st_mode & 0777, 0600);
    VdError *err = NULL;
    assert_int_equal(qmp_server_start(sock_path, &err), -EEXIST);
    vd_error_free(err);

    qmp_server_stop();
    assert_int_equal(stat(sock_path, &st), -1);
    qmp_event_emit("AFTER_STOP", json_object()); /* dropped, no crash, no leak */
    qmp_server_stop();                           /* idempotent */
    assert_int_equal(qmp_server_start(sock_path, NULL), 0);
}

static void test_commands_and_classes(void **state)
{
    Conn c;
    conn_open(&c);
    conn_negotiate(&c);
    json_t *r = conn_cmd(&c, "{\"execute\": \"x-ok\", \"arguments\": {\"a\": [1]}, \"id\": 9}\n");
    assert_int_equal(json_integer_value(json_object_get(r, "id")), 9);
    assert_int_equal(json_integer_value(json_array_get(
                         json_object_get(json_object_get(json_object_get(r, "return"), "echo"),
                                         "a"), 0)), 1);
    json_decref(r);
    r = conn_cmd(&c, "{\"execute\": \"x-ok\"}\n"); /* arguments default to {} */
    assert_true(json_is_object(json_object_get(json_object_get(r, "return"), "echo")));
    json_decref(r);
    r = conn_cmd(&c, "{\"execute\": \"x-enoent\"}\n");
    assert_string_equal(json_string_value(json_object_get(json_object_get(r, "error"), "class")),
                        "DeviceNotFound");
    json_decref(r);
    r = conn_cmd(&c, "{\"execute\": \"x-enodev\"}\n");
    assert_string_equal(json_string_value(json_object_get(json_object_get(r, "error"), "class")),
                        "DeviceNotActive");
    json_decref(r);
    r = conn_cmd(&c, "{\"execute\": \"x-silent\"}\n");
    assert_string_equal(json_string_value(json_object_get(json_object_get(r, "error"), "class")),
                        "GenericError");
    json_decref(r);
    r = conn_cmd(&c, "{\"execute\": \"quit\"}\n");
    assert_non_null(json_object_get(r, "return"));
    json_decref(r);
    /* The handler runs right after the reply is sent, so it may lag the client a little. */
    for (int i = 0; i < 500 && !__atomic_load_n(&quit_calls, __ATOMIC_SEQ_CST); i++) {
        usleep(10000);
    }
    assert_int_equal(__atomic_load_n(&quit_calls, __ATOMIC_SEQ_CST), 1);
    close(c.fd);
}

#define EMITTERS 4
#define PER_EMITTER 200

static void *emitter(void *arg)
{
    long n = (long)arg;
    for (int i = 0; i < PER_EMITTER; i++) {
        qmp_event_emit("TEST_EVENT", json_pack("{s:i,s:i}", "thread", (int)n, "seq", i));
    }
    return NULL;
}

static void test_events_from_threads(void **state)
{
    Conn a, b, raw;
    conn_open(&a);
    conn_negotiate(&a);
    conn_open(&b);
    conn_negotiate(&b);
    conn_open(&raw);
    json_decref(conn_recv(&raw)); /* greeting only: never negotiates */

    pthread_t t[EMITTERS];
    for (long i = 0; i < EMITTERS; i++) {
        assert_int_equal(pthread_create(&t[i], NULL, emitter, (void *)i), 0);
    }
    for (int i = 0; i < EMITTERS; i++) {
        pthread_join(t[i], NULL);
    }
    qmp_event_emit("NO_DATA", NULL);

    Conn *cs[] = {&a, &b};
    for (int k = 0; k < 2; k++) {
        int next[EMITTERS] = {0};
        for (int i = 0; i < EMITTERS * PER_EMITTER; i++) {
            json_t *ev = conn_recv(cs[k]);
            assert_string_equal(json_string_value(json_object_get(ev, "event")), "TEST_EVENT");
            json_t *ts = json_object_get(ev, "timestamp");
            assert_true(json_is_integer(json_object_get(ts, "seconds")));
            assert_true(json_is_integer(json_object_get(ts, "microseconds")));
            json_t *d = json_object_get(ev, "data");
            int th = (int)json_integer_value(json_object_get(d, "thread"));
            /* per emitting thread, events arrive in the order they were emitted */
            assert_int_equal(json_integer_value(json_object_get(d, "seq")), next[th]++);
            json_decref(ev);
        }
        json_t *ev = conn_recv(cs[k]);
        assert_string_equal(json_string_value(json_object_get(ev, "event")), "NO_DATA");
        assert_null(json_object_get(ev, "data"));
        json_decref(ev);
    }
    /* The unnegotiated client got nothing: its next line is the reply to its command. */
    json_t *r = conn_cmd(&raw, "{\"execute\": \"x-ok\", \"id\": 1}\n");
    assert_string_equal(json_string_value(json_object_get(json_object_get(r, "error"), "class")),
                        "CommandNotFound");
    json_decref(r);
    close(a.fd);
    close(b.fd);
    close(raw.fd);
}

/* ---- qmp_defer: work handed to the QMP thread ---- */

typedef struct Deferred {
    QmpDeferred d;
    int seq;
    int on_thread; /* atomic */
} Deferred;

static void deferred_cb(void *opaque)
{
    Deferred *x = opaque;
    __atomic_store_n(&x->on_thread, qmp_on_thread() ? 1 : -1, __ATOMIC_SEQ_CST);
    /* On the QMP thread an event goes out at once: the client sees the order callbacks ran in. */
    qmp_event_emit("DEFERRED", json_pack("{s:i}", "seq", x->seq));
}

static Deferred deferred[3];

static void *defer_thread(void *arg)
{
    (void)arg;
    for (int i = 0; i < 3; i++) {
        deferred[i] = (Deferred){.d = {.fn = deferred_cb, .opaque = &deferred[i]}, .seq = i};
        assert_int_equal(qmp_defer(&deferred[i].d), 0);
    }
    return NULL;
}

static void test_deferred_run_on_qmp_thread(void **state)
{
    Conn a;
    conn_open(&a);
    conn_negotiate(&a);
    assert_false(qmp_on_thread());
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, defer_thread, NULL), 0);
    pthread_join(t, NULL);
    for (int i = 0; i < 3; i++) {
        json_t *ev = conn_recv(&a);
        assert_string_equal(json_string_value(json_object_get(ev, "event")), "DEFERRED");
        assert_int_equal(json_integer_value(json_object_get(json_object_get(ev, "data"), "seq")),
                         i);
        json_decref(ev);
        assert_int_equal(__atomic_load_n(&deferred[i].on_thread, __ATOMIC_SEQ_CST), 1);
    }
    close(a.fd);
    /* No QMP thread: nothing is queued, the caller runs the work itself. */
    qmp_server_stop();
    Deferred late = {.d = {.fn = deferred_cb, .opaque = &late}};
    assert_int_equal(qmp_defer(&late.d), -ESRCH);
    assert_int_equal(late.on_thread, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_lifecycle, setup, teardown),
        cmocka_unit_test_setup_teardown(test_commands_and_classes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_events_from_threads, setup, teardown),
        cmocka_unit_test_setup_teardown(test_deferred_run_on_qmp_thread, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
