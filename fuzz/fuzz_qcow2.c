/*
 * fuzz_qcow2.c - libFuzzer target: the input is an image file (kept in memory with memfd_create)
 * opened as qcow2 and read: header, extensions, L1/L2, refcounts, compressed clusters, block
 * status and the read-only check. Promise under test: any bytes give an error or data, never a
 * crash, a hang or a sanitizer report; the file is never written (opened read-only).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "block/block.h"

#define MAX_READ (4u << 20) /* bytes of the virtual disk read per input */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void read_some(BlockNode *bs)
{
    int64_t len = vd_getlength(bs);
    if (len <= 0) {
        return;
    }
    static uint8_t buf[65536];
    uint64_t end = (uint64_t)len < MAX_READ ? (uint64_t)len : MAX_READ;
    for (uint64_t off = 0; off < end; off += sizeof(buf)) {
        uint64_t n = end - off < sizeof(buf) ? end - off : sizeof(buf);
        uint64_t pnum = 0;
        VdBlockStatus st;
        vd_block_status(bs, off, n, &pnum, &st);
        if (vd_pread(bs, off, n, buf) < 0) {
            break;
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int fd = memfd_create("fuzz-qcow2", MFD_CLOEXEC);
    if (fd < 0 || write(fd, data, size) != (ssize_t)size) {
        abort();
    }
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    VdError *err = NULL;
    BlockNode *bs = vd_open_image(path, "qcow2", VD_OPEN_NO_BACKING, &err);
    if (bs) {
        read_some(bs);
        VdCheckResult res = {0};
        vd_check(bs, &res, 0, &err);
        vd_check_result_clear(&res);
        vd_node_unref(bs);
    }
    vd_error_free(err);
    close(fd);
    return 0;
}
