"""The configuration schema: every key declared once, with type, default, bounds and doc.

The TOML file mirrors these Structs section by section.  ``mta check-config``
and ``mta serve`` decode the file with msgspec (unknown keys are errors, so a
typo is caught), then :func:`mta.config.resolve` checks the cross-field rules
and derives paths and counts (both through :func:`mta.config.load`).
``mta.example.toml`` at the top of the repository is generated from these
declarations, the keys of the arrays of tables included (``mta print-config
--example``, :func:`mta.config.example_toml`) and a test keeps them in sync.

A value of 0 for a process count means "size to the machine" (see each key).
"""
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from mta.dkim import DkimConfig

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def _doc(text: str, **bounds) -> Meta:
    return Meta(description=text, **bounds)


class ServerConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    state_dir: Annotated[str, _doc(
        "directory for the spool and runtime sockets; relative paths are taken "
        "from the working directory")] = "mta-state"
    hostname: Annotated[str, _doc(
        "name used in the SMTP greeting and Received headers, in ASCII (an "
        "internationalised name in its xn-- form); empty means the machine's host name "
        "(no DNS lookup is made)")] = ""
    log_level: Annotated[str, _doc(
        "diagnostic log level on stderr: debug, info, warning or error")] = "info"
    shutdown_timeout: Annotated[float, _doc(
        "seconds SIGTERM waits for SMTP sessions in flight to finish", ge=0, le=3600)] = 30.0
    restart_backoff_max: Annotated[float, _doc(
        "longest wait, in seconds, before restarting a child that keeps dying",
        ge=0.1, le=600)] = 30.0
    ready_timeout: Annotated[float, _doc(
        "seconds a starting child may take to report ready", ge=1, le=3600)] = 60.0
    reload_handover_timeout: Annotated[float, _doc(
        "seconds a reload waits, for all the acceptors it replaces together, for them to "
        "close their listening sockets (shared with their successors; until then one may "
        "still greet a client with the configuration replaced) before it reports the "
        "reload done anyway "
        "(0: not waited for); a responsive acceptor takes milliseconds", ge=0, le=3600)] = 5.0
    proxy_protocol_from: Annotated[list[str], _doc(
        "networks of the TCP load balancers in front of the SMTP and HTTP listeners "
        "(HAProxy with send-proxy or send-proxy-v2): a connection from one must begin "
        "with a PROXY protocol header (v1 or v2), and the client it names is the client "
        "(relay_networks, per-IP limits, Received, events, the API's loopback rule); "
        "without one within proxy_protocol_timeout it is closed; a header from any other "
        "client is refused (SMTP 421, HTTP 400) and logged.  Empty: no PROXY header is "
        "taken")] = msgspec.field(default_factory=list)
    proxy_protocol_timeout: Annotated[float, _doc(
        "seconds a connection from a proxy_protocol_from network may take to send its "
        "PROXY header before it is closed (Postfix's smtpd_upstream_proxy_timeout); "
        "such connections count against max_connections while they wait",
        ge=0.1, le=300)] = 5.0
    event_log: Annotated[str, _doc(
        "JSON-lines event log in SparkPost's message-event shape (injection, delivery, "
        "delay, bounce), written by the events process and rotated as [events] says; "
        "relative paths are inside state_dir; empty disables it")] = \
        "log/events.jsonl"


class SmtpConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    listen: Annotated[list[str], _doc(
        "addresses the SMTP acceptors listen on, as host:port ([v6]:port for IPv6; an "
        "IPv6 listener takes IPv6 clients only: list 0.0.0.0:25 beside [::]:25)")] = msgspec.field(
        default_factory=lambda: ["127.0.0.1:2525"])
    acceptors: Annotated[int, _doc(
        "SMTP acceptor processes, each with its own SO_REUSEPORT socket; 0 = one per two "
        "CPUs (at least one)",
        ge=0, le=256)] = 0
    banner: Annotated[str, _doc(
        "text after the host name in the 220 greeting")] = "ESMTP"
    max_connections: Annotated[int, _doc(
        "concurrent connections per acceptor; more get 421", ge=1, le=1_000_000)] = 2000
    max_connections_per_ip: Annotated[int, _doc(
        "concurrent connections from one client (an IPv4 address, an IPv6 network of "
        "ipv6_client_prefix bits) per acceptor; more get 421",
        ge=1, le=1_000_000)] = 200
    ipv6_client_prefix: Annotated[int, _doc(
        "an IPv6 client counts as its network of this many bits for max_connections_per_ip "
        "and max_auth_failures (and http.max_connections_per_ip) (an IPv6 host usually has a /64 to itself and could take a "
        "new address for each connection); 128: per address. IPv4 clients count per "
        "address", ge=32, le=128)] = 64
    max_command_line: Annotated[int, _doc(
        "longest command line in octets including CRLF (RFC 5321: at least 512)",
        ge=512, le=65536)] = 2048
    max_text_line: Annotated[int, _doc(
        "longest message text line in octets including CRLF (RFC 5321: 1000); "
        "longer lines are rejected with 550 5.6.0", ge=1000, le=1 * MiB)] = 1000
    max_message_size: Annotated[int, _doc(
        "largest message in octets, advertised as SIZE; larger gets 552 5.3.4",
        ge=1 * KiB, le=2 * GiB - 1)] = 50 * MiB
    max_recipients: Annotated[int, _doc(
        "recipients per message; more get 452 4.5.3 (RFC 5321: at least 100)",
        ge=100, le=100_000)] = 1000
    max_errors: Annotated[int, _doc(
        "error replies in one session before it is closed with 421", ge=1, le=10_000)] = 20
    max_junk_commands: Annotated[int, _doc(
        "NOOP, RSET, VRFY and HELP commands in a session since its last message was queued; "
        "past them each one counts as an error (max_errors), so that a client that only "
        "talks is closed (Postfix's smtpd_junk_command_limit)", ge=1, le=1_000_000)] = 100
    max_auth_failures: Annotated[int, _doc(
        "failed AUTH attempts (535) from one client (as max_connections_per_ip counts it) "
        "within auth_failure_window, "
        "per acceptor; past them AUTH from it gets 454 4.7.0 without a password check "
        "until the window has passed (a bound on password guessing across connections)",
        ge=1, le=1_000_000)] = 10
    auth_failure_window: Annotated[float, _doc(
        "seconds from a client's first failed AUTH attempt in which "
        "max_auth_failures count", ge=1, le=86400)] = 300.0
    max_hops: Annotated[int, _doc(
        "Received header fields a message may arrive with; more is a mail loop and gets "
        "554 5.4.6 at the end of DATA (Postfix's hopcount_limit; RFC 5321 6.3)",
        ge=1, le=10_000)] = 50
    command_timeout: Annotated[float, _doc(
        "seconds to wait for the next command (RFC 5321 4.5.3.2: 5 minutes)",
        ge=1, le=3600)] = 300.0
    data_timeout: Annotated[float, _doc(
        "seconds to wait for the next piece of DATA or BDAT content "
        "(RFC 5321 4.5.3.2: 3 minutes)", ge=1, le=3600)] = 180.0
    spool_timeout: Annotated[float, _doc(
        "seconds to wait for the spool to confirm a message is on disk before "
        "answering 451 4.3.0", ge=0.1, le=600)] = 20.0
    relay_networks: Annotated[list[str], _doc(
        "client networks allowed to relay to any domain without authenticating")] = msgspec.field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    tls_certificate: Annotated[str, _doc(
        "PEM certificate chain for STARTTLS; empty disables STARTTLS and AUTH")] = ""
    tls_key: Annotated[str, _doc("PEM private key for tls_certificate")] = ""
    auth_file: Annotated[str, _doc(
        "file of 'user:pbkdf2_sha256$iterations$salt$hash' lines (make them with "
        "'mta passwd'); AUTH PLAIN/LOGIN is offered only over TLS and only when set")] = ""
    linger_timeout: Annotated[float, _doc(
        "seconds a session being closed by the server (421, or 221 after QUIT) keeps "
        "reading and discarding what the client still sends after the reply, so that the "
        "client reads the reply instead of a connection reset; then (over TLS too) it is "
        "aborted if still open; 0 closes at once (aborted after 5 s if its last replies "
        "are not written)",
        ge=0, le=60)] = 2.0
    postmaster: Annotated[str, _doc(
        "address that RCPT TO:<Postmaster> (no domain, any case; RFC 5321 4.5.1) is "
        "delivered to; empty: postmaster@ server.hostname. Relay rules apply to it like "
        "to any recipient", pattern=r"^$|^[^@\s<>]+@[^@\s<>]+$")] = ""
    max_buffered_input: Annotated[int, _doc(
        "octets of pipelined input buffered per session before reading pauses",
        ge=4 * KiB, le=64 * MiB)] = 256 * KiB
    add_missing_headers: Annotated[str, _doc(
        "add a Message-ID (<queue id@server.hostname>) and a Date (UTC) to SMTP mail whose "
        "header block has none, after the Received field and before DKIM signing (as "
        "Postfix's always_add_missing_headers and local_header_rewrite_clients do; RFC "
        "6409 8.2, 8.3): \"off\" sends the message as it came (only Received is added); "
        "\"local\" for loopback clients (127.0.0.0/8, ::1; the client a PROXY header "
        "names); \"all\" for every client (all relayed mail comes from relay_networks or "
        "authenticated clients). Mail over HTTP always gets both",
        pattern="^(off|local|all)$")] = "off"


class SpoolConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    shards: Annotated[int, _doc(
        "spool writer processes (shards); 0 = one per four CPUs (a shard is "
        "fsync-bound; fewer shards make bigger group commits). The spool keeps the "
        "shard count it was created with",
        ge=0, le=256)] = 0
    directory: Annotated[str, _doc(
        "spool directory; relative paths are inside server.state_dir")] = "spool"
    segment_size: Annotated[int, _doc(
        "octets written to a segment file before a new one is started",
        ge=1 * MiB, le=4 * GiB)] = 64 * MiB
    recovery_slice: Annotated[int, _doc(
        "records read from the segment files between two looks at the bus while a shard "
        "rebuilds its queue at start: it takes new mail (written to a new segment) while "
        "it reads the old ones, and delivers once it has read them all",
        ge=1, le=10_000_000)] = 2000
    max_batch_messages: Annotated[int, _doc(
        "most messages written and fsynced as one group commit", ge=1, le=100_000)] = 1024
    max_batch_bytes: Annotated[int, _doc(
        "most octets written as one group commit", ge=64 * KiB, le=1 * GiB)] = 32 * MiB
    queue_high_water: Annotated[int, _doc(
        "the bus's high-water mark: requests an acceptor has unanswered at a shard "
        "(beyond, its messages get 451) and frames a shard holds read from the acceptors; "
        "messages queued between a shard and a delivery process (ZeroMQ)",
        ge=1, le=1_000_000)] = 10_000
    min_free_bytes: Annotated[int, _doc(
        "below this much free space on the spool file system MAIL gets 452 4.3.1",
        ge=0)] = 256 * MiB
    min_free_percent: Annotated[float, _doc(
        "below this percentage of free space MAIL gets 452 4.3.1", ge=0, le=100)] = 0.0
    compact_live_ratio: Annotated[float, _doc(
        "the oldest segment is rewritten once fewer than this fraction of its "
        "messages are still queued", ge=0, le=1)] = 0.25
    fsync: Annotated[bool, _doc(
        "fdatasync before acknowledging; turning this off loses mail on power loss "
        "and exists only for benchmarks")] = True
    preallocate: Annotated[bool, _doc(
        "write each new segment into a file already allocated and written: a finished "
        "segment's file, reused, else one zero-filled ahead of use by a background "
        "thread; so that a group commit's fdatasync writes only data, not the file's size "
        "and block map (an idle fsync about twice as fast on ext4; costs up to two spare "
        "segments of disk). "
        "Off, the full-speed acceptance rate was 13 % lower, but under a sustained "
        "load at about half of it the p99 was lower (bench/RESULTS.md)")] = True


class HttpConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    listen: Annotated[list[str], _doc(
        "addresses the HTTP injection API (SparkPost-compatible POST /api/v1/transmissions) "
        "listens on, as host:port, in every acceptor process; empty disables it")] = \
        msgspec.field(default_factory=lambda: ["127.0.0.1:8025"])
    api_keys: Annotated[list[str], _doc(
        "API keys accepted in the Authorization header (the key itself, or Basic with the "
        "key as user name), each with every grant; empty (and no key_grants): no key is "
        "needed and only loopback clients are served")] = \
        msgspec.field(default_factory=list)
    key_grants: Annotated[dict[str, list[str]], _doc(
        "more API keys, each limited to the grants listed, as SparkPost's keys are: "
        "transmissions:modify (POST /api/v1/transmissions), message_events:view (the "
        "events API), suppression_lists:manage (the suppression-list API), webhooks:view "
        "(GET of the webhooks API) and webhooks:modify (all of it). A request its key has "
        "no grant for gets 403 naming the grant: the key an application sends mail with "
        "need not read every recipient's events or delete suppressions")] = \
        msgspec.field(default_factory=dict)
    max_header_size: Annotated[int, _doc(
        "octets of request line and header fields; more gets 431 and the connection is "
        "closed", ge=1 * KiB, le=1 * MiB)] = 16 * KiB
    max_body_size: Annotated[int, _doc(
        "octets of request body; more gets 413 and the connection is closed",
        ge=1 * KiB, le=1 * GiB)] = 20 * MiB
    max_recipients: Annotated[int, _doc(
        "recipients in one transmission; more gets 422", ge=1, le=1_000_000)] = 10_000
    max_message_size: Annotated[int, _doc(
        "largest message one recipient's substitutions may build, in octets; a recipient "
        "whose message would be larger is refused (rcpt_to_errors, a generation_failure "
        "event)", ge=1 * KiB, le=2 * GiB - 1)] = 50 * MiB
    max_pending_bytes: Annotated[int, _doc(
        "octets of built messages an acceptor may hold waiting for the spool on behalf of "
        "HTTP requests; at the bound it builds no more until the spool's answers free "
        "room (a large message to many recipients is built a few at a time)",
        ge=1 * MiB, le=64 * GiB)] = 256 * MiB
    max_pending_messages: Annotated[int, _doc(
        "messages an acceptor may have waiting for the spool on behalf of HTTP requests; "
        "a request that would exceed it gets 429 with Retry-After", ge=1, le=10_000_000)] = \
        100_000
    request_timeout: Annotated[float, _doc(
        "seconds a client may take to send one whole request; slower ones get 408 and "
        "are disconnected; also how long its answers may wait unread (the client does "
        "not read them: it is disconnected)", ge=0.1, le=3600)] = 30.0
    keepalive_timeout: Annotated[float, _doc(
        "seconds an idle keep-alive connection is kept open", ge=0.1, le=3600)] = 60.0
    linger_timeout: Annotated[float, _doc(
        "seconds a connection the server closes keeps reading and discarding what the "
        "client still sends after the last response (so that the client reads the "
        "response, not a connection reset), and the longest its last responses may take "
        "to be written; then it is aborted (a client that never reads cannot hold it)",
        ge=0.1, le=60)] = 2.0
    max_connections: Annotated[int, _doc(
        "concurrent HTTP connections per acceptor; more get 503 and are closed",
        ge=1, le=1_000_000)] = 2000
    max_connections_per_ip: Annotated[int, _doc(
        "concurrent HTTP connections from one client (an IPv4 address, an IPv6 network of "
        "smtp.ipv6_client_prefix bits) per acceptor; more get 503 with Retry-After and are "
        "closed; 0: no limit (an injector may hold thousands of connections from one "
        "address: set it above what yours hold)", ge=0, le=1_000_000)] = 0
    max_json_depth: Annotated[int, _doc(
        "levels of objects and arrays a free-form JSON value may nest (metadata and "
        "substitution_data of a transmission or recipient, X-MSYS-API metadata over SMTP); "
        "deeper gets 422 (X-MSYS-API: the metadata is ignored)", ge=1, le=128)] = 32
    max_header_field_length: Annotated[int, _doc(
        "characters of one header field's value in a message built from a transmission "
        "(content.subject, content.from, content.reply_to, each of content.headers), after "
        "substitution; a recipient whose field would be longer is refused "
        "(rcpt_to_errors, a generation_failure event; every recipient: 422 naming the "
        "field); folding a field costs ~0.1 s a million characters of the acceptor's "
        "loop. A reload applies it", ge=1000, le=1_000_000)] = 100_000
    max_header_block_size: Annotated[int, _doc(
        "octets of a built message's header fields when the transmission has "
        "content.headers (checked as each is added); a recipient whose header would be "
        "larger is refused as for max_header_field_length (Postfix's header_size_limit "
        "is 102400); bounds the folding work per recipient (~0.1 s a MB). A reload "
        "applies it", ge=16 * KiB, le=16 * MiB)] = 1_000_000
    max_pipelined: Annotated[int, _doc(
        "requests a connection may have read and waiting (pipelined) behind the one "
        "being answered: at this many reading pauses, and resumes below half as many. "
        "A reload "
        "applies it (to new connections)", ge=2, le=1024)] = 16
    max_pipelined_bytes: Annotated[int, _doc(
        "octets of the bodies of the requests read ahead past the next one to be answered: "
        "at this many reading pauses, and resumes below half (else a connection could hold "
        "max_pipelined x max_body_size); 0: reading pauses once two requests wait behind "
        "the one being answered. A reload applies it (to new connections)",
        ge=0, le=1 * GiB)] = 1 * MiB
    loop_prepare_size: Annotated[int, _doc(
        "octets of a transmission's body decoded, checked and compiled on the acceptor's "
        "event loop; a larger one is in a worker thread (its compile may take seconds; "
        "the loop serves other connections meanwhile); a smaller one on the loop, "
        "without the thread's hand-off. A reload applies it", ge=0, le=1 * GiB)] = 64 * KiB
    build_slice_time: Annotated[float, _doc(
        "seconds of building one transmission's messages (up to 256 recipients) after "
        "which the acceptor's loop turns to its other connections: a slice ends after "
        "the recipient that passes it (costly templates), the rest follow on later "
        "iterations; larger: fewer turns, longer waits for the other connections. A "
        "reload applies it", ge=0.001, le=60)] = 0.02
    idempotency_window: Annotated[float, _doc(
        "seconds a request's Idempotency-Key is remembered: a repeat with the same key "
        "and body gets the first response and injects nothing", ge=1, le=30 * 86400)] = \
        86400.0


class SuppressionConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: Annotated[bool, _doc(
        "check recipients against the suppression list at injection (SMTP and HTTP) and "
        "serve /api/v1/suppression-list; off: nothing is looked up or added")] = True
    path: Annotated[str, _doc(
        "LMDB directory of the suppression list, shared by every process of the node; "
        "relative paths are inside state_dir")] = "suppression"
    max_size: Annotated[int, _doc(
        "octets the suppression list may take on disk (the LMDB map size; a record takes "
        "about 200 octets with its index); when full, additions are refused (HTTP 507) and "
        "logged", ge=1 * MiB, le=1024 * GiB)] = 8 * GiB
    smtp_action: Annotated[str, _doc(
        "SMTP injection of a suppressed recipient: \"bounce\" accepts it and records a "
        "class-25 bounce (as over HTTP); \"refuse\" answers its RCPT with "
        "550 5.7.1 (checked against the non_transactional list, the type of mail without "
        "X-MSYS-API options.transactional) and records a policy_rejection event",
        pattern="^(bounce|refuse)$")] = "bounce"
    bounce_rule: Annotated[bool, _doc(
        "add a recipient to the list (source \"Bounce Rule\", type non_transactional) when "
        "its delivery fails permanently as an invalid recipient (bounce class 10: 5.1.1, "
        "5.1.10, ...)")] = True
    max_search_scan: Annotated[int, _doc(
        "index rows one GET /api/v1/suppression-list search may read; past it total_count "
        "counts only what was read", ge=1000, le=100_000_000)] = 1_000_000
    max_search_time: Annotated[float, _doc(
        "seconds one GET /api/v1/suppression-list search may take (a search by "
        "description reads a record per index row: a few microseconds each from memory, far "
        "more from a slow disk); past it, as past max_search_scan: the results so far, "
        "a total_count of what was read, and with cursor paging a next link that goes "
        "on from there", ge=0.01, le=300)] = 5.0
    max_body_size: Annotated[int, _doc(
        "octets of a PUT /api/v1/suppression-list request body (SparkPost takes 50 MB: "
        "10,000 entries with long descriptions exceed http.max_body_size); the larger "
        "of this and http.max_body_size applies to it when it carries a valid API key "
        "(without one: http.max_body_size)", ge=1 * MiB, le=1 * GiB)] = 50 * MiB
    api_threads: Annotated[int, _doc(
        "suppression-list API requests an acceptor answers at once, each in a thread of "
        "its own (a bulk PUT waits for the list's write lock, a search may read a million "
        "records); more wait for one of them. Its SMTP and transmissions go on meanwhile; "
        "more threads take the GIL from its loop more often", ge=1, le=64)] = 2
    writer_close_wait: Annotated[float, _doc(
        "seconds a stopping spool shard waits for its last Bounce Rule additions (they "
        "wait for the list's write lock, which a bulk PUT may hold); past it the shard "
        "exits and logs that entries of this run may be missing (a shard still there "
        "past the supervisor's stop bound, server.shutdown_timeout + "
        "smtp.spool_timeout + 10 s, is killed)", ge=0, le=60)] = 5.0


class RouteConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    domain: Annotated[str, _doc(
        "recipient domain this route applies to, or \"*\" for every domain without "
        "a route of its own (a smarthost)")]
    hosts: Annotated[list[str], _doc(
        "hosts to deliver to, as host or host:port, tried in order")]
    starttls: Annotated[str | None, _doc(
        "none, opportunistic or required (as delivery.starttls); unset: as the "
        "[[shaping]] rules and delivery.starttls say for the domain (a route does not "
        "weaken a rule's \"required\" unless it says so)")] = None
    tls_verify: Annotated[bool, _doc(
        "verify the server certificate and name; then STARTTLS is required (as Postfix's "
        "verify level), whatever starttls, delivery.starttls or a [[shaping]] rule says: "
        "a server that does not offer it, or whose certificate fails, gets nothing (the "
        "mail is deferred)")] = False
    source_address: Annotated[str, _doc(
        "local IP address to send from (egress IP); empty: the system's choice")] = ""


class DeliveryConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    hold: Annotated[bool, _doc(
        "keep every message queued and deliver nothing (like Postfix's hold queue); "
        "held messages still expire after max_age; a reload applies it (jobs already out "
        "finish)")] = False
    processes: Annotated[int, _doc(
        "delivery processes, sharded by recipient domain; 0 = one per CPU",
        ge=0, le=256)] = 0
    helo_name: Annotated[str, _doc(
        "name sent in EHLO (an ASCII host name or an address literal); empty: "
        "server.hostname")] = ""
    nameservers: Annotated[list[str], _doc(
        "DNS servers for MX lookups and webhook targets' host names, as ip or ip:port "
        "([v6]:port for IPv6); empty: the system's resolv.conf")] = \
        msgspec.field(default_factory=list)
    dns_timeout: Annotated[float, _doc(
        "seconds one DNS lookup may take before it counts as a temporary failure; a "
        "domain's MX hosts' addresses are looked up concurrently (dns_hosts_in_flight "
        "at a time); "
        "a domain's whole route lookup (its MX query, then the addresses) ends about "
        "one such bound after it began (plus 0.25 s, and at most 0.5 s more for the "
        "addresses when the MX answer came late)",
        ge=0.1, le=120)] = 5.0
    dns_hosts_in_flight: Annotated[int, _doc(
        "hosts of one route lookup (a domain's MX hosts, the 10 best at most; a route's "
        "hosts) whose addresses are looked up at once, an A and an AAAA query each; a "
        "host past it is asked when one before it is answered, so behind that many "
        "hosts whose DNS is dead it is asked only when their lookups time out "
        "(dns_timeout), at or past the route's deadline (shortened by the MX query). The "
        "default asks the 10 MX hosts looked up at once. A reload "
        "applies it (the delivery processes are replaced)", ge=1, le=100)] = 10
    ipv6: Annotated[bool, _doc(
        "send over IPv6 too: look up MX hosts' AAAA records and connect to IPv6 addresses "
        "(of MX hosts, routes and address literals); false on a host without IPv6 "
        "egress: IPv4 only (Postfix's inet_protocols = ipv4)")] = True
    mx_port: Annotated[int, _doc(
        "TCP port for MX and address-record deliveries", ge=1, le=65535)] = 25
    starttls: Annotated[str, _doc(
        "STARTTLS for MX deliveries: none, opportunistic (when offered; a failed "
        "handshake: plaintext) or required (encrypted or not sent; the certificate is "
        "not checked, as Postfix's encrypt level: tls_verify checks it and the MX host "
        "name)")] = "opportunistic"
    tls_verify: Annotated[bool, _doc(
        "verify certificates on MX deliveries (opportunistic TLS does not by default); "
        "then STARTTLS is required, whatever starttls or a [[shaping]] rule says, as for "
        "a route's tls_verify")] = False
    tls_ca_file: Annotated[str, _doc(
        "a PEM file of CA certificates trusted by tls_verify (delivery's and the routes') "
        "besides the system's: for a smarthost or partner whose certificate a private CA "
        "signed; empty: the system's CAs alone")] = ""
    source_address: Annotated[str, _doc(
        "local IP address for MX deliveries; empty: the system's choice")] = ""
    connection_limit: Annotated[int, _doc(
        "simultaneous connections from one egress source to one receiving site, across "
        "all delivery processes of the node, where no [[shaping]] rule sets it",
        ge=1, le=10_000)] = 10
    max_deliveries_per_connection: Annotated[int, _doc(
        "messages sent over one connection before it is closed (transactions begun, the "
        "ones the server refused too), where no [[shaping]] rule sets it",
        ge=1, le=1_000_000)] = 1000
    idle_timeout: Annotated[float, _doc(
        "seconds an unused connection is kept open for the next message, where no "
        "[[shaping]] rule sets it", ge=0, le=3600)] = 5.0
    slot_turn: Annotated[float, _doc(
        "seconds a delivery process keeps a connection slot of a site at most while another "
        "process holds none of that site's slots and waits for one (a site whose "
        "connection_limit is below the number of delivery processes: they take turns; the "
        "message in flight ends first); at most job_timeout_margin / 2 divided by the "
        "delivery processes, so that every process gets a turn before its jobs would go "
        "back to the spool", ge=0.1, le=3600)] = 5.0
    connection_max_age: Annotated[float, _doc(
        "seconds after it opened that a connection takes no new message (its current "
        "one ends, then QUIT), however busy: the next goes on a new connection, to the "
        "receiver's addresses as the DNS now gives them (Postfix's "
        "smtp_connection_reuse_time_limit)", ge=1, le=86400)] = 300.0
    pipeline_transactions: Annotated[bool, _doc(
        "when a server offers PIPELINING and the next message for the connection is "
        "waiting, send its MAIL, RCPT and DATA in the same write as the previous message's "
        "final dot (RFC 2920 allows message content first in a group); false: one "
        "transaction at a time")] = True
    max_in_flight_per_domain: Annotated[int, _doc(
        "bulk messages a spool shard has out for delivery to one recipient domain at once, "
        "so that a slow or hung site cannot take the whole window (max_in_flight); "
        "transactional messages have a window of their own of the same size",
        ge=1, le=1_000_000)] = 500
    spread_threshold: Annotated[int, _doc(
        "delivery jobs a spool shard has out to one recipient domain at the domain's home "
        "delivery process before it sends the next ones to the process with the fewest "
        "jobs of that domain out (so a busy domain uses several processes)",
        ge=1, le=1_000_000)] = 100
    shaping_presets: Annotated[bool, _doc(
        "apply the shaping rules shipped for the large mailbox providers "
        "(mta/shaping/presets.toml) before the [[shaping]] rules of this file")] = True
    connect_timeout: Annotated[float, _doc(
        "seconds to open the TCP connection (through the source's SOCKS5 proxy, if any); "
        "the greeting is then waited for as a reply, command_timeout", ge=0.1, le=600)] = 30.0
    command_timeout: Annotated[float, _doc(
        "seconds to wait for the greeting, a reply to a command, or all the replies to a "
        "message's envelope (MAIL, every RCPT, DATA) together (RFC 5321: 5 minutes a "
        "command)", ge=0.1, le=3600)] = 300.0
    data_timeout: Annotated[float, _doc(
        "seconds to send the message and get the reply after it, together: a server that "
        "stops reading it is given up on at this bound too (RFC 5321 suggests 3 minutes a "
        "block written and 10 for the reply; one bound for the whole lets the spool count "
        "on an outcome within connect + 2 x command + data timeouts)",
        ge=0.1, le=3600)] = 600.0
    max_in_flight: Annotated[int, _doc(
        "delivery jobs (one message's recipients at one domain) a spool shard has out at "
        "once, in each of its two lanes (bulk, transactional): what a crash may deliver "
        "twice", ge=1, le=1_000_000)] = 2000
    job_timeout_margin: Annotated[float, _doc(
        "seconds beyond connect_timeout + 2 x command_timeout + data_timeout that a spool "
        "shard waits for a job's outcome before it sends the job again; a delivery process "
        "hands a job that has waited half of it in its queues (a rate limit, a back-off, a "
        "slow site) back to the spool, so that no job is ever sent twice for that",
        ge=1, le=86400)] = 60.0
    retry_schedule: Annotated[list[float], _doc(
        "seconds before each retry after a temporary failure; the last repeats")] = \
        msgspec.field(default_factory=lambda: [60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0,
                                               14400.0])
    retry_jitter: Annotated[float, _doc(
        "random spread added to each retry delay (and a response rule's defer delay, and the "
        "wait of mail delivery handed back untried), as a fraction of it", ge=0, le=1)] = 0.1
    max_age: Annotated[float, _doc(
        "seconds a message may stay queued before its undelivered recipients expire "
        "and bounce (5 days); takes effect at the next start; at most 1e10 (about 317 "
        "years: a longer one is taken as that)", ge=1)] = 5 * 86400.0
    delay_warning_time: Annotated[float, _doc(
        "seconds in the queue after which the sender of a message still undelivered "
        "(deferred, or waiting untried: suspended, rate-limited) gets a delay notice "
        "(RFC 3464 \"delayed\"), once per recipient that did not opt out with NOTIFY "
        "(RFC 3461), at most one per message in that time; 0 = never (like Postfix's "
        "delay_warning_time)", ge=0, le=30 * 86400)] = 0.0
    time_scale: Annotated[float, _doc(
        "multiplies retry_schedule, max_age and delay_warning_time; only for tests (e.g. 0.001)",
        gt=0, le=1)] = 1.0
    route: Annotated[list[RouteConfig], _doc(
        "static routes, like a transport map or a smarthost: [[delivery.route]] "
        "tables with domain and hosts")] = msgspec.field(default_factory=list)


