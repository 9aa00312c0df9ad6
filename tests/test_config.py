"""Configuration: the schema, the shipped example, and error messages that name the key."""
import gc
import os
import tomllib

import msgspec
import msgspec.inspect as mi
import pytest

from mta import config
from mta.config.schema import SECTIONS, TOP_LEVEL_TABLES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_example_file_is_generated_from_the_schema():
    with open(os.path.join(REPO, "mta.example.toml")) as fh:
        shipped = fh.read()
    assert shipped == config.example_toml(), "run: mta print-config --example > mta.example.toml"


# Every table that is not a section, as the issue that added them lists them:
# an example table of each follows its section in the example.
NESTED_TABLES = {"[[delivery.route]]": ("delivery", "route"),
                 "[[dkim.keys]]": ("dkim", "keys"),
                 "[dkim.fallback]": ("dkim", "fallback"),
                 "[[egress.source]]": ("egress", "source"),
                 "[[egress.pool]]": ("egress", "pool")}


def _default(f, key):
    if f.required:
        return config.EXAMPLE_VALUES[key]
    return f.default if f.default is not mi.NODEFAULT else f.default_factory()


def _check_keys(key, struct, values: dict, text: str) -> None:
    """Each field of *struct* is in *values* with its default, or shown as not set."""
    for f in mi.type_info(struct).fields:
        name = f"{key}.{f.name}"
        assert f.type.extra_json_schema["description"], f"{name} has no doc"
        default = _default(f, name)
        if default is None:  # TOML has no null: shown as a comment
            assert f"# {f.name} = (not set)" in text.splitlines(), f"{name} is missing"
            assert f.name not in values, name
            continue
        assert f.name in values, f"{name} is missing"
        assert values[f.name] == default, f"{name}: {values[f.name]!r} != {default!r}"


def _example_table(text: str, header: str) -> str:
    """The commented-out example table under *header*, uncommented once."""
    lines = text.splitlines()
    assert f"# {header}" in lines, f"{header} has no example table"
    block = []
    for line in lines[lines.index(f"# {header}"):]:
        if not line.startswith("# "):
            break
        block.append(line[2:])
    return "\n".join(block) + "\n"


def check_example(text: str) -> None:
    """The example lists every key, the keys of the nested tables too, with defaults."""
    parsed = tomllib.loads(text)
    for section, struct in SECTIONS:
        _check_keys(section, struct, parsed[section], text)
    # The nested tables the schema declares are the ones this test knows.
    found = {h: tuple(k.split(".")) for s, st in SECTIONS
             for h, k, _ in config.nested_tables(s, st)}
    assert found == NESTED_TABLES
    for header, (section, name) in NESTED_TABLES.items():
        block = _example_table(text, header)
        table = tomllib.loads(block)[section][name]
        if header.startswith("[["):
            assert len(table) == 1, header
            table = table[0]
        field = next(f for f in mi.type_info(dict(SECTIONS)[section]).fields if f.name == name)
        t = field.type.type
        struct = (t.item_type if isinstance(t, mi.ListType)
                  else next(x for x in t.types if isinstance(x, mi.StructType))).cls
        _check_keys(f"{section}.{name}", struct, table, block)
        msgspec.convert(table, struct)   # and it is a valid table of its kind
    # The arrays of tables at the top level ([[shaping]]) have their example too.
    for key, struct in TOP_LEVEL_TABLES:
        block = _example_table(text, f"[[{key}]]")
        table = tomllib.loads(block)[key]
        assert len(table) == 1, key
        _check_keys(key, struct, table[0], block)
        msgspec.convert(table[0], struct)
    # And the example, loaded as a config file, gives the built-in defaults.
    assert config.resolve(config._decode(parsed), None).config == config.load(None).config


def test_example_lists_every_key_with_its_default_and_a_doc():
    check_example(config.example_toml())


@pytest.mark.parametrize("key", [
    "delivery.route.tls_verify", "delivery.route.source_address", "delivery.route.domain",
    "dkim.keys.headers", "dkim.keys.expire_seconds", "dkim.keys.canonicalization",
    "dkim.keys.subdomains", "dkim.fallback.mode", "dkim.fallback.selector",
    "smtp.max_recipients", "dkim.expire_seconds",
])
def test_example_check_fails_when_a_key_is_missing(key):
    """The check above is not vacuous: drop one key's line and it names that key."""
    section, _, name = key.rpartition(".")
    header = next((h for h, k in NESTED_TABLES.items() if ".".join(k) == section), None)
    lines = config.example_toml().splitlines()
    start = lines.index(f"# {header}") if header else lines.index(f"[{section}]")
    prefix = "# " if header else ""
    for i in range(start + 1, len(lines)):
        if lines[i].startswith((f"{prefix}{name} = ", f"{prefix}# {name} = ")):
            del lines[i]
            break
    else:
        raise AssertionError(f"{key} not found in the example")
    with pytest.raises(AssertionError, match=f"{key} is missing"):
        check_example("\n".join(lines) + "\n")


def test_defaults(tmp_path):
    s = config.load(None, cpu_count=3)
    assert s.listen == (("127.0.0.1", 2525),)
    assert s.acceptors == 1 and s.shards == 1
    big = config.load(None, cpu_count=16)
    assert big.acceptors == 8 and big.shards == 4 and big.deliveries == 16
    assert config.load(None, cpu_count=1).acceptors == 1
    assert s.config.smtp.max_text_line == 1000
    assert s.config.smtp.max_recipients >= 100
    assert os.path.isabs(s.state_dir)


