"""`manage.py fixture --json`: migrate, then (re)create the test accounts and applications.

Prints one JSON object on stdout (the only place the generated passwords and client secrets are
shown, because DOT stores client secrets hashed):

    {"users": {"<username>": "<password>", ...},
     "clients": {"broker":  {"client_id": ..., "client_secret": ...},   # introspection caller
                 "minter":  {...},                                       # password grant
                 "machine": {"client_id": "bob", "client_secret": ...}}} # client credentials
"""
import json
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import transaction
from oauth2_provider.models import Application

# name -> (client_id, grant type). The machine client is named after user bob on purpose: its
# tokens carry no user, and a broker must not log them in as bob.
CLIENTS = {
    "broker": ("xmpp-broker", Application.GRANT_CLIENT_CREDENTIALS),
    "minter": ("test-minter", Application.GRANT_PASSWORD),
    "machine": ("bob", Application.GRANT_CLIENT_CREDENTIALS),
}


def account_names():
    """The usernames of tests/idp/accounts.json, in file order."""
    with open(settings.ACCOUNTS_FILE, encoding="utf-8") as f:
        return [a["username"] for a in json.load(f)["accounts"]]


def make_user(username):
    """A user with a fresh random password, stored exactly as given.

    Not `User.objects.create_user`: Django NFKC-normalises the username there (and in its
    sign-up form), which would turn the fullwidth and superscript look-alikes into `alice`. A
    site whose accounts predate that rule, or that creates them another way, has such names.
    """
    password = secrets.token_urlsafe(12)
    user = get_user_model()(username=username)
    user.set_password(password)
    user.save()
    return password


def make_client(name, client_id, grant_type):
    secret = secrets.token_urlsafe(24)
    Application.objects.create(
        name=name,
        client_id=client_id,
        client_secret=secret,  # hashed on save
        client_type=Application.CLIENT_CONFIDENTIAL,
        authorization_grant_type=grant_type,
        algorithm=Application.RS256_ALGORITHM,
    )
    return {"client_id": client_id, "client_secret": secret}


class Command(BaseCommand):
    help = "Migrate, then (re)create the test users and applications; print their secrets."

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="print ids and secrets as JSON")

    def handle(self, *args, **options):
        call_command("migrate", interactive=False, verbosity=0)
        names = account_names()
        with transaction.atomic():
            get_user_model().objects.filter(username__in=names).delete()
            Application.objects.filter(client_id__in=[c for c, _ in CLIENTS.values()]).delete()
            users = {name: make_user(name) for name in names}
            clients = {name: make_client(name, *spec) for name, spec in CLIENTS.items()}
        if options["json"]:
            self.stdout.write(json.dumps({"users": users, "clients": clients}))
        else:
            self.stdout.write(f"{len(users)} users, {len(clients)} applications")
