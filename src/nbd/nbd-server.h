/*
 * nbd-server.h - the NBD server's contract with the rest of vdiskd (QMP, jobs).
 *
 * One server per daemon, listening on one address; exports map a name to a block node. The server
 * never knows the node's format: it calls the vd_* block API only. Threads: these functions may be
 * called from the QMP thread while connections are served by the server's own threads; an export's
 * node can be swapped (pivot) with nbd_export_set_node, which waits for in-flight requests of that
 * export to drain, swaps, and resumes - clients see no error and no disconnect.
 */
#ifndef VDISK_NBD_NBD_SERVER_H
#define VDISK_NBD_NBD_SERVER_H

#include <stdbool.h>
#include <stdint.h>

#include "block/block.h"
#include "block/dirty-bitmap.h"
#include "util/error.h"
#include "util/tls-creds.h"

typedef struct NbdExport NbdExport;

typedef struct NbdServerAddress {
    enum { NBD_ADDR_INET, NBD_ADDR_UNIX } type;
    char *host; /* inet: default "127.0.0.1" */
    char *port; /* inet: default "10809" */
    char *path; /* unix */
} NbdServerAddress;

/* Start listening; only one server at a time (-EEXIST otherwise). max_connections 0 = unlimited. */
int nbd_server_start(const NbdServerAddress *addr, uint32_t max_connections, VdError **errp);
/*
 * The same, with NBD over TLS (nbd-server-start's tls-creds, tls-authz): a client must send
 * NBD_OPT_STARTTLS before anything else, and must pass tls_authz (NULL = anyone the credentials
 * admit). On success the server takes both references (dropped at stop); on failure, not.
 */
int nbd_server_start_tls(const NbdServerAddress *addr, uint32_t max_connections,
                         VdTlsCreds *tls_creds, VdAuthz *tls_authz, VdError **errp);
/*
 * The objects nbd-server-start's tls-creds / tls-authz name (either NULL = none): new references
 * in *creds / *authz, or -errno with QEMU's message ("No TLS credentials with id 'x'", ...).
 * tls-authz without tls-creds is refused (qemu-nbd refuses it too).
 */
int nbd_server_tls_lookup(const char *tls_creds, const char *tls_authz, VdTlsCreds **creds,
                          VdAuthz **authz, VdError **errp);
/* Stop listening, disconnect every client (after their in-flight requests finish), drop exports. */
void nbd_server_stop(void);
bool nbd_server_running(void);
/* Serve a client that is already connected (fd is taken: a socketpair in fuzz/); the server must
 * be running. 0, or -ESRCH (fd closed) when it is not. */
int nbd_server_add_client(int fd);

/* Add an export (takes a reference on node). name must be unique. */
NbdExport *nbd_export_add(const char *id, const char *name, BlockNode *node, bool writable,
                          const char *description, VdError **errp);
/*
 * Add an export that also serves bitmaps (each on its own node, looked up by the caller) as the
 * metadata contexts qemu:dirty-bitmap:NAME. Each must exist and be usable (not busy, not
 * inconsistent) and, for a read-only export of a writable node, disabled - QEMU's rules and
 * errors. They stay busy (cannot be changed or removed) until the export is gone.
 */
NbdExport *nbd_export_add_bitmaps(const char *id, const char *name, BlockNode *node,
                                  bool writable, const char *description,
                                  const VdBitmapRef *bitmaps, size_t nbitmaps, VdError **errp);
/* Likewise, also serving qemu:allocation-depth when alloc_depth (QEMU's allocation-depth). */
NbdExport *nbd_export_add_full(const char *id, const char *name, BlockNode *node, bool writable,
                               const char *description, const VdBitmapRef *bitmaps,
                               size_t nbitmaps, bool alloc_depth, VdError **errp);
/* Remove: refuses with -EBUSY while clients are connected unless force (mode "hard"). */
int nbd_export_del(const char *id, bool force, VdError **errp);
NbdExport *nbd_export_find(const char *id);
NbdExport *nbd_export_find_by_name(const char *name);

/* Iterate over exports (under the server's lock; cb must not call back into the server). */
void nbd_export_foreach(void (*cb)(NbdExport *exp, void *opaque), void *opaque);
const char *nbd_export_id(const NbdExport *exp);
const char *nbd_export_name(const NbdExport *exp);
BlockNode *nbd_export_node(const NbdExport *exp);
bool nbd_export_writable(const NbdExport *exp);
unsigned nbd_export_client_count(const NbdExport *exp);

/*
 * Quiesce an export: new requests wait, in-flight ones finish. Pairs with nbd_export_resume.
 * Between the two, the node may be swapped with nbd_export_set_node (takes a ref on the new node,
 * drops the old one). Used by the pivot of block-job-complete.
 */
void nbd_export_drain_begin(NbdExport *exp);
void nbd_export_set_node(NbdExport *exp, BlockNode *node);
void nbd_export_drain_end(NbdExport *exp);

#endif
