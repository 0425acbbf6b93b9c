/*
 * fuzz_nbd.c - libFuzzer target: the input is what an NBD client sends (handshake, options,
 * then transmission requests), fed to vdiskd's NBD server over a socketpair; the export is a
 * writable raw node on an in-memory file. The server serves each connection on recycled threads
 * (util/thread-cache.h), so an input costs no thread creation. Promise under test: any bytes end in a reply or a
 * disconnect, never a crash, a hang or a sanitizer report.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fuzz-exchange.h"
#include "block/block.h"
#include "block/dirty-bitmap.h"
#include "nbd/nbd-server.h"
#include "util/lock.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define DISK_SIZE (1u << 20)

/*
 * The export's file: 1 MiB in memory ("fuzzmem://"), as a memfd's bytes but without the fstat,
 * fdatasync and fallocate system calls per request that the file protocol made (not the code
 * under test here). Requests come from several pool workers at once: one lock.
 */
static uint8_t disk[DISK_SIZE];
static pthread_mutex_t disk_lock = PTHREAD_MUTEX_INITIALIZER;

static int mem_open(BlockNode *bs, const VdOpenOptions *opts, VdError **errp)
{
    return 0;
}

/* vd_* checked the range against getlength: off + n <= DISK_SIZE */
static int mem_pread(BlockNode *bs, uint64_t off, uint64_t n, void *buf)
{
    vd_mutex_lock(&disk_lock);
    memcpy(buf, disk + off, n);
    vd_mutex_unlock(&disk_lock);
    return 0;
}

static int mem_pwrite(BlockNode *bs, uint64_t off, uint64_t n, const void *buf, int flags)
{
    vd_mutex_lock(&disk_lock);
    memcpy(disk + off, buf, n);
    vd_mutex_unlock(&disk_lock);
    return 0;
}

static int mem_pwrite_zeroes(BlockNode *bs, uint64_t off, uint64_t n, int flags)
{
    vd_mutex_lock(&disk_lock);
    memset(disk + off, 0, n);
    vd_mutex_unlock(&disk_lock);
    return 0;
}

static int mem_pdiscard(BlockNode *bs, uint64_t off, uint64_t n, int flags)
{
    return mem_pwrite_zeroes(bs, off, n, flags);
}

static int mem_flush(BlockNode *bs)
{
    return 0;
}

static bool block_is_zero(uint64_t off)
{
    static const uint8_t zero[4096];
    return memcmp(disk + off, zero, sizeof(zero)) == 0;
}

/* As a sparse file: 4 KiB blocks of zeroes are holes, so the server's extents vary. */
static int mem_block_status(BlockNode *bs, uint64_t off, uint64_t n, uint64_t *pnum,
                            uint64_t *map, BlockNode **file)
{
    vd_mutex_lock(&disk_lock);
    bool zero = block_is_zero(off & ~4095ull);
    uint64_t end = (off & ~4095ull) + 4096;
    while (end < off + n && block_is_zero(end) == zero) {
        end += 4096;
    }
    vd_mutex_unlock(&disk_lock);
    *pnum = end - off < n ? end - off : n;
    *map = off;
    *file = bs;
    return VD_BS_ALLOCATED | VD_BS_OFFSET_VALID | (zero ? VD_BS_ZERO : VD_BS_DATA);
}

static int64_t mem_getlength(BlockNode *bs)
{
    return DISK_SIZE;
}

static const char *const mem_schemes[] = {"fuzzmem", NULL};

static const BlockDriver mem_drv = {
    .name = "fuzzmem",
    .is_protocol = true,
    .uri_schemes = mem_schemes,
    .open = mem_open,
    .pread = mem_pread,
    .pwrite = mem_pwrite,
    .pwrite_zeroes = mem_pwrite_zeroes,
    .pdiscard = mem_pdiscard,
    .flush = mem_flush,
    .block_status = mem_block_status,
    .getlength = mem_getlength,
};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    char sock[64];
    snprintf(sock, sizeof(sock), "/tmp/vdisk-fuzz-nbd-%d.sock", (int)getpid());
    VdError *err = NULL;
    if (vd_register_driver(&mem_drv) < 0) {
        abort();
    }
    BlockNode *bs = vd_open_image("fuzzmem://disk", "raw", VD_OPEN_RDWR, &err);
    NbdServerAddress addr = {.type = NBD_ADDR_UNIX, .path = sock};
    /* a (non-persistent) bitmap exported too, so the fuzzer reaches qemu:dirty-bitmap:b */
    VdBitmapRef bm = {.node = bs, .name = "b"};
    if (!bs || nbd_server_start(&addr, 0, &err) < 0 ||
        vd_bitmap_add(bs, "b", 4096, false, false, &err) < 0 ||
        !nbd_export_add_bitmaps("disk", "disk", bs, true, "fuzz", &bm, 1, &err)) {
        fprintf(stderr, "fuzz_nbd: setup failed: %s\n", err ? vd_error_msg(err) : "?");
        abort();
    }
    unlink(sock); /* clients come through socketpairs only */
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        abort();
    }
    if (nbd_server_add_client(sv[1]) < 0) {
        abort();
    }
    fuzz_exchange("fuzz_nbd", sv[0], data, size);
    close(sv[0]);
    return 0;
}
