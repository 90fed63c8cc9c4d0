/*
 * icbd-nbd-client: attach the NBD root of an icbd-cache workstation, and keep it attached.
 *
 * Debian's initramfs (nbd-client's scripts/local-top/nbd) attaches the root with
 *
 *     $NBDCLIENT HOST -N NAME PORT /dev/nbdN -swap -persist -systemd-mark
 *
 * and icbd-cache's second initrd sets NBDCLIENT to this program (conf/conf.d/icbd-reconnect),
 * so the same script, the same kernel arguments (root=/dev/nbd0 nbdroot=HOST:PORT/NAME) and the
 * same kernel driver attach the root, and a dropped connection costs the workstation a pause
 * instead of its root disk. Built by icbd-cache (pxe/initrd.py) with the build host's gcc,
 * statically, so it needs nothing from the iMI.
 *
 * Design notes
 * ------------
 * - The handshake is NBD's fixed newstyle negotiation with NBD_OPT_GO (NBD_OPT_EXPORT_NAME when
 *   the server does not know GO); the socket then goes to the kernel through the nbd driver's
 *   generic netlink family: NBD_CMD_CONNECT with the export's size and flags, an I/O timeout
 *   and a dead-connection timeout (NBD_ATTR_DEAD_CONN_TIMEOUT).
 * - While no connection is alive, the driver holds every new request for up to the
 *   dead-connection timeout instead of failing it ("Dead connection, failed to find a
 *   fallback" is what an unset timeout gives). Requests that were on the wire when the
 *   connection died are requeued when their I/O timeout fires (the driver sees that the
 *   socket changed), then sent on the new connection.
 * - After attaching, the program stays as a daemon holding a duplicate of each socket it gave
 *   the kernel. The driver shuts a socket down (both directions) when it marks the connection
 *   dead: that shows as EPOLLHUP on the duplicate (epoll is not woken by the data the kernel
 *   reads from the same socket). Then it connects again, negotiates the same export, checks
 *   that size and flags still fit, and hands the new socket over with NBD_CMD_RECONFIGURE.
 * - It never attaches a different image: a size that changed, or flags that would let the
 *   kernel send a request the server no longer accepts, is refused and retried.
 * - It must outlive the initramfs: after switch_root the binary is gone from any file system
 *   (it runs from memory, mlockall'ed, and never touches the NBD root), and argv[0] starts
 *   with '@', which systemd's shutdown spares (the "root storage daemon" convention).
 *
 * Settings, from the kernel command line (/proc/cmdline):
 *   icbd.reconnect=SECONDS   how long requests are held while the server is away
 *                            (NBD_ATTR_DEAD_CONN_TIMEOUT; default 600). Reconnection goes on
 *                            after that, but requests fail in the meantime. 0: no daemon, no
 *                            holding: attach once, like nbd-client without -persist.
 *   icbd.io_timeout=SECONDS  NBD_ATTR_TIMEOUT (default 20): a request unanswered this long
 *                            marks the connection dead and is sent again on a new one.
 * Options (nbd-client's spelling; others are refused):
 *   -N NAME  export name     -b BYTES  block size (512)     -C N  connections (1)
 *   -t SECONDS  I/O timeout (overrides icbd.io_timeout)     -R SECONDS  icbd.reconnect
 *   -nofork  stay in the foreground    -swap -persist -systemd-mark  accepted (always on)
 * Exit status: 0 attached (the daemon keeps it), 1 attaching failed, 2 usage. The daemon
 * exits when the device is disconnected on purpose (NBD_CMD_STATUS: not connected).
 * Messages go to stderr while attaching and to the kernel log (/dev/kmsg) always.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/netlink.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PROG "icbd-nbd-client"
#define MAX_CONNS 16

/* NBD protocol (proto.md): magics, options, replies, flags. */
#define NBDMAGIC 0x4e42444d41474943ULL
#define IHAVEOPT 0x49484156454f5054ULL
#define REPLYMAGIC 0x0003e889045565a9ULL
#define HS_FIXED_NEWSTYLE 1u
#define HS_NO_ZEROES 2u
#define OPT_EXPORT_NAME 1u
#define OPT_GO 7u
#define REP_ACK 1u
#define REP_INFO 3u
#define REP_ERR_UNSUP 0x80000001u
#define INFO_EXPORT 0u
#define FLAG_READ_ONLY (1u << 1)
#define FLAG_SEND_FLUSH (1u << 2)
#define FLAG_SEND_FUA (1u << 3)
#define FLAG_SEND_TRIM (1u << 5)
#define FLAG_SEND_WRITE_ZEROES (1u << 6)
#define FLAG_SEND_CACHE (1u << 10)
/* Commands the kernel may send because of a flag: a new server must still accept them. */
#define FLAG_COMMANDS (FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | \
                       FLAG_SEND_WRITE_ZEROES | FLAG_SEND_CACHE)

