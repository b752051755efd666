#!/usr/bin/env python3
"""A real SMTP server for the tests (aiosmtpd): accepts mail and writes each message into a
directory, durably, before it answers 250.

    python3 tests/support/smtp_sink.py --host 127.0.0.1 --port 0 --dir /tmp/mail

For every accepted message it writes, in this order:

    <dir>/<n>.json   the envelope: {"mail_from": ..., "rcpt_tos": [...], "auth": <login or null>}
    <dir>/<n>.eml    the message exactly as received (raw bytes)

(each via a temporary file, fsync and rename), so a message whose `.eml` exists is complete.
`n` is a zero-padded counter. Once listening it prints `ready <port>` on stdout (the port is the
real one when `--port 0` asked for any free port) and runs until killed (or, with
`--exit-on-stdin-eof`, until its stdin closes, so a crashed test leaves no server behind).

Test hooks:
    --auth USER:PASS          require AUTH (PLAIN/LOGIN, allowed without TLS) with these credentials
    --reject-rcpt ADDR=REPLY  answer RCPT TO:<ADDR> with REPLY, e.g. "550 5.1.1 no such user" or
                              "451 4.3.0 try again later" (repeatable)

Needs `aiosmtpd`: python3 -m pip install aiosmtpd
"""

import argparse
import asyncio
import itertools
import json
import logging
import os
import sys
import warnings

try:
    from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
except ImportError:
    sys.stderr.write(
        "smtp_sink.py: the Python package `aiosmtpd` is missing; "
        "install it with `python3 -m pip install aiosmtpd`\n"
    )
    sys.exit(3)


def write_durably(path, data):
    temp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(temp, path)


class Sink:
    def __init__(self, directory, rejections):
        self.directory = directory
        self.rejections = rejections
        self.counter = itertools.count(1)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.rejections.get(address.lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        base = os.path.join(self.directory, "%06d" % next(self.counter))
        login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
        meta = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "auth": login.decode("utf-8", "replace") if login is not None else None,
        }
        write_durably(base + ".json", json.dumps(meta).encode("utf-8"))
        write_durably(base + ".eml", envelope.original_content or envelope.content)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return "250 OK message accepted"


def authenticator_for(credentials):
    user, _, password = credentials.partition(":")

    def authenticate(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == user.encode()
            and auth_data.password == password.encode()
        )
        # handled=False: aiosmtpd answers 235 / 535 itself.
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    return authenticate


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--auth", default=None, metavar="USER:PASS")
    parser.add_argument("--reject-rcpt", action="append", default=[], metavar="ADDR=REPLY")
    parser.add_argument("--exit-on-stdin-eof", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="log the SMTP conversation to stderr")
    args = parser.parse_args()

    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    os.makedirs(args.dir, exist_ok=True)
    rejections = {}
    for rule in args.reject_rcpt:
        address, _, reply = rule.partition("=")
        rejections[address.lower()] = reply
    handler = Sink(args.dir, rejections)
    options = {"hostname": "smtp-sink.test", "ident": "orderflow test SMTP sink"}
    if args.auth is not None:
        # Cleartext AUTH is deliberate here: the sink only listens on loopback for tests.
        warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
        options.update(
            auth_required=True,
            auth_require_tls=False,
            authenticator=authenticator_for(args.auth),
        )

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, **options), args.host, args.port)
    port = server.sockets[0].getsockname()[1]
    print("ready %d" % port, flush=True)

    stop = asyncio.Event()
    if args.exit_on_stdin_eof:

        def on_stdin():
            if not os.read(sys.stdin.fileno(), 4096):
                stop.set()

        loop.add_reader(sys.stdin.fileno(), on_stdin)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
