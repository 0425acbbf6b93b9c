/*
 * fuzz_qmp.c - libFuzzer target: the input is what a QMP client sends after negotiating,
 * fed to vdiskd's QMP server (JSON scanner, parser, dispatcher, every command's argument table
 * and handler). Inputs naming a command that opens or creates host files or sockets
 * (blockdev-add, drive-mirror, blockdev-snapshot-sync, nbd-server-*, block-export-add,
 * authz-listfile) are skipped:
 * the graph stays empty, so the other commands fail on their first lookup, after their checks.
 * Promise under test: any bytes get answers, never a crash, a hang or a sanitizer report.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "fuzz-exchange.h"
#include "qmp/qmp.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct sockaddr_un sa = {.sun_family = AF_UNIX};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    snprintf(sa.sun_path, sizeof(sa.sun_path), "/tmp/vdisk-fuzz-qmp-%d.sock", (int)getpid());
    VdError *err = NULL;
    if (qmp_server_start(sa.sun_path, &err) < 0) {
        fprintf(stderr, "fuzz_qmp: %s\n", vd_error_msg(err));
        abort();
    }
    return 0;
}

static bool names_host_resource(const uint8_t *data, size_t size)
{
    static const char *const words[] = {"blockdev-add", "mirror", "snapshot-sync", "nbd-server",
                                        "export-add", "quit", "listfile"};
    for (size_t i = 0; i < sizeof(words) / sizeof(words[0]); i++) {
        if (memmem(data, size, words[i], strlen(words[i]))) {
            return true;
        }
    }
    /* JSON escapes could spell those names too: skip inputs with any. */
    return memmem(data, size, "\\u", 2) != NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (names_host_resource(data, size)) {
        return -1; /* not added to the corpus */
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        abort();
    }
    static const char neg[] = "{\"execute\":\"qmp_capabilities\"}\n";
    if (send(fd, neg, sizeof(neg) - 1, MSG_NOSIGNAL) < 0) {
        abort();
    }
    fuzz_exchange("fuzz_qmp", fd, data, size);
    close(fd);
    return 0;
}
