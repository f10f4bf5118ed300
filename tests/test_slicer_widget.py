"""TEDMSlicer's widget (``TEDMSlicer/TEDMSlicer.py``) run without the Slicer application.

The widget cannot run in plain pytest as it is: it needs Qt, PythonQt and Slicer's Python
packages that only the application has. So this module imports ``TEDMSlicer.py`` with a few
*fakes* of those, and runs the widget's set-up, its buttons and its lifecycle hooks against the
**real** logic (``TEDMSlicerLib``, not faked), the repository's ``ScriptedWorkerClient`` (the
worker client the logic tests use, ``tests/slicer_helpers.py``) and **real MRML** (``slicer-core``:
a real ``vtkMRMLScene``, volume, segmentation, parameter and slice nodes; scene close and node
removal fire the scene's real events). A stale name, a wrong signature or a wrong attribute in
the widget fails a test here.

What is faked, and why:

- ``qt`` (no Qt here): ``QTimer`` that the tests *tick by hand* (``EventLoop.process``), a
  dict-backed ``QSettings``, ``QFileDialog.getSaveFileName`` returning a path the test chose,
  ``QApplication``'s override cursor (``slicer.util.WaitCursor``), and ``QFile``/``QUiLoader``
  that build the widgets of the real ``Resources/UI/TEDMSlicer.ui``. Each widget knows only the
  properties, signals and methods of its Qt class (a ``QLabel`` has no ``value``, a
  ``QPushButton`` no ``clicked(int)`` signal): a wrong name raises AttributeError.
  Signals call their slots as PythonQt does, dropping arguments the slot does not take. A
  disabled button cannot be pressed (``press`` fails), so button enabling is checked too.
- ``slicer.ScriptedLoadableModule`` (only in the application): base classes reduced to what the
  widget uses (``parent``, ``layout``, ``resourcePath``, the logic's singleton parameter node, a
  real ``vtkMRMLScriptedModuleNode``, made as Slicer's base class makes it).
- ``slicer.parameterNodeWrapper`` (only in the application): typed properties stored in that
  real parameter node (node references, ``Path``, ``str``, ``int``; ``Choice`` and
  ``WithinRange`` validate; the node's ModifiedEvent reaches observers). ``connectGui`` checks
  that every ``SlicerParameterName`` in the .ui names a parameter; values are not mirrored into
  the widgets (the tests set parameters directly, as a user's selection would).
- ``slicer.i18n.tr`` returns its text; ``slicer.app`` only connects ``aboutToQuit()``;
  ``slicer.modules`` is empty (no markups module, so Next uncertain slice uses the
  ``vtkMRMLSliceNode.JumpAllSlices`` fallback on a real slice node).
- The message boxes of ``slicer.util`` (error/warning/info/confirm, status bar) record their
  calls, checked against the real functions' signatures. A modal message box runs Qt's event
  loop, so timers fire while it is open: the fakes do the same (one round of ``EventLoop``).

What this cannot show: the real widgets' look, the real ``parameterNodeWrapper`` binding to the
widgets, PythonQt conversions. ``TEDMSlicerTest`` inside Slicer covers those.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import sys
import types
import typing
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
from conftest import affine_zoo, sphere_volume_array
from slicer_helpers import (
    MODULE_DIR,
    SLICER_TEST_MARKS,
    ScriptedWorkerClient,
    SegmentEditor,
    import_module_lib,
    load_volume_node,
    new_segmentation,
    slicer,
)

pytestmark = SLICER_TEST_MARKS

UI_FILE = MODULE_DIR / "Resources" / "UI" / "TEDMSlicer.ui"


# --------------------------------------------------------------------------------------------
# The event loop: timers ticked by hand
# --------------------------------------------------------------------------------------------
class EventLoop:
    timers: list = []
    depth = 0

    @classmethod
    def process(cls) -> None:
        """One round of Qt's event loop: every active timer fires once."""
        if cls.depth > 3:  # nested message boxes: Qt would recurse too, but not forever
            return
        cls.depth += 1
        try:
            for timer in list(cls.timers):
                if timer.active:
                    timer.fire()
        finally:
            cls.depth -= 1


def _call_slot(slot, args):
    """PythonQt calls a slot with as many of the signal's arguments as it takes."""
    parameters = inspect.signature(slot).parameters.values()
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return slot(*args)
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return slot(*args[: len(positional)])


class FakeQTimer:
    def __init__(self, parent=None) -> None:
        self.interval = 0
        self.active = False
        self._slots = []
        EventLoop.timers.append(self)

    def setInterval(self, msec: int) -> None:
        self.interval = int(msec)

    def start(self, msec: typing.Optional[int] = None) -> None:
        if msec is not None:
            self.interval = int(msec)
        self.active = True

    def stop(self) -> None:
        self.active = False

    def isActive(self) -> bool:
        return self.active

    def connect(self, signal: str, slot) -> None:
        assert signal == "timeout()", f"QTimer has no signal {signal}"
        self._slots.append(slot)

    def fire(self) -> None:
        for slot in list(self._slots):
            _call_slot(slot, ())


class FakeQSettings:
    store: dict = {}

    def value(self, key, defaultValue=None):
        return self.store.get(key, defaultValue)

    def setValue(self, key, value) -> None:
        self.store[key] = value


class FakeQFileDialog:
    next_path = ""
    calls: list = []

    @staticmethod
    def getSaveFileName(parent=None, caption="", directory="", filter="", selectedFilter=None, options=0):
        FakeQFileDialog.calls.append((caption, directory))
        return FakeQFileDialog.next_path


class FakeQApplication:
    cursors: list = []

    @staticmethod
    def setOverrideCursor(cursor) -> None:
        FakeQApplication.cursors.append(cursor)

    @staticmethod
    def restoreOverrideCursor() -> None:
        FakeQApplication.cursors.pop()


class FakeQFile:
    ReadOnly = 1

    def __init__(self, path) -> None:
        self.path = str(path)

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def open(self, mode) -> bool:
        return True


