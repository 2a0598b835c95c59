"""Functions of a package over a length or parameter limit (``self``/``cls`` aside).

    python tools/function_sizes.py [PACKAGE] [--max-lines N] [--max-params N]

Prints each offender (lines, parameters, where), then the longest function and the most
parameters in the package. A parameter is a named argument, ``*args`` or ``**kwargs``.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def sizes(root: Path) -> list[tuple[int, int, str]]:
    """(lines, parameters, "path:line name") of every function under ``root``."""
    rows = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                params = len(names) + bool(a.vararg) + bool(a.kwarg)
                rows.append((node.end_lineno - node.lineno + 1, params, f"{path}:{node.lineno} {node.name}"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package", nargs="?", default="nmt_ls")
    p.add_argument("--max-lines", type=int, default=60)
    p.add_argument("--max-params", type=int, default=6)
    args = p.parse_args()
    rows = sizes(Path(args.package))
    for lines, params, where in sorted(rows, reverse=True):
        if lines > args.max_lines or params > args.max_params:
            print(f"{lines:4d} lines {params:2d} params  {where}")
    longest, most = max(rows), max(rows, key=lambda r: r[1])
    print(f"longest: {longest[0]} lines ({longest[2]}); most parameters: {most[1]} ({most[2]})")


if __name__ == "__main__":
    main()