struct target {
    int family;                  /* AF_INET or AF_INET6 */
    struct sockaddr_storage addr;
    socklen_t addrlen;
    char host[64], name[4097];
    unsigned port;
};

struct export_info {
    uint64_t size;
    uint16_t flags;
};

static int kmsg = -1;
static int foreground_stderr = 1;
static char devname[32];

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    char line[512];
    int n = snprintf(line, sizeof line, PROG "[%d]: %s: ", (int)getpid(), devname);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    size_t len = strlen(line);
    if (len < sizeof line - 1)
        line[len++] = '\n';
    if (foreground_stderr && write(2, line, len) < 0) {
        /* nothing to do */
    }
    if (kmsg >= 0 && write(kmsg, line, len) < 0) {
        /* nothing to do */
    }
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

/* ------------------------------------------------------------------ settings */

/* The value of KEY=... on the kernel command line, as an unsigned number; DEF if absent. */
static unsigned long cmdline_number(const char *key, unsigned long def)
{
    static char buf[4096];
    static int loaded;
    if (!loaded) {
        int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
        ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
        buf[n > 0 ? n : 0] = 0;
        if (fd >= 0)
            close(fd);
        loaded = 1;
    }
    size_t klen = strlen(key);
    for (char *p = buf; *p;) {
        while (*p == ' ' || *p == '\n')
            p++;
        if (!strncmp(p, key, klen) && p[klen] == '=') {
            char *end;
            unsigned long v = strtoul(p + klen + 1, &end, 10);
            if (end != p + klen + 1 && (*end == ' ' || *end == '\n' || *end == 0))
                return v;
            return def;
        }
        while (*p && *p != ' ' && *p != '\n')
            p++;
    }
    return def;
}

/* --------------------------------------------------------------- handshake */

static int write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int read_all(int fd, void *buf, size_t len)
{
    char *p = buf;
    while (len) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0)
            errno = ECONNRESET;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static uint64_t be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put64(unsigned char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (unsigned char)v;
}

static void put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static int send_option(int fd, uint32_t opt, const void *data, uint32_t len)
{
    unsigned char hdr[16];
    put64(hdr, IHAVEOPT);
    put32(hdr + 8, opt);
    put32(hdr + 12, len);
    return write_all(fd, hdr, sizeof hdr) || (len && write_all(fd, data, len)) ? -1 : 0;
}