# --------------------------------------------------------------------------------------------
# Widgets of the .ui, each knowing only its Qt class's names
# --------------------------------------------------------------------------------------------
_QWIDGET_PROPERTIES = {"enabled": True, "visible": True, "toolTip": "", "geometry": None, "maximumSize": None}
# class -> (properties with defaults, signals, methods)
WIDGET_API = {
    "qMRMLWidget": ({}, {"mrmlSceneChanged(vtkMRMLScene*)"}, {"setMRMLScene", "mrmlScene"}),
    "QLabel": ({"text": "", "wordWrap": False}, set(), set()),
    "QPushButton": (
        {"text": "", "checkable": False, "checked": False},
        {"clicked()", "clicked(bool)", "toggled(bool)", "pressed()", "released()"},
        {"click"},
    ),
    "QLineEdit": (
        {"text": "", "placeholderText": "", "readOnly": False},
        {"editingFinished()", "textChanged(QString)", "returnPressed()"},
        set(),
    ),
    "ctkPathLineEdit": (
        {"currentPath": "", "filters": None, "settingKey": ""},
        {"currentPathChanged(QString)", "validInputChanged(bool)"},
        {"addCurrentPathToHistory"},
    ),
    "QProgressBar": ({"value": 0, "minimum": 0, "maximum": 100, "textVisible": True}, {"valueChanged(int)"}, set()),
    "QPlainTextEdit": (
        {"plainText": "", "readOnly": False, "maximumBlockCount": 0},
        {"textChanged()"},
        {"appendPlainText", "clear", "setPlainText"},
    ),
    "QComboBox": ({"currentText": "", "currentIndex": -1}, {"currentTextChanged(QString)"}, set()),
    "QSpinBox": ({"value": 0, "minimum": 0, "maximum": 99}, {"valueChanged(int)"}, set()),
    "qMRMLNodeComboBox": (
        {
            "nodeTypes": None,
            "noneEnabled": False,
            "addEnabled": True,
            "removeEnabled": True,
            "renameEnabled": False,
            "noneDisplay": "",
            "showChildNodeTypes": True,
        },
        {"currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)"},
        {"setMRMLScene", "mrmlScene", "currentNode", "setCurrentNode"},
    ),
    "ctkCollapsibleButton": ({"text": "", "collapsed": False}, {"contentsCollapsed(bool)"}, set()),
    "ctkCollapsibleGroupBox": ({"title": "", "collapsed": False}, set(), set()),
    "QGroupBox": ({"title": ""}, set(), set()),
}


class FakeWidget:
    """A widget of the .ui: its class's properties, signals and methods, nothing else."""

    def __init__(self, class_name: str, name: str) -> None:
        assert class_name in WIDGET_API, f"the fake does not know the widget class {class_name}"
        properties, signals, methods = WIDGET_API[class_name]
        state = self.__dict__
        state["_class"] = class_name
        state["name"] = name  # PythonQt: objectName
        state["_properties"] = dict(_QWIDGET_PROPERTIES, **properties)
        state["_signals"] = signals
        state["_methods"] = methods
        state["_dynamic"] = {}
        state["_children"] = []
        state["_slots"] = {}
        state["_scene"] = None
        state["_current"] = None
        state["history"] = []  # ctkPathLineEdit: paths added to the recent list
        state["receivers"] = []  # (signal, receiver, slot) from the .ui's connections

    # QObject / QWidget
    def children(self):
        return list(self._children)

    def className(self) -> str:
        return self._class

    def isWidgetType(self) -> bool:
        return True

    def property(self, name: str):
        return self._dynamic.get(name, self._properties.get(name))

    def setProperty(self, name: str, value) -> None:
        self._dynamic[name] = value

    def connect(self, signal: str, slot) -> bool:
        if signal not in self._signals:
            raise AttributeError(f"{self._class} {self.name!r} has no signal {signal}")
        self._slots.setdefault(signal, []).append(slot)
        return True

    def disconnect(self, signal: str, slot) -> bool:
        self._slots.get(signal, []).remove(slot)
        return True

    def emit(self, signal: str, *args) -> None:
        assert signal in self._signals, signal
        for slot in list(self._slots.get(signal, [])):
            _call_slot(slot, args)

    def connected(self, signal: str) -> int:
        return len(self._slots.get(signal, []))

    def __getattr__(self, attr: str):
        state = self.__dict__
        if attr in state["_properties"]:
            return state["_properties"][attr]
        if attr in state["_methods"]:
            return getattr(self, "_m_" + attr)
        raise AttributeError(f"{state['_class']} {state['name']!r} has no attribute {attr!r}")

    def __setattr__(self, attr: str, value) -> None:
        if attr in self._properties:
            self._properties[attr] = value
            return
        raise AttributeError(f"{self._class} {self.name!r} has no property {attr!r}")

    # Methods of particular classes (reached through __getattr__ only for those classes)
    def _m_click(self) -> None:
        if self.enabled:
            self.emit("clicked(bool)", self.checked)
            self.emit("clicked()")

    def _m_appendPlainText(self, text: str) -> None:
        self._properties["plainText"] += ("\n" if self._properties["plainText"] else "") + str(text)

    def _m_clear(self) -> None:
        self._properties["plainText"] = ""

    def _m_setPlainText(self, text: str) -> None:
        self._properties["plainText"] = str(text)

    def _m_addCurrentPathToHistory(self) -> None:
        self.history.append(self.currentPath)

    def _m_setMRMLScene(self, scene) -> None:
        self.__dict__["_scene"] = scene
        for signal, receiver, slot in self.receivers:
            if signal == "mrmlSceneChanged(vtkMRMLScene*)":
                getattr(receiver, slot.split("(")[0])(scene)

    def _m_mrmlScene(self):
        return self._scene

    def _m_currentNode(self):
        return self._current

    def _m_setCurrentNode(self, node) -> None:
        self.__dict__["_current"] = node


def _property_value(element):
    for child in element:
        if child.tag in ("string", "cstring", "enum", "set"):
            return child.text or ""
        if child.tag == "bool":
            return child.text == "true"
        if child.tag == "number":
            return int(child.text)
        if child.tag == "stringlist":
            return [item.text for item in child]
    return None