@pytest.mark.parametrize("text, key", [
    ("[smtp]\nmax_recipients = 99\n", "smtp.max_recipients"),
    ("[smtp]\nmax_recipients = 'lots'\n", "smtp.max_recipients"),
    ("[smtp]\nlisten = ['127.0.0.1']\n", "smtp.listen[0]"),
    ("[smtp]\nlisten = ['example.com:25']\n", "smtp.listen[0]"),
    ("[smtp]\ntls_key = 'x.pem'\n", "smtp.tls_key"),
    ("[smtp]\ntls_certificate = '/nonexistent.pem'\ntls_key = '/nonexistent.key'\n",
     "smtp.tls_certificate"),
    ("[smtp]\nauth_file = '/nonexistent'\n", "smtp.auth_file"),
    ("[spool]\nshards = -1\n", "spool.shards"),
    ("[spool]\nfsync = 'yes'\n", "spool.fsync"),
    ("[bogus]\nx = 1\n", "bogus"),
    ("[server]\nstate_dri = 'x'\n", "state_dri"),
    # [[shaping]]: decoded by msgspec (types, bounds, the rate pattern), then
    # checked by mta.shaping.check through resolve (the rest).
    ("[[shaping]]\nmx = '*.a.example'\nmax_message_rate = '50/sec'\n",
     "shaping[0].max_message_rate"),
    ("[[shaping]]\nmx = '*.a.example'\nconnection_limit = 20000\n",
     "shaping[0].connection_limit"),
    ("[[shaping]]\nmx = '*.a.example'\nidle_timeout = 'long'\n", "shaping[0].idle_timeout"),
    ("[[shaping]]\nmx = '*.a.example'\nmax_connections = 3\n", "shaping[0]"),
    ("[[shaping]]\nmx = '*.a.example'\nconnection_limit = 1\n"
     "[[shaping]]\nsite = 'x'\nmax_connection_rate = '0/m'\n",
     "shaping[1].max_connection_rate"),
    ("[[shaping]]\nconnection_limit = 1\n", "shaping[0]: set exactly one"),
    ("[[shaping]]\ndomain = 'a.example'\nsite = 'x'\nconnection_limit = 1\n",
     "shaping[0]: set exactly one"),
    ("[[shaping]]\ndomain = 'a.example'\n", "shaping[0]: sets no limit"),
    ("[[shaping]]\ndomain = 'a..example'\nconnection_limit = 1\n", "shaping[0].domain"),
    ("[[shaping]]\nmx = 'mx .a.example'\nconnection_limit = 1\n", "shaping[0].mx"),
    ("[[shaping]]\nsite = 'a site'\nconnection_limit = 1\n", "shaping[0].site"),
    ("[[shaping]]\nmx = '*.a.example'\nsource = 'ip-1'\nconnection_limit = 1\n",
     "shaping[0].source"),
    ("[[shaping]]\nmx = '*.a.example'\nstarttls = 'yes'\n", "shaping[0].starttls"),
    # names sent in the greeting, EHLO and Received: ASCII host names, one line
    ("[server]\nhostname = 'mx.exämple.com'\n", "server.hostname"),
    ("[server]\nhostname = \"mx.example.com\\r\\n\"\n", "server.hostname"),
    ("[server]\nhostname = 'mx example.com'\n", "server.hostname"),
    ("[server]\nhostname = '[192.0.2.1]'\n", "server.hostname"),
    ("[delivery]\nhelo_name = 'mx.exämple.com'\n", "delivery.helo_name"),
    ("[delivery]\nhelo_name = \"mx.example.com\\nQUIT\"\n", "delivery.helo_name"),
    ("[delivery]\nhelo_name = '[300.1.2.3]'\n", "delivery.helo_name"),
    ("[[egress.source]]\nname = 'ip-1'\nehlo_name = 'ü.example'\n",
     "egress.source[0].ehlo_name"),
    ("[smtp]\nbanner = \"ESMTP\\r\\n250 injected\"\n", "smtp.banner"),
    # a delay of nan or inf would never retry
    ("[delivery]\nretry_schedule = [60, nan]\n", "delivery.retry_schedule"),
    ("[delivery]\nretry_schedule = [inf]\n", "delivery.retry_schedule"),
    ("[delivery]\nretry_schedule = [0]\n", "delivery.retry_schedule"),
    ("[webhooks]\nretry_schedule = [1, inf]\n", "webhooks.retry_schedule"),
    ("[webhooks]\nretry_schedule = [nan]\n", "webhooks.retry_schedule"),
    ("[events]\nstore_path = ''\n", "events.store_path"),
    ("[smtp]\nlisten = ['127.0.0.1:2525', '127.0.0.1:2525']\n", "smtp.listen[1]"),
    ("[server]\nproxy_protocol_from = ['10.0.0.0/33']\n", "server.proxy_protocol_from[0]"),
    # the HAProxy agent-check port: validated as admin.listen, no address used twice
    ("[admin]\nagent_listen = ['127.0.0.1']\n", "admin.agent_listen[0]"),
    ("[admin]\nagent_listen = ['agent.example:5555']\n", "admin.agent_listen[0]"),
    ("[admin]\nagent_listen = ['127.0.0.1:8026']\n", "admin.agent_listen[0]"),
    ("[admin]\nagent_listen = ['127.0.0.1:2525']\n", "admin.agent_listen[0]"),
    ("[admin]\nagent_listen = ['127.0.0.1:5555', '127.0.0.1:5555']\n",
     "admin.agent_listen[1]"),
    ("[admin]\nenabled = false\nagent_listen = ['127.0.0.1:5555']\n", "admin.agent_listen"),
    # one domain's two forms (U-label, A-label) are one route key: the last silently won
    ("[[delivery.route]]\ndomain = 'bücher.de'\nhosts = ['10.0.0.5:25']\n"
     "[[delivery.route]]\ndomain = 'xn--bcher-kva.de'\nhosts = ['10.0.0.6:25']\n",
     "delivery.route[1].domain"),
    ("[[delivery.route]]\ndomain = 'XN--BCHER-KVA.de'\nhosts = ['10.0.0.5:25']\n"
     "[[delivery.route]]\ndomain = 'Bücher.de.'\nhosts = ['10.0.0.6:25']\n",
     "delivery.route[1].domain"),
    # a sender's domain is looked up in lower case: these never matched, and the mail of
    # the domain went out from the default pool's addresses
    ("[egress]\ndomain_pool = {'@mybrand.example' = 'default'}\n",
     "egress.domain_pool.@mybrand.example"),
    ("[egress]\ndomain_pool = {'MyBrand.example' = 'default', 'mybrand.example.' = "
     "'default'}\n", "mybrand.example is listed twice"),
])
def test_errors_name_the_key(tmp_path, text, key):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(p))
    assert key in str(exc.value)