/* Negotiate NAME on a connected socket. Returns 0, or -1 with a reason in WHY. */
static int negotiate(int fd, const char *name, struct export_info *info, char *why, size_t wl)
{
    unsigned char b[18];
    if (read_all(fd, b, 18)) {
        snprintf(why, wl, "no greeting: %s", strerror(errno));
        return -1;
    }
    if (be64(b) != NBDMAGIC || be64(b + 8) != IHAVEOPT) {
        snprintf(why, wl, "not a newstyle NBD server");
        return -1;
    }
    unsigned hflags = (unsigned)b[16] << 8 | b[17];
    if (!(hflags & HS_FIXED_NEWSTYLE)) {
        snprintf(why, wl, "server without fixed newstyle negotiation");
        return -1;
    }
    unsigned cflags = HS_FIXED_NEWSTYLE | (hflags & HS_NO_ZEROES);
    unsigned char cf[4];
    put32(cf, cflags);
    size_t nlen = strlen(name);
    unsigned char go[4 + 4096 + 2];
    put32(go, (uint32_t)nlen);
    memcpy(go + 4, name, nlen);
    go[4 + nlen] = 0;
    go[5 + nlen] = 0; /* no information requests: NBD_INFO_EXPORT comes anyway */
    if (write_all(fd, cf, 4) || send_option(fd, OPT_GO, go, (uint32_t)(nlen + 6))) {
        snprintf(why, wl, "sending NBD_OPT_GO: %s", strerror(errno));
        return -1;
    }
    int have = 0;
    for (;;) {
        unsigned char r[20];
        if (read_all(fd, r, 20)) {
            snprintf(why, wl, "reading option reply: %s", strerror(errno));
            return -1;
        }
        uint32_t type = be32(r + 12), len = be32(r + 16);
        if (be64(r) != REPLYMAGIC || be32(r + 8) != OPT_GO || len > 65536) {
            snprintf(why, wl, "bad option reply");
            return -1;
        }
        unsigned char data[65536];
        if (len && read_all(fd, data, len)) {
            snprintf(why, wl, "reading option reply data: %s", strerror(errno));
            return -1;
        }
        if (type == REP_INFO && len >= 12 && data[0] == 0 && data[1] == INFO_EXPORT) {
            info->size = be64(data + 2);
            info->flags = (uint16_t)(data[10] << 8 | data[11]);
            have = 1;
        } else if (type == REP_ACK) {
            if (!have) {
                snprintf(why, wl, "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT");
                return -1;
            }
            return 0;
        } else if (type == REP_ERR_UNSUP) {
            break; /* an older server: NBD_OPT_EXPORT_NAME below */
        } else if (type & 0x80000000u) {
            snprintf(why, wl, "export %.200s refused (error %#x): %.*s", name, type,
                     (int)(len < 200 ? len : 200), (const char *)data);
            return -1;
        }
    }
    if (send_option(fd, OPT_EXPORT_NAME, name, (uint32_t)nlen)) {
        snprintf(why, wl, "sending NBD_OPT_EXPORT_NAME: %s", strerror(errno));
        return -1;
    }
    unsigned char e[10 + 124];
    size_t elen = (cflags & HS_NO_ZEROES) ? 10 : sizeof e;
    if (read_all(fd, e, elen)) {
        snprintf(why, wl, "export %.200s: server closed (unknown export?)", name);
        return -1;
    }
    info->size = be64(e);
    info->flags = (uint16_t)(e[8] << 8 | e[9]);
    return 0;
}