def _build_widget(element) -> FakeWidget:
    widget = FakeWidget(element.get("class"), element.get("name"))
    for prop in element.findall("property"):
        value = _property_value(prop)
        if prop.get("stdset") == "0":
            widget.setProperty(prop.get("name"), value)
        elif prop.get("name") in widget._properties:
            widget._properties[prop.get("name")] = value
        else:
            raise AssertionError(f"{widget._class} {widget.name}: property {prop.get('name')} unknown to the fake")

    def child_widgets(node):
        for child in node:
            if child.tag == "widget":
                yield child
            elif child.tag in ("layout", "item"):
                yield from child_widgets(child)

    widget._children.extend(_build_widget(child) for child in child_widgets(element))
    return widget


class FakeQUiLoader:
    def load(self, qfile):
        tree = ElementTree.parse(qfile.path)
        top = _build_widget(tree.getroot().find("widget"))
        by_name = {w.name: w for w in slicer.util.findChildren(top)}
        for connection in tree.getroot().iter("connection"):
            sender = by_name[connection.find("sender").text]
            receiver = by_name[connection.find("receiver").text]
            slot = connection.find("slot").text
            assert slot.split("(")[0] in receiver._methods, f"{receiver.name} has no slot {slot}"
            sender.receivers.append((connection.find("signal").text, receiver, slot))
        return top


# --------------------------------------------------------------------------------------------
# slicer.ScriptedLoadableModule, slicer.parameterNodeWrapper, slicer.app
# --------------------------------------------------------------------------------------------
class FakeModulePanel:
    """The module panel Slicer gives the widget (qSlicerScriptedLoadableModuleWidget)."""

    def __init__(self) -> None:
        self.isEntered = True
        self.added = []

    def layout(self):
        return types.SimpleNamespace(addWidget=self.added.append)


class ScriptedLoadableModule:
    def __init__(self, parent) -> None:
        self.parent = parent


class ScriptedLoadableModuleWidget:
    reloaded: list = []

    def __init__(self, parent=None) -> None:
        assert parent is not None, "the tests always give the module panel"
        self.parent = parent
        self.moduleName = type(self).__name__[: -len("Widget")]
        self.layout = self.parent.layout()

    def resourcePath(self, filename: str) -> str:
        return os.path.join(os.path.dirname(sys.modules[type(self).__module__].__file__), "Resources", filename)

    def setup(self) -> None:
        pass

    def cleanup(self) -> None:
        pass

    def enter(self) -> None:
        pass

    def exit(self) -> None:
        pass

    def onReload(self) -> None:
        ScriptedLoadableModuleWidget.reloaded.append(self.moduleName)


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None) -> None:
        self.moduleName = type(self).__name__[: -len("Logic")]
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        # As Slicer's base class: one singleton vtkMRMLScriptedModuleNode per module and scene.
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node = scene.AddNode(node)
        return node


class ScriptedLoadableModuleTest:
    pass


class Choice:
    def __init__(self, choices) -> None:
        self.choices = list(choices)

    def validate(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"{value!r} is not one of {self.choices}")


class WithinRange:
    def __init__(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{value!r} is not within [{self.minimum}, {self.maximum}]")


GUI_CONNECTIONS: dict = {}  # tag -> parameters bound, while connected


def parameterNodeWrapper(classtype):
    hints = typing.get_type_hints(classtype, include_extras=True)
    parameters = {}
    for name, hint in hints.items():
        validators = []
        if typing.get_origin(hint) is typing.Annotated:
            hint, *validators = typing.get_args(hint)
        options = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
        node_types = tuple(t for t in options if isinstance(t, type) and issubclass(t, slicer.vtkMRMLNode))
        if node_types:
            default = None
        else:
            default = getattr(classtype, name) if hasattr(classtype, name) else {str: "", int: 0, Path: Path()}[hint]
        parameters[name] = (hint, node_types, validators, default)

    def make_property(name):
        hint, node_types, validators, _default = parameters[name]

        def read(self):
            if node_types:
                return self.parameterNode.GetNodeReference(name)
            text = self.parameterNode.GetParameter(name)
            return hint(text)

        def write(self, value):
            if node_types:
                if value is not None and not isinstance(value, node_types):
                    raise TypeError(f"{name}: {type(value).__name__} is not one of {node_types}")
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
                return
            if not isinstance(value, hint):
                raise TypeError(f"{name}: expected {hint.__name__}, got {type(value).__name__}")
            for validator in validators:
                validator.validate(value)
            self.parameterNode.SetParameter(name, str(value))

        return property(read, write)

    for name in parameters:
        setattr(classtype, name, make_property(name))

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        for name, (_hint, node_types, _validators, default) in parameters.items():
            if not node_types and not parameterNode.HasParameter(name):
                setattr(self, name, default)

    def connectGui(self, gui):
        bound = {}
        for widget in vars(gui).values():
            name = widget.property("SlicerParameterName")
            if name:
                if name not in parameters:
                    raise ValueError(f"the .ui binds {widget.name} to {name!r}, which is no parameter")
                bound[name] = widget
        tag = object()
        GUI_CONNECTIONS[tag] = bound
        return tag

    def disconnectGui(self, tag):
        GUI_CONNECTIONS.pop(tag, None)

    classtype.allParameters = parameters
    classtype.__init__ = __init__
    classtype.connectGui = connectGui
    classtype.disconnectGui = disconnectGui
    classtype.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(
        event, callback, priority
    )
    classtype.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
    classtype.Modified = lambda self: self.parameterNode.Modified()
    return classtype


class FakeApp:
    def __init__(self) -> None:
        self.slots = {}

    def connect(self, signal: str, slot) -> bool:
        assert signal == "aboutToQuit()", signal
        self.slots.setdefault(signal, []).append(slot)
        return True

    def disconnect(self, signal: str, slot) -> bool:
        self.slots[signal].remove(slot)
        return True

    def emit(self, signal: str) -> None:
        for slot in list(self.slots.get(signal, [])):
            _call_slot(slot, ())

    def processEvents(self) -> None:
        EventLoop.process()


class Dialogs:
    """slicer.util's message boxes and status bar: recorded; a modal box runs the event loop."""

    def __init__(self) -> None:
        self.shown = []  # (kind, text, keyword arguments)
        self.status = []
        self.confirm = True

    def _fake(self, kind, answer=None):
        real = inspect.signature(getattr(slicer.util, kind))

        def show(*args, **kwargs):
            bound = real.bind(*args, **kwargs)  # a wrong keyword fails as in Slicer
            arguments = dict(bound.arguments)
            self.shown.append((kind, arguments.pop("text"), arguments))
            EventLoop.process()  # the box is modal: Qt's event loop runs (and fires timers) meanwhile
            return answer() if answer else None

        return show

    def install(self, monkeypatch) -> None:
        for kind in ("errorDisplay", "warningDisplay", "infoDisplay"):
            monkeypatch.setattr(slicer.util, kind, self._fake(kind))
        monkeypatch.setattr(
            slicer.util, "confirmOkCancelDisplay", self._fake("confirmOkCancelDisplay", lambda: self.confirm)
        )
        status_signature = inspect.signature(slicer.util.showStatusMessage)

        def show_status(*args, **kwargs):
            self.status.append(status_signature.bind(*args, **kwargs).arguments["message"])

        monkeypatch.setattr(slicer.util, "showStatusMessage", show_status)
        monkeypatch.setattr(slicer.util, "mainWindow", lambda: None)

    def kinds(self):
        return [kind for kind, _, _ in self.shown]


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def module():
    """TEDMSlicer.py imported as Slicer imports it, with the fakes above."""
    import_module_lib()
    fake_qt = types.ModuleType("qt")
    fake_qt.QTimer, fake_qt.QSettings, fake_qt.QFileDialog = FakeQTimer, FakeQSettings, FakeQFileDialog
    fake_qt.QFile, fake_qt.QUiLoader = FakeQFile, FakeQUiLoader
    fake_qt.QApplication, fake_qt.Qt = FakeQApplication, types.SimpleNamespace(WaitCursor="WaitCursor")
    fake_slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (
        ScriptedLoadableModule,
        ScriptedLoadableModuleWidget,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
    ):
        setattr(fake_slm, cls.__name__, cls)
    fake_pnw = types.ModuleType("slicer.parameterNodeWrapper")
    fake_pnw.parameterNodeWrapper, fake_pnw.Choice, fake_pnw.WithinRange = parameterNodeWrapper, Choice, WithinRange
    fake_i18n = types.ModuleType("slicer.i18n")
    fake_i18n.tr = lambda text: text
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "qt", fake_qt)
        patch.setitem(sys.modules, "slicer.ScriptedLoadableModule", fake_slm)
        patch.setitem(sys.modules, "slicer.parameterNodeWrapper", fake_pnw)
        patch.setitem(sys.modules, "slicer.i18n", fake_i18n)
        spec = importlib.util.spec_from_file_location("TEDMSlicer", MODULE_DIR / "TEDMSlicer.py")
        loaded = importlib.util.module_from_spec(spec)
        patch.setitem(sys.modules, "TEDMSlicer", loaded)
        spec.loader.exec_module(loaded)
        yield loaded