def test_a_state_dir_too_deep_for_the_bus_sockets_is_refused_naming_it(tmp_path):
    """The bus's Unix sockets live in state_dir/run: a path that cannot be bound was a
    spool shard dying at start ("AF_UNIX path too long"); now config.load refuses it.
    The bound is the kernel's: the longest name bound at exactly the limit works."""
    import socket

    def state_dir(longest: int) -> str:
        # run/<name>: the longest name is admin-stats (11 octets; delivery-<D-1> is 10)
        base = str(tmp_path)
        return base + "/" + "d" * (longest - len(base) - 1 - len("/run/admin-stats"))

    def conf(sd: str) -> str:
        p = tmp_path / "c.toml"
        p.write_text(f"[server]\nstate_dir = '{sd}'\n[delivery]\nprocesses = 1\n"
                     "[spool]\nshards = 1\n")
        return str(p)

    fits = state_dir(config.MAX_SOCKET_PATH)
    s = config.load(conf(fits))
    longest = s.stats_endpoint()[len("ipc://"):]
    assert len(longest) == config.MAX_SOCKET_PATH
    os.makedirs(s.run_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(longest)                  # (the kernel takes it)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
            with pytest.raises(OSError, match="too long"):
                other.bind(longest + "x")
    assert len(s.stream_path(0)) <= len(longest)
    assert max(s.socket_paths(), key=len) == longest
    with pytest.raises(config.ConfigError) as exc:
        config.load(conf(state_dir(config.MAX_SOCKET_PATH + 1)))
    assert str(exc.value).startswith("server.state_dir: ") and "too deep" in str(exc.value)


def test_socket_paths_name_every_bus_socket_of_every_process(tmp_path):
    """The paths config.load measures are those the processes bind and connect to: the
    statistics, each delivery process's jobs, each shard's requests and stream."""
    p = tmp_path / "c.toml"
    p.write_text(f"[server]\nstate_dir = '{tmp_path}/s'\n[delivery]\nprocesses = 3\n"
                 "[spool]\nshards = 2\n")
    s = config.load(str(p))
    run = os.path.abspath(s.run_dir)
    ipc = [s.stats_endpoint()] + [s.delivery_endpoint(d) for d in range(3)] + \
        [s.spool_endpoint(n) for n in range(2)]
    assert all(e.startswith("ipc://") for e in ipc)
    want = [e[len("ipc://"):] for e in ipc] + [s.stream_path(n) for n in range(2)]
    assert sorted(s.socket_paths()) == sorted(want)
    assert sorted(os.path.relpath(x, run) for x in s.socket_paths()) == [
        "admin-stats", "commit-0", "commit-1", "delivery-0", "delivery-1", "delivery-2",
        "spool-0", "spool-1"]


@pytest.mark.parametrize("text, said", [
    ("[smtp]\nlisten = ['[::1]:2525', '[0:0::1]:2525']\n",
     "smtp.listen[1]: [0:0::1]:2525 is listed twice"),
    ("[smtp]\nlisten = ['[::1]:2525']\n[http]\nlisten = ['[0::1]:2525']\n",
     "http.listen[0]: [0::1]:2525 is already used by another listener"),
    ("[smtp]\nlisten = ['127.0.0.1:2525', '127.000.0.1:2525']\n", "smtp.listen[1]"),
])
def test_one_address_spelt_two_ways_is_one_listener(tmp_path, text, said):
    """Listen addresses are compared as addresses, not as text: a reload bound both
    spellings of one IPv6 address (SO_REUSEPORT let it), which serve refused."""
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(p))
    assert str(exc.value).startswith(said), str(exc.value)


def test_an_unreadable_tls_file_says_why(tmp_path):
    # "cannot read key.pem" alone left the operator to guess between a wrong path and
    # the daemon's user lacking permission (the unit runs it as mta); the DKIM key and
    # the auth_file say why
    (tmp_path / "cert.pem").write_text("x")
    p = tmp_path / "c.toml"
    p.write_text(f"[smtp]\ntls_certificate = '{tmp_path}/cert.pem'\n"
                 f"tls_key = '{tmp_path}/key.pem'\n")
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(p))
    assert str(exc.value) == f"smtp.tls_key: cannot read {tmp_path}/key.pem: " \
        "No such file or directory"


def test_agent_listen_needs_no_token_on_any_address(tmp_path):
    # (it says nothing secret: it listens where the balancer reaches it)
    p = tmp_path / "c.toml"
    p.write_text("[admin]\nagent_listen = ['0.0.0.0:5555', '[::1]:5556']\n")
    s = config.load(str(p))
    assert s.agent_listen == (("0.0.0.0", 5555), ("::1", 5556))
    assert config.load(None).agent_listen == ()


def test_shaping_rules_naming_a_configured_source_pass(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[[egress.source]]\nname = 'ip-1'\n"
                 "[[shaping]]\nmx = '*.a.example'\nsource = 'ip-1'\nconnection_limit = 1\n"
                 "[[shaping]]\ndomain = 'b.example'\nsource = 'default'\n"
                 "max_message_rate = '3600/h'\n")
    s = config.load(str(p))
    assert [r.source for r in s.config.shaping] == ["ip-1", "default"]


def test_host_names_and_address_literals_that_can_be_sent_pass(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[server]\nhostname = 'MX-1.xn--bcher-kva.example'\n"
                 "[delivery]\nhelo_name = '[IPv6:2001:db8::1]'\n"
                 "[[egress.source]]\nname = 'ip-1'\nehlo_name = '[192.0.2.1]'\n"
                 "[smtp]\nbanner = 'ESMTP ready'\n")
    s = config.load(str(p))
    assert s.hostname == "MX-1.xn--bcher-kva.example"
    assert s.helo_name == "[IPv6:2001:db8::1]"


