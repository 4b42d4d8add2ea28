"""Fails when a Python function is longer than a limit (lines from its ``def``, decorators
excluded, to its last line, docstring and comments included) or, with --max-file, a file is.

    python scripts/check_lengths.py [--max N] [--max-file N] PATH...

PATH: .py files or folders (searched recursively). Prints one line per violation,
``path:line: name is N lines (max M)`` or ``path: N lines (max M)``, and exits 1 when there is any.
Python only: C++ and CUDA sources are not parsed. scripts/lint.sh holds the limits: 80 lines a
function everywhere, 400 a file of the benchmarks.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys


def python_files(paths: list[str]) -> list[pathlib.Path]:
    files = []
    for path in map(pathlib.Path, paths):
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def long_functions(path: pathlib.Path, max_lines: int) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > max_lines:
                found.append(
                    f"{path}:{node.lineno}: {node.name} is {length} lines (max {max_lines})"
                )
    return found


def long_file(path: pathlib.Path, max_lines: int | None) -> list[str]:
    if max_lines is None:
        return []
    length = len(path.read_text().splitlines())
    return [f"{path}: {length} lines (max {max_lines})"] if length > max_lines else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max", type=int, default=80, help="longest allowed function (lines)")
    parser.add_argument("--max-file", type=int, help="longest allowed file (lines; default: any)")
    parser.add_argument("paths", nargs="+", help=".py files or folders")
    args = parser.parse_args(argv)
    violations = [
        line
        for path in python_files(args.paths)
        for line in long_file(path, args.max_file) + long_functions(path, args.max)
    ]
    limits = f"no function longer than {args.max} lines"
    if args.max_file is not None:
        limits += f", no file longer than {args.max_file}"
    print("\n".join(violations) if violations else limits)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
