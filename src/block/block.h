/*
 * block.h - the block layer's contract: nodes, drivers, chains.
 *
 * A BlockNode is one open layer: a protocol node (file, nbd) that moves bytes, or a format node
 * (qcow2, raw) that interprets the bytes of its `file` child and may have a `backing` child.
 * A backing chain is format nodes linked by `backing`: top -> ... -> base.
 *
 * Every I/O entry point takes byte offsets and lengths (no alignment required from callers) and
 * returns 0 or -errno. Reads of regions a format does not allocate fall through to the backing node,
 * or read as zeroes when there is none (or the offset is past the backing node's end).
 *
 * Threads: the vd_* I/O functions may be called from several threads on one node at once; a driver
 * protects its own metadata (see each driver's header comment). Opening, closing and reshaping a
 * chain (vd_node_set_backing, vd_node_unref) are done by one thread while no I/O is in flight.
 */
#ifndef VDISK_BLOCK_BLOCK_H
#define VDISK_BLOCK_BLOCK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "crypto/luks.h"
#include "util/error.h"
#include "util/optspec.h"

typedef struct BlockNode BlockNode;
typedef struct BlockDriver BlockDriver;
typedef struct json_t json_t; /* jansson */
typedef struct VdBitmapList VdBitmapList; /* block/dirty-bitmap.h */
typedef struct VdWriteHooks VdWriteHooks; /* block/write-hooks.h */

/* Request flags (vd_pwrite, vd_pwrite_zeroes, vd_pdiscard). */
enum {
    VD_REQ_FUA = 1 << 0,         /* durable before completion (write through) */
    VD_REQ_MAY_UNMAP = 1 << 1,   /* write-zeroes may deallocate instead of writing zeroes */
    VD_REQ_NO_FALLBACK = 1 << 2, /* write-zeroes must be fast (metadata only) or fail -ENOTSUP */
    VD_REQ_FULL_DISCARD = 1 << 3 /* discard makes the range unallocated (backing shows through) */
};

/* Block status flags, per layer (driver) and across a chain (vd_block_status_above). */
enum {
    VD_BS_DATA = 1 << 0,         /* reads return data stored at *map in *file (or compressed) */
    VD_BS_ZERO = 1 << 1,         /* reads return zeroes */
    VD_BS_OFFSET_VALID = 1 << 2, /* st->offset / *map is a valid host offset in st->file */
    VD_BS_ALLOCATED = 1 << 3,    /* the content is decided by this layer, not by its backing */
    /*
     * Driver -> generic layer only (never in results): the data at *map may be a hole in *file;
     * ask the file and add VD_BS_ZERO where it reads as zeroes (qcow2 with metadata
     * preallocation sets this, as QEMU's BDRV_BLOCK_RECURSE, so map shows those clusters zero).
     */
    VD_BS_RECURSE = 1 << 4
};

typedef enum {
    VD_PREALLOC_OFF,
    VD_PREALLOC_METADATA,
    VD_PREALLOC_FALLOC,
    VD_PREALLOC_FULL
} VdPrealloc;

/* Open flags. */
enum {
    VD_OPEN_RDWR = 1 << 0,
    VD_OPEN_NO_BACKING = 1 << 1,  /* do not open the backing chain (backing: null, or -u) */
    VD_OPEN_ALLOW_PROBE = 1 << 2, /* backing files without a recorded format may be probed */
    VD_OPEN_DIRECT = 1 << 3,      /* O_DIRECT on file nodes (cache.direct) */
    VD_OPEN_FORCE_SHARE = 1 << 4, /* -U: open even if another process holds it (no locking) */
    VD_OPEN_CHECK = 1 << 5,       /* opened for check/repair: tolerate a corrupt or dirty image */
    /*
     * cache=unsafe (QEMU's BDRV_O_NO_FLUSH): nothing on this node or its file child ever reaches
     * stable storage on purpose. vd_flush (and the flush at the last unref) still lets a format
     * write its cached metadata into its file, but no fdatasync is issued, and VD_REQ_FUA is
     * ignored. Backing nodes opened with it do not inherit it. A crash may lose anything.
     */
    VD_OPEN_NO_FLUSH = 1 << 6,
    /*
     * Metadata only (qemu-img info, QEMU's BDRV_O_NO_IO): an encrypted image opens without its
     * key, and reading or writing its guest data fails with -EACCES.
     */
    VD_OPEN_NO_IO = 1 << 7,
    /*
     * Write-through (cache=writethrough / directsync: QEMU's disabled write cache): every write,
     * write-zeroes and compressed write on this node is followed by a flush of the node before
     * it completes, as QEMU's BlockBackend does. Only the node opened with it: its file, data
     * file and backing children are opened without it (the format orders its own metadata).
     */
    VD_OPEN_WRITETHROUGH = 1 << 8
};

