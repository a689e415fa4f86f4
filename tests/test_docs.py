"""The repository's documents stand alone: none points at a file that is not in the repository.

The documents are the ``*.md``, ``*.py``, ``*.toml``, ``*.cfg`` and ``*.txt`` files and everything
under ``.ci/``, as git lists them (tracked, plus new files that are not ignored). Three checks:

- no document cites the planning notes that live outside the repository;
- every relative Markdown link ``[text](target)`` resolves to a file or folder;
- every repository path that a ``.md`` or ``.py`` file names (``docs/<name>.md``,
  ``docs/<name>.png``, ``benchmarks/results/<path>``, ``tests/<name>.py``,
  ``benchmarks/<name>.py``, ``mgc_kernels/<name>.py``, ``python/mgc_pretrain/<name>.py``,
  ``csrc/<path>``) exists, and a ``docs/methods.md §N`` reference names a numbered heading of
  docs/methods.md.

Each failure lists every bad reference as ``file:line``. The tests skip where git or the ``.git``
folder is missing (an sdist or an exported tree), since the set of documents is then unknown.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Built from pieces so that this file does not itself contain what it forbids.
OUTSIDE_NOTES = ("../" + "shared", "METHODS" + ".md", "DESIGN" + ".md")

DOC_SUFFIXES = (".md", ".py", ".toml", ".cfg", ".txt")

# A Markdown link or image: [text](target) or [text](target "title").
LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
URL_SCHEMES = ("http://", "https://", "mailto:")

# A path into the repository, not preceded by a path character (so /abs/tests/x.py and
# ../tests/x.py are not taken for repository-relative paths).
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:docs|tests|benchmarks|mgc_kernels|python/mgc_pretrain|csrc)/"
    r"[^\s`'\"()\[\],;:|]*)"
)
PLACEHOLDER = re.compile(r"[<*{]")
# made by a build (e.g. csrc/cuda/<op>.o), never tracked
BUILD_OUTPUTS = (".o", ".obj", ".so", ".pyd")

METHODS_DOC = "docs/methods.md"
SECTION_REF = re.compile(re.escape(METHODS_DOC) + r"[^\n§]{0,20}?§\s*(\d+(?:\.\d+)*)")
NUMBERED_HEADING = re.compile(r"^#{1,6}[ \t]+(\d+(?:\.\d+)*)(?=[.\s])", re.M)


def _listed_files() -> list[str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot list the repository's documents")
    if not (ROOT / ".git").exists():
        pytest.skip(
            f"{ROOT} has no .git (an sdist or an exported tree): the repository's "
            "documents are unknown"
        )
    done = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"git ls-files failed: {done.stderr.decode(errors='replace').strip()}")
    return sorted({p for p in done.stdout.decode().split("\0") if p})


@pytest.fixture(scope="module")
def documents() -> dict[str, str]:
    """``{path relative to the root: text}`` of every document present on disk."""
    docs = {}
    for rel in _listed_files():
        if not (rel.endswith(DOC_SUFFIXES) or rel.startswith(".ci/")):
            continue
        path = ROOT / rel
        if path.is_file():
            docs[rel] = path.read_text(encoding="utf-8", errors="replace")
    assert docs, "git lists no documents at all"
    return docs


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _exists(rel: str) -> bool:
    return (ROOT / rel).exists()


def _report(bad: list[str], what: str) -> str:
    return f"{len(bad)} {what}:\n" + "\n".join(sorted(bad))


def _prose(markdown: str) -> str:
    """The Markdown with fenced code blocks and inline code blanked (line numbers kept), so that
    code such as ``heads[i](x)`` is not read as a link."""
    lines, fence = [], None
    for line in markdown.split("\n"):
        marker = line.lstrip()[:3]
        if fence is None and marker in ("```", "~~~"):
            fence, line = marker, ""
        elif fence is not None:
            if marker == fence:
                fence = None
            line = ""
        else:
            line = re.sub(r"`+[^`]*`+", lambda m: " " * len(m.group()), line)
        lines.append(line)
    return "\n".join(lines)


def _repository_path(token: str) -> str | None:
    """The path that ``token`` names, or None when it is a placeholder, a build output or no
    file kind that is checked (e.g. a folder such as ``tests/gpu/``)."""
    if PLACEHOLDER.search(token):
        return None
    path = token.rstrip(".!?")
    if path.endswith(BUILD_OUTPUTS):
        return None
    if path.startswith(("benchmarks/results/", "csrc/")):
        path = path.rstrip("/")
        return None if path in ("benchmarks/results", "csrc") else path
    if path.startswith("docs/"):
        return path if path.endswith((".md", ".png")) else None
    return path if path.endswith(".py") else None


def _methods_sections() -> set[str]:
    path = ROOT / METHODS_DOC
    if not path.is_file():
        return set()
    return set(NUMBERED_HEADING.findall(path.read_text(encoding="utf-8")))


def test_no_document_cites_notes_outside_the_repository(documents):
    bad = [
        f"{rel}:{_line(text, m.start())}: {m.group()!r}"
        for rel, text in documents.items()
        for m in re.finditer("|".join(re.escape(s) for s in OUTSIDE_NOTES), text)
    ]
    assert not bad, _report(
        bad,
        "references to notes outside the repository "
        "(write what they say into the repository, e.g. docs/methods.md)",
    )


def test_markdown_links_resolve(documents):
    bad = []
    for rel, text in documents.items():
        if not rel.endswith(".md"):
            continue
        for m in LINK.finditer(_prose(text)):
            target = m.group(1)
            if target.startswith(URL_SCHEMES) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0].split("?", 1)[0]
            base = ROOT if path.startswith("/") else (ROOT / rel).parent
            if not (base / path.lstrip("/")).exists():
                bad.append(f"{rel}:{_line(text, m.start())}: link target {target!r}")
    assert not bad, _report(bad, "Markdown links to files that do not exist")


def test_named_repository_paths_exist(documents):
    bad = []
    sections = _methods_sections()
    for rel, text in documents.items():
        if not rel.endswith((".md", ".py")):
            continue
        for m in REPO_PATH.finditer(text):
            path = _repository_path(m.group(1))
            if path is not None and not _exists(path):
                bad.append(f"{rel}:{_line(text, m.start())}: no such file {path!r}")
        for m in SECTION_REF.finditer(text):
            if m.group(1) not in sections:
                bad.append(
                    f"{rel}:{_line(text, m.start())}: {METHODS_DOC} has no section "
                    f"§{m.group(1)} (numbered headings: {sorted(sections) or 'none'})"
                )
    assert not bad, _report(bad, "references to repository files or sections that do not exist")
