"""SparkPost compatibility of the Transmissions API, in process: substitution sources and
defaults, attachment types, AMP content, refused features."""
from __future__ import annotations

import base64
import email
import json
from email import policy

import pytest

from mta.api import build as B
from mta.api import transmissions as T


def tx(body: dict) -> T.Transmission:
    t = T.decode(json.dumps(body).encode())
    T.check(t, 10_000, 32)
    return t


def built(body: dict, i: int = 0) -> B.Built:
    t = tx(body)
    return B.Builder(t, "mta.test").build(i, t.recipients[i])


def parsed(body: dict, i: int = 0):
    return email.message_from_bytes(built(body, i).message, policy=policy.default)


def text_of(msg, ctype="text/plain") -> str:
    part = next(p for p in msg.walk() if p.get_content_type() == ctype)
    return part.get_content().replace("\r\n", "\n")


CONTENT = {"from": "sender@example.com", "subject": "Hello"}


def test_metadata_is_substitution_data_after_substitution_data():
    # SparkPost looks a key up in the recipient's substitution_data, then the
    # recipient's metadata, then the transmission's substitution_data, then its metadata.
    body = {"metadata": {"user_type": "students", "place": "tx-place", "both": "tx-meta"},
            "substitution_data": {"both": "tx-subs", "discount": "25"},
            "recipients": [{"address": "a@example.net", "metadata": {"place": "Bedrock"},
                            "substitution_data": {"first": "Wilma"}},
                           "b@example.net"],
            "content": {**CONTENT, "subject": "{{first}} {{user_type}}",
                        "text": "{{first}}|{{place}}|{{user_type}}|{{both}}|{{discount}}"}}
    msg = parsed(body)
    assert text_of(msg).strip() == "Wilma|Bedrock|students|tx-subs|25"
    assert msg["Subject"] == "Wilma students"
    assert text_of(parsed(body, 1)).strip() == "|tx-place|students|tx-subs|25"


def test_or_gives_a_default_value():
    body = {"recipients": [{"address": "a@example.net", "substitution_data": {"name": "Ann"}},
                           "b@example.net"],
            "substitution_data": {"fallback": "Friend"},
            "content": {**CONTENT, "subject": "Hi {{ name or 'Customer' }}",
                        "text": "Hi {{name or \"you great person\"}}, "
                                "{{ nick or name or fallback }}!",
                        "html": "<p>{{ name or '<b>there</b>' }} {{{ name or '<i>x</i>' }}}</p>"}}
    a = parsed(body)
    assert a["Subject"] == "Hi Ann"
    assert text_of(a).strip() == "Hi Ann, Ann!"
    assert text_of(a, "text/html").strip() == "<p>Ann Ann</p>"
    b = parsed(body, 1)
    assert b["Subject"] == "Hi Customer"
    assert text_of(b).strip() == "Hi you great person, Friend!"
    # a default literal is escaped in HTML like any value, except in {{{ }}}
    assert text_of(b, "text/html").strip() == "<p>&lt;b&gt;there&lt;/b&gt; <i>x</i></p>"


def test_attachment_type_is_applied_as_given_with_its_parameters():
    data = "prix: 5 €\n".encode()
    body = {"recipients": ["a@example.net"],
            "content": {**CONTENT, "text": "see attached",
                        "attachments": [{"name": "prices.csv",
                                         "type": 'text/csv; charset="UTF-8"',
                                         "data": base64.b64encode(data).decode()}]}}
    msg = parsed(body)
    att = next(p for p in msg.walk() if p.get_filename() == "prices.csv")
    assert att.get_content_type() == "text/csv"
    assert att.get_content_charset() == "utf-8"
    assert att.get_content() == data.decode()
    assert not any(p.defects for p in msg.walk())


def test_amp_html_is_a_text_x_amp_html_part():
    amp = "<!doctype html><html ⚡4email><body>Hi {{name}}</body></html>"
    body = {"recipients": [{"address": "a@example.net", "substitution_data": {"name": "<Ann>"}}],
            "content": {**CONTENT, "text": "Hi {{name}}", "html": "<p>Hi {{name}}</p>",
                        "amp_html": amp}}
    msg = parsed(body)
    assert msg.get_content_type() == "multipart/alternative"
    # AMP's rule: the text/x-amp-html part before the text/html part
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "text/x-amp-html", "text/html"]
    assert text_of(msg, "text/x-amp-html").strip() == \
        "<!doctype html><html ⚡4email><body>Hi &lt;Ann&gt;</body></html>"
    # with text only: still an alternative of two
    body["content"].pop("html")
    msg = parsed(body)
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/x-amp-html"]
    # AMP alone is not enough (SparkPost: html or text is required too)
    body["content"].pop("text")
    with pytest.raises(Exception) as e:
        tx(body)
    assert "content.html or content.text" in str(e.value)