static void set_timeouts(int fd, int seconds)
{
    struct timeval tv = {seconds, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* A connected, negotiated socket, or -1 with a reason in WHY. */
static int open_export(const struct target *t, struct export_info *info, char *why, size_t wl)
{
    int fd = socket(t->family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, IPPROTO_TCP);
    if (fd < 0) {
        snprintf(why, wl, "socket: %s", strerror(errno));
        return -1;
    }
    if (connect(fd, (const struct sockaddr *)&t->addr, t->addrlen) < 0 && errno != EINPROGRESS) {
        snprintf(why, wl, "connect: %s", strerror(errno));
        close(fd);
        return -1;
    }
    struct pollfd p = {fd, POLLOUT, 0};
    int err = 0;
    socklen_t elen = sizeof err;
    if (poll(&p, 1, 5000) != 1 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0 || err) {
        snprintf(why, wl, "connect: %s", err ? strerror(err) : "timed out");
        close(fd);
        return -1;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    int one = 1, idle = 30, intvl = 10, cnt = 3;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
    set_timeouts(fd, 10);
    if (negotiate(fd, t->name, info, why, wl)) {
        close(fd);
        return -1;
    }
    set_timeouts(fd, 0); /* the driver sets its own send timeout */
    return fd;
}

/* ------------------------------------------------------------ generic netlink */

struct nlmsg {
    union {
        struct nlmsghdr h;
        char buf[1024];
    };
};

static void nl_init(struct nlmsg *m, uint16_t type, uint8_t cmd, uint8_t version)
{
    memset(m, 0, sizeof *m);
    m->h.nlmsg_len = NLMSG_LENGTH(GENL_HDRLEN);
    m->h.nlmsg_type = type;
    m->h.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
    struct genlmsghdr *g = NLMSG_DATA(&m->h);
    g->cmd = cmd;
    g->version = version;
}

static struct nlattr *nl_put(struct nlmsg *m, uint16_t type, const void *data, size_t len)
{
    struct nlattr *a = (struct nlattr *)(m->buf + NLMSG_ALIGN(m->h.nlmsg_len));
    a->nla_type = type;
    a->nla_len = (uint16_t)(NLA_HDRLEN + len);
    if (len)
        memcpy((char *)a + NLA_HDRLEN, data, len);
    m->h.nlmsg_len = NLMSG_ALIGN(m->h.nlmsg_len) + NLA_ALIGN(a->nla_len);
    return a;
}

static void nl_u32(struct nlmsg *m, uint16_t type, uint32_t v) { nl_put(m, type, &v, 4); }
static void nl_u64(struct nlmsg *m, uint16_t type, uint64_t v) { nl_put(m, type, &v, 8); }

static void nl_end(struct nlmsg *m, struct nlattr *nest)
{
    nest->nla_len = (uint16_t)(m->buf + m->h.nlmsg_len - (char *)nest);
}

static int nl_sock = -1;
static uint32_t nl_seq;

/* The attribute TYPE among the LEN bytes of attributes at START, or NULL. */
static struct nlattr *attr_find(void *start, int len, uint16_t type)
{
    struct nlattr *a = start;
    while (len >= NLA_HDRLEN && a->nla_len >= NLA_HDRLEN && a->nla_len <= len) {
        if ((a->nla_type & NLA_TYPE_MASK) == type)
            return a;
        len -= NLA_ALIGN(a->nla_len);
        a = (struct nlattr *)((char *)a + NLA_ALIGN(a->nla_len));
    }
    return NULL;
}

static void *attr_data(struct nlattr *a) { return (char *)a + NLA_HDRLEN; }
static int attr_len(struct nlattr *a) { return a->nla_len - NLA_HDRLEN; }

typedef void (*on_reply)(struct nlattr *attrs, int len, void *arg);

/* Send M and read until its ACK, giving each reply's attributes to CB. Returns 0 or a
 * negative errno. */
static int nl_talk(struct nlmsg *m, on_reply cb, void *arg)
{
    m->h.nlmsg_seq = ++nl_seq;
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    if (sendto(nl_sock, m->buf, m->h.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel) < 0)
        return -errno;
    for (;;) {
        char buf[8192];
        ssize_t n = recv(nl_sock, buf, sizeof buf, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n);
             h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_seq != m->h.nlmsg_seq)
                continue;
            if (h->nlmsg_type == NLMSG_ERROR) {
                struct nlmsgerr *e = NLMSG_DATA(h);
                return e->error;
            }
            if (cb)
                cb((struct nlattr *)((char *)NLMSG_DATA(h) + GENL_HDRLEN),
                   (int)h->nlmsg_len - NLMSG_LENGTH(GENL_HDRLEN), arg);
        }
    }
}

static void family_id(struct nlattr *attrs, int len, void *arg)
{
    struct nlattr *a = attr_find(attrs, len, CTRL_ATTR_FAMILY_ID);
    if (a && attr_len(a) >= 2)
        memcpy(arg, attr_data(a), 2);
}

static uint16_t nbd_family;

static int nl_open(void)
{
    nl_sock = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
    if (nl_sock < 0)
        return -errno;
    struct timeval tv = {10, 0};
    setsockopt(nl_sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct nlmsg m;
    nl_init(&m, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1);
    nl_put(&m, CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME, sizeof NBD_GENL_FAMILY_NAME);
    uint16_t id = 0;
    int rc = nl_talk(&m, family_id, &id);
    if (rc)
        return rc;
    if (!id)
        return -ENOENT;
    nbd_family = id;
    return 0;
}

static void device_connected(struct nlattr *attrs, int len, void *arg)
{
    struct nlattr *list = attr_find(attrs, len, NBD_ATTR_DEVICE_LIST);
    struct nlattr *item = list ? attr_find(attr_data(list), attr_len(list), NBD_DEVICE_ITEM) : NULL;
    struct nlattr *c = item ? attr_find(attr_data(item), attr_len(item), NBD_DEVICE_CONNECTED)
                            : NULL;
    if (c && attr_len(c) >= 1)
        *(int *)arg = *(unsigned char *)attr_data(c) ? 1 : 0;
}

static void nl_sockets(struct nlmsg *m, const int *fds, int n)
{
    struct nlattr *socks = nl_put(m, NBD_ATTR_SOCKETS | NLA_F_NESTED, NULL, 0);
    for (int i = 0; i < n; i++) {
        struct nlattr *item = nl_put(m, NBD_SOCK_ITEM | NLA_F_NESTED, NULL, 0);
        nl_u32(m, NBD_SOCK_FD, (uint32_t)fds[i]);
        nl_end(m, item);
    }
    nl_end(m, socks);
}

/* ------------------------------------------------------------------- main */

struct settings {
    struct target t;
    unsigned index, conns;
    uint64_t blocksize;
    unsigned long io_timeout, reconnect;
    int nofork;
};

static void usage(void)
{
    fprintf(stderr, "usage: " PROG " HOST -N NAME [PORT] /dev/nbdN [-b BYTES] [-C N] "
            "[-t SECONDS] [-R SECONDS] [-nofork] [-swap] [-persist] [-systemd-mark]\n"
            "HOST is an IPv4 or IPv6 address. See the comment at the top of the source.\n");
    exit(2);
}

static void parse(int argc, char **argv, struct settings *s)
{
    const char *host = NULL, *port = NULL, *dev = NULL, *name = NULL;
    s->blocksize = 512;
    s->conns = 1;
    s->io_timeout = cmdline_number("icbd.io_timeout", 20);
    s->reconnect = cmdline_number("icbd.reconnect", 600);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-N") || !strcmp(a, "-name")) {
            if (!v)
                usage();
            name = v, i++;
        } else if (!strcmp(a, "-b") || !strcmp(a, "-block-size")) {
            if (!v)
                usage();
            s->blocksize = strtoull(v, NULL, 10), i++;
        } else if (!strcmp(a, "-C") || !strcmp(a, "-connections")) {
            if (!v)
                usage();
            s->conns = (unsigned)strtoul(v, NULL, 10), i++;
        } else if (!strcmp(a, "-t") || !strcmp(a, "-timeout")) {
            if (!v)
                usage();
            s->io_timeout = strtoul(v, NULL, 10), i++;
        } else if (!strcmp(a, "-R")) {
            if (!v)
                usage();
            s->reconnect = strtoul(v, NULL, 10), i++;
        } else if (!strcmp(a, "-nofork")) {
            s->nofork = 1;
        } else if (!strcmp(a, "-swap") || !strcmp(a, "-persist") ||
                   !strcmp(a, "-systemd-mark")) {
            /* what these ask for is what this program always does */
        } else if (a[0] == '-') {
            fprintf(stderr, PROG ": unknown option %s\n", a);
            usage();
        } else if (!host) {
            host = a;
        } else if (!strncmp(a, "/dev/", 5) || !strncmp(a, "nbd", 3)) {
            dev = a;
        } else if (!port) {
            port = a;
        } else {
            usage();
        }
    }
    if (!host || !dev || !name || strlen(name) > 4096 || s->conns < 1 || s->conns > MAX_CONNS)
        usage();
    const char *base = strncmp(dev, "/dev/", 5) ? dev : dev + 5;
    if (strncmp(base, "nbd", 3) || !base[3] || strspn(base + 3, "0123456789") != strlen(base + 3))
        usage();
    s->index = (unsigned)strtoul(base + 3, NULL, 10);
    snprintf(devname, sizeof devname, "%s", base);
    s->t.port = port ? (unsigned)strtoul(port, NULL, 10) : 10809;
    if (!s->t.port || s->t.port > 65535)
        usage();
    snprintf(s->t.host, sizeof s->t.host, "%s", host);
    snprintf(s->t.name, sizeof s->t.name, "%s", name);
    struct sockaddr_in *v4 = (struct sockaddr_in *)&s->t.addr;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&s->t.addr;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = s->t.family = AF_INET;
        v4->sin_port = htons((uint16_t)s->t.port);
        s->t.addrlen = sizeof *v4;
    } else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = s->t.family = AF_INET6;
        v6->sin6_port = htons((uint16_t)s->t.port);
        s->t.addrlen = sizeof *v6;
    } else {
        fprintf(stderr, PROG ": %s is not an IP address (the initramfs has no DNS)\n", host);
        exit(2);
    }
    if (s->blocksize < 512 || s->blocksize > 4096 || (s->blocksize & (s->blocksize - 1)))
        usage();
}

