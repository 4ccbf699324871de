"""What a source file imports, read from its compiled bytecode (every ``IMPORT_NAME``, at top
level or inside any function), for the tests that check import arrows and images' requirements.

Not ``ast.parse``: CPython 3.11 keeps the recursion depth of the AST objects it builds per
interpreter, not per thread, and a parse while another thread built AST objects failed once on
CI ("AST constructor recursion depth mismatch"). Compiling to bytecode builds none."""

from __future__ import annotations

import dis
import types
from pathlib import Path


def absolute_imports(path: Path) -> list[tuple[str, str]]:
    """``[(module, name)]`` of each absolute import in ``path``: ``from m import a, b`` gives
    ``(m, a), (m, b)``; ``import m.n`` gives ``(m.n, "")``. Relative imports are left out."""
    found, todo = [], [compile(path.read_text(), str(path), "exec", dont_inherit=True)]
    while todo:
        code = todo.pop()
        # EXTENDED_ARG (a code object past 255 constants or names) prefixes an instruction
        # whose argval already holds the whole argument: it is not one of the three
        ops = [op for op in dis.get_instructions(code) if op.opname != "EXTENDED_ARG"]
        for n, op in enumerate(ops):
            if op.opname != "IMPORT_NAME":
                continue
            # IMPORT_NAME module, after LOAD_CONST level and LOAD_CONST fromlist
            if [o.opname for o in ops[n - 2 : n]] != ["LOAD_CONST", "LOAD_CONST"]:
                raise ValueError(f"{path}: an import compiled in a way this reader does not know")
            if ops[n - 2].argval != 0:
                continue
            fromlist = ops[n - 1].argval
            found += [(op.argval, name) for name in fromlist] if fromlist else [(op.argval, "")]
        todo += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return found
