/*
 * test_nbd_server.c - unit tests of the range tracker (block/tracking.h) and of the NBD server's
 * export API: add/find/del and drain + set_node (the pivot), driven through a real libnbd client.
 */
#include <errno.h>
#include <fcntl.h>
#include <libnbd.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <unistd.h>

#include <cmocka.h>

#include "block/block.h"
#include "block/tracking.h"
#include "nbd/nbd-server.h"
#include "util/lock.h"

/* ---------------- tracker ---------------- */

struct excl_ctx {
    BlockTracker *t;
    int inside;       /* threads inside an exclusive section on the shared range */
    int max_inside;
    pthread_mutex_t lock;
};

static void *excl_worker(void *arg)
{
    struct excl_ctx *c = arg;
    for (int i = 0; i < 200; i++) {
        BtRequest r;
        block_tracker_begin(c->t, &r, 1000 + (uint64_t)(i % 7), 100, BT_EXCLUSIVE);
        vd_mutex_lock(&c->lock);
        c->inside++;
        if (c->inside > c->max_inside) {
            c->max_inside = c->inside;
        }
        vd_mutex_unlock(&c->lock);
        usleep(10);
        vd_mutex_lock(&c->lock);
        c->inside--;
        vd_mutex_unlock(&c->lock);
        block_tracker_end(c->t, &r);
    }
    return NULL;
}

static void test_tracker_exclusive(void **state)
{
    (void)state;
    BlockNode fake = {0};
    struct excl_ctx c = {.t = block_tracker_get(&fake)};
    pthread_mutex_init(&c.lock, NULL);
    assert_non_null(c.t);
    assert_ptr_equal(block_tracker_get(&fake), c.t); /* one tracker per node */
    block_tracker_put(c.t);
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        pthread_create(&th[i], NULL, excl_worker, &c);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
    }
    assert_int_equal(c.max_inside, 1);
    assert_int_equal(block_tracker_in_flight(c.t), 0);
    block_tracker_put(c.t);
}

static void test_tracker_shared_and_disjoint(void **state)
{
    (void)state;
    BlockNode fake = {0};
    BlockTracker *t = block_tracker_get(&fake);
    BtRequest a, b, w;
    /* shared + shared on one range, and exclusive on a disjoint range: none waits */
    block_tracker_begin(t, &a, 0, 4096, BT_SHARED);
    block_tracker_begin(t, &b, 0, 4096, BT_SHARED);
    block_tracker_begin(t, &w, 1 << 20, 4096, BT_EXCLUSIVE);
    assert_int_equal(block_tracker_in_flight(t), 3);
    block_tracker_end(t, &w);
    block_tracker_end(t, &b);
    block_tracker_end(t, &a);
    block_tracker_wait_idle(t);
    block_tracker_put(t);
}

static void note_write(void *opaque, uint64_t offset, uint64_t bytes)
{
    uint64_t *sum = opaque;
    sum[0] += bytes;
    sum[1] = offset;
}

static void test_tracker_write_notifier(void **state)
{
    (void)state;
    BlockNode fake = {0};
    BlockTracker *t = block_tracker_get(&fake);
    uint64_t sum[2] = {0, 0};
    assert_int_equal(block_tracker_granularity(t), 4096);
    assert_int_equal(block_tracker_add_write_notifier(t, note_write, sum), 0);
    BtRequest r;
    block_tracker_begin(t, &r, 100, 50, BT_SHARED);
    block_tracker_end(t, &r);
    assert_int_equal(sum[0], 0); /* reads do not notify */
    block_tracker_begin(t, &r, 5000, 300, BT_EXCLUSIVE);
    block_tracker_end(t, &r);
    assert_int_equal(sum[0], 300); /* unwidened range */
    assert_int_equal(sum[1], 5000);
    block_tracker_remove_write_notifier(t, note_write, sum);
    block_tracker_begin(t, &r, 0, 10, BT_EXCLUSIVE);
    block_tracker_end(t, &r);
    assert_int_equal(sum[0], 300);
    block_tracker_put(t);
}

/* ---------------- NBD server: exports and pivot ---------------- */

static char dir[] = "/tmp/test_nbd_server.XXXXXX";
static char sock[256], img_a[256], img_b[256];

static BlockNode *make_raw(const char *path)
{
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    assert_int_equal(ftruncate(fd, 1 << 20), 0);
    close(fd);
    VdError *err = NULL;
    BlockNode *bs = vd_open_image(path, "raw", VD_OPEN_RDWR, &err);
    if (!bs) {
        fail_msg("open %s: %s", path, vd_error_msg(err));
    }
    return bs;
}

