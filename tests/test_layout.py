"""The repository is what the README says it is: its module list, and one config edge."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlscore_jax"


def _layout_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Repository layout", 1)[1]
    return section.split("```", 2)[1]


def test_readme_layout_lists_every_module_of_the_package():
    listed = set(re.findall(r"^  (\S+\.py|\S+/)\s", _layout_block(), re.M))
    actual = {p.name for p in PACKAGE.glob("*.py")} | {
        p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()
    }
    assert listed == actual, (sorted(listed - actual), sorted(actual - listed))


def test_only_the_config_edge_reads_a_config():
    readers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n.split(".")[0] == "ml_collections" for n in names):
                readers.append(str(path.relative_to(ROOT)))
            if isinstance(node, ast.Attribute) and node.attr == "ConfigDict":
                readers.append(str(path.relative_to(ROOT)))
    # experiment.py is the edge; the command-line programs define the --config flag and hand the
    # ConfigDict to experiment.from_config.
    programs = ["mlscore_jax/convert.py", "mlscore_jax/main.py", "mlscore_jax/nll.py"]
    assert sorted(set(readers)) == sorted(["mlscore_jax/experiment.py", *programs])
