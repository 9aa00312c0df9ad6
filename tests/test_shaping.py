"""Traffic shaping rules (mta/shaping): rates, matching, order, presets, check-config."""
import os
import subprocess
import sys

import pytest

from mta import config, shaping
from mta.config.schema import DeliveryConfig, ShapingRule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DELIVERY = DeliveryConfig()


def rule(**kw) -> ShapingRule:
    return ShapingRule(**kw)


# ------------------------------------------------------------------ rates

@pytest.mark.parametrize("text, per_second", [
    ("50/s", 50.0), ("3600/h", 1.0), ("60/m", 1.0), ("86400/d", 1.0), ("1.5/s", 1.5),
    ("1/m", 1 / 60), (" 10/s ", 10.0), ("1000000/s", 1_000_000.0),
])
def test_parse_rate(text, per_second):
    assert shaping.parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text, why", [
    ("", "expected N/s"), ("50", "expected N/s"), ("50/x", "expected N/s"),
    ("50/sec", "expected N/s"), ("-1/s", "expected N/s"), ("1e3/s", "expected N/s"),
    ("50 /s", "expected N/s"), ("fast", "expected N/s"), ("0/s", "more than 0"),
    ("0.0/h", "more than 0"), ("2000000/s", "more than 1000000"), (None, "expected a rate"),
])
def test_parse_rate_rejects_with_a_reason(text, why):
    with pytest.raises(ValueError) as exc:
        shaping.parse_rate(text)
    assert why in str(exc.value)


# ------------------------------------------------------------------ matching

def limits(rules, site="site-a", mx=("mx1.example.net",), domains=("example.net",),
           source="default", presets=False, delivery=DELIVERY):
    return shaping.Shaping(rules, delivery, presets=presets).limits(site, mx, domains, source)


def test_defaults_come_from_delivery():
    d = DeliveryConfig(connection_limit=33, max_deliveries_per_connection=77,
                       idle_timeout=9.0, starttls="none")
    got = limits([], delivery=d)
    assert got == shaping.Limits(connection_limit=33, max_deliveries_per_connection=77,
                                 max_message_rate=None, max_connection_rate=None,
                                 idle_timeout=9.0, starttls="none", rules=())
    # A rule that sets one key leaves the others at the [delivery] values.
    got = limits([rule(domain="example.net", max_message_rate="120/m")], delivery=d)
    assert got.max_message_rate == pytest.approx(2.0)
    assert (got.connection_limit, got.max_deliveries_per_connection, got.idle_timeout,
            got.starttls, got.max_connection_rate) == (33, 77, 9.0, "none", None)
    assert got.rules == ("shaping[0]",)


def test_match_by_exact_domain_is_case_insensitive_and_whole():
    rules = [rule(domain="Example.NET.", connection_limit=3)]
    assert limits(rules, domains=("EXAMPLE.net",)).connection_limit == 3
    assert limits(rules, domains=("example.net.",)).connection_limit == 3
    for other in ("sub.example.net", "badexample.net", "example.network"):
        assert limits(rules, domains=(other,)).connection_limit == 10, other


def test_match_by_wildcard_domain_takes_subdomains_only():
    rules = [rule(domain="*.example.net", connection_limit=4)]
    for d in ("a.example.net", "b.a.example.net", "X.Example.Net"):
        assert limits(rules, domains=(d,)).connection_limit == 4, d
    for d in ("example.net", "badexample.net", "example.net.evil.org"):
        assert limits(rules, domains=(d,)).connection_limit == 10, d