typedef struct VdOpenOptions {
    const char *filename;     /* path (file protocol) or nbd URI */
    const char *format;       /* "qcow2", "raw", NULL = probe (top image only: the user named it) */
    const char *node_name;    /* optional; generated when NULL */
    int flags;                /* VD_OPEN_* */
    BlockNode *backing;       /* use this node as backing instead of the header's (takes a ref) */
    BlockNode *file;          /* use this protocol node as the file child (takes a ref) */
    /* qcow2: use this node as the external data file (takes a ref); NULL: the recorded name */
    BlockNode *data_file;
    /* Serve this internal snapshot (id, else name) instead of the active image; read-only. */
    const char *snapshot;
    /* nbd: the id of a tls-creds object (client endpoint, util/tls-creds.h): NBD over TLS. */
    const char *tls_creds;
    /*
     * Encrypted formats: the id of the secret object (util/secret.h) holding the password
     * (luks: key-secret, qcow2: encrypt.key-secret). Not passed to backing files.
     */
    const char *key_secret;
    /*
     * Options for the backing file opened by the name the image records (json:/--image-opts
     * "backing": {...} naming no driver, file or filename, as QEMU merges them): its key-secret
     * (`backing.encrypt.key-secret`), and its own "backing" member for the next layer. May be NULL.
     */
    json_t *backing_options;
    /*
     * The node's own options when it comes from an option tree (json:, --image-opts; options.c):
     * driver-specific members (null-co's size, blkdebug's rules) are read from here. May be NULL.
     */
    json_t *options;
} VdOpenOptions;

/*
 * The file protocol's create options (QEMU's file-posix): nocow sets FS_NOCOW_FL (btrfs), the
 * extent size hint FS_XFLAG_EXTSIZE (XFS); both are best effort. extent_size_hint_set: the user
 * gave the hint (only then is a failure to set it warned about); unset means QEMU's 1 MiB.
 */
typedef struct VdFileCreateOptions {
    bool nocow;
    bool extent_size_hint_set;
    uint64_t extent_size_hint;
} VdFileCreateOptions;

typedef struct VdCreateOptions {
    const char *format;        /* "qcow2" or "raw" */
    uint64_t size;             /* virtual size; 0 with backing_file = take the backing's size */
    bool size_given;
    const char *backing_file;  /* as it will be recorded (relative stays relative) */
    const char *backing_fmt;
    bool unsafe;               /* -u: do not open the backing file */
    uint64_t cluster_size;     /* 0 = default (64 KiB) */
    const char *compat;        /* "0.10" / "v2" or "1.1" / "v3"; NULL = 1.1 */
    bool lazy_refcounts;
    int refcount_bits;         /* 0 = default 16 */
    VdPrealloc prealloc;
    bool extended_l2;
    const char *compression_type; /* NULL/"zlib" or "zstd" */
    /*
     * Encryption: format luks always; qcow2 when encrypt_format is "luks" ("aes", QEMU's legacy
     * qcow encryption, is refused). key_secret names the secret object with the password.
     */
    const char *data_file;     /* qcow2: external data file, created (as recorded) */
    bool data_file_raw;        /* qcow2: the data file stays a valid raw image */
    const char *encrypt_format;
    const char *key_secret;
    VdLuksCreateOptions luks;
    VdFileCreateOptions file;  /* for the protocol layer, when it is a file */
} VdCreateOptions;

/*
 * Changes to an existing image's format options (qemu-img amend). Fields left at their "keep"
 * value are not touched. progress (may be NULL) is told how far the work has come, done <= total.
 */
typedef struct VdAmendOptions {
    const char *compat;   /* "0.10"/"v2" or "1.1"/"v3"; NULL: keep */
    int lazy_refcounts;   /* 0 / 1; -1: keep */
    int refcount_bits;    /* 0: keep */
    const char *data_file; /* qcow2: the data file name to record; NULL: keep, "": none */
    int data_file_raw;    /* qcow2: 0 clears data-file-raw (1 only where set); -1: keep */
    void (*progress)(void *opaque, uint64_t done, uint64_t total);
    void *opaque;
} VdAmendOptions;

typedef struct VdCheckResult {
    int corruptions;
    int leaks;
    int check_errors;
    int corruptions_fixed;
    int leaks_fixed;
    uint64_t image_end_offset;
    uint64_t allocated_clusters;
    uint64_t total_clusters;
    uint64_t fragmented_clusters;
    uint64_t compressed_clusters;
    char *filename;
    const char *format;
} VdCheckResult;