def test_toml_syntax_error_names_the_file(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text("[smtp\n")
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(p))
    assert "broken.toml" in str(exc.value)


def test_non_utf8_config_and_rules_files_are_config_errors(tmp_path):
    # tomllib raises UnicodeDecodeError (not TOMLDecodeError) for bytes that are not UTF-8
    p = tmp_path / "latin1.toml"
    p.write_bytes(b'[smtp]\nbanner = "caf\xe9"\n')
    with pytest.raises(config.ConfigError, match="latin1.toml: not UTF-8"):
        config.load(str(p))
    rules = tmp_path / "rules.toml"
    rules.write_bytes(b'[[rule]]\nname = "caf\xe9"\n')
    p.write_text(f'[feedback]\nbounce_rules = "{rules}"\n')
    with pytest.raises(config.ConfigError,
                       match="feedback.bounce_rules: .*rules.toml: not UTF-8"):
        config.load(str(p))


def test_auth_file_lines_are_validated(tmp_path):
    from mta.passwords import check_password, hash_password, parse_password_file

    line = "alice:" + hash_password("s3cret", iterations=10_000)
    users = parse_password_file(f"# comment\n\n{line}\n")
    assert check_password(users, "alice", b"s3cret")
    assert not check_password(users, "alice", b"wrong")
    assert not check_password(users, "bob", b"s3cret")
    with pytest.raises(ValueError, match="line 1"):
        parse_password_file("alice:plaintext\n")


def test_dkim_missing_key_file_names_the_path(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[[dkim.keys]]\ndomain = "example.com"\nselector = "s1"\n'
                 f'key_file = "{tmp_path}/missing.pem"\n')
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(p))
    assert "dkim.keys[0].key_file" in str(exc.value)
    assert f"{tmp_path}/missing.pem" in str(exc.value)


def test_every_dkim_key_problem_is_named(tmp_path):
    # (only the first was, with "and 1 more problem(s)": the operator fixed one, ran
    # check-config again, and only then learnt of the next)
    p = tmp_path / "c.toml"
    p.write_text("".join(f'[[dkim.keys]]\ndomain = "d{i}.example"\nselector = "s1"\n'
                         f'key_file = "{tmp_path}/missing{i}.pem"\n' for i in range(12)))
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(p))
    text = str(exc.value)
    for i in range(10):
        assert f"dkim.keys[{i}].key_file" in text and f"missing{i}.pem" in text, text
    assert "dkim.keys[10]" not in text and "(and 2 more problem(s))" in text, text


def test_a_dkim_fallback_without_keys_is_refused(tmp_path):
    # [dkim] was checked only when it had keys: a fallback naming a domain with no key
    # (every [[dkim.keys]] table left out, or commented out in a rotation) passed
    # check-config, and all mail went unsigned without a word
    p = tmp_path / "c.toml"
    p.write_text('[dkim.fallback]\ndomain = "esp.example.net"\nmode = "always"\n')
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(p))
    assert "dkim.fallback: no key in dkim.keys for esp.example.net" in str(exc.value)
    p.write_text('[dkim]\nenabled = false\n[dkim.fallback]\ndomain = "esp.example.net"\n')
    config.load(str(p))     # (signing off: nothing to check)


def test_an_overflow_pool_must_exist_and_be_another_pool(tmp_path):
    import msgspec

    from mta.config import ConfigError, resolve
    from mta.config.schema import Config

    def eg(overflow):
        return {"source": [{"name": "ip-2", "source_address": "127.0.0.2"}],
                "pool": [{"name": "warm", "sources": [{"source": "ip-2"}],
                          "overflow_pool": overflow}]}
    for bad, why in (("nope", "no pool is called 'nope'"), ("warm", "the pool itself")):
        with pytest.raises(ConfigError, match=r"egress\.pool\[0\]\.overflow_pool: " + why):
            resolve(msgspec.convert({"server": {"state_dir": str(tmp_path)},
                                     "egress": eg(bad)}, Config), None)
    ok = resolve(msgspec.convert({"server": {"state_dir": str(tmp_path)},
                                  "egress": eg("default")}, Config), None)
    assert ok.config.egress.pool[0].overflow_pool == "default"


@pytest.mark.parametrize("text, key", [
    ('[delivery]\nmax_age = 1000\n', "delivery.max_age"),
])
def test_a_reload_names_what_the_spool_shards_read_only_at_start(tmp_path, text, key):
    # The spool shards are not replaced at a reload (SIGHUP takes some [delivery] keys):
    # what else of the file they read at start stays until a restart -- a Bounce Rule
    # turned off went on suppressing recipients -- and mta reload, the supervisor's log
    # and mta check-config said nothing of it.
    base = f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
    old_path, new_path = tmp_path / "old.toml", tmp_path / "new.toml"
    old_path.write_text(base)
    new_path.write_text(base + text)
    later = config.restart_keys(config.load(str(old_path)), config.load(str(new_path)))
    assert any(k.startswith(key) for k in later), later


def test_a_reload_gives_the_spool_shards_the_events_backlog_bound(tmp_path):
    # events.max_backlog_bytes was named as waiting for a restart (the shards read it at
    # their start only); they take it at a reload now (a lower one not below the backlog
    # they hold then: Shard._set_backlog_bound)
    base = f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
    old_path, new_path = tmp_path / "old.toml", tmp_path / "new.toml"
    old_path.write_text(base)
    new_path.write_text(base + '[events]\nmax_backlog_bytes = 2000000000\n')
    later = config.restart_keys(config.load(str(old_path)), config.load(str(new_path)))
    assert not [k for k in later if k.startswith("events.")], later


@pytest.mark.parametrize("text", [
    '[suppression]\nbounce_rule = false\n', '[suppression]\nenabled = false\n',
    '[suppression]\npath = "other"\n', '[suppression]\nmax_size = 20000000\n',
    '[feedback]\nbounce_domains = ["bounces.test"]\n'])
