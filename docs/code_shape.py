"""Print the shape of the code: lines per top-level module/package, the longest functions and the functions with the
most parameters, and which top-level scripts import other scripts. Used for docs/module_map.md.

    python docs/code_shape.py [--top 10]
"""

from __future__ import annotations

import argparse
import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    return sorted(ROOT / p for p in listed.stdout.split() if (ROOT / p).is_file())


def functions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
            count -= 1 if args.args and args.args[0].arg in ("self", "cls") else 0
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    files = python_files()
    scripts = {p.stem for p in files if p.parent == ROOT}
    rows = [(p.relative_to(ROOT).as_posix(), *f) for p in files if "tests" not in p.parts for f in functions(p)]
    print("## longest functions (lines)")
    for path, name, line, length, _ in sorted(rows, key=lambda r: -r[3])[:args.top]:
        print(f"{length:5d}  {path}:{line} {name}")
    print("\n## most parameters")
    for path, name, line, _, params in sorted(rows, key=lambda r: -r[4])[:args.top]:
        print(f"{params:5d}  {path}:{line} {name}")
    print("\n## lines per package / script (tests excluded)")
    sizes: dict[str, int] = {}
    for p in files:
        rel = p.relative_to(ROOT)
        if rel.parts[0] != "tests":
            key = rel.parts[0] + ("/" if len(rel.parts) > 1 else "")
            sizes[key] = sizes.get(key, 0) + len(p.read_text(encoding="utf-8").splitlines())
    for key, lines in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"{lines:6d}  {key}")
    print("\n## imports of top-level scripts (outside tests; main.py's parser reuse by run_experiments.py is allowed)")
    for p in files:
        rel = p.relative_to(ROOT)
        if rel.parts[0] == "tests":
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [])
            for name in names:
                if name.split(".")[0] in scripts and name.split(".")[0] != "configs":
                    print(f"       {rel.as_posix()}:{node.lineno} imports {name}")


if __name__ == "__main__":
    main()
