/*
 * graph.h - vdiskd's named block nodes: the registry blockdev-add fills (qmp/qmp-blockdev.c parses
 * its options and opens the tree), blockdev-del and node-name lookup. The graph holds one
 * reference per named node; exports and jobs take their own. All calls run on the QMP thread
 * (or at startup before it starts, or at shutdown after it stopped), so the registry needs no lock
 * of its own; block jobs' final graph changes run there too (job.h, job_set_host).
 */
#ifndef VDISK_BLOCK_GRAPH_H
#define VDISK_BLOCK_GRAPH_H

#include "block/block.h"
#include "block/users.h"

/*
 * blockdev-add's checks and registration: may a new format node open file (writable or not)
 * without sharing a host file with a writer, or writing under a reader? -EBUSY if not. After
 * the open, graph_add_root checks the whole new tree (backing files from headers too) the same
 * way and registers bs as a monitor-owned root (taking over the caller's reference on success).
 */
int graph_check_sharing(BlockNode *file, bool writable, VdError **errp);
int graph_add_root(BlockNode *bs, VdError **errp);
/* blockdev-del: refuses (-EBUSY) while the node is in use by an export, a job or another node. */
int graph_blockdev_del(const char *node_name, VdError **errp);
BlockNode *graph_find_node(const char *node_name);
/*
 * Register an already open node under its node_name (snapshots, mirror targets, commit's base).
 * Takes a ref. Such a registration is implicit (QEMU's nodes a job created, not blockdev-add's):
 * graph_drop_implicit releases it once the node left the guest's chain.
 */
int graph_register(BlockNode *node, VdError **errp);
/*
 * A job made `new` the image `old` was (commit's read-write reopen of base, or its return to
 * read-only): the registry slot of `old`, if it has one, holds `new` from now on, so one node name
 * names one node. No-op when old is not registered.
 */
void graph_replace_node(BlockNode *old, BlockNode *new_node);
/* Unregister node if it was registered implicitly and no registered tree uses it any more. */
void graph_drop_implicit(BlockNode *node);
/* The node whose backing is bs among the registered trees (NULL if none): bs is a middle layer. */
BlockNode *graph_backing_parent(BlockNode *bs);
/*
 * Every node of the registered trees above bs: those with bs as their file or backing child, their
 * parents, and so on (each once; bs itself not included). A new array in *out (NULL when none).
 * -ENOMEM with nothing returned.
 */
int graph_ancestors(BlockNode *bs, BlockNode ***out, size_t *n);
/*
 * A pivot: every registered node whose file or backing child is `from` (except `skip`, and `to`
 * and the nodes below it: no loop) has `to` there from now on. Its users must be drained
 * (nothing in flight through it).
 */
void graph_repoint_parents(BlockNode *from, BlockNode *to, BlockNode *skip);
/*
 * Every way I/O reaches a node from outside, drained for a pivot (mirror's, active commit's) or a
 * chain switch: the node's own users (exports, including those added while a job ran) and the
 * users of every registered node above it (a raw node over it with its own export, their parents).
 */
typedef struct GraphDrained {
    VdDrainedUsers own, above;
} GraphDrained;
/*
 * Drain them all, each once; `skip` (NULL: none) is a node above bs whose users the caller drains
 * itself (mirror's filter). -ENOMEM with nothing drained.
 */
int graph_drain_writers(BlockNode *bs, BlockNode *skip, GraphDrained *d);
/* Resume them: bs's own users on `to` (NULL: keep their node), the others on their own node. */
void graph_resume_writers(GraphDrained *d, BlockNode *to);
/*
 * Drop a registered node's registration (the graph's reference), e.g. a drive-mirror target after a
 * cancel. -ENOENT if not registered, -EBUSY while another node still has it as a child.
 */
int graph_unregister(BlockNode *node);
void graph_foreach(void (*cb)(BlockNode *node, void *opaque), void *opaque);
/* Flush and drop every node (daemon shutdown). */
void graph_close_all(void);

#endif