def test_a_reload_applies_the_suppression_list_to_every_process(tmp_path, text):
    # the new acceptors and the spool shards (SIGHUP) take it together: not named as
    # waiting for a restart (the shards kept the old list while the acceptors took the
    # new one: injections checked against one list, Bounce Rule entries put on another)
    base = f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
    old_path, new_path = tmp_path / "old.toml", tmp_path / "new.toml"
    old_path.write_text(base)
    new_path.write_text(base + text)
    later = config.restart_keys(config.load(str(old_path)), config.load(str(new_path)))
    assert not [k for k in later if k.startswith(("suppression.", "feedback."))], later


def _assert_digest_follows_the_file(cfg, attr: str, edit) -> None:
    """Settings.<attr>, the digest of a file the config at *cfg* names: the same file
    gives the same digest, *edit()* (the file changed in place, the config text not)
    another; the active-configuration record keeps the digest the supervisor applied,
    not the file's now; no file, no digest."""
    before = config.load(str(cfg))
    assert len(getattr(before, attr)) == 64
    assert getattr(config.load(str(cfg)), attr) == getattr(before, attr)
    os.makedirs(before.run_dir)
    config.write_active(before, str(cfg))
    edit()
    after = config.load(str(cfg))
    assert after.config == before.config
    assert getattr(after, attr) != getattr(before, attr)
    assert getattr(config.read_active(before.run_dir), attr) == getattr(before, attr)
    assert getattr(config.load(None), attr) == ""


def test_the_bounce_rules_file_is_known_by_its_content_too(tmp_path):
    # a reload compared only feedback.bounce_rules' name: a file edited in place left the
    # spool shards on the old rules.  Its digest, recorded with the active configuration
    # (the shards read it from there), tells the edit.
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "a"\ncode = 550\nclass = 10\n')
    cfg = tmp_path / "mta.toml"
    cfg.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[feedback]\nbounce_rules = "{rules}"\n')
    _assert_digest_follows_the_file(
        cfg, "bounce_rules_digest",
        lambda: rules.write_text('[[rule]]\nname = "a"\ncode = 550\nclass = 51\n'))


def test_the_dkim_key_files_are_known_by_their_content_too(tmp_path):
    # a reload compared only [dkim]'s text: a key file replaced in place left the spool
    # shards signing with the old key.  The key files' digest, recorded with the active
    # configuration, tells the change; the record keeps the one the supervisor checked.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = tmp_path / "k.pem"

    def new_key():
        key.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))

    new_key()
    cfg = tmp_path / "mta.toml"
    cfg.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n[[dkim.keys]]\n'
                   f'domain = "a.test"\nselector = "s"\nalgorithm = "ed25519-sha256"\n'
                   f'key_file = "{key}"\n')
    _assert_digest_follows_the_file(cfg, "dkim_keys_digest", new_key)


def test_the_validated_bounce_rules_are_kept_for_the_children(tmp_path):
    # the children read the operator's rules file themselves: one saved broken (or
    # deleted) without a reload stopped a restarted spool shard at its start.  The record
    # of the active configuration keeps a copy of the bytes validated, named by their
    # digest; a child reads it (the operator's file only when there is no copy).
    from mta import feedback
    rules = tmp_path / "rules.toml"
    good = b'[[rule]]\nname = "a"\ncode = 550\nclass = 10\n'
    rules.write_bytes(good)
    cfg = tmp_path / "mta.toml"
    cfg.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[feedback]\nbounce_rules = "{rules}"\n')
    first = config.load(str(cfg))
    run = first.run_dir
    os.makedirs(run)
    digest = first.bounce_rules_digest
    assert feedback.validated_file(run, str(rules), digest) == str(rules)   # no copy yet
    config.write_active(first, str(cfg))
    copy = feedback.validated_file(run, str(rules), digest)
    assert copy == feedback.copy_path(run, digest) and open(copy, "rb").read() == good
    rules.write_text('[[rule]]\nname = "broken\n')
    assert feedback.Classifier.from_file(copy).classify(550, None, "x") == (10, "a")
    assert feedback.Classifier.from_file(copy).digest == digest
    # a reload of another good file: its copy, and the previous one (a failed reload
    # goes back to it); the one before that is removed
    second_rules = b'[[rule]]\nname = "b"\ncode = 550\nclass = 51\n'
    rules.write_bytes(second_rules)
    second = config.load(str(cfg))
    config.write_active(second, str(cfg))
    rules.write_bytes(good + b"# again\n")
    third = config.load(str(cfg))
    config.write_active(third, str(cfg))
    kept = sorted(n for n in os.listdir(run) if n.startswith("bounce-rules-"))
    assert kept == sorted(os.path.basename(feedback.copy_path(run, s.bounce_rules_digest))
                          for s in (second, third)), kept
    # the record read back (no file read) neither writes nor removes a copy
    config.write_active(config.read_active(run), str(cfg))
    assert sorted(n for n in os.listdir(run) if n.startswith("bounce-rules-")) == kept
    # no rules file any more: the copies go, but the previous configuration's
    cfg.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n')
    config.write_active(config.load(str(cfg)), str(cfg))
    assert [n for n in os.listdir(run) if n.startswith("bounce-rules-")] == \
        [os.path.basename(feedback.copy_path(run, third.bounce_rules_digest))]
    # a missing file at a reload is refused as before, naming it
    cfg.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[feedback]\nbounce_rules = "{tmp_path / "none.toml"}"\n')
    with pytest.raises(config.ConfigError, match="feedback.bounce_rules: .*none.toml"):
        config.load(str(cfg))


