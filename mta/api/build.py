"""Build one RFC 5322 message per recipient of a transmission, with substitutions.

:class:`Builder` is made once per transmission: it checks everything that does
not depend on the recipient (raising :class:`~mta.api.replies.ApiError` 422
naming the field), compiles the substitution templates and encodes what is
the same for every recipient (attachments, constant header fields) once.
:meth:`Builder.build` then makes one recipient's message, or raises
:class:`RecipientError` (that recipient goes into ``rcpt_to_errors``; its
``event`` says whether it is a generation_failure or a generation_rejection,
whose event :meth:`Builder.refusal_event` makes).

Messages (inline content):
- header fields Date, From, To (``address.header_to``, else built from the
  recipient's name and email), Subject, Reply-To, Message-ID, MIME-Version,
  then ``content.headers`` in order (a ``To``, ``Date``, ``Message-ID`` or
  ``Reply-To`` there replaces the built one); non-ASCII text is written as
  RFC 2047 encoded words (display names and unstructured values), lines are
  folded at spaces to 78 octets where possible and never exceed 998;
- body: text/plain, text/html, or multipart/alternative of both (and of
  ``amp_html`` as text/x-amp-html, between them, when it is given); with
  ``inline_images`` the HTML part becomes multipart/related with the images
  (Content-ID ``<name>``); with ``attachments`` the whole is the first part of
  multipart/mixed.  Text parts are UTF-8, 7bit when they are ASCII with short
  lines, quoted-printable otherwise; attachments are base64 in 76-octet lines.
- an address that is not ASCII (address.header_to, Cc, Reply-To) is written as
  it is, in UTF-8 (RFC 6532), and the message is then sent with SMTPUTF8;
- a display name whose comma is not quoted (``Müller, Hans <h@x>``, in a
  recipient's address or content.from given as a string, or a non-ASCII address
  field) is one mailbox's name, written quoted or encoded, not two addresses;
- A CR or LF in any header name or value is refused: the email package would
  write a header *name* containing CRLF as it is, so names and values are
  checked here before anything is built; so is any other C0 control character
  but TAB (and DEL) in a value (Subject, names, content.headers, a substituted
  value), which RFC 5322 does not allow there and a reader would act on (BEL,
  an ESC sequence).

``email_rfc822``: line ends are made CRLF; the message must have a From field,
no NUL and no line over 998 octets.  Substitutions apply to the top-level
header fields and to the first text/plain, text/html and text/x-amp-html
(AMP: escaped as HTML) parts that are not transfer-encoded (as SparkPost
does); a header field that is not ASCII once substituted is written again
with RFC 2047 encoded words, as SparkPost does (an address that is not ASCII
stays as it is, sent with SMTPUTF8); Date, Message-ID and To are added when
missing.

Substitution: ``{{ name }}`` and paths ``{{ address.email }}``, with SparkPost's
square brackets (``{{ cart[1].name }}``: arrays count from 1; ``{{ a['key'] }}``,
``{{ a[other.name] }}``: the key or index another value holds); ``{{ #list }}`` is
an array's length; the macros ``{{ opening_double_curly() }}`` (and
closing_, _triple_) write braces; ``{{ render_dynamic_content(dynamic_html.x) }}``
renders that value as a template of its own, unescaped (SparkPost's dynamic
content; one that is no template is the recipient's generation_failure);
``{{{ name }}}`` inserts HTML unescaped; ``{{ name or 'default' }}`` (or
another path, or a number) gives a value for a missing, null or false one.  A name is looked up in the
recipient's ``substitution_data``, then in the recipient itself (``address``:
email, name, header_to), then in the recipient's ``metadata``, then in the
transmission's ``substitution_data``, then in its ``metadata`` (SparkPost's
order: metadata is substitution data too); SparkPost's reserved ``email`` and
``email_id`` are the recipient's address, ``env_from`` and ``return_path`` the
envelope sender; a missing one renders empty, a
number as JavaScript writes it (5.0 as "5", as SparkPost renders it), true and
false as words.
Values are HTML-escaped in HTML parts; in a link of a part (text from http://
or https:// to a space, quote or angle bracket) they are URL-encoded instead,
as SparkPost does ({{{ }}}: as they are).  In the AMP part, the expressions
inside an amp-mustache template are the reader's client's and stay as written,
but for those naming "sparkpost" or using loop_var (SparkPost's rule).

Statements: ``{{ if c }}`` ... ``{{ elseif c }}`` ... ``{{ else }}`` ...
``{{ end }}``, where a condition is made of values (paths, quoted strings,
numbers, true, false, nil, ``#list``, ``empty(list)``), the relations == != <
> <= >=, not, and, or and parentheses, and holds unless it is null (missing) or
false ("", 0 and [] hold; values compare without conversion, "1" is not 1, and
an order between other than two numbers or two strings does not hold);
``{{ each list }}`` ... ``{{ end }}`` repeats for each item, with ``loop_var``,
``loop_index`` (from 1) and ``loop_vars.<name of the list>`` (nested loops).
The spaces and the line end after a statement are not written (after
``{{ end }}`` followed by text on its line: the line end before it), so a
statement alone on its line leaves no blank line.  Bounds: MAX_NESTING_BLOCKS
statements open at once, MAX_CONDITION tokens in a condition, MAX_LOOP_STEPS
pieces rendered by loops (items x the pieces of the loop's body) and by
render_dynamic_content() (its chunk's pieces, each time) per recipient's
message, over all its texts -- parts, subject and every header field (more: its
generation_failure).
Any ``{{`` that starts no expression or statement, and a statement out of
place or not closed, is a 422 (code 3000, naming the field and line, as
SparkPost answers a syntax error), but inside an amp-mustache template.
Arithmetic (``{{ price - 5 }}``) is not supported (such a 422).  ``options.perform_substitutions: false``
(SparkPost's switch) turns it off in the parts (text, html, amp_html;
email_rfc822's body), sent as written, ``{{ }}`` included; the header fields
are still substituted, as SparkPost does.
"""
from __future__ import annotations

import base64
import binascii
import bisect
import html as html_mod
import json
import operator
import os
import re
from email.message import Message
from email.utils import collapse_rfc2231_value, getaddresses, parseaddr
from urllib.parse import quote

import orjson

from mta import mime, native, rfcdate
from mta.api import replies as R
from mta.api.transmissions import MAX_METADATA, MAX_TAGS, Address, Transmission, json_len
from mta.idn import ascii_address, domain_problem
from mta.obs import events as ev

MAX_LINE = 998            # octets per line, RFC 5322 2.1.1
_NOT_7BIT = mime.FLAG_8BIT | mime.FLAG_NUL | mime.FLAG_LONG_LINE   # (text_body)
FOLD_AT = 78              # octets per header line where a space allows it
MAX_WORD = 900            # a display name's longest word as it is (longer: encoded words)
MAX_FIELD_NAME = 200      # characters of a header field name in content.headers
# The defaults of http.max_header_field_length and http.max_header_block_size (a
# Builder is given the configured ones):
MAX_FIELD_VALUE = 100_000  # characters of a header field's value as rendered (Postfix's
                           # header_size_limit is 102400 for the whole header); a 46 MB
                           # Subject made of substitutions took 4 s to fold
MAX_HEADER_BLOCK = 1_000_000  # octets of a message's header fields as built (Postfix
                           # takes 102400); content.headers has no bound of its own in
                           # count: 2,000 fields of a 50 KB value took 9 s to fold
_SPACE_RUN = " " * 64     # spaces in a row that a header value keeps only encoded
WORD_OCTETS = 39          # UTF-8 octets per encoded word: "=?utf-8?b?" + 52 + "?=" = 64
PHRASE_OCTETS = 45        # in display names: "=?utf-8?b?" + 60 + "?=" = 72 (limit 75); names
                          # of up to 45 octets stay one word, which every decoder reads alike
MAX_ATTACHMENT_NAME = 255
PARAM_PIECE = 60          # characters of a %-encoded RFC 2231 continuation (whole characters)
MAX_TYPE = 900            # characters of an attachment's type with its parameters
# the parts of email_rfc822 substituted in (the first of each type, as SparkPost)
_RFC822_TEXT = ("text/plain", "text/html", "text/x-amp-html")
MAX_NESTING = 8           # multipart levels searched for text parts of email_rfc822
MAX_PARTS = 256           # parts of email_rfc822 looked at for them (on the event loop:
                          # reading a Content-Type costs up to ~0.7 ms, see _content_type)
TEMPLATE_CACHE = 512      # compiled templates kept for reuse (then the cache starts over)
TEMPLATE_CACHE_TEXT = 64 * 1024   # longest text whose compiled form is kept
TEMPLATE_CACHE_PARTS = 256  # and most pieces (a substitution's takes ~115 octets)
VALUE_CACHE = 4096        # compiled value expressions kept (then the cache starts over)
VALUE_CACHE_EXPR = 256    # longest expression kept

# Header fields the MTA writes itself; content.headers may not set them.
_RESERVED = frozenset(("content-type", "content-transfer-encoding", "mime-version", "from",
                       "subject"))
# Fields of content.headers that replace the built ones.
_REPLACING = frozenset(("to", "date", "message-id", "reply-to"))
_ADDRESS_FIELDS = frozenset(("to", "cc", "bcc", "reply-to", "sender"))

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")           # RFC 5322 ftext
_MIME_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*"
                        r"(\s*;\s*[\x20-\x7e]*)?\Z")
# C0 controls but TAB, and DEL: not header text (RFC 5322 3.2.5: VCHAR and WSP); CR and
# LF would start a new field, the others reach the reader (a BEL, an ESC sequence)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_PHRASE_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]+\Z")
_NAME = r"[A-Za-z_][A-Za-z0-9_-]*"
_DOTTED = rf"{_NAME}(?:\.{_NAME})*"
# a path: names with dots, and square brackets holding an array's index (from 1), a
# quoted key or another dotted path whose value is the key or index
_INDEX = rf"""\[\s*(?:[0-9]+|'[^'{{}}\r\n]*'|"[^"{{}}\r\n]*"|{_DOTTED})\s*\]"""
_PATH = rf"{_NAME}(?:\.{_NAME}|{_INDEX})*"
# a default after "or": another path, a quoted string or a number
_OPERAND = _PATH + r"""|'[^'{}\r\n]*'|"[^"{}\r\n]*"|-?[0-9]+(?:\.[0-9]+)?"""
# "#path": the length of an array; the macros that write braces; dynamic content
_EXPR = rf"#\s*{_PATH}|(?:opening|closing)_(?:double|triple)_curly\(\s*\)|" \
    rf"render_dynamic_content\(\s*{_PATH}\s*\)|{_PATH}(?:\s+or\s+(?:{_OPERAND}))*"
_BRACES = {"opening_double": "{{", "closing_double": "}}", "opening_triple": "{{{",
           "closing_triple": "}}}"}
