/*
 * test_commit.c - active commit's pivot, without NBD: a guest thread writes the device through its
 * tracker, as an NBD worker does, and is registered as the device's user (block/users.h), so the
 * pivot drains it and moves it onto base exactly as it moves an export. The user counts the syncs
 * the whole process makes while it is drained (vd_flush_total_syncs): the pivot syncs base there
 * only when the guest flushed since base last held every write durably. After the job, base must
 * read byte for byte like a model of everything the guest wrote, and qemu-img check must find the
 * images clean.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "block/block.h"
#include "block/graph.h"
#include "block/tracking.h"
#include "block/users.h"
#include "jobs/blockops.h"
#include "jobs/job.h"
#include "util/lock.h"

#define SIZE (4u << 20)

typedef struct Guest {
    VdNodeUser user;     /* first: container_of by cast */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    BlockNode *node;     /* ref: what it writes now (the pivot moves it) */
    bool drained, stop, flushes;
    int in_flight;
    uint64_t syncs_at_drain, drained_syncs;
    int drains, ops, errors;
    unsigned seed;
    uint8_t *model;
} Guest;

static BlockNode *guest_node(VdNodeUser *u)
{
    return ((Guest *)u)->node;
}

static void guest_drain_begin(VdNodeUser *u)
{
    Guest *g = (Guest *)u;
    vd_mutex_lock(&g->lock);
    g->drained = true;
    while (g->in_flight > 0) {
        vd_cond_wait(&g->cond, &g->lock);
    }
    g->syncs_at_drain = vd_flush_total_syncs();
    vd_mutex_unlock(&g->lock);
}

static void guest_set_node(VdNodeUser *u, BlockNode *node)
{
    Guest *g = (Guest *)u;
    vd_node_ref(node);
    vd_node_unref(g->node);
    g->node = node;
}

static void guest_drain_end(VdNodeUser *u)
{
    Guest *g = (Guest *)u;
    vd_mutex_lock(&g->lock);
    g->drained_syncs += vd_flush_total_syncs() - g->syncs_at_drain;
    g->drains++;
    g->drained = false;
    vd_cond_broadcast(&g->cond);
    vd_mutex_unlock(&g->lock);
}

static const VdNodeUserOps guest_ops = {
    .node = guest_node, .drain_begin = guest_drain_begin, .set_node = guest_set_node,
    .drain_end = guest_drain_end,
};

/* Random writes of up to 64 KiB through the node's tracker; a flush after each when asked. */
static void *guest_thread(void *arg)
{
    Guest *g = arg;
    uint8_t *buf = malloc(64 * 1024);
    assert_non_null(buf);
    for (;;) {
        vd_mutex_lock(&g->lock);
        while (g->drained && !g->stop) {
            vd_cond_wait(&g->cond, &g->lock);
        }
        if (g->stop) {
            vd_mutex_unlock(&g->lock);
            break;
        }
        g->in_flight++;
        BlockNode *node = g->node;
        vd_node_ref(node);
        vd_mutex_unlock(&g->lock);

        uint64_t len = 1 + rand_r(&g->seed) % (64 * 1024);
        uint64_t off = (uint64_t)rand_r(&g->seed) % (SIZE - len);
        for (uint64_t i = 0; i < len; i++) {
            buf[i] = (uint8_t)rand_r(&g->seed);
        }
        BlockTracker *t = block_tracker_get(node);
        BtRequest req;
        block_tracker_begin(t, &req, off, len, BT_EXCLUSIVE);
        int e = vd_pwrite(node, off, len, buf, 0);
        if (!e) {
            memcpy(g->model + off, buf, len);
        }
        block_tracker_end(t, &req);
        block_tracker_put(t);
        if (!e && g->flushes) {
            e = vd_flush(node); /* as NBD_CMD_FLUSH after the write's reply */
        }
        vd_node_unref(node);

        vd_mutex_lock(&g->lock);
        g->errors += e != 0;
        g->ops++;
        g->in_flight--;
        vd_cond_broadcast(&g->cond);
        vd_mutex_unlock(&g->lock);
        usleep(200);
    }
    free(buf);
    return NULL;
}

