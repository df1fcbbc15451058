"""The docs' benchmark page (docs/benchmarks.md), generated from the results the benches keep on record.

Why generated: a figure copied by hand goes stale silently and cannot say where it came from. Each
bench run with ``--record`` writes ``bench/results/<bench>.json`` (:mod:`bench.record`: the result plus
its command, commit, machine and date); this tool turns every such file into a section of tables, and
lists the benches that have no result on record yet with the command that makes one. A result that
needs a GPU or several hosts stays, with its date, until someone reruns it there.
``python tools/bench_pages.py`` rewrites the page; ``--check`` exits 1 when it is stale
(``tests/test_docs.py``).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path
from typing import Any

from generated_page import write_or_check  # the sibling module (tools/ is this script's sys.path[0])

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
HELPERS = {"record", "workspace"}  # modules of bench/ that are not benchmarks

HEAD = """# Benchmarks

Every figure on this page comes from a JSON file under `bench/results/`, written by the bench itself
(`python bench/<name>.py --record`) with the command, the commit, the machine and the date it ran on;
`python tools/bench_pages.py` regenerates this page from them (a test fails when it is stale). Rerun a
bench with `--record` to replace its figures. Benches print one JSON object as their last line, so a
run without `--record` changes nothing here.
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and all(not isinstance(v, (dict, list)) for v in value):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value)}`"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _scalar(value: Any) -> bool:
    return not isinstance(value, dict) and not (isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value))


def _table(rows: list[tuple[str, dict[str, Any]]], first: str) -> list[str]:
    columns: list[str] = []
    for _, row in rows:
        columns += [k for k in row if k not in columns]
    out = [f"| {first} | " + " | ".join(columns) + " |", "| --- " * (len(columns) + 1) + "|"]
    for name, row in rows:
        out.append(f"| {name} | " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return out


def render_value(title: str, value: Any, depth: int) -> list[str]:
    """Markdown for one part of a result: scalars as a key/value table, a mapping or list of flat
    records as one table with a row per record, anything deeper as sub-sections."""
    heading = "#" * min(depth, 6) + f" {title}" if title else ""
    out = [heading, ""] if heading else []
    if isinstance(value, dict):
        scalars = {k: v for k, v in value.items() if _scalar(v)}
        nested = {k: v for k, v in value.items() if not _scalar(v)}
        if nested and all(isinstance(v, dict) and all(_scalar(x) for x in v.values()) for v in nested.values()) \
                and len(nested) > 1:
            out += _table([(str(k), v) for k, v in nested.items()], "") + [""]
            nested = {}
        if scalars:
            out += ["| key | value |", "| --- | --- |"] + [f"| `{k}` | {_fmt(v)} |" for k, v in scalars.items()] + [""]
        for key, sub in nested.items():
            out += render_value(str(key), sub, depth + 1)
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        if all(all(_scalar(x) for x in v.values()) for v in value):
            return out + _table([(str(i + 1), v) for i, v in enumerate(value)], "#") + [""]
        for i, sub in enumerate(value):
            out += render_value(f"{title} {i + 1}", sub, depth + 1)
        return out
    return out + [_fmt(value), ""]


def _docstring(bench: str) -> str:
    path = ROOT / "bench" / f"{bench}.py"
    if not path.is_file():
        return ""
    doc = ast.get_docstring(ast.parse(path.read_text(), str(path))) or ""
    return " ".join(line.strip() for line in doc.strip().split("\n\n")[0].splitlines())


def benches() -> list[str]:
    return sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem not in HELPERS)


def page() -> str:
    lines = [HEAD]
    recorded = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    missing = [b for b in benches() if b not in recorded]
    for name, entry in recorded.items():
        machine = entry.get("machine", {})
        where = ", ".join(str(x) for x in (machine.get("cpu"), f"{machine.get('cores')} cores",
                                            f"{machine.get('memory_gb')} GB", machine.get("gpu") or "no GPU") if x)
        lines += [f"## {name}", "", _docstring(name), "",
                  f"- command: `{entry.get('command', '')}`",
                  f"- commit: `{entry.get('commit', '') or 'unknown'}`",
                  f"- date: {entry.get('date', '')}",
                  f"- machine: {where}",
                  "- versions: " + ", ".join(f"{k} {v}" for k, v in entry.get("versions", {}).items()), ""]
        lines += render_value("", entry.get("result", {}), 3)
    if missing:
        lines += ["## Not yet on record", "",
                  "These benches have no recorded result yet; each names the command that makes one.", ""]
        for b in missing:
            lines += [f"### {b}", "", _docstring(b), "", f"`python bench/{b}.py --record`", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md is stale")
    args = parser.parse_args(argv)
    return write_or_check(PAGE, page(), args.check, "bench_pages.py")


if __name__ == "__main__":
    sys.exit(main())
