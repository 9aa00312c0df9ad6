"""Configuration: the schema, the shipped example, and error messages that name the key."""
import os
import tomllib

import msgspec.inspect as mi
import pytest

from mta import config
from mta.config.schema import SECTIONS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_example_file_is_generated_from_the_schema():
    with open(os.path.join(REPO, "mta.example.toml")) as fh:
        shipped = fh.read()
    assert shipped == config.example_toml(), "run: mta print-config --example > mta.example.toml"


def test_example_lists_every_key_with_its_default_and_a_doc():
    text = config.example_toml()
    parsed = tomllib.loads(text)
    for section, struct in SECTIONS:
        info = mi.type_info(struct)
        for f in info.fields:
            default = f.default if f.default is not mi.NODEFAULT else f.default_factory()
            if default is None:  # TOML has no null: shown as a comment
                assert f"# {f.name} = (not set)" in text, f"{section}.{f.name}"
                assert f.name not in parsed[section]
                continue
            assert parsed[section][f.name] == default, f"{section}.{f.name}"
            assert f.type.extra_json_schema["description"], f"{section}.{f.name} has no doc"
    # And the example, loaded as a config file, gives the built-in defaults.
    assert config.resolve(config._decode(parsed), None).config == config.load(None).config


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
])
def test_errors_name_the_key(tmp_path, text, key):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(p))
    assert key in str(exc.value)


def test_toml_syntax_error_names_the_file(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text("[smtp\n")
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(p))
    assert "broken.toml" in str(exc.value)


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
