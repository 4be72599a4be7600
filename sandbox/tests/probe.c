/* A static probe the hermeticity tests run inside sandboxes. Each verb tries
 * one thing and prints what happened, as "verb: ok" or "verb: ERRNAME". */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <sys/ipc.h>
#include <sys/shm.h>

static int report(const char *what, int r) {
  if (r == 0) printf("%s: ok\n", what);
  else printf("%s: %s\n", what, strerrorname_np(errno));
  return r;
}

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  const char *v = argv[1];
  if (!strcmp(v, "ids")) {
    uid_t r, e, s; gid_t gr, ge, gs;
    getresuid(&r, &e, &s); getresgid(&gr, &ge, &gs);
    printf("uid=%d euid=%d suid=%d gid=%d egid=%d sgid=%d\n", r, e, s, gr, ge, gs);
    return 0;
  }
  if (!strcmp(v, "ptrace")) {
    return report("ptrace", ptrace(PTRACE_ATTACH, atoi(argv[2]), 0, 0) < 0 ? -1 : 0) ? 1 : 0;
  }
  if (!strcmp(v, "unshare-user")) return report("unshare-user", unshare(CLONE_NEWUSER)) ? 1 : 0;
  if (!strcmp(v, "unshare-mount")) return report("unshare-mount", unshare(CLONE_NEWNS)) ? 1 : 0;
  if (!strcmp(v, "mount")) return report("mount", mount("none", "/tmp", "tmpfs", 0, "")) ? 1 : 0;
  if (!strcmp(v, "umount-proc")) return report("umount-proc", umount2("/proc/sys", MNT_DETACH)) ? 1 : 0;
  if (!strcmp(v, "mknod")) return report("mknod", mknod("/tmp/null2", S_IFCHR | 0666, makedev(1, 3))) ? 1 : 0;
  if (!strcmp(v, "chroot")) return report("chroot", chroot("/tmp")) ? 1 : 0;
  if (!strcmp(v, "setuid0")) return report("setuid0", setuid(0)) ? 1 : 0;
  /* A SysV segment outlives its processes, so only a fresh IPC namespace
   * per sandbox keeps one action's from the next. */
  if (!strcmp(v, "sysv-create"))
    return report("sysv-create", shmget(0x4b494c4e, 4096, IPC_CREAT | 0600) < 0 ? -1 : 0) ? 1 : 0;
  if (!strcmp(v, "sysv-find"))
    return report("sysv-find", shmget(0x4b494c4e, 0, 0) < 0 ? -1 : 0) ? 1 : 0;
  if (!strcmp(v, "connect")) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    return report("connect", connect(s, (struct sockaddr *)&a, sizeof a)) ? 1 : 0;
  }
  return 2;
}