_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_RATE = r"^[0-9]+(\.[0-9]+)?/[smhd]$"


class EgressSource(Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, _doc(
        "the source's name, used by pools, shaping rules, logs and events", pattern=_NAME)]
    source_address: Annotated[str, _doc(
        "local IP address (IPv4 or IPv6) bound before connecting; with socks5_proxy, the "
        "proxy's outbound address for this source (recorded in events); empty: the "
        "system's choice")] = ""
    ehlo_name: Annotated[str, _doc(
        "name sent in EHLO from this source; empty: delivery.helo_name")] = ""
    socks5_proxy: Annotated[str, _doc(
        "host:port of a SOCKS5 proxy (RFC 1928) to connect through; empty: connect "
        "directly")] = ""
    socks5_username: Annotated[str, _doc(
        "user name for the proxy (RFC 1929); empty: no authentication")] = ""
    socks5_password: Annotated[str, _doc("password for socks5_username")] = ""


class PoolMember(Struct, forbid_unknown_fields=True, kw_only=True):
    source: Annotated[str, _doc("name of an [[egress.source]]")]
    weight: Annotated[int, _doc(
        "share of the pool's messages, relative to the other members", ge=1, le=10_000)] = 1


class EgressPool(Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, _doc(
        "the pool's name, as given in options.ip_pool (HTTP) or X-MSYS-API (SMTP)",
        pattern=_NAME)]
    sources: Annotated[list[PoolMember], _doc(
        "the sources of the pool with their weights", min_length=1)]
    overflow_pool: Annotated[str, _doc(
        "a pool that takes this pool's mail for a site while every source of this pool "
        "that is not suspended is at its warm-up cap for that site ([[warmup]] with "
        "overflow = \"other_sources\"); one hop: the overflow pool's own overflow_pool "
        "is not followed. Empty: the mail waits in the queue until a cap rolls over")] = ""


class EgressConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    source: Annotated[list[EgressSource], _doc(
        "egress sources: [[egress.source]] tables, each a sending IP address (bound, or "
        "reached through a SOCKS5 proxy) with its EHLO name")] = msgspec.field(
        default_factory=list)
    pool: Annotated[list[EgressPool], _doc(
        "egress pools: [[egress.pool]] tables, each a weighted set of sources; a pool "
        "named \"default\" replaces the built-in one (the system's choice of address)")] = \
        msgspec.field(default_factory=list)
    default_pool: Annotated[str, _doc(
        "pool of a message that names none and whose sending domain has no entry in "
        "domain_pool")] = "default"
    domain_pool: Annotated[dict[str, str], _doc(
        "pool by sending domain (the domain of MAIL FROM), for messages that name none")] = \
        msgspec.field(default_factory=dict)
    suspend_time: Annotated[float, _doc(
        "seconds a source that cannot be used (its address is not bound on the host, its "
        "proxy does not answer) is suspended at first; doubled at each failure up to "
        "suspend_time_max", ge=0.1, le=86400)] = 30.0
    suspend_time_max: Annotated[float, _doc(
        "longest suspension of a source that keeps failing", ge=0.1, le=86400)] = 600.0


class ShapingRule(Struct, forbid_unknown_fields=True, kw_only=True):
    domain: Annotated[str, _doc(
        "recipient domain the rule applies to (exact, or *.example.com for its "
        "subdomains); set exactly one of domain, mx and site")] = ""
    mx: Annotated[str, _doc(
        "MX host name pattern (*.google.com): the rule applies to the sites with an MX "
        "host that matches")] = ""
    site: Annotated[str, _doc("site name, as mta queue shows it")] = ""
    source: Annotated[str, _doc(
        "apply only to deliveries from this egress source; empty: from every source")] = ""
    connection_limit: Annotated[Annotated[int, Meta(ge=1, le=10_000)] | None, _doc(
        "simultaneous connections per source x site, across the node (1-10000)")] = None
    max_deliveries_per_connection: Annotated[Annotated[int, Meta(ge=1, le=1_000_000)] | None,
                                             _doc("messages per connection before it is "
                                                  "closed (1-1000000)")] = None
    max_message_rate: Annotated[Annotated[str, Meta(pattern=_RATE)] | None, _doc(
        "messages per source x site, as N/s, N/m, N/h or N/d")] = None
    max_connection_rate: Annotated[Annotated[str, Meta(pattern=_RATE)] | None, _doc(
        "new connections per source x site, as N/s, N/m, N/h or N/d")] = None
    idle_timeout: Annotated[Annotated[float, Meta(ge=0, le=3600)] | None, _doc(
        "seconds an unused connection is kept open (0-3600)")] = None
    starttls: Annotated[str | None, _doc(
        "none, opportunistic or required (as delivery.starttls: required is encryption, "
        "the certificate is not checked); a domain rule's loosens what earlier rules set "
        "for the site only when it matches every domain queued there (the site's "
        "sessions carry every domain sharing its MX hosts)")] \
        = None


RULE_STAGES = ("connect", "greeting", "ehlo", "mail", "rcpt", "data")
RULE_ACTIONS = ("suspend", "throttle", "bounce", "defer")
RULE_SCOPES = ("source_site", "site", "source")


class ResponseRule(Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, _doc(
        "the rule's readable name, shown in mta rules list and in the events (required)")] = ""
    stages: Annotated[list[str], _doc(
        "where the reply must come: connect, greeting, ehlo, mail, rcpt, data; "
        "empty: any stage")] = msgspec.field(default_factory=list)
    code: Annotated[Annotated[int, Meta(ge=400, le=599)] | None, _doc(
        "the reply code (400-599); unset: any 4xx or 5xx")] = None
    enhanced: Annotated[str, _doc(
        "the enhanced status code, exact (4.7.28); empty: any")] = ""
    text: Annotated[str, _doc(
        "a regular expression searched in the reply text, case-insensitive; empty: any "
        "(a rule needs at least one of code, enhanced and text)")] = ""
    mx: Annotated[str, _doc(
        "only for sites with an MX host matching this glob (*.yahoodns.net); empty: every "
        "site")] = ""
    action: Annotated[str, _doc(
        "suspend (stop sending to scope for duration), throttle (lower the rate and/or "
        "connections of the source x site for duration), bounce (fail the recipient now, "
        "with bounce_class), defer (retry the recipient after delay)")] = "suspend"
    scope: Annotated[str, _doc(
        "what suspend stops: source_site (this source to this site), site (every source "
        "to this site) or source (this source to every site); throttle is always "
        "source_site")] = "source_site"
    duration: Annotated[float, _doc(
        "seconds a suspension or throttle lasts (multiplied by delivery.time_scale)",
        ge=0, le=7 * 86400)] = 900.0
    connection_limit: Annotated[Annotated[int, Meta(ge=1, le=10_000)] | None, _doc(
        "throttle: connections per source x site while it lasts")] = None
    max_message_rate: Annotated[Annotated[str, Meta(pattern=r"^[0-9]+(\.[0-9]+)?/[smhd]$")]
                                | None, _doc(
        "throttle: messages per source x site while it lasts, as N/s, N/m, N/h or N/d")] = None
    bounce_class: Annotated[str, _doc(
        "bounce: the bounce class given to the recipient (e.g. \"51\" for a block)")] = ""
    delay: Annotated[float, _doc(
        "defer: seconds before the recipient is tried again (multiplied by "
        "delivery.time_scale)", ge=0, le=86400)] = 0.0


