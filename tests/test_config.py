"""Config: defaults, every key's validation, file/line/key of each problem, path resolution."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

from server.config import (
    Address,
    Config,
    ConfigError,
    ConfigErrors,
    default_config,
    load_config,
    where,
)
from server.modules import config_sections

SAMPLE = Path(__file__).resolve().parent.parent / "conf" / "presenced.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "presenced.toml"
    path.write_text(textwrap.dedent(text))
    return path


def errors_of(tmp_path: Path, text: str) -> list[ConfigError]:
    with pytest.raises(ConfigErrors) as info:
        load_config(write(tmp_path, text))
    return info.value.errors


def only_error(tmp_path: Path, text: str) -> ConfigError:
    errors = errors_of(tmp_path, text)
    assert len(errors) == 1, [str(e) for e in errors]
    return errors[0]


# -- defaults -----------------------------------------------------------------------------------


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = default_config()
    assert config.path is None
    assert config.domains == ("localhost",)
    assert config.data_dir == tmp_path / "presenced-data"
    assert config.listen.c2s == (Address("127.0.0.1", 5222),)
    assert config.listen.c2s_tls == (Address("127.0.0.1", 5223),)
    assert config.listen.s2s == ()
    assert config.tls.certificate == tmp_path / "presenced-data" / "cert.pem"
    assert config.tls.key == tmp_path / "presenced-data" / "key.pem"
    assert config.tls.ca_file is None
    assert config.tls.generated is True
    assert config.storage.backend == "sqlite"
    assert config.storage.path == tmp_path / "presenced-data" / "presenced.sqlite"
    limits = config.limits
    assert (limits.max_stanza_size, limits.max_depth, limits.negotiation_timeout,
            limits.idle_timeout, limits.max_sessions_per_user) == (262144, 32, 30.0, 300.0, 16)
    assert (config.c2s.require_starttls, config.c2s.allow_plain,
            config.c2s.scram_iterations) == (True, True, 4096)
    assert config.log.level == "info"


def test_empty_file_is_the_defaults_with_paths_beside_it(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    config = load_config(path)
    assert config.path == path
    assert config.data_dir == tmp_path / "presenced-data"
    assert dataclasses.replace(config, path=None, data_dir=default_config().data_dir,
                               tls=default_config().tls, storage=default_config().storage) \
        == default_config()


def test_config_is_frozen() -> None:
    config = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.domains = ("x",)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.limits.max_depth = 3  # type: ignore[misc]


def _options(cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """(table, key) of every setting the file format has."""
    out = []
    for f in dataclasses.fields(cls):
        if "option" in f.metadata:
            out.append((prefix, f.name))
        elif "section" in f.metadata:
            out += _options(f.metadata["section"], f.name)
    return out


def test_sample_documents_every_key_with_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    text = SAMPLE.read_text()
    tables = {"": text.split("\n[", 1)[0]}
    for chunk in text.split("\n[")[1:]:
        name, _, body = chunk.partition("]")
        tables[name] = body
    modules = [(name, key) for name, cls in config_sections().items()
               for _table, key in _options(cls)]
    for table, key in _options(Config) + modules:
        assert re.search(rf"^(# )?{key} = ", tables[table], re.M), f"[{table}] {key} undocumented"
    sample = load_config(SAMPLE)
    monkeypatch.chdir(SAMPLE.parent)  # the sample's relative paths are the defaults' from there
    defaults = default_config()
    assert dataclasses.replace(sample, path=None) == defaults


# -- values that are accepted -------------------------------------------------------------------


def test_a_full_valid_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """\
        domains = ["A.Test", "b.test."]
        data_dir = "/srv/presenced"
        [listen]
        c2s = ["[::1]:5222", "localhost:5222", "0.0.0.0:0"]
        c2s_tls = ["127.0.0.2:5223"]
        s2s = ["[::]:5269"]
        [tls]
        certificate = "certs/chain.pem"
        key = "/etc/key.pem"
        ca_file = "ca.pem"
        [storage]
        backend = "sqlite"
        path = "db/x.sqlite"
        [limits]
        max_stanza_size = 10000
        max_depth = 2
        negotiation_timeout = 5
        idle_timeout = 0.5
        max_sessions_per_user = 1
        [c2s]
        require_starttls = false
        allow_plain = false
        scram_iterations = 100000
        [log]
        level = "debug"
        """))
    assert config.domains == ("a.test", "b.test")
    assert config.data_dir == Path("/srv/presenced")
    assert config.listen.c2s == (Address("::1", 5222), Address("localhost", 5222),
                                 Address("0.0.0.0", 0))
    assert config.listen.s2s == (Address("::", 5269),)
    assert config.tls.certificate == tmp_path / "certs" / "chain.pem"
    assert config.tls.key == Path("/etc/key.pem")
    assert config.tls.ca_file == tmp_path / "ca.pem"
    assert config.tls.generated is False
    assert config.storage.path == Path("/srv/presenced/db/x.sqlite")
    assert config.limits.negotiation_timeout == 5.0
    assert isinstance(config.limits.negotiation_timeout, float)
    assert config.limits.idle_timeout == 0.5
    assert (config.limits.max_stanza_size, config.limits.max_depth,
            config.limits.max_sessions_per_user) == (10000, 2, 1)
    assert config.c2s == dataclasses.replace(config.c2s, require_starttls=False,
                                             allow_plain=False, scram_iterations=100000)
    assert config.log.level == "debug"


def test_address_str() -> None:
    assert str(Address("::1", 5222)) == "[::1]:5222"
    assert str(Address("127.0.0.1", 5223)) == "127.0.0.1:5223"
    assert str(Address("localhost", 0)) == "localhost:0"


def test_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "presenced.toml").write_text(textwrap.dedent("""\
        data_dir = "data"
        [tls]
        certificate = "../certs/c.pem"
        key = "~/k.pem"
        [storage]
        path = "sub/db.sqlite"
        """))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load_config(Path("../etc/presenced.toml"))
    assert config.path == Path("../etc/presenced.toml")  # as given, for messages
    assert config.data_dir == conf / "data"  # from the file's directory, not the cwd
    assert config.tls.certificate == tmp_path / "certs" / "c.pem"
    assert config.tls.key == tmp_path / "home" / "k.pem"
    assert config.storage.path == conf / "data" / "sub" / "db.sqlite"  # from data_dir
    assert config.data_dir.is_absolute() and config.storage.path.is_absolute()


def test_default_files_follow_data_dir(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'data_dir = "/var/lib/p"\n'))
    assert config.tls.certificate == Path("/var/lib/p/cert.pem")
    assert config.tls.key == Path("/var/lib/p/key.pem")
    assert config.storage.path == Path("/var/lib/p/presenced.sqlite")
    assert config.tls.generated is True


# -- values that are refused: key, line and what was expected ----------------------------------

INVALID = [
    # (document, dotted key, line, words of the message)
    ('domains = "a.test"', "domains", 1, "a non-empty list of domain names"),
    ("domains = []", "domains", 1, "non-empty"),
    ('domains = ["a.test", 3]', "domains", 1, "list of domain names"),
    ('domains = ["a b.test"]', "domains", 1, '"a b.test"'),
    ('domains = ["a.test", "A.TEST"]', "domains", 1, "listed twice"),
    ("data_dir = 5", "data_dir", 1, "a directory name"),
    ('data_dir = ""', "data_dir", 1, "a directory name"),
    ('[listen]\nc2s = "127.0.0.1:5222"', "listen.c2s", 2, 'a list of "host:port" strings'),
    ("[listen]\nc2s = [5222]", "listen.c2s", 2, 'a list of "host:port"'),
    ('[listen]\nc2s = ["127.0.0.1"]', "listen.c2s", 2, '"127.0.0.1": no port'),
    ('[listen]\nc2s = ["127.0.0.1:65536"]', "listen.c2s", 2, "port is not a number"),
    ('[listen]\nc2s = ["127.0.0.1:-1"]', "listen.c2s", 2, "port is not a number"),
    ('[listen]\nc2s = ["127.0.0.1:http"]', "listen.c2s", 2, "port is not a number"),
    ('[listen]\nc2s = [":5222"]', "listen.c2s", 2, "no host"),
    ('[listen]\nc2s = ["::1:5222"]', "listen.c2s", 2, "IPv6 address in brackets"),
    ('[listen]\nc2s = ["[zz::1]:5222"]', "listen.c2s", 2, "not an IPv6 address"),
    ('[listen]\nc2s = ["300.1.1.1:5222"]', "listen.c2s", 2, "not an IPv4 address"),
    ('[listen]\nc2s = ["bad_host:5222"]', "listen.c2s", 2, "not a host name"),
    ("[listen]\nc2s_tls = 5223", "listen.c2s_tls", 2, 'a list of "host:port"'),
    ('[listen]\ns2s = ["[::1]"]', "listen.s2s", 2, '"[::1]": no port'),
    ('[listen]\ns2s = ["[::1]5269"]', "listen.s2s", 2, "no port"),
    ('[listen]\nc2s = ["127.0.0.1:5222"]\nc2s_tls = ["127.0.0.1:5222"]', "listen.c2s_tls", 3,
     "also in c2s"),
    ('[tls]\ncertificate = 5\nkey = "k.pem"', "tls.certificate", 2, "a file name"),
    ('[tls]\ncertificate = "c.pem"', "tls.key", 1, "certificate and key to be set together"),
    ('[tls]\n\nkey = "k.pem"', "tls.certificate", 1, "certificate and key"),
    ('[tls]\nca_file = ""', "tls.ca_file", 2, "a file name"),
    ('[storage]\nbackend = "postgres"', "storage.backend", 2, 'one of "sqlite"'),
    ("[storage]\npath = 1", "storage.path", 2, "a file name"),
    ("[limits]\nmax_stanza_size = 9999", "limits.max_stanza_size", 2, ">= 10000"),
    ('[limits]\nmax_stanza_size = "1M"', "limits.max_stanza_size", 2, "an integer"),
    ("[limits]\nmax_stanza_size = 262144.0", "limits.max_stanza_size", 2, "an integer"),
    ("[limits]\nmax_depth = 1", "limits.max_depth", 2, ">= 2"),
    ("[limits]\nmax_depth = true", "limits.max_depth", 2, "an integer"),
    ("[limits]\nnegotiation_timeout = 0", "limits.negotiation_timeout", 2, "seconds > 0"),
    ("[limits]\nnegotiation_timeout = -1.5", "limits.negotiation_timeout", 2, "seconds > 0"),
    ("[limits]\nnegotiation_timeout = inf", "limits.negotiation_timeout", 2, "seconds > 0"),
    ('[limits]\nidle_timeout = "300"', "limits.idle_timeout", 2, "seconds > 0"),
    ("[limits]\nidle_timeout = false", "limits.idle_timeout", 2, "seconds > 0"),
    ("[limits]\nmax_sessions_per_user = 0", "limits.max_sessions_per_user", 2, ">= 1"),
    ('[c2s]\nrequire_starttls = "yes"', "c2s.require_starttls", 2, "true or false"),
    ("[c2s]\nallow_plain = 1", "c2s.allow_plain", 2, "true or false"),
    ("[c2s]\nscram_iterations = 1000", "c2s.scram_iterations", 2, "from 4096"),
    ('[log]\nlevel = "verbose"', "log.level", 2, '"debug", "info", "warning", "error"'),
    ('[log]\nlevel = "INFO"', "log.level", 2, "one of"),
    # unknown keys and tables, and tables that are not tables
    ("colour = 1", "colour", 1, "unknown key; expected one of domains, data_dir, admins, listen"),
    ("# x\n[bogus]\na = 1", "bogus", 2, "unknown table"),
    ("[limits]\nmax_depht = 3", "limits.max_depht", 2, "unknown key; expected one of "
     "max_stanza_size, max_depth"),
    ("[listen]\n[listen.extra]\nx = 1", "listen.extra", 2, "unknown table"),
    ("\n[foo.bar]\na = 1", "foo", 2, "unknown table"),
    ("\nfoo.bar = 1", "foo", 2, "unknown table"),
    # an invalid value is not compared with others (here: the default of c2s)
    ('[listen]\nc2s = ["nope"]\nc2s_tls = ["127.0.0.1:5222"]', "listen.c2s", 2, "no port"),
    ("listen = 5", "listen", 1, "a table"),
    ("[[listen]]\nc2s = []", "listen", 1, "a table"),
]


@pytest.mark.parametrize(("document", "key", "line", "words"), INVALID,
                         ids=[f"{d.splitlines()[-1]}" for d, *_ in INVALID])
def test_invalid_value(tmp_path: Path, document: str, key: str, line: int, words: str) -> None:
    error = only_error(tmp_path, document + "\n")
    assert (error.key, error.line) == (key, line), str(error)
    assert error.file == str(tmp_path / "presenced.toml")
    assert words in str(error)
    table, _, name = key.rpartition(".")
    shown = f"[{table}] {name}" if table else name
    assert str(error).startswith(f"{tmp_path / 'presenced.toml'}:{line}: {shown}: ")


def test_message_format(tmp_path: Path) -> None:
    error = only_error(tmp_path, "domains = ['a.test']\n[listen]\n\nc2s = '127.0.0.1:5222'\n")
    assert str(error) == (f'{tmp_path}/presenced.toml:4: [listen] c2s: '
                          f'expected a list of "host:port" strings')
    assert error.expected == 'a list of "host:port" strings'
    assert isinstance(error, Exception)


def test_ipv6_duplicate_ports_zero_allowed_twice(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """\
        [listen]
        c2s = ["127.0.0.1:0", "[::1]:5222"]
        c2s_tls = ["127.0.0.1:0", "127.0.0.1:5222"]
        """))
    assert len(config.listen.c2s_tls) == 2


# -- finding the line ---------------------------------------------------------------------------


def test_lines_of_dotted_keys_inline_tables_and_multiline_values(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, '''\
        # a comment with max_depth = 0 and [limits] in it
        domains = [
            "a.test",   # a comment, "quoted"
            "b.test",
        ]
        description = """
        [listen]
        c2s = 5
        """
        limits.max_depth = 0
        'log'."level" = "loud"
        listen = { c2s = ["127.0.0.1:5222"], s2s = "x" }
        c2s = { allow_plain = 'no' }
        [storage]
        path = 'x' # fine
        backend = "mysql"
        [tls.more]
        ''')
    found = [(e.key, e.line) for e in errors]
    assert found == [
        ("description", 6),
        ("limits.max_depth", 10),
        ("log.level", 11),
        ("listen.s2s", 12),
        ("c2s.allow_plain", 13),
        ("storage.backend", 16),
        ("tls.more", 17),
    ], [str(e) for e in errors]


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, """\
        domains = []
        [listen]
        c2s = ["nope"]
        [limits]
        max_depth = -1
        idle_timeout = 0
        [colours]
        """)
    assert [(e.key, e.line) for e in errors] == [  # in the order of the file
        ("domains", 1), ("listen.c2s", 3), ("limits.max_depth", 5),
        ("limits.idle_timeout", 6), ("colours", 7)]
    with pytest.raises(ConfigErrors) as info:
        load_config(tmp_path / "presenced.toml")
    assert len(str(info.value).splitlines()) == 5
    # The first problem's attributes are the aggregate's, so `except ConfigError` is useful too.
    assert isinstance(info.value, ConfigError)
    assert (info.value.key, info.value.line) == (errors[0].key, errors[0].line)


def test_toml_syntax_error_has_its_line(tmp_path: Path) -> None:
    error = only_error(tmp_path, "domains = ['a.test']\n\n[listen\nc2s = []\n")
    assert error.line == 3
    assert error.key == ""
    assert error.expected == "valid TOML"
    assert str(error).startswith(f"{tmp_path}/presenced.toml:3: ")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors) as info:
        load_config(tmp_path / "missing.toml")
    assert info.value.line == 0
    assert str(info.value) == (f"{tmp_path}/missing.toml:0: cannot read it: No such file or "
                               f"directory; expected a readable UTF-8 TOML file")
    (tmp_path / "latin1.toml").write_bytes(b'domains = ["caf\xe9"]\n')
    with pytest.raises(ConfigErrors, match="cannot read it"):
        load_config(tmp_path / "latin1.toml")


def test_where_locates_a_key_for_later_messages(tmp_path: Path) -> None:
    path = write(tmp_path, "domains = ['a.test']\n\n[tls]\n# c\ncertificate = 'c.pem'\n"
                           "key = 'k.pem'\n")
    config = load_config(path)
    assert where(config, "tls.certificate") == f"{path}:5: [tls] certificate"
    assert where(config, "tls.key") == f"{path}:6: [tls] key"
    assert where(config, "tls.ca_file") == f"{path}:3: [tls] ca_file"  # absent: its table
    assert where(config, "listen.c2s") == f"{path}:0: [listen] c2s"
    assert where(config, "domains") == f"{path}:1: domains"
    assert where(default_config(), "listen.c2s") == "<defaults>: listen.c2s"