/*
 * vd_check's `fix`: what to repair, and VD_CHECK_QUIET: no per-problem lines on stderr (the
 * counts in VdCheckResult only; allowed on a read-only node, which is never repaired).
 */
enum { VD_FIX_LEAKS = 1 << 0, VD_FIX_ERRORS = 1 << 1, VD_CHECK_QUIET = 1 << 16 };

/* One extent of chain block status (see vd_block_status_above). */
typedef struct VdBlockStatus {
    int flags;        /* VD_BS_* */
    int depth;        /* layer index from top (0) where allocated; if not allocated: layers visited */
    uint64_t offset;  /* host offset in `file`, valid when VD_BS_OFFSET_VALID */
    BlockNode *file;  /* the protocol node holding the data, when VD_BS_OFFSET_VALID */
    BlockNode *layer; /* the layer deciding the content (NULL if unallocated everywhere) */
} VdBlockStatus;

/*
 * One persistent dirty bitmap as a format stores it (the qcow2 bitmaps extension): what a driver
 * hands the dirty-bitmap module at open and takes back at close. data holds one bit per
 * granule, LSB first in each byte (the qcow2 on-disk order), ceil(ceil(size / granularity) / 8)
 * bytes; all zero may be data == NULL.
 */
typedef struct VdStoredBitmap {
    char *name;
    uint32_t granularity_bits;
    bool enabled;      /* qcow2 `auto`: tracks writes */
    bool inconsistent; /* qcow2 `in_use` when read: not saved cleanly, contents unknown */
    uint8_t *data;
} VdStoredBitmap;

void vd_stored_bitmaps_free(VdStoredBitmap *list, size_t n);

/*
 * The driver vtable. A format or protocol fills in what it supports; NULL means "not supported"
 * (the generic layer turns that into -ENOTSUP or an emulation, as documented at each vd_* call).
 */
struct BlockDriver {
    const char *name;
    bool is_protocol;
    bool supports_backing;
    size_t state_size; /* bytes of driver state allocated in node->opaque */

    /*
     * Protocols: the URI schemes this driver opens ("nbd", "nbd+unix", ...; NULL-terminated), and
     * whether it opens host paths (any filename that is not "scheme://..." or "json:"). vd_open
     * picks a filename's protocol from these alone (vd_protocol_for).
     */
    const char *const *uri_schemes;
    bool opens_host_paths;
    /*
     * Protocols that open host paths: does this path name something of this driver's (QEMU's
     * bdrv_probe_device: host_device takes block and character devices)? Asked before the
     * opens_host_paths drivers. NULL: never.
     */
    bool (*probe_device)(const char *filename);
    /*
     * Protocols: filenames starting with this prefix are this driver's too, and never host paths
     * (QEMU's "rbd:POOL/IMAGE", which has no "//"). NULL: none.
     */
    const char *filename_prefix;
    /*
     * blockdev-add: this driver's members beyond the common ones (node-name, read-only, cache...),
     * checked by the QMP layer before anything opens. NULL: blockdev-add does not offer it.
     */
    const VdOptSpec *blockdev_options;
    /*
     * Protocols: the filename vd_open takes for a blockdev-add node, built from its checked
     * options; a new string, or NULL with *errp set. NULL: the "filename" member as it is.
     */
    char *(*blockdev_filename)(const VdOptReader *opts, VdError **errp);
    /*
     * Protocols: the tools' option trees (--image-opts, json:) may use QEMU's legacy option names
     * that blockdev-add does not take (nbd: host, port, path); rewritten here, in place, into the
     * blockdev-add ones before the options are checked. 0, or -errno with *errp set. NULL: none.
     */
    int (*legacy_options)(json_t *o, VdError **errp);
    /*
     * Protocols: the options that, given, make QEMU name the node by its options - a "json:{...}"
     * filename of the driver and these options - instead of its URI (its strong_runtime_opts).
     * NULL-terminated; NULL: none.
     */
    const char *const *json_name_options;
    /* Protocols: reads past the end return zeroes (a host file), so raw may round up its length. */
    bool reads_zero_past_end;
    /*
     * I/O may wait for the network or a remote server (an NBD client): the NBD server runs such
     * requests off its reader thread, and a copy does no early writeback of such a node.
     */
    bool may_block;
    /*
     * Formats: the guest's bytes are the file's bytes, there is no metadata (raw). Any other
     * format keeps metadata in its file, so while it is open nobody else may write or resize
     * that file: vd_open calls the file's lock_for_format for it.
     */
    bool passthrough;
    /*
     * Formats: flush syncs the file child itself, in the order its metadata needs (qcow2: data
     * and refcounts, then the L2 tables, then the file), so vd_flush does not sync it again.
     */
    bool flush_syncs_file;

