"""DKIM signing of outbound mail (RFC 6376; Ed25519 per RFC 8463): leaf library.

What it does: adds one or more DKIM-Signature header fields to a message,
chosen by the domain of its RFC 5322 From address, with an optional fallback
signer for mail no key matches (or for all mail, next to the author's own).
Reads: the ``[dkim]`` section of the configuration (``DkimConfig`` below) and
the private key files it names, once at start and on reload.  Writes nothing.
Talks to no peer: the public keys live in DNS, published by the operator
(``Signer.dns_records()`` gives them; ``mta dkim-records`` prints them).

Used by the acceptor: each acceptor process builds ``Signer.from_config(cfg)``
when it starts (a bad or missing key is caught before that, when the
configuration is loaded: ``mta check-config``, ``mta serve`` and SIGHUP call
``validate(cfg)``, never at send time) and calls ``signer.sign_message(message)``
once per message, before the message is spooled; the spool and delivery
processes send the signed bytes as they are.  The spool shards sign the
notices they write themselves (DSNs, From MAILER-DAEMON@server.hostname: the
key of that domain, or the fallback) with a ``Signer`` of their own, built at
start and again when a reload changes ``[dkim]``.  ``sign`` returns the
DKIM-Signature field(s) to put in front of the message (bytes, ending in the
message's own line end; b"" when no key applies); the signed message is
``fields + message`` (``sign_message`` does that) and is what every attempt
sends.  Nothing is signed twice and the message is never copied to sign it.

Signatures are relaxed/relaxed by default, over the fields of a default list
that are present (but for a field with VT or FF in it, which verifiers do not
agree on: see ``sign``) (From is required and over-signed: listed once more than it
occurs, so no From can be added later), with ``t=`` always, ``x=`` when
``expire_seconds`` is set (counted from the message's scheduled start when that
is later: ``options.start_time`` holds it in the queue for up to 3 days), and
never ``l=``.  Private-key operations go
through ``cryptography`` (OpenSSL): rsa-sha256 with 1024- to 4096-bit keys,
ed25519-sha256.  Canonicalisation is ``mta.mime`` (compiled hot path).

Configuration, as the ``[dkim]`` section of the main TOML file::

    [dkim]
    canonicalization = "relaxed/relaxed"   # default
    # headers = [...]                      # default: DEFAULT_HEADERS below
    # oversign = ["from"]                  # default
    # expire_seconds = 604800              # default: no x=

    [[dkim.keys]]                          # RSA and Ed25519 for the same domain:
    domain = "example.com"                 # both sign mail From example.com
    selector = "rsa2026"
    key_file = "/etc/mta/dkim/example.com.rsa2026.pem"

    [[dkim.keys]]
    domain = "example.com"
    selector = "ed2026"
    key_file = "/etc/mta/dkim/example.com.ed2026.pem"
    algorithm = "ed25519-sha256"

    [[dkim.keys]]
    domain = "esp.example.net"
    selector = "s1"
    key_file = "/etc/mta/dkim/esp.pem"

    [dkim.fallback]                        # mail From other domains is signed
    domain = "esp.example.net"             # as esp.example.net; mode = "always"
    mode = "unmatched"                     # signs every message with it as well

Reload: nothing is swapped inside an acceptor.  On SIGHUP the supervisor loads
and validates the new file (a bad key refuses the reload and the running
acceptors keep their signers), then starts new acceptors beside the old ones; each
new one builds its own ``Signer`` (keys read and parsed there, once).  The
spool shards, which are not replaced, build a new one for their DSNs.

Hot path (per message): one header scan, one pass over the body into SHA-256
(shared by every signature with the same body canonicalisation), one header
canonicalisation per signature, one private-key operation per signature.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from typing import Annotated, Literal

import msgspec
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

from mta import mime

RSA_MIN_BITS = 1024
RSA_MAX_BITS = 4096
FOLD_WIDTH = 76  # characters per line of the DKIM-Signature fields we write
LINE_MAX = 78  # RFC 5322 2.1.1: the first line (v= a= c= d= s=) is folded only beyond it
B64_PIECE = 72  # characters of b= per folded line

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
CANONICALIZATIONS = ("relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple")

# Signed when present, in this order of preference; lower-case.  Trace and
# transport fields (Received, Return-Path, DKIM-Signature) are never signed.
DEFAULT_HEADERS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-id",
    "content-description", "in-reply-to", "references",
    "resent-date", "resent-from", "resent-sender", "resent-to", "resent-cc",
    "resent-message-id",
    "list-id", "list-help", "list-unsubscribe", "list-unsubscribe-post",
    "list-subscribe", "list-post", "list-owner", "list-archive", "feedback-id",
)
DEFAULT_OVERSIGN = ("from",)

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
Canonicalization = Literal["relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple"]
Seconds = Annotated[int, msgspec.Meta(ge=1)]


def _doc(text):
    return msgspec.Meta(description=text)


class DkimKey(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One signing key: a domain, a selector and the private key file."""

    domain: Annotated[str, _doc(
        "Signing domain (d=); mail whose From domain is this one is signed with this key.")]
    selector: Annotated[str, _doc(
        "Selector (s=): the public key is published at SELECTOR._domainkey.DOMAIN.")]
    key_file: Annotated[str, _doc(
        "Path of the private key: PEM (PKCS#1 or PKCS#8); for ed25519 also a base64 32-byte seed.")]
    algorithm: Annotated[Algorithm, _doc(
        "rsa-sha256 (1024- to 4096-bit key) or ed25519-sha256.")] = "rsa-sha256"
    headers: Annotated[list[str] | None, _doc(
        "Header fields signed when present (h=); default: dkim.headers.")] = None
    expire_seconds: Annotated[Seconds | None, _doc(
        "Signature lifetime: x= is t= plus this; default: dkim.expire_seconds.")] = None
    canonicalization: Annotated[Canonicalization | None, _doc(
        "header/body canonicalisation (c=); default: dkim.canonicalization.")] = None
    subdomains: Annotated[bool, _doc(
        "Also sign mail whose From domain is a subdomain of domain.")] = False


