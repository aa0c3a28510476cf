"""The demo corpus: the Python standard library of the running interpreter.

Why the stdlib: it is present on every machine (no downloads, works offline),
is ~11 MB of real, diverse code, and ships with a natural *shifted-domain*
evaluation set: ``pydoc_data/topics.py``, which is English prose (the
language reference rendered as text) wrapped in a Python dict literal.

Layout of the corpus:

* :func:`stdlib_files` - every eligible ``.py`` file (see its docstring for
  the exclusions), sorted by path relative to the stdlib root.
* :func:`train_files` / :func:`heldout_files` - a fixed split of those files.
  A file is held out iff ``sha256(rel_path) % HELDOUT_MODULUS == 0``, where
  ``rel_path`` is the POSIX path relative to the stdlib root (e.g.
  ``"asyncio/tasks.py"``). Hashing the *path* (not the content) keeps the split
  stable across Python patch releases and machines: a module stays on the same
  side even if its contents change. About 1/20 = 5% of files are held out.
* :func:`prose_text` / :func:`prose_topics` - the English text of
  ``pydoc_data/topics.py``; that file is in neither split.
* :func:`corpus_fingerprint` - identifies exactly which stdlib a model was
  trained on (the stdlib differs between Python versions).
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import hashlib
import pathlib
import sysconfig

__all__ = [
    "HELDOUT_MODULUS",
    "MAX_FILE_BYTES",
    "PROSE_REL_PATH",
    "corpus_fingerprint",
    "heldout_files",
    "is_heldout",
    "prose_text",
    "prose_topics",
    "read_text",
    "rel_path",
    "stdlib_files",
    "stdlib_root",
    "train_files",
]

#: A file is held out iff sha256(rel_path) % HELDOUT_MODULUS == 0 (about 5%).
HELDOUT_MODULUS = 20

#: Files larger than this are skipped: they are generated data tables rather
#: than representative code, and would dominate the tokenizer statistics.
MAX_FILE_BYTES = 1_000_000

#: The shifted-domain (English prose) evaluation file, relative to the root.
PROSE_REL_PATH = "pydoc_data/topics.py"

# Directory names anywhere in the relative path that exclude a file.
# ``test``/``tests`` cover the big ``test`` package plus e.g. ``ctypes/test``,
# ``unittest/test``, ``lib2to3/tests``; ``idle_test`` is idlelib's test suite.
# Test suites are excluded because they are huge, highly repetitive and would
# skew the corpus away from library code. Third-party packages are excluded
# because they depend on what happens to be installed on the machine.
_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)

# Build-specific files: generated at interpreter build time, so their contents
# (compiler flags, install prefixes, platform triplets) differ between machines
# running the same Python version. ``_sysconfigdata_*.py`` files (file-name
# pattern) and everything under a ``config-3.*`` directory (directory-name
# pattern, e.g. ``config-3.11-x86_64-linux-gnu/python-config.py``).
_EXCLUDED_FILE_GLOBS = ("_sysconfigdata_*.py",)
_EXCLUDED_DIR_GLOBS = ("config-3.*",)


def _is_build_specific(rel: pathlib.PurePath) -> bool:
    if any(fnmatch.fnmatchcase(rel.name, pat) for pat in _EXCLUDED_FILE_GLOBS):
        return True
    return any(fnmatch.fnmatchcase(part, pat) for part in rel.parts[:-1] for pat in _EXCLUDED_DIR_GLOBS)


@functools.lru_cache(maxsize=None)
def stdlib_root() -> pathlib.Path:
    """Root directory of the running interpreter's standard library (resolved)."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()


def rel_path(path: pathlib.Path) -> str:
    """POSIX path of ``path`` relative to :func:`stdlib_root`, e.g. ``"json/decoder.py"``."""
    root, path = stdlib_root(), pathlib.Path(path).absolute()
    try:
        # Do not resolve symlinks first: a symlinked module inside the stdlib
        # would otherwise resolve to a location outside the root.
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.resolve().relative_to(root).as_posix()


