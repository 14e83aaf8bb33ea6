"""Feature modules, loaded in this order. Deleting a name (and its file) removes the feature."""

MODULES: list[str] = [
    "session",
    "disco",
    "ping",
    "version",
    "time",
    "messages",
    "roster",
    "presence",
    "offline",
    "blocking",
    "vcard",
    "private",
    "last",
    "watchers",
    "visibility",
    "adhoc",
]
