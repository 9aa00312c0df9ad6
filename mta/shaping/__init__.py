"""Traffic shaping as data: which limits hold for one egress source sending to one site.

A shaping rule (``[[shaping]]`` in the configuration, :class:`ShapingRule` in
``mta/config/schema.py``) names what it applies to with exactly one of

- ``domain``: a recipient domain, exact (``example.com``) or every subdomain
  of one (``*.example.com``, which does not match ``example.com`` itself);
  the rule applies to a site when *any* of the recipient domains queued for
  that site matches -- limits are per source x site, so a domain rule shapes
  the whole site its domain is on (``domain = "gmail.com"`` shapes the site of
  every domain Google hosts), in every delivery process (the engine looks up an
  exact rule's domain at start, and shares a domain that a wildcard matches
  once one process has mail for it: ``mta.delivery.main.RuleDomainShare``);
- ``mx``: a glob over MX host names (``*`` is any run of characters, dots
  included; ``?`` is one character): the rule applies when any MX host of the
  site matches, e.g. ``*.google.com``;
- ``site``: the site's name as ``mta queue`` shows it, compared whole.

All names compare case-insensitively, without a trailing dot; a domain rule
is written in the A-label form and takes the mail to the U-label form of its
domain too (``xn--bcher-kva.de`` shapes the mail to ``bücher.de``).  With
``source`` a rule applies only to deliveries from that egress source.

**Order.**  Every rule that matches applies, in this order: the shipped
presets (``presets.toml`` next to this file; ``delivery.shaping_presets =
false`` leaves them out), then the operator's rules without ``source`` in file
order, then the operator's rules naming a source, in file order.  A key set by
a later rule overrides the same key of an earlier one; a rule that leaves a
key unset leaves the earlier value.  Except ``starttls`` of a ``domain`` rule:
it may make it stricter (none < opportunistic < required), but looser only when
it matches every domain queued for the site, since the site's sessions carry the
mail of every domain that shares its MX hosts; an ``mx`` or ``site`` rule
overrides it as any key.  Keys no rule sets come from
``[delivery]`` (``connection_limit``, ``max_deliveries_per_connection``,
``idle_timeout``, ``starttls``); by default there is no rate limit.

Rates are written ``N/s``, ``N/m``, ``N/h`` or ``N/d`` and held as events per
second (``"3600/h"`` is 1.0).  ``Limits.rules`` names the rules that applied,
in order: ``"preset mx *.google.com"`` for a preset (by what it matches),
``"shaping[2]"`` for the configuration's third ``[[shaping]]`` table.

**Several nodes** (``[cluster] nodes = N``, without a store they share): the
rules are written for the sending of all N nodes together, and each node keeps
to its share -- :meth:`Shaping.limits` answers ``connection_limit`` divided by
N rounded down (at least 1) and both rates divided by N; ``Limits.nodes`` says
so.  Messages per connection, ``idle_timeout`` and ``starttls`` are about one
connection and stay as written (see :func:`share_connections` and the notes
above it for what else is divided: response-rule throttles, warm-up caps).

:class:`Shaping` is built once per process from the validated configuration
and does no I/O afterwards; :meth:`Shaping.limits` answers from a bounded
cache after a pass over the domains it is given; the delivery engine keeps each
site's domains sorted as they join and leave (those a domain rule matches, and
whether there are others) and asks :meth:`Shaping.site_limits`, a cache look-up
whatever the number of domains, whenever a lane is made or re-limited.  :func:`check` is what ``mta check-config`` runs on the rules
(through :func:`mta.config.resolve`): every problem names its key, e.g.
``shaping[3].max_message_rate: ...``.
"""
from __future__ import annotations

import re
import tomllib
from collections import OrderedDict
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources

import msgspec

from mta.config.schema import (RULE_ACTIONS, RULE_SCOPES, RULE_STAGES, ResponseRule,
                               ShapingRule)

