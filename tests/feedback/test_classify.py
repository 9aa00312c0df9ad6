"""Bounce classification: the corpus of real receivers' replies, the rules format, operator rules."""
from __future__ import annotations

import os
import re

import pytest

from mta import feedback
from mta.feedback.classify import (BOUNCE_CLASSES, SHIPPED_FILE, Classifier, RuleError,
                                   load_rules, shipped_rules)

HERE = os.path.dirname(__file__)
CORPUS = os.path.join(HERE, "corpus.txt")
_REPLY = re.compile(r"(?:([2-5][0-9][0-9])[ -])?(?:([245]\.[0-9]{1,3}\.[0-9]{1,3}) )?(.*)")


def parse_reply(reply: str) -> tuple[int, str, str]:
    """"550 5.1.1 text" -> (550, "5.1.1", "text"), as the delivery client splits a reply."""
    m = _REPLY.fullmatch(reply.strip())
    return int(m.group(1) or 0), m.group(2) or "", m.group(3)


def corpus() -> list[tuple[int, int, str]]:
    out = []
    with open(CORPUS, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            cls, _, reply = line.partition(" | ")
            out.append((n, int(cls), reply))
    return out


def test_corpus_is_big_enough_and_well_formed():
    entries = corpus()
    assert len(entries) >= 150
    assert all(cls in BOUNCE_CLASSES for _, cls, _ in entries)
    # every provider group says where its replies come from
    with open(CORPUS, encoding="utf-8") as fh:
        text = fh.read()
    for provider in ("Gmail", "Yahoo", "Microsoft", "Apple", "Comcast", "GMX", "Mail.ru",
                     "Yandex", "Orange", "Cox"):
        assert f"# {provider}" in text


def test_corpus_classifies_100_percent():
    c = Classifier()
    wrong = []
    for n, want, reply in corpus():
        got, rule = c.classify(*parse_reply(reply))
        if got != want:
            wrong.append(f"line {n}: want {want}, got {got} ({rule}): {reply}")
    assert not wrong, f"{len(wrong)} misclassified:\n" + "\n".join(wrong)


def _folded(reply: str, width: int) -> bytes:
    """*reply* as a receiver sends it over several lines of about *width* characters, each
    with the code (and enhanced code) in front: ``550-5.7.28 ...`` up to ``550 5.7.28 ...``."""
    code, enhanced, text = parse_reply(reply)
    words, lines, line = text.split(" "), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}" if line else w
    lines.append(line)
    head = f" {enhanced}" if enhanced else ""
    return b"".join(f"{code}{'-' if i < len(lines) - 1 else ' '}{head.lstrip()}"
                    f"{' ' if head else ''}{t}\r\n".encode()
                    for i, t in enumerate(lines))


def test_corpus_classifies_the_same_over_several_lines():
    """Receivers fold long replies (Gmail at about 70 characters); the delivery client
    joins the lines' texts with a line break, and a phrase broken there is still the
    phrase."""
    from mta.delivery.client import ReplyParser

    c = Classifier()
    wrong = []
    for n, want, reply in corpus():
        if not parse_reply(reply)[0]:
            continue                    # (no reply code: not a reply from the wire)
        for width in (20, 33, 47, 60, 72):
            [r] = ReplyParser().feed(_folded(reply, width))
            got, rule = c.classify(r.code, r.enhanced, r.text)
            if got != want:
                wrong.append(f"line {n}, width {width}: want {want}, got {got} ({rule}): "
                             f"{r.text!r}")
    assert not wrong, f"{len(wrong)} misclassified:\n" + "\n".join(wrong[:20])


def test_rule_names_are_recorded():
    c = Classifier()
    assert c.classify(550, "5.1.1", "The email account that you tried to reach does not "
                      "exist. https://support.google.com/mail/?p=NoSuchUser - gsmtp") == \
        (10, "gmail-no-such-user")
    assert c.classify(421, "4.7.28", "Our system has detected an unusual rate of unsolicited "
                      "mail. mail sent from your IP address has been temporarily rate "
                      "limited. - gsmtp") == (70, "temp-rate-limited")
    assert c.classify(550, "5.1.1", "whatever") == (10, "enh-5.1.1-bad-mailbox")
    assert c.classify(552, "", "whatever") == (22, "code-552-storage-exceeded")


def test_unknown_reply_is_undetermined():
    c = Classifier()
    assert c.classify(550, "5.0.0", "Something unexpected") == (1, "undetermined")
    assert c.classify(554, "", "") == (1, "undetermined")
    assert c.classify(0, "", "no reply at all") == (1, "undetermined")
    assert c.classify(250, "2.0.0", "OK") == (1, "undetermined")
    assert c.classify(550, None, None) == (1, "undetermined")


