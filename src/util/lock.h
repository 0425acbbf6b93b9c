/*
 * lock.h - checked lock calls: the pthread mutex, rwlock and condition variable operations vdisk
 * uses, each checking its result and aborting with the call's name and error when it fails (as
 * QEMU's qemu_mutex_lock and nbdkit's lock helpers do). A lock call fails only on a corrupted or
 * uninitialised lock or a locking bug (EINVAL, EDEADLK, EPERM): no caller could continue correctly.
 */
#ifndef VDISK_UTIL_LOCK_H
#define VDISK_UTIL_LOCK_H

#include <pthread.h>
#include <time.h>

void vd_mutex_lock(pthread_mutex_t *m);
void vd_mutex_unlock(pthread_mutex_t *m);
void vd_rwlock_rdlock(pthread_rwlock_t *l);
void vd_rwlock_wrlock(pthread_rwlock_t *l);
void vd_rwlock_unlock(pthread_rwlock_t *l);
void vd_cond_wait(pthread_cond_t *c, pthread_mutex_t *m);
/* 0, or ETIMEDOUT once the absolute deadline has passed (the mutex is held again either way). */
int vd_cond_timedwait(pthread_cond_t *c, pthread_mutex_t *m, const struct timespec *deadline);
void vd_cond_signal(pthread_cond_t *c);
void vd_cond_broadcast(pthread_cond_t *c);

#endif