def test_a_domain_rule_takes_the_mail_to_either_form_of_an_idn_domain():
    """A rule is written in the A-label form (check-config asks for it); the mail's
    domain comes as the sender wrote it, the U-label form with SMTPUTF8.  The rule
    for xn--bcher-kva.example did not shape the mail to bücher.example."""
    rules = [rule(domain="xn--bcher-kva.example", connection_limit=3),
             rule(domain="*.xn--mnchen-3ya.example", connection_limit=4)]
    for d in ("bücher.example", "BÜCHER.example.", "xn--bcher-kva.example"):
        assert limits(rules, domains=(d,)).connection_limit == 3, d
    for d in ("mx.münchen.example", "a.b.xn--mnchen-3ya.example"):
        assert limits(rules, domains=(d,)).connection_limit == 4, d
    for d in ("münchen.example", "bucher.example", "sub.bücher.example"):
        assert limits(rules, domains=(d,)).connection_limit == 10, d


def test_a_domain_rule_shapes_the_whole_site_once_its_domain_is_queued():
    sh = shaping.Shaping([rule(domain="gmail.com", connection_limit=2)], DELIVERY,
                         presets=False)
    mx = ("aspmx.l.google.com",)
    assert sh.limits("g", mx, ["corp.example"], "default").connection_limit == 10
    # gmail.com joins the site: the rule now holds for every domain of it.
    assert sh.limits("g", mx, ["corp.example", "gmail.com"], "default").connection_limit == 2


def test_match_by_mx_glob():
    rules = [rule(mx="*.Google.com", max_deliveries_per_connection=50),
             rule(mx="mx?.example.org", idle_timeout=1.0)]
    got = limits(rules, mx=("alt1.aspmx.l.google.com.", "other.example"))
    assert got.max_deliveries_per_connection == 50 and got.rules == ("shaping[0]",)
    assert limits(rules, mx=("ASPMX.L.GOOGLE.COM",)).max_deliveries_per_connection == 50
    for host in ("google.com", "google.com.evil.net", "aspmx.l.google.co"):
        assert limits(rules, mx=(host,)).rules == (), host
    assert limits(rules, mx=("mx1.example.org",)).idle_timeout == 1.0
    assert limits(rules, mx=("mx12.example.org",)).rules == ()


def test_match_by_site_name():
    rules = [rule(site="google", starttls="required")]
    assert limits(rules, site="google").starttls == "required"
    assert limits(rules, site="Google").starttls == "required"
    assert limits(rules, site="google2").starttls == "opportunistic"


def test_a_rule_naming_a_source_holds_for_that_source_only():
    rules = [rule(domain="example.net", source="ip-1", connection_limit=1)]
    assert limits(rules, source="ip-1").connection_limit == 1
    assert limits(rules, source="ip-2").connection_limit == 10
    assert limits(rules, source="default").connection_limit == 10


def test_order_presets_then_operator_rules_then_per_source_rules():
    mx = ("gmail-smtp-in.l.google.com",)
    rules = [
        # Per-source rule first in the file: it still applies last.
        rule(mx="*.google.com", source="ip-1", connection_limit=3, idle_timeout=2.0),
        rule(mx="*.google.com", connection_limit=7),
        rule(domain="gmail.com", idle_timeout=4.0, max_message_rate="10/s"),
    ]
    sh = shaping.Shaping(rules, DELIVERY, presets=True)
    base = sh.limits("google", mx, ["gmail.com"], "ip-2")
    # The preset sets connection_limit 5, 50 per connection, TLS required; the
    # operator's rules override the keys they set and keep the others.
    assert base.connection_limit == 7
    assert base.max_deliveries_per_connection == 50
    assert base.starttls == "required"
    assert base.idle_timeout == 4.0 and base.max_message_rate == 10.0
    assert base.rules == ("preset mx *.google.com", "shaping[1]", "shaping[2]")
    one = sh.limits("google", mx, ["gmail.com"], "ip-1")
    assert one.connection_limit == 3 and one.idle_timeout == 2.0
    assert one.max_message_rate == 10.0 and one.max_deliveries_per_connection == 50
    assert one.rules == ("preset mx *.google.com", "shaping[1]", "shaping[2]", "shaping[0]")
    # Among the operator's rules, file order decides.
    later = shaping.Shaping([rule(mx="*.google.com", connection_limit=7),
                             rule(site="google", connection_limit=8)], DELIVERY)
    assert later.limits("google", mx, ["gmail.com"], "x").connection_limit == 8


