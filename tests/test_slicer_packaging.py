"""TEDMSlicer's packaging, read as Slicer will: the CMake lists every file, the .ui matches the
parameter node and the widget, the dependency list follows pyproject.toml, and the module's
Python is valid for Slicer's Python 3.9 (Slicer <= 5.8) as well as 3.12. No Slicer needed."""

from __future__ import annotations

import ast
import os
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
        "workerPythonPathLineEdit",
        "workerEndpointLineEdit",
        "workerTokenFilePathLineEdit",
        "restartWorkerButton",
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


def test_logic_imports_without_torch_or_qt():
    """Slicer's process never imports torch: the module's logic, its worker settings and the
    worker client (when present) import with numpy and the standard library only."""
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    code = (
        f"import sys; sys.path.insert(0, {str(MODULE)!r}); import TEDMSlicerLib; "
        "from TEDMSlicerLib import logic, mrml_io, worker_client, dependencies, terminology; "
        "import importlib.util; "
        "client = importlib.util.find_spec('tedm_core.serve') and importlib.import_module('tedm_core.serve.client'); "
        "bad = [m for m in ('torch', 'monai', 'qt', 'ctk', 'PyQt5') if m in sys.modules]; "
        "assert not bad, bad; print('client' if client else 'no-client')"
    )
    code = code.replace("import importlib.util;", "import importlib, importlib.util;")
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True, text=True)
    assert out.stdout.strip() in ("client", "no-client")


def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text())


def test_no_thread_and_no_torch_in_the_module():
    """The model runs in the worker process: no Python thread runs it, nothing imports torch
    (the self-test included: it makes its backbone in the worker)."""
    for path in _module_python_files():
        for node in ast.walk(_tree(path)):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in ("torch", "threading", "monai"), f"{path.name} imports {name}"
    assert not (MODULE / "TEDMSlicerLib" / "tasks.py").exists()


def _class_methods(name: str):
    for node in _tree(MODULE / "TEDMSlicer.py").body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return {item.name: item for item in node.body if isinstance(item, ast.FunctionDef)}
    raise AssertionError(f"no class {name}")


def test_widget_lifecycle_hooks():
    """Cleanup, Reload and application exit stop the worker; Reload re-imports TEDMSlicerLib."""
    methods = _class_methods("TEDMSlicerWidget")
    source = (MODULE / "TEDMSlicer.py").read_text()
    for hook in ("cleanup", "onReload", "onApplicationAboutToQuit", "onSceneStartClose", "onNodeRemoved"):
        assert hook in methods, hook
    assert "shutdown()" in ast.unparse(methods["cleanup"]) and "shutdown()" in ast.unparse(
        methods["onApplicationAboutToQuit"]
    )
    reload_source = ast.unparse(methods["onReload"])
    assert "sys.modules" in reload_source and "TEDMSlicerLib" in reload_source and "cleanup" in reload_source
    assert '"aboutToQuit()"' in source
    assert "on_scene_closed()" in ast.unparse(methods["onSceneStartClose"])
    # The worker is polled by a QTimer with a non-blocking read.
    assert "self.logic.worker.poll(max_seconds=0.02, wait_seconds=0.0)" in ast.unparse(methods["_pollWorker"])


def test_self_test_never_installs():
    test_methods = _class_methods("TEDMSlicerTest")
    text = "\n".join(ast.unparse(m) for m in test_methods.values())
    for forbidden in ("ensureDependencies", "install_dependencies", "pip_install", "installTorch"):
        assert forbidden not in text
    assert "skipped" in text


def test_widget_defaults_come_from_tedm_core_choices():
    from tedm_core import choices

    tree = _tree(MODULE / "TEDMSlicer.py")
    defaults = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "TEDMSlicerParameterNode":
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and item.value is not None:
                    defaults[item.target.id] = ast.unparse(item.value)
    assert defaults["refineSteps"] == "DEFAULT_REFINE_STEPS" and choices.DEFAULT_REFINE_STEPS == 120
    assert defaults["fitSteps"] == "DEFAULT_HEAD_STEPS"
    from TEDMSlicerLib import logic

    assert set(logic.DEVICE_CHOICES) == set(choices.DEVICES)
    assert set(logic.METHOD_CHOICES) == set(choices.HEAD_METHODS)
    assert set(logic.AXIS_CHOICES) == {choices.AUTO, *choices.AXES}