_TAG = re.compile(rf"\{{\{{\{{\s*({_EXPR})\s*\}}\}}\}}|\{{\{{\s*({_EXPR})\s*\}}\}}")
_ALT = re.compile(rf"\s+or\s+({_OPERAND})")
_PATH_RE = re.compile(_PATH)
_STEP = re.compile(rf"""\.?({_NAME})|\[\s*(?:([0-9]+)|'([^']*)'|"([^"]*)"|({_DOTTED}))\s*\]""")
# a link of the parts' text, where a value is URL-encoded: from its scheme to one of these
_SCHEME = re.compile(r"https?://", re.IGNORECASE)
# the start tag of an AMP part's amp-mustache template (with "amp-mustache" in it)
_MUSTACHE_OPEN = re.compile(r"<(template|script)\b[^<>]*>", re.IGNORECASE)
_LINK_ENDS = (" ", "\t", "\r", "\n", '"', "'", "<", ">")
_LINK_ENDS_RARE = tuple(c for c in _LINK_ENDS if c not in " \n")
# the text up to its last link end (".*" takes all of it at once, then gives back a
# character at a time until one is there: as long as the text after the last end; with
# none, the whole text again, so only up to LINK_SCAN characters)
_LAST_LINK_END = re.compile(".*[" + re.escape("".join(_LINK_ENDS)) + "]", re.S)
LINK_SCAN = 4096
# what a value in a link is written with: RFC 3986's unreserved characters as they are,
# every other octet %XX (quote(value, safe=""))
_URL_UNSAFE = re.compile(r"[^A-Za-z0-9_.~-]")
# (every ASCII character in it, the safe ones as they are: str.translate raises and
# clears a KeyError for each character missing from its table)
_URL_TABLE = {c: f"%{c:02X}" if _URL_UNSAFE.match(chr(c)) else chr(c) for c in range(128)}
# a statement of SparkPost's template language (groups 1 and 2: if, elseif, each and
# its argument; 3: else, end), with the spaces and the line end after it, which are
# not written (SparkPost: a statement alone on its line leaves no blank line); then a
# value (_TAG, groups 4 and 5)
_ITEM = re.compile(r"(?<!\{)\{\{\s*(?:(if|elseif|each)\s+([^{}]*?)|(else|end))\s*\}\}[ \t]*(\r?\n)?|"
                   + _TAG.pattern)
# the tokens of a condition: an operator or parenthesis, a quoted string, a number, a
# path or keyword (and, or, not, true, false, nil, then, empty), anything else (an error)
_TOKEN = re.compile(rf"""\s*(?:(==|!=|<=|>=|<|>|\(|\)|\#)|('[^']*'|"[^"]*")|"""
                    rf"""(-?[0-9]+(?:\.[0-9]+)?)(?![A-Za-z_])|({_PATH})|(\S))""")
_RELATIONS = frozenset(("==", "!=", "<", ">", "<=", ">="))
_STATEMENTS = frozenset(("if", "elseif", "else", "end", "each"))
_CONSTANTS = {"true": True, "false": False, "nil": None}
MAX_NESTING_BLOCKS = 32   # statements open at once in a template
MAX_CONDITION = 256       # tokens of a condition
MAX_LOOP_STEPS = 100_000  # pieces rendered by {{ each }} loops (items x the pieces of the
                          # loop's body) per recipient's message, all its texts together
_BAD_LOCAL = frozenset(' <>()[]\\,;:"@')

_pid = os.getpid()


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


# The events of recipients that could not be built (in a transmission that was
# created): RecipientError.event names the type, its reply the reason SparkPost shows.
FAILURE = (554, "5.3.3", "[internal] Error while rendering the message: ")   # technical
REJECTION = (554, "5.7.1", "[internal] Recipient refused: ")                # by a rule
MAX_EVENT_SUBS = 4096   # octets (JSON) of substitution_data an event repeats; more: left out


class RecipientError(Exception):
    """This recipient cannot be sent to; it goes into rcpt_to_errors.

    *event*: the recipient's event when its transmission is created anyway
    (Builder.refusal_event): ``generation_failure`` when its message could not be
    rendered (a substitution made a header invalid), ``generation_rejection``
    when its own data broke a rule (an invalid address or return_path,
    metadata or tags over their limits); None when there is no recipient to name
    (no address at all).
    """

    def __init__(self, error: R.Error, description: str, event: str | None = None):
        super().__init__(description)
        self.error = error
        self.description = description
        self.event = event

    def entry(self) -> dict:
        return R.error_entry(self.error, self.description)


# ---------------------------------------------------------------- substitution


def js_number(value: float) -> str:
    """A float as JavaScript writes a number (ECMA-262 Number::toString): 5.0 as "5",
    -0.0 as "0", 1e20 in digits, 1e21 as "1e+21", 1e-7 as "1e-7".

    SparkPost renders numbers so (its template language doc: 5.00 renders "5");
    the digits are Python's repr's, the same shortest ones that read back as the
    value.  (JSON has no NaN or Infinity, and the decoder refuses 1e400.)
    """
    if value == 0:
        return "0"
    r = repr(abs(value))
    mant, _, exp = r.partition("e")
    whole, _, frac = mant.partition(".")
    digits = whole + frac
    n = len(whole) + (int(exp) if exp else 0)     # value = 0.DIGITS x 10**n
    z = len(digits) - len(digits.lstrip("0"))
    digits = digits[z:].rstrip("0")
    n -= z
    k = len(digits)
    sign = "-" if value < 0 else ""
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * -n + digits
    e = n - 1
    return (sign + digits[0] + ("." + digits[1:] if k > 1 else "") + "e"
            + ("+" if e > 0 else "-") + str(abs(e)))


def _text_of(value) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if type(value) is float:
        return js_number(value)
    if isinstance(value, int):
        return str(value)   # all its digits, as sent (a JavaScript number would round them)
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:     # an integer beyond 64 bits somewhere inside
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


LENGTH = object()     # the last step of a path "#name": the array's length


def path_of(text: str) -> tuple:
    """The steps of path *text* (``a.b[2]['c'][d.e]``): a key (str), an array's index
    from 1 (int), another path whose value is the key or index (tuple)."""
    steps: list = []
    for m in _STEP.finditer(text):
        name, index, q1, q2, var = m.groups()
        steps.append(name if name is not None else int(index) if index is not None else
                     q1 if q1 is not None else q2 if q2 is not None else
                     tuple(var.split(".")))
    return tuple(steps)


def _step(value, step, scopes: tuple):
    """*value*'s item at an index or a key named by another path; its length (LENGTH)."""
    if step is LENGTH:
        return len(value) if isinstance(value, (list, str)) else None
    if type(step) is tuple:
        step = lookup(step, scopes)
        if isinstance(value, dict):
            return value.get(step) if isinstance(step, str) else None
        if type(step) is float and step.is_integer():
            step = int(step)
    if isinstance(value, list) and type(step) is int and 1 <= step <= len(value):
        return value[step - 1]
    return None


def lookup(path: tuple, scopes: tuple):
    """The value of *path* (path_of) in the first scope that has its first name; None if
    none."""
    head = path[0]
    for scope in scopes:
        if head in scope:
            value = scope[head]
            for name in path[1:]:
                if isinstance(value, dict) and name in value:
                    value = value[name]
                elif type(name) is str:
                    return None
                else:           # (an index, a key named by a path, the length)
                    value = _step(value, name, scopes)
            return value
    return None


# the compiled loop of Template.render for texts of constant pieces and plain
# substitutions (mta._pure.render: its twin, and what it does)
_kernel = native.load("render")
_render_plain = _kernel.render
TooLarge = _kernel.TooLarge     # a message would pass the size bound (http.max_message_size)
_octets = _kernel.octets        # a text's octets as the bound counts them
# the compiled common cases of a message's parts: a plain address, a To or Subject field
# of one line, a Message-ID, a text part that goes as 7bit (mta._pure.fields: the twin)
_fields = native.load("fields")
_plain_email = _fields.plain_email
_mailbox_line = _fields.mailbox_line
_short_line = _fields.short_line
_message_id = _fields.message_id
_text_part_7bit = _fields.text_part_7bit     # (text_part's 7bit case)
_qp_lf = _fields.qp_lf                       # (its quoted-printable: binascii's octets)


class DynamicError(Exception):
    """Dynamic content (render_dynamic_content()) that is no template: a ``{{`` that
    starts no expression, a block without its end (the argument: its text)."""


