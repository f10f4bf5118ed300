"""The backend and the Slicer module must import on Slicer's Pythons: 3.9 (Slicer <= 5.8) and 3.12."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(str(p) for folder in ("tedm_core", "TEDMSlicer", "scripts") for p in (REPO / folder).rglob("*.py"))

COMPILE_ALL = (
    "import sys\nfor f in sys.argv[1:]:\n    compile(open(f, encoding='utf-8').read(), f, 'exec', dont_inherit=True)\n"
)


def _find_interpreter(name: str):
    candidates = [shutil.which(name)] + sorted(str(p) for p in Path.home().glob(f".pyenv/versions/*/bin/{name}"))
    for candidate in candidates:
        if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.parametrize("python", ["python3.9", "python3.12"])
def test_sources_compile_on_slicer_pythons(python):
    interpreter = _find_interpreter(python)
    if interpreter is None:
        pytest.skip(f"{python} is not installed here")
    result = subprocess.run([interpreter, "-c", COMPILE_ALL, *SOURCES], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_annotations_with_new_syntax_are_deferred():
    """`X | None` or `list[int]` in annotations needs `from __future__ import annotations` on 3.9."""
    offenders = []
    for source in SOURCES:
        text = Path(source).read_text(encoding="utf-8")
        uses_new_syntax = any(token in text for token in ("| None", "-> list[", "-> dict[", ": list[", ": dict["))
        if uses_new_syntax and "from __future__ import annotations" not in text:
            offenders.append(source)
    assert not offenders, offenders