static int guest_ops_now(Guest *g)
{
    vd_mutex_lock(&g->lock);
    int n = g->ops;
    vd_mutex_unlock(&g->lock);
    return n;
}

/* Wait (up to 150 s of a shared machine) for the guest to complete n requests. */
static void wait_guest_ops(Guest *g, int n)
{
    for (int i = 0; i < 150000 && guest_ops_now(g) < n; i++) {
        usleep(1000);
    }
    assert_true(guest_ops_now(g) >= n);
}

static void wait_status(Job *job, JobStatus st)
{
    for (int i = 0; i < 150000 && job_status(job) != st; i++) {
        usleep(1000);
    }
    assert_int_equal(job_status(job), st);
}

static void fill(BlockNode *bs, uint64_t off, uint64_t len, int pattern)
{
    uint8_t *b = malloc(len);
    assert_non_null(b);
    memset(b, pattern, len);
    assert_int_equal(vd_pwrite(bs, off, len, b, 0), 0);
    free(b);
}

static void assert_reads(const char *file, const uint8_t *model)
{
    VdError *err = NULL;
    BlockNode *bs = vd_open_image(file, "qcow2", VD_OPEN_NO_BACKING, &err);
    assert_non_null(bs);
    uint8_t *buf = malloc(SIZE);
    assert_int_equal(vd_pread(bs, 0, SIZE, buf), 0);
    for (uint64_t i = 0; i < SIZE; i++) {
        if (buf[i] != model[i]) {
            fail_msg("%s: byte %llu is 0x%02x, the guest wrote 0x%02x", file,
                     (unsigned long long)i, buf[i], model[i]);
        }
    }
    free(buf);
    vd_node_unref(bs);
}

static void assert_check_clean(const char *file)
{
    char cmd[256];
    snprintf(cmd, sizeof(cmd), "qemu-img check -q -f qcow2 '%s'", file);
    assert_int_equal(system(cmd), 0);
}

/*
 * base (data in [0, 1M) and [3M, 3.5M)) under top (data in [1M, 2M)), top served to the guest;
 * an active commit of top into base goes READY, the guest keeps writing through complete and
 * after the pivot (then into base). Returns the syncs made while the guest was drained.
 */