class Template:
    """A text with ``{{ }}`` substitutions, compiled once, rendered per recipient.

    Make them with :func:`template`, which reuses the compiled form of a text
    seen recently (senders repeat the same content request after request).
    """

    __slots__ = ("parts", "constant", "fixed", "error", "plain")

    def __init__(self, text: str, amp: bool = False, head: bool = False):
        # *amp*: the AMP part's text (amp-mustache templates); *head*: a header block
        # (email_rfc822's), whose line ends a statement does not take
        self.constant = text if "{{" not in text else None
        self.parts: list = []
        self.fixed = 0
        self.error = None       # (line, text) of the first {{ that starts no expression
        self.plain = False      # only text and plain substitutions (_render_plain renders it)
        if self.constant is not None:
            return
        pos = 0
        # the statements open ({{ if }}, {{ each }}): [block, the list its parts go to,
        # where it starts]
        stack: list = []
        parts = self.parts
        link = False        # in a link (text from http:// or https:// to a space, quote, <>)
        # AMP: the amp-mustache templates, whose expressions are the reader's client's
        mustache = _mustache_ranges(text) if amp else ()
        stray = -1          # the first {{ outside the tags (and amp-mustache templates)
        late = -1           # the first such {{ after the last tag
        for i, m in _items(text):
            if m is None:       # (a {{ that starts no tag)
                if late < 0 and not _in_ranges(i, mustache):
                    late = i
                continue
            if stray < 0 and late + 2 <= m.start():
                stray = late    # (-1 still when none; one that runs into this tag is not)
            late = -1
            word = m.group(1) or m.group(3)
            if word is None and mustache and _kept_for_amp(m, mustache):
                continue        # (as written: a piece of the text between tags)
            if m.start() > pos:
                chunk = text[pos:m.start()]
                if word == "end" and m.group(4) is None and m.end() < len(text) and \
                        not head:
                    # text after {{ end }} on its line: the line end before it goes
                    # (SparkPost: "Baltimore\n{{ end }}, Maryland" is one line)
                    chunk = re.sub(r"\r?\n[ \t]*\Z", "", chunk)
                parts.append(chunk)
                cut = _link_end(chunk)      # 0: the link goes on
                if cut or not link:
                    link = _SCHEME.search(chunk, cut) is not None
            pos = m.end()
            if word is not None:
                if head and m.group(4):
                    pos -= len(m.group(4))      # (the field's line end stays)
                parts = _statement(word, m.group(2), stack, self.parts, m.start())
                if parts is None:       # (an error: shown as the text of the statement)
                    stray = m.start() if stray < 0 else stray
                    break
                continue
            # 1: {{{ }}}, as it is; 2: {{ }} in a link, URL-encoded in the parts (render)
            raw = 1 if m.group(5) is not None else 2 if link else 0
            expr = m.group(5) or m.group(6)
            if expr in _STATEMENTS:     # ({{{ end }}}: no value)
                stray = m.start() if stray < 0 else stray
                break
            if expr.startswith("render_dynamic_content"):
                parts.append((path_of(expr[expr.index("(") + 1:].strip(" \t\r\n)")), 3))
                continue
            if expr.endswith(")"):          # opening_double_curly() ...: braces
                parts.append(_BRACES[expr[:expr.index("_curly")]])
                continue
            if expr[0] == "#":
                parts.append((path_of(expr) + (LENGTH,), raw))
                continue
            path, alts = _value(expr)
            parts.append((path, raw) if alts is None else (path, raw, alts))
        else:
            if pos < len(text):
                parts.append(text[pos:])
            if stack and stray < 0:
                stray = stack[-1][2]    # a statement without its {{ end }}
            if stray < 0:
                stray = late
        if stray >= 0:
            seg = text[stray:stray + 64].split("\n", 1)[0]
            end = seg.find("}}", 2)
            end += seg.startswith("{{{") and seg[end + 2:end + 3] == "}"
            self.error = (text.count("\n", 0, stray) + 1, seg[:end + 2] if end > 0 else seg)
            self.parts = [text]     # (never rendered by the builder: _unblocked refuses it)
        if all(isinstance(p, str) for p in self.parts):
            self.constant = "".join(self.parts)     # (a macro's braces written)
        # the octets of the constant parts (render's size bound adds the values')
        self.fixed = _fixed(self.parts)
        # ({{ a.b }}, {{{ a }}}, a value in a link: no statement, default, index, length
        # or dynamic content)
        self.plain = all(type(p) is str or type(p) is tuple and len(p) == 2 and p[1] != 3
                         and all(type(s) is str for s in p[0]) for p in self.parts)

    def render(self, scopes: tuple, html: bool = False, guard=None, limit: int = 0,
               links: bool = False, nested: bool = False) -> str:
        """The text for *scopes*; *guard(value)* may refuse a substituted value by raising.

        *links*: a part's text, whose values in a link are URL-encoded (as SparkPost
        does in the html, amp_html and text parts; a header field has no links).
        *nested*: the text is dynamic content, whose own render_dynamic_content() is
        empty (a chunk rendering itself would never end).

        *limit* (octets in UTF-8, as _octets counts them; 0: none): TooLarge as soon as
        the text would pass it, before it is joined -- a 90 KB value substituted 2,000
        times would otherwise make 180 MB; a block ({{ if }}, {{ each }}, dynamic
        content) has what the text before it left.
        """
        if self.constant is not None:
            return self.constant
        if self.plain and guard is None:
            return _render_plain(self.parts, scopes, html, links, limit, self.fixed, _text_of)
        if not nested and not _steps[1]:
            _steps[0] = 0
            if _dynamics:
                _dynamics.clear()
        return _render(self.parts, scopes, html, guard, limit, links, nested, self.fixed)


# items looped over by the text being rendered (MAX_LOOP_STEPS), and whether a
# message's build counts them over all its texts (Builder.build: set) or each text
# has the bound to itself (a render outside a build)
_steps = [0, False]
_dynamics: dict = {}   # dynamic content compiled for the message being rendered: text ->
                       # (Template, its pieces); cleared with _steps


def _fixed(parts: list) -> int:
    """The octets of the constant text of *parts*."""
    return sum(_octets(p) for p in parts if type(p) is str)


def _rest(limit: int, n: int) -> int:
    """The bound left of *limit* when *n* octets are taken (0: no bound; -1: none left,
    any value passes it)."""
    return 0 if not limit else limit - n if limit > n else -1


def _render(parts: list, scopes: tuple, html: bool, guard, limit: int, links: bool,
            nested: bool, n: int) -> str:
    """*parts* rendered (Template.render; *n*: the octets of their constant text)."""
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append(p)
            continue
        if type(p) is not tuple:        # a block: {{ if }}, {{ each }}
            value = p.render(scopes, html, guard, _rest(limit, n), links, nested)
        else:
            value = lookup(p[0], scopes)
            if len(p) > 2:
                for alt in p[2]:
                    if value is not None and value is not False:
                        break
                    value = alt if isinstance(alt, str) else lookup(alt, scopes)
            if p[1] == 3:
                # render_dynamic_content(): the value is a template, rendered unescaped
                value = "" if nested or not isinstance(value, str) else \
                    _render_dynamic(value, scopes, html, guard, _rest(limit, n), links)
                if guard is not None:
                    guard(value)
            else:
                value = _text_of(value)
                if guard is not None:
                    guard(value)
                if p[1] == 2 and links:
                    if _URL_UNSAFE.search(value) is not None:
                        # (a table for ASCII: a third of quote()'s time, per value in a link)
                        value = value.translate(_URL_TABLE) if value.isascii() else \
                            quote(value, safe="")
                elif html and p[1] != 1:
                    value = html_mod.escape(value)
        out.append(value)
        n += _octets(value)
        if limit and n > limit:
            raise TooLarge(n)
    return "".join(out)


def _render_dynamic(text: str, scopes: tuple, html: bool, guard, limit: int,
                    links: bool) -> str:
    """Dynamic content *text* rendered: compiled once per message (a chunk too large for
    the template cache, referenced 1,000 times, was compiled 1,000 times), and its
    pieces counted with the loops' (MAX_LOOP_STEPS): each reference renders them all."""
    entry = _dynamics.get(text)
    if entry is None:
        t = dynamic(text)
        entry = _dynamics[text] = (t, _pieces(t.parts))
    t, cost = entry
    _steps[0] += cost
    if _steps[0] > MAX_LOOP_STEPS:
        raise LoopLimit(_steps[0])
    return t.render(scopes, html, guard, limit, links, True)


def _mustache_ranges(text: str) -> list:
    """[start, end) of the content of each amp-mustache template of AMP *text*
    (``<template type="amp-mustache">``, ``<script template="amp-mustache">``), in
    order; one that is not closed runs to the end."""
    out = []
    low = None
    pos = 0
    while True:
        m = _MUSTACHE_OPEN.search(text, pos)
        if m is None:
            return out
        pos = m.end()
        if "amp-mustache" not in m.group().lower():
            continue
        if low is None:
            low = text.lower()
        end = low.find("</" + m.group(1).lower(), pos)
        end = len(text) if end < 0 else end
        out.append((pos, end))
        pos = end


def _value(expr: str) -> tuple:
    """The compiled form of value expression *expr* (a path, then its alternatives or
    None), from a cache shared by every template: a text repeats the same few values,
    and a template over the template cache's bounds is compiled for every request."""
    v = _values.get(expr)
    if v is None:
        first = _PATH_RE.match(expr).group()
        alts = _ALT.findall(expr, len(first))
        # {{ a or b or 'text' }}: the first that is there (not missing, null or false);
        # a quoted string or a number is the value as written
        v = (path_of(first), tuple(a[1:-1] if a[0] in "'\"" else a if a[0] in "-0123456789"
                                   else path_of(a) for a in alts) if alts else None)
        if len(expr) <= VALUE_CACHE_EXPR:
            if len(_values) >= VALUE_CACHE:
                _values.clear()
            _values[expr] = v
    return v


def _link_end(chunk: str) -> int:
    """Where *chunk*'s text after its last link end (_LINK_ENDS) begins; 0 when it has none.
    Up to LINK_SCAN octets, one match of _LAST_LINK_END (from the end back to the first
    link end: the text between two values); longer, the last space or LF is found first
    (near the end in text) and the rarer ends only after it, not each through the whole."""
    if len(chunk) <= LINK_SCAN:
        m = _LAST_LINK_END.match(chunk)
        return 0 if m is None else m.end()
    last = max(chunk.rfind(" "), chunk.rfind("\n"))
    return max(last, max(chunk.rfind(c, last + 1) for c in _LINK_ENDS_RARE)) + 1


def _items(text: str):
    """Each ``{{`` of *text* in order, as (where, the _ITEM match there, or None when it
    starts none), found with str.find; the matches are _ITEM.finditer's (every one starts
    at a {{), and the misses say where a stray {{ is in the same pass.  The regex engine
    itself, made by the pattern's look-behind to try every position, took 13 ns an octet
    (1.3 ms for a 100 KB text, most of an HTTP transmission's cost at that size: texts
    over TEMPLATE_CACHE_TEXT are compiled for every request)."""
    find, match = text.find, _ITEM.match
    i = find("{{")
    while i >= 0:
        m = match(text, i)          # (its look-behind sees the text before i)
        yield i, m
        i = find("{{", i + 1 if m is None else m.end())


_START = operator.itemgetter(0)


def _in_ranges(i: int, ranges) -> bool:
    """Whether *i* is in one of the (start, end) *ranges* (sorted, not overlapping)."""
    k = bisect.bisect_right(ranges, i, key=_START) - 1    # (the last to start at i or before)
    return k >= 0 and i < ranges[k][1]


def _kept_for_amp(m, ranges: list) -> bool:
    """Whether tag *m* is in one of the amp-mustache *ranges* and is not SparkPost's
    (its expression names "sparkpost" or uses loop_var, or is a macro writing braces):
    it is then left as written."""
    if not _in_ranges(m.start(), ranges):
        return False
    tag = m.group()
    return "sparkpost" not in tag.lower() and "loop_var" not in tag and \
        not tag.rstrip("}").rstrip().endswith(")")


class LoopLimit(Exception):
    """A text's {{ each }} loops would render more than MAX_LOOP_STEPS pieces."""


def _truthy(value) -> bool:
    """A condition holds unless null (missing) or false -- "", 0, [] hold (SparkPost's,
    Lua's rule)."""
    return value is not None and value is not False


def _same(a, b) -> bool:
    """``a == b`` as SparkPost (Lua) compares: no conversions ("1" is not 1, true not 1);
    arrays and objects only to themselves."""
    if a is None or b is None or type(a) is bool or type(b) is bool:
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) or \
            isinstance(a, str) and isinstance(b, str):
        return a == b
    return a is b