class Harness:
    """One module panel: a real scene, the widget, the real logic and scripted worker clients."""

    def __init__(self, module, tmp_path, monkeypatch, caplog) -> None:
        self.module = module
        self.lib = import_module_lib()
        self.caplog = caplog
        self.scene = slicer.vtkMRMLScene()
        self.app = FakeApp()
        self.dialogs = Dialogs()
        monkeypatch.setattr(slicer, "mrmlScene", self.scene, raising=False)
        monkeypatch.setattr(slicer, "app", self.app, raising=False)
        monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(), raising=False)
        self.dialogs.install(monkeypatch)
        monkeypatch.setattr(EventLoop, "timers", [])
        monkeypatch.setattr(FakeQSettings, "store", {})
        monkeypatch.setattr(FakeQFileDialog, "calls", [])
        monkeypatch.setattr(ScriptedLoadableModuleWidget, "reloaded", [])
        GUI_CONNECTIONS.clear()
        # A worker in "another Python" (the scripted client): nothing to install in this one.
        python = tmp_path / "worker-python"
        python.write_text("")
        FakeQSettings.store["TEDMSlicer/WorkerPython"] = str(python)
        self.clients = []
        self.job_polls = 2

        def new_client():
            client = ScriptedWorkerClient(job_polls=self.job_polls)
            self.clients.append(client)
            return client

        self.worker = self.lib.TEDMWorkerLogic(new_client)
        self.installer = RecordingInstaller()
        self.volume, self.array = self._volume(tmp_path)  # loaded before the module is opened
        self.panel = FakeModulePanel()
        self.widget = module.TEDMSlicerWidget(
            self.panel, logic=module.TEDMSlicerLogic(worker=self.worker, installer=self.installer)
        )
        self.widget.setup()
        self.widget.enter()
        self.ui = self.widget.ui
        self.timer = self.widget._pollTimer
        self.params = self.widget._parameterNode

    def _volume(self, tmp_path):
        import nibabel as nib

        affine = affine_zoo()["oblique"]
        centre = (affine @ np.array([12.0, 10.0, 6.0, 1.0]))[:3]
        array = sphere_volume_array((12, 20, 24), affine, centre, 5.0).astype(np.int16)
        path = tmp_path / "sphere.nii.gz"
        nib.save(nib.Nifti1Image(array.T, affine), path)
        return load_volume_node(self.scene, path, "sphere"), array

    @property
    def client(self):
        return self.clients[-1]

    def press(self, button) -> None:
        assert button.enabled, f"{button.name} is disabled: a user cannot press it"
        button.click()

    def tick(self, times: int = 1) -> None:
        for _ in range(times):
            EventLoop.process()

    def settle(self, ticks: int = 100) -> None:
        """Tick until the timer stops (nothing left to read)."""
        for _ in range(ticks):
            if not self.timer.isActive():
                return
            self.tick()
        raise AssertionError("the poll timer never stopped")

    def segmentations(self):
        return [
            self.scene.GetNthNodeByClass(n, "vtkMRMLSegmentationNode")
            for n in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))
        ]

    def log(self) -> str:
        return self.ui.logTextEdit.plainText

    def segment(self) -> None:
        self.params.modelPath = Path("/models/brain")
        self.press(self.ui.segmentButton)
        self.settle()


class RecordingInstaller:
    """The logic's injectable PackageInstaller (in Slicer: pip through slicer.pydeps / slicer.util)."""

    def __init__(self) -> None:
        self.calls = []

    def install_torch(self, requirement: str) -> None:
        self.calls.append(("torch", requirement))

    def install_requirements(self, requirements, never_replace) -> None:
        self.calls.append(("requirements", list(requirements), list(never_replace)))


