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
#include <sys/syscall.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <linux/perf_event.h>

/* <linux/keyctl.h> */
#define KEYCTL_GET_KEYRING_ID 0
#define KEYCTL_LINK 8
#define KEYCTL_SEARCH 10
#define KEYCTL_READ 11
#define KEYCTL_SET_TIMEOUT 15
#define KEY_SPEC_SESSION_KEYRING -3
#define KEY_SPEC_USER_KEYRING -4

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
  /* The keyring: plant a key in the caller's user keyring (printing that
   * keyring's serial), and from a sandbox try to link a keyring by serial
   * into the session keyring and read the key through it. */
  if (!strcmp(v, "keyctl"))
    return report("keyctl", syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 1) < 0 ? -1 : 0) ? 1 : 0;
  if (!strcmp(v, "key-plant") && argc == 4) {
    long k = syscall(SYS_add_key, "user", argv[2], argv[3], strlen(argv[3]), KEY_SPEC_USER_KEYRING);
    if (k < 0) return report("key-plant", -1), 1;
    syscall(SYS_keyctl, KEYCTL_SET_TIMEOUT, k, 120);
    printf("key-plant: %ld\n", syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0));
    return 0;
  }
  if (!strcmp(v, "key-steal") && argc == 4) {
    if (syscall(SYS_keyctl, KEYCTL_LINK, atol(argv[2]), KEY_SPEC_SESSION_KEYRING) < 0)
      return report("key-steal", -1), 1;
    long k = syscall(SYS_keyctl, KEYCTL_SEARCH, KEY_SPEC_SESSION_KEYRING, "user", argv[3], 0);
    if (k < 0) return report("key-steal", -1), 1;
    char buf[256] = {0};
    if (syscall(SYS_keyctl, KEYCTL_READ, k, buf, sizeof buf - 1) < 0) return report("key-steal", -1), 1;
    printf("key-steal: read %s\n", buf);
    return 0;
  }
  if (!strcmp(v, "perf")) {
    struct perf_event_attr a = {.type = PERF_TYPE_SOFTWARE, .size = sizeof a,
                                .config = PERF_COUNT_SW_TASK_CLOCK, .exclude_kernel = 1, .exclude_hv = 1};
    return report("perf", syscall(SYS_perf_event_open, &a, 0, -1, -1, 0) < 0 ? -1 : 0) ? 1 : 0;
  }
  if (!strcmp(v, "userfaultfd")) /* UFFD_USER_MODE_ONLY: allowed unprivileged */
    return report("userfaultfd", syscall(SYS_userfaultfd, 1) < 0 ? -1 : 0) ? 1 : 0;
  if (!strcmp(v, "io_uring")) {
    char params[120] = {0};
    return report("io_uring", syscall(SYS_io_uring_setup, 1, params) < 0 ? -1 : 0) ? 1 : 0;
  }
  if (!strcmp(v, "clone3")) {
    unsigned long long args[11] = {0};
    args[4] = SIGCHLD; /* exit_signal */
    long r = syscall(SYS_clone3, args, sizeof args);
    if (r == 0) _exit(0);
    if (r > 0) waitpid(r, 0, 0);
    return report("clone3", r < 0 ? -1 : 0) ? 1 : 0;
  }
  if (!strcmp(v, "bpf")) {
    char attr[128] = {0};
    return report("bpf", syscall(SYS_bpf, 0, attr, sizeof attr) < 0 ? -1 : 0) ? 1 : 0;
  }
  /* Set-id bits by every route: chmod, fchmod, fchmodat, open(O_CREAT), mknod. */
  if (!strcmp(v, "setid") && argc == 3) {
    char p[4096];
    snprintf(p, sizeof p, "%s.chmod", argv[2]);
    close(open(p, O_CREAT | O_WRONLY, 0755));
    report("setid-chmod", chmod(p, 04755));
    snprintf(p, sizeof p, "%s.fchmod", argv[2]);
    int fd = open(p, O_CREAT | O_WRONLY, 0755);
    report("setid-fchmod", fchmod(fd, 02755));
    close(fd);
    snprintf(p, sizeof p, "%s.fchmodat", argv[2]);
    close(open(p, O_CREAT | O_WRONLY, 0755));
    report("setid-fchmodat", fchmodat(AT_FDCWD, p, 06755, 0));
    snprintf(p, sizeof p, "%s.open", argv[2]);
    fd = open(p, O_CREAT | O_WRONLY, 04755);
    report("setid-open", fd < 0 ? -1 : 0);
    close(fd);
    snprintf(p, sizeof p, "%s.mknod", argv[2]);
    report("setid-mknod", mknod(p, S_IFREG | 04755, 0));
    return 0;
  }
  /* Touches N MiB of memory, one MiB at a time, saying how far it got. */
  if (!strcmp(v, "balloon") && argc == 3) {
    long n = atol(argv[2]);
    for (long i = 0; i < n; i++) {
      char *p = malloc(1 << 20);
      if (!p) return report("balloon", -1), 1;
      memset(p, 1, 1 << 20);
    }
    printf("balloon: %ld MiB\n", n);
    return 0;
  }
  /* Forks N children that sleep; counts what the kernel refused. */
  if (!strcmp(v, "forks") && argc == 3) {
    long n = atol(argv[2]), ok = 0, again = 0;
    for (long i = 0; i < n; i++) {
      pid_t p = fork();
      if (p == 0) { sleep(30); _exit(0); }
      if (p > 0) ok++; else if (errno == EAGAIN) again++;
    }
    printf("forks: %ld ok, %ld EAGAIN\n", ok, again);
    fflush(stdout);
    kill(0, SIGKILL);
    return 0;
  }
  if (!strcmp(v, "connect")) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    return report("connect", connect(s, (struct sockaddr *)&a, sizeof a)) ? 1 : 0;
  }
  return 2;
}