static uint64_t commit_under_guest(bool flushes, int *drains, uint64_t *ready_syncs)
{
    VdError *err = NULL;
    char dir[64] = "/tmp/vdisk-test-commit-XXXXXX", base[128], top[128], cmd[160];
    assert_non_null(mkdtemp(dir));
    snprintf(base, sizeof(base), "%s/base.qcow2", dir);
    snprintf(top, sizeof(top), "%s/top.qcow2", dir);
    VdCreateOptions co = {.format = "qcow2", .size = SIZE, .size_given = true};
    assert_int_equal(vd_create(&co, base, &err), 0);
    BlockNode *b = vd_open_image(base, "qcow2", VD_OPEN_RDWR, &err);
    assert_non_null(b);
    fill(b, 0, 1 << 20, 0x11);
    fill(b, 3 << 20, 512 << 10, 0x33);
    vd_node_unref(b);
    VdCreateOptions ct = {.format = "qcow2", .backing_file = "base.qcow2", .backing_fmt = "qcow2"};
    assert_int_equal(vd_create(&ct, top, &err), 0);
    BlockNode *dev = vd_open_image(top, "qcow2", VD_OPEN_RDWR, &err);
    assert_non_null(dev);
    fill(dev, 1 << 20, 1 << 20, 0x22);
    assert_int_equal(graph_register(dev, &err), 0);

    Guest g;
    memset(&g, 0, sizeof(g));
    pthread_mutex_init(&g.lock, NULL);
    pthread_cond_init(&g.cond, NULL);
    g.user.ops = &guest_ops;
    g.node = dev;
    vd_node_ref(dev);
    g.flushes = flushes;
    g.seed = flushes ? 3 : 4;
    g.model = malloc(SIZE);
    assert_non_null(g.model);
    assert_int_equal(vd_pread(dev, 0, SIZE, g.model), 0);
    vd_node_user_add(&g.user);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, guest_thread, &g), 0);

    CommitRequest r = {.job_id = "c1", .device = dev->node_name, .auto_finalize = true,
                       .auto_dismiss = false};
    if (commit_request_start(&r, &err) < 0) {
        fail_msg("block-commit: %s", vd_error_msg(err));
    }
    Job *job = job_find("c1"); /* a reference */
    assert_non_null(job);
    wait_status(job, JOB_STATUS_READY);
    uint64_t syncs_ready = vd_flush_total_syncs();
    wait_guest_ops(&g, guest_ops_now(&g) + 20); /* written while ready */
    *ready_syncs = vd_flush_total_syncs() - syncs_ready;
    vd_mutex_lock(&g.lock);
    uint64_t before = g.drained_syncs; /* the job's start drained the guest too */
    int drains_before = g.drains;
    vd_mutex_unlock(&g.lock);
    assert_int_equal(job_user_complete(job, &err), 0);
    job_wait_thread(job);
    assert_int_equal(job_status(job), JOB_STATUS_CONCLUDED);
    json_t *info = job_query_info(job);
    assert_null(json_object_get(info, "error"));
    json_decref(info);
    wait_guest_ops(&g, guest_ops_now(&g) + 20); /* after the pivot: into base */
    assert_int_equal(job_user_dismiss(job, &err), 0);
    job_unref(job);

    vd_mutex_lock(&g.lock);
    g.stop = true;
    vd_cond_broadcast(&g.cond);
    uint64_t syncs = g.drained_syncs - before;
    *drains = g.drains - drains_before;
    vd_mutex_unlock(&g.lock);
    pthread_join(th, NULL);
    vd_node_user_remove(&g.user);
    assert_int_equal(g.errors, 0);
    /* The guest's image is base now. */
    assert_string_equal(g.node->filename, base);
    vd_node_unref(g.node);
    graph_close_all();
    vd_node_unref(dev);
    assert_reads(base, g.model);
    assert_check_clean(base);
    assert_check_clean(top);
    free(g.model);
    pthread_mutex_destroy(&g.lock);
    pthread_cond_destroy(&g.cond);
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
    return syncs;
}

/*
 * A guest that never flushes: the drained pivot syncs nothing (its writes wait for its flush), and
 * neither does the job while READY: nothing is owed durability, and a flush there stops the copy
 * while the guest dirties on (a complete arriving meanwhile found that to copy first).
 */
static void test_active_commit_pivot_without_guest_flush_syncs_nothing_drained(void **state)
{
    int drains = 0;
    uint64_t ready_syncs = 0;
    assert_int_equal(commit_under_guest(false, &drains, &ready_syncs), 0);
    assert_int_equal(drains, 1);
    assert_int_equal(ready_syncs, 0);
}

/*
 * A guest flushing after every write: base is synced before the drain, and the drained section
 * syncs only the tail it copied (a qcow2 flush: data, then the L2 tables, at most 2 syncs).
 */
static void test_active_commit_pivot_after_guest_flush_syncs_only_the_tail(void **state)
{
    int drains = 0;
    uint64_t ready_syncs = 0;
    assert_true(commit_under_guest(true, &drains, &ready_syncs) <= 2);
    assert_int_equal(drains, 1);
    assert_true(ready_syncs > 0); /* its flushes, and base kept durable after them */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_active_commit_pivot_without_guest_flush_syncs_nothing_drained),
        cmocka_unit_test(test_active_commit_pivot_after_guest_flush_syncs_only_the_tail),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