def test_dependency_plan_upgrade_decline_and_other_workers(monkeypatch):
    from TEDMSlicerLib import dependencies

    calls = []

    class RecordingInstaller:
        def install_torch(self, requirement):
            calls.append(("torch", requirement))

        def install_requirements(self, requirements, never_replace):
            calls.append(("requirements", list(requirements), list(never_replace)))

    plan = dependencies.DependencyPlan(True, ["monai>=1.4"])
    text = plan.describe()
    assert "torch" in text and "monai>=1.4" in text and "will not be replaced" in text
    dependencies.install_dependencies(plan, RecordingInstaller())
    assert calls == [
        ("torch", dependencies.TORCH_REQUIREMENT),
        ("requirements", ["monai>=1.4"], dependencies.SLICER_PROVIDED),
    ]
    assert set(dependencies.SLICER_PROVIDED) == {"torch", "numpy", "SimpleITK", "vtk"}

    # An installed torch older than the module needs: upgraded after the confirmation says so...
    calls.clear()
    old = dependencies.DependencyPlan(False, [], torch_installed_version="1.13.1")
    assert old.torch_outdated and not old.nothing_to_do
    assert "1.13.1" in old.describe() and "UPGRADED" in old.describe()
    dependencies.install_dependencies(old, RecordingInstaller())
    assert calls == [("torch", dependencies.TORCH_REQUIREMENT)]
    # ... or a clear message says why not.
    blocked = dependencies.DependencyPlan(False, [], torch_installed_version="1.13.1", pytorch_extension_missing=True)
    assert "1.13.1 is too old" in blocked.why_not() and "PyTorch" in blocked.why_not()
    with pytest.raises(RuntimeError, match="too old"):
        dependencies.install_dependencies(blocked, RecordingInstaller())
    assert (
        "cannot run" in dependencies.DECLINED_CONSEQUENCE and "Advanced > Worker" in dependencies.DECLINED_CONSEQUENCE
    )

    # The plan reads versions without importing torch; an old one is reported as outdated.
    monkeypatch.setattr(dependencies, "_distribution_version", lambda name: "1.13.1" if name == "torch" else "99")
    monkeypatch.setattr(dependencies, "requirement_satisfied", lambda r: not r.startswith("torch"))
    plan = dependencies.plan_dependencies(worker_in_slicer_python=True)
    assert plan.torch_installed_version == "1.13.1" and not plan.torch_missing
    # A worker in another Python, or a remote one, needs nothing installed into Slicer.
    assert dependencies.plan_dependencies(worker_in_slicer_python=False).nothing_to_do


def test_worker_settings_round_trip_and_environment(tmp_path):
    from TEDMSlicerLib import worker_client

    class Store(dict):
        def value(self, key, default=None):
            return self.get(key, default)

        def setValue(self, key, value):
            self[key] = value

    store = Store()
    assert worker_client.WorkerSettings.load(store) == worker_client.WorkerSettings()
    assert worker_client.WorkerSettings().runs_in_slicer_python()
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    settings = worker_client.WorkerSettings(python="", endpoint="gpu-box:8765", token_file=str(token))
    settings.save(store)
    assert store[worker_client.SETTINGS_ENDPOINT] == "gpu-box:8765"
    assert "s3cret" not in repr(dict(store)), "the token itself is never saved"
    loaded = worker_client.WorkerSettings.load(store)
    assert loaded == settings and loaded.remote and not loaded.runs_in_slicer_python()
    assert worker_client.read_token(loaded.token_file) == "s3cret"
    assert worker_client.known_problems(loaded) == []
    bad = worker_client.WorkerSettings(endpoint="nohost", token_file=str(tmp_path / "missing"))
    problems = worker_client.known_problems(bad)
    assert any("host:port" in p for p in problems) and any("not found" in p for p in problems)
    other = worker_client.WorkerSettings(python=str(tmp_path / "conda" / "bin" / "python"))
    assert not other.runs_in_slicer_python() and "not found" in worker_client.known_problems(other)[0]
    # A worker in Slicer's Python finds the same tedm_core as Slicer's process.
    env = worker_client.worker_environment(worker_client.WorkerSettings())
    assert env["PYTHONPATH"].split(os.pathsep)[0] == worker_client.tedm_core_search_path()


