"""Offline English text for calibration, haystack filler and held-out perplexity.

Sources, all read from the local disk (nothing is downloaded):

- ``stdlib``: docstrings of the Python standard library (always available,
  :func:`stdlib_text`): ``inspect.getdoc`` of each module and of its public classes, functions
  and methods, in a fixed order, so the same interpreter gives the same text.
- ``debian-docs``: Debian's documentation packages, when installed
  (``apt-get install python3.11-doc debian-reference-en``): the reST sources of the Python
  manual's library reference, language reference, C API and HOWTOs
  (``/usr/share/doc/python3.X/html/_sources``) and the Debian Reference's HTML
  (``/usr/share/debian-reference``), markup stripped. About 9 MB, 2M SmolLM2 tokens.

Disjoint parts serve different uses, so that no evaluation text was seen by the calibration:
calibration takes the parts above; haystack prose (:func:`prose_text`) takes the Python
tutorial and FAQ (stdlib docstrings when the manual is not installed); held-out perplexity
text (:func:`heldout_text`) takes the manual's "What's New" pages (the licence texts in
``/usr/share/common-licenses`` otherwise).
"""

from __future__ import annotations

import glob
import html.parser
import importlib
import inspect
import os
import re
import sys
import warnings

SOURCES = ("stdlib", "debian-docs")

#: Standard-library modules whose docstrings make the default calibration text: well documented,
#: and importing them has no side effects (no GUI, no browser, no printing).
STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "bz2", "calendar",
    "cmath", "codecs", "collections", "concurrent.futures", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email",
    "email.message", "enum", "filecmp", "fnmatch", "fractions", "ftplib", "functools", "gc",
    "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html",
    "html.parser", "http", "http.client", "http.cookies", "http.server", "imaplib",
    "importlib", "inspect", "io", "ipaddress", "itertools", "json", "keyword", "locale",
    "logging", "logging.handlers", "lzma", "mailbox", "math", "mimetypes", "mmap",
    "multiprocessing", "numbers", "operator", "optparse", "os", "os.path", "pathlib", "pickle",
    "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue", "random", "re", "runpy",
    "sched", "secrets", "selectors", "shlex", "shutil", "signal", "smtplib", "socket",
    "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "sysconfig", "tarfile",
    "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "trace", "traceback",
    "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings",
    "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zlib",
)


def _docstrings(module) -> list[str]:
    docs = [inspect.getdoc(module) or ""]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            docs.append(inspect.getdoc(obj) or "")
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and inspect.isfunction(member):
                    docs.append(inspect.getdoc(member) or "")
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            docs.append(inspect.getdoc(obj) or "")
    return [d for d in docs if len(d) > 40]


def stdlib_text() -> str:
    """The default calibration text: standard-library docstrings, deduplicated, in module
    order (about 0.6 MB with Python 3.11); modules that fail to import are skipped."""
    seen, parts = set(), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in STDLIB_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            for doc in _docstrings(module):
                if doc not in seen:
                    seen.add(doc)
                    parts.append(doc)
    return "\n\n".join(parts)


def stdlib_description() -> str:
    v = sys.version_info
    return f"docstrings of the Python {v.major}.{v.minor}.{v.micro} standard library"


_CALIBRATION_SECTIONS = ("library", "reference", "c-api", "howto")
_PROSE_SECTIONS = ("tutorial", "faq")
_HELDOUT_SECTIONS = ("whatsnew",)


def python_docs_dir() -> str | None:
    """The installed Python manual's reST sources (python3.X-doc), newest first, or None."""
    found = sorted(glob.glob("/usr/share/doc/python3*/html/_sources"), reverse=True)
    return found[0] if found else None


_ROLE = re.compile(r":[a-zA-Z:]+:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`")
_LITERAL = re.compile(r"``([^`]*)``")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")
_UNDERLINE = re.compile(r"^([=\-~^*#+\"'`.:_])\1{2,}\s*$")


def clean_rst(text: str) -> str:
    """reST -> plain paragraphs: directives, comments, code blocks (indented or interactive)
    and heading underlines dropped, roles and literals reduced to their text."""
    paragraphs, current, skip_indented = [], [], False
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        indented = line[:1].isspace()
        if indented and skip_indented:
            continue
        skip_indented = False
        if stripped.startswith((".. ", ">>>")) or _UNDERLINE.match(stripped):
            skip_indented = stripped.startswith(".. ")
            continue
        if indented and not current:  # a block quote or code block of its own
            continue
        if stripped.endswith("::"):
            skip_indented = True
            stripped = stripped[:-1] if not stripped.endswith(" ::") else stripped[:-3]
        current.append(stripped)
    if current:
        paragraphs.append(" ".join(current))
    out = []
    for p in paragraphs:
        p = _LINK.sub(r"\1", _LITERAL.sub(r"\1", _ROLE.sub(r"\1", p)))
        p = p.replace("*", "").replace("|", "")
        if len(p) > 60 and sum(c.isalpha() for c in p) > 0.6 * len(p):
            out.append(p)
    return "\n\n".join(out)


