"""Loading: a TOML file read once into the frozen sections, validated in one pass.

Every problem is collected (``ConfigErrors``) so that ``presenced check`` can show them all, each
with file, line and key.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

from server.cluster.settings import storage_problem
from server.config.errors import ConfigError, ConfigErrors, where_text
from server.config.locator import Locator
from server.config.options import Context, Invalid, Option
from server.config.sections import Config


def where(config: Config, key: str) -> str:
    """``file:line: [table] key`` of a dotted key, for messages about its value."""
    if config.path is None:
        return f"<defaults>: {key}"
    try:
        locator = Locator(config.path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        locator = Locator("")
    return where_text(str(config.path), locator.line(tuple(key.split("."))), key)



def load_config(path: Path | str | None,
                sections: dict[str, type] | None = None) -> Config:
    """Read and validate a config file (None: the built-in defaults). Raises ConfigErrors.

    sections: the modules' tables (name -> settings dataclass); by default those of every
    module in server/modules."""
    if sections is None:
        from server.modules import config_sections
        sections = config_sections()
    if path is None:
        return _build(None, {}, Locator(""), "<defaults>", Path.cwd(), sections)
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigErrors([ConfigError(file, 0, "", "a readable UTF-8 TOML file",
                                        f"cannot read it: {reason}")]) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"at line (\d+)", str(exc))
        raise ConfigErrors([ConfigError(file, int(match[1]) if match else 0, "", "valid TOML",
                                        str(exc))]) from None
    return _build(path, document, Locator(text), file, path.absolute().parent, sections)


def default_config() -> Config:
    return load_config(None)


def _build(path: Path | None, document: dict[str, Any], locator: Locator, file: str,
           base_dir: Path, sections: dict[str, type]) -> Config:
    errors: list[ConfigError] = []
    ctx = Context(base_dir=base_dir, data_dir=base_dir)
    core = {f.name for f in dataclasses.fields(Config)}
    clash = core & set(sections)
    if clash:
        raise ValueError(f"module sections {sorted(clash)} clash with core settings")
    values = _load(Config, {k: v for k, v in document.items() if k not in sections}, (), ctx,
                   locator, file, errors, known=tuple(sorted(sections)))
    if (shared := storage_problem(values, document)) is not None:  # [cluster] needs PostgreSQL
        errors.append(ConfigError(file, locator.line(shared[0]), ".".join(shared[0]), *shared[1:]))
    modules: dict[str, Any] = {}
    for name, cls in sections.items():
        table = document.get(name, {})
        if not isinstance(table, dict):
            errors.append(ConfigError(file, locator.line((name,)), name, "a table"))
            table = {}
        modules[name] = cls(**_load(cls, table, (name,), ctx, locator, file, errors))
    for domain in values.get("components") or {}:
        if domain in (values.get("domains") or ()):
            errors.append(ConfigError(file, locator.line(("components", domain)), "components",
                                      "domains that are not user domains",
                                      f'"{domain}" is also in domains'))
    if errors:
        errors.sort(key=lambda e: e.line)  # stable: keys of one line stay in table order
        raise ConfigErrors(errors)
    return Config(path=path, modules=modules, **values)


def _load(cls: type, table: dict[str, Any], at: tuple[str, ...], ctx: Context,
          locator: Locator, file: str, errors: list[ConfigError],
          known: tuple[str, ...] = ()) -> dict[str, Any]:
    """The constructor arguments of ``cls`` from one TOML table; problems go to ``errors``.

    A section may define ``_finish(values, given, report)`` for checks across its keys and for
    fields derived from them; a value that failed its own check is None there.
    """

    def report(key: str, expected: str, problem: str | None = None) -> None:
        path = (*at, key)
        errors.append(ConfigError(file, locator.line(path), ".".join(path), expected, problem))

    fields = {f.name: f for f in dataclasses.fields(cls)
              if "option" in f.metadata or "section" in f.metadata}
    for key in table:
        if key not in fields:
            kind = "table" if isinstance(table[key], dict) else "key"
            report(key, "one of " + ", ".join([*fields, *known]), f"unknown {kind}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        opt: Option | None = f.metadata.get("option")
        if opt is None:
            continue
        try:
            if name in table:
                values[name] = opt.parse(table[name], ctx)
            elif opt.derive is not None:
                values[name] = opt.derive(ctx)
            else:
                values[name] = None if opt.default is None else opt.parse(opt.default, ctx)
        except Invalid as exc:
            report(name, opt.expected, str(exc) or None)
            values[name] = None  # no Config is made; _finish skips it
        if cls is Config and name == "data_dir" and values[name] is not None:
            ctx.data_dir = values[name]
    for name, f in fields.items():
        sub_cls = f.metadata.get("section")
        if sub_cls is None:
            continue
        sub = table.get(name, {})
        if not isinstance(sub, dict):
            report(name, "a table", None)
            sub = {}
        values[name] = sub_cls(**_load(sub_cls, sub, (*at, name), ctx, locator, file, errors))
    finish = getattr(cls, "_finish", None)
    if finish is not None:
        finish(values, table, report)
    return values