    /*
     * Recognise the format from the first bytes of a file; returns a score 0..100. A format that
     * takes any bytes (raw) answers VD_PROBE_ANY; a header match answers more.
     */
    int (*probe)(const uint8_t *buf, size_t len, const char *filename);

    int (*open)(BlockNode *bs, const VdOpenOptions *opts, VdError **errp);
    void (*close)(BlockNode *bs);
    int (*create)(const char *filename, const VdCreateOptions *opts, VdError **errp);

    int (*pread)(BlockNode *bs, uint64_t offset, uint64_t bytes, void *buf);
    int (*pwrite)(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf, int flags);
    int (*pwrite_zeroes)(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags);
    int (*pdiscard)(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags);
    /* Compressed write of whole clusters (convert -c); offset/bytes cluster aligned. */
    int (*pwrite_compressed)(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf);
    int (*flush)(BlockNode *bs);
    /*
     * Start writing the node's dirty cached data to its device and return without waiting for it
     * or syncing anything (Linux: sync_file_range SYNC_FILE_RANGE_WRITE). Durability still needs
     * flush; this only spreads the disk writes so that a later flush finds little left. NULL: none.
     */
    int (*start_writeback)(BlockNode *bs);
    /*
     * Copy offloading (convert -C): write [offset, offset+bytes) of bs with the bytes at
     * src_offset of the protocol node src, without passing them through this process. -ENOTSUP
     * when this pair of nodes cannot (the caller then copies through a buffer).
     */
    int (*copy_range_to)(BlockNode *bs, uint64_t offset, uint64_t bytes, BlockNode *src,
                         uint64_t src_offset);

    /*
     * Status of [offset, offset+bytes) in this layer only. Sets *pnum (>0, <= bytes) to the
     * length of the extent that shares the returned VD_BS_* flags; *map / *file when OFFSET_VALID.
     * Returning DATA or ZERO means this layer decides the content (the generic layer adds
     * ALLOCATED); neither means "ask my backing" (the generic layer adds ZERO when there is none).
     */
    int (*block_status)(BlockNode *bs, uint64_t offset, uint64_t bytes, uint64_t *pnum,
                        uint64_t *map, BlockNode **file);

    int64_t (*getlength)(BlockNode *bs); /* exact bytes; vd_getlength rounds to sectors */
    int64_t (*allocated_size)(BlockNode *bs); /* bytes used on the host (info's disk size) */
    int (*truncate)(BlockNode *bs, uint64_t size, bool shrink, VdPrealloc prealloc,
                    VdError **errp);
    /*
     * Rewrite the recorded backing file name and format (NULL, NULL = no backing). flags:
     * VD_BACKING_UNSYNCED (see vd_change_backing_file_flags).
     */
    int (*change_backing_file)(BlockNode *bs, const char *backing_file, const char *backing_fmt,
                               int flags, VdError **errp);
    int (*check)(BlockNode *bs, VdCheckResult *res, int fix, VdError **errp);
    /* qemu-img measure: bytes needed for an image of opts holding src's data (src may be NULL). */
    int (*measure)(const VdCreateOptions *opts, BlockNode *src, uint64_t *required,
                   uint64_t *fully_allocated, VdError **errp);
    /* Format-specific info as qemu-img's "format-specific" {"type":..,"data":{..}}; new ref. */
    json_t *(*get_specific_info)(BlockNode *bs);
    /* Cluster size, for map/convert granularity (0 = none). */
    uint32_t (*cluster_size)(BlockNode *bs);
    /*
     * Internal snapshots as qemu-img info's "snapshots" array (objects with id, name,
     * vm-state-size, date-sec, date-nsec, vm-clock-sec, vm-clock-nsec, icount when known);
     * new reference, or NULL when there are none or the table cannot be read.
     */
    json_t *(*get_snapshots)(BlockNode *bs);
    /*
     * qemu-img info's "dirty-flag" (QEMU prints it where bdrv_get_info answers): 0 with *dirty
     * set when this node answers, -errno otherwise. NULL: the node does not answer (no key).
     */
    int (*is_dirty)(BlockNode *bs, bool *dirty);
    /*
     * Protocols: take the locks a format with metadata needs on this node (file: no other writer
     * or resizer; nothing under VD_OPEN_FORCE_SHARE). -EAGAIN with a message on a conflict.
     * NULL: nothing to lock (an NBD export: its server decides).
     */
    int (*lock_for_format)(BlockNode *bs, bool writable, VdError **errp);
    /* Internal snapshots (qemu-img snapshot -c / -a / -d); see vd_snapshot_create & co. */
    int (*snapshot_create)(BlockNode *bs, const char *name, VdError **errp);
    int (*snapshot_goto)(BlockNode *bs, const char *id_or_name, VdError **errp);
    int (*snapshot_delete)(BlockNode *bs, const char *id, const char *name, VdError **errp);
    /* qemu-img amend of a read-write node with nothing else in flight; see vd_amend. */
    int (*amend)(BlockNode *bs, const VdAmendOptions *opts, VdError **errp);

