/*
 * test_nbd_client.c - the nbd client protocol (src/protocols/nbd.c) without a real network:
 * URI building (escaping, IPv6, defaults), option checking of vd_nbd_open / vd_nbd_open_qmp,
 * driver registration and scheme routing in vd_open, and one-line errors naming the URI for
 * unreachable servers. When nbdkit is installed, a few checks run against a private nbdkit on a
 * unix socket in a temp dir (export names round-trip through the URI escaping; multi-conn pool;
 * reads past the end are zero; writes past it are -ENOSPC); otherwise those are skipped.
 */
#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "block/block.h"
#include "protocols/nbd.h"

static void uri_is(const char *host, const char *port, const char *path, const char *exp,
                   const char *want)
{
    char *u = vd_nbd_make_uri(host, port, path, exp);
    assert_non_null(u);
    assert_string_equal(u, want);
    free(u);
}

static void test_make_uri(void **state)
{
    uri_is("127.0.0.1", "10810", NULL, "exp", "nbd://127.0.0.1:10810/exp");
    uri_is("localhost", NULL, NULL, NULL, "nbd://localhost:10809/");
    uri_is("::1", "1234", NULL, "e", "nbd://[::1]:1234/e");
    uri_is(NULL, NULL, "/tmp/s.sock", "exp", "nbd+unix:///exp?socket=/tmp/s.sock");
    uri_is(NULL, NULL, "/tmp/a b&c=d", "x/y z?#%", "nbd+unix:///x%2Fy%20z%3F%23%25?socket="
           "/tmp/a%20b%26c%3Dd");
    errno = 0;
    assert_null(vd_nbd_make_uri(NULL, NULL, NULL, "e"));
    assert_int_equal(errno, EINVAL);
    assert_null(vd_nbd_make_uri("h", NULL, "/s", "e"));
    assert_null(vd_nbd_make_uri("h", "12x", NULL, "e"));
}

static void test_driver_registered(void **state)
{
    const BlockDriver *d = vd_find_driver("nbd");
    assert_ptr_equal(d, &vd_drv_nbd);
    assert_true(d->is_protocol);
    assert_non_null(d->pread);
    assert_non_null(d->pwrite);
    assert_non_null(d->block_status);
    assert_non_null(d->create); /* checks and wipes an existing export; never makes one */
}

/* A TCP port on localhost that nobody listens on (bound then released). */
static int free_port(void)
{
    char cmd[] = "python3 -c 'import socket;s=socket.socket();s.bind((\"127.0.0.1\",0));"
                 "print(s.getsockname()[1])'";
    FILE *f = popen(cmd, "r");
    int port = 1;
    if (f) {
        if (fscanf(f, "%d", &port) != 1) {
            port = 1;
        }
        pclose(f);
    }
    return port;
}

static void expect_open_error(const char *uri, const char *needle)
{
    VdError *err = NULL;
    BlockNode *bs = vd_open_image(uri, "raw", 0, &err);
    assert_null(bs);
    assert_non_null(err);
    const char *m = vd_error_msg(err);
    if (!strstr(m, needle ? needle : uri)) { /* NULL: the URI */
        fail_msg("error '%s' does not contain '%s'", m, needle ? needle : uri);
    }
    assert_null(strchr(m, '\n')); /* one line */
    assert_true(vd_error_code(err) > 0);
    vd_error_free(err);
}

static void test_unreachable(void **state)
{
    char uri[128], refused[128];
    int port = free_port();
    snprintf(uri, sizeof(uri), "nbd://127.0.0.1:%d/exp", port);
    /* QEMU's words: the address, not the URI (qemu-img and QSD prefix nothing else) */
    snprintf(refused, sizeof(refused), "Failed to connect to '127.0.0.1:%d': Connection refused",
             port);
    expect_open_error(uri, refused);
    expect_open_error("nbd+unix:///exp?socket=/nonexistent/vdisk-test.sock",
                      "Failed to connect to '/nonexistent/vdisk-test.sock': No such file or "
                      "directory");
    /* Format probing also goes through the nbd protocol, so the same error. */
    VdError *err = NULL;
    assert_null(vd_open_image(uri, NULL, 0, &err));
    assert_string_equal(vd_error_msg(err), refused);
    vd_error_free(err);
    /* No host: QEMU's words (the tools prefix the name); an unknown scheme names the URI. */
    expect_open_error("nbd://", "No valid URL specified");
    expect_open_error("nbdx://host/e", NULL);
}

