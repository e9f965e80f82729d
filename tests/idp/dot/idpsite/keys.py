"""Per-instance secrets made at first use in the data directory, never committed.

Both the fixture command and the server read the same files, so the instance keeps one Django
SECRET_KEY and one OIDC signing key across its processes. Files are written to a temporary name
and renamed, so two processes starting at once both end up reading one complete file.
"""
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def _read_or_make(path: Path, make) -> str:
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(make())
        os.replace(tmp, path)
    return path.read_text()


def django_secret_key(data_dir: Path) -> str:
    """Django's SECRET_KEY (signs sessions and CSRF tokens): 50 random URL-safe characters."""
    return _read_or_make(data_dir / "django-secret.txt", lambda: secrets.token_urlsafe(50))


def _new_rsa_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def oidc_rsa_private_key(data_dir: Path) -> str:
    """The RS256 key DOT signs ID tokens with and publishes at /o/.well-known/jwks.json (PEM)."""
    return _read_or_make(data_dir / "oidc-rsa.pem", _new_rsa_pem)
