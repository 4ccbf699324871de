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
        ops = list(dis.get_instructions(code))
        for n, op in enumerate(ops):
            # IMPORT_NAME module, after LOAD_CONST level and LOAD_CONST fromlist
            if op.opname != "IMPORT_NAME" or ops[n - 2].argval != 0:
                continue
            fromlist = ops[n - 1].argval
            found += [(op.argval, name) for name in fromlist] if fromlist else [(op.argval, "")]
        todo += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return found
