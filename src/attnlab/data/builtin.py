"""The built-in offline corpus: real English text that every Python installation carries.

Two sources, both read without importing any standard-library module other than `pydoc_data`:

* the CPython documentation topics that `help()` shows (`pydoc_data.topics.topics`), one document per
  topic, in sorted topic order;
* the docstrings of the standard library's own source files, parsed with `ast` (never imported: some
  modules have side effects on import). One document per module: its module, class and function
  docstrings in source order, separated by blank lines. Modules are visited in sorted path order.

Cleaning (so that the text is prose, not code): test packages, IDLE, turtledemo, the codec tables of
`encodings`, `site-packages` and build folders are skipped; doctest blocks (`>>>` lines and their output)
are dropped (from the topics too); docstrings of fewer than three words are dropped; a docstring already
seen anywhere earlier in the corpus (e.g. "Return repr(self).") is kept only the first time.

The result depends only on the Python installation (version and distribution), so it is the same on every
run on a machine; `builtin_fingerprint()` identifies it in records. Extraction parses ~9 MB of source (a
few seconds), so its result is cached in the user's cache folder (`cache_folder()`), keyed by the
installation and this code, and checked against the SHA-256 stored with it before use.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import platform
import re
import sysconfig
import tokenize
from pathlib import Path

from ..runconfig import write_text_atomic

# Folders of the standard library whose files are not prose documentation of the library itself.
_SKIPPED_FOLDERS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "turtledemo",
        "encodings",  # generated codec tables: "Python Character Mapping Codec cp1252 generated from ..."
        "site-packages",
        "dist-packages",
        "__pycache__",
        "__phello__",
        "pydoc_data",  # the topics themselves, taken directly above
        "_bundled",
    }
)
_MIN_WORDS = 3
_DOCTEST_PROMPT = re.compile(r"^\s*>>>")


def stdlib_directory() -> str:
    """The folder holding the standard library's `.py` sources."""
    return sysconfig.get_paths()["stdlib"]


def _skipped(relative_folder: str) -> bool:
    parts = relative_folder.split(os.sep) if relative_folder not in ("", ".") else []
    return any(part in _SKIPPED_FOLDERS or part.startswith("config-") for part in parts)


def stdlib_source_files(root: str | None = None) -> list[str]:
    """Sorted paths (relative to `root`) of the standard-library modules whose docstrings are used."""
    root = root or stdlib_directory()
    files = []
    for folder, subfolders, names in os.walk(root):
        relative = os.path.relpath(folder, root)
        # Prune skipped folders in place so os.walk never descends into site-packages and the like.
        subfolders[:] = sorted(name for name in subfolders if not _skipped(os.path.join(relative, name)))
        files.extend(
            os.path.normpath(os.path.join(relative, name))
            for name in names
            if name.endswith(".py") and not name.startswith("test_")
        )
    return sorted(files)


def _without_doctests(docstring: str) -> str:
    """Drop interactive examples: a `>>>` line starts a block that runs to the next blank line."""
    kept, in_example = [], False
    for line in docstring.splitlines():
        if _DOCTEST_PROMPT.match(line):
            in_example = True
        elif not line.strip():
            in_example = False
        if not in_example:
            kept.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()


def module_docstrings(source: str) -> list[str]:
    """The cleaned docstrings of one module's source text (module, classes, functions), in source order."""
    tree = ast.parse(source)
    owners = [tree] + sorted(
        (node for node in ast.walk(tree) if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))),
        key=lambda node: (node.lineno, node.col_offset),
    )
    docstrings = []
    for owner in owners:
        docstring = ast.get_docstring(owner, clean=True)
        if docstring:
            docstring = _without_doctests(docstring)
            if len(docstring.split()) >= _MIN_WORDS:
                docstrings.append(docstring)
    return docstrings


def extract_builtin_documents() -> list[str]:
    """Build the corpus from scratch: documentation topics first, then one document per stdlib module.

    Deterministic for a given Python installation. Takes a few seconds (it parses ~11 MB of source);
    `builtin_documents()` is the cached version.
    """
    from pydoc_data.topics import topics  # plain data: a dict of strings, no side effects

    topic_texts = (_without_doctests(topics[name]) for name in sorted(topics))
    documents = list(dict.fromkeys(text for text in topic_texts if text))  # some topics share one text
    root = stdlib_directory()
    seen: set[str] = set()
    for relative_path in stdlib_source_files(root):
        try:
            with tokenize.open(os.path.join(root, relative_path)) as handle:  # honours PEP 263 coding lines
                docstrings = module_docstrings(handle.read())
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue  # e.g. a file written for another Python version; not prose anyway
        fresh = [docstring for docstring in docstrings if docstring not in seen]
        seen.update(fresh)
        if fresh:
            documents.append("\n\n".join(fresh))
    if len(documents) < 10:
        raise ValueError(
            f"the builtin corpus needs Python's documentation and standard-library sources, but only "
            f"{len(documents)} documents were found under {root}; use --data with a local file instead"
        )
    return documents


def cache_folder() -> Path:
    """Where attnlab keeps what it derives on this machine: $ATTNLAB_CACHE, else $XDG_CACHE_HOME/attnlab,
    else ~/.cache/attnlab (the user's own, never the shared temp folder)."""
    if configured := os.environ.get("ATTNLAB_CACHE"):
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "attnlab"


def _cache_path() -> Path:
    """A file in `cache_folder()` named by everything the extraction depends on: the Python version, the
    stdlib folder, every source file's size and modification time, and this module's own code."""
    root = stdlib_directory()
    digest = hashlib.blake2b(digest_size=12)
    digest.update(f"{platform.python_version()}\0{root}\0".encode())
    with open(__file__, "rb") as handle:
        digest.update(handle.read())
    import pydoc_data.topics

    for path in [pydoc_data.topics.__file__] + [os.path.join(root, name) for name in stdlib_source_files(root)]:
        status = os.stat(path)
        digest.update(f"{path}\0{status.st_size}\0{status.st_mtime_ns}\0".encode())
    return cache_folder() / f"builtin-corpus-{digest.hexdigest()}.json"


def _documents_hash(documents: list[str]) -> str:
    return hashlib.sha256("\0".join(documents).encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=1)
def builtin_documents() -> tuple[str, ...]:
    """The built-in corpus's documents: extracted once per installation (cached, ~2 MB, with its SHA-256)
    and once per process. A cache file that does not match its hash is ignored and rewritten."""
    path = _cache_path()
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        documents = cached["documents"]
        if isinstance(documents, list) and all(isinstance(d, str) for d in documents):
            if cached.get("sha256") == _documents_hash(documents):
                return tuple(documents)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent, unreadable or not ours: extract again
    documents = extract_builtin_documents()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # atomic: concurrent processes never see half a file
        write_text_atomic(path, json.dumps({"sha256": _documents_hash(documents), "documents": documents}))
    except OSError:
        pass  # a read-only cache folder only costs the extraction time
    return tuple(documents)


def builtin_fingerprint() -> str:
    """A short hash of the built-in corpus's text, to tell installations apart in records."""
    digest = hashlib.blake2b(digest_size=8)
    for document in builtin_documents():
        digest.update(document.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def builtin_description() -> str:
    return f"builtin (CPython {platform.python_version()} docs + stdlib docstrings, {builtin_fingerprint()})"