class WarmupStage(Struct, forbid_unknown_fields=True, kw_only=True):
    day: Annotated[int, _doc("from this day of use on (1 = the first day)", ge=1, le=3650)]
    hourly: Annotated[int, _doc(
        "messages per site per hour from the source; 0 = no hourly cap", ge=0,
        le=100_000_000)] = 0
    daily: Annotated[int, _doc(
        "messages per site per day from the source; 0 = no daily cap", ge=0,
        le=1_000_000_000)] = 0


class WarmupConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    source: Annotated[str, _doc("the [[egress.source]] being warmed up")] = ""
    mx: Annotated[str, _doc(
        "only for sites with an MX host matching this glob; empty: every site")] = ""
    schedule: Annotated[list[WarmupStage], _doc(
        "stages in order of day: each holds from its day until the next one's; after the "
        "last stage's day + 1 ... the last stage holds (add a stage with no caps to end "
        "the warm-up)")] = msgspec.field(default_factory=list)
    overflow: Annotated[str, _doc(
        "what the source's mail does at a cap: other_sources (the pool's other sources "
        "take it) or wait (it waits in the queue until the hour or day rolls over)")] = \
        "other_sources"


class BackoffConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: Annotated[bool, _doc(
        "lower the rate of a source x site on its own when too many attempts are deferred")] \
        = True
    window: Annotated[float, _doc(
        "seconds of attempts judged together (per source x site); a minute is long enough "
        "to see a provider's per-minute limit and short enough to react within one",
        gt=0, le=86400)] = 60.0
    min_attempts: Annotated[int, _doc(
        "attempts needed in the window before it is judged (fewer say nothing)",
        ge=1, le=100_000)] = 10
    threshold: Annotated[float, _doc(
        "share of deferred attempts in the window above which the rate is lowered; 0.1: "
        "greylisting and the odd busy reply stay below it, a rate limit does not",
        gt=0, le=1)] = 0.1
    decrease: Annotated[float, _doc(
        "on entering back-off the rate becomes this share of the rate the site accepted over "
        "the window (0.8: a fifth less than it has shown it takes); each further decrease "
        "(too many deferrals again) multiplies the rate in effect by it", gt=0, lt=1)] = 0.8
    recover_step: Annotated[float, _doc(
        "additive increase: after each recover_interval without a new decrease the rate "
        "grows by this share of the rate set at the decrease (0.1: ten intervals to double "
        "it), at least min_rate", gt=0, le=10)] = 0.1
    hold_intervals: Annotated[int, _doc(
        "recovery steps that stay under 0.9 x the rate that drew the deferrals before "
        "probing above it: 10 keeps a sender just under a provider's limit most of the "
        "time and still finds out, every ten intervals, whether the limit rose",
        ge=0, le=10_000)] = 10
    recover_interval: Annotated[float, _doc(
        "seconds between recovery steps (multiplied by delivery.time_scale, like window)",
        gt=0, le=86400)] = 60.0
    min_rate: Annotated[str, _doc(
        "the rate back-off never goes below, as N/s, N/m, N/h or N/d",
        pattern=r"^[0-9]+(\.[0-9]+)?/[smhd]$")] = "1/m"
    rcpt_signals: Annotated[list[Annotated[str, Meta(pattern=r"^4\.[0-9]{1,3}\.[0-9]{1,3}$")]],
                            _doc(
        "enhanced codes that make a deferral of single recipients (a 4xx to RCPT) count "
        "as the site asking to slow down; other RCPT deferrals (greylisting, a full "
        "mailbox, an unknown user's 450) are about the recipient and count neither way, "
        "and so do DATA deferrals with a 4.2.x or 4.7.x code not listed here (greylisting "
        "after DATA, 451 4.7.1). A 421, a deferral at connect, greeting, EHLO or MAIL, "
        "one at DATA with another code or none, and a connection that fails always count")] = msgspec.field(
        default_factory=lambda: ["4.7.0", "4.7.28", "4.7.500", "4.7.650"])
    max_entries: Annotated[int, _doc(
        "most suspensions, throttles and back-offs kept at once (in the state directory, "
        "adaptive/); beyond it new ones are refused and logged", ge=1, le=1_000_000)] = 10_000


class FeedbackConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    bounce_rules: Annotated[str, _doc(
        "the operator's bounce classification rules: a TOML file of [[rule]] tables "
        "(name, class, and code, enhanced and/or text; see mta/feedback/classify.py), tried "
        "before the shipped rules (mta/feedback/bounce_rules.toml); empty: shipped rules "
        "only")] = ""
    bounce_domains: Annotated[list[Annotated[str, Meta(
        min_length=1, max_length=253, pattern=r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")]],
        _doc(
        "domains of the return paths (MAIL FROM) of the mail sent: SMTP mail to an address "
        "at one of them is a report, not a message to relay -- accepted from any client "
        "(no relay permission needed), read as an RFC 3464 DSN (an out_of_band event for "
        "the original message, found by the VERP return path localpart+<queue id>@ or the "
        "quoted Message-ID) or an RFC 5965 ARF report (a spam_complaint event and a "
        "\"Spam Complaint\" suppression entry), never relayed; empty: none",
        max_length=100)] = []
    suppress_unmatched: Annotated[bool, _doc(
        "an out-of-band bounce or complaint whose original message is not found in the "
        "events store (pruned, or the store off) still adds what it names to the "
        "suppression list; false (the default): only recipients of a message found are "
        "suppressed -- a report comes from anyone, unauthenticated, and a made-up one "
        "could otherwise suppress any address.  Unmatched reports give their events "
        "(matched \"0\") either way")] = False
    max_report_size: Annotated[int, _doc(
        "octets of a report to a bounce domain that are parsed; the rest (in a DSN or ARF "
        "report, the returned message after its header) is not read.  A report comes from "
        "anyone, and parsing costs CPU by the octet (up to about 1 s per MiB of crafted "
        "MIME)", ge=64 * KiB, le=10 * MiB)] = 1 * MiB
    report_readers: Annotated[int, _doc(
        "reports parsed at once per acceptor, each in a worker thread beside the "
        "acceptor's event loop", ge=1, le=32)] = 1
    max_waiting_reports: Annotated[int, _doc(
        "reports per acceptor that may wait for a reader; one more gets 451 4.3.2 at once "
        "(its sender tries again later) instead of holding its payload in memory",
        ge=0, le=100_000)] = 100
    verp: Annotated[str, _doc(
        "a local part: when set, the MAIL FROM of every message delivered with a non-null "
        "sender becomes <verp>+<queue id>@<the first of bounce_domains> (VERP), so that "
        "an asynchronous bounce comes back to a bounce domain and names its message even "
        "when it quotes nothing; the sender's domain no longer is the return path's (SPF "
        "is checked for the bounce domain). Empty: the sender is the return path",
        max_length=40, pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]*)?$")] = ""


class EventsConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    poll_interval: Annotated[float, _doc(
        "seconds the events process waits before looking at the spool shards' new events "
        "again when it found none", ge=0.01, le=5)] = 0.05
    checkpoint_interval: Annotated[float, _doc(
        "seconds between two checkpoints of the events process: the event log (and the "
        "events store) synced, then each shard's events cursor written; after a crash the "
        "events since the last checkpoint are written again (same event_id)",
        ge=0.05, le=60)] = 0.5
    rotate_bytes: Annotated[int, _doc(
        "the event log (server.event_log) is rotated when it reaches this size: renamed "
        "<name>-<UTC time>.jsonl and a new one started", ge=64 * KiB, le=64 * GiB)] = 256 * MiB
    rotate_age: Annotated[float, _doc(
        "seconds after its first line the event log is rotated even if smaller; 0: by size "
        "only", ge=0, le=366 * 86400)] = 86400.0
    keep_files: Annotated[int, _doc(
        "rotated event log files kept; older ones are deleted", ge=0, le=100_000)] = 10
    max_total_bytes: Annotated[int, _doc(
        "rotated event log files kept together at most; the oldest are deleted beyond it "
        "(disk use: at most rotate_bytes + max_total_bytes)", ge=0)] = 2 * GiB
    max_backlog_bytes: Annotated[int, _doc(
        "per spool shard: segment bytes the events process has not read yet that hold "
        "back their reclamation; a warning at half; beyond it segments are reclaimed "
        "anyway and their events are missing from the log (an error is logged); a reload "
        "that lowers it below the backlog held then keeps that backlog until it is read "
        "below the new value", ge=1 * MiB)] = 4 * GiB
    # --- the events store and GET /api/v1/events/message (mta/feedback/events_store.py) ---
    store: Annotated[bool, _doc(
        "keep message events in the events store and serve GET /api/v1/events/message; "
        "false: no store, the API answers 404, and so do POST and PUT /api/v1/webhooks "
        "(the webhooks send what the store holds)")] = True
    store_path: Annotated[str, _doc(
        "LMDB directory of the events store (written by the events process, read by the "
        "acceptors); relative paths are inside state_dir")] = "events"
    retention: Annotated[float, _doc(
        "seconds an event is kept in the store (10 days, as SparkPost); an event a webhook "
        "has not consumed yet is kept longer", ge=60, le=366 * 86400)] = 10 * 86400.0
    store_max_size: Annotated[int, _doc(
        "octets the events store may take on disk (the LMDB map size; an event takes about "
        "1 KiB with its indexes); from 75 % a warning is logged, from 85 % the oldest "
        "events are deleted before their retention ends", ge=16 * MiB, le=4096 * GiB)] = \
        32 * GiB
    query_max_scan: Annotated[int, _doc(
        "index entries one GET /api/v1/events/message may read; past it total_count counts "
        "only what was read, and a page may come short with a next cursor to go on from "
        "(a walk that decodes events reads about 300,000 a second)", ge=1000,
        le=1_000_000_000)] = 500_000
    # --- end of the events store keys ---


DEFAULT_WEBHOOK_RETRIES = [60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 2700.0, 3600.0, 4500.0,
                           5400.0, 8400.0]   # 11 retries after the first attempt: 7.97 hours


class WebhooksConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: Annotated[bool, _doc(
        "run the webhooks process, which pushes event batches to the [[webhook]] tables and "
        "the webhooks created through /api/v1/webhooks; false: none is sent, and POST and "
        "PUT /api/v1/webhooks answer 404 (the webhooks there may be listed and deleted)")] = True
    unmatched_reports: Annotated[bool, _doc(
        "send the out_of_band and spam_complaint events of reports to a bounce domain whose "
        "original message was not found (matched \"0\") to the webhooks too; false (the "
        "default): they stay in the event log and the events API -- a report comes from "
        "anyone, unauthenticated, and a made-up one would have the webhooks' consumers (an "
        "application that unsubscribes bounced or complaining addresses) act on addresses "
        "of its sender's choosing")] = False
    batch_size: Annotated[int, _doc(
        "most events in one batch (one POST; a batch takes what is there, so a small "
        "backlog goes in small batches). The cost is per batch (two durable commits and a "
        "POST): 100 carries about 4,500 events/s here, too few for an e2e run at 4 events "
        "per message (bench/RESULTS.md); SparkPost's own batches hold up to 350",
        ge=1, le=350)] = 350
    max_in_flight: Annotated[int, _doc(
        "stored batches per webhook not yet acknowledged (being sent or waiting for a "
        "retry); at the bound no new batch is made and the webhook's cursor lags",
        ge=1, le=64)] = 4
    timeout: Annotated[float, _doc(
        "seconds one POST to a webhook target may take before it counts as failed",
        ge=0.1, le=300)] = 10.0
    retry_schedule: Annotated[list[Annotated[float, Meta(ge=0)]], _doc(
        "seconds before each retry of a failed batch (its attempts after the first); after "
        "the last one fails the batch is dropped (logged, counted)")] = msgspec.field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_RETRIES))
    time_scale: Annotated[float, _doc(
        "multiplies retry_schedule; only for tests (e.g. 0.001)", gt=0, le=1)] = 1.0
    max_backlog_events: Annotated[int, _doc(
        "events of the events store a webhook's cursor may lag behind the newest one "
        "(events not yet put in a batch); warnings are logged at 50 % and 90 %",
        ge=100, le=1_000_000_000)] = 1_000_000
    on_backlog_full: Annotated[str, _doc(
        "at max_backlog_events: \"drop_oldest\" moves the cursor forward so the lag is "
        "the bound again (the skipped events are logged and counted, never sent); "
        "\"pause\" keeps the cursor and stops holding the events store back beyond the "
        "bound, so the store's retention decides what is lost",
        pattern="^(drop_oldest|pause)$")] = "drop_oldest"
    poll_interval: Annotated[float, _doc(
        "seconds between two looks at the events store and at webhook changes made "
        "through the API when there is nothing to do", ge=0.01, le=10)] = 0.5
    status_retention: Annotated[float, _doc(
        "seconds a batch that failed at least once is kept for the batch-status call "
        "after its last attempt", ge=60, le=30 * 86400)] = 86400.0
    max_webhooks: Annotated[int, _doc(
        "webhooks that may be created through the API", ge=1, le=10_000)] = 100
    max_response_body: Annotated[int, _doc(
        "octets of a target's response body kept for the validate call's answer",
        ge=0, le=1 * MiB)] = 4 * KiB


class WebhookEntry(Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, _doc("the webhook's name, unique among the [[webhook]] tables; "
                              "its id in the API is derived from it")]
    target: Annotated[str, _doc("http:// or https:// URL the batches are POSTed to")]
    events: Annotated[list[str], _doc(
        "event types sent (injection, delivery, delay, bounce, out_of_band, "
        "spam_complaint, policy_rejection, generation_failure, generation_rejection, ...)")]
    active: Annotated[bool, _doc("false: nothing is sent")] = True
    auth_type: Annotated[str, _doc("none, basic or oauth2",
                                   pattern="^(none|basic|oauth2)$")] = "none"
    auth_credentials: Annotated[dict[str, str], _doc(
        "basic: {username, password}")] = msgspec.field(default_factory=dict)
    auth_request_details: Annotated[dict[str, Any], _doc(
        "oauth2: {url, body = {client_id, client_secret, grant_type = "
        "\"client_credentials\"}}")] = msgspec.field(default_factory=dict)
    custom_headers: Annotated[dict[str, str], _doc(
        "header fields added to every POST")] = msgspec.field(default_factory=dict)


class AdminConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: Annotated[bool, _doc(
        "run the admin process: the admin listener (/metrics, /api/admin/health) and the "
        "statistics every process pushes to it; false: no admin process, no pushes")] = True
    listen: Annotated[list[str], _doc(
        "addresses the admin listener listens on, as host:port; an address that is not "
        "loopback needs tokens")] = msgspec.field(default_factory=lambda: ["127.0.0.1:8026"])
    tokens: Annotated[list[str], _doc(
        "bearer tokens (Authorization: Bearer TOKEN) the admin listener accepts; required "
        "when it listens on an address that is not loopback (or read_tokens); empty, "
        "with no read_tokens: no token is asked for")] = msgspec.field(default_factory=list)
    read_tokens: Annotated[list[str], _doc(
        "bearer tokens that may only read: GET and HEAD (/metrics, health, status, the "
        "queue and message views) are served, POST and DELETE (drain, bounce, suspend, "
        "resume, delete) get 403 -- for Prometheus and dashboards, as PowerMTA's "
        "\"monitor\" access; with read_tokens and no tokens nothing can be changed over "
        "the listener")] = msgspec.field(default_factory=list)
    push_interval: Annotated[float, _doc(
        "seconds between two statistics snapshots of each process", ge=0.1, le=60)] = 1.0
    max_label_values: Annotated[int, _doc(
        "series per metric family whose label values come from traffic (sites, source x "
        "site); the rest are summed under the label value \"other\"", ge=1, le=10_000)] = 50
    max_connections: Annotated[int, _doc(
        "concurrent connections to the admin listener; more are closed", ge=1,
        le=10_000)] = 64
    shard_timeout: Annotated[float, _doc(
        "seconds a spool shard has to answer one question of the admin API (the queue "
        "view, the message views, flush) and of the mta queue commands (their default); "
        "one that does not answer (stopped, wedged) is named and the others' answers "
        "given", ge=0.1, le=300)] = 5.0
    agent_listen: Annotated[list[str], _doc(
        "addresses of the HAProxy agent-check port (agent-check agent-port P), as "
        "host:port; empty: none.  Each connection gets one line and is closed: \"drain\" "
        "while the node is drained, \"down ready #why\" while it cannot take mail (no "
        "spool shard up and able to write, no acceptor up, or every acceptor's spool "
        "below spool.min_free_*), else \"up ready N%\", N lowered from 100 (to 10 at "
        "least) by the spool's free space between spool.min_free_* and twice it and "
        "by the share of spool shards that cannot write; the webhooks and events "
        "processes do not count.  No token: it says nothing secret, so listen where "
        "the balancer reaches it")] = msgspec.field(default_factory=list)


class ClusterConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    nodes: Annotated[int, _doc(
        "how many nodes share the sources and sites that the shaping limits are written "
        "for (nodes behind one balancer sending from the same IPs, or through the same "
        "NAT or SOCKS egress): without a shared store each node keeps to 1/nodes of them "
        "-- connection limits (rounded down, at least 1), message and connection rates, "
        "response-rule throttles and warm-up caps (rounded down, at least 1); messages "
        "per connection, timeouts and back-off (measured) are this node's own. 1: the "
        "limits are this node's alone", ge=1, le=1000)] = 1


class Config(Struct, forbid_unknown_fields=True, kw_only=True):
    server: Annotated[ServerConfig, _doc("process-wide settings")] = msgspec.field(
        default_factory=ServerConfig)
    smtp: Annotated[SmtpConfig, _doc("SMTP acceptors")] = msgspec.field(
        default_factory=SmtpConfig)
    http: Annotated[HttpConfig, _doc("HTTP injection API in the acceptors")] = msgspec.field(
        default_factory=HttpConfig)
    spool: Annotated[SpoolConfig, _doc("spool writers")] = msgspec.field(
        default_factory=SpoolConfig)
    delivery: Annotated[DeliveryConfig, _doc("delivery processes")] = msgspec.field(
        default_factory=DeliveryConfig)
    dkim: Annotated[DkimConfig, _doc("DKIM signing (see mta/dkim.py)")] = msgspec.field(
        default_factory=DkimConfig)
    egress: Annotated[EgressConfig, _doc("egress sources and pools")] = msgspec.field(
        default_factory=EgressConfig)
    feedback: Annotated[FeedbackConfig, _doc(
        "what senders learn about their messages: bounce classification")] = msgspec.field(
        default_factory=FeedbackConfig)
    suppression: Annotated[SuppressionConfig, _doc("suppression list")] = msgspec.field(
        default_factory=SuppressionConfig)
    events: Annotated[EventsConfig, _doc(
        "the events process: the event log's rotation and retention, checkpoints, the "
        "events backlog bound; the events store and the events API")] = msgspec.field(
        default_factory=EventsConfig)
    admin: Annotated[AdminConfig, _doc(
        "the admin listener: Prometheus /metrics and the admin API")] = msgspec.field(
        default_factory=AdminConfig)
    webhooks: Annotated[WebhooksConfig, _doc(
        "pushing event batches to webhooks")] = msgspec.field(default_factory=WebhooksConfig)
    webhook: Annotated[list[WebhookEntry], _doc(
        "webhooks defined here: [[webhook]] tables (read-only through the API)")] = \
        msgspec.field(default_factory=list)
    shaping: Annotated[list[ShapingRule], _doc(
        "traffic shaping rules: [[shaping]] tables matched by recipient domain, MX host "
        "pattern or site, optionally per source; every matching rule applies, the shipped "
        "presets first, then these in order, rules naming a source last; a later rule's "
        "keys override an earlier one's")] = msgspec.field(default_factory=list)
    response_rule: Annotated[list[ResponseRule], _doc(
        "response rules: [[response_rule]] tables, a reply pattern and what to do when a "
        "receiver answers with it; tried in order before the shipped presets, the first "
        "match wins")] = msgspec.field(default_factory=list)
    backoff: Annotated[BackoffConfig, _doc(
        "automatic back-off per source x site")] = msgspec.field(default_factory=BackoffConfig)
    cluster: Annotated[ClusterConfig, _doc(
        "several nodes sharing the shaping limits (see docs/cluster.md)")] = msgspec.field(
        default_factory=ClusterConfig)
    warmup: Annotated[list[WarmupConfig], _doc(
        "IP warm-up: [[warmup]] tables, a schedule of caps per site for a new source by "
        "days since its first use (recorded durably in the state directory)")] = \
        msgspec.field(default_factory=list)


SECTIONS = (("server", ServerConfig), ("smtp", SmtpConfig), ("http", HttpConfig),
            ("spool", SpoolConfig), ("delivery", DeliveryConfig), ("dkim", DkimConfig),
            ("egress", EgressConfig), ("feedback", FeedbackConfig),
            ("suppression", SuppressionConfig), ("events", EventsConfig),
            ("webhooks", WebhooksConfig), ("admin", AdminConfig), ("backoff", BackoffConfig),
            ("cluster", ClusterConfig))
# [[shaping]], [[response_rule]], [[warmup]], [[webhook]]: arrays of tables at the top
TOP_LEVEL_TABLES = (("shaping", ShapingRule), ("response_rule", ResponseRule),
                    ("warmup", WarmupConfig), ("webhook", WebhookEntry))
