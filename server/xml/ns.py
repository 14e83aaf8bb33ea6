"""XML namespaces used by the server, named once (RFC 6120 and the XEPs)."""

STREAMS = "http://etherx.jabber.org/streams"
CLIENT = "jabber:client"          # canonical content namespace of stanzas inside the server
SERVER = "jabber:server"
COMPONENT = "jabber:component:accept"  # XEP-0114 external components
TLS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND = "urn:ietf:params:xml:ns:xmpp-bind"
SESSION = "urn:ietf:params:xml:ns:xmpp-session"
STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"
STANZA_ERRORS = "urn:ietf:params:xml:ns:xmpp-stanzas"
XML = "http://www.w3.org/XML/1998/namespace"

DISCO_INFO = "http://jabber.org/protocol/disco#info"
DISCO_ITEMS = "http://jabber.org/protocol/disco#items"
PING = "urn:xmpp:ping"
VERSION = "jabber:iq:version"
TIME = "urn:xmpp:time"
ROSTER = "jabber:iq:roster"
DELAY = "urn:xmpp:delay"
BLOCKING = "urn:xmpp:blocking"
VCARD = "vcard-temp"
VCARD_UPDATE = "vcard-temp:x:update"
PRIVATE = "jabber:iq:private"
LAST = "jabber:iq:last"
COMMANDS = "http://jabber.org/protocol/commands"
DATA_FORMS = "jabber:x:data"
PRE_APPROVAL = "urn:xmpp:features:pre-approval"
ROSTER_VER = "urn:xmpp:features:rosterver"
OFFLINE = "msgoffline"
WATCHERS = "urn:presenced:watchers:0"   # our watcher-information protocol (RFC 2778 §2.2)


def q(namespace: str, local: str) -> str:
    """Clark notation '{ns}local' as lxml uses it."""
    return f"{{{namespace}}}{local}"

# Federation (RFC 6120 server-to-server, XEP-0220 dialback, XEP-0288 bidirectional streams).
DIALBACK = "jabber:server:dialback"
DIALBACK_FEATURE = "urn:xmpp:features:dialback"
BIDI = "urn:xmpp:bidi"
BIDI_FEATURE = "urn:xmpp:features:bidi"
