"""What the fuzzers know about the server, read off its own code (nothing is listed by hand).

- `vocabulary(modules)`: the element names (Clark notation constants, `ns.q(X, "name")`,
  f"{{{X}}}name") and attribute names (`el.get("a")`, `el.set("a", ...)`) a module's source
  uses, and the attributes it reads as numbers (`int(el.get("a"))`, `parse_int(...)`, or a
  variable assigned from `.get("a")` that later goes through `int()`/`isdigit()`).
- `corpus()`: the stanzas the test suite sends (XML string literals and f-strings of
  tests/*.py that parse as iq, message or presence), a seed of well-formed, realistic
  structures the stanza fuzzer mutates.

A new module is harvested because it is loaded (its handlers are in the router's table or it
is a service host); its tests add to the corpus.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import pkgutil
import re
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from server.xml import ns as ns_module

_CLARK = re.compile(r"\{([^{}\s]+)\}([A-Za-z_][\w.-]*)\Z")
_NCNAME = re.compile(r"[A-Za-z_][\w.-]*\Z")
_NUMBER_READERS = frozenset({"int", "parse_int", "parse_optional_int", "float"})
CLIENT = "jabber:client"


@dataclass
class Vocabulary:
    elements: dict[str, set[str]] = field(default_factory=dict)  # namespace -> local names
    attributes: set[str] = field(default_factory=set)
    numeric: set[str] = field(default_factory=set)  # attributes read as numbers

    def add_element(self, namespace: str, name: str) -> None:
        if namespace and _NCNAME.match(name):
            self.elements.setdefault(namespace, set()).add(name)

    def merge(self, other: Vocabulary) -> None:
        for namespace, names in other.elements.items():
            self.elements.setdefault(namespace, set()).update(names)
        self.attributes |= other.attributes
        self.numeric |= other.numeric

    def frozen(self) -> FrozenVocabulary:
        return FrozenVocabulary(
            {k: tuple(sorted(v)) for k, v in sorted(self.elements.items())},
            tuple(sorted(self.attributes)), tuple(sorted(self.numeric)))


@dataclass(frozen=True)
class FrozenVocabulary:
    """Sorted, so that a seed gives the same cases on every run."""
    elements: dict[str, tuple[str, ...]]
    attributes: tuple[str, ...]
    numeric: tuple[str, ...]


def modules_of(obj: Any) -> list[types.ModuleType]:
    """The Python module defining obj's class (a bound method's owner), and its package's
    siblings when it is a package (muc/, pubsub/)."""
    owner = getattr(obj, "__self__", obj)
    cls = owner if isinstance(owner, type) else type(owner)
    module = inspect.getmodule(cls)
    if module is None:
        return []
    package = module if hasattr(module, "__path__") else None
    parent = module.__name__.rpartition(".")[0]
    if package is None and parent.count(".") >= 2:  # server.modules.muc.room: muc/ is a feature
        package = importlib.import_module(parent)
    found = [module]
    if package is not None:  # a feature's folder (muc/, pubsub/): all of its files
        found.append(package)
        for info in pkgutil.iter_modules(package.__path__):
            found.append(importlib.import_module(f"{package.__name__}.{info.name}"))
    return list(dict.fromkeys(found))


@functools.cache
def vocabulary_of(module: types.ModuleType) -> Vocabulary:
    voc = Vocabulary()
    for value in vars(module).values():
        if isinstance(value, str):
            m = _CLARK.match(value)
            if m:
                voc.add_element(m.group(1), m.group(2))
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError, SyntaxError):
        return voc
    env = dict(vars(module))
    readers = _number_reading_functions(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and readers:  # _limit(spec, "maxstanzas")
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            for index in readers.get(name or "", ()):
                if index < len(node.args) and _const(node.args[index]) \
                        and _NCNAME.match(node.args[index].value):  # type: ignore[attr-defined]
                    voc.numeric.add(node.args[index].value)  # type: ignore[attr-defined]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            _call(node, env, voc)
        elif isinstance(node, ast.JoinedStr):
            text = _render(node, env, unresolved=None)
            m = _CLARK.match(text) if text is not None else None
            if m:
                voc.add_element(m.group(1), m.group(2))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            _numeric_variables(node, voc)
    return voc


def vocabulary(modules: Iterable[types.ModuleType]) -> Vocabulary:
    voc = Vocabulary()
    for module in modules:
        voc.merge(vocabulary_of(module))
    return voc


def _call(node: ast.Call, env: dict[str, Any], voc: Vocabulary) -> None:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name in ("q", "iq_get", "iq_set") and len(node.args) >= 2 and _const(node.args[1]):
        try:
            namespace = eval(compile(ast.Expression(node.args[0]), "<harvest>", "eval"), env)
        except Exception:
            namespace = None
        if isinstance(namespace, str):
            voc.add_element(namespace, node.args[1].value)  # type: ignore[attr-defined]
    elif name in ("get", "set") and isinstance(func, ast.Attribute) and node.args \
            and _const(node.args[0]) and _NCNAME.match(node.args[0].value):  # type: ignore[attr-defined]
        voc.attributes.add(node.args[0].value)  # type: ignore[attr-defined]
    elif name in _NUMBER_READERS:
        for inner in ast.walk(node):
            got = _get_name(inner)
            if got:
                voc.numeric.add(got)
        for keyword in node.keywords:  # parse_int(..., name="size"): the attribute's name
            if keyword.arg == "name" and _const(keyword.value) \
                    and _NCNAME.match(keyword.value.value):  # type: ignore[attr-defined]
                voc.numeric.add(keyword.value.value)  # type: ignore[attr-defined]


def _number_reading_functions(tree: ast.AST) -> dict[str, tuple[int, ...]]:
    """Functions that read a number from the attribute one of their parameters names:
    name -> the positions of those parameters."""
    found: dict[str, tuple[int, ...]] = {}
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        params = [a.arg for a in fn.args.args]
        positions = set()
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in _NUMBER_READERS:
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute) \
                            and inner.func.attr == "get" and inner.args \
                            and isinstance(inner.args[0], ast.Name) \
                            and inner.args[0].id in params:
                        positions.add(params.index(inner.args[0].id))
        if positions:
            found[fn.name] = tuple(sorted(positions))
    return found


def _numeric_variables(fn: ast.FunctionDef | ast.AsyncFunctionDef, voc: Vocabulary) -> None:
    """x = el.get("a") ... int(x) / x.isdigit() / parse_int(x): "a" is numeric."""
    assigned: dict[str, str] = {}
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            got = next((g for g in map(_get_name, ast.walk(node.value)) if g), None)
            if got:
                assigned[node.targets[0].id] = got
    if not assigned:
        return
    for node in ast.walk(fn):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in _NUMBER_READERS:
            for arg in node.args:
                for inner in ast.walk(arg):
                    if isinstance(inner, ast.Name) and inner.id in assigned:
                        voc.numeric.add(assigned[inner.id])
        elif isinstance(func, ast.Attribute) and func.attr in ("isdigit", "isdecimal") \
                and isinstance(func.value, ast.Name) and func.value.id in assigned:
            voc.numeric.add(assigned[func.value.id])


def _get_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
            and node.func.attr == "get" and node.args and _const(node.args[0]) \
            and _NCNAME.match(node.args[0].value):  # type: ignore[attr-defined]
        return str(node.args[0].value)  # type: ignore[attr-defined]
    return None


def _const(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _render(node: ast.JoinedStr, env: dict[str, Any], unresolved: str | None) -> str | None:
    """An f-string's text, its {expressions} evaluated in env when they are constants (names,
    ns.X); others become `unresolved` (None: give up)."""
    out = []
    for part in node.values:
        if isinstance(part, ast.Constant):
            out.append(str(part.value))
            continue
        assert isinstance(part, ast.FormattedValue)
        value = _resolve(part.value, env)
        if value is None:
            if unresolved is None:
                return None
            before = "".join(out)
            # inside a quoted attribute value: a plausible value; elsewhere: nothing
            inside = before.endswith(("='", '="'))
            value = _guess(part.value) if inside else unresolved
        out.append(value)
    return "".join(out)


def _resolve(expr: ast.expr, env: dict[str, Any]) -> str | None:
    if isinstance(expr, ast.Name):
        value = env.get(expr.id)
    elif isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
        owner = ns_module if expr.value.id == "ns" else env.get(expr.value.id)
        value = getattr(owner, expr.attr, None) if isinstance(owner, types.ModuleType) else None
    else:
        return None
    return value if isinstance(value, str) else None


def _guess(expr: ast.expr) -> str:
    name = ast.unparse(expr).lower()
    if "room" in name:
        return "fuzzroom@muc.a.test"
    if "jid" in name or name in ("to", "peer", "who", "user", "contact"):
        return "bob@a.test"
    if "nick" in name:
        return "Fuzz"
    if any(k in name for k in ("size", "rid", "count", "max", "seconds", "number")) \
            or name in ("n", "i"):
        return "1"
    return "fuzz"


def corpus(tests_dir: Path | None = None) -> tuple[bytes, ...]:
    """Stanzas the test suite sends, serialised in jabber:client, deduplicated, sorted."""
    return _corpora(tests_dir)[0]


def elements(tests_dir: Path | None = None) -> tuple[bytes, ...]:
    """Other elements the test suite writes (negotiation: <auth/>, SASL2 <authenticate/>, FAST
    <fast count=.../>, stream management...), each with its own namespace."""
    return _corpora(tests_dir)[1]


@functools.cache
def _corpora(tests_dir: Path | None = None) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    tests_dir = tests_dir or Path(__file__).resolve().parent.parent
    found: set[bytes] = set()
    others: set[bytes] = set()
    for path in sorted(tests_dir.glob("test_*.py")):
        try:
            tree = ast.parse(path.read_text())
        except SyntaxError:
            continue
        env: dict[str, Any] = {}
        for node in tree.body:  # module-level string constants (PUBSUB = "http://...")
            if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                    and isinstance(node.targets[0], ast.Name) and _const(node.value):
                env[node.targets[0].id] = node.value.value  # type: ignore[attr-defined]
            elif isinstance(node, ast.ImportFrom) and node.module \
                    and node.module.startswith(("server", "federation")):
                try:
                    imported = importlib.import_module(node.module)
                except ImportError:
                    continue
                for alias in node.names:
                    value = getattr(imported, alias.name, None)
                    if isinstance(value, str | types.ModuleType):  # NAME, or a module (sasl2)
                        env[alias.asname or alias.name] = value
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 \
                    and isinstance(node.targets[0], ast.Name) \
                    and isinstance(node.value, ast.Attribute) \
                    and isinstance(node.value.value, ast.Name):  # FAST = sasl2.FAST
                owner = env.get(node.value.value.id)
                value = getattr(owner, node.value.attr, None) if owner is not None else None
                if isinstance(value, str):
                    env[node.targets[0].id] = value
        for node in ast.walk(tree):
            text: str | None = None
            if _const(node):
                text = node.value  # type: ignore[attr-defined]
            elif isinstance(node, ast.JoinedStr):
                text = _render(node, env, unresolved="")
            if text and text.lstrip().startswith(("<iq", "<message", "<presence")):
                stanza = _parse_stanza(text)
                if stanza is not None:
                    found.add(stanza)
            elif text and text.lstrip().startswith("<") and "xmlns=" in text:
                other = _parse_element(text)
                if other is not None:
                    others.add(other)
    return tuple(sorted(found)), tuple(sorted(others))


def _parse_element(text: str) -> bytes | None:
    try:
        el = etree.fromstring(text.encode(), _STANZA_PARSER)
    except (etree.XMLSyntaxError, ValueError):
        return None
    namespace = etree.QName(el).namespace
    if not namespace or namespace == CLIENT or etree.QName(el).localname == "stream":
        return None
    el.tail = None
    return _reparses(etree.tostring(el))


def _reparses(data: bytes) -> bytes | None:
    """Only what a plain parser reads back (no entity references left in it)."""
    try:
        etree.fromstring(data)
    except etree.XMLSyntaxError:
        return None
    return data


_STANZA_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


def _parse_stanza(text: str) -> bytes | None:
    wrapped = f"<w xmlns='{CLIENT}'>{text}</w>"
    try:
        root = etree.fromstring(wrapped.encode(), _STANZA_PARSER)
    except (etree.XMLSyntaxError, ValueError):
        return None
    if len(root) != 1 or etree.QName(root[0]).localname not in ("iq", "message", "presence"):
        return None
    el = root[0]
    if etree.QName(el).namespace != CLIENT:  # a component's or a server's stanza
        return None
    el.attrib.pop("from", None)
    el.tail = None
    return _reparses(etree.tostring(el))
