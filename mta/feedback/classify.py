"""Bounce classification: an SMTP reply -> SparkPost's ``bounce_class`` and the rule that decided.

The rules are data (TOML): the shipped table ``bounce_rules.toml`` next to
this file, and optionally the operator's own file (``feedback.bounce_rules``
in the configuration), whose rules are tried FIRST, in file order, so an
operator can override any shipped rule.  Each rule is a ``[[rule]]`` table:

- ``name``: a readable name, recorded with the event (``bounce_rule``);
  unique within its file; letters, digits, ``.``, ``_`` and ``-``;
- ``class``: the SparkPost bounce class (1, 10, 20-25, 30, 40, 50-54, 60, 70,
  80, 90 or 100; see ``BOUNCE_CLASSES``);
- ``code`` (optional): the SMTP reply code, as an integer (``550``), a
  pattern with ``x`` for any digit (``"5xx"``, ``"55x"``) or a range
  (``"450-459"``);
- ``enhanced`` (optional): the enhanced status code, exact (``"5.1.1"``) or
  a prefix ending in a dot (``"5.1."``, ``"4."``);
- ``text`` (optional): a regular expression searched (not anchored) in the
  reply text, case-insensitively; the text of a reply of several lines is
  their texts joined with spaces.

A rule matches when all the keys it has match; a rule with none of the three
is refused.  The first rule that matches decides.  The shipped file is kept
in four tiers, tried in this order whatever their place in the file: rules
with a ``text`` pattern (the providers' documented replies), then rules with
an ``enhanced`` code, then rules with only a ``code``.  A reply no rule
matches is class 1 (Undetermined) with the rule name ``"undetermined"``.

Speed: everything is compiled once; the rules are bucketed by the first
digit of the reply code they can match, so a 4xx reply is never tried
against a rule for 5xx; within a bucket the cheap integer and prefix tests
run before any regular expression (``bench/test_bench_classify.py``).
"""
from __future__ import annotations

import hashlib
import re
import tomllib
from functools import lru_cache
from importlib import resources

__all__ = ["BOUNCE_CLASSES", "UNDETERMINED", "Rule", "Classifier", "RuleError",
           "parse_rules", "load_rules", "shipped_rules", "SHIPPED_FILE"]

SHIPPED_FILE = "bounce_rules.toml"
UNDETERMINED = (1, "undetermined")
MEMO_SIZE = 4096        # distinct replies whose class is remembered (see Classifier.classify)
MAX_RULES = 10_000          # per file: more is a mistake, not a table
MAX_PATTERN = 2_000         # characters of one text pattern

# SparkPost's bounce classes: number -> (name, category).
BOUNCE_CLASSES = {
    1: ("Undetermined", "Undetermined"),
    10: ("Invalid Recipient", "Hard"),
    20: ("Soft Bounce", "Soft"),
    21: ("DNS Failure", "Soft"),
    22: ("Mailbox Full", "Soft"),
    23: ("Too Large", "Soft"),
    24: ("Timeout", "Soft"),
    25: ("Admin Failure", "Admin"),
    30: ("Generic Bounce: No RCPT", "Hard"),
    40: ("Generic Bounce", "Soft"),
    50: ("Mail Block", "Block"),
    51: ("Spam Block", "Block"),
    52: ("Spam Content", "Block"),
    53: ("Prohibited Attachment", "Block"),
    54: ("Relaying Denied", "Block"),
    60: ("Auto-Reply", "Soft"),
    70: ("Transient Failure", "Soft"),
    80: ("Subscribe", "Admin"),
    90: ("Unsubscribe", "Hard"),
    100: ("Challenge-Response", "Soft"),
}

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_ENH_RE = re.compile(r"[245]\.(?:[0-9]{1,3}\.(?:[0-9]{1,3})?)?|[245]\.")
_CODE_X_RE = re.compile(r"[2-5][0-9x][0-9x]")
_CODE_RANGE_RE = re.compile(r"([2-5][0-9][0-9])\s*-\s*([2-5][0-9][0-9])")
_KEYS = {"name", "class", "code", "enhanced", "text"}


class RuleError(ValueError):
    """A bad rules file; the message names the file, the rule and the key."""