def test_a_nameserver_given_as_a_bare_ipv6_address_is_that_address_on_port_53(tmp_path):
    """delivery.nameservers takes "ip or ip:port": a bare IPv6 address is an ip (its port
    needs the brackets, "[::1]:5353", as every host:port here).  "::1" was refused and
    "2001:db8::a:1" read as 2001:db8::a port 1 -- every MX lookup to the wrong server
    (refused now, as either reading may be meant: see the next test)."""
    p = tmp_path / "c.toml"
    p.write_text("[delivery]\nnameservers = ['::1', '2001:db8::53', '[2001:db8::53]:5353',"
                 " '[::1]', '192.0.2.53', '192.0.2.53:5353']\n")
    assert config.load(str(p)).nameservers == (
        ("::1", 53), ("2001:db8::53", 53), ("2001:db8::53", 5353), ("::1", 53),
        ("192.0.2.53", 53), ("192.0.2.53", 5353))


def test_an_ipv6_address_and_port_without_brackets(tmp_path):
    """A listen address is host:port: "::1:2525" (with a bare IPv6 host) is [::1]:2525, as
    it was before the brackets were asked for anywhere (a file with it must still start);
    a socks5_proxy so written passed check-config, then the delivery processes died at
    their start on it: a ConfigError that names the key and the [v6]:port form."""
    p = tmp_path / "c.toml"
    p.write_text("[smtp]\nlisten = ['::1:2525']\n[admin]\nagent_listen = ['::1:5555']\n")
    s = config.load(str(p))
    assert s.config.smtp.listen == ["::1:2525"]
    assert config.parse_hostport("::1:2525") == ("::1", 2525)
    p.write_text("[[egress.source]]\nname = 'p'\nsocks5_proxy = '::1:1080'\n")
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(p))
    assert str(exc.value).startswith("egress.source[0].socks5_proxy: ") and \
        "[2001:db8::1]:25" in str(exc.value), exc.value
    p.write_text("[[egress.source]]\nname = 'p'\nsocks5_proxy = '[::1]:1080'\n")
    config.load(str(p))


@pytest.mark.parametrize("text, key", [
    ("[delivery]\nipv6 = false\nsource_address = '::1'\n", "delivery.source_address"),
    ("[delivery]\nipv6 = false\n[[delivery.route]]\ndomain = 'a.test'\nhosts = ['10.0.0.5']\n"
     "source_address = '2001:db8::5'\n", "delivery.route[0].source_address"),
    ("[delivery]\nipv6 = false\n[[egress.source]]\nname = 'v6'\n"
     "source_address = '2001:db8::5'\n", "egress.source[0].source_address"),
])
def test_an_ipv6_source_address_with_ipv6_off_is_an_error(tmp_path, text, key):
    """delivery.ipv6 = false connects to no IPv6 address: a source bound to one would reach
    nothing, and every message it took was deferred until it expired."""
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(p))
    assert str(exc.value).startswith(key + ": ") and "delivery.ipv6" in str(exc.value)
    p.write_text(text.replace("ipv6 = false", "ipv6 = true"))
    config.load(str(p))


@pytest.mark.parametrize("item", ["::1:53", "::1:5353", "2001:db8::a:1"])
def test_a_nameserver_that_reads_as_an_ipv6_address_or_as_one_with_a_port_is_refused(
        tmp_path, item):
    """"::1:53" was ::1 on port 53 until bare IPv6 addresses were taken ("::1" was
    refused, so an operator wrote this); read since as the address ::1:53 on port 53,
    every MX lookup went to a server that is not there, without a word.  Either reading
    may be meant: a ConfigError asks for the brackets."""
    p = tmp_path / "c.toml"
    p.write_text(f"[delivery]\nnameservers = ['{item}']\n")
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(p))
    assert "delivery.nameservers[0]" in str(exc.value) and f"[{item}]" in str(exc.value)


def test_a_domain_pool_key_in_capitals_or_with_a_final_dot_matches_its_senders(tmp_path):
    # egress.domain_pool keys are looked up by the sender's domain in lower case: a key
    # written 'MyBrand.example' or 'mybrand.example.' matched no sender (the mail went
    # from the default pool); it is taken as the domain it names
    p = tmp_path / "c.toml"
    p.write_text("[[egress.source]]\nname = 'b'\nsource_address = '127.0.0.2'\n"
                 "[[egress.pool]]\nname = 'brand'\nsources = [{source = 'b'}]\n"
                 "[egress]\ndomain_pool = {'MyBrand.example' = 'brand', "
                 "'other.example.' = 'brand'}\n")
    s = config.load(str(p))
    assert s.pool_for(None, "news@mybrand.example") == "brand"
    assert s.pool_for(None, "news@MYBRAND.EXAMPLE") == "brand"
    assert s.pool_for(None, "x@other.example") == "brand"
    assert s.pool_for(None, "x@third.example") == "default"


def test_keys_renamed_since_are_read_as_their_new_names(tmp_path):
    # delivery.connections_per_domain and messages_per_connection were renamed (556bb7e,
    # 2026-12-02) and a file that still had them stopped the daemon at the upgrade
    # ("unknown field"); they are read as the new keys, with a note
    p = tmp_path / "c.toml"
    p.write_text("[delivery]\nconnections_per_domain = 3\nmessages_per_connection = 50\n")
    s = config.load(str(p))
    assert s.config.delivery.connection_limit == 3
    assert s.config.delivery.max_deliveries_per_connection == 50
    assert len(s.notes) == 2
    assert "delivery.connections_per_domain is now delivery.connection_limit" in s.notes[0]
    assert "delivery.messages_per_connection is now " \
        "delivery.max_deliveries_per_connection" in s.notes[1]
    # the new name given too: it wins, and the note says the old one is ignored
    p.write_text("[delivery]\nconnections_per_domain = 3\nconnection_limit = 7\n")
    s = config.load(str(p))
    assert s.config.delivery.connection_limit == 7
    assert s.notes == ("delivery.connections_per_domain is now delivery.connection_limit, "
                       "which is set too: connections_per_domain = 3 is ignored",)
    # the old value is checked as the new key is
    p.write_text("[delivery]\nconnections_per_domain = 0\n")
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(p))
    assert str(exc.value).startswith("delivery.connection_limit: ")
    assert str(exc.value).endswith(" (given as delivery.connections_per_domain)")
    assert config.load(None).notes == ()


