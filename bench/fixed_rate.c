/*
 * The engine of bench/fixed_rate.py in C: an open-loop (fixed-rate) HTTP/1.1 client.
 *
 * Why C: the Python engine costs about 0.13 ms of CPU per request (measured: 6.3 s of CPU
 * for 50,000 requests at 5,000/s), so on a 2-core machine at a few thousand requests a
 * second the client itself takes a third of the machine from the server it measures, and
 * the server's latency percentiles then measure the contention the client causes.  wrk
 * (C) is the peer for the maximum rate; Debian has no wrk2.  This engine uses a few
 * microseconds per request.
 *
 *   fixed_rate_c HOST PORT REQUEST_FILE RATE DURATION CONNECTIONS DRAIN PRIME LATENCY_OUT
 *
 * REQUEST_FILE holds the whole request (head and body), sent as is on every request.
 * Request i is scheduled at t0 + i / RATE; it goes out on an idle keep-alive connection,
 * or, if every connection is busy, on the next one to finish (one request in flight per
 * connection, no pipelining); its latency counts from its scheduled time to the last
 * octet of the response (corrected for coordinated omission, as wrk2 does).  Responses
 * need Content-Length.  PRIME=1 first sends one unmeasured request on every connection,
 * 64 at a time.  Writes every latency (seconds, float64, completion order) to LATENCY_OUT
 * and one JSON line of counts to stdout; fixed_rate.py computes the percentiles.
 * Bounded: DURATION + DRAIN seconds after the connections are open (and 120 s for the
 * priming).  Loopback is enforced by the caller.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { IDLE, CONNECTING, BUSY, DEAD };

struct conn {
    int fd, state;
    double sched;          /* scheduled time of the request in flight */
    size_t sent;           /* octets of the request written so far */
    char *buf;             /* response octets read so far */
    size_t len, cap;
    long need;             /* octets of the whole response, -1 until its head is read */
    int measured;          /* the request in flight counts (not a priming one) */
};

static const char *request;
static size_t request_len;
static int epfd;
static struct conn *conns;
static int nconns;
static int *idle, nidle;                 /* stack of idle connection indexes */
static double *waiting;                  /* scheduled times waiting for a connection */
static long wait_head, wait_tail;
static double *lat;
static long nlat, cap_lat;
static long statuses[600], other_status, nerr_closed, nerr_reset, nerr_connect, nerr_other,
            nerr_badresp, answered_prime;