class DkimFallback(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The signer used for mail whose From domain has no key of its own."""

    domain: Annotated[str, _doc(
        "Domain of the configured key(s) that sign as fallback.")]
    selector: Annotated[str | None, _doc(
        "Only the key with this selector; default: every key of the domain.")] = None
    mode: Annotated[Literal["unmatched", "always"], _doc(
        "unmatched: sign only mail no key matched; always: add it to every message.")] = "unmatched"


class DkimConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The [dkim] section of the configuration."""

    enabled: Annotated[bool, _doc("Sign outbound mail.")] = True
    keys: Annotated[list[DkimKey], _doc(
        "Signing keys; several keys of one domain all sign (e.g. RSA and Ed25519).")] = \
        msgspec.field(default_factory=list)
    fallback: Annotated[DkimFallback | None, _doc(
        "Signer for mail whose From domain has no key; none: such mail goes unsigned.")] = None
    headers: Annotated[list[str], _doc(
        "Header fields signed when present (h=); From is required.")] = \
        msgspec.field(default_factory=lambda: list(DEFAULT_HEADERS))
    oversign: Annotated[list[str], _doc(
        "Fields listed in h= once more than they occur, so none can be added.")] = \
        msgspec.field(default_factory=lambda: list(DEFAULT_OVERSIGN))
    canonicalization: Annotated[Canonicalization, _doc(
        "header/body canonicalisation (c=).")] = "relaxed/relaxed"
    expire_seconds: Annotated[Seconds | None, _doc(
        "Signature lifetime: x= is t= plus this; none: no x=.  Mail is signed once, at "
        "injection: one queued longer (a retry) leaves with an expired signature (the log "
        "says so at start when this is under delivery.max_age).")] = None


class DkimConfigError(ValueError):
    """The [dkim] configuration is invalid; .errors lists every problem."""

    def __init__(self, errors):
        super().__init__("; ".join(errors))
        self.errors = list(errors)


# -- keys --------------------------------------------------------------------

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_FIELD_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")


def _dns_name_error(name):
    if not name or len(name) > 253:
        return "must be a DNS name of 1 to 253 characters"
    if not name.isascii():
        return "must be ASCII (write an internationalised domain as its xn-- A-label)"
    for label in name.lower().rstrip(".").split("."):
        if not _LABEL.match(label):
            return f"{name!r} is not a valid DNS name (label {label!r})"
    return None


def read_key_file(path) -> bytes:
    """A private key file's bytes; ValueError naming the problem."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None


def files_digest(files: dict) -> str:
    """SHA-256 (hex) of key files' bytes by path (Settings.dkim_key_files; "" for none):
    a reload tells by it a key file replaced in place (the spool shards read it again)."""
    if not files:
        return ""
    h = hashlib.sha256()
    for path in sorted(files):
        name = str(path).encode("utf-8", "surrogateescape")
        h.update(b"%d:%s%d:" % (len(name), name, len(files[path])))
        h.update(files[path])
    return h.hexdigest()


def read_key_files(cfg: DkimConfig) -> dict:
    """The bytes of *cfg*'s key files, read now, by path; ValueError naming the first
    that cannot be read."""
    return {k.key_file: read_key_file(k.key_file) for k in cfg.keys}


def load_key(path, algorithm, data: bytes | None = None):
    """Read (unless its bytes are given, *data*) and parse a private key file; raise
    ValueError naming the problem."""
    if data is None:
        data = read_key_file(path)
    key = None
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            why = str(exc).split(". See ")[0].rstrip(".")  # drop cryptography's FAQ link
            raise ValueError(f"{path} is not a usable PEM private key ({why})") from None
    elif algorithm == "ed25519-sha256":
        try:
            seed = base64.b64decode(b"".join(data.split()), validate=True)
        except ValueError:
            seed = b""
        if len(seed) != 32:
            raise ValueError(f"{path} is neither a PEM key nor a base64 Ed25519 seed")
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    else:
        raise ValueError(f"{path} is not a PEM private key")
    if algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path} holds {_kind(key)} key; rsa-sha256 needs an RSA key")
        if not RSA_MIN_BITS <= key.key_size <= RSA_MAX_BITS:
            raise ValueError(f"{path} holds a {key.key_size}-bit RSA key; "
                             f"rsa-sha256 needs {RSA_MIN_BITS} to {RSA_MAX_BITS} bits")
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path} holds {_kind(key)} key; ed25519-sha256 needs an Ed25519 key")
    return key


def _kind(key):
    """Name the type of a private key for an error message, with its article."""
    for cls, name in ((rsa.RSAPrivateKey, "an RSA"), (ed25519.Ed25519PrivateKey, "an Ed25519"),
                      (ec.EllipticCurvePrivateKey, "an EC"), (ed448.Ed448PrivateKey, "an Ed448")):
        if isinstance(key, cls):
            return name
    # DSA by its class's name: cryptography 51 deprecates its dsa module (a warning at each
    # use of dsa.DSAPrivateKey) and will remove it, and an import of it would then fail.
    if type(key).__name__.startswith("DSA"):
        return "a DSA"
    return "an unsupported"


def public_record(key) -> str:
    """Return the DNS TXT record text publishing the public half of key."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def _check(cfg, prefix, load, files: dict | None = None, keep: dict | None = None):
    """Return (errors, {index: private key}) for a DkimConfig.  A key file whose path is
    in *files* is parsed from the bytes there, not read; *keep*: the bytes of each key
    file read are put there (by path)."""
    errors = []
    loaded = {}
    names = {}
    for field, value in (("headers", cfg.headers), ("oversign", cfg.oversign)):
        for i, h in enumerate(value):
            if not _FIELD_NAME.match(h):
                errors.append(f"{prefix}.{field}[{i}]: {h!r} is not a header field name")
    if "from" not in (h.lower() for h in cfg.headers):
        errors.append(f"{prefix}.headers: must include From (RFC 6376 5.4)")
    if cfg.canonicalization not in CANONICALIZATIONS:
        errors.append(f"{prefix}.canonicalization: must be one of {', '.join(CANONICALIZATIONS)}")
    if cfg.expire_seconds is not None and cfg.expire_seconds < 1:
        errors.append(f"{prefix}.expire_seconds: must be at least 1")
    for i, k in enumerate(cfg.keys):
        at = f"{prefix}.keys[{i}]"
        for field in ("domain", "selector"):
            problem = _dns_name_error(getattr(k, field))
            if problem:
                errors.append(f"{at}.{field}: {problem}")
        if k.algorithm not in ALGORITHMS:
            errors.append(f"{at}.algorithm: must be one of {', '.join(ALGORITHMS)}")
            continue
        if k.canonicalization is not None and k.canonicalization not in CANONICALIZATIONS:
            errors.append(f"{at}.canonicalization: must be one of {', '.join(CANONICALIZATIONS)}")
        if k.expire_seconds is not None and k.expire_seconds < 1:
            errors.append(f"{at}.expire_seconds: must be at least 1")
        if k.headers is not None:
            for j, h in enumerate(k.headers):
                if not _FIELD_NAME.match(h):
                    errors.append(f"{at}.headers[{j}]: {h!r} is not a header field name")
            if "from" not in (h.lower() for h in k.headers):
                errors.append(f"{at}.headers: must include From (RFC 6376 5.4)")
        ident = (k.domain.lower().rstrip("."), k.selector.lower())
        if ident in names:
            errors.append(f"{at}: selector {k.selector} of {k.domain} is already keys[{names[ident]}]")
        names.setdefault(ident, i)
        if load:
            try:
                data = files.get(k.key_file) if files else None
                if data is None:
                    data = read_key_file(k.key_file)
                loaded[i] = load_key(k.key_file, k.algorithm, data)
                if keep is not None:
                    keep[k.key_file] = data
            except ValueError as exc:
                errors.append(f"{at}.key_file: {exc}")
    fb = cfg.fallback
    if fb is not None:
        dom = fb.domain.lower().rstrip(".")
        if not any(d == dom and (fb.selector is None or s == fb.selector.lower())
                   for d, s in names):
            what = dom if fb.selector is None else f"{fb.selector}._domainkey.{dom}"
            errors.append(f"{prefix}.fallback: no key in {prefix}.keys for {what}")
    return errors, loaded


def validate(cfg: DkimConfig, prefix: str = "dkim", keep: dict | None = None) -> list[str]:
    """Return every problem of a [dkim] section, key files included, as 'key: message';
    *keep*: the bytes of the key files read, by path (Settings.dkim_key_files)."""
    return _check(cfg, prefix, load=cfg.enabled, keep=keep)[0]


# -- signing -----------------------------------------------------------------

class _Key:
    """A loaded key with everything about its signatures that does not vary."""

    __slots__ = ("domain", "selector", "algorithm", "private", "is_rsa", "relaxed_header",
                 "relaxed_body", "sign_names", "oversign", "expire", "head", "record",
                 "subdomains")

    def __init__(self, conf: DkimKey, private, cfg: DkimConfig):
        self.domain = conf.domain.lower().rstrip(".")
        self.selector = conf.selector
        self.algorithm = conf.algorithm
        self.private = private
        self.is_rsa = conf.algorithm == "rsa-sha256"
        canon = conf.canonicalization or cfg.canonicalization
        hc, bc = canon.split("/")
        self.relaxed_header = hc == "relaxed"
        self.relaxed_body = bc == "relaxed"
        names = conf.headers if conf.headers is not None else cfg.headers
        self.oversign = tuple(h.lower().encode("ascii") for h in cfg.oversign)
        # An oversigned field is signed too: its extra h= entry then stands for one more
        # than there are, whatever `headers` lists (else that entry signed the lowest
        # field of the name, and another could be added above it unnoticed).
        self.sign_names = frozenset(h.lower().encode("ascii") for h in names) | \
            frozenset(self.oversign)
        self.expire = conf.expire_seconds if conf.expire_seconds is not None else cfg.expire_seconds
        # v= a= c= d= s=, folded before a tag that would take the line past LINE_MAX
        lines = ["DKIM-Signature: v=1;"]
        for tag in (f"a={conf.algorithm};", f"c={canon};", f"d={self.domain};",
                    f"s={self.selector};"):
            if len(lines[-1]) + 1 + len(tag) > LINE_MAX:
                lines.append("\t" + tag)
            else:
                lines[-1] += " " + tag
        self.head = {eol: eol.join(line.encode("ascii") for line in lines)
                     for eol in (b"\r\n", b"\n")}
        self.record = public_record(private)
        self.subdomains = conf.subdomains


_RSA_PADDING = padding.PKCS1v15()
_SHA256 = hashes.SHA256()
_b2a = binascii.b2a_base64
_sha256 = hashlib.sha256
_H_CACHE_MAX = 512  # distinct h= lists remembered (folded text)
_H_CACHE_NAMES = 64  # of at most this many names (a long one, of a message of many
                     # repeated fields, costs ~65 octets a name: folded each time instead)


def _fold_h(names, eol):
    """Fold 'h=a:b:c;' at colons so that lines stay under FOLD_WIDTH."""
    out = [b"\th="]
    width = 3
    for i, n in enumerate(names):
        piece = n + (b":" if i + 1 < len(names) else b";")
        if width + len(piece) > FOLD_WIDTH:
            out.append(eol + b"\t ")
            width = 2
        out.append(piece)
        width += len(piece)
    return b"".join(out)


class Signer:
    """Signs messages with the keys of a DkimConfig, chosen by From domain."""

    def __init__(self, keys, fallback=(), fallback_always=False, enabled=True):
        self._by_domain = {}
        self._subdomains = {}
        self._keys = tuple(keys)
        for key in self._keys:
            self._by_domain.setdefault(key.domain, []).append(key)
            if key.subdomains:
                self._subdomains.setdefault(key.domain, []).append(key)
        self._by_domain = {d: tuple(v) for d, v in self._by_domain.items()}
        self._subdomains = {d: tuple(v) for d, v in self._subdomains.items()}
        self._fallback = tuple(fallback)
        self._fallback_always = fallback_always
        self._enabled = enabled
        self._h_cache = {}
        # What signing costs, for the operator (mta_dkim_* metrics): signatures made, the
        # CPU time of sign() as a whole and of its private-key operations alone (this
        # thread's CPU clock: a system call of about half a microsecond, next to a 2048-bit
        # RSA sign of 0.25-0.8 ms).  The key operation measured where it runs, not in a
        # tight loop, is the figure signing's overhead compares with: run once every few
        # milliseconds it costs more than ``openssl speed`` says (bench/RESULTS.md,
        # "DKIM: the key operation where it runs").
        self.signatures = 0
        self.cpu_seconds = 0.0
        self.key_cpu_seconds = 0.0

    @classmethod
    def from_config(cls, cfg: DkimConfig, prefix: str = "dkim",
                    files: dict | None = None) -> "Signer":
        """Parse every key once; raise DkimConfigError listing every problem.  *files*:
        key files' bytes by path, used instead of reading those files (the ones the
        supervisor validated: Settings.dkim_key_files)."""
        if not cfg.enabled:
            return cls((), enabled=False)
        errors, loaded = _check(cfg, prefix, load=True, files=files)
        if errors:
            raise DkimConfigError(errors)
        keys = [_Key(k, loaded[i], cfg) for i, k in enumerate(cfg.keys)]
        fallback = ()
        if cfg.fallback is not None:
            dom = cfg.fallback.domain.lower().rstrip(".")
            sel = cfg.fallback.selector
            fallback = tuple(k for k in keys
                             if k.domain == dom and (sel is None or k.selector.lower() == sel.lower()))
        return cls(keys, fallback, cfg.fallback is not None and cfg.fallback.mode == "always")

    def dns_records(self) -> dict[str, str]:
        """Return {SELECTOR._domainkey.DOMAIN: TXT text} for every key."""
        return {f"{k.selector}._domainkey.{k.domain}": k.record for k in self._keys}

    def keys_for(self, domain: str | None) -> tuple:
        """Return the keys that sign mail from domain (fallback included)."""
        keys = ()
        if domain:
            if not domain.isascii():
                domain = _a_label(domain)
            domain = domain.rstrip(".")
            keys = self._by_domain.get(domain, ())
            if not keys and self._subdomains:
                parts = domain.split(".")
                for i in range(1, len(parts)):
                    keys = self._subdomains.get(".".join(parts[i:]), ())
                    if keys:
                        break
        if not keys:
            return self._fallback
        if self._fallback_always:
            return keys + tuple(k for k in self._fallback if k not in keys)
        return keys

    def sign(self, message, now: float | None = None,
             scheduled: float | None = None) -> bytes:
        """Return the DKIM-Signature field(s) to prepend to message (b"" if none).

        *scheduled*: when the message may first leave (``options.start_time``), if
        later than now: x= counts from it, or a message scheduled beyond
        ``expire_seconds`` left with its signature expired.
        """
        if not self._enabled:
            return b""
        keys = self.keys_for(mime.from_domain(message))
        if not keys:
            return b""
        start = _cpu()
        header_end, body_start = mime.split_message(message)
        fields = mime.parse_headers(message, header_end)
        eol = _eol(message)
        t = int(time.time() if now is None else now)
        x = t if scheduled is None or scheduled <= t else int(scheduled)   # x= counts from
        body = memoryview(message)[body_start:]
        body_hashes = {}
        out = []
        # VT or FF in a field: RFC 6376's relaxed canonicalisation keeps them (they are not
        # WSP; dkimpy agrees), mailauth folds them as white space, and OpenDKIM's check of
        # such a field fails even with simple canonicalisation.  No signature of it would
        # hold everywhere, so such fields (From excepted: it is always signed) are left
        # out of h=, and out of over-signing: the signature holds for every verifier over
        # the rest.  (Obsolete syntax, RFC 5322 4.2: rare, and usually a bug upstream.)
        head = bytes(memoryview(message)[:header_end])      # (a copy of the header block)
        odd = _vt_ff_names(fields) if _VT in head or _FF in head else None
        for key in keys:
            bh = body_hashes.get(key.relaxed_body)
            if bh is None:
                h = _sha256()
                c = mime.BodyCanonicalizer(key.relaxed_body, h.update)
                c.update(body)
                c.finish()
                bh = body_hashes[key.relaxed_body] = _b2a(h.digest(), newline=False)
            out.append(self._signature(key, fields, bh, t, x, eol, odd))
        self.signatures += len(out)
        self.cpu_seconds += _cpu() - start
        return b"".join(out)

    def sign_message(self, message, now: float | None = None,
                     scheduled: float | None = None) -> bytes:
        """Return message with its DKIM-Signature field(s) in front, ready to send.

        A message that is all header (no empty line) gets the empty line that
        ends its header block: the signature is the same either way, but some
        verifiers (mailauth, OpenDKIM with simple header canonicalisation) see
        no header block without it.  So does an empty message that is signed
        (by a fallback key): the field(s) and the empty line.
        """
        fields = self.sign(message, now, scheduled)
        if not message:
            return fields + b"\r\n" if fields else b""
        if mime.split_message(message)[0] == len(message):
            eol = _eol(message)
            tail = eol if message.endswith(b"\n") else eol + eol
            return fields + bytes(message) + tail
        return fields + bytes(message)

    def _signature(self, key, fields, bh, t, x, eol, odd=None):
        names = mime.select_names(fields, key.sign_names)
        names.extend(key.oversign)
        if odd:
            names = [n for n in names if n not in odd]
        if b"from" not in names:
            # RFC 6376 5.4: From is always in h=, a message without one included (then
            # the signature says there was none); an empty h= was malformed
            names.append(b"from")
        names = tuple(names)
        if len(names) > _H_CACHE_NAMES:
            h_text = _fold_h(names, eol)
        else:
            ck = (names, eol)
            h_text = self._h_cache.get(ck)
            if h_text is None:
                if len(self._h_cache) >= _H_CACHE_MAX:
                    self._h_cache.clear()
                h_text = self._h_cache[ck] = _fold_h(names, eol)
        if key.expire:
            times = b"\tt=%d; x=%d;" % (t, x + key.expire)
        else:
            times = b"\tt=%d;" % t
        unsigned = b"".join((key.head[eol], eol, times, eol, h_text, eol, b"\tbh=", bh, b";",
                             eol, b"\tb="))
        data = mime.canon_headers(fields, names, key.relaxed_header)
        data += mime.canon_header(unsigned, key.relaxed_header)[:-2]
        start = _cpu()
        if key.is_rsa:
            sig = key.private.sign(data, _RSA_PADDING, _SHA256)
        else:
            sig = key.private.sign(_sha256(data).digest())
        self.key_cpu_seconds += _cpu() - start
        b = _b2a(sig, newline=False)
        folded = (eol + b"\t ").join([b[i:i + B64_PIECE] for i in range(0, len(b), B64_PIECE)])
        return b"".join((unsigned, folded, eol))


_cpu = time.thread_time
_VT, _FF = b"\x0b", b"\x0c"


def _vt_ff_names(fields) -> frozenset:
    """The lower-case names of fields with VT or FF in them, From excepted."""
    return frozenset(bytes(name).lower() for name, raw, _s, _e in fields
                     if (_VT in bytes(raw) or _FF in bytes(raw))
                     and bytes(name).lower() != b"from")


def _eol(message):
    """The line end a message uses (its first line's), CRLF by default."""
    nl = message.find(b"\n")
    if nl >= 0 and (nl == 0 or message[nl - 1] != 13):
        return b"\n"
    return b"\r\n"


def _a_label(domain):
    try:
        import idna
        return idna.encode(domain, uts46=True).decode("ascii")
    except Exception:  # not a valid IDN: no key can match it
        return domain