def test_amp_mustache_templates_keep_their_expressions():
    """SparkPost leaves the {{ }} expressions inside an amp-mustache template of the AMP
    part as written (the reader's client fills them from its amp-list), but for those
    naming "sparkpost"; they were substituted, mostly as empty, and the list rendered
    blank for every reader."""
    amp = ('<p>{{name}}</p><amp-list src="https://x.example/c.json"><template '
           'type="amp-mustache">{{sparkpost_name}}: {{#items}}<b>{{name}}</b> {{{price}}}'
           '{{/items}}</template></amp-list><p>{{name}}</p>'
           '<script type="text/plain" template="amp-mustache">{{ name }}</script>')
    body = {"recipients": [{"address": "a@example.net",
                            "substitution_data": {"name": "Ann", "sparkpost_name": "S"}}],
            "content": {**CONTENT, "text": "{{name}}", "amp_html": amp,
                        "html": '<template type="amp-mustache"><b>{{name}}</b></template>'}}
    msg = parsed(body)
    assert text_of(msg, "text/x-amp-html").strip() == (
        '<p>Ann</p><amp-list src="https://x.example/c.json"><template '
        'type="amp-mustache">S: {{#items}}<b>{{name}}</b> {{{price}}}'
        '{{/items}}</template></amp-list><p>Ann</p>'
        '<script type="text/plain" template="amp-mustache">{{ name }}</script>')
    # the HTML part is no AMP: all substituted
    assert "<b>Ann</b>" in text_of(msg, "text/html")
    # email_rfc822's AMP part alike
    raw = ("From: s@example.com\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n"
           "--b\r\nContent-Type: text/plain\r\n\r\n{{name}}\r\n"
           "--b\r\nContent-Type: text/x-amp-html\r\n\r\n" + amp + "\r\n--b--\r\n")
    body = {"recipients": [{"address": "a@example.net",
                            "substitution_data": {"name": "Ann", "sparkpost_name": "S"}}],
            "content": {"email_rfc822": raw}}
    msg = parsed(body)
    assert text_of(msg, "text/x-amp-html").startswith(
        '<p>Ann</p><amp-list src="https://x.example/c.json"><template '
        'type="amp-mustache">S: {{#items}}<b>{{name}}</b> {{{price}}}')


def test_an_ab_test_is_refused_as_not_supported_not_as_a_missing_from():
    from mta.api import replies as R
    with pytest.raises(R.ApiError) as e:
        tx({"recipients": ["a@example.net"], "content": {"ab_test_id": "password_reset"}})
    assert (e.value.status, e.value.error.code) == (422, "1603")
    assert "content.ab_test_id" in e.value.description


def test_attachment_type_parameters_with_a_quoted_semicolon_and_a_name_of_their_own():
    # a quoted value may hold ";" (it is one parameter, not two), and a name given in
    # the type does not make a second name parameter beside the attachment's own
    data = b"a;b\n"
    body = {"recipients": ["a@example.net"],
            "content": {**CONTENT, "text": "see attached",
                        "attachments": [{"name": "x.csv",
                                         "type": 'text/csv; name="old.csv"; '
                                                 'header="present; quoted"; charset=us-ascii',
                                         "data": base64.b64encode(data).decode()}]}}
    msg = parsed(body)
    att = next(p for p in msg.walk() if p.get_filename() == "x.csv")
    assert att.get_param("header") == "present; quoted"
    assert att.get_param("name") == "x.csv"
    assert str(att["Content-Type"]).lower().count("name=") == 1, str(att["Content-Type"])
    assert att.get_content_charset() == "us-ascii"
    assert not any(p.defects for p in msg.walk())


