"""The docs build in strict mode, can fail, and no reference points outside the repository."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))
import hooks  # noqa: E402  (docs/hooks.py, the MkDocs hooks)


def build(root: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, cwd=root)


@pytest.mark.slow
def test_docs_build_strictly_with_the_generated_pages(tmp_path):
    result = build(ROOT, tmp_path)
    assert result.returncode == 0, result.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("topk_encode", "SparseAutoencoder", "residual_spread", "SAEFeaturePenalty", "next_token_loss"):
        assert name in api
    from qscope_hf.releases import list_releases

    releases = (tmp_path / "site" / "releases" / "index.html").read_text()
    assert all(release.repo_id in releases for release in list_releases())


@pytest.mark.slow
def test_a_broken_link_fails_the_build(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    page = copy / "docs" / "methods" / "steering.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    result = build(copy, tmp_path)
    assert result.returncode != 0 and "no-such-page.md" in result.stderr


def test_a_public_name_without_a_docstring_is_found(tmp_path, monkeypatch):
    package = tmp_path / "undocumented_pkg"
    package.mkdir()
    (package / "__init__.py").write_text('"""A package."""\n')
    (package / "tool.py").write_text('"""A module."""\n\n\ndef documented():\n    """Yes."""\n\n\n'
                                     'def bare():\n    return 1\n\n\nclass Thing:\n    """A class."""\n\n'
                                     '    def method(self):\n        return 2\n\n    def _private(self):\n'
                                     '        return 3\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(hooks, "PACKAGES", ("undocumented_pkg",))
    assert hooks.undocumented() == ["undocumented_pkg.tool.bare", "undocumented_pkg.tool.Thing.method"]


def test_every_public_name_of_qscope_has_a_docstring():
    assert hooks.undocumented() == []


def test_no_reference_leaves_the_repository():
    files = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    offending = []
    for name in files:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".toml", ".yml", ".yaml", ".txt", ".json"} or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for needle in ("METHODS.md", "METHODS §", "../shared", "shared/STACK-NOTES", "STYLE.md"):
            if needle in text and name != "tests/test_docs.py":
                offending.append(f"{name}: {needle}")
    assert not offending, offending


def test_qscope_trl_re_exports_only_what_qscope_hf_exports():
    import qscope_hf
    import qscope_trl

    for name in qscope_trl.__all__:
        obj = getattr(qscope_trl, name)
        if obj.__module__.startswith("qscope_hf"):
            assert getattr(qscope_hf, name, None) is obj, name
