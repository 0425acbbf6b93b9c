/*
 * file.h - extras of the file protocol (file.c) used by the block layer, beyond the vtable.
 */
#ifndef VDISK_PROTOCOLS_FILE_H
#define VDISK_PROTOCOLS_FILE_H

#include <stdbool.h>

#include "block/block.h"

/*
 * A format with metadata (anything but raw) now sits on `file`: also forbid other writers and
 * resizers, and take the resize permission when writable, like QEMU does. No-op on other
 * protocols and with VD_OPEN_FORCE_SHARE. -EAGAIN with a message when another process conflicts.
 */
int vd_file_lock_for_format(BlockNode *file, bool writable, VdError **errp);

#endif