def test_presets_off_drops_them(tmp_path):
    mx = ("gmail-smtp-in.l.google.com",)
    p = tmp_path / "c.toml"
    p.write_text("[delivery]\nshaping_presets = false\n")
    off = shaping.Shaping.from_config(config.load(str(p)).config)
    got = off.limits("google", mx, ["gmail.com"], "default")
    assert got.rules == () and got.connection_limit == 10 and got.starttls == "opportunistic"
    on = shaping.Shaping.from_config(config.load(None).config)
    got = on.limits("google", mx, ["gmail.com"], "default")
    assert got.rules == ("preset mx *.google.com",) and got.connection_limit == 5


def test_limits_are_cached_and_the_cache_is_bounded():
    sh = shaping.Shaping([rule(domain="*.example.net", connection_limit=2)], DELIVERY,
                         presets=False, cache_size=3)
    first = sh.limits("s", ("mx.example.net",), ["a.example.net"], "default")
    assert sh.limits("s", ("mx.example.net",), {"a.example.net"}, "default") is first
    for i in range(20):
        got = sh.limits(f"s{i}", ("mx.example.net",), [f"d{i}.example.net"], "default")
        assert got.connection_limit == 2
    assert len(sh._cache) <= 3 and len(sh._by_domain) <= 3 and len(sh._by_mx) <= 3
    with pytest.raises(ValueError):
        shaping.Shaping([], DELIVERY, presets=False, cache_size=0)


# ------------------------------------------------------------------ check()

@pytest.mark.parametrize("r, key", [
    (rule(connection_limit=1), "shaping[0]: set exactly one"),
    (rule(domain="a.example", mx="*.example", connection_limit=1),
     "shaping[0]: set exactly one"),
    (rule(domain="a.example"), "shaping[0]: sets no limit"),
    (rule(domain="a example.com", connection_limit=1), "shaping[0].domain"),
    (rule(domain="a..example.com", connection_limit=1), "shaping[0].domain"),
    (rule(domain="*.com", connection_limit=1), "shaping[0].domain"),
    (rule(domain="a.*.example.com", connection_limit=1), "shaping[0].domain"),
    (rule(domain="bücher.example", connection_limit=1), "shaping[0].domain"),
    (rule(domain="-bad.example", connection_limit=1), "shaping[0].domain"),
    (rule(mx="*.goo gle.com", connection_limit=1), "shaping[0].mx"),
    (rule(mx="*.google.com/", connection_limit=1), "shaping[0].mx"),
    (rule(mx="[a-z].google.com", connection_limit=1), "shaping[0].mx"),
    (rule(mx="mx..google.com", connection_limit=1), "shaping[0].mx"),
    (rule(site="two words", connection_limit=1), "shaping[0].site"),
    (rule(domain="a.example", source="nope", connection_limit=1), "shaping[0].source"),
    (rule(domain="a.example", max_message_rate="0/s"), "shaping[0].max_message_rate"),
    (rule(domain="a.example", max_connection_rate="5/y"), "shaping[0].max_connection_rate"),
    (rule(domain="a.example", starttls="always"), "shaping[0].starttls"),
    (rule(domain="a.example", connection_limit=0), "shaping[0].connection_limit"),
    (rule(domain="a.example", idle_timeout=-1.0), "shaping[0].idle_timeout"),
])
def test_check_names_the_key(r, key):
    with pytest.raises(ValueError) as exc:
        shaping.check([r], {"ip-1"})
    assert str(exc.value).startswith(key), str(exc.value)