static struct nbd_handle *client(const char *name)
{
    struct nbd_handle *h = nbd_create();
    assert_non_null(h);
    assert_int_equal(nbd_set_export_name(h, name), 0);
    if (nbd_connect_unix(h, sock) < 0) {
        fail_msg("connect: %s", nbd_get_error());
    }
    return h;
}

struct load {
    struct nbd_handle *h;
    int stop; /* atomic */
    int errors;
    int writes;
};

static void *load_thread(void *arg)
{
    struct load *l = arg;
    char buf[4096];
    memset(buf, 0x33, sizeof(buf));
    while (!__atomic_load_n(&l->stop, __ATOMIC_RELAXED)) {
        if (nbd_pwrite(l->h, buf, sizeof(buf), 65536, 0) < 0) {
            l->errors++;
        }
        __atomic_add_fetch(&l->writes, 1, __ATOMIC_RELEASE); /* read by the test thread */
    }
    return NULL;
}

/* Wait (up to 15 s: the machine is shared) until the load thread has done n writes. */
static bool load_wait_writes(struct load *l, int n)
{
    for (int i = 0; i < 15000; i++) {
        if (__atomic_load_n(&l->writes, __ATOMIC_ACQUIRE) >= n) {
            return true;
        }
        usleep(1000);
    }
    return false;
}

/* A foreach callback that uses the accessors (as query-block-exports does). */
static void count_cb(NbdExport *exp, void *opaque)
{
    assert_ptr_equal(nbd_export_find(nbd_export_id(exp)), exp);
    assert_int_equal(nbd_export_client_count(exp), 0);
    assert_true(nbd_export_writable(exp));
    (*(int *)opaque)++;
}

static void test_export_pivot(void **state)
{
    (void)state;
    VdError *err = NULL;
    NbdServerAddress addr = {.type = NBD_ADDR_UNIX, .path = sock};
    assert_int_equal(nbd_server_start(&addr, 0, &err), 0);
    assert_int_equal(nbd_server_start(&addr, 0, NULL), -EEXIST);
    assert_true(nbd_server_running());

    BlockNode *a = make_raw(img_a), *b = make_raw(img_b);
    NbdExport *exp = nbd_export_add("e0", "disk", a, true, "desc", &err);
    assert_non_null(exp);
    assert_null(nbd_export_add("e0", "other", a, true, NULL, NULL)); /* duplicate id */
    assert_null(nbd_export_add("e1", "disk", a, true, NULL, NULL));  /* duplicate name */
    assert_ptr_equal(nbd_export_find("e0"), exp);
    assert_ptr_equal(nbd_export_find_by_name("disk"), exp);
    assert_string_equal(nbd_export_name(exp), "disk");
    assert_ptr_equal(nbd_export_node(exp), a);
    int seen = 0;
    nbd_export_foreach(count_cb, &seen);
    assert_int_equal(seen, 1);

    struct nbd_handle *h = client("disk");
    char buf[4096], rbuf[4096];
    memset(buf, 0x11, sizeof(buf));
    assert_int_equal(nbd_pwrite(h, buf, sizeof(buf), 0, 0), 0);
    assert_int_equal(nbd_export_client_count(exp), 1);
    assert_int_equal(nbd_export_del("e0", false, NULL), -EBUSY);

    /* a second connection hammers the export while we pivot: it must see no error */
    struct load l = {.h = client("disk")};
    pthread_t th;
    pthread_create(&th, NULL, load_thread, &l);
    /* The pivot must happen while writes are in flight, and writes must go on after it. */
    assert_true(load_wait_writes(&l, 3));
    nbd_export_drain_begin(exp);
    nbd_export_set_node(exp, b);
    nbd_export_drain_end(exp);
    int at_pivot = __atomic_load_n(&l.writes, __ATOMIC_ACQUIRE);
    assert_true(load_wait_writes(&l, at_pivot + 3));
    __atomic_store_n(&l.stop, 1, __ATOMIC_RELAXED);
    pthread_join(th, NULL);
    assert_int_equal(l.errors, 0);
    assert_ptr_equal(nbd_export_node(exp), b);

    memset(buf, 0x22, sizeof(buf));
    assert_int_equal(nbd_pwrite(h, buf, sizeof(buf), 8192, 0), 0);
    assert_int_equal(nbd_flush(h, 0), 0);
    assert_int_equal(nbd_pread(h, rbuf, sizeof(rbuf), 8192, 0), 0);
    assert_memory_equal(rbuf, buf, sizeof(buf));
    /* the post-pivot write went to b, not a; the pre-pivot one stayed in a */
    assert_int_equal(vd_pread(b, 8192, sizeof(rbuf), rbuf), 0);
    assert_memory_equal(rbuf, buf, sizeof(buf));
    assert_int_equal(vd_pread(a, 8192, sizeof(rbuf), rbuf), 0);
    assert_int_equal(rbuf[0], 0);
    assert_int_equal(vd_pread(a, 0, sizeof(rbuf), rbuf), 0);
    assert_int_equal(rbuf[0], 0x11);

    nbd_shutdown(h, 0);
    nbd_close(h);
    /* force-delete kicks the remaining client */
    assert_int_equal(nbd_export_del("e0", true, &err), 0);
    assert_null(nbd_export_find("e0"));
    assert_true(nbd_pwrite(l.h, buf, sizeof(buf), 0, 0) < 0);
    nbd_close(l.h);

    nbd_server_stop();
    assert_false(nbd_server_running());
    assert_int_equal(access(sock, F_OK), -1);
    assert_null(nbd_export_add("e2", NULL, a, false, NULL, NULL)); /* no server */

    /* the server can be started again; stop drops the exports it still has */
    assert_int_equal(nbd_server_start(&addr, 1, &err), 0);
    exp = nbd_export_add("e2", NULL, a, false, NULL, &err);
    assert_non_null(exp);
    assert_string_equal(nbd_export_name(exp), a->node_name); /* name defaults to the node's */
    assert_false(nbd_export_writable(exp));
    h = client(a->node_name);
    assert_int_equal(nbd_is_read_only(h), 1);
    assert_true(nbd_pwrite(h, buf, sizeof(buf), 0, 0) < 0);
    assert_int_equal(nbd_pread(h, rbuf, sizeof(rbuf), 0, 0), 0);
    assert_int_equal(rbuf[0], 0x11);
    nbd_server_stop(); /* with a client still connected */
    assert_null(nbd_export_find("e2"));
    nbd_close(h);
    vd_node_unref(a);
    vd_node_unref(b);
}

