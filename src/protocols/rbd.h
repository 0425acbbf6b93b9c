/*
 * rbd.h - the Ceph RBD protocol (rbd.c, vd_drv_rbd, built on librbd): a protocol node whose bytes
 * live in an RBD image of a Ceph cluster.
 *
 * Filenames use QEMU's form "rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=PATH][:id=USER][:KEY=VALUE]"
 * (a backslash escapes ':', '@', '/' and itself; other KEY=VALUE pairs are librados options).
 * vdiskd's blockdev-add (driver "rbd": pool, namespace, image, snapshot, conf, user) builds one.
 */
#ifndef VDISK_PROTOCOLS_RBD_H
#define VDISK_PROTOCOLS_RBD_H

#include "block/block.h"

extern const BlockDriver vd_drv_rbd;

/*
 * The filename for an image from its parts (blockdev-add's options); namespace, snap, conf and
 * user may be NULL. Special characters are escaped. malloc'ed, NULL on ENOMEM.
 */
char *vd_rbd_make_filename(const char *pool, const char *nspace, const char *image,
                           const char *snap, const char *conf, const char *user);

#endif
