"""Fixtures of the integration scenarios (the daemon fixtures are in tests/conftest.py)."""
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from mxlab import Lab


@pytest.fixture
def lab(make_daemon, dns_server, tmp_path):
    """A delivery lab (tests/integration/mxlab.py): DNS, receivers and the daemon."""
    lab = Lab(make_daemon, dns_server, tmp_path)
    yield lab
    lab.close()


@pytest.fixture
def dkim_keys(tmp_path):
    """A new RSA-2048 and Ed25519 signing key: .rsa and .ed (the private keys) and
    .files = {"rsa": path, "ed": path} of their unencrypted PKCS#8 PEM files."""
    keys = {"rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ed": ed25519.Ed25519PrivateKey.generate()}
    files = {}
    for name, key in keys.items():
        path = tmp_path / f"{name}.pem"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        files[name] = str(path)
    return SimpleNamespace(**keys, files=files)
