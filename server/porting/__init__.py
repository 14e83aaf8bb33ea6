"""Moving accounts between servers: XEP-0227 (Portable Import/Export Format for XMPP-IM
Servers) files, with the extensions Prosody's and ejabberd's exports use.

- pie.py: the format, pure. read() turns a file (or an ejabberd index with XInclude'd host
  files) into Account values one by one, streaming; write() does the reverse.
- load.py: Account values into the stores (idempotent: what is there already is left alone,
  counted as unchanged) and the stores back into Account values for an export.

`presenced import PATH… --config CFG` and `presenced export FILE` (server/cli.py) drive them.
"""