static void test_open_options_errors(void **state)
{
    VdError *err = NULL;
    assert_null(vd_nbd_open(NULL, NULL, NULL, "e", NULL, 0, &err));
    assert_int_equal(vd_error_code(err), EINVAL);
    vd_error_free(err);
    err = NULL;
    assert_null(vd_nbd_open("h", NULL, "/s", "e", NULL, 0, &err));
    vd_error_free(err);
    err = NULL;
    assert_null(vd_nbd_open("127.0.0.1", "bad", NULL, "e", NULL, 0, &err));
    assert_non_null(strstr(vd_error_msg(err), "port"));
    vd_error_free(err);

    const char *bad[] = {
        "[]",
        "{\"driver\": \"nbd\"}",
        "{\"driver\": \"nbd\", \"server\": {\"host\": \"h\"}}",
        "{\"driver\": \"nbd\", \"server\": {\"type\": \"inet\"}}",
        "{\"driver\": \"nbd\", \"server\": {\"type\": \"unix\"}}",
        "{\"driver\": \"nbd\", \"server\": {\"type\": \"vsock\", \"cid\": \"3\"}}",
        "{\"driver\": \"nbd\", \"server\": {\"type\": \"inet\", \"host\": \"h\", \"port\": []}}",
        "{\"driver\": \"nbd\", \"server\": {\"type\": \"unix\", \"path\": \"/s\"}, \"export\": 1}",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        json_t *o = json_loads(bad[i], JSON_DECODE_ANY, NULL);
        assert_non_null(o);
        err = NULL;
        assert_null(vd_nbd_open_qmp(o, VD_OPEN_RDWR, &err));
        assert_non_null(err);
        assert_int_equal(vd_error_code(err), EINVAL);
        vd_error_free(err);
        json_decref(o);
    }
    /* Well-formed but nobody listening: the error names the socket given in the options. */
    json_t *o = json_pack("{s:s, s:{s:s, s:s}, s:s}", "driver", "nbd", "server", "type", "unix",
                          "path", "/nonexistent/x.sock", "export", "my exp");
    err = NULL;
    assert_null(vd_nbd_open_qmp(o, VD_OPEN_RDWR, &err));
    assert_string_equal(vd_error_msg(err), "Failed to connect to '/nonexistent/x.sock': No such "
                        "file or directory");
    vd_error_free(err);
    json_decref(o);
}

/* ---- with a private nbdkit, when installed ---- */

typedef struct Kit {
    char dir[64];
    char sock[128];
    char pidfile[128];
} Kit;

static bool have_nbdkit(void)
{
    return system("nbdkit --version >/dev/null 2>&1") == 0;
}

/* Start nbdkit in the background on a socket in a fresh temp dir; false if it did not come up. */
static bool kit_start(Kit *k, const char *args)
{
    snprintf(k->dir, sizeof(k->dir), "/tmp/vdisk-nbdc-XXXXXX");
    if (!mkdtemp(k->dir)) {
        return false;
    }
    snprintf(k->sock, sizeof(k->sock), "%s/s.sock", k->dir);
    snprintf(k->pidfile, sizeof(k->pidfile), "%s/pid", k->dir);
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "nbdkit -U %s -P %s %s", k->sock, k->pidfile, args);
    if (system(cmd) != 0) {
        return false;
    }
    for (int i = 0; i < 100; i++) {
        struct stat st;
        if (stat(k->pidfile, &st) == 0 && st.st_size > 0 && stat(k->sock, &st) == 0) {
            return true;
        }
        usleep(20000);
    }
    return false;
}

/* Still running? nbdkit daemonizes, and a zombie nobody reaps counts as gone. */
static bool pid_alive(int pid)
{
    char path[64], buf[256];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) {
        return false;
    }
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *paren = strrchr(buf, ')');
    return paren && paren[1] == ' ' && paren[2] != 'Z';
}

