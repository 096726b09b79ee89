"""The house rules that keep the first page fast and the core testable: no
Streamlit outside personal_gpt/web, no heavy import at module level, no unsafe
model loading anywhere in the package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "personal_gpt"
HEAVY = {"torch", "transformers", "peft", "unstructured", "accelerate", "sentence_transformers"}


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def top_level_imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def all_imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_rules(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(PACKAGE).as_posix()
    if not rel.startswith("web/"):
        assert "streamlit" not in all_imports(tree), f"{rel} imports streamlit outside personal_gpt/web"
    heavy = top_level_imports(tree) & HEAVY
    assert not heavy, f"{rel} imports {heavy} at module level; import inside the function that needs it"
    assert ast.get_docstring(tree) or path.name == "__init__.py" and not path.read_text().strip(), f"{rel} has no docstring"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if func.endswith("torch.load") or func == "load" and "weights_only" in kwargs:
                assert kwargs.get("weights_only") == "True", f"{rel}: torch.load without weights_only=True"
            assert kwargs.get("trust_remote_code") not in ("True",), f"{rel}: trust_remote_code=True"
            assert not (func in ("yaml.load", "pickle.load", "pickle.loads", "eval", "exec")), f"{rel}: {func}"


def test_first_page_render_imports_no_torch(tmp_path):
    """Render My GPTs in a fresh interpreter and look at what got imported."""
    code = f"""
import os, sys
os.environ["PERSONAL_GPT_HOME"] = {str(tmp_path)!r}
from streamlit.testing.v1 import AppTest
at = AppTest.from_file({str(ROOT / "streamlit_app.py")!r}, default_timeout=60)
at.run()
assert not at.exception, at.exception
assert any("My GPTs" in h.value for h in at.title)
heavy = sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules)
print("HEAVY", heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout


def test_cli_non_chat_commands_import_no_torch(tmp_path):
    code = f"""
import os, sys
os.environ["PERSONAL_GPT_HOME"] = {str(tmp_path)!r}
from click.testing import CliRunner
from personal_gpt.cli import main
r = CliRunner().invoke(main, ["templates"])
assert r.exit_code == 0, r.output
r = CliRunner().invoke(main, ["list"])
assert r.exit_code == 0, r.output
print("HEAVY", sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout
