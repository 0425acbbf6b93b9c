/*
 * file.c - the "file" protocol: a node backed by a host file or block device (vd_drv_file).
 *
 * Promises: reads past end-of-file return zeroes (formats read partial last clusters); writes past
 * end grow the file. All I/O uses pread/pwrite on one fd, so concurrent requests from several
 * threads need no lock. The one exception is O_DIRECT with unaligned requests: those go through a
 * read-modify-write of whole aligned blocks, which takes the node's rwlock exclusively (aligned
 * direct writes take it shared) so a RMW never writes back stale bytes over a concurrent write.
 * Image locking is QEMU's (OFD locks on bytes 100+perm / 200+perm), so vdisk and QEMU processes
 * see each other's use of an image; VD_OPEN_FORCE_SHARE takes no locks.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "block/block.h"
#include "util/lock.h"
#include "util/log.h"

/* Bounce buffers for O_DIRECT are at most this large; bigger requests are split. */
#define FILE_BOUNCE_MAX (1U << 20)
/* Writes of zeroes (full preallocation, emulation) use buffers of this size. */
#define FILE_ZERO_CHUNK (1U << 20)

typedef struct FileState {
    int fd;
    bool direct;
    bool is_blockdev;
    uint32_t align;           /* 1, or the O_DIRECT alignment for offsets, lengths and buffers */
    pthread_rwlock_t rmw_lock; /* only used with O_DIRECT, see header comment */
    bool locked;              /* holds QEMU-style image locks (registered in own_locks) */
    dev_t dev;
    ino_t ino;
    uint8_t lock_mask;        /* bit i set = byte lock_bytes[i] held */
} FileState;

static FileState *fs_of(BlockNode *bs)
{
    return bs->opaque;
}

/* ---- raw syscalls with EINTR and short-transfer loops ---- */

/*
 * Read; bytes past end-of-file are returned as zeroes. With O_DIRECT a short read means EOF
 * (retrying from an unaligned position would fail with EINVAL), so the rest is zeroed.
 */
