"""Configuration: a TOML file read once into typed frozen dataclasses (DESIGN.md rule 6).

Four parts: ``options`` (the option API a module's settings use: ``option``, ``int_option``,
``bool_option``, ``seconds_option``, ``choice_option``, ``path_option``, ``service_fields``,
and the parsers ``integer``, ``seconds``, ``boolean``, ``choice``, ``path_under`` that raise
``Invalid``), ``sections`` (the core's tables and ``Config``), ``loader`` (``load_config``:
every problem collected, each with file, line and key) and ``locator`` (the line of a TOML
key). Import from here: ``from server.config import int_option``.
"""

from server.config.errors import ConfigError, ConfigErrors
from server.config.loader import default_config, load_config, where
from server.config.options import (
    NETWORKS,
    Address,
    Context,
    Invalid,
    Network,
    Option,
    Report,
    addresses,
    bool_option,
    boolean,
    choice,
    choice_option,
    int_option,
    integer,
    networks,
    one_of,
    option,
    parse_address,
    path_option,
    path_under,
    seconds,
    seconds_option,
    section,
    service_fields,
)
from server.config.sections import (
    C2SConfig,
    ComponentConfig,
    Config,
    LimitsConfig,
    ListenConfig,
    LogConfig,
    S2SConfig,
    StorageConfig,
    TLSConfig,
)

# The old private names, for muc/ and pubsub/ until they import the public ones (transition).
_Invalid = Invalid
_Context = Context

__all__ = [
    "NETWORKS",
    "Address",
    "C2SConfig",
    "ComponentConfig",
    "Config",
    "ConfigError",
    "ConfigErrors",
    "Context",
    "Invalid",
    "LimitsConfig",
    "ListenConfig",
    "LogConfig",
    "Network",
    "Option",
    "Report",
    "S2SConfig",
    "StorageConfig",
    "TLSConfig",
    "addresses",
    "bool_option",
    "boolean",
    "choice",
    "choice_option",
    "default_config",
    "int_option",
    "integer",
    "load_config",
    "networks",
    "one_of",
    "option",
    "parse_address",
    "path_option",
    "path_under",
    "seconds",
    "seconds_option",
    "section",
    "service_fields",
    "where",
]