def test_check_accepts_good_rules_and_counts_from_zero():
    good = [rule(domain="example.com", connection_limit=1),
            rule(domain="*.Example.COM.", max_message_rate="5/m"),
            rule(mx="*", starttls="none"),
            rule(mx="mx?.example.net", source="ip-1", max_connection_rate="1.5/s"),
            rule(site="mx.example.net", source="default", idle_timeout=0.0),
            rule(domain="xn--bcher-kva.example", max_deliveries_per_connection=5)]
    shaping.check(good, {"ip-1"})
    with pytest.raises(ValueError, match=r"^shaping\[6\]\.source"):
        shaping.check(good + [rule(domain="a.example", source="ip-2", connection_limit=1)],
                      {"ip-1"})
    with pytest.raises(ValueError, match=r"^presets\[0\]\.mx"):
        shaping.check([rule(mx="a b", connection_limit=1)], set(), key_prefix="presets")


# ------------------------------------------------------------------ presets

def test_presets_load_and_pass_check():
    presets = shaping.load_presets()
    assert len(presets) >= 10
    shaping.check(presets, set())
    for i, r in enumerate(presets):
        assert not r.source, i
        # Conservative: no preset allows more than the [delivery] defaults.
        assert r.connection_limit is None or r.connection_limit <= DELIVERY.connection_limit
        assert (r.max_deliveries_per_connection is None
                or r.max_deliveries_per_connection <= DELIVERY.max_deliveries_per_connection)
    # load_presets hands out a copy: changing it does not change the next caller's.
    presets.clear()
    assert shaping.load_presets()


@pytest.mark.parametrize("mx, domain, expect", [
    ("gmail-smtp-in.l.google.com", "gmail.com", {"starttls": "required"}),
    ("aspmx2.googlemail.com", "corp.example", {"starttls": "required"}),
    ("mta5.am0.yahoodns.net", "yahoo.com", {"max_deliveries_per_connection": 20}),
    ("mx-aol.mail.gm0.yahoodns.net", "aol.com", {"max_deliveries_per_connection": 20}),
    ("mx.mail.yahoo.co.jp", "yahoo.co.jp", {"max_message_rate": 10.0}),
    ("hotmail-com.olc.protection.outlook.com", "hotmail.com", {"connection_limit": 5}),
    ("contoso-com.mail.protection.outlook.com", "contoso.com", {"connection_limit": 5}),
    ("mx01.mail.icloud.com", "icloud.com", {"max_deliveries_per_connection": 5}),
    ("mx1h1.comcast.net", "comcast.net", {"connection_limit": 10, "starttls": "required"}),
    ("mx00.emig.gmx.net", "gmx.de", {"connection_limit": 4}),
    ("mx-ha03.web.de", "web.de", {"connection_limit": 4}),
    ("smtp-in.orange.fr", "orange.fr", {"connection_limit": 2,
                                       "max_connection_rate": 900 / 3600}),
    ("mxs.mail.ru", "mail.ru", {"connection_limit": 5}),
    ("mx.yandex.ru", "yandex.ru", {"connection_limit": 5}),
])
def test_presets_cover_the_large_providers(mx, domain, expect):
    sh = shaping.Shaping([], DELIVERY, presets=True)
    got = sh.limits(mx, (mx,), [domain], "default")
    assert got.rules, f"no preset for {mx}"
    for k, v in expect.items():
        assert getattr(got, k) == pytest.approx(v), k
    assert sh.limits("other", ("mx.example.net",), ["example.net"], "default").rules == ()


