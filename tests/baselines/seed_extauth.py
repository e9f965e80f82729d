#!/usr/bin/env python3
"""Seed-style ejabberd extauth program: the baseline extauth-broker is compared against.

It does what a small site-written script does: for every `auth` request, one HTTP request to the
OAuth provider's RFC 7662 introspection endpoint (a new connection each time, no cache, no
coalescing), then compares the token's user claim with the login. Standard library only.

  EXTAUTH_INTROSPECTION_URL, EXTAUTH_CLIENT_ID, EXTAUTH_CLIENT_SECRET  the provider (extauth-load sets them)
  --echo   the Python floor: answer 1 to everything without asking anyone

Protocol (ejabberd src/extauth.erl): requests are a 2-byte big-endian length then
`auth:User:Server:Password`; every reply is exactly 00 02 00 0x.
"""

import base64
import json
import os
import sys
import time
import urllib.parse
import urllib.request

TIMEOUT_S = 10


def introspect(token):
    """The provider's claims for `token`, or None when it could not be asked."""
    url = os.environ["EXTAUTH_INTROSPECTION_URL"]
    basic = base64.b64encode(
        f"{os.environ['EXTAUTH_CLIENT_ID']}:{os.environ['EXTAUTH_CLIENT_SECRET']}".encode()
    ).decode()
    body = urllib.parse.urlencode({"token": token, "token_type_hint": "access_token"}).encode()
    request = urllib.request.Request(url, data=body, headers={"Authorization": "Basic " + basic})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return json.load(response)
    except (OSError, ValueError):
        return None


def auth(user, token):
    claims = introspect(token)
    if not claims or claims.get("active") is not True:
        return False
    exp = claims.get("exp")
    if isinstance(exp, (int, float)) and exp <= time.time():
        return False
    owner = claims.get("username") or claims.get("sub") or ""
    return owner.lower() == user


def answer(request, echo):
    if echo:
        return True
    fields = request.split(":", 3)
    if fields[0] == "auth" and len(fields) == 4:
        return auth(fields[1], fields[3])
    return False


def read_exact(stream, n):
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def main():
    echo = "--echo" in sys.argv[1:]
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = read_exact(stdin, 2)
        if header is None:
            return
        body = read_exact(stdin, int.from_bytes(header, "big"))
        if body is None:
            return
        ok = answer(body.decode("utf-8", "replace"), echo)
        stdout.write(b"\x00\x02\x00\x01" if ok else b"\x00\x02\x00\x00")
        stdout.flush()


if __name__ == "__main__":
    main()
