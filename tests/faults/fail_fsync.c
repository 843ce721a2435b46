/* A test-only LD_PRELOAD shim: once the file named by RAFTKVD_TEST_FAIL_FSYNC exists,
 * every fsync and fdatasync fails with EIO, as a dying disk's would. Before that it
 * passes each call on to the C library. Built by tests/disk_faults.rs with cc. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

static int failing(void) {
    const char *trigger = getenv("RAFTKVD_TEST_FAIL_FSYNC");
    return trigger && access(trigger, F_OK) == 0;
}

int fsync(int fd) {
    static int (*real)(int);
    if (failing()) {
        errno = EIO;
        return -1;
    }
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (failing()) {
        errno = EIO;
        return -1;
    }
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}
