"""Settings of the test identity provider: a minimal Django site running django-oauth-toolkit.

Everything that varies between test runs comes from the environment:

- IDP_DATA_DIR (required): a private directory for the SQLite database and the per-instance
  secrets (Django SECRET_KEY, OIDC RSA key), normally the test's temporary directory.
- IDP_ACCESS_TOKEN_SECONDS: access token lifetime in seconds (default 3600); a few seconds for
  expiry tests.
- IDP_USE_TZ ("1" or "0", default "1") and IDP_TIME_ZONE (default "UTC"): USE_TZ=0 with a
  non-UTC zone reproduces an old site whose introspected `exp` is hours off.
- IDP_FAST_HASHING ("1"): hash passwords and client secrets with MD5 instead of Django's
  PBKDF2 (1,000,000 rounds, about 0.4 s per check on the test machines). Only for speed: the
  OAuth behaviour is the same, but each introspection then no longer costs a PBKDF2 check of the
  client secret.
"""
import os
from pathlib import Path

from . import keys

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ["IDP_DATA_DIR"])
# The account list shared with the oidc-provider instance and the Rust helpers.
ACCOUNTS_FILE = BASE_DIR.parent / "accounts.json"

SECRET_KEY = keys.django_secret_key(DATA_DIR)
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "oauth2_provider",
    "xmppsite",
]
MIDDLEWARE = [
    "django.middleware.common.CommonMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
ROOT_URLCONF = "idpsite.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.contrib.auth.context_processors.auth"]},
    }
]
DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": DATA_DIR / "idp.sqlite3"}
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

USE_TZ = os.environ.get("IDP_USE_TZ", "1") == "1"
TIME_ZONE = os.environ.get("IDP_TIME_ZONE", "UTC")

if os.environ.get("IDP_FAST_HASHING") == "1":
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

OAUTH2_PROVIDER = {
    "ACCESS_TOKEN_EXPIRE_SECONDS": int(os.environ.get("IDP_ACCESS_TOKEN_SECONDS", "3600")),
    "OIDC_ENABLED": True,
    "OIDC_RSA_PRIVATE_KEY": keys.oidc_rsa_private_key(DATA_DIR),
    "OAUTH2_VALIDATOR_CLASS": "xmppsite.validators.XmppSiteValidator",
    "SCOPES": {
        "openid": "OpenID Connect",
        "profile": "Your username",
        "read": "Reading scope",
        "write": "Writing scope",
        "introspection": "Introspect tokens",
    },
    "DEFAULT_SCOPES": ["read"],
}

# Request lines on stderr (runserver), nothing else: tokens only travel in bodies and headers.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
