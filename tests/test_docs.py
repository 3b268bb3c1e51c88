"""Links into docs/design.md from code, tests and docs name anchors that exist."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"


def test_design_anchors_referenced_in_the_repository_exist():
    anchors = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', DESIGN.read_text()))
    files = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".toml", ".sh")
             and not {".git", "build", "__pycache__"} & set(p.relative_to(ROOT).parts)]
    cited = {(str(p.relative_to(ROOT)), a) for p in files
             for a in re.findall(r"design\.md#([a-z0-9-]+)", p.read_text(errors="replace"))}
    assert cited, "nothing links to docs/design.md"
    missing = sorted((f, a) for f, a in cited if a not in anchors)
    assert not missing, f"anchors missing from docs/design.md: {missing}"
