/*
 * lock.c - checked lock calls (lock.h): every pthread lock operation's result is checked, and a
 * failure aborts with the call's name and error, since no caller could go on correctly after one.
 */
#include "util/lock.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void check(const char *call, int err)
{
    if (err) {
        fprintf(stderr, "vdisk: %s failed: %s\n", call, strerror(err));
        abort();
    }
}

void vd_mutex_lock(pthread_mutex_t *m)
{
    check("pthread_mutex_lock", pthread_mutex_lock(m));
}

void vd_mutex_unlock(pthread_mutex_t *m)
{
    check("pthread_mutex_unlock", pthread_mutex_unlock(m));
}

void vd_rwlock_rdlock(pthread_rwlock_t *l)
{
    check("pthread_rwlock_rdlock", pthread_rwlock_rdlock(l));
}

void vd_rwlock_wrlock(pthread_rwlock_t *l)
{
    check("pthread_rwlock_wrlock", pthread_rwlock_wrlock(l));
}

void vd_rwlock_unlock(pthread_rwlock_t *l)
{
    check("pthread_rwlock_unlock", pthread_rwlock_unlock(l));
}

void vd_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
{
    check("pthread_cond_wait", pthread_cond_wait(c, m));
}

int vd_cond_timedwait(pthread_cond_t *c, pthread_mutex_t *m, const struct timespec *deadline)
{
    int r = pthread_cond_timedwait(c, m, deadline);
    if (r != ETIMEDOUT) {
        check("pthread_cond_timedwait", r);
    }
    return r;
}

void vd_cond_signal(pthread_cond_t *c)
{
    check("pthread_cond_signal", pthread_cond_signal(c));
}

void vd_cond_broadcast(pthread_cond_t *c)
{
    check("pthread_cond_broadcast", pthread_cond_broadcast(c));
}
