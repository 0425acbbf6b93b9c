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
/* Register an already open node under its node_name (snapshots, mirror targets). Takes a ref. */
int graph_register(BlockNode *node, VdError **errp);
/*
 * Drop a registered node's registration (the graph's reference), e.g. a drive-mirror target after a
 * cancel. -ENOENT if not registered, -EBUSY while another node still has it as a child.
 */
int graph_unregister(BlockNode *node);
void graph_foreach(void (*cb)(BlockNode *node, void *opaque), void *opaque);
/* Flush and drop every node (daemon shutdown). */
void graph_close_all(void);

#endif
