"""The documentation holds together: a short README with the set-up commands CI runs, links that resolve, and no
reference to a document outside the repository."""

from __future__ import annotations

import re
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 200
# Checked by CI and quoted by people: they must appear in the README byte for byte.
SETUP_COMMANDS = (
    "pip install -r requirements.txt && splitunet demo --workspace splitunet_demo",
    "python3 -m pytest -q",
)
# The design document that code comments cite by section ("docs/design.md, \"Boundaries\"").
DESIGN = ROOT / "docs" / "design.md"
DESIGN_SECTIONS = (
    "Parties and one iteration",
    "Model split",
    "Wire contract",
    "Boundaries",
    "Labels and layouts",
    "Threat models",
    "FLARE facts",
)
# Documents that live outside this repository; nothing may point at them.
FOREIGN_REFERENCES = (
    re.compile(r"\.\./shared\b"),
    re.compile(r"(?<![\w/.-])DESIGN\.md"),
    re.compile(r"(?<![\w/.-])STYLE\.md"),
)
TEXT_SUFFIXES = {".md", ".py", ".json", ".yml", ".yaml", ".toml", ".txt", ".cfg", ".ini", ".sh", ""}

_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_DESIGN_CITATION = re.compile(r"docs/design\.md[,\s#*]*\"([^\"\n]+)\"")


@lru_cache(maxsize=None)
def tracked_files() -> tuple[str, ...]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout: {out.stderr.strip()}")
    return tuple(line for line in out.stdout.splitlines() if line)


def text_files() -> list[str]:
    """Tracked files, plus this test's own documents before they are first committed."""
    owned = [str(f.relative_to(ROOT)) for f in markdown_files()]
    return sorted(set(tracked_files()) | set(owned))


def markdown_files() -> list[Path]:
    """The documentation this test owns: README, changelog, docs/ and the POC guide."""
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "poc" / "README.md"]
    files += sorted((ROOT / "docs").rglob("*.md"))
    return [f for f in files if f.is_file()]


def prose_lines(path: Path, keep_code: bool = False) -> list[tuple[int, str]]:
    """``(line number, text)`` outside fenced code blocks; inline code spans removed unless ``keep_code`` (headings
    such as ``# Benchmark: `splitunet bench` `` need them)."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line if keep_code else re.sub(r"`[^`]*`", "", line)))
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(path, keep_code=True):
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(result)


def links(path: Path) -> list[tuple[int, str]]:
    return [(number, m.group(1)) for number, line in prose_lines(path) for m in _LINK.finditer(line)]


# ------------------------------------------------------------------------------------------------- README


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"


@pytest.mark.parametrize("command", SETUP_COMMANDS)
def test_readme_holds_the_setup_command_verbatim(command):
    lines = README.read_text(encoding="utf-8").splitlines()
    assert command in lines, f"README.md must hold the line {command!r} exactly"


# -------------------------------------------------------------------------------------------------- links


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    broken = []
    for number, target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http(s), mailto, ...
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (doc.parent / path_part).resolve() if path_part else doc.resolve()
        where = f"{doc.relative_to(ROOT)}:{number}: {target}"
        if not resolved.exists():
            broken.append(f"{where} (no such file or folder)")
            continue
        if ROOT.resolve() not in resolved.parents and resolved != ROOT.resolve():
            broken.append(f"{where} (outside the repository)")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{where} (no heading with anchor #{anchor})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_slug_rules_match_github():
    assert github_slug("4. GPUs") == "4-gpus"
    assert github_slug("Benchmark: `splitunet bench`") == "benchmark-splitunet-bench"
    assert github_slug("Running with FLARE's own commands") == "running-with-flares-own-commands"
    assert github_slug("Known weakness: the initial encoder") == "known-weakness-the-initial-encoder"


# ------------------------------------------------------------------------------------------ design sections


def test_the_design_document_has_the_sections_code_cites():
    headings = {m.group(2) for _, line in prose_lines(DESIGN, keep_code=True) if (m := _HEADING.match(line))}
    missing = [s for s in DESIGN_SECTIONS if s not in headings]
    assert not missing, f"docs/design.md lacks the sections {missing}"
    cited = set()
    for name in text_files():
        path = ROOT / name
        if path.suffix in (".py", ".md") and path.is_file():
            cited |= set(_DESIGN_CITATION.findall(path.read_text(encoding="utf-8", errors="replace")))
    unknown = sorted(cited - headings)
    assert not unknown, f"sections of docs/design.md cited but absent: {unknown}"


# ------------------------------------------------------------------------------------ foreign references


def test_no_tracked_file_refers_to_a_document_outside_the_repository():
    offenders = []
    for name in text_files():
        path = ROOT / name
        if name == "tests/test_docs.py" or path.suffix not in TEXT_SUFFIXES or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for pattern in FOREIGN_REFERENCES:
                if pattern.search(line):
                    offenders.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not offenders, "references to documents outside the repository (use docs/design.md):\n" + "\n".join(
        offenders
    )


def test_every_cited_docs_page_exists():
    """A path such as ``docs/privacy.md`` named anywhere in the tracked text files must be in the repository."""
    missing = []
    for name in text_files():
        path = ROOT / name
        if path.suffix not in TEXT_SUFFIXES or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for cited in set(re.findall(r"(?<![\w/.-])docs/[\w./-]+\.md", text)):
            if not (ROOT / cited).is_file():
                missing.append(f"{name}: {cited}")
    assert not missing, "documents cited but absent:\n" + "\n".join(sorted(missing))
