/*
 * ledge-lab-tool: a small static helper for the device tests (tests/linux_devices.rs) that runs
 * both in the Linux guest (AF_VSOCK) and in the lab's L1 host (the hybrid-vsock Unix sockets and
 * the control API socket). Busybox has neither AF_VSOCK nor an HTTP-over-Unix-socket client.
 *
 *   ledge-lab-tool listen PORT COUNT          guest: echo server on vsock PORT, one child per
 *                                             connection, exits after COUNT connections ended
 *   ledge-lab-tool uds-echo PATH COUNT        host: the same on Unix socket PATH (the guest's
 *                                             connections to host port P arrive on <uds>_P)
 *   ledge-lab-tool bulk vsock CID PORT BYTES SEED
 *   ledge-lab-tool bulk uds UDS PORT BYTES SEED
 *                                             send BYTES of a pseudo-random stream (SEED) to an
 *                                             echo server while reading the echo back (poll), then
 *                                             half-close and read to EOF; "uds" connects through
 *                                             the hybrid handshake (CONNECT PORT / OK hostport)
 *   ledge-lab-tool http UDS METHOD PATH [BODY]
 *                                             one HTTP/1.1 request over a Unix socket; prints
 *                                             "HTTP <status> <body on one line>"
 *
 * Every result is one line starting with an upper-case tag, for the test to parse:
 *   ECHO side=guest|host bytes=N
 *   BULK mode=M port=P seed=S sent=N recv=N sent_fnv=H recv_fnv=H usecs=U
 * Checksums are FNV-1a 64 over the bytes sent and the bytes received. Exit status 0 on success.
 * Connects are retried for up to 120 s (the peer may not listen yet).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define RETRY_SECS 120

static int fail(const char *what)
{
    printf("ERROR %s: %s\n", what, strerror(errno));
    fflush(stdout);
    return 1;
}

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Echoes until end of file, then closes. Returns bytes echoed or -1. */
static long echo(int fd)
{
    static char buf[65536];
    long total = 0;
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0)
            break;
        if (write_all(fd, buf, (size_t)n) < 0)
            return -1;
        total += n;
    }
    close(fd);
    return total;
}

/* Accepts COUNT connections on a listening socket, echoing each in a child. */
static int serve(int lfd, int count, const char *side)
{
    for (int i = 0; i < count; i++) {
        int c = accept(lfd, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR) {
                i--;
                continue;
            }
            return fail("accept");
        }
        pid_t pid = fork();
        if (pid < 0)
            return fail("fork");
        if (pid == 0) {
            close(lfd);
            long n = echo(c);
            printf("ECHO side=%s bytes=%ld%s\n", side, n, n < 0 ? " error" : "");
            fflush(stdout);
            _exit(n < 0);
        }
        close(c);
    }
    close(lfd);
    int failed = 0, st;
    while (wait(&st) > 0)
        failed += !WIFEXITED(st) || WEXITSTATUS(st) != 0;
    return failed != 0;
}

static int uds_connect_once(const char *path)
{
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

/* Hybrid vsock: "CONNECT port\n" -> "OK hostport\n". Reads byte by byte so that no payload
 * after the line is consumed. Returns the fd, or -1 (errno set). */
static int hybrid_connect_once(const char *uds, const char *port)
{
    int fd = uds_connect_once(uds);
    if (fd < 0)
        return -1;
    char line[64];
    int n = snprintf(line, sizeof line, "CONNECT %s\n", port);
    if (write_all(fd, line, (size_t)n) < 0) {
        close(fd);
        return -1;
    }
    size_t got = 0;
    while (got < sizeof line - 1) {
        ssize_t r = read(fd, line + got, 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            close(fd);
            errno = r == 0 ? ECONNREFUSED : errno;
            return -1;
        }
        if (line[got] == '\n')
            break;
        got++;
    }
    line[got] = 0;
    if (strncmp(line, "OK ", 3) != 0) {
        close(fd);
        errno = EPROTO;
        return -1;
    }
    return fd;
}

static int vsock_connect_once(unsigned cid, unsigned port)
{
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

static void fnv(uint64_t *h, const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        *h ^= p[i];
        *h *= 1099511628211ull;
    }
}

/* Sends `bytes` of the stream and reads the echo at the same time. */
static int bulk(int fd, const char *mode, const char *port, long bytes, unsigned long seed,
                uint64_t t0)
{
    static unsigned char out[65536], in[65536];
    uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1, hs = 1469598103934665603ull,
             hr = 1469598103934665603ull;
    long sent = 0, recvd = 0;
    size_t out_len = 0, out_off = 0;
    int wr_open = 1;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    for (;;) {
        if (wr_open && out_off == out_len && sent == bytes) {
            shutdown(fd, SHUT_WR);
            wr_open = 0;
        }
        struct pollfd p = {.fd = fd, .events = POLLIN | (wr_open ? POLLOUT : 0)};
        int pr = poll(&p, 1, 60000);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr <= 0) {
            printf("ERROR bulk mode=%s port=%s seed=%lu stalled: sent=%ld recv=%ld\n", mode, port,
                   seed, sent, recvd);
            return 3;
        }
        if (wr_open && (p.revents & POLLOUT)) {
            if (out_off == out_len) {
                long chunk = bytes - sent < (long)sizeof out ? bytes - sent : (long)sizeof out;
                for (long i = 0; i < chunk; i += 8) {
                    uint64_t v = xorshift(&state);
                    memcpy(out + i, &v, chunk - i < 8 ? (size_t)(chunk - i) : 8);
                }
                out_len = (size_t)chunk;
                out_off = 0;
            }
            ssize_t n = write(fd, out + out_off, out_len - out_off);
            if (n < 0 && errno != EAGAIN && errno != EINTR)
                return fail("write");
            if (n > 0) {
                fnv(&hs, out + out_off, (size_t)n);
                out_off += (size_t)n;
                sent += n;
            }
        }
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = read(fd, in, sizeof in);
            if (n < 0 && errno != EINTR && errno != EAGAIN)
                return fail("read");
            if (n == 0)
                break;
            if (n > 0) {
                fnv(&hr, in, (size_t)n);
                recvd += n;
            }
        }
    }
    close(fd);
    printf("BULK mode=%s port=%s seed=%lu sent=%ld recv=%ld sent_fnv=%016llx recv_fnv=%016llx "
           "usecs=%llu\n",
           mode, port, seed, sent, recvd, (unsigned long long)hs, (unsigned long long)hr,
           (unsigned long long)(now_us() - t0));
    return sent == bytes && recvd == bytes && hs == hr ? 0 : 4;
}