def test_a_banner_with_a_tab_passes_other_control_characters_do_not(tmp_path):
    # d55edbb refused every control character, the tab too, which RFC 5321's reply text
    # allows (textstring = 1*(%d09 / %d32-126)) and which every version before took:
    # such a file stopped the daemon at the upgrade
    p = tmp_path / "c.toml"
    p.write_text('[smtp]\nbanner = "ESMTP\\tready"\n')
    assert config.load(str(p)).config.smtp.banner == "ESMTP\tready"
    for bad in ("\\n", "\\r", "\\u0000", "\\u000b", "\\u007f"):
        p.write_text(f'[smtp]\nbanner = "ESMTP{bad}x"\n')
        with pytest.raises(config.ConfigError) as exc:
            config.load(str(p))
        assert str(exc.value).startswith("smtp.banner: "), bad


def test_a_host_name_with_its_final_dot_is_sent_without_it(tmp_path):
    # d55edbb refused a host name written with its final dot (the absolute form,
    # 'mx.example.com.'), which every version before took and sent: such a file stopped
    # the daemon at the upgrade.  It is the same name: sent without the dot, with a note
    p = tmp_path / "c.toml"
    p.write_text("[server]\nhostname = 'mx.example.com.'\n"
                 "[delivery]\nhelo_name = 'out.example.com.'\n"
                 "[[egress.source]]\nname = 'ip-1'\nehlo_name = 'Ip-1.Example.com.'\n")
    s = config.load(str(p))
    assert s.hostname == s.config.server.hostname == "mx.example.com"
    assert s.helo_name == s.config.delivery.helo_name == "out.example.com"
    assert s.config.egress.source[0].ehlo_name == "Ip-1.Example.com"
    assert s.notes == (
        "server.hostname 'mx.example.com.' is sent as 'mx.example.com'",
        "delivery.helo_name 'out.example.com.' is sent as 'out.example.com'",
        "egress.source[0].ehlo_name 'Ip-1.Example.com.' is sent as 'Ip-1.Example.com'")
    # what is still no host name is refused, as before
    for bad in ("mx..example.com", "mx.example.com..", ".", "mx.exämple.com.", "-mx.com."):
        p.write_text(f"[delivery]\nhelo_name = '{bad}'\n")
        with pytest.raises(config.ConfigError) as exc:
            config.load(str(p))
        assert str(exc.value).startswith(f"delivery.helo_name: '{bad}' "), bad


def test_a_reload_does_not_say_the_spool_free_space_floor_waits_for_a_restart(tmp_path):
    # spool.min_free_* are read by the acceptors (replaced at a reload) and the admin
    # process (from the active record) only: the log said they waited for a restart
    base = f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
    old_path, new_path = tmp_path / "old.toml", tmp_path / "new.toml"
    old_path.write_text(base)
    new_path.write_text(base + '[spool]\nmin_free_bytes = 1\nmin_free_percent = 50\n'
                        'directory = "elsewhere"\n')
    later = config.restart_keys(config.load(str(old_path)), config.load(str(new_path)))
    assert later == ["spool.directory"], later


def test_a_reload_says_who_takes_spool_queue_high_water_now(tmp_path):
    # the acceptors (replaced at every reload) open their bus to the shards with the new
    # mark, the delivery processes when a reload replaces them; the log and check-config
    # said the whole change waited for a restart.  Only the spool shards' side does.
    base = f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
    old_path, new_path = tmp_path / "old.toml", tmp_path / "new.toml"
    old_path.write_text(base)
    new_path.write_text(base + '[spool]\nqueue_high_water = 50\n')
    later = config.restart_keys(config.load(str(old_path)), config.load(str(new_path)))
    [said] = later
    assert said.startswith("spool.queue_high_water (the spool shards'"), said
    assert "the new acceptors take it now" in said, said
    assert "delivery processes' unless this reload replaces them" in said, said


# The HTTP acceptor's and the resolver's bounds, once module constants: settings with
# their old values as defaults, refused with the key named where a value would break the
# node, applied by a reload (the acceptors are replaced at every reload, the delivery
# processes when [delivery] changed): never named as waiting for a restart.
NEW_BOUNDS = {"http.max_header_field_length": 100_000, "http.max_header_block_size": 1_000_000,
              "http.max_pipelined": 16, "http.max_pipelined_bytes": 1 << 20,
              "http.loop_prepare_size": 65536, "http.build_slice_time": 0.02,
              "delivery.dns_hosts_in_flight": 10}


def test_the_bounds_that_were_constants_keep_their_values_as_defaults():
    from mta.api import build
    from mta import dns as mdns
    from mta.delivery import engine

    cfg = config.load(None).config
    for key, want in NEW_BOUNDS.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == want, key
    assert (build.MAX_FIELD_VALUE, build.MAX_HEADER_BLOCK) == (100_000, 1_000_000)
    # every MX host delivery looks up is asked at once (see test_dns)
    assert mdns.HOSTS_IN_FLIGHT == engine.MAX_MX_HOSTS == 10


@pytest.mark.parametrize("text, key", [
    ("[http]\nmax_pipelined = 1\n", "http.max_pipelined"),      # reading never resumed
    ("[http]\nmax_pipelined = 0\n", "http.max_pipelined"),
    ("[http]\nmax_pipelined_bytes = -1\n", "http.max_pipelined_bytes"),
    ("[http]\nloop_prepare_size = -1\n", "http.loop_prepare_size"),
    ("[http]\nbuild_slice_time = 0\n", "http.build_slice_time"),
    ("[http]\nbuild_slice_time = nan\n", "http.build_slice_time"),
    ("[http]\nbuild_slice_time = 3600\n", "http.build_slice_time"),
    ("[http]\nmax_header_field_length = 10\n", "http.max_header_field_length"),
    ("[http]\nmax_header_field_length = 50000000\n", "http.max_header_field_length"),
    ("[http]\nmax_header_block_size = 100\n", "http.max_header_block_size"),
    ("[http]\nmax_header_block_size = 1000000000\n", "http.max_header_block_size"),
    ("[delivery]\ndns_hosts_in_flight = 0\n", "delivery.dns_hosts_in_flight"),
    ("[delivery]\ndns_hosts_in_flight = 1000\n", "delivery.dns_hosts_in_flight"),
    ("[delivery]\ndns_hosts_in_flight = 2.5\n", "delivery.dns_hosts_in_flight"),
])
def test_a_bound_that_would_break_the_node_is_refused_naming_its_key(tmp_path, text, key):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(p))
    assert key in str(exc.value), exc.value


