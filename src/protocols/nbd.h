/*
 * nbd.h - the NBD client protocol (nbd.c, vd_drv_nbd, built on libnbd): a protocol node whose
 * bytes live in an export of an NBD server (qemu-nbd, nbdkit, qemu-storage-daemon, vdiskd).
 *
 * Filenames "nbd://host[:port]/export", "nbd+unix:///export?socket=PATH" and "nbds://..." (TLS)
 * open with this driver through vd_open (block.c picks it by scheme). vdiskd's blockdev-add
 * (driver "nbd", server {type inet|unix}, export) uses vd_nbd_open / vd_nbd_open_qmp below.
 */
#ifndef VDISK_PROTOCOLS_NBD_H
#define VDISK_PROTOCOLS_NBD_H

#include <stdbool.h>

#include "block/block.h"

extern const BlockDriver vd_drv_nbd;

/* Default NBD TCP port (IANA). */
#define VD_NBD_DEFAULT_PORT "10809"

/*
 * Build the libnbd URI for a server and export: "nbd://HOST[:PORT]/EXPORT" when host is given
 * (IPv6 literals are bracketed), else "nbd+unix:///EXPORT?socket=PATH". The export name and the
 * socket path are percent-encoded, so any name round-trips. port NULL = default.
 * Returns a malloc'ed string, or NULL (errno EINVAL: neither/both of host and unix_path; ENOMEM).
 */
char *vd_nbd_make_uri(const char *host, const char *port, const char *unix_path,
                      const char *export_name);

/*
 * Open a protocol node on an NBD export given as options (blockdev-add's server + export):
 * exactly one of host (with optional port, default 10809) or unix_path; export_name NULL = "".
 * node_name NULL = generated. flags: VD_OPEN_* (VD_OPEN_RDWR for a writable node; a read-only
 * export gives a node with read_only set, whose writes fail -EPERM).
 * The node's filename is the URI from vd_nbd_make_uri. Returns refcnt 1, or NULL with *errp set
 * (one line naming the URI, e.g. "Could not connect to 'nbd://h:1/e': Connection refused").
 */
BlockNode *vd_nbd_open(const char *host, const char *port, const char *unix_path,
                       const char *export_name, const char *node_name, int flags,
                       VdError **errp);

/*
 * The same from blockdev-add's QMP options for driver "nbd" (as QEMU spells them):
 *   {"driver": "nbd", "node-name": N, "read-only": bool,
 *    "server": {"type": "inet", "host": H, "port": "P"} | {"type": "unix", "path": P},
 *    "export": NAME}
 * "port" may be a string or an integer. flags are VD_OPEN_* (VD_OPEN_RDWR unless read-only is
 * wanted; "read-only": true in options clears it). Unknown keys are ignored.
 */
BlockNode *vd_nbd_open_qmp(json_t *options, int flags, VdError **errp);

/*
 * How long opening a node waits for its first connection (TCP connect + NBD handshake), in ms;
 * < 0 (the default) waits as long as the server takes, as qemu-img does. vdiskd bounds it so a
 * server that accepts but never answers cannot block its QMP thread. Process-wide; set it at startup.
 */
void vd_nbd_set_connect_timeout(int timeout_ms);

/* Number of NBD connections a node uses (1, or more when the server advertises multi-conn). */
int vd_nbd_connection_count(BlockNode *bs);

/*
 * Where the client's events go (vdiskd: its QMP clients); none by default. Called from the
 * connection's own thread, data a new reference the sink takes. Events:
 *   X_NBD_EXPORT_CHANGED {"node-name", "uri", "changed"}: a reconnection reached a server whose
 *   export differs from the one the node opened ("changed" names what); its I/O fails with EIO
 *   until the original export answers again.
 */
typedef void VdNbdEventSink(const char *name, json_t *data);
void vd_nbd_set_event_sink(VdNbdEventSink *fn);

#endif
