"""Fuzzers that look for the next hostile input the server mishandles (issue 20, item 6).

    python -m tests.fuzz --minutes 10 [--seed S] [--only parser,negotiation,stanzas,...]

Families: parser and negotiation (pure, in-process: the stream parser and the c2s negotiation
machine), stanzas (an authenticated client over a real socket, targets read off the router's
iq table and service hosts), tcp, bosh and websocket (the transports over real sockets).
tests/test_fuzz.py runs them for about a minute in CI, with a fixed seed and a fresh one.
Every finding comes with its reproducer (minimised where cheap); the same seed replays the
same cases (how far a run gets depends on the machine's speed).
"""