def test_the_bounds_that_were_constants_are_taken_at_their_limits(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[http]\nmax_pipelined = 2\nmax_pipelined_bytes = 0\nloop_prepare_size = 0\n"
                 "build_slice_time = 60\nmax_header_field_length = 1000\n"
                 "max_header_block_size = 16384\n[delivery]\ndns_hosts_in_flight = 1\n")
    cfg = config.load(str(p)).config
    assert (cfg.http.max_pipelined, cfg.http.max_pipelined_bytes, cfg.http.loop_prepare_size,
            cfg.http.build_slice_time, cfg.http.max_header_field_length,
            cfg.http.max_header_block_size, cfg.delivery.dns_hosts_in_flight) == \
        (2, 0, 0, 60.0, 1000, 16384, 1)


def test_a_reload_applies_the_bounds_that_were_constants(tmp_path):
    base = f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
    old_path, new_path = tmp_path / "old.toml", tmp_path / "new.toml"
    old_path.write_text(base)
    new_path.write_text(base + "[http]\nmax_pipelined = 4\nmax_pipelined_bytes = 4096\n"
                        "loop_prepare_size = 1024\nbuild_slice_time = 0.5\n"
                        "max_header_field_length = 2000\nmax_header_block_size = 20000\n"
                        "[delivery]\ndns_hosts_in_flight = 3\n")
    old, new = config.load(str(old_path)), config.load(str(new_path))
    assert new.config.http != old.config.http and new.config.delivery != old.config.delivery
    assert config.restart_keys(old, new) == []


def _handshake(server_ctx, client_ctx) -> dict:
    """An in-memory TLS handshake (no socket); the server certificate the client got."""
    import ssl

    bios = [ssl.MemoryBIO() for _ in range(4)]
    srv = server_ctx.wrap_bio(bios[0], bios[1], server_side=True)
    cli = client_ctx.wrap_bio(bios[2], bios[3], server_hostname="mta.test")
    for _ in range(10):
        done = 0
        for side in (cli, srv):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        if bios[3].pending:
            bios[0].write(bios[3].read())
        if bios[1].pending:
            bios[2].write(bios[1].read())
        if done == 2:
            return cli.getpeercert()
    raise AssertionError("no handshake")


@pytest.mark.parametrize("broken", ["deleted", "truncated", "replaced"])
def test_the_checked_tls_files_are_kept_and_loaded_from_memory(tmp_path, broken):
    """The supervisor keeps the certificate chain and key it checked (Settings.tls_files,
    not in repr); an acceptor loads them (load_tls) though the files were deleted, left
    empty or replaced since, through anonymous in-memory files it closes; with none kept,
    from the paths."""
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("mta.test")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    p = tmp_path / "c.toml"
    p.write_text(f"[smtp]\ntls_certificate = '{cert_path}'\ntls_key = '{key_path}'\n")
    s = config.load(str(p))
    assert s.tls_files == (cert_path.read_bytes(), key_path.read_bytes())
    assert b"PRIVATE KEY" not in repr(s).encode()
    if broken == "deleted":
        key_path.unlink()
        cert_path.unlink()
    elif broken == "truncated":
        key_path.write_bytes(b"")
    else:
        other = trustme.CA().issue_cert("other.test")
        other.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
        other.private_key_pem.write_to_path(str(key_path))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    gc.collect()        # (an earlier test's garbage closed now, not while this one counts)
    fds = len(os.listdir("/proc/self/fd"))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    config.load_tls(ctx, str(cert_path), str(key_path), s.tls_files)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert _handshake(ctx, client)["subjectAltName"] == (("DNS", "mta.test"),)
    # none kept (read_active's record: not read): the paths, as they are now
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if broken != "replaced":
        with pytest.raises((OSError, ssl.SSLError)):
            config.load_tls(ctx, str(cert_path), str(key_path), None)
    else:
        config.load_tls(ctx, str(cert_path), str(key_path), None)
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(ctx, client)


def test_the_checked_ca_file_is_kept_and_the_record_does_not_read_it(tmp_path):
    """delivery.tls_ca_file as the supervisor read and checked it is kept (Settings.
    tls_ca_data) for the delivery processes, which load it (load_ca) though the file is
    gone since; the record of the active configuration does not read it again: with the
    file gone it was no record at all (read_active None: the spool shards took nothing
    of it, check-config said the daemon was not running)."""
    import ssl

    import trustme

    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cfg = tmp_path / "mta.toml"
    cfg.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[delivery]\ntls_ca_file = "{ca_file}"\nhold = true\n')
    s = config.load(str(cfg))
    assert s.tls_ca_data == ca_file.read_bytes()
    os.makedirs(s.run_dir)
    config.write_active(s, str(cfg))
    ca_file.unlink()
    assert config.read_active(s.run_dir).config.delivery.hold is True
    with pytest.raises(config.ConfigError, match=f"delivery.tls_ca_file: cannot read {ca_file}"):
        config.load(str(cfg))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mta.test").configure_cert(server)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    config.load_ca(client, str(ca_file), s.tls_ca_data)
    assert _handshake(server, client)["subjectAltName"] == (("DNS", "mta.test"),)
    with pytest.raises(FileNotFoundError):
        config.load_ca(ssl.create_default_context(), str(ca_file), None)
