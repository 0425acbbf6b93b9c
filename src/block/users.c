/*
 * users.c - the registry of node users (users.h): a list under one mutex. Drain and resume collect
 * the users of a node under the mutex and call them without it, since a drain waits for requests
 * that may themselves look users up. Users are removed only on the graph-changing thread, the one
 * that drains and repoints them, so a collected user stays valid until it is resumed.
 */
#include "block/users.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>

#include "util/lock.h"

static pthread_mutex_t users_lock = PTHREAD_MUTEX_INITIALIZER;
static VdNodeUser *users; /* users_lock */

void vd_node_user_add(VdNodeUser *u)
{
    vd_mutex_lock(&users_lock);
    u->next = users;
    users = u;
    vd_mutex_unlock(&users_lock);
}

void vd_node_user_remove(VdNodeUser *u)
{
    vd_mutex_lock(&users_lock);
    for (VdNodeUser **p = &users; *p; p = &(*p)->next) {
        if (*p == u) {
            *p = u->next;
            break;
        }
    }
    u->next = NULL;
    vd_mutex_unlock(&users_lock);
}

size_t vd_node_user_count(BlockNode *node)
{
    size_t n = 0;
    vd_mutex_lock(&users_lock);
    for (VdNodeUser *u = users; u; u = u->next) {
        n += u->ops->node(u) == node;
    }
    vd_mutex_unlock(&users_lock);
    return n;
}

bool vd_node_users_any(bool (*pred)(BlockNode *node, void *opaque), void *opaque)
{
    bool found = false;
    vd_mutex_lock(&users_lock);
    for (VdNodeUser *u = users; u && !found; u = u->next) {
        found = pred(u->ops->node(u), opaque);
    }
    vd_mutex_unlock(&users_lock);
    return found;
}

int vd_node_users_drain(BlockNode *node, VdDrainedUsers *set)
{
    set->v = NULL;
    set->n = 0;
    return vd_node_users_drain_more(node, set);
}

int vd_node_users_drain_more(BlockNode *node, VdDrainedUsers *set)
{
    size_t n = vd_node_user_count(node);
    if (n == 0) {
        return 0;
    }
    VdNodeUser **v = realloc(set->v, (set->n + n) * sizeof(*v));
    if (!v) {
        return -ENOMEM;
    }
    set->v = v;
    size_t first = set->n;
    /* Users are added and removed on this thread only: the count cannot have grown. */
    vd_mutex_lock(&users_lock);
    for (VdNodeUser *u = users; u && set->n < first + n; u = u->next) {
        if (u->ops->node(u) == node) {
            set->v[set->n++] = u;
        }
    }
    vd_mutex_unlock(&users_lock);
    for (size_t i = first; i < set->n; i++) {
        set->v[i]->ops->drain_begin(set->v[i]);
    }
    return 0;
}

void vd_node_users_resume(VdDrainedUsers *set, BlockNode *new_node)
{
    for (size_t i = 0; i < set->n; i++) {
        if (new_node) {
            set->v[i]->ops->set_node(set->v[i], new_node);
        }
        set->v[i]->ops->drain_end(set->v[i]);
    }
    free(set->v);
    set->v = NULL;
    set->n = 0;
}
