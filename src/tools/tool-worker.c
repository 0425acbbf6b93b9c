/*
 * tool-worker.c - one background thread running one task at a time.
 *
 * The offline commands are bound by the kernel's page-cache copies (perf: ~75 % of `compare` in
 * _copy_to_iter). qemu-img does them one after another; with a second thread, compare and rebase
 * read their two images at once and commit reads the next chunk while the previous one is
 * written.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "tool.h"
#include "util/lock.h"

struct ToolWorker {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    ToolTask fn;     /* task to run; NULL when idle or done */
    void *arg;
    int result;
    bool quit;
};

static void *worker_main(void *opaque)
{
    ToolWorker *w = opaque;
    vd_mutex_lock(&w->lock);
    for (;;) {
        while (!w->fn && !w->quit) {
            vd_cond_wait(&w->cond, &w->lock);
        }
        if (w->quit) {
            break;
        }
        ToolTask fn = w->fn;
        vd_mutex_unlock(&w->lock);
        int r = fn(w->arg);
        vd_mutex_lock(&w->lock);
        w->result = r;
        w->fn = NULL;
        vd_cond_broadcast(&w->cond);
    }
    vd_mutex_unlock(&w->lock);
    return NULL;
}

ToolWorker *tool_worker_new(void)
{
    ToolWorker *w = calloc(1, sizeof(*w));
    if (!w) {
        return NULL;
    }
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->cond, NULL);
    if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
        pthread_mutex_destroy(&w->lock);
        pthread_cond_destroy(&w->cond);
        free(w);
        return NULL;
    }
    return w;
}

void tool_worker_submit(ToolWorker *w, ToolTask fn, void *arg)
{
    vd_mutex_lock(&w->lock);
    while (w->fn) { /* one task at a time */
        vd_cond_wait(&w->cond, &w->lock);
    }
    w->fn = fn;
    w->arg = arg;
    vd_cond_broadcast(&w->cond);
    vd_mutex_unlock(&w->lock);
}

int tool_worker_wait(ToolWorker *w)
{
    vd_mutex_lock(&w->lock);
    while (w->fn) {
        vd_cond_wait(&w->cond, &w->lock);
    }
    int r = w->result;
    vd_mutex_unlock(&w->lock);
    return r;
}

void tool_worker_free(ToolWorker *w)
{
    if (!w) {
        return;
    }
    vd_mutex_lock(&w->lock);
    while (w->fn) {
        vd_cond_wait(&w->cond, &w->lock);
    }
    w->quit = true;
    vd_cond_broadcast(&w->cond);
    vd_mutex_unlock(&w->lock);
    pthread_join(w->thread, NULL);
    pthread_mutex_destroy(&w->lock);
    pthread_cond_destroy(&w->cond);
    free(w);
}

int tool_read_task(void *arg)
{
    ToolRead *t = arg;
    if (t->len < 0) {
        return vd_pread(t->bs, t->off, t->n, t->buf);
    }
    if (!t->bs || t->off >= (uint64_t)t->len) {
        memset(t->buf, 0, t->n);
        return 0;
    }
    uint64_t avail = (uint64_t)t->len - t->off < t->n ? (uint64_t)t->len - t->off : t->n;
    int r = vd_pread(t->bs, t->off, avail, t->buf);
    if (avail < t->n) {
        memset(t->buf + avail, 0, t->n - avail);
    }
    return r;
}