class Rule:
    """One compiled rule."""

    __slots__ = ("name", "bounce_class", "lo", "hi", "enhanced", "prefix", "regex", "tier")

    def __init__(self, name: str, bounce_class: int, lo: int = 0, hi: int = 999,
                 enhanced: str = "", text: str = ""):
        self.name = name
        self.bounce_class = bounce_class
        self.lo = lo
        self.hi = hi
        self.enhanced = enhanced
        self.prefix = enhanced.endswith(".")
        self.regex = re.compile(text, re.IGNORECASE) if text else None
        self.tier = 0 if text else (1 if enhanced else 2)

    def digits(self) -> set[int]:
        """First digits of the reply codes this rule can match."""
        ds = set(range(self.lo // 100, self.hi // 100 + 1)) & {2, 3, 4, 5}
        if self.enhanced:
            ds &= {int(self.enhanced[0])}
        return ds

    def matches(self, code: int, enhanced: str, text: str) -> bool:
        if not self.lo <= code <= self.hi:
            return False
        if self.enhanced:
            if self.prefix:
                if not enhanced.startswith(self.enhanced):
                    return False
            elif enhanced != self.enhanced:
                return False
        return self.regex is None or self.regex.search(text) is not None

    def __repr__(self) -> str:
        return f"Rule({self.name!r}, class {self.bounce_class})"


def _code_range(value, where: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise RuleError(f"{where}.code: expected a reply code like 550, \"5xx\" or "
                        f"\"450-459\", got {value!r}")
    if isinstance(value, int):
        if not 200 <= value <= 599:
            raise RuleError(f"{where}.code: {value} is not an SMTP reply code (200-599)")
        return value, value
    if isinstance(value, str):
        v = value.strip().lower()
        if _CODE_X_RE.fullmatch(v):
            return int(v.replace("x", "0")), int(v.replace("x", "9"))
        m = _CODE_RANGE_RE.fullmatch(v)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                raise RuleError(f"{where}.code: the range {value!r} is empty (first > last)")
            return lo, hi
    raise RuleError(f"{where}.code: expected a reply code like 550, \"5xx\" or \"450-459\", "
                    f"got {value!r}")


def parse_rules(data: dict, origin: str) -> list[Rule]:
    """Rules from a decoded TOML document; RuleError naming ``origin: rule[i] (name).key``."""
    if not isinstance(data, dict):
        raise RuleError(f"{origin}: expected a TOML document")
    extra = set(data) - {"rule"}
    if extra:
        raise RuleError(f"{origin}: unknown key {sorted(extra)[0]!r} (rules are [[rule]] tables)")
    raw = data.get("rule", [])
    if not isinstance(raw, list):
        raise RuleError(f"{origin}: rule: expected [[rule]] tables")
    if len(raw) > MAX_RULES:
        raise RuleError(f"{origin}: {len(raw)} rules; at most {MAX_RULES}")
    rules, seen = [], set()
    for i, r in enumerate(raw):
        where = f"{origin}: rule[{i}]"
        if not isinstance(r, dict):
            raise RuleError(f"{where}: expected a table")
        name = r.get("name")
        if isinstance(name, str) and name:
            where = f"{where} ({name})"
        unknown = set(r) - _KEYS
        if unknown:
            raise RuleError(f"{where}.{sorted(unknown)[0]}: unknown key (known: "
                            f"{', '.join(sorted(_KEYS))})")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise RuleError(f"{where}.name: expected a name of letters, digits, '.', '_' "
                            f"and '-' (at most 100), got {name!r}")
        if name in seen:
            raise RuleError(f"{where}.name: {name!r} is used twice in this file")
        if name == UNDETERMINED[1]:
            raise RuleError(f"{where}.name: {name!r} is reserved for unmatched replies")
        seen.add(name)
        bc = r.get("class")
        if isinstance(bc, bool) or not isinstance(bc, int) or bc not in BOUNCE_CLASSES:
            raise RuleError(f"{where}.class: expected a SparkPost bounce class (one of "
                            f"{', '.join(map(str, BOUNCE_CLASSES))}), got {bc!r}")
        lo, hi = _code_range(r["code"], where) if "code" in r else (0, 999)
        enh = r.get("enhanced", "")
        if not isinstance(enh, str) or (enh and not _ENH_RE.fullmatch(enh)):
            raise RuleError(f"{where}.enhanced: expected an enhanced status code like "
                            f"\"5.1.1\" or a prefix like \"5.1.\", got {enh!r}")
        text = r.get("text", "")
        if not isinstance(text, str):
            raise RuleError(f"{where}.text: expected a regular expression (a string)")
        if len(text) > MAX_PATTERN:
            raise RuleError(f"{where}.text: longer than {MAX_PATTERN} characters")
        if "code" not in r and not enh and not text:
            raise RuleError(f"{where}: matches every reply; give at least one of code, "
                            "enhanced and text")
        if enh and "code" in r and int(enh[0]) not in range(lo // 100, hi // 100 + 1):
            raise RuleError(f"{where}.enhanced: {enh!r} never comes with a reply code in "
                            f"{lo}-{hi} (the first digits must agree)")
        try:
            rules.append(Rule(name, bc, lo, hi, enh, text))
        except re.error as exc:
            raise RuleError(f"{where}.text: not a valid regular expression: {exc}") from None
    return rules


def load_rules(path: str) -> list[Rule]:
    """The rules of the TOML file at *path*; RuleError naming the file and the rule."""
    return read_rules(path)[0]


def read_rules(path: str) -> tuple[list[Rule], str]:
    """The rules of the TOML file at *path* and the SHA-256 (hex) of the bytes they were
    read from (a reload tells a file edited in place by it); RuleError as load_rules."""
    rules, digest, _ = read_rules_raw(path)
    return rules, digest


def read_rules_raw(path: str) -> tuple[list[Rule], str, bytes]:
    """read_rules, and the bytes the rules were read from (the supervisor keeps a copy
    of the file it validated for its children: feedback.keep_copy)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise RuleError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_rules_bytes(raw, path), hashlib.sha256(raw).hexdigest(), raw


def parse_rules_bytes(raw: bytes, path: str) -> list[Rule]:
    """The rules of the TOML text *raw* (read from *path*, named in errors)."""
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(f"{path}: {exc}") from None
    except UnicodeDecodeError as exc:
        # TOML is UTF-8 only
        raise RuleError(f"{path}: not UTF-8 (byte {exc.start}): {exc.reason}") from None
    return parse_rules(data, path)


@lru_cache(maxsize=1)
def shipped_rules() -> tuple[Rule, ...]:
    """The shipped table, in tier order (text, enhanced, code; file order within a tier)."""
    ref = resources.files("mta.feedback").joinpath(SHIPPED_FILE)
    data = tomllib.loads(ref.read_text(encoding="utf-8"))
    rules = parse_rules(data, SHIPPED_FILE)
    return tuple(sorted(rules, key=lambda r: r.tier))   # sorted() is stable


class Classifier:
    """Operator rules (in their order), then the shipped table; first match wins."""

    __slots__ = ("rules", "digest", "_buckets", "_memo")

    def __init__(self, operator_rules: list[Rule] | tuple = (), shipped: bool = True,
                 digest: str = ""):
        self.digest = digest        # of the operator's file (read_rules); "" for none
        self.rules: tuple[Rule, ...] = tuple(operator_rules) + (shipped_rules() if shipped
                                                                else ())
        self._buckets: dict[int, tuple[Rule, ...]] = {
            d: tuple(r for r in self.rules if d in r.digits()) for d in (2, 3, 4, 5)}
        self._memo: dict[tuple, tuple[int, str]] = {}

    @classmethod
    def from_file(cls, path: str | None) -> Classifier:
        """The classifier for an operator's rules file (None or "": shipped rules only)."""
        if not path:
            return cls(())
        rules, digest = read_rules(path)
        return cls(rules, digest=digest)

    def classify(self, code: int, enhanced: str | None, text: str | None) -> tuple[int, str]:
        """``(bounce_class, rule_name)`` for one reply; ``(1, "undetermined")`` if none fits.

        Receivers give the same reply to many recipients (a throttled site defers a whole
        batch with one text), and a reply that matches no provider pattern costs tens to
        hundreds of microseconds of regex search: the answers for the last MEMO_SIZE
        distinct replies are kept (a dict in insertion order, the oldest dropped first).
        """
        key = (code, enhanced, text)
        memo = self._memo
        hit = memo.get(key)
        if hit is not None:
            return hit
        answer = self._classify(code, enhanced, text)
        if len(memo) >= MEMO_SIZE:
            del memo[next(iter(memo))]
        memo[key] = answer
        return answer

    def _classify(self, code: int, enhanced: str | None, text: str | None) -> tuple[int, str]:
        enhanced = enhanced or ""
        if 200 <= code < 600:
            bucket = self._buckets[code // 100]
        elif enhanced[:1] in ("2", "4", "5"):
            # No reply code (our own verdict, e.g. an expiry): the enhanced code's
            # class picks the bucket; only rules without a code can match.
            bucket = self._buckets[int(enhanced[0])]
        else:
            return UNDETERMINED
        text = text or ""
        if "\n" in text:
            # A reply over several lines comes with its lines' texts joined by line
            # breaks (the delivery client's SmtpReply): a phrase a receiver folded
            # ("unusual rate of" / "unsolicited mail") is still the phrase.
            text = " ".join(text.split("\n")).replace("\r", "")
        for r in bucket:
            if r.lo <= code <= r.hi and r.matches(code, enhanced, text):
                return r.bounce_class, r.name
        return UNDETERMINED