/* realloc, or the end of the run: a benchmark client out of memory has nothing to report. */
static void *grow(void *p, size_t size)
{
    p = realloc(p, size);
    if (!p) {
        perror("realloc");
        exit(2);
    }
    return p;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void arm(struct conn *c, uint32_t events)
{
    struct epoll_event ev = { .events = events, .data.ptr = c };
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void kill_conn(struct conn *c, int err)
{
    if (c->state == BUSY && c->measured) {
        if (err == ECONNRESET || err == EPIPE)
            nerr_reset++;
        else if (err == 0)
            nerr_closed++;
        else
            nerr_other++;
    } else if (c->state == CONNECTING) {
        nerr_connect++;
    }
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->state = DEAD;
}

static void push_out(struct conn *c)
{
    while (c->sent < request_len) {
        ssize_t n = write(c->fd, request + c->sent, request_len - c->sent);
        if (n < 0) {
            if (errno == EAGAIN) {
                arm(c, EPOLLIN | EPOLLOUT);
                return;
            }
            if (errno == EINTR)
                continue;
            kill_conn(c, errno);
            return;
        }
        c->sent += (size_t)n;
    }
    arm(c, EPOLLIN);
}

static void send_on(struct conn *c, double sched, int measured)
{
    c->state = BUSY;
    c->sched = sched;
    c->sent = 0;
    c->len = 0;
    c->need = -1;
    c->measured = measured;
    push_out(c);
}

/* The connection is free: the next waiting request goes out on it, or it goes idle. */
static void release(struct conn *c)
{
    if (wait_head < wait_tail) {
        send_on(c, waiting[wait_head++], 1);
    } else {
        c->state = IDLE;
        idle[nidle++] = (int)(c - conns);
    }
}

/* Content-Length of a response head (case-insensitive), -1 if absent. */
static long content_length(const char *head, size_t n)
{
    static const char key[] = "\r\ncontent-length:";
    size_t k = sizeof key - 1;
    for (size_t i = 0; i + k <= n; i++) {
        if (strncasecmp(head + i, key, k) == 0) {
            const char *p = head + i + k;
            while (*p == ' ' || *p == '\t')
                p++;
            return strtol(p, NULL, 10);
        }
    }
    return -1;
}

static void readable(struct conn *c, int releasing)
{
    for (;;) {
        if (c->cap - c->len < 4096) {
            c->cap = c->cap * 2 + 8192;
            c->buf = grow(c->buf, c->cap);
        }
        ssize_t n = read(c->fd, c->buf + c->len, c->cap - c->len - 1);
        if (n == 0) {
            kill_conn(c, 0);
            return;
        }
        if (n < 0) {
            if (errno == EAGAIN)
                return;
            if (errno == EINTR)
                continue;
            kill_conn(c, errno);
            return;
        }
        c->len += (size_t)n;
        c->buf[c->len] = 0;
        if (c->state != BUSY) {         /* octets nobody asked for: dropped */
            c->len = 0;
            continue;
        }
        if (c->need < 0) {
            char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
            if (!end)
                continue;
            long cl = content_length(c->buf, (size_t)(end - c->buf) + 2);
            if (cl < 0 || c->len < 12) {
                nerr_badresp++;
                kill_conn(c, EPROTO);
                return;
            }
            c->need = (end - c->buf) + 4 + cl;
        }
        if ((long)c->len >= c->need) {
            int status = atoi(c->buf + 9);
            size_t rest = c->len - (size_t)c->need;
            memmove(c->buf, c->buf + c->need, rest);
            c->len = rest;
            c->need = -1;
            if (c->measured) {
                if (nlat == cap_lat) {
                    cap_lat = cap_lat * 2 + 1024;
                    lat = grow(lat, cap_lat * sizeof *lat);
                }
                lat[nlat++] = now() - c->sched;
                if (status >= 0 && status < 600)
                    statuses[status]++;
                else
                    other_status++;
            } else {
                answered_prime++;
            }
            if (releasing)
                release(c);
            else
                c->state = IDLE;
        }
    }
}

/* Handle what is ready, waiting at most timeout_s (microsecond precision: at thousands of
 * requests a second a millisecond timer would send them late, in bursts). */
static void events(double timeout_s, int releasing)
{
    struct epoll_event evs[256];
    if (timeout_s < 0)
        timeout_s = 0;
    struct timespec ts = { .tv_sec = (time_t)timeout_s,
                           .tv_nsec = (long)((timeout_s - (time_t)timeout_s) * 1e9) };
    int n = epoll_pwait2(epfd, evs, 256, &ts, NULL);
    for (int i = 0; i < n; i++) {
        struct conn *c = evs[i].data.ptr;
        if (c->state == DEAD)
            continue;
        if (c->state == CONNECTING) {
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err) {
                kill_conn(c, err);
                continue;
            }
            c->state = IDLE;
            idle[nidle++] = (int)(c - conns);
            arm(c, EPOLLIN);
            continue;
        }
        if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
            readable(c, releasing);
        if (c->state == BUSY && (evs[i].events & EPOLLOUT))
            push_out(c);
    }
}

static long alive(void)
{
    long n = 0;
    for (int i = 0; i < nconns; i++)
        n += conns[i].state != DEAD;
    return n;
}

int main(int argc, char **argv)
{
    if (argc != 10) {
        fprintf(stderr, "usage: %s HOST PORT REQUEST_FILE RATE DURATION CONNECTIONS DRAIN "
                        "PRIME LATENCY_OUT\n", argv[0]);
        return 2;
    }
    const char *host = argv[1], *port = argv[2];
    double rate = atof(argv[4]), duration = atof(argv[5]), drain = atof(argv[7]);
    nconns = atoi(argv[6]);
    int prime = atoi(argv[8]);
    if (rate <= 0 || duration <= 0 || nconns <= 0) {
        fprintf(stderr, "fixed_rate_c: RATE, DURATION and CONNECTIONS must be positive\n");
        return 2;
    }
    FILE *rf = fopen(argv[3], "rb");
    if (!rf) {
        perror(argv[3]);
        return 2;
    }
    static char reqbuf[4 << 20];
    request_len = fread(reqbuf, 1, sizeof reqbuf, rf);
    fclose(rf);
    request = reqbuf;

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)nconns + 64) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST }, *ai;
    if (getaddrinfo(host, port, &hints, &ai) != 0) {
        fprintf(stderr, "fixed_rate_c: bad address %s:%s\n", host, port);
        return 2;
    }
    epfd = epoll_create1(0);
    conns = calloc(nconns, sizeof *conns);
    idle = calloc(nconns, sizeof *idle);
    long total = (long)(rate * duration);
    waiting = calloc(total + 1, sizeof *waiting);
    if (!conns || !idle || !waiting) {
        perror("calloc");
        return 2;
    }
    /* Open every connection (at most 256 connects pending at once). */
    int opened = 0;
    double deadline = now() + 120;
    while (opened < nconns && now() < deadline) {
        int pending = 0;
        for (int i = 0; i < opened; i++)
            pending += conns[i].state == CONNECTING;
        while (opened < nconns && pending < 256) {
            struct conn *c = &conns[opened++];
            c->fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK, 0);
            if (c->fd < 0) {
                nerr_connect++;
                c->state = DEAD;
                continue;
            }
            int one = 1;
            setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            c->state = CONNECTING;
            c->need = -1;
            struct epoll_event ev = { .events = EPOLLOUT, .data.ptr = c };
            epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
            if (connect(c->fd, ai->ai_addr, ai->ai_addrlen) < 0 && errno != EINPROGRESS)
                kill_conn(c, errno);
            pending++;
        }
        events(0.01, 0);
    }
    while (nidle < alive() && now() < deadline)
        events(0.01, 0);
    freeaddrinfo(ai);
    long n_open = nidle;

    if (prime) {                       /* one unmeasured request per connection */
        int next = 0, total_idle = nidle;
        int *order = malloc(sizeof(int) * (total_idle + 1));
        memcpy(order, idle, sizeof(int) * total_idle);
        nidle = 0;
        deadline = now() + 120;
        while (now() < deadline) {
            long busy = 0;
            for (int i = 0; i < nconns; i++)
                busy += conns[i].state == BUSY;
            while (next < total_idle && busy < 64) {
                send_on(&conns[order[next++]], now(), 0);
                busy++;
            }
            if (next == total_idle && busy == 0)
                break;
            events(0.01, 0);
        }
        nidle = 0;
        for (int i = 0; i < nconns; i++)
            if (conns[i].state == IDLE)
                idle[nidle++] = i;
        free(order);
    }

    double t0 = now() + 0.05;
    long i = 0;
    while (i < total) {
        double t = now();
        long due = t >= t0 ? (long)((t - t0) * rate) + 1 : 0;
        if (due > total)
            due = total;
        for (; i < due; i++) {
            double sched = t0 + i / rate;
            if (nidle > 0)
                send_on(&conns[idle[--nidle]], sched, 1);
            else
                waiting[wait_tail++] = sched;
        }
        if (i >= total)
            break;
        double next = t0 + i / rate - now();       /* the next request's time */
        events(next > 0.001 ? 0.001 : next, 1);
    }
    double end = now() + drain;
    while (nlat + nerr_closed + nerr_reset + nerr_other + nerr_badresp < total && now() < end
           && alive() > 0)
        events(0.01, 1);
    double elapsed = now() - t0;

    FILE *lf = fopen(argv[9], "wb");
    if (!lf || fwrite(lat, sizeof *lat, nlat, lf) != (size_t)nlat || fclose(lf) != 0) {
        perror(argv[9]);
        return 2;
    }
    printf("{\"scheduled\": %ld, \"sent\": %ld, \"completed\": %ld, \"elapsed\": %.6f, "
           "\"opened\": %ld, \"primed\": %ld, \"statuses\": {", total, i - (wait_tail - wait_head),
           nlat, elapsed, n_open, answered_prime);
    int first = 1;
    for (int s = 0; s < 600; s++)
        if (statuses[s]) {
            printf("%s\"%d\": %ld", first ? "" : ", ", s, statuses[s]);
            first = 0;
        }
    if (other_status)
        printf("%s\"other\": %ld", first ? "" : ", ", other_status);
    printf("}, \"errors\": {");
    first = 1;
    const char *names[] = {"connection closed", "connection reset", "connect failed",
                           "other socket error", "response without Content-Length"};
    long counts[] = {nerr_closed, nerr_reset, nerr_connect, nerr_other, nerr_badresp};
    for (int k = 0; k < 5; k++)
        if (counts[k]) {
            printf("%s\"%s\": %ld", first ? "" : ", ", names[k], counts[k]);
            first = 0;
        }
    printf("}}\n");
    return 0;
}