__all__ = ["Limits", "Shaping", "parse_rate", "share_connections", "share_rate", "share_cap",
           "share_note", "load_presets", "check", "PRESETS_FILE", "STARTTLS_MODES",
           "check_response_rules", "load_response_presets", "glob_regex"]

STARTTLS_MODES = ("none", "opportunistic", "required")
_TLS_RANK = {m: i for i, m in enumerate(STARTTLS_MODES)}
PRESETS_FILE = "presets.toml"
LIMIT_KEYS = ("connection_limit", "max_deliveries_per_connection", "max_message_rate",
              "max_connection_rate", "idle_timeout", "starttls")

_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)/([smhd])")
MAX_RATE = 1_000_000.0          # events per second; more is a typo, not a limit
# A host name label: letters, digits, hyphens (and underscores, seen in the wild).
_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_GLOB_RE = re.compile(r"[a-z0-9_.*?-]+")
_BOUNDS = {"connection_limit": (1, 10_000), "max_deliveries_per_connection": (1, 1_000_000),
           "idle_timeout": (0, 3600)}


class Limits(msgspec.Struct, frozen=True):
    """The limits for one (source, site); frozen, so cheap to compare and hash."""

    connection_limit: int
    max_deliveries_per_connection: int
    max_message_rate: float | None      # messages per second; None: unlimited
    max_connection_rate: float | None   # new connections per second; None: unlimited
    idle_timeout: float
    starttls: str                       # none | opportunistic | required
    rules: tuple[str, ...]              # the rules that applied, e.g. ("preset mx *.google.com",
    #                                     "shaping[2]")
    nodes: int = 1                      # [cluster] nodes: the limits above are 1/nodes of the
    #                                     rules' (this node's share)


# -- this node's share of limits that several nodes share ([cluster] nodes) ----------
#
# Shared by the nodes (divided): simultaneous connections, message and connection rates,
# response-rule throttles, warm-up caps -- what a receiver counts per source IP or per
# site, whichever node the traffic comes from.  This node's own (not divided): messages
# per connection, idle_timeout and the other timeouts, starttls (about one connection),
# and back-off, whose rates are measured from what this node sent and the site took.

def share_connections(limit: int, nodes: int) -> int:
    """This node's share of a connection limit: rounded down, at least 1 (with more
    nodes than connections each node still sends, over 1; the sum is then *nodes*)."""
    return limit if nodes <= 1 else max(1, limit // nodes)


def share_rate(rate: float | None, nodes: int) -> float | None:
    """This node's share of a rate (events per second; None: unlimited): divided, so
    never 0 for a rate above 0."""
    return rate if rate is None or nodes <= 1 else rate / nodes


def share_cap(cap: int, nodes: int) -> int:
    """This node's share of a warm-up cap (0: no cap, kept): as a connection limit's --
    the nodes together never send more than the cap, unless it is smaller than the
    number of nodes (then one a node)."""
    return cap if cap <= 0 else share_connections(cap, nodes)


def share_note(nodes: int) -> str:
    """What the log, `mta check-config`, `mta queue` and `mta status` say of a share."""
    return f"shaping limits are this node's share: 1/{nodes} ([cluster] nodes = {nodes})"


def parse_rate(text: str) -> float:
    """``"50/s"`` -> 50.0, ``"3600/h"`` -> 1.0; ValueError with a readable reason."""
    if not isinstance(text, str):
        raise ValueError(f"expected a rate like \"50/s\", got {text!r}")
    m = _RATE_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"expected N/s, N/m, N/h or N/d (e.g. \"50/s\", \"3600/h\"), "
                         f"got {text!r}")
    rate = float(m.group(1)) / _UNIT_SECONDS[m.group(2)]
    if rate <= 0:
        raise ValueError(f"{text!r} is no rate: it must be more than 0 (to stop sending "
                         "to a site, use a lower connection_limit or hold the queue)")
    if rate > MAX_RATE:
        raise ValueError(f"{text!r} is more than {MAX_RATE:.0f} per second")
    return rate


def _norm(name: str) -> str:
    return name.strip().lower().rstrip(".")