static int full_pread_ex(int fd, void *buf, uint64_t bytes, uint64_t offset, bool direct)
{
    uint8_t *p = buf;
    while (bytes > 0) {
        size_t chunk = bytes > (uint64_t)(SSIZE_MAX & ~4095L) ? (size_t)(SSIZE_MAX & ~4095L)
                                                             : (size_t)bytes;
        ssize_t n = pread(fd, p, chunk, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        if (n == 0 || (direct && (size_t)n < chunk)) {
            memset(p + n, 0, bytes - (uint64_t)n); /* end of file */
            return 0;
        }
        p += n;
        offset += (uint64_t)n;
        bytes -= (uint64_t)n;
    }
    return 0;
}

static int full_pread(int fd, void *buf, uint64_t bytes, uint64_t offset)
{
    return full_pread_ex(fd, buf, bytes, offset, false);
}

static int full_pwrite(int fd, const void *buf, uint64_t bytes, uint64_t offset)
{
    const uint8_t *p = buf;
    while (bytes > 0) {
        size_t chunk = bytes > (uint64_t)(SSIZE_MAX & ~4095L) ? (size_t)(SSIZE_MAX & ~4095L)
                                                             : (size_t)bytes;
        ssize_t n = pwrite(fd, p, chunk, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        if (n == 0) {
            return -EIO; /* no progress: avoid spinning */
        }
        p += n;
        offset += (uint64_t)n;
        bytes -= (uint64_t)n;
    }
    return 0;
}

static int64_t fd_length(FileState *s)
{
    if (s->is_blockdev) {
        off_t end = lseek(s->fd, 0, SEEK_END);
        return end < 0 ? -errno : (int64_t)end;
    }
    struct stat st;
    if (fstat(s->fd, &st) < 0) {
        return -errno;
    }
    return (int64_t)st.st_size;
}

/* ---- O_DIRECT paths ---- */

static bool is_aligned(FileState *s, uint64_t offset, uint64_t bytes, const void *buf)
{
    uint64_t a = s->align;
    return (offset % a) == 0 && (bytes % a) == 0 && ((uintptr_t)buf % a) == 0;
}

/*
 * Per-thread bounce buffer, sized to the request (rounded up to the alignment, at most
 * FILE_BOUNCE_MAX) and kept for the thread's next unaligned request: no allocation per 4 KiB
 * request. Grown on demand; freed by a thread-exit destructor.
 */
static pthread_key_t bounce_key;
static pthread_once_t bounce_once = PTHREAD_ONCE_INIT;
static bool bounce_key_ok;

typedef struct Bounce {
    void *buf;
    size_t size;
    size_t align;
} Bounce;

static void bounce_destroy(void *p)
{
    Bounce *b = p;
    free(b->buf);
    free(b);
}

static void bounce_key_init(void)
{
    bounce_key_ok = pthread_key_create(&bounce_key, bounce_destroy) == 0;
}

/* An aligned buffer of at least `need` bytes (need <= FILE_BOUNCE_MAX), or NULL. */
static void *bounce_get(size_t align, size_t need)
{
    pthread_once(&bounce_once, bounce_key_init);
    if (!bounce_key_ok) {
        return NULL;
    }
    Bounce *b = pthread_getspecific(bounce_key);
    if (!b) {
        b = calloc(1, sizeof(*b));
        if (!b) {
            return NULL;
        }
        if (pthread_setspecific(bounce_key, b) != 0) {
            free(b);
            return NULL;
        }
    }
    if (b->buf && b->size >= need && b->align >= align) {
        return b->buf;
    }
    size_t size = need < 65536 ? 65536 : need; /* small requests share one modest buffer */
    size = (size + align - 1) / align * align;
    void *n = NULL;
    if (posix_memalign(&n, align, size) != 0) {
        return NULL;
    }
    free(b->buf);
    b->buf = n;
    b->size = size;
    b->align = align;
    return n;
}

/* Bounce size for [offset, offset+bytes): the aligned span, capped at FILE_BOUNCE_MAX. */
static size_t bounce_need(uint64_t a, uint64_t offset, uint64_t bytes)
{
    uint64_t head = offset % a;
    uint64_t span = (head + bytes + a - 1) / a * a;
    return span > FILE_BOUNCE_MAX ? FILE_BOUNCE_MAX : (size_t)span;
}

static int direct_pread(FileState *s, uint64_t offset, uint64_t bytes, void *buf)
{
    if (is_aligned(s, offset, bytes, buf)) {
        return full_pread_ex(s->fd, buf, bytes, offset, true);
    }
    uint64_t a = s->align;
    void *bounce = bounce_get(a, bounce_need(a, offset, bytes));
    if (!bounce) {
        return -ENOMEM;
    }
    int ret = 0;
    uint8_t *out = buf;
    while (bytes > 0) {
        uint64_t start = offset - offset % a;
        uint64_t head = offset - start;
        uint64_t span = head + bytes;
        span = (span + a - 1) / a * a;
        if (span > FILE_BOUNCE_MAX) {
            span = FILE_BOUNCE_MAX;
        }
        ret = full_pread_ex(s->fd, bounce, span, start, true);
        if (ret < 0) {
            break;
        }
        uint64_t n = span - head < bytes ? span - head : bytes;
        memcpy(out, (uint8_t *)bounce + head, n);
        out += n;
        offset += n;
        bytes -= n;
    }
    return ret;
}

static int direct_pwrite(FileState *s, uint64_t offset, uint64_t bytes, const void *buf)
{
    uint64_t a = s->align;
    if (is_aligned(s, offset, bytes, buf)) {
        vd_rwlock_rdlock(&s->rmw_lock);
        int ret = full_pwrite(s->fd, buf, bytes, offset);
        vd_rwlock_unlock(&s->rmw_lock);
        return ret;
    }
    void *bounce = bounce_get(a, bounce_need(a, offset, bytes));
    if (!bounce) {
        return -ENOMEM;
    }
    bool aligned_range = (offset % a) == 0 && (bytes % a) == 0;
    /* Aligned range from an unaligned buffer needs no RMW: copy and write. */
    if (aligned_range) {
        vd_rwlock_rdlock(&s->rmw_lock);
    } else {
        vd_rwlock_wrlock(&s->rmw_lock);
    }
    int ret = 0;
    const uint8_t *in = buf;
    while (bytes > 0) {
        uint64_t start = offset - offset % a;
        uint64_t head = offset - start;
        uint64_t span = (head + bytes + a - 1) / a * a;
        if (span > FILE_BOUNCE_MAX) {
            span = FILE_BOUNCE_MAX;
        }
        uint64_t n = span - head < bytes ? span - head : bytes;
        /* Partial first or last block: fetch the bytes around the caller's. */
        if (head != 0) {
            ret = full_pread_ex(s->fd, bounce, a, start, true);
            if (ret < 0) {
                break;
            }
        }
        if ((head + n) % a != 0) {
            ret = full_pread_ex(s->fd, (uint8_t *)bounce + span - a, a, start + span - a, true);
            if (ret < 0) {
                break;
            }
        }
        memcpy((uint8_t *)bounce + head, in, n);
        /* Don't grow the file to a block boundary beyond what the caller wrote. */
        int64_t len = fd_length(s);
        ret = full_pwrite(s->fd, bounce, span, start);
        if (ret < 0) {
            break;
        }
        if (len >= 0 && start + span > (uint64_t)len && offset + n < start + span &&
            !s->is_blockdev) {
            uint64_t want = offset + n > (uint64_t)len ? offset + n : (uint64_t)len;
            if (ftruncate(s->fd, (off_t)want) < 0) {
                ret = -errno;
                break;
            }
        }
        in += n;
        offset += n;
        bytes -= n;
    }
    vd_rwlock_unlock(&s->rmw_lock);
    return ret;
}

/* ---- image locking, compatible with QEMU's file-posix "locking=auto" ---- */

/*
 * QEMU's permission bits: a node using permission i read-locks byte 100+i; a node that does not
 * let others have permission i read-locks byte 200+i. Opening conflicts when someone else holds
 * 200+i for a permission we take, or 100+i for one we refuse to share.
 */
enum { PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE, PERM_COUNT };
#define LOCK_PERM_BASE 100
#define LOCK_SHARED_BASE 200
static const char *const perm_names[PERM_COUNT] = { "consistent read", "write",
                                                    "write unchanged", "resize" };

/*
 * Locks this process holds, per inode. OFD locks also conflict between two fds of one process,
 * but a tool reopening an image it already holds (commit reopening a read-only backing file
 * read-write) is not "another process using the image": a conflict on a byte we hold ourselves
 * is ignored.
 */
typedef struct OwnLock {
    dev_t dev;
    ino_t ino;
    unsigned count[2 * PERM_COUNT]; /* [0..3] perm bytes, [4..7] shared bytes */
} OwnLock;

static pthread_mutex_t own_locks_mutex = PTHREAD_MUTEX_INITIALIZER;
static OwnLock *own_locks;
static size_t n_own_locks;

static OwnLock *own_find(dev_t dev, ino_t ino)
{
    for (size_t i = 0; i < n_own_locks; i++) {
        if (own_locks[i].dev == dev && own_locks[i].ino == ino) {
            return &own_locks[i];
        }
    }
    return NULL;
}

static int lock_index_byte(int idx)
{
    return idx < PERM_COUNT ? LOCK_PERM_BASE + idx : LOCK_SHARED_BASE + idx - PERM_COUNT;
}

static int ofd_lock(int fd, int byte, short type)
{
    struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1 };
    int r;
    do {
        r = fcntl(fd, F_OFD_SETLK, &fl);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

/* 1 if another open file description holds a lock on byte, 0 if not, -errno. */
static int ofd_test(int fd, int byte)
{
    struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1 };
    if (fcntl(fd, F_OFD_GETLK, &fl) < 0) {
        return -errno;
    }
    return fl.l_type != F_UNLCK;
}

static void file_unlock(FileState *s)
{
    if (!s->locked) {
        return;
    }
    vd_mutex_lock(&own_locks_mutex);
    OwnLock *o = own_find(s->dev, s->ino);
    for (int i = 0; i < 2 * PERM_COUNT; i++) {
        if (s->lock_mask & (1u << i)) {
            ofd_lock(s->fd, lock_index_byte(i), F_UNLCK);
            if (o && o->count[i]) {
                o->count[i]--;
            }
        }
    }
    if (o) {
        bool any = false;
        for (int i = 0; i < 2 * PERM_COUNT; i++) {
            any |= o->count[i] != 0;
        }
        if (!any) {
            *o = own_locks[--n_own_locks];
        }
    }
    vd_mutex_unlock(&own_locks_mutex);
    s->locked = false;
    s->lock_mask = 0;
}

/*
 * Hold the lock bytes for `perm` (permissions we use) and `unshared` (permissions nobody else may
 * have), on top of what s already holds, then check that no other user conflicts. On a conflict
 * the bytes taken by this call are released again and -EAGAIN is returned with QEMU's wording.
 */
static int file_lock(FileState *s, const char *path, unsigned perm, unsigned unshared,
                     bool hint_u, VdError **errp)
{
    uint8_t want = (uint8_t)(perm | (unshared << PERM_COUNT));
    if (!s->locked) {
        struct stat st;
        if (fstat(s->fd, &st) < 0) {
            return 0;
        }
        s->dev = st.st_dev;
        s->ino = st.st_ino;
    }

    vd_mutex_lock(&own_locks_mutex);
    uint8_t added = 0;
    int ret = 0;
    for (int i = 0; i < 2 * PERM_COUNT && ret == 0; i++) {
        if (!(want & (1u << i)) || (s->lock_mask & (1u << i))) {
            continue;
        }
        ret = ofd_lock(s->fd, lock_index_byte(i), F_RDLCK);
        if (ret == 0) {
            added |= (uint8_t)(1u << i);
        }
    }
    if (ret == -EINVAL || ret == -ENOTSUP || ret == -ENOLCK) {
        /* No OFD locks here (old kernel, some network filesystems): run unlocked like QEMU. */
        for (int i = 0; i < 2 * PERM_COUNT; i++) {
            if (added & (1u << i)) {
                ofd_lock(s->fd, lock_index_byte(i), F_UNLCK);
            }
        }
        vd_mutex_unlock(&own_locks_mutex);
        return 0;
    }
    /* Bytes held by other fds of this process (ours through s are not in own yet for `added`). */
    OwnLock *own = own_find(s->dev, s->ino);
    for (int p = 0; p < PERM_COUNT && ret == 0; p++) {
        for (int pass = 0; pass < 2 && ret == 0; pass++) {
            bool relevant = pass == 0 ? (perm & (1u << p)) : (unshared & (1u << p));
            if (!relevant) {
                continue;
            }
            int idx = pass == 0 ? PERM_COUNT + p : p; /* the byte a conflicting user holds */
            unsigned mine = own ? own->count[idx] : 0;
            if (s->lock_mask & (1u << idx)) {
                mine--; /* s's own earlier lock is counted in own; it is not "another fd" */
            }
            if (mine > 0) {
                continue; /* this process holds it: a reopen, not another user */
            }
            int held = ofd_test(s->fd, lock_index_byte(idx));
            if (held <= 0) {
                continue;
            }
            vd_error_setg(errp, EAGAIN, "Failed to get %s\"%s\" lock on '%s': is another "
                          "process using the image?%s", pass == 0 ? "" : "shared ",
                          perm_names[p], path, hint_u ? " (-U opens it without locking)" : "");
            ret = -EAGAIN;
        }
    }
    if (ret == 0 && added) {
        if (!own) {
            OwnLock *grown = realloc(own_locks, (n_own_locks + 1) * sizeof(*own_locks));
            if (!grown) {
                ret = -ENOMEM;
                vd_error_setg(errp, ENOMEM, "Out of memory locking '%s'", path);
            } else {
                own_locks = grown;
                own = &own_locks[n_own_locks++];
                memset(own, 0, sizeof(*own));
                own->dev = s->dev;
                own->ino = s->ino;
            }
        }
        if (own) {
            for (int i = 0; i < 2 * PERM_COUNT; i++) {
                if (added & (1u << i)) {
                    own->count[i]++;
                }
            }
        }
    }
    if (ret < 0) {
        for (int i = 0; i < 2 * PERM_COUNT; i++) {
            if (added & (1u << i)) {
                ofd_lock(s->fd, lock_index_byte(i), F_UNLCK);
            }
        }
    } else {
        s->lock_mask |= added;
        s->locked = s->lock_mask != 0;
    }
    vd_mutex_unlock(&own_locks_mutex);
    return ret;
}

static int file_lock_for_format(BlockNode *file, bool writable, VdError **errp)
{
    if (file->open_flags & VD_OPEN_FORCE_SHARE) {
        return 0;
    }
    FileState *s = fs_of(file);
    /* A format keeps metadata in the file: it must not change under us (QEMU does the same). */
    unsigned perm = 1u << PERM_CONSISTENT_READ;
    if (writable) {
        perm |= (1u << PERM_WRITE) | (1u << PERM_RESIZE);
    }
    return file_lock(s, file->filename, perm, (1u << PERM_WRITE) | (1u << PERM_RESIZE), true,
                     errp);
}

/* ---- driver callbacks ---- */

static int file_open(BlockNode *bs, const VdOpenOptions *opts, VdError **errp)
{
    FileState *s = fs_of(bs);
    const char *path = opts->filename;
    int oflags = O_CLOEXEC | ((opts->flags & VD_OPEN_RDWR) ? O_RDWR : O_RDONLY);
    if (opts->flags & VD_OPEN_DIRECT) {
        oflags |= O_DIRECT;
    }
    s->fd = -1;
    if (!path || !*path) {
        vd_error_setg(errp, EINVAL, "The 'file' protocol needs a filename");
        return -EINVAL;
    }
    int fd;
    do {
        fd = open(path, oflags);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        int err = errno;
        if (err == EINVAL && (oflags & O_DIRECT)) {
            vd_error_setg(errp, err, "Could not open '%s': the filesystem does not support "
                          "O_DIRECT (cache.direct / -t none)", path);
        } else {
            vd_error_setg_errno(errp, err, "Could not open '%s'", path);
        }
        return -err;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int err = errno;
        close(fd);
        vd_error_setg_errno(errp, err, "Could not stat '%s'", path);
        return -err;
    }
    if (S_ISDIR(st.st_mode)) {
        close(fd);
        vd_error_setg(errp, EISDIR, "Could not open '%s': Is a directory", path);
        return -EISDIR;
    }
    /* As QEMU: a device is host_device's, a regular file file's (the name picks for a path). */
    bool device = S_ISBLK(st.st_mode) || S_ISCHR(st.st_mode);
    if (bs->drv == &vd_drv_file && device) {
        close(fd);
        vd_error_setg(errp, EINVAL, "'file' driver requires '%s' to be a regular file", path);
        return -EINVAL;
    }
    if (bs->drv == &vd_drv_host_device && !device) {
        close(fd);
        vd_error_setg(errp, EINVAL, "'host_device' driver requires '%s' to be either a character "
                      "or block device", path);
        return -EINVAL;
    }
    s->fd = fd;
    s->is_blockdev = S_ISBLK(st.st_mode);
    s->direct = (oflags & O_DIRECT) != 0;
    s->align = 1;
    if (s->direct) {
        /* 4 KiB satisfies every common logical block size; ask block devices for theirs. */
        s->align = 4096;
        int ssz = 0;
        if (s->is_blockdev && ioctl(fd, BLKSSZGET, &ssz) == 0 && ssz > 4096 &&
            (ssz & (ssz - 1)) == 0) {
            s->align = (uint32_t)ssz;
        }
    }
    if (!(opts->flags & VD_OPEN_FORCE_SHARE)) {
        /* What raw needs; vd_open adds the format's needs (vd_file_lock_for_format). */
        unsigned perm = 1u << PERM_CONSISTENT_READ;
        if (opts->flags & VD_OPEN_RDWR) {
            perm |= 1u << PERM_WRITE;
        }
        int ret = file_lock(s, path, perm, 0, true, errp);
        if (ret < 0) {
            close(fd);
            s->fd = -1;
            return ret;
        }
    }
    pthread_rwlock_init(&s->rmw_lock, NULL);
    bs->read_only = !(opts->flags & VD_OPEN_RDWR);
    return 0;
}

static void file_close(BlockNode *bs)
{
    FileState *s = fs_of(bs);
    if (s->fd >= 0) {
        file_unlock(s);
        close(s->fd);
        s->fd = -1;
        pthread_rwlock_destroy(&s->rmw_lock);
    }
}

static int file_pread(BlockNode *bs, uint64_t offset, uint64_t bytes, void *buf)
{
    FileState *s = fs_of(bs);
    if (s->direct) {
        return direct_pread(s, offset, bytes, buf);
    }
    return full_pread(s->fd, buf, bytes, offset);
}

static int file_flush(BlockNode *bs);

/*
 * A durable write of just this range (RWF_DSYNC) instead of write + fdatasync of the whole file.
 * -ENOTSUP when the kernel or filesystem lacks it (the caller then flushes).
 */
static int dsync_pwrite(int fd, const void *buf, uint64_t bytes, uint64_t offset)
{
    static int unsupported;
    if (__atomic_load_n(&unsupported, __ATOMIC_RELAXED)) {
        return -ENOTSUP;
    }
    const uint8_t *p = buf;
    bool first = true;
    while (bytes > 0) {
        size_t chunk = bytes > (1ULL << 30) ? (size_t)(1ULL << 30) : (size_t)bytes;
        struct iovec iov = { .iov_base = (void *)p, .iov_len = chunk };
        ssize_t n = pwritev2(fd, &iov, 1, (off_t)offset, RWF_DSYNC);
        if (n < 0) {
            int err = errno;
            if (err == EINTR) {
                continue;
            }
            if (first && (err == EOPNOTSUPP || err == ENOSYS || err == EINVAL)) {
                __atomic_store_n(&unsupported, 1, __ATOMIC_RELAXED);
                return -ENOTSUP;
            }
            return -err;
        }
        if (n == 0) {
            return -EIO;
        }
        first = false;
        p += n;
        offset += (uint64_t)n;
        bytes -= (uint64_t)n;
    }
    return 0;
}

static int file_pwrite(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf, int flags)
{
    FileState *s = fs_of(bs);
    if ((flags & VD_REQ_FUA) && !s->direct) {
        int r = dsync_pwrite(s->fd, buf, bytes, offset);
        if (r != -ENOTSUP) {
            return r;
        }
    }
    int ret = s->direct ? direct_pwrite(s, offset, bytes, buf)
                        : full_pwrite(s->fd, buf, bytes, offset);
    if (ret == 0 && (flags & VD_REQ_FUA)) {
        ret = file_flush(bs);
    }
    return ret;
}

static int do_fallocate(int fd, int mode, uint64_t offset, uint64_t len)
{
    int r;
    do {
        r = fallocate(fd, mode, (off_t)offset, (off_t)len);
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
        int err = errno;
        /* Filesystems without the mode say EOPNOTSUPP (or ENOSYS/EINVAL on odd ones). */
        return (err == EOPNOTSUPP || err == ENOSYS || err == EINVAL) ? -ENOTSUP : -err;
    }
    return 0;
}

/*
 * Copy offloading between two file nodes: copy_file_range (reflinks or in-kernel copies).
 * The kernel refusing the pair (other filesystem, O_DIRECT rules, no support) is -ENOTSUP so
 * the caller copies through a buffer; a source ending early is -ENOTSUP too (those bytes read
 * as zeroes, which only a buffered copy writes).
 */
static int file_copy_range_to(BlockNode *bs, uint64_t offset, uint64_t bytes, BlockNode *src,
                              uint64_t src_offset)
{
    if (src->drv != &vd_drv_file) {
        return -ENOTSUP;
    }
    int in = fs_of(src)->fd, out = fs_of(bs)->fd;
    loff_t off_in = (loff_t)src_offset, off_out = (loff_t)offset;
    while (bytes > 0) {
        size_t n = bytes > (1u << 30) ? (1u << 30) : (size_t)bytes;
        ssize_t r = copy_file_range(in, &off_in, out, &off_out, n, 0);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r < 0) {
            int e = errno;
            return (e == EXDEV || e == EINVAL || e == ENOSYS || e == EOPNOTSUPP ||
                    e == EBADF) ? -ENOTSUP : -e;
        }
        if (r == 0) {
            return -ENOTSUP;
        }
        bytes -= (uint64_t)r;
    }
    return 0;
}

static int file_pwrite_zeroes(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    FileState *s = fs_of(bs);
    int ret = -ENOTSUP;
    if (s->direct && (offset % s->align || bytes % s->align)) {
        return -ENOTSUP; /* generic emulation handles the unaligned edges */
    }
    if (flags & VD_REQ_MAY_UNMAP) {
        int64_t len = fd_length(s);
        if (len < 0) {
            return (int)len;
        }
        /* A hole below EOF; beyond EOF the file just grows (sparse, reads as zeroes). */
        uint64_t end = offset + bytes;
        uint64_t punch_end = end < (uint64_t)len ? end : (uint64_t)len;
        ret = 0;
        if (offset < punch_end) {
            ret = do_fallocate(s->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset,
                               punch_end - offset);
        }
        if (ret == 0 && end > (uint64_t)len && !s->is_blockdev) {
            if (ftruncate(s->fd, (off_t)end) < 0) {
                return -errno;
            }
        }
        if (ret == 0 && s->is_blockdev) {
            /* A punched block device range need not read back as zeroes on every device. */
            ret = do_fallocate(s->fd, FALLOC_FL_ZERO_RANGE, offset, bytes);
        }
        if (ret != -ENOTSUP) {
            goto out;
        }
    }
    ret = do_fallocate(s->fd, FALLOC_FL_ZERO_RANGE, offset, bytes);
out:
    if (ret == 0 && (flags & VD_REQ_FUA)) {
        ret = file_flush(bs);
    }
    return ret;
}

static int file_pdiscard(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    FileState *s = fs_of(bs);
    int64_t len = fd_length(s);
    if (len < 0) {
        return (int)len;
    }
    if (offset >= (uint64_t)len) {
        return 0;
    }
    if (bytes > (uint64_t)len - offset) {
        bytes = (uint64_t)len - offset;
    }
    return do_fallocate(s->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, bytes);
}

static int file_flush(BlockNode *bs)
{
    FileState *s = fs_of(bs);
    int r;
    do {
        r = fdatasync(s->fd);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

/*
 * Queue the file's dirty pages for writing and return: no wait for the device, no journal commit
 * (a copy job's early writeback, jobs/copy.c). O_DIRECT leaves nothing cached to write.
 */
static int file_start_writeback(BlockNode *bs)
{
    FileState *s = fs_of(bs);
    if (s->direct) {
        return 0;
    }
    int r;
    do {
        r = sync_file_range(s->fd, 0, 0, SYNC_FILE_RANGE_WRITE);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

static int file_block_status(BlockNode *bs, uint64_t offset, uint64_t bytes, uint64_t *pnum,
                             uint64_t *map, BlockNode **file)
{
    FileState *s = fs_of(bs);
    int flags = VD_BS_ALLOCATED | VD_BS_OFFSET_VALID;
    *map = offset;
    *file = bs;
    *pnum = bytes;

    off_t data = lseek(s->fd, (off_t)offset, SEEK_DATA);
    if (data < 0) {
        if (errno == ENXIO) {
            /* No data at or after offset: a hole up to EOF (or past EOF). */
            return flags | VD_BS_ZERO;
        }
        /* SEEK_DATA unsupported here: everything is data. */
        return flags | VD_BS_DATA;
    }
    if ((uint64_t)data > offset) {
        uint64_t n = (uint64_t)data - offset;
        *pnum = n < bytes ? n : bytes;
        return flags | VD_BS_ZERO;
    }
    off_t hole = lseek(s->fd, (off_t)offset, SEEK_HOLE);
    if (hole < 0 || (uint64_t)hole <= offset) {
        return flags | VD_BS_DATA; /* can't tell where data ends: claim the whole range */
    }
    uint64_t n = (uint64_t)hole - offset;
    *pnum = n < bytes ? n : bytes;
    return flags | VD_BS_DATA;
}

static int64_t file_getlength(BlockNode *bs)
{
    return fd_length(fs_of(bs));
}

static int64_t file_allocated_size(BlockNode *bs)
{
    struct stat st;
    if (fstat(fs_of(bs)->fd, &st) < 0) {
        return -errno;
    }
    return (int64_t)st.st_blocks * 512;
}

/* Fill [from, to) with zeroes by writing them (full preallocation). */
static int write_zero_range(int fd, uint64_t from, uint64_t to)
{
    uint8_t *zero = calloc(1, FILE_ZERO_CHUNK);
    if (!zero) {
        return -ENOMEM;
    }
    int ret = 0;
    while (from < to) {
        uint64_t n = to - from < FILE_ZERO_CHUNK ? to - from : FILE_ZERO_CHUNK;
        ret = full_pwrite(fd, zero, n, from);
        if (ret < 0) {
            break;
        }
        from += n;
    }
    free(zero);
    return ret;
}

static int grow_prealloc(int fd, uint64_t old, uint64_t size, VdPrealloc prealloc)
{
    switch (prealloc) {
    case VD_PREALLOC_OFF:
        if (ftruncate(fd, (off_t)size) < 0) {
            return -errno;
        }
        if (old == 0 && size > 0) {
            /*
             * Like QEMU, allocate the first block of a new file: it makes O_DIRECT alignment
             * probing work and gives the same "disk size" and map as qemu-img create.
             * Failure is harmless (the block just stays a hole).
             */
            uint8_t zero[4096] = { 0 };
            uint64_t n = size < sizeof(zero) ? 512 : sizeof(zero);
            (void)full_pwrite(fd, zero, n < size ? n : size, 0);
        }
        return 0;
    case VD_PREALLOC_FALLOC: {
        int ret = do_fallocate(fd, 0, old, size - old);
        if (ret == -ENOTSUP) {
            /* posix_fallocate emulates by writing; same result, slower. */
            int e = posix_fallocate(fd, (off_t)old, (off_t)(size - old));
            ret = -e;
        }
        return ret;
    }
    case VD_PREALLOC_FULL: {
        int ret = write_zero_range(fd, old, size);
        if (ret == 0 && ftruncate(fd, (off_t)size) < 0) {
            ret = -errno;
        }
        return ret;
    }
    default:
        return -ENOTSUP;
    }
}

static const char *prealloc_name(VdPrealloc p)
{
    switch (p) {
    case VD_PREALLOC_OFF: return "off";
    case VD_PREALLOC_METADATA: return "metadata";
    case VD_PREALLOC_FALLOC: return "falloc";
    case VD_PREALLOC_FULL: return "full";
    }
    return "?";
}

static int file_truncate(BlockNode *bs, uint64_t size, bool shrink, VdPrealloc prealloc,
                         VdError **errp)
{
    FileState *s = fs_of(bs);
    int64_t cur = fd_length(s);
    if (cur < 0) {
        vd_error_setg_errno(errp, (int)-cur, "Could not get the size of '%s'", bs->filename);
        return (int)cur;
    }
    if (prealloc == VD_PREALLOC_METADATA) {
        vd_error_setg(errp, ENOTSUP, "Unsupported preallocation mode 'metadata' for '%s'",
                      bs->filename);
        return -ENOTSUP;
    }
    if (s->is_blockdev) {
        if (size > (uint64_t)cur) {
            vd_error_setg(errp, EINVAL, "Cannot grow device '%s'", bs->filename);
            return -EINVAL;
        }
        return 0; /* a device keeps its size; the format above just uses less */
    }
    if (size == (uint64_t)cur) {
        return 0;
    }
    if (size < (uint64_t)cur) {
        if (!shrink) {
            vd_error_setg(errp, EINVAL, "Shrinking '%s' needs the shrink option", bs->filename);
            return -EINVAL;
        }
        if (prealloc != VD_PREALLOC_OFF) {
            vd_error_setg(errp, ENOTSUP, "Preallocation mode '%s' is only supported when growing",
                          prealloc_name(prealloc));
            return -ENOTSUP;
        }
        if (ftruncate(s->fd, (off_t)size) < 0) {
            int err = errno;
            vd_error_setg_errno(errp, err, "Could not shrink '%s'", bs->filename);
            return -err;
        }
        return 0;
    }
    int ret = grow_prealloc(s->fd, (uint64_t)cur, size, prealloc);
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "Could not resize '%s' to %llu bytes", bs->filename,
                            (unsigned long long)size);
    }
    return ret;
}

/*
 * file-posix's create-time tuning of a new (emptied) file, both only optimisations: nocow sets
 * FS_NOCOW_FL (btrfs; failure ignored), the extent size hint FS_XFLAG_EXTSIZE (XFS; 1 MiB unless
 * given, 0 disables it), a failure warned about only when the user gave the hint, as QEMU does.
 */
static void file_create_tuning(int fd, const VdFileCreateOptions *o)
{
    if (o->nocow) {
        int attr;
        if (ioctl(fd, FS_IOC_GETFLAGS, &attr) == 0) {
            attr |= FS_NOCOW_FL;
            (void)!ioctl(fd, FS_IOC_SETFLAGS, &attr);
        }
    }
    uint64_t hint = o->extent_size_hint_set ? o->extent_size_hint : 1u << 20;
    if (hint) {
        struct fsxattr attr;
        int r = ioctl(fd, FS_IOC_FSGETXATTR, &attr);
        if (r == 0) {
            attr.fsx_xflags |= FS_XFLAG_EXTSIZE;
            attr.fsx_extsize = (uint32_t)hint;
            r = ioctl(fd, FS_IOC_FSSETXATTR, &attr);
        }
        if (r < 0 && o->extent_size_hint_set) {
            vd_log_verbatim(VD_LOG_WARN, "%s: warning: Failed to set extent size hint: %s\n",
                            program_invocation_short_name, strerror(errno));
        }
    }
}

static int file_create(const char *filename, const VdCreateOptions *opts, VdError **errp)
{
    if (opts->prealloc == VD_PREALLOC_METADATA) {
        vd_error_setg(errp, ENOTSUP, "Unsupported preallocation mode 'metadata'");
        return -ENOTSUP;
    }
    if (opts->file.extent_size_hint > UINT32_MAX) {
        vd_error_setg(errp, EINVAL, "Extent size hint is too large");
        return -EINVAL;
    }
    int fd;
    do {
        fd = open(filename, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        int err = errno;
        vd_error_setg_errno(errp, err, "Could not create '%s'", filename);
        return -err;
    }
    /*
     * Never truncate an image another process is using: take QEMU's create locks (write and
     * resize, resize not shared) and check for conflicts first, as qemu-img create does.
     */
    FileState ls = { .fd = fd };
    int ret = file_lock(&ls, filename, (1u << PERM_WRITE) | (1u << PERM_RESIZE),
                        1u << PERM_RESIZE, false, errp);
    if (ret < 0) {
        close(fd);
        return ret;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        ret = -errno;
    } else if (S_ISREG(st.st_mode)) {
        /* Start from an empty file so old contents never show through (like qemu-img). */
        if (ftruncate(fd, 0) < 0) {
            ret = -errno;
        } else {
            file_create_tuning(fd, &opts->file);
            ret = grow_prealloc(fd, 0, opts->size, opts->prealloc);
        }
    } else if (S_ISBLK(st.st_mode)) {
        off_t end = lseek(fd, 0, SEEK_END);
        if (end >= 0 && (uint64_t)end < opts->size) {
            file_unlock(&ls);
            close(fd);
            vd_error_setg(errp, ENOSPC, "Device '%s' is too small (%lld < %llu bytes)", filename,
                          (long long)end, (unsigned long long)opts->size);
            return -ENOSPC;
        }
    }
    file_unlock(&ls);
    if (ret < 0) {
        close(fd);
        vd_error_setg_errno(errp, -ret, "Could not create '%s' with size %llu", filename,
                            (unsigned long long)opts->size);
        return ret;
    }
    if (close(fd) < 0) {
        int err = errno;
        vd_error_setg_errno(errp, err, "Could not close '%s'", filename);
        return -err;
    }
    return 0;
}

static bool host_device_probe_device(const char *filename)
{
    struct stat st;
    return stat(filename, &st) == 0 && (S_ISBLK(st.st_mode) || S_ISCHR(st.st_mode));
}

static int file_probe(const uint8_t *buf, size_t len, const char *filename)
{
    return 0; /* a protocol, never a format guess */
}

/* A host file has no dirty bit, but answers (QEMU's file driver has a get_info): not dirty. */
static int file_is_dirty(BlockNode *bs, bool *dirty)
{
    *dirty = false;
    return 0;
}

static const char *const on_off_auto_enum[] = {"auto", "on", "off", NULL};
static const char *const aio_enum[] = {"threads", "native", "io_uring", NULL};

/* BlockdevOptionsFile, as blockdev-add takes it (the filename is vd_open's). */
static const VdOptSpec file_blockdev_options[] = {
    {"filename", VD_OPT_STR, true},
    {"pr-manager", VD_OPT_STR},
    {"locking", VD_OPT_ENUM, false, on_off_auto_enum},
    {"aio", VD_OPT_ENUM, false, aio_enum},
    {"aio-max-batch", VD_OPT_INT},
    {"drop-cache", VD_OPT_BOOL},
    {"x-check-cache-dropped", VD_OPT_BOOL},
    {NULL}};

const BlockDriver vd_drv_file = {
    .name = "file",
    .is_protocol = true,
    .supports_backing = false,
    .opens_host_paths = true,
    .blockdev_options = file_blockdev_options,
    .reads_zero_past_end = true,
    .state_size = sizeof(FileState),
    .probe = file_probe,
    .open = file_open,
    .close = file_close,
    .create = file_create,
    .pread = file_pread,
    .pwrite = file_pwrite,
    .pwrite_zeroes = file_pwrite_zeroes,
    .copy_range_to = file_copy_range_to,
    .pdiscard = file_pdiscard,
    .flush = file_flush,
    .start_writeback = file_start_writeback,
    .block_status = file_block_status,
    .getlength = file_getlength,
    .allocated_size = file_allocated_size,
    .truncate = file_truncate,
    .is_dirty = file_is_dirty,
    .lock_for_format = file_lock_for_format,
};

/* Block and character devices by path (QEMU's host_device): the file driver's I/O. */
const BlockDriver vd_drv_host_device = {
    .name = "host_device",
    .is_protocol = true,
    .supports_backing = false,
    .probe_device = host_device_probe_device,
    .blockdev_options = file_blockdev_options,
    .reads_zero_past_end = true,
    .state_size = sizeof(FileState),
    .probe = file_probe,
    .open = file_open,
    .close = file_close,
    .create = file_create,
    .pread = file_pread,
    .pwrite = file_pwrite,
    .pwrite_zeroes = file_pwrite_zeroes,
    .copy_range_to = file_copy_range_to,
    .pdiscard = file_pdiscard,
    .flush = file_flush,
    .start_writeback = file_start_writeback,
    .block_status = file_block_status,
    .getlength = file_getlength,
    .allocated_size = file_allocated_size,
    .truncate = file_truncate,
    .is_dirty = file_is_dirty,
    .lock_for_format = file_lock_for_format,
};
