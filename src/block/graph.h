/*
 * graph.h - vdiskd's named block nodes: blockdev-add / blockdev-del and node-name lookup.
 *
 * Nodes are added from QMP-style option objects (blockdev-add's arguments). The graph holds one
 * reference per named node; exports and jobs take their own. All calls run on the QMP thread
 * (or at startup before it starts, or at shutdown after it stopped), so the registry needs no lock
 * of its own; block jobs' final graph changes run there too (job.h, qmp_defer).
 */
#ifndef VDISK_BLOCK_GRAPH_H
#define VDISK_BLOCK_GRAPH_H

#include <jansson.h>

#include "block/block.h"

/* blockdev-add: build a node (and its file/backing children) from options; registers node-name. */
BlockNode *graph_blockdev_add(json_t *options, VdError **errp);
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
 * Drop a registered node's registration (the graph's reference), e.g. a drive-mirror target after a
 * cancel. -ENOENT if not registered, -EBUSY while another node still has it as a child.
 */
int graph_unregister(BlockNode *node);
void graph_foreach(void (*cb)(BlockNode *node, void *opaque), void *opaque);
/* Flush and drop every node (daemon shutdown). */
void graph_close_all(void);

#endif