def _check_hostname(name: str) -> str | None:
    """Why *name* is not a host name (lower case, no trailing dot), or None."""
    if not name:
        return "is empty"
    if not name.isascii():
        return "is not ASCII: write an internationalised name in its xn-- (A-label) form"
    if len(name) > 253:
        return "is longer than 253 characters"
    for label in name.split("."):
        if not label:
            return "has an empty label (two dots in a row, or a leading dot)"
        if not _LABEL_RE.fullmatch(label):
            return (f"has a bad label {label!r}: letters, digits and hyphens only, "
                    "at most 63, not starting or ending with a hyphen")
    return None


def _domain_problem(text: str) -> str | None:
    if any(c.isspace() for c in text):
        return "contains white space"
    name = _norm(text)
    if name.startswith("*."):
        name = name[2:]
        if "." not in name:
            return "a wildcard needs at least two labels after \"*.\" (e.g. *.example.com)"
    elif "*" in name:
        return "\"*\" may only be the first label (*.example.com)"
    return _check_hostname(name)


def _mx_problem(text: str) -> str | None:
    if any(c.isspace() for c in text):
        return "contains white space"
    pat = _norm(text)
    if not pat:
        return "is empty"
    if not pat.isascii():
        return "is not ASCII: write an internationalised name in its xn-- (A-label) form"
    if len(pat) > 253:
        return "is longer than 253 characters"
    if not _GLOB_RE.fullmatch(pat):
        return ("may hold only letters, digits, '-', '_', '.' and the wildcards '*' "
                "and '?'")
    if ".." in pat or pat.startswith("."):
        return "has an empty label (two dots in a row, or a leading dot)"
    return None


def _site_problem(text: str) -> str | None:
    if not text.strip():
        return "is empty"
    if any(c.isspace() for c in text) or not text.isprintable():
        return "contains white space or control characters"
    if len(text) > 1024:
        return "is longer than 1024 characters"
    return None


def _glob_regex(pattern: str) -> re.Pattern:
    parts = []
    for ch in _norm(pattern):
        parts.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
    return re.compile("".join(parts))


def check(rules: list[ShapingRule], sources: set[str], key_prefix: str = "shaping") -> None:
    """Validate shaping rules; raise ValueError naming the key (``shaping[3].mx: ...``).

    *sources* are the configured egress source names; the built-in ``default``
    is always one.
    """
    known = set(sources) | {"default"}
    for i, r in enumerate(rules):
        key = f"{key_prefix}[{i}]"
        if not isinstance(r, ShapingRule):
            raise ValueError(f"{key}: expected a table of shaping keys")
        named = [k for k in ("domain", "mx", "site") if getattr(r, k)]
        if len(named) != 1:
            raise ValueError(f"{key}: set exactly one of domain, mx and site"
                             + (f" (this rule sets {' and '.join(named)})" if named
                                else " (this rule sets none)"))
        what = named[0]
        value = getattr(r, what)
        why = {"domain": _domain_problem, "mx": _mx_problem, "site": _site_problem}[what](value)
        if why:
            raise ValueError(f"{key}.{what}: {value!r} {why}")
        if r.source and r.source not in known:
            names = sorted(known)
            listed = ", ".join(names[:10]) + (f" and {len(names) - 10} more"
                                              if len(names) > 10 else "")
            raise ValueError(f"{key}.source: no [[egress.source]] is called {r.source!r} "
                             f"(known: {listed})")
        if all(getattr(r, k) is None for k in LIMIT_KEYS):
            raise ValueError(f"{key}: sets no limit; set at least one of "
                             f"{', '.join(LIMIT_KEYS)}")
        for k, (lo, hi) in _BOUNDS.items():
            v = getattr(r, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not lo <= v <= hi):
                raise ValueError(f"{key}.{k}: expected a number from {lo} to {hi}, got {v!r}")
        for k in ("max_message_rate", "max_connection_rate"):
            v = getattr(r, k)
            if v is not None:
                try:
                    parse_rate(v)
                except ValueError as exc:
                    raise ValueError(f"{key}.{k}: {exc}") from None
        if r.starttls is not None and r.starttls not in STARTTLS_MODES:
            raise ValueError(f"{key}.starttls: expected one of {', '.join(STARTTLS_MODES)}, "
                             f"got {r.starttls!r}")