    /*
     * Persistent dirty bitmaps (NULL: the format cannot store any). bitmaps_load returns the
     * bitmaps stored in the image (new array, *n entries, maybe 0); on a read-write image it
     * first marks them in use on disk, so a crash before bitmaps_store shows them inconsistent.
     * bitmaps_store replaces the stored set by list (clean, not in use); an inconsistent entry
     * keeps what the image has for that name. bitmaps_can_store checks a new bitmap's name and
     * granularity against the format's limits (with the set already stored). bitmaps_remove
     * deletes one stored bitmap now (the others stay as the image has them), as QEMU's remove.
     * bitmaps_supported (NULL: always, given bitmaps_can_store) says whether this image can hold
     * any (QEMU's bdrv_supports_persistent_dirty_bitmap: a qcow2 v2 image cannot).
     */
    bool (*bitmaps_supported)(BlockNode *bs);
    int (*bitmaps_load)(BlockNode *bs, VdStoredBitmap **list, size_t *n, VdError **errp);
    int (*bitmaps_store)(BlockNode *bs, const VdStoredBitmap *list, size_t n, VdError **errp);
    int (*bitmaps_can_store)(BlockNode *bs, const char *name, uint32_t granularity_bits,
                             VdError **errp);
    int (*bitmaps_remove)(BlockNode *bs, const char *name, VdError **errp);

    /*
     * Protocols (blkdebug): an event of the format above this node (VD_DEBUG_*), fired by the
     * generic layer before the format's request: reads and writes of guest data, write-zeroes,
     * flushes. Requests a format makes on its own (metadata, probing) fire nothing.
     */
    void (*debug_event)(BlockNode *bs, int event);
};

/* Events for BlockDriver.debug_event (QEMU's blkdebug names in comments). */
enum {
    VD_DEBUG_READ_AIO,      /* read_aio */
    VD_DEBUG_WRITE_AIO,     /* write_aio */
    VD_DEBUG_PWRITEV_ZERO,  /* pwritev_zero */
    VD_DEBUG_FLUSH_TO_OS,   /* flush_to_os */
    VD_DEBUG_FLUSH_TO_DISK, /* flush_to_disk */
    VD_DEBUG_N
};

#define VD_PROBE_ANY 1 /* probe score of a format that takes any bytes (raw) */

struct BlockNode {
    const BlockDriver *drv;
    void *opaque;            /* driver state, drv->state_size bytes */
    char *node_name;
    char *filename;          /* what the user named: path or URI */
    BlockNode *file;         /* protocol child of a format node (blkdebug's: its image) */
    BlockNode *backing;      /* backing child (format nodes) or NULL */
    /* A format's external data child (qcow2 data_file), set by its open, or NULL. */
    BlockNode *data_file;
    char *backing_file;      /* backing name as recorded in the image (may be relative) */
    char *backing_format;    /* backing format as recorded in the image, or NULL */
    char *full_backing_filename; /* backing_file resolved against filename's directory */
    int open_flags;          /* VD_OPEN_* it was opened with */
    bool read_only;
    int refcnt;
    /* Named dirty bitmaps (block/dirty-bitmap.h); NULL until the first one. */
    VdBitmapList *bitmaps;
    /* Write hooks (block/write-hooks.h): every write to this node passes them; made with the node. */
    VdWriteHooks *write_hooks;
    bool encrypted;          /* the format encrypts its data (info's "encrypted"); set by open */
    uint64_t flush_requests; /* atomic: flushes asked of this node (vd_flush_requests) */
};

/* ---- registry (drivers.c: the one list of formats and protocols) ---- */
const BlockDriver *vd_find_driver(const char *name);
/* The i-th driver (built-ins first, then registered ones), NULL past the end. */
const BlockDriver *vd_driver_at(size_t i);
/*
 * Add a driver to the registry (tests, drivers outside the built-in list). Call before any
 * vd_open from one thread; a driver whose name is already registered is refused (-EEXIST).
 */