def test_temporary_replies_never_get_a_hard_or_block_class():
    c = Classifier()
    hard_or_block = {10, 30, 90, 50, 51, 52, 53, 54}
    for _, _, reply in corpus():
        code, enh, text = parse_reply(reply)
        if 400 <= code < 500:
            cls, rule = c.classify(code, enh, text)
            assert cls not in hard_or_block, (reply, cls, rule)


def test_shipped_tiers_in_order():
    rules = shipped_rules()
    tiers = [r.tier for r in rules]
    assert tiers == sorted(tiers)
    assert {0, 1, 2} <= set(tiers)
    assert len({r.name for r in rules}) == len(rules)


def test_text_is_case_insensitive_and_searched():
    c = Classifier()
    assert c.classify(550, "", "XYZ USER UNKNOWN here")[0] == 10


def write(tmp_path, text: str) -> str:
    p = tmp_path / "rules.toml"
    p.write_text(text)
    return str(p)


def test_operator_rules_come_first(tmp_path):
    path = write(tmp_path, '''
[[rule]]
name = "acme-full-is-hard"
code = "5xx"
text = "mailbox full"
class = 10

[[rule]]
name = "acme-block"
code = 554
enhanced = "5.7."
class = 51
''')
    c = Classifier.from_file(path)
    assert c.classify(552, "5.2.2", "Mailbox full") == (10, "acme-full-is-hard")
    assert c.classify(452, "4.2.2", "Mailbox full") == (22, "temp-mailbox-full")
    assert c.classify(554, "5.7.1", "nope") == (51, "acme-block")
    assert c.classify(550, "5.7.1", "nope")[1] != "acme-block"
    # the module-level classifier follows configure()
    try:
        feedback.configure(path)
        assert feedback.classify(552, "5.2.2", "Mailbox full") == (10, "acme-full-is-hard")
    finally:
        feedback.configure(None)
    assert feedback.classify(552, "5.2.2", "Mailbox full") == (22, "mailbox-full")


def test_code_forms(tmp_path):
    path = write(tmp_path, '''
[[rule]]
name = "range"
code = "450-452"
class = 20
[[rule]]
name = "pattern"
code = "55x"
text = "zz"
class = 40
''')
    c = Classifier.from_file(path)
    assert c.classify(451, "", "")[1] == "range"
    assert c.classify(453, "", "")[1] != "range"
    assert c.classify(554, "", "a zz b")[1] == "pattern"
    assert c.classify(504, "", "a zz b")[1] != "pattern"


@pytest.mark.parametrize("body, key", [
    ('[[rule]]\nname = "a"\nclass = 11\ncode = 550\n', "rule[0] (a).class"),
    ('[[rule]]\nname = "a"\nclass = 10\n', "rule[0] (a): matches every reply"),
    ('[[rule]]\nname = "a"\nclass = 10\ntext = "(unclosed"\n', "rule[0] (a).text"),
    ('[[rule]]\nname = "a"\nclass = 10\ncode = 700\n', "rule[0] (a).code"),
    ('[[rule]]\nname = "a"\nclass = 10\ncode = "5yy"\n', "rule[0] (a).code"),
    ('[[rule]]\nname = "a"\nclass = 10\nenhanced = "5.1"\n', "rule[0] (a).enhanced"),
    ('[[rule]]\nname = "a"\nclass = 10\ncode = 450\nenhanced = "5.1.1"\n',
     "rule[0] (a).enhanced"),
    ('[[rule]]\nname = "a"\nclass = 10\ncode = 550\ncolour = "red"\n', "rule[0] (a).colour"),
    ('[[rule]]\nname = "has space"\nclass = 10\ncode = 550\n', "rule[0] (has space).name"),
    ('[[rule]]\nname = "a"\nclass = 10\ncode = 550\n[[rule]]\nname = "a"\nclass = 10\n'
     'code = 551\n', "rule[1] (a).name"),
    ('[[rule]]\nname = "undetermined"\nclass = 1\ncode = 550\n', "rule[0] (undetermined).name"),
    ('[[rule]]\nname = "ok"\nclass = 10\ncode = 550\n[[rule]]\nclass = 10\ncode = 551\n',
     "rule[1].name"),
    ('rules = 1\n', "unknown key 'rules'"),
    ('[[rule]\n', "rules.toml:"),
])
def test_bad_rules_name_the_rule(tmp_path, body, key):
    path = write(tmp_path, body)
    with pytest.raises(RuleError) as ei:
        load_rules(path)
    assert str(ei.value).startswith(path) and key in str(ei.value), str(ei.value)


def test_missing_file(tmp_path):
    with pytest.raises(RuleError, match="cannot read"):
        Classifier.from_file(str(tmp_path / "nope.toml"))


def test_shipped_file_is_package_data():
    import mta.feedback
    assert os.path.exists(os.path.join(os.path.dirname(mta.feedback.__file__), SHIPPED_FILE))
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "setup.py")) as fh:
        assert SHIPPED_FILE in fh.read()