static void kit_stop(Kit *k)
{
    FILE *f = fopen(k->pidfile, "r");
    int pid = 0;
    if (f) {
        if (fscanf(f, "%d", &pid) != 1) {
            pid = 0;
        }
        fclose(f);
    }
    if (pid > 0) {
        kill(pid, SIGTERM);
        for (int i = 0; i < 100 && pid_alive(pid); i++) {
            usleep(20000);
        }
    }
    unlink(k->pidfile);
    unlink(k->sock);
    rmdir(k->dir);
}

static void test_export_name_roundtrip(void **state)
{
    if (!have_nbdkit()) {
        skip();
    }
    Kit k;
    /* The info plugin serves the export name it was asked for as the export's content. */
    if (!kit_start(&k, "info mode=exportname")) {
        kit_stop(&k);
        skip();
    }
    const char *names[] = { "plain", "with space", "a/b?c#d%e&f=g", "" };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        VdError *err = NULL;
        /* Asked for read-write, but the export is read-only: the node is read-only. */
        BlockNode *bs = vd_nbd_open(NULL, NULL, k.sock, names[i], "n0", VD_OPEN_RDWR, &err);
        if (!bs) {
            fail_msg("open '%s': %s", names[i], vd_error_msg(err));
        }
        assert_true(bs->read_only);
        assert_int_equal(vd_pwrite(bs, 0, 1, "x", 0), -EPERM);
        assert_string_equal(bs->node_name, "n0");
        /* The export is strlen bytes; the node counts whole 512-byte sectors, as QEMU's. */
        int64_t len = (int64_t)strlen(names[i]);
        assert_int_equal(vd_getlength(bs), (len + 511) / 512 * 512);
        char buf[512];
        memset(buf, 0x55, sizeof(buf));
        if (len > 0) {
            assert_int_equal(vd_pread(bs, 0, 512, buf), 0);
            for (size_t j = (size_t)len; j < sizeof(buf); j++) {
                assert_int_equal(buf[j], 0); /* the tail past the export's end reads zeroes */
            }
        } else {
            buf[0] = 0;
        }
        assert_string_equal(buf, names[i]);
        vd_node_unref(bs);
    }
    kit_stop(&k);
}

static void test_memory_export(void **state)
{
    if (!have_nbdkit()) {
        skip();
    }
    Kit k;
    if (!kit_start(&k, "memory 1M")) {
        kit_stop(&k);
        skip();
    }
    json_t *o = json_pack("{s:s, s:s, s:{s:s, s:s}}", "driver", "nbd", "node-name", "tgt",
                          "server", "type", "unix", "path", k.sock);
    VdError *err = NULL;
    BlockNode *bs = vd_nbd_open_qmp(o, VD_OPEN_RDWR, &err);
    json_decref(o);
    if (!bs) {
        fail_msg("open: %s", vd_error_msg(err));
    }
    assert_false(bs->read_only);
    assert_int_equal(vd_getlength(bs), 1 << 20);
    /* nbdkit memory advertises multi-conn: the node uses a small pool of connections. */
    assert_true(vd_nbd_connection_count(bs) > 1);

    uint8_t buf[8192], back[8192];
    memset(buf, 0xa5, sizeof(buf));
    assert_int_equal(vd_pwrite(bs, 1000, sizeof(buf), buf, VD_REQ_FUA), 0);
    /* Written on one connection, read on each of the others (round robin). */
    for (int i = 0; i < 4; i++) {
        memset(back, 0, sizeof(back));
        assert_int_equal(vd_pread(bs, 1000, sizeof(back), back), 0);
        assert_memory_equal(buf, back, sizeof(buf));
    }
    /* Reads past the end are zeroes; writes past it cannot grow the export. */
    memset(back, 1, sizeof(back));
    assert_int_equal(vd_pread(bs, (1 << 20) - 100, 200, back), 0);
    for (int i = 0; i < 200; i++) {
        assert_int_equal(back[i], 0);
    }
    assert_int_equal(vd_pwrite(bs, (1 << 20) - 100, 200, buf, 0), -ENOSPC);

    /* Zeroes: the range then reads zero and block status says so. */
    assert_int_equal(vd_pwrite_zeroes(bs, 0, 65536, VD_REQ_MAY_UNMAP), 0);
    assert_int_equal(vd_pread(bs, 1000, 100, back), 0);
    for (int i = 0; i < 100; i++) {
        assert_int_equal(back[i], 0);
    }
    uint64_t pnum = 0;
    VdBlockStatus st;
    assert_int_equal(vd_block_status(bs, 0, 65536, &pnum, &st), 0);
    assert_true(pnum > 0 && pnum <= 65536);
    assert_true(st.flags & VD_BS_ZERO);
    assert_true(st.flags & VD_BS_ALLOCATED);
    assert_int_equal(vd_flush(bs), 0);
    vd_node_unref(bs);
    kit_stop(&k);
}