/*
 * ---------------- pipelined requests (nbd-transmission.c's fast paths) ----------------
 * Many requests in flight on two connections at once: small writes that arrive together in one
 * receive buffer, large ones whose payload is read past it, FUA writes, flushes, reads of what
 * was written, replies out of order - on a page-cache node and (where the file system allows it)
 * an O_DIRECT one, whose requests take the pool's blocking path. Drains run meanwhile.
 */
#define PIPE_IMG (8u << 20)
#define PIPE_ROUNDS 6

static uint8_t pattern_byte(unsigned round, uint64_t off)
{
    return (uint8_t)(round * 37 + (off >> 9) * 11 + 1);
}

/* Issue every request of one round without waiting, then wait for all; 0 = all succeeded. */
static int pipe_round(struct nbd_handle *h, unsigned round, unsigned half, uint8_t *wbuf,
                      uint8_t *rbuf, uint64_t base)
{
    /* sizes chosen to straddle the reader's 64 KiB receive buffer and the 64 KiB buffer class */
    static const uint32_t sizes[] = {512, 4096, 4096, 8192, 65536, 69632, 4096, 1048576, 4096, 512};
    int64_t cookies[64];
    unsigned nc = 0;
    uint64_t off = base + half * (PIPE_IMG / 2);
    uint64_t end = base + (half + 1) * (PIPE_IMG / 2);
    for (unsigned i = 0; off < end; i++) {
        uint32_t len = sizes[i % (sizeof(sizes) / sizeof(sizes[0]))];
        if (off + len > end) {
            len = (uint32_t)(end - off);
        }
        for (uint32_t j = 0; j < len; j++) {
            wbuf[off + j] = pattern_byte(round, off + j);
        }
        uint32_t flags = (i % 7 == 3) ? LIBNBD_CMD_FLAG_FUA : 0;
        cookies[nc++] = nbd_aio_pwrite(h, wbuf + off, len, off, NBD_NULL_COMPLETION, flags);
        if (i % 9 == 5) {
            cookies[nc++] = nbd_aio_flush(h, NBD_NULL_COMPLETION, 0);
        }
        off += len;
        if (nc >= 48 || off >= end) {
            while (nbd_aio_in_flight(h) > 0) {
                if (nbd_poll(h, -1) < 0) {
                    return -1;
                }
            }
            for (unsigned k = 0; k < nc; k++) {
                if (cookies[k] < 0 || nbd_aio_command_completed(h, (uint64_t)cookies[k]) != 1) {
                    return -1;
                }
            }
            nc = 0;
        }
    }
    /* read it all back with many reads in flight */
    off = base + half * (PIPE_IMG / 2);
    for (uint64_t o = off; o < end; o += 16384) {
        cookies[nc++] = nbd_aio_pread(h, rbuf + o, 16384, o, NBD_NULL_COMPLETION, 0);
        if (nc == 64 || o + 16384 >= end) {
            while (nbd_aio_in_flight(h) > 0) {
                if (nbd_poll(h, -1) < 0) {
                    return -1;
                }
            }
            for (unsigned k = 0; k < nc; k++) {
                if (cookies[k] < 0 || nbd_aio_command_completed(h, (uint64_t)cookies[k]) != 1) {
                    return -1;
                }
            }
            nc = 0;
        }
    }
    return memcmp(rbuf + off, wbuf + off, end - off) == 0 ? 0 : -2;
}