def read_text(path: pathlib.Path) -> str:
    """Read a corpus file as UTF-8; undecodable bytes become U+FFFD (never raises)."""
    return pathlib.Path(path).read_text(encoding="utf-8", errors="replace")


@functools.lru_cache(maxsize=None)
def _stdlib_files(root: pathlib.Path) -> tuple[pathlib.Path, ...]:
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        # Only directory components decide exclusion (a module named test.py
        # would be fine; only test *packages* are dropped).
        if _EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        if _is_build_specific(rel):
            continue
        if rel.as_posix() == PROSE_REL_PATH:
            continue
        if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            continue
        files.append(path)
    # Sort by the relative POSIX path so the order does not depend on the
    # filesystem's directory iteration order or on where Python is installed.
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return tuple(files)


def stdlib_files() -> list[pathlib.Path]:
    """All eligible stdlib ``.py`` files, sorted by relative path.

    Excluded: anything under ``site-packages``/``dist-packages``, any ``test``
    or ``tests`` package (this includes ``lib2to3/tests``), ``idlelib/idle_test``,
    ``__pycache__``, build-specific generated files (``_sysconfigdata_*.py``
    and anything under a ``config-3.*`` directory: they differ between
    machines), files larger than :data:`MAX_FILE_BYTES`, and
    :data:`PROSE_REL_PATH` (reserved as the prose evaluation set).

    Returns:
        Absolute paths, deterministic order (a fresh list; safe to mutate).
    """
    return list(_stdlib_files(stdlib_root()))


def is_heldout(rel: str) -> bool:
    """Whether the file at relative POSIX path ``rel`` belongs to the held-out split."""
    digest = hashlib.sha256(rel.encode("utf-8")).hexdigest()
    return int(digest, 16) % HELDOUT_MODULUS == 0


def train_files() -> list[pathlib.Path]:
    """Training split: :func:`stdlib_files` minus the held-out files (~95%), sorted."""
    return [p for p in stdlib_files() if not is_heldout(rel_path(p))]


def heldout_files() -> list[pathlib.Path]:
    """Held-out split (~5% of :func:`stdlib_files`), sorted; see :func:`is_heldout`."""
    return [p for p in stdlib_files() if is_heldout(rel_path(p))]


def prose_topics() -> dict[str, str]:
    """The ``topics`` dict of ``pydoc_data/topics.py``: topic name -> English text.

    The file assigns one dict literal, ``topics = {name: text, ...}``. It is
    parsed with :mod:`ast` and :func:`ast.literal_eval` rather than imported,
    so nothing is executed and no import-time side effects can occur.
    """
    source = read_text(stdlib_root() / PROSE_REL_PATH)
    for node in ast.parse(source).body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == "topics"
        ):
            return ast.literal_eval(node.value)
    # Would mean CPython changed the file's format.
    raise ValueError(f"no `topics = {{...}}` assignment in {PROSE_REL_PATH}")


def prose_text() -> str:
    """English prose evaluation text: all of :func:`prose_topics` as one string.

    Returns:
        The topic texts in sorted key order, joined by blank lines (``"\\n\\n"``).
    """
    topics = prose_topics()
    # Topic texts already end with a newline; strip so that exactly one blank
    # line separates consecutive topics.
    return "\n\n".join(topics[key].strip("\n") for key in sorted(topics))


def corpus_fingerprint() -> str:
    """Hex sha256 identifying the training corpus, for model cards.

    Hashes ``(relative path, size in bytes)`` of every :func:`train_files`
    entry, in order. Cheap (no file reads) and changes whenever a file is
    added, removed or resized, i.e. whenever the Python version changes.
    """
    h = hashlib.sha256()
    for path in train_files():
        # NUL/newline separators make the encoding unambiguous.
        h.update(f"{rel_path(path)}\0{path.stat().st_size}\n".encode("utf-8"))
    return h.hexdigest()
