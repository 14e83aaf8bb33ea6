"""Feature modules, loaded in this order. Deleting a name (and its file) removes the feature.

Each file defines one `server.module.Module` subclass (see README, "Adding a module").
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.module import Module
    from server.storage import StoreSpec

MODULES: list[str] = [
    "session",
    "stream_management",
    "fast",
    "disco",
    "ping",
    "version",
    "time",
    "messages",
    "carbons",
    "csi",
    "push",
    "roster",
    "presence",
    "offline",
    "mam",
    "blocking",
    "vcard",
    "caps",
    "pubsub.pep",
    "pubsub.service",
    "private",
    "last",
    "watchers",
    "visibility",
    "adhoc",
    "register",
    "admin_adhoc",
    "echo",
    "muc",
    "http",
    "upload",
    "invites",
    "external_services",
    "proxy65",
    "contact_info",
    "webadmin",
]


def module_class(loaded: ModuleType) -> type[Module]:
    """The one Module subclass a module file defines."""
    from server.module import Module
    found = [v for v in vars(loaded).values()
             if isinstance(v, type) and issubclass(v, Module) and v is not Module
             and v.__module__ == loaded.__name__]
    if len(found) != 1:
        raise ImportError(f"{loaded.__name__} must define exactly one Module subclass")
    return found[0]


def module_classes() -> list[type[Module]]:
    return [module_class(importlib.import_module(f"server.modules.{name}")) for name in MODULES]


def config_sections() -> dict[str, type[Any]]:
    """[table] -> settings dataclass of every module that has settings."""
    return {cls.name: cls.settings for cls in module_classes() if cls.settings is not None}


def store_specs() -> list[StoreSpec]:
    """The stores the modules declare, in module order, each once."""
    specs: list[StoreSpec] = []
    for cls in module_classes():
        for spec in cls.stores:
            if spec not in specs:
                specs.append(spec)
    return specs
