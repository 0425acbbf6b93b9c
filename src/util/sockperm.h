/*
 * sockperm.h - who may connect to the UNIX sockets vdiskd creates (QMP monitor, NBD server):
 * the daemon's user alone (mode 0600) unless a group is configured (0660, owned by that group).
 * Applied between bind() and listen(), so no connection can come in under a looser mode.
 */
#ifndef VDISK_UTIL_SOCKPERM_H
#define VDISK_UTIL_SOCKPERM_H

#include "util/error.h"

/* Set the group (a name or a numeric gid) for sockets created from now on; NULL = none (0600).
 * Call at startup, before any socket is created. 0 or -errno with *errp set. */
int vd_socket_set_group(const char *group, VdError **errp);

/*
 * Bind fd (an AF_UNIX stream socket) to path, give it its mode (and group), then listen: no
 * client can connect before the mode is right. On failure the path is removed if this bound it,
 * fd is left open for the caller, and -errno is returned with *errp set ("what" names the socket).
 */
int vd_socket_listen_unix(int fd, const char *path, int backlog, const char *what,
                          VdError **errp);

#endif