int vd_register_driver(const BlockDriver *drv);
/* Is this filename a URI ("scheme://...", "json:..." or a filename_prefix) rather than a host path? */
bool vd_filename_is_uri(const char *filename);
/* The protocol opening this filename (filename_prefix / uri_schemes / opens_host_paths) or NULL. */
const BlockDriver *vd_protocol_for(const char *filename, VdError **errp);
/* The format whose probe scores these first bytes highest (*score: its score), or NULL. */
const BlockDriver *vd_probe_bytes(const uint8_t *buf, size_t len, const char *filename,
                                  int *score);
extern const BlockDriver vd_drv_file;
extern const BlockDriver vd_drv_host_device;
extern const BlockDriver vd_drv_raw;
extern const BlockDriver vd_drv_qcow2;

/* ---- opening and chains ---- */

/*
 * Open an image and (unless VD_OPEN_NO_BACKING) its backing chain. Relative backing names resolve
 * against the directory of the image naming them. A missing backing file or a loop is an error;
 * a backing file with no recorded format is an error unless VD_OPEN_ALLOW_PROBE.
 * Returns a node with refcnt 1, or NULL with *errp set.
 */
BlockNode *vd_open(const VdOpenOptions *opts, VdError **errp);
/* The protocol node alone for a filename, by the protocol it names (vd_protocol_for). */
BlockNode *vd_open_protocol(const char *filename, int flags, VdError **errp);
/* Convenience: vd_open with only filename, format and flags. */
BlockNode *vd_open_image(const char *filename, const char *format, int flags, VdError **errp);
/*
 * A filter node of drv (a driver without open: a job's write hook) over child, which becomes its
 * backing child (a reference is taken); read-write, named node_name (NULL: generated), with
 * drv->state_size zeroed bytes in opaque. refcnt 1, or NULL when out of memory.
 */
BlockNode *vd_filter_new(const BlockDriver *drv, BlockNode *child, const char *node_name);
/* Pass-through callbacks for such filters: the child (backing) answers; block status says
 * "decided below" for the whole range; flush does nothing itself (vd_flush goes on to the child);
 * cluster_size is the child's (so a tracker on the filter widens as one on the child would). */
int64_t vd_filter_getlength(BlockNode *bs);
int vd_filter_pread(BlockNode *bs, uint64_t offset, uint64_t bytes, void *buf);
int vd_filter_pwrite(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf, int flags);
int vd_filter_pwrite_zeroes(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags);
int vd_filter_pdiscard(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags);
int vd_filter_flush(BlockNode *bs);
uint32_t vd_filter_cluster_size(BlockNode *bs);
int vd_filter_block_status(BlockNode *bs, uint64_t offset, uint64_t bytes, uint64_t *pnum,
                           uint64_t *map, BlockNode **file);
void vd_node_ref(BlockNode *bs);
/* Drop a reference; the last one flushes, closes the driver and unrefs file and backing. */
void vd_node_unref(BlockNode *bs);

/*
 * ---- option trees (options.c): json:{...} pseudo-filenames and --image-opts ----
 * parse_json takes the whole "json:{...}" string, parse_keyval "k=v,file.k=v" (",," escapes a
 * comma); both nest dotted keys and return a new reference, or NULL with *errp set.
 * vd_open_options opens a tree as QEMU's bdrv_open does ("driver" may be left out to probe, or
 * with protocol to open just the protocol node a "filename" names; a "file" or "backing" child
 * is an object or a file name; "backing": null opens none). vd_open
 * calls vd_open_json for any filename starting with "json:" (format: the driver when the tree
 * names none). The getters accept JSON-typed values and their string forms ("on", "1048576");
 * an absent key leaves *out unchanged.
 */
json_t *vd_options_parse_json(const char *filename, VdError **errp);
json_t *vd_options_parse_keyval(const char *s, VdError **errp);
BlockNode *vd_open_options(json_t *options, int flags, bool protocol, VdError **errp);
/* A VdOptReader over a JSON option tree (dotted paths; numbers also as decimal strings). */
typedef struct VdJsonOptReader {
    VdOptReader r;
    json_t *obj;
} VdJsonOptReader;
void vd_json_opt_reader_init(VdJsonOptReader *jr, json_t *obj);
/*
 * 0 if the backing file bs names may be opened: its format is recorded, or flags allow
 * probing (VD_OPEN_ALLOW_PROBE); else -EPERM with the reason (vdisk never guesses it).
 */
int vd_backing_format_check(const BlockNode *bs, int flags, VdError **errp);
/*
 * QEMU's name for a node its options o describe (bdrv_refresh_filename): json:{driver, drv's
 * json_name_options present in o} for a protocol, json:{driver, file: child's tree} for a format
 * over a child named json:{...} or given its own json_name_options (raw's offset, size).
 * NULL when neither applies (the URI or file name stands; *failed false) or out of memory
 * (*failed true).
 */