/* May a kernel attached with OLD flags talk to an export that now has NEW flags? */
static int flags_fit(uint16_t old, uint16_t new)
{
    if (!(old & FLAG_READ_ONLY) && (new & FLAG_READ_ONLY))
        return 0;
    return (old & FLAG_COMMANDS & ~new) == 0;
}

/* Connect and negotiate until it works or DEADLINE (monotonic s; 0 = never) passes.
 * Returns the socket, or -1 at the deadline. FIRST: the attached export, or NULL. */
static int connect_retrying(const struct settings *s, const struct export_info *first,
                            struct export_info *got, double deadline)
{
    char why[512], last[512] = "";
    double t0 = now_s();
    unsigned attempts = 0;
    for (;;) {
        attempts++;
        int fd = open_export(&s->t, got, why, sizeof why);
        if (fd >= 0 && first && got->size != first->size) {
            snprintf(why, sizeof why, "export %.200s is now %llu bytes, was %llu: not attaching it",
                     s->t.name, (unsigned long long)got->size, (unsigned long long)first->size);
            close(fd), fd = -1;
        } else if (fd >= 0 && first && !flags_fit(first->flags, got->flags)) {
            snprintf(why, sizeof why, "export %.200s flags %#x do not fit the attached %#x",
                     s->t.name, got->flags, first->flags);
            close(fd), fd = -1;
        }
        if (fd >= 0) {
            if (attempts > 1)
                say("%s:%u/%s answers again after %.1f s (%u attempts)", s->t.host, s->t.port,
                    s->t.name, now_s() - t0, attempts);
            return fd;
        }
        if (strcmp(why, last)) { /* each new reason once, not every attempt */
            say("%s:%u/%s: %s; retrying", s->t.host, s->t.port, s->t.name, why);
            snprintf(last, sizeof last, "%s", why);
        }
        double waited = now_s() - t0;
        if (deadline && now_s() >= deadline)
            return -1;
        /* quick at first (a restart takes seconds), then every 2 s, every 10 s once the
         * held requests have failed anyway */
        double pause = waited < 2 ? 0.25 : waited < (double)s->reconnect ? 2 : 10;
        sleep_s(pause);
    }
}