/* Threads writing interleaved unaligned pieces that share server blocks (4 KiB minimum): each
 * piece is a read-modify-write of a block others also modify, so a missing lock loses updates. */
#define RMW_THREADS 4
#define RMW_PIECE 1000
#define RMW_ROUNDS 40

typedef struct RmwArg {
    BlockNode *bs;
    int id;
    int ret;
} RmwArg;

static void *rmw_worker(void *opaque)
{
    RmwArg *a = opaque;
    uint8_t buf[RMW_PIECE];
    memset(buf, 0x10 + a->id, sizeof(buf));
    for (int r = 0; r < RMW_ROUNDS && a->ret == 0; r++) {
        uint64_t off = (uint64_t)(r * RMW_THREADS + a->id) * RMW_PIECE;
        a->ret = vd_pwrite(a->bs, off, RMW_PIECE, buf, 0);
    }
    return NULL;
}

static void test_concurrent_unaligned_writes(void **state)
{
    if (!have_nbdkit()) {
        skip();
    }
    Kit k;
    if (!kit_start(&k, "--filter=blocksize-policy memory 1M blocksize-minimum=4096 "
                       "blocksize-error-policy=error")) {
        kit_stop(&k);
        skip();
    }
    VdError *err = NULL;
    BlockNode *bs = vd_nbd_open(NULL, NULL, k.sock, "", NULL, VD_OPEN_RDWR, &err);
    if (!bs) {
        fail_msg("open: %s", vd_error_msg(err));
    }
    pthread_t th[RMW_THREADS];
    RmwArg args[RMW_THREADS];
    for (int i = 0; i < RMW_THREADS; i++) {
        args[i] = (RmwArg){ .bs = bs, .id = i };
        assert_int_equal(pthread_create(&th[i], NULL, rmw_worker, &args[i]), 0);
    }
    for (int i = 0; i < RMW_THREADS; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(args[i].ret, 0);
    }
    size_t total = (size_t)RMW_ROUNDS * RMW_THREADS * RMW_PIECE;
    uint8_t *back = malloc(total);
    assert_non_null(back);
    assert_int_equal(vd_pread(bs, 0, total, back), 0);
    for (size_t i = 0; i < total; i++) {
        int want = 0x10 + (int)((i / RMW_PIECE) % RMW_THREADS);
        if (back[i] != want) {
            fail_msg("byte %zu is 0x%x, want 0x%x", i, back[i], want);
        }
    }
    free(back);
    vd_node_unref(bs);
    kit_stop(&k);
}

/* write-zeroes: FAST_ZERO only when the server has it, -ENOTSUP otherwise (no slow fallback). */
static void fast_zero_case(const char *kit_args, int want_fast)
{
    Kit k;
    if (!kit_start(&k, kit_args)) {
        kit_stop(&k);
        skip();
    }
    VdError *err = NULL;
    BlockNode *bs = vd_nbd_open(NULL, NULL, k.sock, "", NULL, VD_OPEN_RDWR, &err);
    if (!bs) {
        fail_msg("open: %s", vd_error_msg(err));
    }
    uint8_t buf[4096];
    memset(buf, 7, sizeof(buf));
    assert_int_equal(vd_pwrite(bs, 0, sizeof(buf), buf, 0), 0);
    assert_int_equal(vd_pwrite_zeroes(bs, 0, 4096, VD_REQ_NO_FALLBACK), want_fast);
    /* Without NO_FALLBACK it always works (server zero or the generic emulation). */
    assert_int_equal(vd_pwrite(bs, 8192, sizeof(buf), buf, 0), 0);
    assert_int_equal(vd_pwrite_zeroes(bs, 8192, 4096, 0), 0);
    assert_int_equal(vd_pread(bs, 8192, sizeof(buf), buf), 0);
    for (size_t i = 0; i < sizeof(buf); i++) {
        assert_int_equal(buf[i], 0);
    }
    vd_node_unref(bs);
    kit_stop(&k);
}

