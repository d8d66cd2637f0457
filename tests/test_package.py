"""The package's public API: five names, imported on first use."""
import subprocess
import sys


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


def test_readme_and_docs_links_name_existing_files_and_headings():
    """Every relative link of README.md and docs/*.md names a file of the repository, and its #anchor a
    heading of that page (GitHub's anchors: lower case, punctuation dropped, spaces as hyphens)."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]

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
