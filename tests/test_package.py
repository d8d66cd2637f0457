"""The package's shape: its public API (five names, imported on first use), and modules of one job each whose
imports only go down a declared order of layers."""
import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "clipcap"
# From the bottom up; a module imports only from its own layer or those below, in a function or not. Names are
# relative to clipcap/ ("clipcap" is the package itself); a new module must be given a layer here.
LAYERS = [
    ("foundations: files and errors, locks, devices and processes, the Hub's reachability, Java and the COCO "
     "toolkit, TorchScript archives",
     "files locking runtime hub_access toolkit torchscript"),
    ("data formats: annotation files, feature sets and stores, what training reads",
     "annotations featureset store data"),
    ("models: the language model, ClipCap and its weight formats, decoding, the CLIP towers",
     "lm model checkpoint decoding resnet_clip encoder text_encoder"),
    ("engines: extraction and where its images are, scoring, training and its run state, downloads",
     "sources extraction evaluation clipscore run_state training fetch"),
    ("applications: models on the Hub, captioning with a trained model, the web page",
     "hub captioner app"),
    ("commands: the flags they share, and each command",
     "cli.common cli.extraction cli.train cli.predict cli.evaluate cli.parse_coco cli.parse_conceptual "
     "cli.parse_nocaps cli.parse_captions cli.convert cli.store cli.app cli.fetch"),
    ("the reproduction: it runs recipes of commands, parsing their command lines with the commands' own parsers",
     "paper stages budget gallery report reproduce cli.reproduce"),
    ("entry points: the installed commands, the package's public names",
     "cli clipcap"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """What ``name`` imports anywhere in its text (top level, functions, TYPE_CHECKING): the package's modules by
    name, anything else by its top-level name."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:  # from . import x, from ..files import y
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target.partition(".")[0] != "clipcap":
                found.add(target.partition(".")[0])
                continue
            while target not in MODULES:  # clipcap.files.ClipCapError -> clipcap.files
                target = target.rpartition(".")[0]
            if target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    import clipcap

    graph = {name: imports_of(name) & set(MODULES) for name in MODULES}
    graph["clipcap"] |= {f"clipcap.{home}" for home in clipcap._HOMES.values()}  # imported by name, on first use
    return graph


def test_public_api_is_five_names_loaded_lazily():
    done = subprocess.run([sys.executable, "-c", "import sys, clipcap; print('torch' in sys.modules)"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "False\n", done.stderr  # a fresh process: nothing loaded yet

    import clipcap
    from clipcap import Captioner, ClipCap, ClipCapConfig, DecodingOptions, load_checkpoint
    from clipcap.captioner import Captioner as C
    from clipcap.checkpoint import load_checkpoint as load
    from clipcap.decoding import DecodingOptions as D
    from clipcap.model import ClipCap as M
    from clipcap.model import ClipCapConfig as Config

    assert (Captioner, ClipCap, ClipCapConfig, DecodingOptions, load_checkpoint) == (C, M, Config, D, load)
    assert sorted(clipcap.__all__) == ["Captioner", "ClipCap", "ClipCapConfig", "DecodingOptions", "load_checkpoint"]


def test_every_module_has_a_layer_and_imports_only_go_down():
    """No module imports from a layer above its own, so there is no cycle between layers; nor within one. Nor
    from the checkout around the package (the test support in testing/, the demo, the benchmarks): the wheel
    leaves them out."""
    outside = {f"{name} imports {other}" for name in MODULES for other in imports_of(name)
               if other in {"testing", "tests", "conftest", "demo", "bench"}}
    assert not outside, outside
    layer_of, named = {}, []
    for rank, (_, names) in enumerate(LAYERS):
        named += names.split()
        layer_of |= {"clipcap" if name == "clipcap" else f"clipcap.{name}": rank for name in names.split()}
    assert len(named) == len(set(named)) and sorted(layer_of) == sorted(MODULES)  # each module in one layer

    def where(module: str) -> str:
        return f"{module} ({LAYERS[layer_of[module]][0].partition(':')[0]})"

    graph = import_graph()
    upward = [f"{where(a)} imports {where(b)}" for a in graph for b in sorted(graph[a]) if layer_of[b] > layer_of[a]]
    assert not upward, "\n".join(upward)

    done, cycle = set(), []

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle.append(path[path.index(name):] + [name])
        elif name not in done:
            for imported in sorted(graph[name]):
                visit(imported, path + [name])
            done.add(name)

    for name in graph:
        visit(name, [])
    assert not cycle, " -> ".join(cycle[0])


def test_every_module_has_a_docstring_naming_its_one_job():
    """Its first line, a sentence; what a reader sees first."""
    lacking = []
    for name, path in MODULES.items():
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        first = docstring.strip().splitlines()[0] if docstring.strip() else ""
        if not first.endswith("."):
            lacking.append(f"{path.relative_to(PACKAGE.parent)}: {first!r}")
    assert not lacking, "\n".join(lacking)


def test_readme_and_docs_links_name_existing_files_and_headings():
    """Every relative link of README.md and docs/*.md names a file of the repository, and its #anchor a
    heading of that page (GitHub's anchors: lower case, punctuation dropped, spaces as hyphens)."""
    repo = PACKAGE.parent

    def without_code(path: Path) -> str:
        return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)

    def anchors(path: Path) -> set[str]:
        return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", without_code(path), flags=re.M)}

    pages = [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for link in re.findall(r"\]\(([^)\s]+)\)", without_code(page)):
            if re.match(r"[a-z]+:", link):
                continue  # a web address
            target, _, anchor = link.partition("#")
            path = (page.parent / target).resolve() if target else page
            if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
                broken.append(f"{page.relative_to(repo)}: {link}")
    assert len(pages) > 5 and not broken, broken