def glob_regex(pattern: str) -> re.Pattern:
    """An MX glob (``*.google.com``) as a regular expression (use ``fullmatch``)."""
    return _glob_regex(pattern)


def check_response_rules(rules: list[ResponseRule], key_prefix: str = "response_rule") -> None:
    """Validate response rules; raise ValueError naming the key (``response_rule[2].text``)."""
    names: set[str] = set()
    for i, r in enumerate(rules):
        key = f"{key_prefix}[{i}]"
        if not isinstance(r, ResponseRule):
            raise ValueError(f"{key}: expected a table of response rule keys")
        if not r.name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", r.name):
            raise ValueError(f"{key}.name: a name is required: letters, digits, '-', '_', "
                             f"'.', ':' (at most 64), got {r.name!r}")
        if r.name in names:
            raise ValueError(f"{key}.name: {r.name!r} is used by an earlier rule")
        names.add(r.name)
        for j, st in enumerate(r.stages):
            if st not in RULE_STAGES:
                raise ValueError(f"{key}.stages[{j}]: expected one of "
                                 f"{', '.join(RULE_STAGES)}, got {st!r}")
        if r.code is None and not r.enhanced and not r.text:
            raise ValueError(f"{key}: set at least one of code, enhanced and text (a rule "
                             "that matches every reply is not a rule)")
        if r.enhanced and not re.fullmatch(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}", r.enhanced):
            raise ValueError(f"{key}.enhanced: expected a status code like 4.7.28, "
                             f"got {r.enhanced!r}")
        if r.text:
            if len(r.text) > 1000:
                raise ValueError(f"{key}.text: longer than 1000 characters")
            try:
                re.compile(r.text)
            except re.error as exc:
                raise ValueError(f"{key}.text: not a regular expression: {exc}") from None
        if r.mx:
            why = _mx_problem(r.mx)
            if why:
                raise ValueError(f"{key}.mx: {r.mx!r} {why}")
        if r.action not in RULE_ACTIONS:
            raise ValueError(f"{key}.action: expected one of {', '.join(RULE_ACTIONS)}, "
                             f"got {r.action!r}")
        if r.scope not in RULE_SCOPES:
            raise ValueError(f"{key}.scope: expected one of {', '.join(RULE_SCOPES)}, "
                             f"got {r.scope!r}")
        if r.action in ("suspend", "throttle") and r.duration <= 0:
            raise ValueError(f"{key}.duration: a {r.action} needs a duration above 0 seconds")
        if r.action == "throttle":
            if r.connection_limit is None and r.max_message_rate is None:
                raise ValueError(f"{key}: a throttle sets connection_limit and/or "
                                 "max_message_rate")
            if r.scope != "source_site":
                raise ValueError(f"{key}.scope: a throttle applies to source_site only")
        if r.max_message_rate is not None:
            try:
                parse_rate(r.max_message_rate)
            except ValueError as exc:
                raise ValueError(f"{key}.max_message_rate: {exc}") from None
        if r.action == "bounce" and not r.bounce_class:
            raise ValueError(f"{key}.bounce_class: a bounce action names its bounce class")
        if r.bounce_class and not re.fullmatch(r"[0-9]{1,3}", r.bounce_class):
            raise ValueError(f"{key}.bounce_class: expected a class number like \"51\", "
                             f"got {r.bounce_class!r}")
        if r.action == "defer" and r.delay <= 0:
            raise ValueError(f"{key}.delay: a defer action needs a delay above 0 seconds")


class _PresetsFile(msgspec.Struct, forbid_unknown_fields=True):
    shaping: list[ShapingRule] = msgspec.field(default_factory=list)
    response_rule: list[ResponseRule] = msgspec.field(default_factory=list)


