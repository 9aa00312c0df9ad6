"""mta.passwords: the password file and checking a password."""
import hashlib

import pytest

from mta import passwords


def test_hash_and_check_round_trip():
    users = passwords.parse_password_file(
        "# users\n\nalice:" + passwords.hash_password("s3cret", iterations=10_000) + "\n")
    assert passwords.check_password(users, "alice", b"s3cret") is True
    assert passwords.check_password(users, "alice", b"s3cret ") is False
    assert passwords.check_password(users, "bob", b"s3cret") is False


def test_unknown_user_costs_as_much_as_a_real_one(monkeypatch):
    """No timing oracle for user names: an unknown user gets the costliest user's work."""
    users = passwords.parse_password_file(
        "a:" + passwords.hash_password("x", iterations=10_000) + "\n"
        "b:" + passwords.hash_password("x", iterations=12_000) + "\n")
    seen = []
    real = hashlib.pbkdf2_hmac

    def spy(name, password, salt, iterations):
        seen.append(iterations)
        return real(name, password, salt, iterations)

    monkeypatch.setattr(passwords.hashlib, "pbkdf2_hmac", spy)
    assert passwords.check_password(users, "nobody", b"x") is False
    assert passwords.check_password(users, "a", b"x") is True
    assert seen == [12_000, 10_000]


@pytest.mark.parametrize("line", [
    "alice", "alice:md5$1$2$3", ":pbkdf2_sha256$10000$AAAA$" + "A" * 43 + "=",
    "alice:pbkdf2_sha256$9999$AAAA$" + "A" * 43 + "=",
    "alice:pbkdf2_sha256$10000$!!$" + "A" * 43 + "=",
])
def test_bad_lines_name_the_line(line):
    with pytest.raises(ValueError, match="^line 2: "):
        passwords.parse_password_file("# ok\n" + line + "\n")
