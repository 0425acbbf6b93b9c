/*
 * nbd-io.c - complete reads and writes on a client socket. Short reads/writes and EINTR are
 * retried; EOF mid-message is -EPIPE; writes never raise SIGPIPE (MSG_NOSIGNAL).
 */
#include <errno.h>
#include <sys/socket.h>
#include <unistd.h>

#include "nbd/nbd-protocol.h"

int nbd_read_full(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = recv(fd, p, len, 0);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        if (n == 0) {
            return -EPIPE;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

int nbd_write_full(int fd, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}
