"""The documentation: every probe page opens with an example that runs, every relative link
resolves, and the pages point at the reference module that really implements their metric."""

import re
from pathlib import Path

import pytest
import torch

from collapse_monitor import CollapseMonitor, functional

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted((DOCS / "probes").glob("*.md"))
MARKDOWN = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *PAGES]
# the whole-tensor reference of each probe's metrics (its module is the page's "reference" link)
REFERENCES = {
    "NeuralCollapse": functional.neural_collapse,
    "GroupCollapse": functional.group_collapse,
    "CodebookUsage": functional.codebook_usage,
    "LatentUsage": functional.latent_usage,
    "AttentionEntropy": functional.attention_entropy,
    "RepresentationRank": functional.representation_rank,
    "PosteriorCollapse": functional.posterior_collapse,
    "LogitHealth": functional.logit_health,
    "TokenUniformity": functional.mean_token_uniformity,
    "TokenEntropy": functional.token_entropy_metrics,
    "GenerationDiversity": functional.generation_diversity,
    "DormantUnits": functional.dormant_units,
}
OPTIONAL = ("transformers", "vector_quantize_pytorch")  # dev extras some examples build models of

_FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code (whose brackets are not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub makes from a page's headings (``## Where it runs`` -> where-it-runs)."""
    seen: dict[str, int] = {}
    out = set()
    for _, title in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _broken_links(path: Path) -> list[str]:
    broken = []
    for target in _LINK.findall(_prose(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading makes #{anchor} in {dest.name})")
    return broken


def _title_and_first_block(page: Path) -> tuple[str, list[str], str | None]:
    """The page's title, its lines after the title, and its first ```python block (or None)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    block = re.search(r"^```python[ \t]*\n(.*?)^```[ \t]*$", "\n".join(lines), re.S | re.M)
    return lines[0], lines[1:], None if block is None else block.group(1)


@pytest.fixture
def one_thread():
    """The examples' models are tiny: one thread each, so that a busy machine's other processes
    do not slow them down tenfold (threads waiting for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_probe_has_a_page_and_the_index_links_the_metric_reference():
    titles = {_title_and_first_block(page)[0].removeprefix("# ") for page in PAGES}
    assert titles == set(REFERENCES)
    assert "](metrics.md)" in (DOCS / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_page_opens_with_an_example(page):
    title, rest, _ = _title_and_first_block(page)
    assert title.startswith("# "), f"{page.name}: the first line must be its '# Title'"
    body = [line for line in rest if line.strip()]
    assert body and body[0].strip() == "```python", (
        f"{page.name}: the first thing after the title must be a ```python example, got {body[:1]}"
    )


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_page_example_runs(page, one_thread, capsys):
    _, _, code = _title_and_first_block(page)
    assert code is not None, f"{page.name} has no ```python block"
    for name in OPTIONAL:
        if re.search(rf"^\s*(from|import)\s+{name}\b", code, re.M):
            pytest.importorskip(name)
    torch.manual_seed(0)
    namespace = {"__name__": f"docs_{page.stem}"}
    exec(compile(code, str(page), "exec"), namespace)  # the page's own example
    monitors = [v for v in namespace.values() if isinstance(v, CollapseMonitor)]
    assert monitors, f"{page.name}: the example builds no CollapseMonitor"
    for mon in monitors:
        assert mon.error_count == 0, f"{page.name}: a probe, mitigation or sink failed"
    printed = capsys.readouterr().out
    assert re.search(r"\d", printed), f"{page.name}: the example printed no metric"


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_page_metric_links_the_module_that_implements_it(page):
    title, rest, _ = _title_and_first_block(page)
    text = "\n".join(rest)
    found = re.search(r"\*\*Metric\*\* \(\[reference\]\(([^)]+)\)\)", text)
    assert found, f"{page.name}: no '**Metric** ([reference](...))' link"
    module = REFERENCES[title.removeprefix("# ")].__module__.rsplit(".", 1)[1]
    assert (page.parent / found.group(1)).resolve() == ROOT / "monitor" / "functional" / (
        module + ".py"
    ), f"{page.name}: its metric is implemented in monitor/functional/{module}.py"
    anchor = title.removeprefix("# ").lower()
    assert f"](../metrics.md#{anchor})" in text, f"{page.name}: no link to metrics.md#{anchor}"


@pytest.mark.parametrize("path", MARKDOWN, ids=[str(p.relative_to(ROOT)) for p in MARKDOWN])
def test_relative_links_resolve(path):
    assert _broken_links(path) == []


def _mentions(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [word for word in ("METRICS.md", "shared/") if word in text]


def test_docs_do_not_mention_the_internal_specification():
    offenders = {}
    for path in sorted(DOCS.rglob("*")):
        if path.is_file():
            try:
                found = _mentions(path)
            except UnicodeDecodeError:  # pictures
                continue
            if found:
                offenders[str(path.relative_to(ROOT))] = found
    assert offenders == {}


def test_readme_does_not_mention_the_internal_specification():
    assert _mentions(ROOT / "README.md") == []