@pytest.mark.parametrize("text, key", [
    ('[[shaping]]\nmx = "a b"\nconnection_limit = 1\n', "shaping[0].mx"),
    ('[[shaping]]\nmx = "*.ok.example"\nconnection_limit = 1\n'
     '[[shaping]]\nmx = "*.ok.example"\nconection_limit = 1\n', "shaping[1]"),
    ('[[shaping]]\nmx = "*.ok.example"\nsource = "ip-1"\nconnection_limit = 1\n',
     "shaping[0].source"),
    ('[[shaping]]\nmx = "*.ok.example"\nmax_message_rate = "lots"\n',
     "shaping[0].max_message_rate"),
    ('[[shaping\n', "presets.toml"),
])
def test_a_bad_presets_file_names_the_file_and_key(tmp_path, text, key):
    p = tmp_path / "presets.toml"
    p.write_text(text)
    with pytest.raises(ValueError) as exc:
        shaping.load_presets(str(p))
    msg = str(exc.value)
    assert msg.startswith(str(p)) and key in msg, msg


# ------------------------------------------------------------------ mta check-config

def check_config(tmp_path, text: str) -> subprocess.CompletedProcess:
    p = tmp_path / "mta.toml"
    p.write_text(f"[server]\nstate_dir = {str(tmp_path / 'state')!r}\n" + text)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("MTA_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "mta", "check-config", "-c", str(p)],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)


EGRESS = '[[egress.source]]\nname = "ip-1"\nsource_address = "127.0.0.2"\n'


@pytest.mark.parametrize("text, key", [
    ('[[shaping]]\nmx = "*.ok.example"\nconnection_limit = 2\n'
     '[[shaping]]\nmx = "*.ok.example"\nmax_message_rate = "fast"\n',
     "shaping[1].max_message_rate"),
    ('[[shaping]]\nmx = "*.ok.example"\nmax_connection_rate = "0/h"\n',
     "shaping[0].max_connection_rate"),
    ('[[shaping]]\ndomain = "a.example"\nmx = "*.a.example"\nconnection_limit = 2\n',
     "shaping[0]: set exactly one of domain, mx and site"),
    ('[[shaping]]\ndomain = "a example"\nconnection_limit = 2\n', "shaping[0].domain"),
    ('[[shaping]]\nmx = "*.goo gle.com"\nconnection_limit = 2\n', "shaping[0].mx"),
    ('[[shaping]]\nmx = "*.ok.example"\nsource = "ip-9"\nconnection_limit = 2\n',
     "shaping[0].source"),
    ('[[shaping]]\nmx = "*.ok.example"\nstarttls = "always"\n', "shaping[0].starttls"),
    ('[[shaping]]\nmx = "*.ok.example"\nconnection_limit = 0\n',
     "shaping[0].connection_limit"),
    ('[[shaping]]\nmx = "*.ok.example"\nconection_limit = 2\n', "conection_limit"),
])
def test_check_config_names_the_bad_key(tmp_path, text, key):
    r = check_config(tmp_path, EGRESS + text)
    assert r.returncode == 78, (r.stdout, r.stderr)
    assert key in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_check_config_accepts_good_rules(tmp_path):
    r = check_config(tmp_path, EGRESS + (
        '[[shaping]]\nmx = "*.google.com"\nconnection_limit = 8\nmax_message_rate = "50/s"\n'
        '[[shaping]]\ndomain = "*.example.org"\nsource = "ip-1"\nstarttls = "required"\n'
        '[[shaping]]\nsite = "mx.example.net"\nsource = "default"\nidle_timeout = 1.5\n'))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: ")


def test_a_domain_rule_does_not_loosen_starttls_for_the_whole_site():
    """Rules of the domains that share a site merge, the later winning: a rule with
    starttls = "opportunistic" for one domain Google hosts turned the presets' (or the
    operator's) "required" into "opportunistic" for all of gmail.com.  A domain rule's
    starttls now only tightens; an mx or site rule still overrides it."""
    mx = ("aspmx.l.google.com",)
    rules = [rule(mx="*.google.com", starttls="required"),
             rule(domain="partner.example", starttls="opportunistic", connection_limit=3)]
    sh = shaping.Shaping(rules, DELIVERY, presets=False)
    got = sh.limits("g", mx, ["gmail.com", "partner.example"], "default")
    assert got.starttls == "required" and got.connection_limit == 3
    # two domain rules: the stricter holds, in either order
    for order in ((0, 1), (1, 0)):
        pair = [rule(domain="bank.example", starttls="required"),
                rule(domain="shop.example", starttls="none")]
        sh = shaping.Shaping([pair[i] for i in order], DELIVERY, presets=False)
        assert sh.limits("s", ("mx.host.example",), ["bank.example", "shop.example"],
                         "default").starttls == "required"
    # a domain rule that matches every domain of the site (a partner on MX hosts of its
    # own) may still loosen what the presets or delivery.starttls say
    sh = shaping.Shaping([rule(mx="mx.partner.example", starttls="required"),
                          rule(domain="partner.example", starttls="opportunistic")],
                         DELIVERY, presets=False)
    own = ("mx.partner.example",)
    assert sh.limits("p", own, ["partner.example"], "default").starttls == "opportunistic"
    assert sh.limits("p", own, ["partner.example", "other.example"],
                     "default").starttls == "required"
    # a domain rule tightens the default; an mx rule may loosen as before
    sh = shaping.Shaping([rule(domain="bank.example", starttls="required")], DELIVERY,
                         presets=False)
    assert sh.limits("s", ("mx.h",), ["bank.example"], "default").starttls == "required"
    sh = shaping.Shaping([rule(domain="bank.example", starttls="required"),
                          rule(mx="mx.h", starttls="opportunistic")], DELIVERY, presets=False)
    assert sh.limits("s", ("mx.h",), ["bank.example"], "default").starttls == "opportunistic"


def test_a_site_with_thousands_of_domains_costs_the_cache_no_copy_of_them_each():
    """A provider's site (Google's MX hosts) gains a domain at a time, thousands in an
    hour, and the engine asks for its limits at each: the answers were cached by the
    whole set of domains, a copy of the set per answer (up to 4096 of them) -- 20,000
    domains took 3.9 GB and four minutes of CPU in a delivery process.  Only the domains
    a domain rule matches decide the answer (and whether there are others)."""
    import tracemalloc

    sh = shaping.Shaping([rule(domain="partner.example", connection_limit=3),
                          rule(domain="tls.example", starttls="none")],
                         DeliveryConfig(starttls="required"), presets=True)
    hosts = ("alt1.aspmx.l.google.com", "aspmx.l.google.com")
    domains: set = set()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            domains.add(f"company{i}.example")
            got = sh.limits("aspmx.l.google.com", hosts, domains, "default")
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 8_000_000, kept
    assert got.connection_limit == 5 and got.starttls == "required"      # the preset's
    domains.add("partner.example")
    assert sh.limits("aspmx.l.google.com", hosts, domains, "default").connection_limit == 3
    # a domain rule's looser starttls holds only for a site of its domain(s) alone
    assert sh.limits("mx.tls.example", ("mx.tls.example",), {"tls.example"},
                     "default").starttls == "none"
    assert sh.limits("mx.tls.example", ("mx.tls.example",), {"tls.example", "x.example"},
                     "default").starttls == "required"


# ------------------------------------------------------------------ several nodes

@pytest.mark.parametrize("limit, nodes, share", [
    (20, 4, 5), (10, 4, 2), (4, 2, 2), (5, 2, 2), (3, 4, 1), (1, 4, 1), (1, 1, 1),
    (10_000, 1000, 10), (7, 1, 7),
])
def test_share_of_a_connection_limit_rounds_down_and_is_at_least_one(limit, nodes, share):
    assert shaping.share_connections(limit, nodes) == share


@pytest.mark.parametrize("rate, nodes", [(300.0, 4), (1 / 86400, 1000), (1e6, 3), (0.5, 2)])
def test_share_of_a_rate_is_divided_and_never_zero(rate, nodes):
    got = shaping.share_rate(rate, nodes)
    assert got == pytest.approx(rate / nodes) and got > 0
    assert shaping.share_rate(None, nodes) is None     # unlimited stays unlimited
    assert shaping.share_rate(rate, 1) == rate


@pytest.mark.parametrize("cap, nodes, share", [
    (0, 4, 0), (100, 4, 25), (50, 4, 12), (3, 4, 1), (1, 2, 1), (10, 1, 10)])
def test_share_of_a_warmup_cap_rounds_down_is_at_least_one_and_keeps_no_cap(cap, nodes, share):
    assert shaping.share_cap(cap, nodes) == share


def test_shaping_limits_are_this_nodes_share_of_the_shared_keys_only():
    """[cluster] nodes = 4: connection_limit 20 -> 5, 300/s -> 75/s, 40/m -> 10/m; the
    [delivery] default (10 -> 2) too; messages per connection, idle_timeout and
    starttls are per connection and stay."""
    rules = [rule(mx="*.google.com", connection_limit=20, max_message_rate="300/s",
                  max_connection_rate="40/m", max_deliveries_per_connection=50,
                  idle_timeout=7, starttls="required")]
    one = shaping.Shaping(rules, DELIVERY, presets=False)
    four = shaping.Shaping(rules, DELIVERY, presets=False, nodes=4)
    args = ("gmail", ("alt1.gmail-smtp-in.l.google.com",), ("gmail.com",), "default")
    got = four.limits(*args)
    assert (got.connection_limit, got.nodes) == (5, 4)
    assert got.max_message_rate == pytest.approx(75.0)
    assert got.max_connection_rate == pytest.approx(40 / 60 / 4)
    assert (got.max_deliveries_per_connection, got.idle_timeout, got.starttls) == \
        (50, 7.0, "required")
    assert one.limits(*args).connection_limit == 20 and one.limits(*args).nodes == 1
    assert one.limits(*args).max_message_rate == pytest.approx(300.0)
    plain = four.limits("other", ("mx.other.test",), ("other.test",), "default")
    assert (plain.connection_limit, plain.max_message_rate) == (2, None)   # 10 // 4
    small = shaping.Shaping([rule(site="s", connection_limit=3, max_message_rate="1/d")],
                            DELIVERY, presets=False, nodes=8).limits("s", (), (), "default")
    assert small.connection_limit == 1 and 0 < small.max_message_rate < 1 / 86400


def test_shaping_from_config_takes_cluster_nodes(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(f"[server]\nstate_dir = '{tmp_path}'\n[cluster]\nnodes = 3\n"
                 "[[shaping]]\nsite = 's'\nconnection_limit = 9\n")
    s = config.load(str(p))
    sh = shaping.Shaping.from_config(s.config)
    assert sh.limits("s", (), (), "default").connection_limit == 3
    r = subprocess.run([sys.executable, "-m", "mta", "check-config", "-c", str(p)],
                       capture_output=True, cwd=REPO, timeout=60)
    assert "shaping limits are this node's share: 1/3 ([cluster] nodes = 3)" in \
        r.stdout.decode(), r


@pytest.mark.parametrize("value, why", [
    ("0", "cluster.nodes: Expected `int` >= 1"),
    ("-2", "cluster.nodes: Expected `int` >= 1"),
    ("1001", "cluster.nodes: Expected `int` <= 1000"),
    ("'4'", "cluster.nodes: Expected `int`, got `str`"),
    ("2.5", "cluster.nodes: Expected `int`, got `float`"),
    ("true", "cluster.nodes: Expected `int`, got `bool`"),
])
def test_cluster_nodes_errors_name_the_key(tmp_path, value, why):
    p = tmp_path / "c.toml"
    p.write_text(f"[cluster]\nnodes = {value}\n")
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(p))
    assert why in str(exc.value)
    r = subprocess.run([sys.executable, "-m", "mta", "check-config", "-c", str(p)],
                       capture_output=True, cwd=REPO, timeout=60)
    assert r.returncode == 78 and why in r.stderr.decode(), r.stderr
