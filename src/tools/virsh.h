/*
 * virsh.h - the online, virsh-like commands of `vdisk` (blockcopy, blockpull, blockcommit,
 * blockjob, snapshot-create, domblklist) and the small blocking QMP client they share.
 * The client speaks to vdiskd or qemu-storage-daemon over a UNIX socket; one connection per
 * command, single-threaded. Events seen while waiting for a reply are queued, never lost.
 */
#ifndef VDISK_TOOLS_VIRSH_H
#define VDISK_TOOLS_VIRSH_H

#include <jansson.h>
#include <stdbool.h>

#include "util/error.h"

/* Where the commands connect without --socket: $VDISK_SOCKET, else this path. */
#define VIRSH_DEFAULT_SOCKET "/run/vdisk/vdiskd.qmp"

typedef struct QmpConn QmpConn;

/* Connect, read the greeting and negotiate (qmp_capabilities). NULL with *errp on failure. */
QmpConn *qmpc_connect(const char *path, VdError **errp);
void qmpc_close(QmpConn *c);

/*
 * Run a command (args stolen, may be NULL) and wait for its reply (matched by id). Returns a new
 * reference to "return", or NULL with *errp = the server's "desc" (error code EIO, or ENOENT for
 * DeviceNotFound / CommandNotFound -> ENOSYS) or a transport error.
 */
json_t *qmpc_execute(QmpConn *c, const char *cmd, json_t *args, VdError **errp);

/*
 * Wait up to timeout_ms for more messages from the server (events are queued). Returns 1 if
 * something arrived, 0 on timeout, -EINTR if a signal interrupted the wait, or -errno with *errp.
 */
int qmpc_wait(QmpConn *c, int timeout_ms, VdError **errp);

/*
 * Remove and return (new reference) the first queued event whose name is one of names (NULL-
 * terminated) and, when device is non-NULL, whose data.device (or data.id) equals device.
 */
json_t *qmpc_take_event(QmpConn *c, const char *const *names, const char *device);

/* The socket the user chose: opt if given, else $VDISK_SOCKET, else VIRSH_DEFAULT_SOCKET. */
const char *virsh_socket_path(const char *opt);

/* Commands: argv[0] is the command name; return the exit status. */
int virsh_blockcopy(int argc, char **argv);
int virsh_blockpull(int argc, char **argv);
int virsh_blockcommit(int argc, char **argv);
int virsh_blockjob(int argc, char **argv);
int virsh_snapshot_create(int argc, char **argv);
int virsh_domblklist(int argc, char **argv);

#endif