def _evaluate(node: tuple, scopes: tuple):
    """The value of condition *node* (:func:`_condition`) for *scopes*."""
    kind = node[0]
    if kind == "v":
        return lookup(node[1], scopes)
    if kind == "c":
        return node[1]
    if kind == "not":
        return not _truthy(_evaluate(node[1], scopes))
    if kind == "and":
        a = _evaluate(node[1], scopes)
        return _evaluate(node[2], scopes) if _truthy(a) else a
    if kind == "or":
        a = _evaluate(node[1], scopes)
        return a if _truthy(a) else _evaluate(node[2], scopes)
    if kind == "empty":
        v = lookup(node[1], scopes)
        return not v if isinstance(v, (list, dict)) else v is None
    op, a, b = node[1], _evaluate(node[2], scopes), _evaluate(node[3], scopes)
    if op == "==":
        return _same(a, b)
    if op == "!=":
        return not _same(a, b)
    # an order: between numbers or between strings (else false, where Lua fails)
    if not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and
            type(a) is not bool and type(b) is not bool or
            isinstance(a, str) and isinstance(b, str)):
        return False
    return a < b if op == "<" else a > b if op == ">" else a <= b if op == "<=" else a >= b


def _condition(text: str) -> tuple | None:
    """The compiled condition of an {{ if }} or {{ elseif }} (a tree of tuples), or None
    when it is not one: paths, quoted strings, numbers, true, false, nil, #path,
    empty(path), the relations == != < > <= >=, not, and, or, parentheses; a
    trailing ``then`` is allowed."""
    tokens: list = []
    pos = 0
    while True:
        m = _TOKEN.match(text, pos)
        if m is None:
            break
        pos = m.end()
        op, quoted, number, path, bad = m.groups()
        if bad is not None or len(tokens) >= MAX_CONDITION:
            return None
        if op is not None:
            tokens.append(op)
        elif quoted is not None:
            tokens.append(("c", quoted[1:-1]))
        elif number is not None:
            tokens.append(("c", float(number) if "." in number else int(number)))
        elif path in _CONSTANTS:
            tokens.append(("c", _CONSTANTS[path]))
        elif path in ("and", "or", "not", "then", "empty"):
            tokens.append(path)
        else:
            tokens.append(("v", path_of(path)))
    if text[pos:].strip():
        return None
    if tokens and tokens[-1] == "then":
        tokens.pop()
    if not tokens or "then" in tokens or tokens.count("(") > MAX_NESTING_BLOCKS:
        return None
    at = [0]

    def peek():
        return tokens[at[0]] if at[0] < len(tokens) else None

    def take(want=None):
        t = peek()
        if t is None or want is not None and t != want:
            raise ValueError(want)
        at[0] += 1
        return t

    def either():           # a or b or ...
        node = both()
        while peek() == "or":
            take()
            node = ("or", node, both())
        return node

    def both():             # a and b and ...
        node = negation()
        while peek() == "and":
            take()
            node = ("and", node, negation())
        return node

    def negation():
        nots = 0
        while peek() == "not":
            take()
            nots += 1
        node = relation()
        for _ in range(nots):
            node = ("not", node)
        return node

    def relation():
        node = operand()
        if peek() in _RELATIONS:
            op = take()
            node = ("cmp", op, node, operand())
        return node

    def operand():
        t = take()
        if t == "(":
            node = either()
            take(")")
            return node
        if t == "#":
            v = take()
            if type(v) is not tuple or v[0] != "v":
                raise ValueError(t)
            return ("v", v[1] + (LENGTH,))
        if t == "empty":
            take("(")
            v = take()
            take(")")
            if type(v) is not tuple or v[0] != "v":
                raise ValueError(t)
            return ("empty", v[1])
        if type(t) is not tuple:
            raise ValueError(t)
        return t

    try:
        node = either()
    except ValueError:
        return None
    return node if at[0] == len(tokens) else None


class _If:
    """{{ if }} ... {{ elseif }} ... {{ else }} ... {{ end }}: the parts of the first
    branch whose condition holds, else those of the else."""

    __slots__ = ("branches", "other")

    def __init__(self):
        self.branches: list = []    # (condition, parts)
        self.other = None           # the parts after {{ else }}

    def render(self, scopes, html, guard, limit, links, nested) -> str:
        for cond, parts in self.branches:
            if _truthy(_evaluate(cond, scopes)):
                return _render(parts, scopes, html, guard, limit, links, nested,
                               _fixed(parts))
        parts = self.other
        return "" if parts is None else _render(parts, scopes, html, guard, limit, links,
                                                nested, _fixed(parts))


class _Each:
    """{{ each list }} ... {{ end }}: the parts for each item of an array, with loop_var
    (the item), loop_index (its place, from 1 as the language's indexes) and
    loop_vars.<name of the list> (the items of the loops it is in)."""

    __slots__ = ("path", "name", "parts", "cost")

    def __init__(self, path: tuple):
        self.path = path
        self.name = next(s for s in reversed(path) if type(s) is str)
        self.parts: list = []
        self.cost = 0           # the pieces of one pass (_pieces(parts), set at its end)

    def render(self, scopes, html, guard, limit, links, nested) -> str:
        items = lookup(self.path, scopes)
        if not isinstance(items, list) or not items:
            return ""
        # (the work, not the output, is what is bounded: an item may render nothing)
        _steps[0] += len(items) * self.cost
        if _steps[0] > MAX_LOOP_STEPS:
            raise LoopLimit(_steps[0])
        outer = lookup(("loop_vars",), scopes)
        fixed = _fixed(self.parts)
        out = []
        n = 0
        for i, item in enumerate(items, 1):
            loop_vars = {**outer, self.name: item} if isinstance(outer, dict) else \
                {self.name: item}
            # (each pass has what the passes before it left)
            text = _render(self.parts, ({"loop_var": item, "loop_index": i,
                                         "loop_vars": loop_vars},) + scopes,
                           html, guard, _rest(limit, n), links, nested, fixed)
            out.append(text)
            n += _octets(text)
            if limit and n > limit:
                raise TooLarge(n)
        return "".join(out)


def _statement(word: str, arg: str | None, stack: list, top: list, start: int) -> list | None:
    """Take statement *word* (if, elseif, else, end, each; *arg*: its condition or list)
    at *start* into the blocks open on *stack* ([block, its current parts, start]);
    the parts list what follows goes to, or None when the statement is an error."""
    current = stack[-1][1] if stack else top
    if word in ("if", "each"):
        if len(stack) >= MAX_NESTING_BLOCKS:
            return None
        if word == "if":
            cond = _condition(arg)
            if cond is None:
                return None
            node = _If()
            node.branches.append((cond, []))
            parts = node.branches[-1][1]
        else:
            if not _PATH_RE.fullmatch(arg):
                return None
            node = _Each(path_of(arg))
            parts = node.parts
        current.append(node)
        stack.append([node, parts, start])
        return parts
    if not stack:
        return None
    frame = stack[-1]
    node = frame[0]
    if word == "end":
        stack.pop()
        if type(node) is _Each:
            node.cost = max(1, _pieces(node.parts))
        return stack[-1][1] if stack else top
    if type(node) is not _If or node.other is not None:
        return None
    if word == "else":
        node.other = frame[1] = []
        return frame[1]
    cond = _condition(arg)          # elseif
    if cond is None:
        return None
    node.branches.append((cond, []))
    frame[1] = node.branches[-1][1]
    return frame[1]


_templates: dict = {}
_values: dict = {}


def literal(text: str, amp: bool = False) -> Template:
    """A Template that renders *text* as it is, ``{{ }}`` included
    (``options.perform_substitutions: false``)."""
    t = Template("")
    t.constant = text
    return t


def _unblocked(field: str, t: Template, line0: int = 0) -> Template:
    """*t*, or ApiError 422 naming *field* when it is no template: a ``{{`` that starts
    no expression or statement, a statement out of place or not closed (its line:
    *line0* + the line in *t*) (found once per compiled text: the template cache keeps
    the answer, so a repeated content costs a lookup)."""
    if t.error is not None:
        # (SparkPost refuses such content too: code 3000, naming the part and line)
        raise R.ApiError(R.SYNTAX, f"{field}: line {line0 + t.error[0]}: {t.error[1]!r} is "
                         "not an expression or statement of the template language, or "
                         "is out of place or not closed (braces are written with "
                         "{{ opening_double_curly() }})")
    return t


def _pieces(parts: list) -> int:
    """The pieces of compiled *parts*: each part, a substitution's defaults, and inside
    statements their parts and their conditions' nodes."""
    n = len(parts)
    for p in parts:
        if type(p) is tuple:
            n += len(p[2]) if len(p) > 2 else 0
        elif type(p) is _If:
            n += sum(_nodes(c) + _pieces(b) for c, b in p.branches) + \
                (_pieces(p.other) if p.other else 0)
        elif type(p) is _Each:
            n += _pieces(p.parts)
    return n


def _nodes(cond: tuple) -> int:
    """The nodes of a compiled condition."""
    return 1 + sum(_nodes(c) for c in cond[1:] if type(c) is tuple and c and
                   type(c[0]) is str and c[0] in _NODE_KINDS)


_NODE_KINDS = frozenset(("v", "c", "not", "and", "or", "cmp", "empty"))


def dynamic(text: str) -> Template:
    """The compiled Template of dynamic content *text*; DynamicError when it is no
    template (it would go out half done)."""
    t = template(text)
    if t.error is not None:
        raise DynamicError(t.error[1])
    return t


def template(text: str, amp: bool = False) -> Template:
    """The compiled Template of *text*, from a small cache (templates are immutable);
    *amp*: the AMP part's, whose amp-mustache templates keep their expressions."""
    if len(text) > TEMPLATE_CACHE_TEXT:
        return Template(text, amp)      # (not kept: nor its hash computed for a look-up)
    key = ("amp", text) if amp else text
    t = _templates.get(key)
    if t is None:
        t = Template(text, amp)
        # (a substitution's defaults are pieces too: {{ a or b or ... }}, thousands of
        # them in one, cost as much as as many substitutions; counted on a miss only)
        if _pieces(t.parts) <= TEMPLATE_CACHE_PARTS:
            if len(_templates) >= TEMPLATE_CACHE:
                _templates.clear()
            _templates[key] = t
    return t


# --------------------------------------------------------------- header fields


def _has_line_break(text: str) -> bool:
    return "\r" in text or "\n" in text or "\0" in text


def _unfit(text: str) -> str | None:
    """Why *text* cannot be in a header field value ("a line break (CR or LF)", "a
    control character (U+0007)"), or None when it can (one regex search)."""
    m = _CONTROL.search(text)
    if m is None:
        return None
    c = m.group()
    return "a line break (CR or LF)" if c in "\r\n" else \
        f"a control character (U+{ord(c):04X})"


def encoded_words(text: str, octets: int = WORD_OCTETS) -> list[str]:
    """RFC 2047 "B" encoded words of UTF-8 *text*, split on character boundaries."""
    data = text.encode("utf-8")
    words = []
    i, n = 0, len(data)
    while i < n:
        j = min(i + octets, n)
        while j < n and (data[j] & 0xC0) == 0x80:   # do not split a character
            j -= 1
        words.append("=?utf-8?b?" + base64.b64encode(data[i:j]).decode("ascii") + "?=")
        i = j
    return words


