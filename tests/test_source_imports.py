"""``tests/source_imports.py``: a file's absolute imports, from its bytecode, wherever they are."""

from tests.source_imports import absolute_imports


def test_every_absolute_import_is_found_even_past_255_constants(tmp_path):
    source = "\n".join(
        [
            "from __future__ import annotations",
            "import os, a.b",
            "import c.d as e",
            "from f import g, h",
            "from . import sibling",
            "from .rel import x",
            # past 255 constants and names, the imports after need EXTENDED_ARG
            *(f"v{i} = {i}.5" for i in range(300)),
            "from late import thing",
            "import late2",
            "try:",
            "    import optional",
            "except ImportError:",
            "    optional = None",
            "class K:",
            "    def m(self):",
            "        from inner import deep",
            "        return [__import__('dynamic') for _ in ()]",
            "f = lambda: __import__('x')",
            "def outer():",
            "    def nested():",
            "        import nested_mod.part",
        ]
    )
    path = tmp_path / "m.py"
    path.write_text(source)
    assert sorted(absolute_imports(path)) == sorted(
        [
            ("__future__", "annotations"),
            ("os", ""),
            ("a.b", ""),
            ("c.d", ""),
            ("f", "g"),
            ("f", "h"),
            ("late", "thing"),
            ("late2", ""),
            ("optional", ""),
            ("inner", "deep"),
            ("nested_mod.part", ""),
        ]
    )
