/*
 * thread-cache.c - recycled detached threads (thread-cache.h). Idle threads wait on their own
 * condition variable in a stack (the most recently idle first: its stack is warm), at most
 * TC_MAX_IDLE of them, each for TC_IDLE_S seconds.
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "util/lock.h"
#include "util/thread-cache.h"

#define TC_MAX_IDLE 16
#define TC_IDLE_S 5

typedef struct TcThread {
    pthread_cond_t cond;
    void (*fn)(void *); /* the work handed over; NULL while idle */
    void *arg;
    struct TcThread *next; /* idle stack */
} TcThread;

static pthread_mutex_t tc_lock = PTHREAD_MUTEX_INITIALIZER;
static TcThread *tc_idle;
static unsigned tc_nidle;

static void tc_unlink_locked(TcThread *t)
{
    for (TcThread **pp = &tc_idle; *pp; pp = &(*pp)->next) {
        if (*pp == t) {
            *pp = t->next;
            tc_nidle--;
            return;
        }
    }
}

static void *tc_main(void *arg)
{
    TcThread *t = arg;
    vd_mutex_lock(&tc_lock);
    while (t->fn) {
        void (*fn)(void *) = t->fn;
        void *a = t->arg;
        vd_mutex_unlock(&tc_lock);
        fn(a);
        vd_thread_name("idle");
        vd_mutex_lock(&tc_lock);
        t->fn = NULL;
        if (tc_nidle >= TC_MAX_IDLE) {
            break;
        }
        t->next = tc_idle;
        tc_idle = t;
        tc_nidle++;
        struct timespec deadline;
        clock_gettime(CLOCK_MONOTONIC, &deadline);
        deadline.tv_sec += TC_IDLE_S;
        while (!t->fn) {
            int r = vd_cond_timedwait(&t->cond, &tc_lock, &deadline);
            if (r == ETIMEDOUT && !t->fn) {
                tc_unlink_locked(t);
                break;
            }
        }
    }
    vd_mutex_unlock(&tc_lock);
    pthread_cond_destroy(&t->cond);
    free(t);
    return NULL;
}

int vd_thread_run(void (*fn)(void *), void *arg)
{
    vd_mutex_lock(&tc_lock);
    TcThread *t = tc_idle;
    if (t) {
        tc_idle = t->next;
        tc_nidle--;
        t->fn = fn;
        t->arg = arg;
        vd_cond_signal(&t->cond);
        vd_mutex_unlock(&tc_lock);
        return 0;
    }
    vd_mutex_unlock(&tc_lock);

    t = calloc(1, sizeof(*t));
    if (!t) {
        return -ENOMEM;
    }
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    int r = pthread_cond_init(&t->cond, &ca);
    pthread_condattr_destroy(&ca);
    if (r != 0) {
        free(t);
        return -r;
    }
    t->fn = fn;
    t->arg = arg;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t tid;
    r = pthread_create(&tid, &attr, tc_main, t);
    pthread_attr_destroy(&attr);
    if (r != 0) {
        pthread_cond_destroy(&t->cond);
        free(t);
        return -r;
    }
    return 0;
}

void vd_thread_name(const char *fmt, ...)
{
    char name[16]; /* TASK_COMM_LEN: longer names are cut, not refused */
    va_list ap;
    va_start(ap, fmt);
    (void)vsnprintf(name, sizeof(name), fmt, ap);
    va_end(ap);
    (void)pthread_setname_np(pthread_self(), name);
}