static void test_fast_zero(void **state)
{
    if (!have_nbdkit()) {
        skip();
    }
    fast_zero_case("memory 1M", 0);
    /* Advertises no fast zero at all: refused before asking. */
    fast_zero_case("--filter=nozero memory 1M zeromode=emulate fastzeromode=none", -ENOTSUP);
    /* Advertises fast zero but every one is "too slow": the server's ENOTSUP is passed on. */
    fast_zero_case("--filter=nozero memory 1M zeromode=emulate fastzeromode=slow", -ENOTSUP);
    /* No write-zeroes at all: the generic layer writes zero buffers. */
    fast_zero_case("--filter=nozero memory 1M zeromode=none", -ENOTSUP);
}

/* create on an export: checks writability and size, wipes the first sector; truncate never grows. */
static void test_create_and_truncate(void **state)
{
    if (!have_nbdkit()) {
        skip();
    }
    Kit k;
    if (!kit_start(&k, "memory 1M")) {
        kit_stop(&k);
        skip();
    }
    char *uri = vd_nbd_make_uri(NULL, NULL, k.sock, "");
    assert_non_null(uri);
    VdError *err = NULL;
    BlockNode *bs = vd_open_image(uri, "nbd", VD_OPEN_RDWR, &err);
    assert_non_null(bs);
    uint8_t buf[512];
    memset(buf, 0x51, sizeof(buf));
    assert_int_equal(vd_pwrite(bs, 0, sizeof(buf), buf, 0), 0);
    vd_node_unref(bs);

    VdCreateOptions co = { .format = "raw", .size = 1 << 20, .size_given = true };
    assert_int_equal(vd_drv_nbd.create(uri, &co, &err), 0);
    co.size = (1 << 20) + 1;
    assert_int_equal(vd_drv_nbd.create(uri, &co, &err), -ENOSPC);
    assert_non_null(strstr(vd_error_msg(err), uri));
    vd_error_free(err);
    err = NULL;

    bs = vd_open_image(uri, "nbd", VD_OPEN_RDWR, &err);
    assert_non_null(bs);
    assert_int_equal(vd_pread(bs, 0, sizeof(buf), buf), 0);
    for (size_t i = 0; i < sizeof(buf); i++) {
        assert_int_equal(buf[i], 0);
    }
    assert_int_equal(vd_truncate(bs, 4096, true, VD_PREALLOC_OFF, &err), 0);
    assert_int_equal(vd_getlength(bs), 1 << 20); /* an export keeps its size */
    assert_int_equal(vd_truncate(bs, 2 << 20, false, VD_PREALLOC_OFF, &err), -ENOTSUP);
    assert_non_null(err);
    vd_error_free(err);
    vd_node_unref(bs);
    free(uri);
    kit_stop(&k);

    /* Read-only export: create refuses. */
    if (!kit_start(&k, "-r memory 1M")) {
        kit_stop(&k);
        skip();
    }
    uri = vd_nbd_make_uri(NULL, NULL, k.sock, "");
    err = NULL;
    co.size = 4096;
    assert_int_equal(vd_drv_nbd.create(uri, &co, &err), -EPERM);
    vd_error_free(err);
    free(uri);
    kit_stop(&k);
}

int main(void)
{
    /* A server vanishing mid-test must not kill the runner with SIGPIPE. */
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_make_uri),
        cmocka_unit_test(test_driver_registered),
        cmocka_unit_test(test_unreachable),
        cmocka_unit_test(test_open_options_errors),
        cmocka_unit_test(test_export_name_roundtrip),
        cmocka_unit_test(test_memory_export),
        cmocka_unit_test(test_concurrent_unaligned_writes),
        cmocka_unit_test(test_fast_zero),
        cmocka_unit_test(test_create_and_truncate),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
