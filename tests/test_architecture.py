"""The layers import downwards only, and nothing in the repository points outside it.

Read from the sources (no import is executed): each module's ``import`` and
``from ... import`` statements, resolved to the layer they name.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Lowest first; a layer may import those before it in this list, never those after. The two middle
# layers beside each other may not import each other either.
LAYERS = ["servers", "loadgen", "experiments", "reliability", "analysis", "conclab"]
ALLOWED = {
    "servers": set(),
    "loadgen": {"servers"},
    "experiments": {"servers", "loadgen"},
    "reliability": {"servers", "loadgen"},
    "analysis": {"servers", "experiments"},
    "conclab": {"servers", "loadgen", "experiments", "reliability", "analysis"},
}


def layer_imports(layer: str) -> dict[str, set[str]]:
    """module path -> the other layers it imports."""
    found = {}
    for path in sorted((REPO / layer).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "conclab" and node.level == 0:
                names.update(f"conclab.{alias.name}" for alias in node.names)   # from conclab import servers
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        used = {name.split(".")[1] if name.startswith("conclab.") else "conclab"
                for name in names if name == "conclab" or name.startswith("conclab.")}
        found[str(path.relative_to(REPO))] = {u for u in used if u in LAYERS and u != layer}
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_the_layers_below(layer):
    wrong = {module: sorted(used - ALLOWED[layer]) for module, used in layer_imports(layer).items()
             if used - ALLOWED[layer]}
    assert wrong == {}


def test_the_layer_rule_is_not_vacuous():
    """The scan sees real imports (a broken scan would pass the rule above trivially)."""
    assert "servers" in set().union(*layer_imports("loadgen").values())
    assert "experiments" in set().union(*layer_imports("analysis").values())
    assert {"servers", "loadgen"} <= set().union(*layer_imports("reliability").values())


# Pointers to a sibling folder, a contract file outside, the source texts, or the tracker (spelt in pieces,
# so this line does not match itself when the repository is searched).
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", "DESIGN" + r"\.md", "seeds" + "/", r"\bissue" + r" #?\d+"]),
                     re.IGNORECASE)


SKIPPED_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis"}
TEXT = (".py", ".md", ".sh", ".toml", ".go", ".c", ".cfg")


def test_nothing_points_outside_the_repository():
    texts = [path for path in REPO.rglob("*") if path.suffix in TEXT and path.is_file()
             and not SKIPPED_DIRS & set(path.relative_to(REPO).parts) and path.name != Path(__file__).name]
    hits = [f"{path.relative_to(REPO)}: {match.group(0)}" for path in texts
            for match in [OUTSIDE.search(path.read_text(encoding="utf-8", errors="replace"))] if match]
    assert len(texts) > 50 and hits == []
