/*
 * users.h - who serves a node to the outside (an NBD export): users register here, and a job that
 * swaps a node (a pivot, a snapshot's overlay, a commit's base) drains and repoints every user of
 * it through this registry, without knowing what the users are. Registration and lookups take the
 * registry's mutex; drain/resume call the users without it. Repointing runs on the one thread that
 * changes the graph (the QMP thread, or the job's thread when none runs).
 */
#ifndef VDISK_BLOCK_USERS_H
#define VDISK_BLOCK_USERS_H

#include <stdbool.h>
#include <stddef.h>

#include "block/block.h"

typedef struct VdNodeUser VdNodeUser;

typedef struct VdNodeUserOps {
    BlockNode *(*node)(VdNodeUser *u);               /* the node it uses now */
    void (*drain_begin)(VdNodeUser *u);              /* new requests wait, in-flight ones finish */
    void (*set_node)(VdNodeUser *u, BlockNode *node); /* while drained: use node from now on */
    void (*drain_end)(VdNodeUser *u);
} VdNodeUserOps;

/* Embedded in the user's own struct (container_of style); the registry links it. */
struct VdNodeUser {
    const VdNodeUserOps *ops;
    VdNodeUser *next; /* private to the registry */
};

void vd_node_user_add(VdNodeUser *u);
void vd_node_user_remove(VdNodeUser *u); /* no-op when not registered */

/* The users of one node, drained (vd_node_users_drain) until vd_node_users_resume. */
typedef struct VdDrainedUsers {
    VdNodeUser **v;
    size_t n;
} VdDrainedUsers;

/* Drain every user of node (none: set->n == 0). -ENOMEM with nothing drained. */
int vd_node_users_drain(BlockNode *node, VdDrainedUsers *set);
/* The same, adding them to a set already drained (or zeroed). -ENOMEM: the set stays as it was. */
int vd_node_users_drain_more(BlockNode *node, VdDrainedUsers *set);
/* Point the drained users at new_node (NULL = keep their node), resume them, empty the set. */
void vd_node_users_resume(VdDrainedUsers *set, BlockNode *new_node);
/* How many users node has now. */
size_t vd_node_user_count(BlockNode *node);
/* Does any user's node satisfy pred? */
bool vd_node_users_any(bool (*pred)(BlockNode *node, void *opaque), void *opaque);

#endif
