"""ZMQ event-plane relay (XSUB <- publishers, XPUB -> subscribers), bound to loopback only.

Dynamo's direct ZMQ event plane makes every publisher bind all interfaces (a wildcard address, random port); in broker mode
(DYN_ZMQ_BROKER_URL="xsub=...,xpub=...") publishers and subscribers connect here instead.
Usage: python -m dynamo_dwdp.launch.zmq_broker XSUB_URL XPUB_URL
"""
from __future__ import annotations

import signal
import sys


def main(argv: list[str] | None = None) -> None:
    import zmq

    argv = sys.argv[1:] if argv is None else argv
    xsub_url, xpub_url = argv[0], argv[1]
    for url in (xsub_url, xpub_url):
        if not url.startswith(("tcp://127.", "ipc://")):
            raise SystemExit(f"zmq_broker: refusing to bind {url!r} (loopback or ipc only)")
    ctx = zmq.Context.instance()
    xsub = ctx.socket(zmq.XSUB)
    xsub.bind(xsub_url)
    xpub = ctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
    xpub.bind(xpub_url)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        zmq.proxy(xsub, xpub)
    except (KeyboardInterrupt, SystemExit, zmq.ContextTerminated):
        pass
    finally:
        xsub.close(0)
        xpub.close(0)


if __name__ == "__main__":
    main()
