"""The text the shipped model learns from: the documentation every Python installation carries.

Three sources, all part of CPython and under the PSF license: `pydoc_data.topics` (the language
reference topics `help()` shows, e.g. "for", "with", "FORMATTING"), the docstrings of the
standard library's Python modules, classes and functions, read from the source files with `ast`
(nothing is imported, so no module runs), and the docstrings of the built-in types and of the
modules written in C (`str.split`, `math.gcd`), read from the imported objects (importing a C
extension module runs no Python code of the library). Each document is one topic or one
docstring with a heading line naming it. A fixed 1 in `HELD_OUT` of the documents, chosen by a
hash of the name, is held out of training for measuring perplexity.

The corpus depends on the Python version that provides it; the model card records the version
and the count of documents and characters the shipped model was trained on.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

HELD_OUT = 20  # one document in 20 is held out
MIN_CHARS = 40  # shorter docstrings ("Return self.") teach nothing
SKIPPED = {"site-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo"}


@dataclass(frozen=True)
class Document:
    name: str  # "topic for", "json.dumps"
    text: str

    @property
    def held_out(self) -> bool:
        digest = hashlib.sha256(self.name.encode()).digest()
        return int.from_bytes(digest[:4], "little") % HELD_OUT == 0


def topic_documents() -> list[Document]:
    """The language reference topics that `help("for")` and friends print."""
    from pydoc_data.topics import topics

    return [Document(f"topic {n}", f"{n}\n\n{text.strip()}") for n, text in sorted(topics.items())]


def docstrings(tree: ast.Module, module: str):
    """(qualified name, docstring) of a module and every class and function in it."""

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}.{child.name}"
                yield name, ast.get_docstring(child)
                yield from visit(child, name)

    yield module, ast.get_docstring(tree)
    yield from visit(tree, module)


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def docstring_documents(root: Path | None = None) -> list[Document]:
    """Docstrings of the standard library's Python sources under `root` (default: this
    interpreter's), skipping tests, IDLE, Tk and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIPPED & set(rel.parts[:-1]) or not rel.parts[-1].isascii():
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # a few sources are deliberately broken
            continue
        for name, doc in docstrings(tree, module_name(rel)):
            if doc and len(doc) >= MIN_CHARS:
                out.append(Document(name, f"{name}\n\n{doc.strip()}"))
    return out


def extension_modules() -> list[str]:
    """Public modules written in C: compiled into the interpreter or in lib-dynload."""
    names = set(sys.builtin_module_names)
    dynload = Path(sysconfig.get_paths()["stdlib"]) / "lib-dynload"
    names |= {p.name.split(".")[0] for p in dynload.glob("*.so")} if dynload.is_dir() else set()
    skip = ("_", "xx", "readline")  # readline may write to the terminal when imported
    return sorted(n for n in names if not n.startswith(skip) and "test" not in n)


def object_docs(name: str, obj, depth: int = 0):
    """(name, docstring) of obj and, for modules and classes, of their public members that are
    defined in C (functions, methods, classes), one level down from a class."""
    yield name, inspect.getdoc(obj) if depth else obj.__doc__
    if depth > 1 or not (inspect.ismodule(obj) or inspect.isclass(obj)):
        return
    for member in sorted(vars(obj)):
        value = vars(obj)[member]
        if member.startswith("_") or not (
            inspect.isbuiltin(value) or inspect.isclass(value) or inspect.ismethoddescriptor(value)
        ):
            continue
        if inspect.isclass(value) and value.__module__ not in (obj.__name__, "builtins"):
            continue  # re-exported from elsewhere
        yield from object_docs(f"{name}.{member}", value, depth + 1)


def builtin_documents() -> list[Document]:
    """Docstrings of the built-in types and functions and of the C extension modules."""
    seen, out = set(), []
    for module in ["builtins", *(m for m in extension_modules() if m != "builtins")]:
        try:
            with warnings.catch_warnings():  # audioop, nis, ...: deprecated, still documented
                warnings.simplefilter("ignore", DeprecationWarning)
                obj = importlib.import_module(module)
        except ImportError:  # built without its library
            continue
        for name, doc in object_docs(module, obj):
            name = name.removeprefix("builtins.")
            if doc and len(doc) >= MIN_CHARS and doc not in seen:
                seen.add(doc)  # inherited docstrings (dict.get on every mapping type) once
                out.append(Document(name, f"{name}\n\n{doc.strip()}"))
    return out


def documents() -> list[Document]:
    """Every document, topics first, in a fixed order."""
    return topic_documents() + docstring_documents() + builtin_documents()


def split(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """(training documents, held-out documents)."""
    return [d for d in docs if not d.held_out], [d for d in docs if d.held_out]


def describe(docs: list[Document]) -> dict:
    train, held = split(docs)
    return {
        "python": sys.version.split()[0],
        "documents": len(docs),
        "training_documents": len(train),
        "held_out_documents": len(held),
        "training_characters": sum(len(d.text) for d in train),
        "held_out_characters": sum(len(d.text) for d in held),
    }
