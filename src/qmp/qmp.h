/*
 * qmp.h - the QMP server's contract with vdiskd (main, NBD, jobs).
 *
 * The server listens on a UNIX socket (mode 0600, or 0660 with vd_socket_set_group: util/sockperm.h)
 * and serves its clients (qmp_server_set_max_clients) from its own
 * thread: greeting, qmp_capabilities negotiation, command dispatch, events. Commands run on the QMP
 * thread one at a time, so command handlers never race with each other.
 */
#ifndef VDISK_QMP_QMP_H
#define VDISK_QMP_QMP_H

#include <jansson.h>
#include <stdbool.h>

#include "qmp/qmp-args.h"
#include "util/defer.h"
#include "util/error.h"

int qmp_server_start(const char *socket_path, VdError **errp);
/*
 * How many clients may be connected at once (default 64; set before qmp_server_start). A client
 * beyond it is accepted and the one that has sent nothing for longest is disconnected instead,
 * so idle connections cannot lock management out.
 */
void qmp_server_set_max_clients(unsigned n);
/* Stop serving, close client sockets, remove the socket file. */
void qmp_server_stop(void);

/*
 * One client session without a socket or a thread (the fuzzer's): buf is everything the client
 * sends, from qmp_capabilities on (no greeting); values are scanned, parsed and dispatched as the
 * server does, on the calling thread, and the answers are formatted and dropped. Only while no
 * server runs (-EBUSY otherwise), from one thread: the caller is then the only one running
 * commands, as the QMP thread would be. Registers the commands on first use.
 */
int qmp_session_run(const char *buf, size_t len, VdError **errp);

typedef struct BlockNode BlockNode;
/*
 * blockdev-add (the command, and vdiskd's --blockdev): check options as QEMU's BlockdevOptions,
 * open the node with its file/backing children and register it under its node-name. Returns the
 * node (the graph holds the reference), or NULL with *errp set and nothing opened or registered.
 */
BlockNode *qmp_blockdev_add(json_t *options, VdError **errp);

/*
 * Broadcast an event to every negotiated client: {"event": name, "data": data, "timestamp": ...}.
 * Steals the reference to data (may be NULL). Safe from any thread.
 */
void qmp_event_emit(const char *name, json_t *data);

/*
 * Deferred work for the QMP thread ("bottom half"): the graph of named nodes and the exports change
 * only on the QMP thread (docs/concurrency.md), so other threads (block jobs finishing) hand their
 * graph changes to it. The caller owns the struct; it must stay valid until fn has run. fn runs
 * between commands, in queue order, with no server lock held; it may emit events and call anything a
 * command handler may.
 */
typedef VdDeferred QmpDeferred; /* util/defer.h: fn, opaque, and a link private to the server */
/*
 * Queue d for the QMP thread and wake it: 0. -ESRCH when no QMP thread runs (not started, or
 * stopping): nothing was queued, the caller runs fn itself (then no other thread changes the graph:
 * startup, or shutdown after qmp_server_stop). Callbacks still queued when qmp_server_stop joins the
 * thread run on the stopping thread before it returns. Safe from any thread.
 */
int qmp_defer(QmpDeferred *d);
/* Is the caller the QMP thread? */
bool qmp_on_thread(void);

/* Called (on the QMP thread) when a client sends "quit"; the daemon then shuts down. */
void qmp_set_quit_handler(void (*fn)(void));

/*
 * Register a command: its argument table (qmp-args.h; {{NULL}} for none) and its handler. The
 * server checks the "arguments" object against the table before calling fn, so a handler only
 * sees arguments of the right names and JSON types (QEMU's errors otherwise). A NULL table is for
 * a union whose members depend on a tag (blockdev-add): fn then checks with qmp_args_check itself.
 * fn gets the "arguments" object (never NULL: {} when absent).
 * On success return a new reference to the "return" value ({} for none); on failure return NULL
 * with *errp set (reported as GenericError unless vd_error_code is ENOENT for a missing device:
 * DeviceNotFound, or ENODEV for a missing block job: DeviceNotActive, QEMU's class for that).
 * So use neither code for ordinary failures (e.g. a file that does not exist).
 */
/*
 * object-add's work, for vdiskd's --object too: args as QMP's ObjectOptions ({"qom-type", "id",
 * ...}); tls-creds-x509, tls-creds-psk and authz-simple. 0 or -errno with *errp set.
 */
int qmp_object_add(json_t *args, VdError **errp);

typedef json_t *(*QmpCommandFn)(json_t *args, VdError **errp);
void qmp_register_command(const char *name, const QmpArgSpec *args, QmpCommandFn fn);

#endif
