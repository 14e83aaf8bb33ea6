"""The one HTTP server inside presenced (aiohttp): XMPP over WebSocket (RFC 7395), XEP-0156
host-meta, XEP-0363 file upload (server/modules/upload.py) and OpenMetrics.

The listeners are ``[listen] http`` (plain, for a reverse proxy) and ``[listen] https`` (TLS with
the [tls] certificates, per-domain ones by SNI); the module ``server/modules/http.py`` owns them
and its settings are ``[http]``. Other modules add their paths with ``HTTP.route``.
"""
