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
    /* Send the input while reading replies (either side may fill a socket buffer), then EOF. */
    size_t sent = 0;
    bool eof_sent = false;
    char buf[65536];
    for (int rounds = 0; rounds < 100000; rounds++) {
        struct pollfd p = {.fd = sv[0], .events = POLLIN | (eof_sent ? 0 : POLLOUT)};
        int r = poll(&p, 1, 30000);
        if (r <= 0) {
            fprintf(stderr, "fuzz_nbd: the server neither answered nor hung up in 30 s\n");
            abort(); /* a hang */
        }
        if (p.revents & POLLOUT) {
            ssize_t w = send(sv[0], data + sent, size - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (w > 0) {
                sent += (size_t)w;
            }
            if (w < 0 && errno != EAGAIN) {
                sent = size; /* the server hung up */
            }
            if (sent == size) {
                shutdown(sv[0], SHUT_WR);
                eof_sent = true;
            }
        }
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t got = recv(sv[0], buf, sizeof(buf), MSG_DONTWAIT);
            if (got == 0 || (got < 0 && errno != EAGAIN)) {
                break; /* the server closed the connection */
            }
        }
    }
    close(sv[0]);
    return 0;
}