@pytest.fixture
def gui(module, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    harness = Harness(module, tmp_path, monkeypatch, caplog)
    try:
        yield harness
    finally:
        harness.widget.cleanup()  # no observer left on the scene, whatever the test did
    # The timer's handler logs (and hides) any exception of the widget's own code: none allowed.
    errors = [
        r.getMessage() for phase in ("setup", "call") for r in caplog.get_records(phase) if r.levelno >= logging.ERROR
    ]
    assert not errors, errors


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------
def test_setup_builds_the_panel_and_binds_the_parameter_node(gui):
    ui = gui.ui
    assert len(gui.panel.added) == 1
    for button in ("segmentButton", "fitButton", "refineButton", "nextUncertainButton", "saveModelButton"):
        assert getattr(ui, button).connected("clicked(bool)") == 1, button
    assert ui.cancelButton.connected("clicked(bool)") == 1 and ui.restartWorkerButton.connected("clicked(bool)") == 1
    # Every node selector got the scene through the .ui's connections.
    for selector in ("inputVolumeSelector", "channel2Selector", "outputSegmentationSelector"):
        assert getattr(ui, selector).mrmlScene() is gui.scene
    # One GUI connection (setup, then enter: the first is dropped), binding every parameter.
    (bound,) = GUI_CONNECTIONS.values()
    assert set(bound) == set(gui.module.TEDMSlicerParameterNode.allParameters)
    # The first scalar volume is chosen; without a model folder Segment stays disabled.
    assert gui.params.inputVolume is gui.volume
    assert not ui.segmentButton.enabled and "model folder" in ui.segmentButton.toolTip
    gui.params.modelPath = Path("/models/brain")
    assert ui.segmentButton.enabled, "the parameter node's ModifiedEvent updates the buttons"
    assert not ui.refineButton.enabled and not ui.saveModelButton.enabled and not ui.cancelButton.enabled
    assert not ui.progressBar.visible and not gui.timer.isActive() and gui.timer.interval == 50
    assert ui.workerStatusLabel.text.startswith("Next start: a worker process in ")
    assert gui.app.slots["aboutToQuit()"] == [gui.widget.onApplicationAboutToQuit]
    assert gui.clients == [], "no worker is started before a button is pressed"


def test_worker_settings_are_saved_and_checked(gui, tmp_path):
    ui = gui.ui
    ui.workerEndpointLineEdit.text = "gpu-box:8765"
    ui.workerEndpointLineEdit.emit("editingFinished()")
    assert FakeQSettings.store["TEDMSlicer/WorkerEndpoint"] == "gpu-box:8765"
    assert ui.workerStatusLabel.text.startswith("Settings problem: ") and "token" in ui.workerStatusLabel.text
    token = tmp_path / "token"
    token.write_text("secret")
    ui.workerTokenFilePathLineEdit.currentPath = str(token)
    ui.workerTokenFilePathLineEdit.emit("currentPathChanged(QString)", str(token))
    assert ui.workerStatusLabel.text == "Next start: the remote worker at gpu-box:8765."
    assert FakeQSettings.store["TEDMSlicer/WorkerTokenFile"] == str(token)


# --------------------------------------------------------------------------------------------
# Segment, Refine, Next uncertain slice, Save model
# --------------------------------------------------------------------------------------------
def test_segment_refine_next_uncertain_and_save(gui, tmp_path):
    ui = gui.ui
    gui.params.modelPath = Path("/models/brain")
    gui.press(ui.segmentButton)
    assert gui.worker.busy and gui.timer.isActive()
    assert ui.progressBar.visible and ui.cancelButton.enabled and not ui.segmentButton.enabled
    assert not ui.inputsCollapsibleButton.enabled and ui.restartWorkerButton.enabled
    assert ui.statusLabel.text == "Segment: starting"
    assert gui.segmentations() == [], "the output node appears with the result"
    for _ in range(10):  # the scripted worker reports half-way with its result
        gui.tick()
        if ui.progressBar.value:
            break
    assert ui.progressBar.value == 500 and ui.elapsedLabel.text.endswith(" s")
    gui.settle()
    (node,) = gui.segmentations()
    assert gui.params.outputSegmentation is node
    assert ui.statusLabel.text.startswith("Segment done in ")
    assert not ui.progressBar.visible and not ui.cancelButton.enabled and ui.inputsCollapsibleButton.enabled
    assert ui.refineButton.enabled and ui.nextUncertainButton.enabled and ui.saveModelButton.enabled
    assert ui.modelPathLineEdit.history == [ui.modelPathLineEdit.currentPath]
    assert gui.client.ops() == ["open_session", "segment"]
    assert gui.dialogs.shown == []

    # Correct one slice in the Segment Editor, then Refine.
    lib = gui.lib
    (segment_id,) = lib.mrml_io.all_segment_ids(node)
    labels = lib.mrml_io.read_class_labels(node, gui.volume, [segment_id])
    wanted = labels.copy()
    wanted[5] = 0
    SegmentEditor(gui.scene, node, gui.volume).correct([segment_id], labels, wanted, np.ones_like(labels, bool))
    gui.press(ui.refineButton)
    gui.settle()
    assert gui.client.ops()[-1] == "refine"
    assert gui.client.requests[-1][1]["steps"] == gui.params.refineSteps
    assert ui.statusLabel.text.startswith("Refine from corrections done in ")
    assert "Learnt from corrected slices 5." in gui.log()

    # Next uncertain slice: the slice views jump there (a real slice node, Slicer's fallback jump).
    slice_node = slicer.vtkMRMLSliceNode()
    slice_node.SetLayoutName("Red")
    slice_node.SetJumpModeToCentered()
    gui.scene.AddNode(slice_node)
    gui.press(ui.nextUncertainButton)
    gui.settle()
    assert ui.statusLabel.text.startswith("Slice 0: prediction disagreement")
    centre = gui.lib.mrml_io.world_from_ijk(gui.volume, [11.5, 9.5, 0.0])
    slice_to_ras = slice_node.GetSliceToRAS()
    assert np.allclose([slice_to_ras.GetElement(r, 3) for r in range(3)], centre, atol=1e-6)

    # Save model: the chosen folder becomes the model folder.
    FakeQFileDialog.next_path = str(tmp_path / "refined")
    gui.press(ui.saveModelButton)
    gui.settle()
    assert FakeQFileDialog.calls[-1][1] == "/models/brain"
    assert gui.client.requests[-1][0] == "save_model"
    assert gui.client.requests[-1][1]["overwrite"] is False
    assert gui.params.modelPath == tmp_path / "refined"
    assert ui.statusLabel.text == f"Save model: saved to {tmp_path / 'refined'}"
    # Cancelling the file dialog sends nothing.
    FakeQFileDialog.next_path = ""
    sent = len(gui.client.requests)
    gui.press(ui.saveModelButton)
    assert len(gui.client.requests) == sent and not gui.worker.busy


def test_fit_reports_every_segment_it_learns(gui):
    """Fit logs the structures it learns and any segment with nothing painted: the log must keep
    those lines (the widget cleared the log after sending, which erased them)."""
    ui = gui.ui
    node, (tumour, oedema) = new_segmentation(gui.scene, [("tumour", (1, 0, 0)), ("oedema", (0, 1, 0))])
    drawn = np.zeros(gui.array.shape, bool)
    drawn[6] = gui.array[6] > gui.array.mean()
    SegmentEditor(gui.scene, node, gui.volume).add(tumour, drawn)
    gui.params.modelPath = Path("/models/backbone")
    gui.params.outputSegmentation = node
    gui.params.fitSteps = 50
    gui.press(ui.fitButton)
    assert "Fit learns 2 structure(s), one per segment: tumour, oedema." in gui.log()
    assert "Segment(s) oedema have no painted voxel" in gui.log()
    op, fields, _ = gui.client.requests[-1]
    assert op == "open_session"
    gui.settle()
    op, fields, _ = gui.client.requests[1]
    assert op == "fit" and fields["steps"] == 50 and fields["method"] == "tedm" and fields["axis"] == "auto"
    assert ui.statusLabel.text.startswith("Fit from labelled slices done in ")
    assert gui.segmentations() == [node] and gui.params.outputSegmentation is node
    assert "Fit learns 2 structure(s)" in gui.log(), "the next operation clears the log, not this one"


def test_user_errors_are_a_warning_without_a_request(gui):
    node, _ = new_segmentation(gui.scene, [("tumour", (1, 0, 0))])
    gui.params.modelPath = Path("/models/backbone")
    gui.params.outputSegmentation = node
    gui.press(gui.ui.fitButton)
    ((kind, text, arguments),) = gui.dialogs.shown
    assert kind == "warningDisplay" and "nothing is painted" in text and arguments["windowTitle"] == "TEDM Segmentation"
    assert not gui.worker.busy and not gui.timer.isActive() and not gui.ui.cancelButton.enabled


def test_worker_failure_is_an_error_box(gui):
    gui.params.modelPath = Path("/models/brain")
    gui.press(gui.ui.segmentButton)
    gui.client.fail_next["segment"] = ("internal", "CUDA error: device-side assert")
    gui.settle()
    ((kind, text, _),) = gui.dialogs.shown
    assert kind == "errorDisplay" and text == "Segment failed: CUDA error: device-side assert"
    assert gui.segmentations() == [] and not gui.ui.cancelButton.enabled


def test_worker_death_mid_job_with_the_error_box_open(gui):
    """The error box is modal: Qt's event loop (and the poll timer) runs while it is open."""
    gui.params.modelPath = Path("/models/brain")
    gui.press(gui.ui.segmentButton)
    gui.tick()  # open_session answered, the job sent
    gui.press(gui.ui.cancelButton)  # a cancel request is pending beside the job when the worker dies
    gui.client.kill()
    gui.settle()
    assert gui.dialogs.kinds() == ["errorDisplay"]
    assert "The TEDM worker stopped during Segment" in gui.ui.workerStatusLabel.text
    assert gui.segmentations() == [] and not gui.worker.busy
    gui.segment()  # the next request starts a new worker
    assert len(gui.clients) == 2 and len(gui.segmentations()) == 1


# --------------------------------------------------------------------------------------------
# Cancel, restart
# --------------------------------------------------------------------------------------------
def test_cancel_once_then_again_stops_a_hung_worker(gui):
    ui = gui.ui
    gui.params.modelPath = Path("/models/brain")
    gui.press(ui.segmentButton)
    gui.tick()  # the job itself is sent
    gui.client.hang()
    gui.press(ui.cancelButton)
    assert ui.statusLabel.text.startswith("Cancelling at the next slice batch")
    assert gui.worker.busy and gui.client.close_calls == []
    gui.tick(2)
    assert gui.worker.busy, "a hung worker does not answer: only a second press (or 5 s) stops it"
    gui.press(ui.cancelButton)
    assert not gui.worker.busy and gui.client.close_calls == [0.0]
    assert "Cancel was pressed again, so the TEDM worker was stopped" in ui.statusLabel.text
    assert not ui.cancelButton.enabled and not ui.progressBar.visible
    gui.settle()
    assert gui.segmentations() == []
    gui.segment()
    assert len(gui.clients) == 2 and len(gui.segmentations()) == 1


def test_cancel_answered_by_the_worker(gui):
    ui = gui.ui
    gui.job_polls = 5
    gui.params.modelPath = Path("/models/brain")
    gui.press(ui.segmentButton)
    gui.tick()
    gui.press(ui.cancelButton)
    gui.settle()
    assert ui.statusLabel.text.startswith("Segment cancelled after ")
    assert gui.client.close_calls == [] and gui.segmentations() == []


def test_cancel_while_the_result_is_written_says_so(gui):
    """Once the result is being written, Cancel does nothing (half a result would be worse): the
    status line must not promise a cancel that will not happen."""
    ui = gui.ui
    gui.params.modelPath = Path("/models/brain")
    gui.press(ui.segmentButton)
    for _ in range(20):
        gui.tick()
        if gui.worker.running is not None and gui.worker.running.applying:
            break
    assert gui.worker.running.applying
    gui.press(ui.cancelButton)
    assert not gui.worker.running.cancel_requested
    assert "Cancelling" not in ui.statusLabel.text and "being written" in ui.statusLabel.text
    gui.settle()
    assert ui.statusLabel.text.startswith("Segment done in ") and len(gui.segmentations()) == 1


def test_restart_worker_while_busy_ends_the_job_and_describes_the_new_worker(gui):
    ui = gui.ui
    gui.params.modelPath = Path("/models/brain")
    gui.press(ui.segmentButton)
    gui.tick()
    gui.client.hang()
    first = gui.client
    gui.press(ui.restartWorkerButton)
    assert first.closed and not gui.worker.busy
    assert ui.statusLabel.text == "Segment stopped: the worker was restarted; nothing was written."
    assert not ui.cancelButton.enabled and ui.segmentButton.enabled
    assert len(gui.clients) == 2 and gui.client.ops() == ["hello"]
    assert gui.timer.isActive(), "the description is read by the timer"
    gui.settle()
    assert ui.workerStatusLabel.text.startswith("Worker pid ?: tedm_core ?, torch ?")
    assert ui.deviceNoteLabel.text == ui.workerStatusLabel.text
    assert gui.segmentations() == []


def test_restart_worker_when_idle_closes_its_sessions(gui):
    gui.segment()
    first = gui.client
    (session,) = list(first.sessions)
    gui.press(gui.ui.restartWorkerButton)
    assert [(op, fields["session"]) for op, fields, _ in first.requests if op == "close_session"] == [
        ("close_session", session)
    ]
    assert first.closed and not gui.ui.refineButton.enabled, "the new worker does not know the old result"
    gui.settle()
    assert gui.ui.workerStatusLabel.text.startswith("Worker pid")


# --------------------------------------------------------------------------------------------
# Scene and node events, module exit, cleanup, application exit, Reload
# --------------------------------------------------------------------------------------------
def test_scene_closed_while_a_job_runs(gui):
    gui.params.modelPath = Path("/models/brain")
    gui.press(gui.ui.segmentButton)
    gui.tick()
    gui.scene.Clear(0)
    assert gui.widget._parameterNode is not None, "re-made at the end of the close (the module is shown)"
    assert gui.widget._parameterNode.inputVolume is None
    gui.settle()
    assert not gui.worker.busy and gui.segmentations() == []
    assert "the scene was closed" in gui.ui.statusLabel.text
    assert not gui.ui.segmentButton.enabled
    assert "close_session" in gui.client.ops()


def test_scene_closed_when_the_module_is_not_shown(gui):
    gui.segment()
    gui.widget.exit()
    gui.panel.isEntered = False
    gui.scene.Clear(0)
    assert gui.widget._parameterNode is None
    gui.settle()
    assert "close_session" in gui.client.ops() and not gui.client.sessions


def test_segmentation_deleted_while_refining(gui):
    gui.segment()
    (node,) = gui.segmentations()
    gui.press(gui.ui.refineButton)
    gui.scene.RemoveNode(node)
    assert gui.params.outputSegmentation is None
    gui.settle()
    assert "was deleted" in gui.ui.statusLabel.text and gui.segmentations() == []
    assert not gui.ui.refineButton.enabled


def test_module_exit_and_enter(gui, recwarn):
    gui.params.modelPath = Path("/models/brain")
    gui.press(gui.ui.segmentButton)
    gui.widget.exit()
    assert GUI_CONNECTIONS == {}
    gui.settle()  # the job goes on while the user is in another module
    (node,) = gui.segmentations()
    assert gui.widget._parameterNode.outputSegmentation is node
    gui.widget.enter()
    assert len(GUI_CONNECTIONS) == 1 and gui.ui.refineButton.enabled
    assert not [str(w.message) for w in recwarn if "observer" in str(w.message)]


def test_application_exit_and_cleanup_stop_the_worker(gui):
    gui.params.modelPath = Path("/models/brain")
    gui.press(gui.ui.segmentButton)
    gui.tick()
    client = gui.client
    gui.app.emit("aboutToQuit()")
    assert client.closed and not gui.worker.busy
    assert gui.ui.statusLabel.text == "Segment stopped: the TEDM worker was stopped; nothing was written."
    gui.widget.cleanup()
    assert not gui.timer.isActive() and gui.app.slots["aboutToQuit()"] == []
    assert gui.widget.Observations == [], "no scene observer is left behind"
    gui.scene.Clear(0)  # reaches no widget


def test_reload_stops_the_worker_and_reimports_the_library(gui, monkeypatch):
    for name in [n for n in sys.modules if n == "TEDMSlicerLib" or n.startswith("TEDMSlicerLib.")]:
        monkeypatch.setitem(sys.modules, name, sys.modules[name])  # put back after the test
    gui.segment()
    client = gui.client
    gui.widget.onReload()
    assert client.closed and "close_session" in client.ops()
    assert not any(n == "TEDMSlicerLib" or n.startswith("TEDMSlicerLib.") for n in sys.modules)
    assert ScriptedLoadableModuleWidget.reloaded == ["TEDMSlicer"]
    gui.widget.cleanup()  # Slicer's reloadScriptedModule cleans the old widget up again: harmless


def test_module_description(module):
    parent = types.SimpleNamespace()
    module.TEDMSlicer(parent)
    assert parent.title == "TEDM Segmentation" and parent.categories == ["Segmentation"]
    assert parent.dependencies == [] and "Cancel" in parent.helpText


# --------------------------------------------------------------------------------------------
# First use: the dependencies of a worker in Slicer's own Python
# --------------------------------------------------------------------------------------------
def _slicer_python_missing(gui, monkeypatch, missing):
    """The worker is Slicer's own Python, which lacks ``missing`` (the probe of what is installed
    is replaced; the rest of the plan, the dialogs and the installer calls are the module's)."""
    dependencies = gui.lib.dependencies
    gui.ui.workerPythonPathLineEdit.currentPath = ""
    gui.ui.workerPythonPathLineEdit.emit("currentPathChanged(QString)", "")
    assert gui.ui.workerStatusLabel.text == "Next start: a worker process in Slicer's Python."
    monkeypatch.setattr(
        dependencies, "plan_dependencies", lambda in_slicer_python: dependencies.DependencyPlan(False, list(missing))
    )
    gui.params.modelPath = Path("/models/brain")


def test_declining_the_installation_sends_nothing(gui, monkeypatch):
    _slicer_python_missing(gui, monkeypatch, ["monai>=1.3"])
    gui.dialogs.confirm = False
    gui.press(gui.ui.segmentButton)
    assert gui.dialogs.kinds() == ["confirmOkCancelDisplay", "infoDisplay"]
    assert "monai>=1.3" in gui.dialogs.shown[0][1]
    assert gui.dialogs.shown[1][1] == gui.lib.dependencies.DECLINED_CONSEQUENCE
    assert gui.installer.calls == [] and gui.clients == [] and not gui.worker.busy


def test_accepting_the_installation_installs_then_segments(gui, monkeypatch):
    _slicer_python_missing(gui, monkeypatch, ["monai>=1.3"])
    gui.press(gui.ui.segmentButton)
    assert gui.dialogs.kinds() == ["confirmOkCancelDisplay"]
    assert gui.installer.calls[0][:2] == ("requirements", ["monai>=1.3"])
    assert FakeQApplication.cursors == [], "the wait cursor is restored"
    assert gui.worker.busy
    gui.settle()
    assert len(gui.segmentations()) == 1


def test_no_second_installation_starts_while_the_first_runs(gui, monkeypatch):
    """Slicer's pip runner handles GUI events after every line pip prints: the actions are
    disabled while the first-use install runs, and a click that still gets through (queued before)
    starts neither a second confirmation nor a second pip inside the first."""
    _slicer_python_missing(gui, monkeypatch, ["monai>=1.4"])
    calls, enabled = [], []

    def install_requirements(requirements, never_replace):
        calls.append(list(requirements))
        for _ in range(3):  # pip's output lines
            slicer.app.processEvents()
            enabled.append([b.enabled for b in (gui.ui.segmentButton, gui.ui.fitButton, gui.ui.refineButton)])
            if len(calls) == 1:
                gui.ui.segmentButton.click()  # a click queued before the buttons went grey

    gui.installer.install_requirements = install_requirements
    gui.press(gui.ui.segmentButton)
    assert enabled and not any(any(states) for states in enabled), "every action greyed out during the install"
    assert len(calls) == 1 and gui.dialogs.kinds() == ["confirmOkCancelDisplay"]
    gui.settle()
    assert len(gui.segmentations()) == 1 and gui.ui.segmentButton.enabled


def test_a_failed_installation_is_an_error_box(gui, monkeypatch):
    _slicer_python_missing(gui, monkeypatch, ["monai>=1.3"])

    def fail(requirements, never_replace):
        raise RuntimeError("pip: no network")

    gui.installer.install_requirements = fail
    gui.press(gui.ui.segmentButton)
    assert gui.dialogs.kinds() == ["confirmOkCancelDisplay", "errorDisplay"]
    assert "pip: no network" in gui.dialogs.shown[1][1] and not gui.worker.busy
    assert FakeQApplication.cursors == []


def test_worker_settings_problem_stops_before_any_request(gui, tmp_path):
    gui.ui.workerPythonPathLineEdit.currentPath = str(tmp_path / "no-such-python")
    gui.ui.workerPythonPathLineEdit.emit("currentPathChanged(QString)", str(tmp_path / "no-such-python"))
    assert gui.ui.workerStatusLabel.text.startswith("Settings problem: worker Python not found")
    gui.params.modelPath = Path("/models/brain")
    gui.press(gui.ui.segmentButton)
    ((kind, text, _),) = gui.dialogs.shown
    assert kind == "warningDisplay" and "worker Python not found" in text
    gui.press(gui.ui.restartWorkerButton)  # the same check
    assert gui.dialogs.kinds() == ["warningDisplay", "warningDisplay"] and gui.clients == []


def test_the_segment_editor_can_undo_a_result_written_in_place(gui, monkeypatch):
    """Refine writes into the segmentation the Segment Editor is editing: the editor's undo state
    is saved first (the voxels the user left), so that Undo takes the result back whole."""
    import types

    gui.params.modelPath = Path("/models/brain")
    gui.press(gui.ui.segmentButton)
    gui.settle()
    (node,) = gui.segmentations()
    lib = gui.lib
    (segment_id,) = lib.mrml_io.all_segment_ids(node)
    saved = []

    class Editor:  # qMRMLSegmentEditorWidget's two calls
        def segmentationNode(self):
            return node

        def saveStateForUndo(self):
            saved.append(lib.mrml_io.read_class_labels(node, gui.volume, [segment_id]).copy())

    editor_module = types.SimpleNamespace(
        widgetRepresentation=lambda: types.SimpleNamespace(self=lambda: types.SimpleNamespace(editor=Editor())),
    )
    monkeypatch.setattr(slicer.modules, "segmenteditor", editor_module, raising=False)
    labels = lib.mrml_io.read_class_labels(node, gui.volume, [segment_id])
    wanted = labels.copy()
    wanted[5] = 0
    SegmentEditor(gui.scene, node, gui.volume).correct([segment_id], labels, wanted, np.ones_like(labels, bool))
    gui.press(gui.ui.refineButton)
    gui.settle()
    assert gui.ui.statusLabel.text.startswith("Refine from corrections done in ")
    assert len(saved) == 1 and np.array_equal(saved[0], wanted), "saved once, before the result was written"
    # An editor on another segmentation is left alone.
    other, _ = new_segmentation(gui.scene, [("other", (0.0, 1.0, 0.0))])
    Editor.segmentationNode = lambda self: other
    SegmentEditor(gui.scene, node, gui.volume).correct([segment_id], wanted, labels, np.ones_like(labels, bool))
    gui.press(gui.ui.refineButton)
    gui.settle()
    assert len(saved) == 1


def test_an_operation_finished_by_shutdown_opens_no_dialog(gui):
    """Exit, Reload or a worker restart finishing a write (or refusing it): the status line and the
    log say so, no modal dialog pops up while the module goes away."""
    finished = gui.lib.FinishedOperation("segment", "Segment", gui.lib.FAILED, "Segment: 'sphere' changed", 1.0)
    finished.error_kind, finished.during_shutdown = "user", True
    gui.widget.onOperationFinished(finished)
    assert gui.dialogs.shown == [] and "Segment: 'sphere' changed" in gui.log()
