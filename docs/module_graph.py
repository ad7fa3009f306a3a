"""The packages' import direction: which package may import which, the check that holds it, and the picture in
docs/module_map.md.

Packages are layered, lowest first; a module may import its own package and any package below it, never one above
(imports for type hints count too: they are a dependency a reader has to follow). Top-level scripts, benchmarks/ and
tests/ sit above every package.

    python docs/module_graph.py            # list imports that point upwards (exit 1 if any)
    python docs/module_graph.py --write    # also redraw the picture in docs/module_map.md
    python docs/module_graph.py --check    # exit 1 if an import points upwards or the picture is out of date
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT / "docs" / "module_map.md"
BEGIN, END = "<!-- module-graph:begin (docs/module_graph.py --write) -->", "<!-- module-graph:end -->"

# Lowest first. custom_models holds users' own architectures (it imports only torch and timm). configs.py is a module, not a package: the options schema that every layer above may read.
LAYERS = ["utils", "custom_models", "evaluation", "configs", "dataloaders", "runs", "segmentation", "prediction",
          "serving", "torch_trainer", "deploy", "experiments"]
RANK = {name: i for i, name in enumerate(LAYERS)}


def tracked_python_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / p for p in listed.stdout.split() if (ROOT / p).is_file()]


def layer_of(path: Path, root: Path = ROOT) -> str | None:
    first = path.relative_to(root).parts[0]
    name = Path(first).stem if first.endswith(".py") else first
    return name if name in RANK else None


def imported_layers(path: Path) -> list[tuple[int, str]]:
    """(line, layer) of every import of a project package in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module.split(".")[0]))
    return [(line, name) for line, name in found if name in RANK]


def package_edges(files: list[Path] | None = None, root: Path = ROOT) -> tuple[dict[str, set[str]], list[str]]:
    """Which layer imports which, and every import that points upwards ("file:line: a imports b"), over ``files``
    (default: the repository's tracked Python files)."""
    edges: dict[str, set[str]] = defaultdict(set)
    upwards = []
    for path in tracked_python_files() if files is None else files:
        own = layer_of(path, root)
        if own is None:
            continue
        for line, name in imported_layers(path):
            if name == own:
                continue
            edges[own].add(name)
            if RANK[name] > RANK[own]:
                upwards.append(f"{path.relative_to(root).as_posix()}:{line}: {own} imports {name}, which sits above it")
    return edges, upwards


def mermaid(edges: dict[str, set[str]]) -> str:
    lines = ["```mermaid", "flowchart BT"]
    for own in LAYERS:
        for name in sorted(edges.get(own, ()), key=RANK.get):
            lines.append(f"    {own} --> {name}")
    lines.append("```")
    return "\n".join(lines)


def redrawn(text: str, picture: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{picture}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description="Check the packages' import direction; draw it.")
    parser.add_argument("--write", action="store_true", help="redraw the picture in docs/module_map.md")
    parser.add_argument("--check", action="store_true", help="fail if the picture is out of date")
    args = parser.parse_args()
    edges, upwards = package_edges()
    print("\n".join(upwards) or "every import points downwards")
    text = MAP.read_text(encoding="utf-8")
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    new_text = redrawn(text, mermaid(edges))
    if args.write:
        MAP.write_text(new_text, encoding="utf-8")
    stale = args.check and new_text != text
    if stale:
        print("docs/module_map.md's picture is out of date: run python docs/module_graph.py --write")
    return 1 if upwards or stale else 0


if __name__ == "__main__":
    sys.exit(main())