char *vd_json_node_name(const BlockDriver *drv, json_t *o, const BlockNode *child,
                        bool *failed);
/*
 * blkdebug's rule objects (inject-error, set-state) of option tree o put in the order QEMU holds
 * their members, which its json: names list them by where two keys share a QDict bucket:
 * blockdev-add's (qapi) builds them from the QAPI object, a json: filename or --image-opts from
 * its option parser. 0, or -ENOMEM.
 */
int vd_blkdebug_order_rules(json_t *o, bool qapi);
BlockNode *vd_open_json(const char *filename, const char *format, int flags, VdError **errp);
const char *vd_options_str(json_t *o, const char *key);
int vd_options_bool(json_t *o, const char *key, bool *out, VdError **errp);
int vd_options_u64(json_t *o, const char *key, uint64_t *out, VdError **errp);
/* Are all of o's keys options drv's nodes take (its blockdev ones, or every node's)? 0 or -EINVAL. */
int vd_options_check_keys(json_t *o, const BlockDriver *drv, VdError **errp);

/* Probe a file's format ("qcow2" or "raw"); NULL with *errp on I/O error. */
const char *vd_probe_format(const char *filename, VdError **errp);

/* Create an image (file + format). */
int vd_create(const VdCreateOptions *opts, const char *filename, VdError **errp);
/*
 * Create the container of an image through the protocol its filename names (a host path: file;
 * nbd://...: nbd): what a format driver's create calls before writing its metadata. opts->size
 * and opts->prealloc are passed on to the protocol's create.
 */
int vd_protocol_create(const char *filename, const VdCreateOptions *opts, VdError **errp);

/* Replace bs's in-memory backing child (ref taken on new_backing, old one unref'ed). Does not touch the header. */
void vd_node_set_backing(BlockNode *bs, BlockNode *new_backing);
/* Set bs's in-memory backing_file/backing_format/full_backing_filename (no header write). */
int vd_set_backing_strings(BlockNode *bs, const char *name, const char *fmt);
/* Rewrite bs's recorded backing file/format (header) and update bs->backing_file & co. */
int vd_change_backing_file(BlockNode *bs, const char *backing_file, const char *backing_fmt,
                           VdError **errp);
/*
 * The same with flags. VD_BACKING_UNSYNCED: the header is written without a flush before it or
 * a sync after it, for a job's pivot with guests drained. The caller has already made durable
 * everything the new header relies on (the data a stream or commit copied: a flush made before
 * the drain), and flushes bs itself (after resuming the guests) before it reports the change
 * done; until then a crash leaves the old header, whose backing file is still there.
 */
enum { VD_BACKING_UNSYNCED = 1 << 0 };
int vd_change_backing_file_flags(BlockNode *bs, const char *backing_file,
                                 const char *backing_fmt, int flags, VdError **errp);

/* Chain helpers: depth of `layer` under `top` (0 = top) or -1; bottom-most node. */
int vd_chain_depth(BlockNode *top, BlockNode *layer);
BlockNode *vd_chain_bottom(BlockNode *top);
/* Find a node in top's chain by node name or by filename (as given or resolved). */
BlockNode *vd_chain_find(BlockNode *top, const char *name_or_file);

/*
 * Resolve a backing name recorded in `image_filename` (relative to its directory, unless absolute
 * or a URI). Returns a malloc'ed string.
 */
char *vd_resolve_backing_path(const char *image_filename, const char *backing_file);
/* Express target_path relative to the directory of image_filename (for rebase/commit -b). */
char *vd_relative_path(const char *image_filename, const char *target_path);

/*
 * ---- I/O: these validate ranges (past end = -EINVAL for writes; reads past end = -EINVAL) ----
 * Range checks apply to format nodes. Protocol nodes (file, nbd) take any range: formats grow
 * their file by writing past its end, and a file node reads zeroes past its end. Writes to a
 * read-only node fail with -EPERM. Zero-length requests succeed without calling the driver.
 */
/* A node's length in bytes, rounded up to whole 512-byte sectors as QEMU counts it. */
int64_t vd_getlength(BlockNode *bs);
int vd_pread(BlockNode *bs, uint64_t offset, uint64_t bytes, void *buf);
int vd_pwrite(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf, int flags);
/* Emulated with zero-filled writes when the driver cannot (unless VD_REQ_NO_FALLBACK). */
int vd_pwrite_zeroes(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags);
/* A no-op (returns 0) where the driver cannot discard. */
int vd_pdiscard(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags);
int vd_pwrite_compressed(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf);
/*
 * Copy offloading (io.c): make [dst_offset, dst_offset+bytes) of dst read as
 * [src_offset, ...) of src reads, by copy_file_range between the host files holding them.
 * Only data src stores in a host file (block status DATA with a host offset) can be offloaded;
 * anything else, or a dst whose driver cannot, is -ENOTSUP (copy through a buffer instead).
 * On error part of the range may have been written.
 */