def _fold(name: str, tokens: list[str]) -> bytes:
    """``name: tokens`` joined by spaces, folded before a space where a line would pass 78."""
    if tokens:
        line = f"{name}: {' '.join(tokens)}"
        if len(line) <= FOLD_AT:    # (the common case: one line, nothing to fold)
            return (line + "\r\n").encode("utf-8")
    line = name + ":"
    lines = []
    for t in tokens:
        if len(line) + 1 + len(t) > FOLD_AT and line.strip() and not line.endswith(":"):
            lines.append(line)
            line = " " + t
        else:
            line += " " + t
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def unstructured(name: str, value: str) -> bytes:
    """One unstructured header field (Subject, X-...), encoded and folded.

    Encoded words instead of the text as it is when a word is too long for a line, or a
    run of spaces is (a folded line may not be white space only: it could not be
    folded, and would pass 998 octets).
    """
    if value.isascii():
        if len(name) + 2 + len(value) <= FOLD_AT:
            return f"{name}: {value}\r\n".encode("ascii")
        tokens = value.split(" ")
        if all(len(t) < MAX_LINE - 1 - len(name) for t in tokens) and _SPACE_RUN not in value:
            return _fold(name, tokens)
    return _fold(name, encoded_words(value))


def mailbox(name: str | None, email: str) -> list[str]:
    """The tokens of ``name <email>``: a quoted or encoded display name, then the address.

    The address is written in its all-ASCII form where it has one (a U-label domain as
    its A-labels): as it is, it would make the message need SMTPUTF8 (RFC 6532), which
    a receiving server without it refuses; a UTF-8 local part stays as it is.
    """
    email = ascii_address(email) or email
    if not name:
        return [email]
    if name.isascii() and (len(name) < len(_SPACE_RUN) or _SPACE_RUN not in name):
        if _PHRASE_ATOMS.match(name) and name.strip() == name:
            phrase = name.split(" ")
        else:
            phrase = ('"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"').split(" ")
        if len(name) <= MAX_WORD or all(len(t) <= MAX_WORD for t in phrase):
            return phrase + [f"<{email}>"]
    # (not ASCII, or a word no line could hold: encoded words, which fold anywhere)
    return encoded_words(name, PHRASE_OCTETS) + [f"<{email}>"]


_from_lines: dict = {}
FROM_LINE_CACHE = 256     # From fields kept (then the cache starts over)


def _from_line(name: str | None, email: str) -> bytes:
    """``From: name <email>``, folded, for a From that does not depend on the recipient
    (kept by name and email: both str, or no name)."""
    key = (name, email)
    line = _from_lines.get(key)
    if line is None:
        line = _fold("From", mailbox(name, email))
        if len(_from_lines) >= FROM_LINE_CACHE:
            _from_lines.clear()
        _from_lines[key] = line
    return line


def address_field(name: str, value: str) -> bytes:
    """An address header field (To, Cc, Reply-To) from text such as ``A <a@x>, b@y``."""
    if value.isascii():
        return unstructured(name, value)
    pairs = getaddresses([value])
    if not all("@" in addr for _, addr in pairs):
        # getaddresses cuts a display name at an unquoted comma ("Müller, Hans <h@x>":
        # "Müller", then "Hans <h@x>") and drops what it cannot read: read it again
        pairs = _address_list(value)
    tokens: list[str] = []
    for display, addr in pairs:
        if tokens:
            tokens[-1] += ","
        tokens += mailbox(display, addr) if addr else encoded_words(display)
    return _fold(name, tokens) if tokens else unstructured(name, value)


def _one_mailbox(text: str) -> tuple[str, str]:
    """(name, address) of ``Müller, Hans <h@x>``: a display name and one address in
    <>, the name's comma left unquoted (RFC 5322 wants it quoted, which parseaddr
    holds to); ("", "") when *text* is not that, or its name holds an address too."""
    text = text.strip()
    lt = text.find("<")
    if lt < 0 or text[-1] != ">" or "<" in text[lt + 1:] or ">" in text[:-1]:
        return "", ""
    phrase, addr = text[:lt].strip(), text[lt + 1:-1].strip()
    if "@" in phrase or "," in addr:
        return "", ""
    return phrase, addr


def _address_list(value: str) -> list[tuple[str, str]]:
    """(name, address) of each mailbox in *value*, leniently: split at the commas outside
    quoted strings, comments and <>; a piece with no address is the start of a display
    name cut at an unquoted comma and goes with the next one (a last such piece: a name
    without an address, address "")."""
    pieces = []
    start = depth = 0
    quoted = angle = escaped = False
    for i, c in enumerate(value):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif quoted:
            quoted = c != '"'
        elif c == '"':
            quoted = True
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif c == "<" and not depth:
            angle = True
        elif c == ">":
            angle = False
        elif c == "," and not depth and not angle:
            pieces.append(value[start:i])
            start = i + 1
    pieces.append(value[start:])
    out = []
    head: list[str] = []        # the pieces of a display name read so far
    for p in pieces:
        if not p.strip():
            continue
        display, addr = _mailbox_of(p)
        if not addr:
            head.append(p)
            continue
        if head:
            # the name's start goes with it, read once: each piece is read alone first,
            # so that a field of many commas is read in linear time
            name = ",".join(head)
            head = []
            joined = _mailbox_of(name + "," + p)
            if joined[1]:
                display, addr = joined
            elif name.strip():
                out.append((name.strip(), ""))
        out.append((display, addr))
    name = ",".join(head).strip()
    if name:
        out.append((name, ""))
    return out


def _mailbox_of(text: str) -> tuple[str, str]:
    """(name, address) of one mailbox, its name's comma unquoted or not; ("", "") or
    no "@" in the address when *text* is none."""
    display, addr = parseaddr(text)
    if "@" not in addr:
        display, addr = _one_mailbox(text)
    return display, addr


def check_field_name(name: str, where: str) -> None:
    """ApiError 422 unless *name* is a valid header field name."""
    if _has_line_break(name):
        raise R.ApiError(R.INVALID, f"{where}: the header name {name!r} contains a line break "
                         "(CR or LF)")
    if not _FIELD_NAME.match(name):
        raise R.ApiError(R.INVALID, f"{where}: {name!r} is not a valid header name")
    if len(name) > MAX_FIELD_NAME:
        raise R.ApiError(R.INVALID, f"{where}: a header name is longer than {MAX_FIELD_NAME} "
                         "characters")


def check_email(addr: str) -> str | None:
    """Why *addr* is not an acceptable email address, or None when it is."""
    plain = _plain_email(addr)
    if plain:
        # the common case: ASCII dot-atoms (one with an xn-- label: checked as an IDN)
        return None if plain == 1 else _idn_problem(addr)
    if not addr:
        return "is empty"
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in addr):
        return "contains white space or control characters"
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        return "is not an email address (local@domain)"
    if len(local.encode()) > 64 or len(domain.encode()) > 255:
        return "is too long"
    if any(c in _BAD_LOCAL for c in local) or local[0] == "." or local[-1] == "." \
            or ".." in local:
        return "has an invalid local part"
    for label in domain.split("."):
        if not label or len(label) > 63 or label[0] == "-" or label[-1] == "-" or \
                not all(c.isalnum() or c == "-" or ord(c) > 0x7F for c in label):
            return "has an invalid domain"
    return _idn_problem(addr)


def _idn_problem(addr: str) -> str | None:
    """Why the domain of *addr* is not an internationalised name delivery can route
    (bad punycode, a code point IDNA 2008 does not allow, a label over 63 octets as
    A-labels), or None: accepted, it would only bounce later."""
    why = domain_problem(addr.rpartition("@")[2])
    return None if why is None else "has an invalid domain: it " + why


# ------------------------------------------------------------------ MIME parts


def text_body(text: str) -> tuple[bytes, bytes]:
    """(Content-Transfer-Encoding, body): 7bit when ASCII with short lines, else QP."""
    data = text.encode("utf-8")
    if "\r" in text:       # (not b"\r" in data: bytes' "in" raises and clears a TypeError)
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    # 8-bit octets, NUL and lines over MAX_LINE in one pass of the compiled scanner
    # (the lines end in LF here; a split into lines was half of this function's time)
    if not mime.scan_body(data, 0, MAX_LINE) & _NOT_7BIT:
        return b"7bit", data.replace(b"\n", b"\r\n")
    return b"quoted-printable", _qp_lf(data)


def text_part(subtype: str, text: str) -> bytes:
    cte, body = text_body(text)
    return (b"Content-Type: text/" + subtype.encode() + b"; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: " + cte + b"\r\n\r\n" + body)


def new_boundary() -> bytes:
    return b"=_" + os.urandom(12).hex().encode()


def multipart(subtype: str, parts: list[bytes]) -> bytes:
    """A multipart entity (its Content-Type field, blank line, body) of *parts*."""
    b = new_boundary()
    out = [b"Content-Type: multipart/", subtype.encode(), b'; boundary="', b, b'"\r\n\r\n']
    for p in parts:
        out += [b"--", b, b"\r\n", p, b"\r\n"]
    out += [b"--", b, b"--\r\n"]
    return b"".join(out)