static int http(const char *uds, const char *method, const char *path, const char *body)
{
    int fd = uds_connect_once(uds);
    if (fd < 0)
        return fail("connect");
    char req[4096];
    int n;
    if (body)
        n = snprintf(req, sizeof req,
                     "%s %s HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
                     "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                     method, path, strlen(body), body);
    else
        n = snprintf(req, sizeof req,
                     "%s %s HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n",
                     method, path);
    if (n < 0 || (size_t)n >= sizeof req || write_all(fd, req, (size_t)n) < 0)
        return fail("write");
    static char resp[65536];
    size_t got = 0;
    struct pollfd p = {.fd = fd, .events = POLLIN};
    while (got < sizeof resp - 1) {
        if (poll(&p, 1, 10000) <= 0)
            break;
        ssize_t r = read(fd, resp + got, sizeof resp - 1 - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += (size_t)r;
        /* Stop once the whole body (Content-Length) is in: the server may keep the
         * connection open. */
        resp[got] = 0;
        char *hdr_end = strstr(resp, "\r\n\r\n");
        if (hdr_end) {
            char *cl = strcasestr(resp, "content-length:");
            size_t want = cl && cl < hdr_end ? strtoul(cl + 15, NULL, 10) : 0;
            if ((size_t)(resp + got - (hdr_end + 4)) >= want)
                break;
        }
    }
    resp[got] = 0;
    close(fd);
    int status = 0;
    if (sscanf(resp, "HTTP/1.%*d %d", &status) != 1) {
        printf("HTTP 0 (no status line)\n");
        return 1;
    }
    char *b = strstr(resp, "\r\n\r\n");
    b = b ? b + 4 : resp + got;
    for (char *c = b; *c; c++)
        if (*c == '\n' || *c == '\r')
            *c = ' ';
    printf("HTTP %d %s\n", status, b);
    return status >= 200 && status < 300 ? 0 : 2;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 4 && strcmp(argv[1], "listen") == 0) {
        int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (fd < 0)
            return fail("socket(AF_VSOCK)");
        struct sockaddr_vm a = {.svm_family = AF_VSOCK,
                                .svm_cid = VMADDR_CID_ANY,
                                .svm_port = (unsigned)atoi(argv[2])};
        if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
            return fail("bind");
        if (listen(fd, 64) < 0)
            return fail("listen");
        return serve(fd, atoi(argv[3]), "guest");
    }
    if (argc == 4 && strcmp(argv[1], "uds-echo") == 0) {
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        snprintf(a.sun_path, sizeof a.sun_path, "%s", argv[2]);
        unlink(argv[2]);
        if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
            return fail("bind");
        if (listen(fd, 64) < 0)
            return fail("listen");
        return serve(fd, atoi(argv[3]), "host");
    }
    if (argc == 7 && strcmp(argv[1], "bulk") == 0) {
        const char *mode = argv[2];
        long bytes = atol(argv[5]);
        unsigned long seed = strtoul(argv[6], NULL, 10);
        uint64_t t0 = now_us();
        int fd = -1;
        while (fd < 0) {
            if (strcmp(mode, "vsock") == 0)
                fd = vsock_connect_once((unsigned)atoi(argv[3]), (unsigned)atoi(argv[4]));
            else if (strcmp(mode, "uds") == 0)
                fd = hybrid_connect_once(argv[3], argv[4]);
            else
                return 64;
            if (fd < 0) {
                if (now_us() - t0 > RETRY_SECS * 1000000ull)
                    return fail("connect");
                usleep(200000);
            }
        }
        return bulk(fd, mode, argv[4], bytes, seed, now_us());
    }
    if ((argc == 5 || argc == 6) && strcmp(argv[1], "http") == 0)
        return http(argv[2], argv[3], argv[4], argc == 6 ? argv[5] : NULL);
    fprintf(stderr, "usage: see the header of ledge-lab-tool.c\n");
    return 64;
}