struct pipe_ctx {
    struct nbd_handle *h;
    unsigned half;
    uint8_t *wbuf, *rbuf;
    int result;
};

static void *pipe_thread(void *arg)
{
    struct pipe_ctx *p = arg;
    for (unsigned r = 0; r < PIPE_ROUNDS && p->result == 0; r++) {
        p->result = pipe_round(p->h, r, p->half, p->wbuf, p->rbuf, 0);
    }
    return NULL;
}

static void pipelined_on(const char *path, int flags)
{
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    assert_int_equal(ftruncate(fd, PIPE_IMG), 0);
    close(fd);
    VdError *err = NULL;
    BlockNode *bs = vd_open_image(path, "raw", VD_OPEN_RDWR | flags, &err);
    if (!bs) {
        vd_error_free(err);
        unlink(path);
        print_message("skipped: cannot open %s with flags 0x%x\n", path, flags);
        return;
    }
    NbdServerAddress addr = {.type = NBD_ADDR_UNIX, .path = sock};
    assert_int_equal(nbd_server_start(&addr, 0, &err), 0);
    NbdExport *exp = nbd_export_add("p0", "pipe", bs, true, NULL, &err);
    assert_non_null(exp);
    uint8_t *wbuf = calloc(1, PIPE_IMG), *rbuf = calloc(1, PIPE_IMG);
    assert_non_null(wbuf);
    assert_non_null(rbuf);
    struct pipe_ctx p[2];
    pthread_t th[2];
    for (unsigned i = 0; i < 2; i++) {
        p[i] = (struct pipe_ctx){.h = client("pipe"), .half = i, .wbuf = wbuf, .rbuf = rbuf};
        assert_int_equal(nbd_can_multi_conn(p[i].h), 1);
        pthread_create(&th[i], NULL, pipe_thread, &p[i]);
    }
    /* drains while requests are admitted in batches: none may be lost or deadlock */
    for (int i = 0; i < 20; i++) {
        usleep(2000);
        nbd_export_drain_begin(exp);
        nbd_export_drain_end(exp);
    }
    for (unsigned i = 0; i < 2; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(p[i].result, 0);
        nbd_shutdown(p[i].h, 0);
        nbd_close(p[i].h);
    }
    /* what the clients were told is written is in the node */
    assert_int_equal(vd_pread(bs, 0, PIPE_IMG, rbuf), 0);
    assert_memory_equal(rbuf, wbuf, PIPE_IMG);
    nbd_server_stop();
    vd_node_unref(bs);
    free(wbuf);
    free(rbuf);
    unlink(path);
}

static void test_pipelined_requests(void **state)
{
    (void)state;
    char path[300];
    snprintf(path, sizeof(path), "%s/pipe.raw", dir);
    pipelined_on(path, 0);
    pipelined_on(path, VD_OPEN_DIRECT);
}

int main(void)
{
    if (!mkdtemp(dir)) {
        return 1;
    }
    snprintf(sock, sizeof(sock), "%s/nbd.sock", dir);
    snprintf(img_a, sizeof(img_a), "%s/a.raw", dir);
    snprintf(img_b, sizeof(img_b), "%s/b.raw", dir);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tracker_exclusive),
        cmocka_unit_test(test_tracker_shared_and_disjoint),
        cmocka_unit_test(test_tracker_write_notifier),
        cmocka_unit_test(test_export_pivot),
        cmocka_unit_test(test_pipelined_requests),
    };
    int r = cmocka_run_group_tests(tests, NULL, NULL);
    unlink(img_a);
    unlink(img_b);
    unlink(sock);
    rmdir(dir);
    return r;
}
