"""TEDMSlicer's packaging, read as Slicer will: the CMake lists every file, the .ui matches the
parameter node and the widget, the dependency list follows pyproject.toml, and the module's
Python is valid for Slicer's Python 3.9 (Slicer <= 5.8) as well as 3.12. No Slicer needed."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "TEDMSlicer"
sys.path.insert(0, str(MODULE))


def _module_python_files():
    return sorted([MODULE / "TEDMSlicer.py"] + list((MODULE / "TEDMSlicerLib").glob("*.py")))


def test_module_cmake_lists_every_script_and_resource():
    cmake = (MODULE / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"\$\{MODULE_NAME\}(Lib/[\w.]+\.py|\.py)", cmake))
    listed = {("TEDMSlicer" + entry) for entry in listed}
    on_disk = {str(p.relative_to(MODULE)) for p in _module_python_files()}
    assert on_disk == listed, (
        f"not packaged: {sorted(on_disk - listed)}; listed but missing: {sorted(listed - on_disk)}"
    )
    for resource in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui"):
        assert resource in cmake
        assert (MODULE / resource.replace("${MODULE_NAME}", "TEDMSlicer")).is_file()
    assert "WITH_GENERIC_TESTS" in cmake


def test_extension_cmake_metadata():
    cmake = (REPO / "CMakeLists.txt").read_text()
    for variable in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
    ):
        assert re.search(rf"set\({variable} \"[^\"]+\"\)", cmake), variable
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in cmake
    for line in (
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(TEDMSlicer)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ):
        assert line in cmake
    assert (MODULE / "Testing" / "CMakeLists.txt").is_file() and (
        MODULE / "Testing" / "Python" / "CMakeLists.txt"
    ).is_file()


def _parameter_names():
    tree = ast.parse((MODULE / "TEDMSlicer.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "TEDMSlicerParameterNode":
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("no TEDMSlicerParameterNode")


def test_ui_matches_parameter_node_and_widget():
    ui = ElementTree.parse(MODULE / "Resources" / "UI" / "TEDMSlicer.ui")
    widgets = {w.get("name"): w for w in ui.iter("widget")}
    bound = {}
    for name, widget in widgets.items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = name
    assert set(bound) == _parameter_names(), (
        "every parameter has exactly one widget, and no widget names a missing parameter"
    )
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "TEDMSlicer.py").read_text()))
    assert used <= set(widgets), f"widgets used but not in the .ui: {sorted(used - set(widgets))}"
    for required in (
        "segmentButton",
        "fitButton",
        "refineButton",
        "nextUncertainButton",
        "saveModelButton",
        "cancelButton",
        "progressBar",
        "statusLabel",
        "deviceComboBox",
        "axisComboBox",
        "modelPathLineEdit",
        "outputSegmentationSelector",
        "inputVolumeSelector",
    ):
        assert required in widgets
    # Every node selector gets the scene.
    selectors = {n for n, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    receivers = {
        c.find("receiver").text for c in ui.iter("connection") if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"
    }
    assert selectors <= receivers


def test_icon_is_a_128_pixel_png():
    import numpy as np
    from PIL import Image

    image = Image.open(MODULE / "Resources" / "Icons" / "TEDMSlicer.png")
    assert image.format == "PNG" and image.size == (128, 128)
    colours = np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)
    assert len(colours) > 100, "a real picture, not a flat placeholder"


def test_requirements_follow_pyproject():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")
    from TEDMSlicerLib import dependencies

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    provided = {name.lower() for name in dependencies.SLICER_PROVIDED}
    expected = [r for r in declared if re.split(r"[<>=!~ ]", r, maxsplit=1)[0].lower() not in provided]
    assert sorted(expected) == sorted(dependencies.REQUIREMENTS)


def _runtime_unions(tree: ast.AST):
    """PEP 604 ``X | Y`` in annotations, which Python 3.9 evaluates (and fails on) at import
    unless the file has ``from __future__ import annotations``."""
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations = [a.annotation for a in node.args.args + node.args.kwonlyargs if a.annotation] + (
                [node.returns] if node.returns else []
            )
        elif isinstance(node, ast.AnnAssign):
            annotations = [node.annotation]
        for annotation in annotations:
            if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(annotation)):
                yield getattr(node, "lineno", 0)


@pytest.mark.parametrize("path", _module_python_files(), ids=lambda p: p.name)
def test_module_python_runs_on_slicer_python_39(path):
    source = path.read_text()
    tree = ast.parse(source, feature_version=(3, 9))  # no match statements, no 3.10+ syntax
    if "from __future__ import annotations" not in source:
        assert not list(_runtime_unions(tree)), f"{path.name}: X | Y annotations fail on Python 3.9"


def test_logic_package_imports_without_torch_or_tedm_core():
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    code = (
        f"import sys; sys.path.insert(0, {str(MODULE)!r}); import TEDMSlicerLib; "
        "bad = [m for m in ('torch', 'tedm_core', 'qt', 'ctk') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_dependency_installation_order_and_skip_list(tmp_path):
    from TEDMSlicerLib import dependencies

    calls = []

    class RecordingInstaller:
        def install_torch(self, requirement):
            calls.append(("torch", requirement))

        def install_requirements(self, requirements, never_replace):
            calls.append(("requirements", list(requirements), list(never_replace)))

        def install_without_dependencies(self, target):
            calls.append(("no-deps", target))

    plan = dependencies.DependencyPlan(True, ["monai>=1.4"], tmp_path)
    text = plan.describe()
    assert "torch" in text and "monai>=1.4" in text and str(tmp_path) in text and "will not be replaced" in text
    dependencies.install_dependencies(plan, RecordingInstaller())
    assert calls == [
        ("torch", dependencies.TORCH_REQUIREMENT),
        ("requirements", ["monai>=1.4"], dependencies.SLICER_PROVIDED),
        ("no-deps", str(tmp_path)),
    ]
    assert set(dependencies.SLICER_PROVIDED) == {"torch", "numpy", "SimpleITK", "vtk"}
    # From this checkout, tedm_core's source tree is found next to the module.
    assert dependencies.tedm_core_source(MODULE) == REPO
    with pytest.raises(RuntimeError, match="tedm_core"):
        dependencies.install_dependencies(
            dependencies.DependencyPlan(False, [], None, tedm_core_unavailable=True), RecordingInstaller()
        )


def test_slicer_installer_prefers_pip_ensure_with_skip_list():
    from types import SimpleNamespace

    from TEDMSlicerLib import dependencies

    seen = {}

    def pip_ensure(requirements, skip_packages=None, prompt_install=True, requester=None):
        seen.update(
            requirements=[str(r) for r in requirements], skip=skip_packages, prompt=prompt_install, requester=requester
        )

    fake_slicer = SimpleNamespace(
        pydeps=SimpleNamespace(pip_ensure=pip_ensure),
        util=SimpleNamespace(pip_install=lambda *a, **k: seen.setdefault("pip_install", a)),
    )
    dependencies.SlicerPackageInstaller(fake_slicer).install_requirements(["monai>=1.4"], dependencies.SLICER_PROVIDED)
    assert seen == {
        "requirements": ["monai>=1.4"],
        "skip": dependencies.SLICER_PROVIDED,
        "prompt": False,
        "requester": "TEDMSlicer",
    }

    # Older Slicer: pip_install with a constraints file (pins Slicer's packages pip knows about).
    installs = []
    old_slicer = SimpleNamespace(util=SimpleNamespace(pip_install=lambda arguments: installs.append(arguments)))
    installer = dependencies.SlicerPackageInstaller(old_slicer)
    installer._pip_ensure = lambda: None
    installer.install_requirements(["monai>=1.4"], dependencies.SLICER_PROVIDED)
    assert len(installs) == 1 and '"monai>=1.4"' in installs[0] and " -c " in installs[0]