static int attach(const struct settings *s, const int *fds, const struct export_info *e)
{
    struct nlmsg m;
    nl_init(&m, nbd_family, NBD_CMD_CONNECT, NBD_GENL_VERSION);
    nl_u32(&m, NBD_ATTR_INDEX, s->index);
    nl_u64(&m, NBD_ATTR_SIZE_BYTES, e->size);
    nl_u64(&m, NBD_ATTR_BLOCK_SIZE_BYTES, s->blocksize);
    nl_u64(&m, NBD_ATTR_SERVER_FLAGS, e->flags);
    nl_u64(&m, NBD_ATTR_TIMEOUT, s->io_timeout);
    nl_u64(&m, NBD_ATTR_DEAD_CONN_TIMEOUT, s->reconnect);
    nl_sockets(&m, fds, (int)s->conns);
    return nl_talk(&m, NULL, NULL);
}

/* 1 while the device is attached (NBD_CMD_STATUS), 0 once it was disconnected, -errno. */
static int attached(const struct settings *s)
{
    struct nlmsg m;
    nl_init(&m, nbd_family, NBD_CMD_STATUS, NBD_GENL_VERSION);
    nl_u32(&m, NBD_ATTR_INDEX, s->index);
    int connected = -ENODATA;
    int rc = nl_talk(&m, device_connected, &connected);
    return rc ? rc : connected;
}

static int reconfigure(const struct settings *s, int fd)
{
    struct nlmsg m;
    nl_init(&m, nbd_family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION);
    nl_u32(&m, NBD_ATTR_INDEX, s->index);
    nl_sockets(&m, &fd, 1);
    return nl_talk(&m, NULL, NULL);
}

static void become_daemon(char **argv)
{
    /* '@' first: systemd's shutdown leaves this process alone (a root storage daemon) */
    argv[0][0] = '@';
    prctl(PR_SET_NAME, "icbd-nbd", 0, 0, 0);
    int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (write(fd, "-1000", 5) < 0) {
            /* not fatal */
        }
        close(fd);
    }
    if (mlockall(MCL_CURRENT | MCL_FUTURE) < 0)
        say("mlockall: %s (continuing)", strerror(errno));
    signal(SIGHUP, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
        dup2(null, 0), dup2(null, 1), dup2(null, 2);
        if (null > 2)
            close(null);
    }
    foreground_stderr = 0;
    if (chdir("/") < 0) {
        /* not fatal */
    }
}

