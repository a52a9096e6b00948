"""The documentation stays true to the code: the README is a landing page, every link in it and in
docs/ resolves, the architecture table lists exactly the modules that exist, and every
``samtune COMMAND --flag`` shown exists in the command line's parser."""

from __future__ import annotations

import argparse
import re
import unicodedata
from pathlib import Path

from samtune.finetune.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
ARCHITECTURE = DOCS / "explanation" / "architecture.md"
PACKAGES = ("finetune", "datasets", "adapters")
README_MAX_LINES = 200

FENCE = re.compile(r"^ *(```|~~~).*?^ *\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
# `samtune [global options] COMMAND`: not `samtune.x`, not `import samtune` at the end of a line
COMMAND = re.compile(r"(?<![\w.-])samtune((?:[ \t]+-{1,2}[a-z][\w-]*)*)[ \t]+([a-z][\w-]*)")
LONG_FLAG = re.compile(r"(?<![\w./=-])--[a-z][\w-]*")


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def without_code(text: str) -> str:
    """The text with fenced blocks and inline code removed (links and headings are not read there)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def code_snippets(text: str) -> list[str]:
    """Every fenced block's logical lines (backslash continuations joined) and every inline code span."""
    snippets = []
    for block in FENCE.finditer(text):
        body = block.group(0).split("\n", 1)[1].rsplit("\n", 1)[0]
        snippets += re.sub(r"\\\n[ \t]*", " ", body).splitlines()
    snippets += [re.sub(r"\s+", " ", span) for span in INLINE_CODE.findall(FENCE.sub("", text))]
    return snippets


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lower case, punctuation removed, spaces -> '-'."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading).strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, title in HEADING.findall(FENCE.sub("", path.read_text())):
        slug = github_anchor(title)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def module_rows() -> list[str]:
    """The module column of the architecture table: rows whose first cell is one backticked path."""
    rows = []
    for line in ARCHITECTURE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and re.fullmatch(r"`[^`]+\.py`", cells[0]):
            rows.append(cells[0].strip("`"))
    return rows


def test_architecture_table_lists_every_module():
    modules = {
        rel(p) for package in PACKAGES for p in (REPO / package).rglob("*.py")
        if "__pycache__" not in p.parts and p.name not in ("__init__.py", "__main__.py")
    }  # fmt: skip
    rows = module_rows()
    missing = sorted(modules - set(rows))
    stale = sorted(r for r in set(rows) if not (REPO / r).is_file())
    repeated = sorted({r for r in rows if rows.count(r) > 1})
    assert not missing, f"{rel(ARCHITECTURE)}: add a row for each of {missing}"
    assert not stale, f"{rel(ARCHITECTURE)}: rows name files that do not exist: {stale}"
    assert not repeated, f"{rel(ARCHITECTURE)}: one row per module; repeated: {repeated}"


def test_readme_is_a_landing_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/ (at most {README_MAX_LINES})"
    broken = []
    for doc in doc_files():
        for target in LINK.findall(without_code(doc.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (doc.parent / path).resolve() if path else doc
            if not resolved.exists():
                broken.append(f"{rel(doc)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{rel(doc)}: {target} (no such heading in {resolved.name})")
            elif not resolved.is_relative_to(REPO):
                broken.append(f"{rel(doc)}: {target} (outside the repository)")
    assert not broken, "broken links:\n" + "\n".join(broken)
    index = DOCS / "README.md"
    linked = {(DOCS / t.partition("#")[0]).resolve() for t in LINK.findall(without_code(index.read_text()))}
    unlisted = [rel(p) for p in sorted(DOCS.rglob("*.md")) if p != index and p.resolve() not in linked]
    assert not unlisted, f"docs/README.md (the index) does not link {unlisted}"


def test_docs_show_only_existing_commands_and_flags():
    commands = subcommands()
    top_flags = set(build_parser()._option_string_actions)
    wrong = []
    for doc in doc_files():
        for snippet in code_snippets(doc.read_text()):
            for match in COMMAND.finditer(snippet):
                options, name = match.group(1).split(), match.group(2)
                wrong += [f"{rel(doc)}: `samtune {o}` (no such option)" for o in options if o not in top_flags]
                if name not in commands:
                    wrong.append(f"{rel(doc)}: `samtune {name}` (no such command; commands: {', '.join(commands)})")
                    continue
                # the rest of this command: up to a comment, `;`, `&&`, a pipe or the next samtune command
                rest = re.split(r"\s#|;|&&|(?<!\\)\|\s|(?<![\w.-])samtune[ \t]", snippet[match.end():])[0]
                known = set(commands[name]._option_string_actions)
                wrong += [f"{rel(doc)}: `samtune {name} {f}` (no such option)" for f in LONG_FLAG.findall(rest) if f not in known]
    assert not wrong, "the docs show commands the command line does not have:\n" + "\n".join(sorted(set(wrong)))
