/*
 * fuzz_nbd.c - libFuzzer target: the input is what an NBD client sends (handshake, options,
 * then transmission requests), fed to vdiskd's NBD server over a socketpair; the export is a
 * writable raw node on an in-memory file. Promise under test: any bytes end in a reply or a
 * disconnect, never a crash, a hang or a sanitizer report.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fuzz-exchange.h"
#include "block/block.h"
#include "block/dirty-bitmap.h"
#include "nbd/nbd-server.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    int fd = memfd_create("fuzz-nbd-disk", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, 1 << 20) < 0) {
        abort();
    }
    char path[64], sock[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    snprintf(sock, sizeof(sock), "/tmp/vdisk-fuzz-nbd-%d.sock", (int)getpid());
    VdError *err = NULL;
    BlockNode *bs = vd_open_image(path, "raw", VD_OPEN_RDWR, &err);
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