int main(int argc, char **argv)
{
    struct settings s;
    memset(&s, 0, sizeof s);
    kmsg = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
    parse(argc, argv, &s);
    int rc = nl_open();
    if (rc) {
        say("the kernel's nbd netlink interface is missing (%s): is nbd loaded?", strerror(-rc));
        return 1;
    }

    /* attach: every connection negotiated, then one NBD_CMD_CONNECT */
    struct export_info first;
    int fds[MAX_CONNS], dups[MAX_CONNS];
    double deadline = now_s() + (double)s.reconnect + 0.001;
    for (unsigned i = 0; i < s.conns; i++) {
        struct export_info e;
        fds[i] = connect_retrying(&s, i ? &first : NULL, &e, deadline);
        if (fds[i] < 0) {
            say("cannot reach %s:%u/%s: giving up", s.t.host, s.t.port, s.t.name);
            return 1;
        }
        if (!i)
            first = e;
    }
    rc = attach(&s, fds, &first);
    if (rc) {
        say("NBD_CMD_CONNECT failed: %s", strerror(-rc));
        return 1;
    }
    say("attached %s:%u/%s: %llu bytes, flags %#x, %u connection(s), io timeout %lu s, "
        "requests held %lu s while the server is away", s.t.host, s.t.port, s.t.name,
        (unsigned long long)first.size, first.flags, s.conns, s.io_timeout, s.reconnect);
    if (!s.reconnect) {
        for (unsigned i = 0; i < s.conns; i++)
            close(fds[i]);
        return 0;
    }

    /* keep a duplicate of each socket: EPOLLHUP on it = the driver gave that one up */
    int ep = epoll_create1(EPOLL_CLOEXEC);
    for (unsigned i = 0; i < s.conns; i++) {
        dups[i] = fds[i]; /* the kernel holds its own reference */
        struct epoll_event ev = {.events = EPOLLRDHUP, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, dups[i], &ev);
    }
    if (!s.nofork) {
        pid_t pid = fork();
        if (pid < 0) {
            say("fork: %s; staying in the foreground", strerror(errno));
        } else if (pid > 0) {
            _exit(0); /* the script goes on; the root is attached */
        } else {
            setsid();
        }
    }
    become_daemon(argv);
    say("watching %u connection(s) as %s", s.conns, argv[0]);

    for (;;) {
        struct epoll_event evs[MAX_CONNS];
        int n = epoll_wait(ep, evs, MAX_CONNS, 5000);
        if (n < 0 && errno != EINTR) {
            say("epoll_wait: %s", strerror(errno));
            sleep_s(1);
        }
        int lost = 0;
        for (unsigned i = 0; i < s.conns; i++) {
            struct pollfd p = {dups[i], POLLRDHUP, 0};
            if (poll(&p, 1, 0) != 1 || !(p.revents & (POLLHUP | POLLERR)))
                continue; /* alive (a half-closed one waits for the driver to give it up) */
            lost++;
            if (attached(&s) == 0) {
                say("%s was disconnected: exiting", devname);
                return 0;
            }
            double t0 = now_s();
            say("connection %u to %s:%u lost; reconnecting (requests are held up to %lu s)", i,
                s.t.host, s.t.port, s.reconnect);
            for (;;) {
                struct export_info e;
                int fd = connect_retrying(&s, &first, &e, 0);
                rc = reconfigure(&s, fd);
                if (!rc) {
                    epoll_ctl(ep, EPOLL_CTL_DEL, dups[i], NULL);
                    close(dups[i]);
                    dups[i] = fd;
                    struct epoll_event ev = {.events = EPOLLRDHUP, .data.u32 = i};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                    say("reconnected to %s:%u/%s after %.1f s", s.t.host, s.t.port, s.t.name,
                        now_s() - t0);
                    break;
                }
                close(fd);
                if (attached(&s) == 0) {
                    say("%s was disconnected: exiting", devname);
                    return 0;
                }
                say("NBD_CMD_RECONFIGURE failed: %s; retrying", strerror(-rc));
                sleep_s(2);
            }
        }
        if (n > 0 && !lost)
            sleep_s(0.1); /* half-closed: EPOLLRDHUP stays ready until the driver notices */
    }
}
