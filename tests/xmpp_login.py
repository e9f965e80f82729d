#!/usr/bin/env python3
"""One real XMPP client login (slixmpp), used by the end-to-end tests.

    xmpp_login.py --host 127.0.0.1 --port 5222 --jid user@localhost --password-file FILE
    xmpp_login.py ... --hold 30     # keep the session open up to 30 s

Connects over plain TCP (no direct TLS, no STARTTLS), authenticates with SASL
PLAIN only, and reports the result through its exit code:

    0  the session started (SASL <success/>, resource bound)
    1  authentication failed (the server answered SASL <failure/>)
    2  anything else: connection refused, PLAIN not offered, stream error,
       disconnect before a result, or no result within --timeout seconds
    3  (--hold only) the session started, then the server ended it (a stream
       error such as a kick, or the connection closed) before --hold seconds

With --hold, the line `session started` is printed on stdout (flushed) once the
session is up, and the session is kept open (answering pings) for that many
seconds; exit 0 then means it was still open at the end.

The password is read from a file (never from argv, which `ps` shows to every
user). The file holds the password verbatim; one trailing newline is removed.
Run it with a python that has slixmpp (1.17 verified), e.g. a venv made with
`/usr/bin/python3 -m venv /opt/extauth-venv && /opt/extauth-venv/bin/pip install slixmpp`.
"""

import argparse
import asyncio
import logging
import sys

OK, AUTH_FAILED, ERROR, ENDED = 0, 1, 2, 3


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--jid", required=True, help="user@domain")
    p.add_argument("--password-file", required=True)
    p.add_argument("--timeout", type=float, default=15.0, help="seconds (default 15)")
    p.add_argument("--hold", type=float, default=0.0,
                   help="after the session starts, keep it open this many seconds (exit 3 if the server ends it)")
    p.add_argument("--debug", action="store_true", help="slixmpp debug log on stderr")
    return p.parse_args()


def read_password(path):
    with open(path, "r", encoding="utf-8", newline="") as f:
        pw = f.read()
    if pw.endswith("\r\n"):
        pw = pw[:-2]
    elif pw.endswith("\n"):
        pw = pw[:-1]
    return pw


async def login(args, password):
    import slixmpp  # imported here so that a missing module is reported as exit 2

    loop = asyncio.get_running_loop()
    result = loop.create_future()
    ended = loop.create_future()

    def finish(code, why):
        if not result.done():
            result.set_result((code, why))
        elif not ended.done() and code == ERROR:
            # After the session started: the server ended it.
            ended.set_result(why)

    client = slixmpp.ClientXMPP(args.jid, password)
    # Gotcha 9 of the lab notes: with an explicit host/port slixmpp tries direct
    # TLS first; we want a plain connection and SASL PLAIN over it.
    client.enable_direct_tls = False
    client.enable_starttls = False
    client.enable_plaintext = True
    mech = client.plugin["feature_mechanisms"]
    mech.unencrypted_plain = True
    mech.use_mech = "PLAIN"

    client.add_event_handler("session_start", lambda _e: finish(OK, "session started"))
    client.add_event_handler(
        "failed_auth",
        lambda stanza: finish(AUTH_FAILED, "SASL failure: %s" % stanza["condition"]),
    )
    client.add_event_handler("no_auth", lambda _e: finish(ERROR, "no usable SASL mechanism (PLAIN not offered?)"))
    client.add_event_handler("failed_all_auth", lambda _e: finish(ERROR, "all SASL mechanisms failed"))
    client.add_event_handler("connection_failed", lambda e: finish(ERROR, "connection failed: %s" % e))
    client.add_event_handler("stream_error", lambda e: finish(ERROR, "stream error: %s" % e))
    client.add_event_handler("disconnected", lambda e: finish(ERROR, "disconnected: %s" % e))

    client.connect(args.host, args.port)
    try:
        code, why = await asyncio.wait_for(result, timeout=args.timeout)
    except asyncio.TimeoutError:
        code, why = ERROR, "no result within %.1f s" % args.timeout
    if code == OK and args.hold > 0:
        code, why = await hold(args.hold, ended)
    # Stop reconnect attempts and close the stream; bounded so that a server
    # that never answers </stream:stream> cannot keep us alive.
    client.cancel_connection_attempt()
    try:
        await asyncio.wait_for(client.disconnect(wait=1.0), timeout=2.0)
    except Exception:  # noqa: BLE001 - closing is best effort
        pass
    return code, why


async def hold(seconds, ended):
    """Keeps the open session until `ended` (the server closed it) or `seconds` pass."""
    print("session started", flush=True)
    try:
        why = await asyncio.wait_for(ended, timeout=seconds)
        return ENDED, "session ended by the server: %s" % why
    except asyncio.TimeoutError:
        return OK, "session still open after %.1f s" % seconds


def main():
    args = parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.CRITICAL,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        password = read_password(args.password_file)
    except OSError as e:
        print("xmpp_login: cannot read password file: %s" % e, file=sys.stderr)
        return ERROR
    try:
        code, why = asyncio.run(login(args, password))
    except Exception as e:  # noqa: BLE001 - every unexpected error is exit 2
        code, why = ERROR, "%s: %s" % (type(e).__name__, e)
    print("xmpp_login: %s: %s" % (args.jid, why), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