@lru_cache(maxsize=4)
def _presets(path: str | None) -> tuple[ShapingRule, ...]:
    return _preset_file(path)[0]


@lru_cache(maxsize=4)
def _preset_file(path: str | None) -> tuple[tuple[ShapingRule, ...], tuple[ResponseRule, ...]]:
    try:
        if path is None:
            where = f"mta/shaping/{PRESETS_FILE}"
            data = resources.files(__name__).joinpath(PRESETS_FILE).read_bytes()
        else:
            where = path
            with open(path, "rb") as fh:
                data = fh.read()
    except OSError as exc:
        raise ValueError(f"{where}: cannot read the shaping presets: "
                         f"{exc.strerror or exc}") from None
    try:
        raw = tomllib.loads(data.decode("utf-8"))
        parsed = msgspec.convert(raw, _PresetsFile)
        rules = parsed.shaping
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    except msgspec.ValidationError as exc:
        text, sep, at = str(exc).rpartition(" - at `$.")
        raise ValueError(f"{where}: {at.rstrip('`')}: {text}" if sep
                         else f"{where}: {exc}") from None
    for i, r in enumerate(rules):
        if r.source:
            raise ValueError(f"{where}: shaping[{i}].source: a preset applies to every "
                             "source; per-source rules belong in the configuration")
    try:
        check(rules, set())
        check_response_rules(parsed.response_rule)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return tuple(rules), tuple(parsed.response_rule)


def load_response_presets(path: str | None = None) -> list[ResponseRule]:
    """The shipped response rules (``[[response_rule]]`` in ``presets.toml``)."""
    return list(_preset_file(path)[1])


def load_presets(path: str | None = None) -> list[ShapingRule]:
    """The shipped presets (``presets.toml`` in this package), validated like the
    configuration's rules; ValueError naming the file and key when they are bad.
    *path* reads another file (tests)."""
    return list(_presets(path))


def _label(rule: ShapingRule) -> str:
    for k in ("domain", "mx", "site"):
        v = getattr(rule, k)
        if v:
            return f"preset {k} {_norm(v)}"
    return "preset"


class _Rule:
    """One rule, compiled: what it matches and the keys it sets."""

    __slots__ = ("order", "label", "kind", "name", "regex", "source", "values")

    def __init__(self, order: int, label: str, rule: ShapingRule):
        self.order = order
        self.label = label
        self.source = rule.source or None
        self.regex = None
        if rule.domain:
            self.kind, self.name = "domain", _norm(rule.domain)
        elif rule.mx:
            self.kind, self.name = "mx", _norm(rule.mx)
            self.regex = _glob_regex(rule.mx)
        else:
            self.kind, self.name = "site", rule.site.strip().lower()
        values = {}
        for k in LIMIT_KEYS:
            v = getattr(rule, k)
            if v is None:
                continue
            if k in ("max_message_rate", "max_connection_rate"):
                v = parse_rate(v)
            elif k == "idle_timeout":
                v = float(v)
            values[k] = v
        self.values = tuple(values.items())

    def key(self) -> tuple:
        """What the rule matches and sets (not where it stands)."""
        return (self.kind, self.name, self.source, self.values)