def python_docs_text(sections) -> str:
    """Cleaned text of the manual's ``sections`` (sub-folders of _sources), in sorted file
    order; "" when the manual is not installed."""
    root = python_docs_dir()
    if root is None:
        return ""
    parts = []
    for section in sections:
        for path in sorted(glob.glob(os.path.join(root, section, "**", "*.txt"), recursive=True)):
            with open(path, encoding="utf-8", errors="replace") as f:
                cleaned = clean_rst(f.read())
            if cleaned:
                parts.append(cleaned)
    return "\n\n".join(parts)


class _HtmlText(html.parser.HTMLParser):
    _BLOCKS = frozenset({"p", "div", "li", "dd", "dt", "h1", "h2", "h3", "h4", "td", "tr", "br",
                         "title"})

    def __init__(self):
        super().__init__()
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in ("pre", "script", "style", "code", "screen"):
            self.skip += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in ("pre", "script", "style", "code", "screen") and self.skip:
            self.skip -= 1

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_text(markup: str) -> str:
    """Paragraph text of an HTML page, preformatted blocks dropped."""
    parser = _HtmlText()
    parser.feed(markup)
    paragraphs = (" ".join(p.split()) for p in "".join(parser.parts).split("\n\n"))
    return "\n\n".join(p for p in paragraphs if len(p) > 60)


def debian_reference_text() -> str:
    """The Debian Reference (debian-reference-en), as text; "" when not installed."""
    parts = []
    for path in sorted(glob.glob("/usr/share/debian-reference/*.en.html")):
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(html_text(f.read()))
    return "\n\n".join(p for p in parts if p)


def calibration_text(source: str) -> tuple[str, str]:
    """``(text, description)`` of a calibration source: "stdlib", "debian-docs" or the path
    of a UTF-8 text file. A missing source raises FileNotFoundError naming its package."""
    if source == "stdlib":
        return stdlib_text(), stdlib_description()
    if source == "debian-docs":
        # interleave the two packages by paragraph blocks so a prefix of any length mixes both
        python = python_docs_text(_CALIBRATION_SECTIONS)
        debian = debian_reference_text()
        if not python and not debian:
            raise FileNotFoundError(
                "calibration source 'debian-docs': neither python3.11-doc nor "
                "debian-reference-en is installed (apt-get install python3.11-doc "
                "debian-reference-en)")
        text = _interleave(python.split("\n\n"), debian.split("\n\n"))
        what = " and ".join(n for n, t in ((("Python manual (library, reference, C API, "
                                            "HOWTOs) from python3-doc"), python),
                                           ("Debian Reference (debian-reference-en)", debian))
                            if t)
        return text, what
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            return f.read(), f"text file {os.path.basename(source)}"
    raise FileNotFoundError(
        f"calibration source {source!r}: expected one of {SOURCES} or a text file")


def _interleave(a: list[str], b: list[str], block: int = 40) -> str:
    out, i, j = [], 0, 0
    ratio = max(1, round(len(a) / max(1, len(b))))
    while i < len(a) or j < len(b):
        out += a[i:i + block * ratio]
        out += b[j:j + block]
        i, j = i + block * ratio, j + block
    return "\n\n".join(p for p in out if p)


def prose_text() -> tuple[str, str]:
    """``(text, description)``: natural prose for haystacks, disjoint from calibration."""
    text = python_docs_text(_PROSE_SECTIONS)
    if text:
        return text, "Python manual tutorial and FAQ (python3-doc)"
    paragraphs = stdlib_text().split("\n\n")
    # the second half: the stdlib calibration reads the first tokens of the same text
    return "\n\n".join(paragraphs[len(paragraphs) // 2:]), \
        "second half of the stdlib docstrings (python3-doc not installed)"


def heldout_text() -> tuple[str, str]:
    """``(text, description)``: long held-out text for perplexity, disjoint from the rest."""
    text = python_docs_text(_HELDOUT_SECTIONS)
    if text:
        return text, "Python manual What's New pages (python3-doc)"
    parts = []
    for name in ("GPL-3", "GPL-2", "LGPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "Artistic"):
        path = os.path.join("/usr/share/common-licenses", name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                parts.append(" ".join(f.read().split()))
    if not parts:
        raise FileNotFoundError("held-out text: neither python3-doc nor "
                                "/usr/share/common-licenses is available")
    return "\n\n".join(parts), "licence texts from /usr/share/common-licenses"