def _param(key: str, value: str) -> list[str]:
    """``key="value"``, or RFC 2231 ``key*0*=utf-8''...`` pieces when it is not plain ASCII."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return [f'{key}="{value}"']
    # Pieces of whole characters, not only whole %XX: readers that decode each
    # continuation on its own (the email package's parser, some mail clients) would
    # find half a UTF-8 sequence at the end of one piece and the rest in the next.
    pieces = []
    piece = ""
    for ch in value:
        enc = quote(ch, safe="")
        if piece and len(piece) + len(enc) > PARAM_PIECE:
            pieces.append(piece)
            piece = ""
        piece += enc
    pieces.append(piece)
    if len(pieces) == 1:
        return [f"{key}*=utf-8''{pieces[0]}"]
    return [f"{key}*{i}*={'utf-8' + chr(39) * 2 if i == 0 else ''}{p}"
            for i, p in enumerate(pieces)]


def _type_params(ctype: str) -> list[tuple[str, str]]:
    """The parameters of a media type as given, (name, value) unquoted (the standard
    library's reading: quoted strings, RFC 2231 values), to be written again by
    :func:`_param`."""
    m = Message()
    m["Content-Type"] = ctype
    return [(k, collapse_rfc2231_value(v)) for k, v in m.get_params()[1:]]


def attachment_part(att, where: str, inline: bool) -> bytes:
    """One base64 attachment or inline image; ApiError 422 naming the field when it is bad."""
    if _has_line_break(att.type) or not _MIME_TYPE.match(att.type):
        raise R.ApiError(R.INVALID, f"{where}.type: {att.type!r} is not a MIME type")
    name = att.name
    if _has_line_break(name):
        raise R.ApiError(R.INVALID, f"{where}.name: contains a line break (CR or LF)")
    if not name or len(name) > MAX_ATTACHMENT_NAME:
        raise R.ApiError(R.INVALID, f"{where}.name: must be 1 to {MAX_ATTACHMENT_NAME} "
                         "characters")
    try:
        raw = binascii.a2b_base64("".join(att.data.split()).encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise R.ApiError(R.INVALID, f"{where}.data: not valid base64") from None
    if len(att.type) > MAX_TYPE:
        raise R.ApiError(R.INVALID, f"{where}.type: longer than {MAX_TYPE} characters")
    # the type as given, with its parameters (SparkPost: "charset" when needed), then
    # the name; a parameter per line
    ctype, _, given = att.type.partition(";")
    params = [p for k, v in _type_params(att.type) if k.lower() != "name"
              for p in _param(k, v)] if given else []
    head = ["Content-Type: " + ctype.strip() + ";"] + [" " + p + ";" for p in params] + \
        [" " + p + ";" for p in _param("name", name)]
    head[-1] = head[-1][:-1]
    disp = ["Content-Disposition: " + ("inline" if inline else "attachment") + ";"]
    disp += [" " + p + ";" for p in _param("filename", name)]
    disp[-1] = disp[-1][:-1]
    lines = head + ["Content-Transfer-Encoding: base64"] + disp
    if inline:
        if not name.isascii() or any(c in name for c in "<> "):
            raise R.ApiError(R.INVALID, f"{where}.name: an inline image's name is its "
                             "Content-ID and must be ASCII without spaces or <>")
        lines.append(f"Content-ID: <{name}>")
    body = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body.rstrip(b"\r\n")


# --------------------------------------------------------------------- helpers


_date = rfcdate.DateCache()


def new_message_id(hostname: str) -> str:
    """``<time in ns.pid.count@hostname>``, the numbers in hex (_fields.message_id)."""
    return _message_id(hostname, _pid)


def _split_address(text: str) -> tuple[str | None, str]:
    """``Name <a@b>`` or ``a@b`` → (name, email); the field holds one address, so in
    ``Müller, Hans <h@x>`` the unquoted comma is the name's (:func:`_one_mailbox`)."""
    if "<" in text:
        name, email = parseaddr(text)
        if not email:
            name, email = _one_mailbox(text)
        return (name or None), email
    return None, text.strip()


def _recipient_parts(r) -> tuple:
    """(email, substitution_data, metadata, tags) of a recipient as given, unchecked."""
    if isinstance(r, str):
        return _split_address(r)[1], None, None, None
    a = r.address
    if a is None:
        return "", r.substitution_data, r.metadata, r.tags
    email = _split_address(a)[1] if isinstance(a, str) else (a.email or "")
    return email, r.substitution_data, r.metadata, r.tags


def _is_ascii(*texts) -> bool:
    return all(t is None or t.isascii() for t in texts)


# --------------------------------------------------------------------- builder


class Built:
    """One recipient's message, ready for Acceptor.submit().

    *message_id*: the Message-ID the builder wrote into the header, when it made one
    (None: the acceptor reads the header field, as for any message).
    """

    __slots__ = ("sender", "rcpt", "message", "params", "message_id")

    def __init__(self, sender: str, rcpt: str, message: bytes, params: dict,
                 message_id: str | None = None):
        self.sender = sender
        self.rcpt = rcpt
        self.message = message
        self.params = params
        self.message_id = message_id


class Builder:
    """Everything about a transmission that is the same for each recipient."""

    def __init__(self, tx: Transmission, hostname: str, max_size: int = 0,
                 field_limits: tuple[int, int] = (MAX_FIELD_VALUE, MAX_HEADER_BLOCK)):
        self.hostname = hostname
        # octets one recipient's message may have (0: no bound); a larger one is that
        # recipient's rcpt_to_error (generation_failure)
        self.max_size = max_size
        # characters of a header field's value, octets of the header fields (with
        # content.headers): http.max_header_field_length, max_header_block_size
        self.max_field, self.max_header = field_limits
        c = tx.content
        self.tx_sub = tx.substitution_data or {}
        self.tx_meta = tx.metadata or None
        # the transmission's substitution scopes, after the recipient's (build)
        self.tx_scopes = tuple(filter(None, (self.tx_sub, self.tx_meta)))
        base: dict = {}
        if tx.campaign_id:
            base["campaign_id"] = tx.campaign_id
        if tx.description:
            base["description"] = tx.description
        o = tx.options
        if o is not None:
            if o.ip_pool:
                base["ip_pool"] = o.ip_pool
            for key in ("transactional", "sandbox", "skip_suppression"):
                v = getattr(o, key)
                if v is not None:
                    base[key] = v
            if o.start_time:
                base["start_time"] = o.start_time
        self.base_params = base
        # options.perform_substitutions: false -- the parts' text as written (the header
        # fields are still substituted, as SparkPost does)
        self.substitute = o is None or o.perform_substitutions is not False
        self.tpl = template if self.substitute else literal
        self.return_path = None
        if tx.return_path:
            why = check_email(tx.return_path)
            if why:
                raise R.ApiError(R.INVALID, f"return_path: {tx.return_path!r} {why}")
            self.return_path = tx.return_path
        if c.email_rfc822 is not None:
            self._init_rfc822(c.email_rfc822)
        else:
            self.rfc822 = None
            self._init_inline(c)

    # ---------------------------------------------------------- inline content

    def _init_inline(self, c) -> None:
        if isinstance(c.from_, Address):
            from_name, from_email = c.from_.name, c.from_.email
        else:
            from_name, from_email = _split_address(c.from_)
        if _CONTROL.search(f"{from_name or ''}{from_email or ''}{c.subject or ''}"
                           f"{c.reply_to or ''}") is not None:
            # (one search of the four: which one it is, only when one is unfit)
            for field, value in (("content.from.name", from_name),
                                 ("content.from.email", from_email),
                                 ("content.subject", c.subject),
                                 ("content.reply_to", c.reply_to)):
                why = value is not None and _unfit(value)
                if why:
                    raise R.ApiError(R.INVALID, f"{field}: contains {why}")
        tpl = self.tpl      # the parts'; the header fields' are always substituted
        # (a literal Template -- no substitutions -- has no error)
        self.from_name = _unblocked("content.from.name", template(from_name)) \
            if from_name else None
        self.from_email = _unblocked("content.from.email", template(from_email))
        if self.from_email.constant is not None:    # (else checked as rendered)
            why = check_email(self.from_email.constant)
            if why:
                raise R.ApiError(R.INVALID, f"content.from.email: {from_email!r} {why}")
        # the From field when it is the same for every recipient (from a small cache:
        # a sender's transmissions repeat it)
        self.from_line = None
        if self.from_email.constant is not None and (
                self.from_name is None or self.from_name.constant is not None):
            self.from_line = _from_line(self.from_name and self.from_name.constant,
                                        self.from_email.constant)
        self.subject = _unblocked("content.subject", template(c.subject))
        self.reply_to = _unblocked("content.reply_to", template(c.reply_to)) \
            if c.reply_to else None
        self.text = _unblocked("content.text", tpl(c.text)) if c.text is not None else None
        self.html = _unblocked("content.html", tpl(c.html)) if c.html is not None else None
        self.amp = _unblocked("content.amp_html", tpl(c.amp_html, True)) \
            if c.amp_html is not None else None
        self.headers: list[tuple[str, Template]] = []
        self.replace: dict[str, tuple[str, Template]] = {}
        for name, value in c.headers.items() if c.headers else ():
            check_field_name(name, "content.headers")
            why = _unfit(value)
            if why:
                raise R.ApiError(R.INVALID, f"content.headers.{name}: the value contains {why}")
            low = name.lower()
            if low in _RESERVED:
                raise R.ApiError(R.INVALID, f"content.headers.{name}: set by the MTA from "
                                 "content; not allowed in headers")
            t = _unblocked(f"content.headers.{name}", template(value))
            if low in _REPLACING:
                self.replace[low] = (name, t)
            else:
                self.headers.append((name, t))
        # (a list comprehension is a call of its own: made only when there is an item)
        self.attachments = [attachment_part(a, f"content.attachments[{i}]", False)
                            for i, a in enumerate(c.attachments)] if c.attachments else []
        self.images = [attachment_part(a, f"content.inline_images[{i}]", True)
                       for i, a in enumerate(c.inline_images)] if c.inline_images else []
        self.body_limit = _rest(self.max_size, sum(map(len, self.attachments)) +
                                sum(map(len, self.images))) \
            if self.attachments or self.images else self.max_size
        self.made_parts: dict[str, bytes] = {}   # subtype -> the part of a constant text

    def _made(self, subtype: str, text: str) -> bytes:
        """The text/*subtype* part of *text*, a text without substitutions: encoded once
        per transmission, not per recipient (quoted-printable runs at ~1 ns an octet,
        and a 100 KB text's 7bit copy at ~0.2)."""
        part = self.made_parts.get(subtype)
        if part is None:
            part = self.made_parts[subtype] = (_text_part_7bit(subtype, text)
                                               or text_part(subtype, text))
        return part

    def _body(self, scopes: tuple) -> bytes:
        """The MIME entity of the body: its content fields, blank line, content."""
        alts = []
        # the octets the texts may have together: what the message's bound leaves of the
        # attachments' (TooLarge as soon as a text passes it, not when all are built)
        limit = self.body_limit
        # (each text rendered here, not in a method of its own: a call per part is 0.6 %
        # of a one-recipient transmission's instructions)
        tpl = self.text
        if tpl is not None:
            if tpl.constant is None:
                text = tpl.render(scopes, limit=limit, links=True)
                alts.append(_text_part_7bit("plain", text) or text_part("plain", text))
            else:
                alts.append(self._made("plain", tpl.constant))
            limit = _rest(limit, len(alts[-1]))
        tpl = self.amp
        if tpl is not None:
            # AMP for email: the text/x-amp-html part goes before the text/html one
            if tpl.constant is None:
                text = tpl.render(scopes, html=True, limit=limit, links=True)
                alts.append(_text_part_7bit("x-amp-html", text) or
                            text_part("x-amp-html", text))
            else:
                alts.append(self._made("x-amp-html", tpl.constant))
            limit = _rest(limit, len(alts[-1]))
        tpl = self.html
        if tpl is not None:
            if tpl.constant is None:
                text = tpl.render(scopes, html=True, limit=limit, links=True)
                part = _text_part_7bit("html", text) or text_part("html", text)
            else:
                part = self._made("html", tpl.constant)
            if self.images:
                part = multipart("related", [part] + self.images)
            alts.append(part)
        body = alts[0] if len(alts) == 1 else multipart("alternative", alts)
        if self.attachments:
            body = multipart("mixed", [body] + self.attachments)
        return body

    def _field(self, i: int, scopes: tuple, label: str, tpl: Template) -> str:
        """Header field *label*'s value for recipient *i*; RecipientError when
        substitution_data puts a line break or a control character into it."""
        try:
            # (render's bound counts octets, at most 4 a character: the field's bound is
            # in characters, checked below)
            v = tpl.render(scopes, limit=4 * self.max_field)
        except TooLarge:
            v = None
        if v is None or len(v) > self.max_field:
            raise RecipientError(R.RCPT_INVALID, f"recipients[{i}]: {label} would be longer "
                                 f"than {self.max_field} characters "
                                 "(http.max_header_field_length)", ev.GENERATION_FAILURE)
        why = tpl.constant is None and _unfit(v)
        if why:
            raise RecipientError(R.RCPT_INVALID, f"recipients[{i}]: substitution_data puts "
                                 f"{why} into {label}", ev.GENERATION_FAILURE)
        return v

    def _inline(self, i: int, scopes: tuple, scope: dict, name, email,
                header_to) -> tuple[bytes, str, bool, str, str | None]:
        """(message, envelope sender candidate, needs SMTPUTF8, Subject, the Message-ID
        made here or None) for one recipient (*scope*: its reserved variables)."""
        field = self._field
        from_email = self.from_email.constant
        from_line = self.from_line      # (a From the same for every recipient)
        if from_line is None:
            if from_email is None:
                from_email = field(i, scopes, "content.from.email", self.from_email)
                why = check_email(from_email)
                if why:
                    raise RecipientError(R.RCPT_INVALID, f"recipients[{i}]: content.from.email "
                                         f"{from_email!r} {why}", ev.GENERATION_FAILURE)
                if not scope["env_from"]:
                    scope["env_from"] = scope["return_path"] = from_email
            from_name = field(i, scopes, "content.from.name", self.from_name) \
                if self.from_name else None
            from_line = _fold("From", mailbox(from_name, from_email))
        rep = self.replace
        out = []
        d = rep.get("date")
        out.append(unstructured(d[0], field(i, scopes, f"content.headers.{d[0]}", d[1]))
                   if d else f"Date: {_date.now()}\r\n".encode())
        out.append(from_line)
        t = rep.get("to")
        if t is not None:
            out.append(address_field(t[0], field(i, scopes, f"content.headers.{t[0]}", t[1])))
        elif header_to:
            out.append(address_field("To", header_to))
        else:
            out.append(_mailbox_line("To", name, email) or _fold("To", mailbox(name, email)))
        subject = field(i, scopes, "content.subject", self.subject)
        out.append(_short_line("Subject", subject) or unstructured("Subject", subject))
        r = rep.get("reply-to")
        if r is not None:
            out.append(address_field(r[0], field(i, scopes, f"content.headers.{r[0]}", r[1])))
        elif self.reply_to is not None:
            out.append(address_field("Reply-To", field(i, scopes, "content.reply_to",
                                                       self.reply_to)))
        m = rep.get("message-id")
        if m:
            made = None
            out.append(unstructured(m[0], field(i, scopes, f"content.headers.{m[0]}", m[1])))
        else:
            made = _message_id(self.hostname, _pid)
            out.append(f"Message-ID: {made}\r\n".encode())
        out.append(b"MIME-Version: 1.0\r\n")
        if self.headers:
            # the header block's bound, and the message's, as the fields are built
            size = sum(map(len, out))
            max_header = self.max_header
            for hname, tpl in self.headers:
                v = field(i, scopes, f"content.headers.{hname}", tpl)
                out.append(address_field(hname, v) if hname.lower() in _ADDRESS_FIELDS
                           else unstructured(hname, v))
                size += len(out[-1])
                if self.max_size and size > self.max_size:
                    raise TooLarge(size)
                if size > max_header:
                    raise RecipientError(R.RCPT_INVALID, f"recipients[{i}]: content.headers "
                                         "would make the header fields longer than "
                                         f"{max_header} octets (http.max_header_block_size)",
                                         ev.GENERATION_FAILURE)
        # SMTPUTF8 when an address is not ASCII: the envelope's, or one written as it is
        # into the header (header_to, Cc, Reply-To: RFC 6532 allows UTF-8 there only in
        # mail sent with SMTPUTF8); everything else non-ASCII is in encoded words
        utf8 = not (from_email.isascii() and email.isascii() and b"".join(out).isascii())
        body = self._body(scopes)
        out.append(body)
        if not body.endswith(b"\r\n"):
            out.append(b"\r\n")   # the message ends with a line end, as SMTP sends it
        return b"".join(out), from_email, utf8, subject, made

    # ------------------------------------------------------------- email_rfc822

    def _init_rfc822(self, text: str) -> None:
        data = text.encode("utf-8")
        if b"\0" in data:
            raise R.ApiError(R.INVALID, "content.email_rfc822: contains a NUL character")
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        flags = mime.scan_body(data, 0, MAX_LINE)
        if flags & mime.FLAG_LONG_LINE:
            raise R.ApiError(R.INVALID, f"content.email_rfc822: a line is longer than "
                             f"{MAX_LINE} octets")
        hdr_end, body_start = mime.split_message(data)
        fields = mime.parse_headers(data, hdr_end)
        if not fields:
            raise R.ApiError(R.INVALID, "content.email_rfc822: no header fields")
        for fname, _raw, _s, _e in fields:
            if not fname or not _FIELD_NAME.match(fname.decode("latin-1")):
                raise R.ApiError(R.INVALID, "content.email_rfc822: a header field is malformed "
                                 "(no name or an invalid name before the colon)")
        sender = mime.find_header(data, b"From")
        if sender is None:
            raise R.ApiError(R.REQUIRED, "content.email_rfc822: a From header field is required")
        self.rfc_from = _address_in(sender)
        self.rfc_has = {n: mime.find_header(data, n) is not None
                        for n in (b"Date", b"Message-ID", b"To")}
        self.rfc_8bit = bool(flags & mime.FLAG_8BIT)
        # Pieces: constant bytes and templates (header block, first text parts).
        pieces: list = []
        if b"{{" in data:
            head = data[:body_start].decode("utf-8", "surrogateescape")
            pieces.append(("head", _unblocked("content.email_rfc822",
                                              Template(head, head=True))))
            found: dict = {}
            if self.substitute:     # (false: the header only, as SparkPost)
                _text_ranges(data, 0, len(data), 0, found, [MAX_PARTS])
            pos = body_start
            for start, end, subtype in sorted(found.values()):
                pieces.append(data[pos:start])
                part = data[start:end].decode("utf-8", "surrogateescape")
                pieces.append((subtype, _unblocked("content.email_rfc822",
                                                   Template(part, subtype == "x-amp-html"),
                                                   data.count(b"\n", 0, start))))
                pos = end
            pieces.append(data[pos:])
            if all(not isinstance(p, tuple) or p[1].constant is not None for p in pieces):
                # the same for every recipient: as written, or with a macro's braces
                pieces = [b"".join(p if not isinstance(p, tuple) else
                                   p[1].constant.encode("utf-8", "surrogateescape")
                                   for p in pieces)]
        else:
            pieces.append(data)
        self.rfc822 = pieces

    def _rfc822(self, i: int, scopes: tuple, scope: dict, name,
                email) -> tuple[bytes, str | None, bool, bool]:
        """(message, From address, 8-bit, UTF-8 header) for one recipient (*scope*: its
        reserved variables)."""
        def no_breaks(value: str) -> None:
            why = _unfit(value)
            if why:
                raise RecipientError(R.RCPT_INVALID, f"recipients[{i}]: substitution_data puts "
                                     f"{why} into a header of content.email_rfc822",
                                     ev.GENERATION_FAILURE)

        out = []
        eightbit = self.rfc_8bit
        utf8 = False
        from_email = self.rfc_from
        limit = self.max_size   # (what the pieces before one leave it)
        for p in self.rfc822:
            if not isinstance(p, tuple):
                out.append(p)
                limit = _rest(limit, len(p))
                continue
            kind, tpl = p
            if kind == "head":
                text = tpl.render(scopes, guard=no_breaks, limit=limit)
                if not text.isascii():
                    text = _encoded_head(text)
                utf8 = not text.isascii()
                data = text.encode("utf-8", "surrogateescape")
                if from_email is None:
                    # the From field as substituted for this recipient (the sender)
                    from_email = _address_in(mime.find_header(data, b"From"))
                    if from_email and not scope["env_from"]:
                        scope["env_from"] = scope["return_path"] = from_email
            else:
                text = tpl.render(scopes, html=(kind != "plain"), limit=limit, links=True)
                if "\r" in text or "\n" in text:
                    # line ends as the rest of the message has them (a value's bare LF
                    # or CR would be one the receiver reads differently)
                    text = text.replace("\r\n", "\n").replace("\r", "\n") \
                        .replace("\n", "\r\n")
                data = text.encode("utf-8", "surrogateescape")
            flags = mime.scan_body(data, 0, MAX_LINE)
            if flags & (mime.FLAG_NUL | mime.FLAG_LONG_LINE):
                what = ("a NUL character" if flags & mime.FLAG_NUL else
                        f"a line longer than {MAX_LINE} octets")
                raise RecipientError(R.RCPT_INVALID, f"recipients[{i}]: substitution_data puts "
                                     f"{what} into content.email_rfc822", ev.GENERATION_FAILURE)
            eightbit = eightbit or not text.isascii()
            out.append(data)
        added = []
        if not self.rfc_has[b"Date"]:
            added.append(f"Date: {_date.now()}\r\n".encode())
        if not self.rfc_has[b"Message-ID"]:
            added.append(f"Message-ID: {new_message_id(self.hostname)}\r\n".encode())
        if not self.rfc_has[b"To"]:
            added.append(_fold("To", mailbox(name, email)))
        return b"".join(added + out), from_email, eightbit, utf8

    # --------------------------------------------------------------- recipient

    def refusal_event(self, r, kind: str, description: str) -> dict | None:
        """The internal *kind* event (mta.obs.events: generation_failure or _rejection)
        of recipient *r*, whose message could not be built because of *description*;
        None when *r* names no address.

        What is known without the message: the address as given, the
        transmission's carried attributes, the recipient's metadata, tags and
        substitution_data (each left out when over its bound), the From address
        and Subject when they do not depend on the recipient.  The caller adds
        the time, the client, the transmission id and the pool.
        """
        email, subs, meta, tags = _recipient_parts(r)
        if not email:
            return None
        code, enhanced, lead = FAILURE if kind == ev.GENERATION_FAILURE else REJECTION
        out = {"type": kind, "recipient": email,
               "response": {"code": code, "enhanced": enhanced, "text": lead + description},
               **ev.carried(self.base_params)}
        if kind == ev.GENERATION_REJECTION:
            out["bounce_class"] = ev.POLICY_CLASS
        if isinstance(meta, dict) and meta:
            meta = {**self.tx_meta, **meta} if self.tx_meta else meta
            if (json_len(meta) or MAX_METADATA + 1) > MAX_METADATA:
                meta = self.tx_meta     # (the transmission's was checked)
        else:
            meta = self.tx_meta
        if meta:
            out["metadata"] = meta
        if isinstance(tags, list) and 0 < len(tags) <= MAX_TAGS:
            out["tags"] = tags
        out["rcpt_subs"] = subs if isinstance(subs, dict) and \
            (json_len(subs) or MAX_EVENT_SUBS + 1) <= MAX_EVENT_SUBS else {}
        if self.rfc822 is not None:
            ev.put_headers(out, self.rfc_from, None)
        else:
            ev.put_headers(out, self.from_email.constant, self.subject.constant)
        return out

    def build(self, i: int, r) -> Built:
        """One recipient's message; RecipientError when this recipient cannot be sent to."""
        header_to = None
        rcpt_sub = None
        rcpt_meta = None
        meta = self.tx_meta
        tags = None
        return_path = self.return_path
        if isinstance(r, str):
            name, email = _split_address(r)
        else:
            a = r.address
            if a is None:
                raise RecipientError(R.RCPT_REQUIRED, f"recipients[{i}].address.email is required")
            if isinstance(a, str):
                name, email = _split_address(a)
            else:
                if not a.email:
                    raise RecipientError(R.RCPT_REQUIRED,
                                         f"recipients[{i}].address.email is required")
                name, email, header_to = a.name, a.email, a.header_to
            rcpt_sub = r.substitution_data
            if r.metadata:
                n = json_len(r.metadata)
                if n is None:
                    raise RecipientError(R.RCPT_INVALID, f"recipients[{i}].metadata: a number "
                                         "is outside the 64-bit integer range",
                                         ev.GENERATION_REJECTION)
                if n > MAX_METADATA:
                    raise RecipientError(R.RCPT_INVALID, f"recipients[{i}].metadata: larger "
                                         f"than {MAX_METADATA} bytes", ev.GENERATION_REJECTION)
                meta = {**meta, **r.metadata} if meta else r.metadata
                rcpt_meta = r.metadata
            if r.tags:
                if len(r.tags) > MAX_TAGS:
                    raise RecipientError(R.RCPT_INVALID, f"recipients[{i}].tags: more than "
                                         f"{MAX_TAGS} tags", ev.GENERATION_REJECTION)
                tags = r.tags
            if r.return_path:
                why = check_email(r.return_path)
                if why:
                    raise RecipientError(R.RCPT_INVALID, f"recipients[{i}].return_path: "
                                         f"{r.return_path!r} {why}", ev.GENERATION_REJECTION)
                return_path = r.return_path
        why = check_email(email)
        if why:
            raise RecipientError(R.RCPT_INVALID, f"recipients[{i}].address.email: {email!r} {why}",
                                 ev.GENERATION_REJECTION)
        for label, v in (("name", name), ("header_to", header_to)):
            why = v is not None and _unfit(v)
            if why:
                raise RecipientError(R.RCPT_INVALID, f"recipients[{i}].address.{label}: "
                                     f"contains {why}", ev.GENERATION_REJECTION)
        address = {"email": email, "name": name or "", "header_to": header_to or ""}
        # SparkPost's reserved variables: email and email_id are address.email, env_from
        # and return_path the envelope sender (a From substituted per recipient: set
        # when it is rendered, for what follows it)
        env_from = return_path or (self.rfc_from if self.rfc822 is not None else
                                   self.from_email.constant) or ""
        scope = {"address": address, "email": email, "email_id": email,
                 "env_from": env_from, "return_path": env_from}
        # SparkPost's order: the recipient's substitution_data, then its metadata, then
        # the transmission's substitution_data, then its metadata
        scopes = (rcpt_sub, scope) if rcpt_sub else (scope,)
        scopes = scopes + (rcpt_meta,) + self.tx_scopes if rcpt_meta else \
            scopes + self.tx_scopes
        made = None
        # one bound of loop work for the whole message: per text, 1,000 header fields
        # of a loop each would cost a recipient 1,000 times the bound
        _steps[0] = 0
        _steps[1] = True
        if _dynamics:
            _dynamics.clear()
        try:
            if self.rfc822 is not None:
                message, from_email, eightbit, utf8 = self._rfc822(i, scopes, scope, name,
                                                                   email)
                utf8 = utf8 or not _is_ascii(email)
            else:
                message, from_email, utf8, subject, made = self._inline(i, scopes, scope, name,
                                                                        email, header_to)
                eightbit = False
            if self.max_size and len(message) > self.max_size:
                raise TooLarge(len(message))
        except TooLarge:
            raise RecipientError(R.RCPT_INVALID, f"recipients[{i}]: the message would be "
                                 f"larger than {self.max_size} octets (http.max_message_size)",
                                 ev.GENERATION_FAILURE) from None
        except DynamicError as e:
            raise RecipientError(R.RCPT_INVALID, f"recipients[{i}]: dynamic content "
                                 f"{e.args[0][:64]!r} is not a template the template "
                                 "language can read", ev.GENERATION_FAILURE) from None
        except LoopLimit:
            raise RecipientError(R.RCPT_INVALID, f"recipients[{i}]: the template's {{{{ each "
                                 f"}}}} loops would render more than {MAX_LOOP_STEPS} pieces "
                                 "(items times the pieces of the loop, and the pieces of each "
                                 "render_dynamic_content()) in the message's texts together",
                                 ev.GENERATION_FAILURE) from None
        finally:
            _steps[1] = False
            if _dynamics:
                _dynamics.clear()
        sender = return_path or from_email or ""
        if not sender:
            # (inline content's From is always an address; email_rfc822's may not be --
            # "From: undisclosed", or one substitution_data made): the null sender is
            # for bounces, and bounces of this message would be lost
            raise RecipientError(R.RCPT_INVALID, f"recipients[{i}]: no envelope sender: the "
                                 "From field of content.email_rfc822 has no address to send "
                                 "from, and there is no return_path", ev.GENERATION_REJECTION)
        params = dict(self.base_params)
        if self.rfc822 is None:
            # the events' friendly_from and subject, as rendered (email_rfc822: the
            # acceptor reads them from the message's header)
            ev.put_headers(params, from_email, subject)
        if meta:
            params["metadata"] = meta
        if tags:
            params["tags"] = tags
        if eightbit:
            params["BODY"] = "8BITMIME"
        if utf8 or not sender.isascii():
            params["SMTPUTF8"] = ""
        return Built(sender, email, message, params, made)


def _encoded_head(head: str) -> str:
    """The header block *head* (as rendered) with each field that is not ASCII written
    again as :func:`unstructured` or :func:`address_field` write it (RFC 2047 encoded
    words; an address that is not ASCII stays as it is), as SparkPost encodes a header
    value that has 8-bit data after substitution; the other fields as they are."""
    data = head.encode("utf-8", "surrogateescape")
    end = mime.split_message(data)[0]
    out = []
    pos = 0
    for name, raw, start, stop in mime.parse_headers(data, end):
        if raw.isascii() or not name:
            continue
        try:
            value = raw[len(name) + 1:].decode("utf-8")
        except UnicodeDecodeError:      # (8-bit text that is not UTF-8: as it is)
            continue
        value = re.sub(r"\r?\n(?=[ \t])", "", value).strip(" \t\r\n")
        fname = name.decode("ascii")
        low = fname.lower()
        out += [data[pos:start], address_field(fname, value)
                if low in _ADDRESS_FIELDS or low == "from" else unstructured(fname, value)]
        pos = stop
    out.append(data[pos:])
    return b"".join(out).decode("utf-8", "surrogateescape")


def _address_in(field: bytes | None) -> str | None:
    """The address of a From field's value, when it is one we can send from."""
    if field is None:
        return None
    _, addr = parseaddr(field.decode("utf-8", "replace"))
    return addr if addr and not check_email(addr) else None


def _content_type(entity: bytes) -> tuple[str, str | None, str]:
    """(type/subtype, boundary, transfer encoding) of a MIME entity's header block."""
    m = Message()
    ct = mime.find_header(entity, b"Content-Type")
    if ct is not None:
        # Only a line's worth: the email package reads parameters in time quadratic in
        # the field's length (a folded field of ';' after an open quote: minutes per MiB).
        m["Content-Type"] = ct[:MAX_LINE].decode("latin-1")
    cte = mime.find_header(entity, b"Content-Transfer-Encoding")
    boundary = m.get_param("boundary")
    if isinstance(boundary, tuple):     # RFC 2231 (boundary*=...): (charset, language, text)
        boundary = collapse_rfc2231_value(boundary)
    if boundary is not None and not boundary.isascii():
        boundary = None                 # (not a valid boundary: its parts are not looked at)
    return (m.get_content_type(), boundary,
            (cte or b"7bit").decode("latin-1").strip().lower())


def _text_ranges(data: bytes, start: int, end: int, depth: int, found: dict,
                 left: list[int]) -> None:
    """Record in *found* the body ranges of the first text/plain, text/html and
    text/x-amp-html parts, of the first *left[0]* parts (counted down).

    Only parts without a transfer encoding (7bit, 8bit, binary) are taken:
    substituting into quoted-printable or base64 text would need decoding.
    """
    if left[0] <= 0:
        return
    left[0] -= 1
    entity = data[start:end]
    hdr_end, body_off = mime.split_message(entity)
    ctype, boundary, cte = _content_type(entity[:hdr_end])
    body_start = start + body_off
    if ctype.startswith("multipart/"):
        if not boundary or depth >= MAX_NESTING:
            return
        delim = b"--" + boundary.encode("latin-1")
        body = data[body_start:end]
        # The first delimiter may open the body; the others follow a CRLF.
        pos = 0 if body.startswith(delim) else body.find(b"\r\n" + delim)
        if pos < 0:
            return
        pos = pos if pos == 0 else pos + 2
        while True:
            line_end = body.find(b"\r\n", pos)
            if line_end < 0 or body[pos + len(delim):pos + len(delim) + 2] == b"--":
                return
            nxt = body.find(b"\r\n" + delim, line_end)
            if nxt < 0:
                return
            _text_ranges(data, body_start + line_end + 2, body_start + nxt, depth + 1, found,
                         left)
            if left[0] <= 0:
                return
            pos = nxt + 2
    elif ctype in _RFC822_TEXT and cte in ("7bit", "8bit", "binary"):
        sub = ctype[5:]
        if sub not in found and body_start < end:
            found[sub] = (body_start, end, sub)
