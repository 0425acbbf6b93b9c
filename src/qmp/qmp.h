/*
 * qmp.h - the QMP server's contract with vdiskd (main, NBD, jobs).
 *
 * The server listens on a UNIX socket (mode 0600) and serves any number of clients from its own
 * thread: greeting, qmp_capabilities negotiation, command dispatch, events. Commands run on the QMP
 * thread one at a time, so command handlers never race with each other.
 */
#ifndef VDISK_QMP_QMP_H
#define VDISK_QMP_QMP_H

#include <jansson.h>

#include "util/error.h"

int qmp_server_start(const char *socket_path, VdError **errp);
/* Stop serving, close client sockets, remove the socket file. */
void qmp_server_stop(void);

/*
 * Broadcast an event to every negotiated client: {"event": name, "data": data, "timestamp": ...}.
 * Steals the reference to data (may be NULL). Safe from any thread.
 */
void qmp_event_emit(const char *name, json_t *data);

/* Called (on the QMP thread) when a client sends "quit"; the daemon then shuts down. */
void qmp_set_quit_handler(void (*fn)(void));

/*
 * Register a command handler. args is the "arguments" object (never NULL: {} when absent).
 * On success return a new reference to the "return" value ({} for none); on failure return NULL
 * with *errp set (reported as GenericError unless vd_error_code is ENOENT for a missing device:
 * DeviceNotFound, or ENODEV for a missing block job: DeviceNotActive, QEMU's class for that).
 * So use neither code for ordinary failures (e.g. a file that does not exist).
 */
typedef json_t *(*QmpCommandFn)(json_t *args, VdError **errp);
void qmp_register_command(const char *name, QmpCommandFn fn);

#endif
