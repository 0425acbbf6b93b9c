/*
 * sockperm.c - mode and group of vdiskd's UNIX sockets (see sockperm.h). The setting is written
 * once at startup and only read afterwards, so it needs no lock.
 */
#include "util/sockperm.h"

#include <errno.h>
#include <grp.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

static bool have_group;
static gid_t sock_gid;

int vd_socket_set_group(const char *group, VdError **errp)
{
    if (!group) {
        have_group = false;
        return 0;
    }
    char *end = NULL;
    unsigned long id = strtoul(group, &end, 10);
    if (*group && end && !*end) {
        sock_gid = (gid_t)id;
    } else {
        struct group *g = getgrnam(group);
        if (!g) {
            vd_error_setg(errp, ENOENT, "Unknown group '%s'", group);
            return -ENOENT;
        }
        sock_gid = g->gr_gid;
    }
    have_group = true;
    return 0;
}

static int restrict_mode(const char *path, VdError **errp)
{
    if (have_group && chown(path, (uid_t)-1, sock_gid) < 0) {
        int e = errno;
        vd_error_setg_errno(errp, e, "Cannot give socket '%s' to group %u", path,
                            (unsigned)sock_gid);
        return -e;
    }
    if (chmod(path, have_group ? 0660 : 0600) < 0) {
        int e = errno;
        vd_error_setg_errno(errp, e, "Cannot set the mode of socket '%s'", path);
        return -e;
    }
    return 0;
}

int vd_socket_listen_unix(int fd, const char *path, int backlog, const char *what,
                          VdError **errp)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(sa.sun_path)) {
        vd_error_setg(errp, ENAMETOOLONG, "%s path '%s' is too long", what, path);
        return -ENAMETOOLONG;
    }
    memcpy(sa.sun_path, path, strlen(path) + 1);
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        int e = errno;
        vd_error_setg_errno(errp, e, "Cannot bind %s '%s'", what, path);
        return -e;
    }
    int r = restrict_mode(path, errp);
    if (r == 0 && listen(fd, backlog) < 0) {
        r = -errno;
        vd_error_setg_errno(errp, -r, "Cannot listen on %s '%s'", what, path);
    }
    if (r < 0) {
        unlink(path);
    }
    return r;
}