int vd_copy_range(BlockNode *src, uint64_t src_offset, BlockNode *dst, uint64_t dst_offset,
                  uint64_t bytes);
int vd_flush(BlockNode *bs);
/*
 * vd_flush of bs and its file only, never its backing: a mirror target whose temporary backing is
 * the source (the source's durability is not the target's business) flushes with this.
 */
int vd_flush_own(BlockNode *bs);
/* bs->drv->start_writeback (protocol nodes): 0, -ENOTSUP when the driver has none, or -errno. */
int vd_start_writeback(BlockNode *bs);
/* How many syncs (protocol-node flushes) the calling thread has issued so far (diagnostics). */
uint64_t vd_flush_thread_syncs(void);
/* ... and every thread of the process together (tests count the syncs made while drained). */
uint64_t vd_flush_total_syncs(void);
/*
 * How many flushes were asked of bs so far, directly or through a node above it (counted when
 * the flush starts). A frontend's durability promises go through here: the NBD server makes FUA
 * a flush after the (tracked) write. An active commit reads it to know whether a guest asked for
 * durability since a moment when base held every write (see commit.c, the drained pivot).
 */
uint64_t vd_flush_requests(BlockNode *bs);
int vd_truncate(BlockNode *bs, uint64_t size, bool shrink, VdPrealloc prealloc, VdError **errp);

/*
 * Block status of one layer (bs only), with generic completion: a range a format leaves
 * unallocated and that has no backing (or is past the backing's end) gets VD_BS_ZERO.
 */
int vd_block_status(BlockNode *bs, uint64_t offset, uint64_t bytes, uint64_t *pnum,
                    VdBlockStatus *st);
/* Both status calls return 0 (status in *st) or -errno; offset at/after the end is -EINVAL. */

/*
 * Block status across the chain from top down to, but excluding, base (base NULL = whole chain).
 * The result describes the first extent starting at offset (*pnum bytes) that has one status:
 * VD_BS_ALLOCATED set when some layer above base decides the content (st->depth, st->layer);
 * unset when every layer above base defers to its backing (the data comes from base or below,
 * or reads zero when the chain ends). This is what live copy uses to skip a shared base.
 */
int vd_block_status_above(BlockNode *top, BlockNode *base, uint64_t offset, uint64_t bytes,
                          uint64_t *pnum, VdBlockStatus *st);

/* Is [offset, offset+bytes) allocated in some layer above base? *pnum = extent length. */
int vd_is_allocated_above(BlockNode *top, BlockNode *base, uint64_t offset, uint64_t bytes,
                          uint64_t *pnum);

/*
 * ---- internal snapshots (formats with snapshot_* in their vtable: qcow2) ----
 * create: a new snapshot named `name` (ids are numbered by the driver; names may repeat) of the
 * active image, dated now. goto: revert the active image to the snapshot whose id, else name, is
 * id_or_name. delete: remove the first snapshot matching id and name (either may be NULL).
 * The list is vd_image_info's "snapshots" (bs->drv->get_snapshots). -ENOTSUP with a message when
 * the format has no internal snapshots.
 */
int vd_snapshot_create(BlockNode *bs, const char *name, VdError **errp);
int vd_snapshot_goto(BlockNode *bs, const char *id_or_name, VdError **errp);
int vd_snapshot_delete(BlockNode *bs, const char *id, const char *name, VdError **errp);

/*
 * Amend a format's options in place (qemu-img amend): the image is consistent on disk after
 * every step, and on failure it reads as before (some options may already be changed).
 * -ENOTSUP "Format driver 'X' does not support option amendment" for formats without amend.
 */
int vd_amend(BlockNode *bs, const VdAmendOptions *opts, VdError **errp);

/* ---- info ---- */
int vd_check(BlockNode *bs, VdCheckResult *res, int fix, VdError **errp);
void vd_check_result_clear(VdCheckResult *res);
/*
 * qemu-img info's "dirty-flag" of bs: 0 with *dirty set, or -ENOTSUP when bs's driver does not
 * answer (then info prints no "dirty-flag"). A format without metadata (raw) passes it to its file.
 */
int vd_is_dirty(BlockNode *bs, bool *dirty);
/* qemu-img info's JSON object for one node (without the backing chain); new reference. */
json_t *vd_image_info(BlockNode *bs, VdError **errp);

#endif