def test_a_worker_in_another_python_gets_no_slicer_python_settings(tmp_path, monkeypatch):
    """Slicer's launcher sets PYTHONHOME, PYTHONPATH and PYTHONNOUSERSITE for its own Python; a
    worker in another Python (a conda environment with a CUDA torch) started with them loads
    Slicer's standard library and stops at once when its version differs. A real interpreter
    started with such an environment (its PYTHONHOME a folder without a standard library) runs."""
    import subprocess

    from TEDMSlicerLib import worker_client

    slicer_home = tmp_path / "Slicer" / "lib" / "Python"
    slicer_home.mkdir(parents=True)
    monkeypatch.setenv("PYTHONHOME", str(slicer_home))
    monkeypatch.setenv("PYTHONPATH", str(slicer_home / "lib" / "python3.9"))
    monkeypatch.setenv("PYTHONNOUSERSITE", "1")
    other = worker_client.WorkerSettings(python=sys.executable + "-elsewhere")
    assert not other.runs_in_slicer_python()
    env = worker_client.worker_environment(other)
    assert not set(worker_client.SLICER_PYTHON_VARIABLES) & set(env)
    assert env["PATH"] == os.environ["PATH"]
    assert subprocess.run([sys.executable, "-c", "import encodings"], env=env).returncode == 0
    broken = subprocess.run([sys.executable, "-c", "import encodings"], env=dict(os.environ), capture_output=True)
    assert broken.returncode != 0, "the stand-in PYTHONHOME does break an interpreter"


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


REPOSITORY = "tedm-project/tedm"  # where the extension's metadata says the repository is published


def _github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_metadata_and_readme_urls_point_into_this_repository():
    """Every URL of the extension's metadata and of the README resolves to a file in this
    repository (or a heading of its README): an icon or a screenshot the Extensions Catalog
    shows must be committed, never a placeholder."""
    cmake = (REPO / "CMakeLists.txt").read_text()
    readme = (REPO / "README.md").read_text()
    anchors = {_github_anchor(h) for h in re.findall(r"^#+ (.+)$", readme, flags=re.M)}
    urls = re.findall(r"https?://[^\s\"')>\]]+", cmake + "\n" + readme)
    assert urls, "the metadata has URLs"
    for url in urls:
        raw = re.match(rf"https://raw\.githubusercontent\.com/{REPOSITORY}/main/(.+)$", url)
        blob = re.match(rf"https://github\.com/{REPOSITORY}/blob/main/([^#]+)", url)
        home = re.match(rf"https://github\.com/{REPOSITORY}(?:#(.+))?$", url)
        if raw or blob:
            path = (raw or blob).group(1)
            assert (REPO / path).is_file(), f"{url}: {path} is not in the repository"
        elif home:
            assert home.group(1) is None or home.group(1) in anchors, f"{url}: no such README heading"
        else:
            raise AssertionError(f"{url} is not a page of this repository")
    # Images the README shows are committed too.
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme):
        assert (REPO / image).is_file(), image
    for variable in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        (value,) = re.findall(rf'set\({variable} "([^"]+)"\)', cmake)
        for url in value.split():
            assert url.endswith(".png") and url.startswith(f"https://raw.githubusercontent.com/{REPOSITORY}/main/")


def test_screenshot_is_a_real_rendering():
    import numpy as np
    from PIL import Image

    path = REPO / "docs" / "images" / "TEDMSlicer-screenshot.png"
    assert path.stat().st_size < 1_000_000, "a screenshot of a few hundred KB"
    image = Image.open(path)
    assert image.format == "PNG" and image.size[0] >= 800
    assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 200, (
        "a rendering, not a placeholder"
    )


def test_license_is_apache_2():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"]["text"] == "Apache-2.0"
