"""The package's architecture, checked: no import circle, a pure functional layer, thin
integrations, and a probe template whose surface is the one documented."""

import ast
import re
from pathlib import Path

import pytest

from collapse_monitor.probes import Probe

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"monitor": "collapse_monitor", "integrations": "collapse_monitor.integrations"}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    """Every module of the package ``name`` imports, ``TYPE_CHECKING`` imports included."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


def test_no_module_imports_itself_through_others():
    known = modules()
    graph = {m: imports(m, p, known) for m, p in known.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                pytest.fail("import circle: " + " -> ".join([*path[path.index(d) :], d]))
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_functional_is_pure():
    known = modules()
    for path in (ROOT / "monitor" / "functional").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"\b_dist\b|_sharding|torch\.distributed", text), path.name
        name = f"collapse_monitor.functional.{path.stem}".removesuffix(".__init__")
        deps = imports(name, path, known)
        outside = {
            d
            for d in deps
            if not d.startswith(("collapse_monitor.functional", "collapse_monitor.losses"))
        }
        assert not outside, f"{path.name} imports {outside}"


def test_integrations_use_the_public_api_and_parse_no_key():
    for path in (ROOT / "integrations").glob("*.py"):
        text = path.read_text()
        assert not re.search(r'split\("/"\)|_dist|_sharding', text), path.name


@pytest.mark.parametrize("path", ["monitor/monitor.py", "monitor/probes/base.py"])
def test_the_coordinator_and_the_probe_template_read_in_minutes(path):
    assert len((ROOT / path).read_text().splitlines()) <= 500


def test_a_probe_author_sees_exactly_what_writing_a_probe_lists():
    doc = (ROOT / "docs" / "writing_a_probe.md").read_text()
    section = doc[doc.index("## The whole of what a subclass sees") : doc.index("## 3. Use it")]
    first_column = re.findall(r"^\| ([^|]+)\|", section, re.M)
    listed = {n for cell in first_column for n in re.findall(r"`(\w+)", cell)}
    listed |= set(re.findall(r"`(\w+)\(", section.split("Helpers:")[1].split("That is all")[0]))
    listed |= {"name", "paths", "disabled", "errors"}
    public = {n for n in dir(Probe) if not n.startswith("_")}
    public |= {n for n in vars(Probe("m")) if not n.startswith("_")}
    internal = {"module", "extract", "read", "pool"}  # the constructor's arguments
    assert public - internal == listed