def test_perform_substitutions_false_leaves_the_parts_as_written_not_the_headers():
    # SparkPost: false "disables substitutions in the text, html, amp, and email_rfc822
    # content parts ... Headers are still passed to the substitution engine", those of
    # email_rfc822 too; they were sent as written
    opts = {"options": {"perform_substitutions": False}, "substitution_data": {"x": "X"},
            "recipients": [{"address": "a@example.net", "substitution_data": {"x": "Y"}}]}
    msg = parsed({**opts, "content": {"from": {"name": "{{x}}", "email": "s@example.com"},
                                      "subject": "S {{x}}", "text": "T {{x}} {{{x}}}",
                                      "html": "<p>{{x}}</p>", "amp_html": "<p>{{x}}</p>",
                                      "reply_to": "{{x}} <r@example.com>",
                                      "headers": {"X-Tag": "{{x}}"}}})
    assert (msg["From"].addresses[0].display_name, msg["Subject"], msg["X-Tag"],
            msg["Reply-To"]) == ("Y", "S Y", "Y", "Y <r@example.com>")
    assert text_of(msg).strip() == "T {{x}} {{{x}}}"
    assert text_of(msg, "text/html").strip() == text_of(msg, "text/x-amp-html").strip() == \
        "<p>{{x}}</p>"
    raw = "From: s@example.com\nSubject: R {{x}}\n\nBody {{x}}\n"
    msg = parsed({**opts, "content": {"email_rfc822": raw}})
    assert msg["Subject"] == "R Y" and text_of(msg) == "Body {{x}}\n"


def test_amp_mustache_templates_in_a_loop_take_its_loop_var():
    # SparkPost's rule for amp-mustache templates: expressions using loop_var are its
    # own, not the reader's client's; they were left as written
    amp = ('{{ each items }}<template type="amp-mustache">{{loop_var.name}} '
           '{{loop_vars.items.name}} {{name}}</template>{{ end }}')
    body = {"recipients": ["a@example.net"], "substitution_data": {"items": [{"name": "A"}]},
            "content": {**CONTENT, "text": "t", "amp_html": amp}}
    assert text_of(parsed(body), "text/x-amp-html").strip() == \
        '<template type="amp-mustache">A A {{name}}</template>'


def test_a_header_address_that_is_not_ascii_asks_for_smtputf8():
    c = {**CONTENT, "text": "t"}
    plain = built({"recipients": [{"address": {"email": "a@example.net", "name": "Jörg"}}],
                   "content": {**c, "reply_to": "Jörg <j@example.net>"}})
    assert "SMTPUTF8" not in plain.params and plain.message.isascii()   # encoded words
    for body in ({"recipients": [{"address": {"email": "a@example.net",
                                              "header_to": "jörg@example.net"}}], "content": c},
                 {"recipients": ["a@example.net"], "content": {**c, "reply_to": "ü@example.net"}},
                 {"recipients": ["a@example.net"],
                  "content": {**c, "headers": {"CC": "ü@example.net"}}}):
        assert "SMTPUTF8" in built(body).params, body


def test_rfc2231_pieces_of_a_long_name_hold_whole_characters():
    from urllib.parse import unquote_to_bytes
    name = "€" * 40 + "é" * 7 + ".txt"
    pieces = B._param("filename", name)
    assert len(pieces) > 1
    values = [p.partition("=")[2].removeprefix("utf-8''") for p in pieces]
    for v in values:
        unquote_to_bytes(v).decode("utf-8")         # (raises on half a character)
    assert b"".join(unquote_to_bytes(v) for v in values).decode() == name


@pytest.mark.parametrize("text,want", [
    ("{{if a}}x{{end}}", "x"), ("{{ each items }}{{loop_var}}{{ end }}", "12"),
    ("{{ else }}", None), ("{{elseif b == 'x'}}", None), ("{{{ end }}}", None),
    ("{{if a}}x", None), ("{{ endpoint }} {{ iffy }} {{ elsewhere }} {{ each_day }} {{ending}}",
                          "E    ")])
def test_template_blocks_render_broken_ones_are_refused_and_names_like_them_are_not(text, want):
    body = {"recipients": ["a@example.net"],
            "substitution_data": {"endpoint": "E", "a": 1, "items": [1, 2]},
            "content": {**CONTENT, "text": text}}
    if want is None:
        with pytest.raises(T.R.ApiError) as e:
            built(body)
        assert e.value.status == 422 and e.value.description.startswith("content.text: ")
    else:
        assert text_of(parsed(body)).startswith(want)