class Shaping:
    """The shaping rules of one configuration, compiled for fast lookups.

    Build it once per process (after validation: :func:`mta.config.load`
    runs :func:`check`); it reads nothing afterwards.  ``cache_size`` bounds
    the memo of :meth:`limits` answers and of per-name matches.
    """

    def __init__(self, rules: list[ShapingRule], delivery_cfg, presets: bool = True, *,
                 cache_size: int = 4096, preset_rules: list[ShapingRule] | None = None,
                 nodes: int = 1):
        if cache_size < 1:
            raise ValueError("cache_size: must be at least 1")
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
            raise ValueError(f"nodes: must be an integer of at least 1, not {nodes!r}")
        self.nodes = nodes          # [cluster] nodes: limits() answers this node's share
        self._defaults = (
            ("connection_limit", int(delivery_cfg.connection_limit)),
            ("max_deliveries_per_connection", int(delivery_cfg.max_deliveries_per_connection)),
            ("max_message_rate", None),
            ("max_connection_rate", None),
            ("idle_timeout", float(delivery_cfg.idle_timeout)),
            ("starttls", delivery_cfg.starttls),
        )
        ordered: list[tuple[str, ShapingRule]] = []
        if presets:
            pre = load_presets() if preset_rules is None else preset_rules
            ordered += [(_label(r), r) for r in pre]
        ordered += [(f"shaping[{i}]", r) for i, r in enumerate(rules) if not r.source]
        ordered += [(f"shaping[{i}]", r) for i, r in enumerate(rules) if r.source]
        self._index([_Rule(n, label, r) for n, (label, r) in enumerate(ordered)], cache_size)

    def _index(self, compiled: list[_Rule], cache_size: int) -> None:
        self.rules: tuple[_Rule, ...] = tuple(compiled)
        # Exact domains and wildcard suffixes by name, for lookups per domain
        # label rather than per rule; MX globs are few and tried in turn.
        self._exact: dict[str, list[_Rule]] = {}
        self._suffix: dict[str, list[_Rule]] = {}
        self._site: dict[str, list[_Rule]] = {}
        self._mx: list[_Rule] = []
        for r in compiled:
            if r.kind == "domain" and r.name.startswith("*."):
                self._suffix.setdefault(r.name[2:], []).append(r)
            elif r.kind == "domain":
                self._exact.setdefault(r.name, []).append(r)
            elif r.kind == "site":
                self._site.setdefault(r.name, []).append(r)
            else:
                self._mx.append(r)
        self._cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()
        self._by_domain: OrderedDict = OrderedDict()
        self._by_mx: OrderedDict = OrderedDict()

    @classmethod
    def from_config(cls, cfg, **kw) -> Shaping:
        """From a validated :class:`mta.config.schema.Config`: its [[shaping]]
        rules, [delivery] defaults and ``delivery.shaping_presets``."""
        kw.setdefault("nodes", cfg.cluster.nodes)
        return cls(cfg.shaping, cfg.delivery, cfg.delivery.shaping_presets, **kw)

    def changed(self, other: Shaping) -> Shaping | None:
        """A Shaping of only the rules that differ between this one and *other* (in
        either), to tell which sites a reload's change of rules may concern: a site no
        rule of it matches has the same limits under both.  None when every site may
        have other limits: the [delivery] defaults or the node count differ, or rules
        kept in both apply in another order."""
        if self._defaults != other._defaults or self.nodes != other.nodes:
            return None
        mine = [_Rule.key(r) for r in self.rules]
        theirs = [_Rule.key(r) for r in other.rules]
        differ = set(mine) ^ set(theirs)
        if [k for k in mine if k not in differ] != [k for k in theirs if k not in differ]:
            return None
        out = Shaping.__new__(Shaping)
        out.nodes, out._defaults = self.nodes, self._defaults
        out._index([r for r in self.rules + other.rules if _Rule.key(r) in differ],
                   self._cache_size)
        return out

    # -- matching ---------------------------------------------------------

    @staticmethod
    def _memo(cache: OrderedDict, key, compute, size: int):
        try:
            cache.move_to_end(key)
            return cache[key]
        except KeyError:
            value = compute(key)
            cache[key] = value
            if len(cache) > size:
                cache.popitem(last=False)
            return value

    def _covers(self, rule: _Rule, domains: frozenset) -> bool:
        """True when the domain *rule* matches every one of *domains* (the site's)."""
        return bool(domains) and all(
            rule in self._memo(self._by_domain, _norm(d), self._domain_rules, self._cache_size)
            for d in domains)

    def _domain_rules(self, domain: str) -> tuple[_Rule, ...]:
        if not domain.isascii():
            # The U-label form (bücher.de, mail sent with SMTPUTF8): the rules are in
            # the A-label form (check asks for it).  Once per domain (memoized).
            from mta.dns import normalize_domain
            domain = normalize_domain(domain) or domain
        out = list(self._exact.get(domain, ()))
        if self._suffix:
            rest = domain
            while "." in rest:
                rest = rest.partition(".")[2]
                out += self._suffix.get(rest, ())
        return tuple(out)

    def _mx_rules(self, host: str) -> tuple[_Rule, ...]:
        return tuple(r for r in self._mx if r.regex.fullmatch(host))

    def matching(self, site: str, mx_hosts: Iterable[str], domains: Iterable[str],
                 source: str) -> list[_Rule]:
        """The rules that apply to (source, site), in the order they apply."""
        found: dict[int, _Rule] = {}
        for r in self._site.get(site.strip().lower(), ()):
            found[r.order] = r
        if self._mx:
            for h in mx_hosts:
                for r in self._memo(self._by_mx, _norm(h), self._mx_rules, self._cache_size):
                    found[r.order] = r
        if self._exact or self._suffix:
            for d in domains:
                for r in self._memo(self._by_domain, _norm(d), self._domain_rules,
                                    self._cache_size):
                    found[r.order] = r
        return [found[k] for k in sorted(found)
                if found[k].source is None or found[k].source == source]

    # -- the answer -------------------------------------------------------

    def shapes_domain(self, domain: str) -> bool:
        """Whether a domain rule matches *domain* (of any source)."""
        return bool((self._exact or self._suffix) and self._memo(
            self._by_domain, _norm(domain), self._domain_rules, self._cache_size))

    def limits(self, site: str, mx_hosts: tuple[str, ...], domains: Iterable[str],
               source: str) -> Limits:
        """The limits for deliveries from *source* to *site* (whose MX hosts are
        *mx_hosts* and whose queued recipient domains are *domains*)."""
        # Only the domains a domain rule matches decide, and whether there are others
        # (a rule's looser starttls must match them all): the answer is cached by
        # those.  By the whole set, a provider's site gaining a domain at a time kept
        # a copy of its thousands of domains per answer (gigabytes).
        matched: frozenset = frozenset()
        others = False
        if self._exact or self._suffix:
            shapes = self.shapes_domain
            found = []
            for d in domains:
                if shapes(d):
                    found.append(d)
                else:
                    others = True
            matched = frozenset(found)
        return self.site_limits(site, mx_hosts, matched, others, source)

    def site_limits(self, site: str, mx_hosts: tuple[str, ...], matched: frozenset,
                    others: bool, source: str) -> Limits:
        """:meth:`limits` for a caller that keeps its site's domains sorted as they come
        and go: *matched* the queued domains a domain rule matches (:meth:`shapes_domain`),
        *others* whether any other is queued.  Costs a cache look-up (the key hashes the
        frozenset once: keep the same object while it does not change), not a pass over
        the site's domains -- a provider's site holds 100,000 of them."""
        key = (site, source, matched, others, tuple(mx_hosts))
        try:
            self._cache.move_to_end(key)
            return self._cache[key]
        except KeyError:
            pass
        values = dict(self._defaults)
        applied = []
        for r in self.matching(site, key[4], matched, source):
            tls = values["starttls"]
            values.update(r.values)
            if r.kind == "domain" and _TLS_RANK[values["starttls"]] < _TLS_RANK[tls] and \
                    (others or not self._covers(r, matched)):
                # A domain rule speaks for its domain, but the site's sessions carry
                # every domain's mail: its starttls may require less only when it
                # matches every domain queued for the site (a partner on MX hosts of
                # its own), not for all of gmail.com because one domain Google hosts
                # has a rule saying "opportunistic".
                values["starttls"] = tls
            applied.append(r.label)
        nodes = self.nodes
        if nodes > 1:       # this node's share (once per cached answer, not per message)
            values["connection_limit"] = share_connections(values["connection_limit"], nodes)
            values["max_message_rate"] = share_rate(values["max_message_rate"], nodes)
            values["max_connection_rate"] = share_rate(values["max_connection_rate"], nodes)
        result = Limits(rules=tuple(applied), nodes=nodes, **values)
        self._cache[key] = result
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result
