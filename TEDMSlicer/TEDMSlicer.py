"""TEDMSlicer: few-shot segmentation with timestep-ensembled diffusion features, in 3D Slicer.

Segment a volume with a fitted model; fit a new model from 1-3 slices labelled in the Segment
Editor; correct a few slices and Refine (the corrected slices join the training set, the head is
fine-tuned warm-started and re-applied to every other slice); jump to the slice the model is
least sure about; save the model.

This file is the thin Slicer face. The model runs in a TEDM worker process (never in Slicer's
process, which imports no torch); ``TEDMSlicerLib`` (Qt-free, tested in plain pytest with real
MRML) turns nodes into requests and results into nodes. The widget reads parameters, calls the
logic, and polls the worker from a QTimer on the GUI thread, so MRML and Qt are only touched
there and the GUI never waits for the model.
"""

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, List, Optional, Union

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLVectorVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4

    def _(text: str) -> str:
        return text


from TEDMSlicerLib import dependencies, worker_client

# TEDMSlicerLib first: from a source checkout it puts tedm_core on the path. The defaults come
# from tedm_core.choices (through TEDMSlicerLib.logic): one default per setting for every face.
from TEDMSlicerLib.logic import (
    AXIS_CHOICES,
    CANCELLED,
    DEFAULT_HEAD_STEPS,
    DEFAULT_REFINE_STEPS,
    DEVICE_CHOICES,
    DONE,
    DROPPED,
    FAILED,
    METHOD_CHOICES,
    WORKER_DIED,
    FinishedOperation,
    TEDMWorkerLogic,
    UserInputError,
)

# How often the GUI thread reads the worker's events. Each read returns at once (no waiting),
# so the GUI stays responsive however long the job (benchmarks/gui_responsiveness.py measures it).
POLL_INTERVAL_MS = 50


#
# Module
#
class TEDMSlicer(ScriptedLoadableModule):
    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("TEDM Segmentation")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["TEDM project contributors"]
        self.parent.helpText = _(
            "Few-shot segmentation with timestep-ensembled diffusion features (TEDM). "
            "<b>Segment</b> with a fitted model; label 1-3 slices in the Segment Editor and press "
            "<b>Fit from labelled slices</b>; correct a few slices and press <b>Refine from corrections</b>. "
            "The model runs in a separate worker process (<i>Advanced / Worker</i>): the progress bar shows "
            "its work and <b>Cancel</b> stops it."
        )
        self.parent.acknowledgementText = _(
            "Method: Rosnati, Roschewitz and Glocker, 'Robust semi-supervised segmentation with timestep "
            "ensembling diffusion models', ML4H 2023. Built on PyTorch and MONAI."
        )


#
# Parameters (bound to the .ui widgets by their SlicerParameterName)
#
@parameterNodeWrapper
class TEDMSlicerParameterNode:
    # Grey volumes, or colour radiographs (vector volumes, converted to luminance).
    inputVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode]
    # Further modalities, in the model's channel order (e.g. FLAIR then T1).
    channel2Volume: vtkMRMLScalarVolumeNode
    channel3Volume: vtkMRMLScalarVolumeNode
    channel4Volume: vtkMRMLScalarVolumeNode
    modelPath: Path
    outputSegmentation: vtkMRMLSegmentationNode
    device: Annotated[str, Choice(list(DEVICE_CHOICES))] = "auto"
    axis: Annotated[str, Choice(list(AXIS_CHOICES))] = "auto"
    method: Annotated[str, Choice(list(METHOD_CHOICES))] = "tedm"
    fitSteps: Annotated[int, WithinRange(10, 5000)] = DEFAULT_HEAD_STEPS
    refineSteps: Annotated[int, WithinRange(5, 2000)] = DEFAULT_REFINE_STEPS


def _path_or_empty(path: Optional[Path]) -> str:
    """ctkPathLineEdit's empty path reads back as Path('.'): treat it as unset."""
    text = "" if path is None else str(path)
    return "" if text in ("", ".") else text


#
# Widget
#
class TEDMSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Reads parameters, asks the logic to send requests, shows what the worker reports."""

    def __init__(self, parent=None, logic: Optional["TEDMSlicerLogic"] = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = logic  # injectable, as in SlicerNNUnet; created in setup() otherwise
        self._parameterNode: Optional[TEDMSlicerParameterNode] = None
        self._parameterNodeGuiTag = None
        self._pollTimer: Optional[qt.QTimer] = None
        self._polling = False  # inside _pollWorker (a message box it opens runs Qt's event loop)
        self._quitConnected = False
        # The first-use install runs in the GUI thread, but Slicer's pip runner handles GUI events
        # after every line pip prints: a click then would start a second install inside the first.
        self._installing = False

    # -- set-up and tear-down ----------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TEDMSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        if self.logic is None:
            self.logic = TEDMSlicerLogic()
        self.logic.worker.listener = _WidgetListener(self)  # progress, log lines and results come here

        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.fitButton.connect("clicked(bool)", self.onFit)
        self.ui.refineButton.connect("clicked(bool)", self.onRefine)
        self.ui.nextUncertainButton.connect("clicked(bool)", self.onNextUncertainSlice)
        self.ui.saveModelButton.connect("clicked(bool)", self.onSaveModel)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.restartWorkerButton.connect("clicked(bool)", self.onRestartWorker)

        settings = worker_client.WorkerSettings.load(qt.QSettings())
        self.ui.workerPythonPathLineEdit.currentPath = settings.python
        self.ui.workerEndpointLineEdit.text = settings.endpoint
        self.ui.workerTokenFilePathLineEdit.currentPath = settings.token_file
        self.ui.workerPythonPathLineEdit.connect("currentPathChanged(QString)", self.onWorkerSettingsChanged)
        self.ui.workerEndpointLineEdit.connect("editingFinished()", self.onWorkerSettingsChanged)
        self.ui.workerTokenFilePathLineEdit.connect("currentPathChanged(QString)", self.onWorkerSettingsChanged)
        self._showWorkerSettingsProblems()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._pollWorker)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)
        # Application exit: stop the worker (no orphan process holding GPU memory).
        slicer.app.connect("aboutToQuit()", self.onApplicationAboutToQuit)
        self._quitConnected = True
        self._setBusy(False)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Module cleanup and Reload: stop polling, stop the worker, drop observers."""
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self.logic is not None:
            self.logic.worker.shutdown()
        if self._quitConnected:
            slicer.app.disconnect("aboutToQuit()", self.onApplicationAboutToQuit)
            self._quitConnected = False
        self.removeObservers()

    def onApplicationAboutToQuit(self) -> None:
        if self.logic is not None:
            self.logic.worker.shutdown()

    def onReload(self) -> None:
        """Reload the module *and* TEDMSlicerLib (Slicer's own Reload only re-reads this file).
        The worker is stopped first (cleanup), and the package's modules are dropped from
        sys.modules so that the reloaded module imports them afresh (as SlicerNNUnet does)."""
        self.cleanup()
        for name in [n for n in sys.modules if n == "TEDMSlicerLib" or n.startswith("TEDMSlicerLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self._stopObservingParameterNode()

    def _stopObservingParameterNode(self) -> None:
        # exit() already stopped it when the module is entered again: removing twice only warns.
        if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons):
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        # Before the nodes go: results in flight are dropped, worker sessions closed.
        self.logic.worker.on_scene_closed()
        self._pollWhileNeeded()  # the close_session answers are read by the timer
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeRemoved(self, caller, event, node) -> None:
        if node is not None and self.logic is not None:
            self.logic.worker.on_node_removed(node)
            self._pollWhileNeeded()
            self._updateButtons()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume and not firstVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode: Optional[TEDMSlicerParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self._stopObservingParameterNode()
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    # -- worker settings ---------------------------------------------------------------------
    def _workerSettingsFromGui(self) -> worker_client.WorkerSettings:
        return worker_client.WorkerSettings(
            python=self.ui.workerPythonPathLineEdit.currentPath,
            endpoint=self.ui.workerEndpointLineEdit.text,
            token_file=self.ui.workerTokenFilePathLineEdit.currentPath,
        )

    def onWorkerSettingsChanged(self, *_args) -> None:
        self._workerSettingsFromGui().save(qt.QSettings())
        self._showWorkerSettingsProblems()

    def _showWorkerSettingsProblems(self) -> None:
        settings = self._workerSettingsFromGui()
        problems = worker_client.known_problems(settings)
        where = settings.describe()
        self.ui.workerStatusLabel.text = (
            _("Settings problem: ") + "; ".join(problems) if problems else _("Next start: {where}.").format(where=where)
        )

    def onRestartWorker(self) -> None:
        # Allowed while a job runs: it is how a user gets out of a hung worker. The running job
        # is reported as stopped (through onOperationFinished) and nothing is written; a result
        # that already arrived is written to the end first (the logic's shutdown).
        self.onWorkerSettingsChanged()
        self.logic.worker.shutdown(reason="the worker was restarted")  # the next request uses the new settings
        self._updateButtons()  # the old worker's results are gone: Refine, Next uncertain slice, Save model
        if not self._ensureReady():
            return
        try:
            self.logic.worker.describe_worker(self._showWorkerDescription)
        except Exception as error:
            self.ui.workerStatusLabel.text = _("The worker could not start: {error}").format(error=error)
            return
        self._pollWhileNeeded()

    def _showWorkerDescription(self, text: str) -> None:
        self.ui.workerStatusLabel.text = text
        self.ui.deviceNoteLabel.text = text

    # -- state -------------------------------------------------------------------------------
    def _inputVolumes(self) -> List[vtkMRMLScalarVolumeNode]:
        p = self._parameterNode
        return [n for n in (p.inputVolume, p.channel2Volume, p.channel3Volume, p.channel4Volume) if n is not None]

    def _updateButtons(self, caller=None, event=None) -> None:
        if self._parameterNode is None:
            return
        busy = self.logic.worker.busy or self._installing
        hasInput = self._parameterNode.inputVolume is not None
        hasModel = bool(_path_or_empty(self._parameterNode.modelPath))
        hasSegmentation = self._parameterNode.outputSegmentation is not None
        hasResult = self.logic.worker.has_result(self._parameterNode.outputSegmentation)
        self.ui.segmentButton.enabled = not busy and hasInput and hasModel
        self.ui.segmentButton.toolTip = (
            _("Segment the input volume(s) with the model")
            if hasInput and hasModel
            else _("Select an input volume and a model folder")
        )
        self.ui.fitButton.enabled = not busy and hasInput and hasModel and hasSegmentation
        self.ui.fitButton.toolTip = _(
            "Learn from the slices painted in the output segmentation (one segment per structure)"
        )
        self.ui.refineButton.enabled = not busy and hasResult
        self.ui.refineButton.toolTip = (
            _("Learn from the slices you corrected since the last result")
            if hasResult
            else _("Segment or Fit first, then correct some slices")
        )
        self.ui.nextUncertainButton.enabled = not busy and hasResult
        self.ui.saveModelButton.enabled = not busy and hasResult

    def _setBusy(self, busy: bool) -> None:
        self.ui.cancelButton.enabled = busy
        self.ui.progressBar.visible = busy
        # The worker section stays enabled: "Apply and restart worker" stops a hung worker.
        for widget in (self.ui.inputsCollapsibleButton, self.ui.settingsCollapsibleButton):
            widget.enabled = not busy
        self._updateButtons()

    # -- actions -----------------------------------------------------------------------------
    def _ensureReady(self) -> bool:
        if self._installing:
            return False  # (a click let through by the install's event processing)
        self._installing = True
        self._updateButtons()
        try:
            return self.logic.ensureDependencies(self._workerSettingsFromGui())
        except Exception as error:
            import traceback

            slicer.util.errorDisplay(
                _("Installing the dependencies failed: ") + str(error), detailedText=traceback.format_exc()
            )
            return False
        finally:
            self._installing = False
            self._updateButtons()

    def _start(self, sendRequest, clearLog: bool = False) -> None:
        """Read MRML and send the request (GUI thread); the QTimer then polls for its events.
        ``clearLog``: a new Segment, Fit or Refine starts a new log, before the request is made
        (the logic logs while making it, e.g. the structures a Fit learns)."""
        if not self._ensureReady():
            return
        if clearLog:
            self.ui.logTextEdit.clear()
        try:
            running = sendRequest()
        except UserInputError as error:
            slicer.util.warningDisplay(str(error), windowTitle=_("TEDM Segmentation"))
            return
        except Exception as error:
            import traceback

            slicer.util.errorDisplay(str(error), detailedText=traceback.format_exc())
            return
        self.ui.progressBar.value = 0
        self._setStatus(_("{title}: starting").format(title=running.title))
        self._setBusy(True)
        self._pollTimer.start()

    def onSegment(self) -> None:
        p = self._parameterNode
        # With "Create new" the output segmentation is made when the result arrives: a failed or
        # cancelled job leaves no empty node.
        self._start(
            lambda: self.logic.worker.begin_segment(
                self._inputVolumes(), _path_or_empty(p.modelPath), p.outputSegmentation, p.axis, p.device
            ),
            clearLog=True,
        )

    def onFit(self) -> None:
        p = self._parameterNode
        self._start(
            lambda: self.logic.worker.begin_fit(
                self._inputVolumes(),
                _path_or_empty(p.modelPath),
                p.outputSegmentation,
                p.axis,
                p.device,
                p.method,
                p.fitSteps,
            ),
            clearLog=True,
        )

    def onRefine(self) -> None:
        p = self._parameterNode
        self._start(
            lambda: self.logic.worker.begin_refine(p.outputSegmentation, p.inputVolume, p.refineSteps, p.device),
            clearLog=True,
        )

    def onNextUncertainSlice(self) -> None:
        self._start(lambda: self.logic.worker.begin_next_uncertain_slice(self._parameterNode.outputSegmentation))

    def onSaveModel(self) -> None:
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(),
            _("Save the model as a folder"),
            _path_or_empty(self._parameterNode.modelPath) or os.path.expanduser("~"),
            "",
        )
        if path:
            self._start(
                lambda: self.logic.worker.begin_save_model(
                    self._parameterNode.outputSegmentation, path, overwrite=False
                )
            )

    def onCancel(self) -> None:
        running = self.logic.worker.running
        if running is None:
            return
        if running.applying:
            # The job is over and its result is going into the scene (a few timer ticks): the logic
            # does not stop that halfway, so Cancel does nothing now.
            self._setStatus(
                _("{title}: the result is being written; it is too late to cancel.").format(title=running.title)
            )
            return
        again = running.cancel_requested
        self.logic.worker.cancel()  # pressed again: stops the worker itself
        if not again and self.logic.worker.running is running:
            self._setStatus(
                _("Cancelling at the next slice batch or training step... (press Cancel again to stop the worker)")
            )

    # -- the worker's events, on the GUI thread --------------------------------------------------
    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text
        slicer.util.showStatusMessage(text, 3000)

    def _pollWhileNeeded(self) -> None:
        if self._pollTimer is not None and self.logic.worker.needs_polling() and not self._pollTimer.isActive():
            self._pollTimer.start()

    def _pollWorker(self) -> None:
        # A message box opened from inside a poll (a failed job, a worker that died) runs Qt's event
        # loop, which fires this timer again: the poll in progress must not be entered twice (the
        # client would hand out events out of order, or twice).
        if self._polling:
            return
        self._polling = True
        try:
            # Never waits: reads what the worker already sent, for at most 20 ms.
            self.logic.worker.poll(max_seconds=0.02, wait_seconds=0.0)
        except Exception as error:  # a broken pipe must not kill the timer silently
            logging.error("TEDMSlicer: reading the worker failed: %s", error)
        finally:
            self._polling = False
        running = self.logic.worker.running
        if running is not None:
            self.ui.elapsedLabel.text = _("{seconds:.0f} s").format(seconds=running.elapsed)
        # Answers of requests that are no operation (the worker's description, close_session) are
        # read too: the timer stops only when nothing is left to read.
        if not self.logic.worker.needs_polling():
            self._pollTimer.stop()

    def onWorkerProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(1000 * fraction))
        running = self.logic.worker.running
        if running is None or not running.cancel_requested:
            self._setStatus(message)

    def onWorkerLog(self, message: str) -> None:
        running = self.logic.worker.running
        elapsed = running.elapsed if running is not None else 0.0
        self.ui.logTextEdit.appendPlainText(f"[{elapsed:6.1f} s] {message}")
        logging.info("TEDMSlicer: %s", message)

    def onOperationFinished(self, operation: FinishedOperation) -> None:
        self._setBusy(False)
        self.ui.elapsedLabel.text = ""
        self._setStatus(operation.message)
        if operation.during_shutdown:
            # Exit, Reload or a worker restart finished it: the status line and the log say what
            # became of it; no dialog, no view changes while the module goes away.
            if operation.status in (DONE, FAILED):  # (the logic logs cancelled and dropped ones itself)
                self.onWorkerLog(operation.message)
            self._updateButtons()
            return
        if operation.status == DONE:
            self._afterResult(operation)
        elif operation.status == FAILED and operation.error_kind in ("user", "busy"):
            slicer.util.warningDisplay(operation.message, windowTitle=operation.title)
        elif operation.status == FAILED:
            slicer.util.errorDisplay(operation.message, detailedText=operation.details or None)
        elif operation.status == WORKER_DIED:
            self.ui.workerStatusLabel.text = operation.message
            slicer.util.errorDisplay(operation.message, detailedText=operation.details or None)
        elif operation.status in (CANCELLED, DROPPED):
            pass  # already in the log and the status line; nothing was written
        self._updateButtons()

    def saveSegmentEditorUndoState(self, segmentationNode) -> None:
        """Before TEDM writes into a segmentation the Segment Editor is editing: its Undo then takes
        the result back whole. Without it, Undo restored the state before the user's last stroke,
        i.e. TEDM's earlier result, and the next Refine learnt that as corrections."""
        module = getattr(slicer.modules, "segmenteditor", None)
        if module is None:
            return
        try:  # (an editor never opened is created here, edits no node, and is left alone)
            editor = module.widgetRepresentation().self().editor
            edited = editor.segmentationNode()
            if edited is not None and edited.GetID() == segmentationNode.GetID():
                editor.saveStateForUndo()
        except Exception as error:  # an undo state is a convenience: never a reason to lose the result
            logging.debug("TEDMSlicer: could not save the Segment Editor's undo state: %s", error)

    def _afterResult(self, operation: FinishedOperation) -> None:
        if operation.uncertain_slice is not None:
            self.logic.jumpToSlice(operation.uncertain_slice.centre_world)
            return
        if operation.saved_path:
            self._parameterNode.modelPath = Path(operation.saved_path)
            self.ui.modelPathLineEdit.addCurrentPathToHistory()
            return
        segmentation = operation.segmentation_node
        if segmentation is not None:
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetDisplayVisibility(True)
            self._parameterNode.outputSegmentation = segmentation
        if operation.written_to_new_node:
            slicer.util.infoDisplay(operation.message, windowTitle=operation.title)
        if operation.operation in ("segment", "fit"):
            self.ui.modelPathLineEdit.addCurrentPathToHistory()  # the recent-models list
        if operation.changed_slices and operation.operation == "refine":
            self.onWorkerLog(
                _("Learnt from corrected slices {slices}.").format(
                    slices=", ".join(str(s) for s in operation.changed_slices)
                )
            )


class _WidgetListener:
    """The logic's OperationListener, forwarding to the widget (whose own names say what they do)."""

    def __init__(self, widget: TEDMSlicerWidget) -> None:
        self.widget = widget

    def progress(self, fraction: float, message: str) -> None:
        self.widget.onWorkerProgress(fraction, message)

    def log(self, message: str) -> None:
        self.widget.onWorkerLog(message)

    def finished(self, operation: FinishedOperation) -> None:
        self.widget.onOperationFinished(operation)

    def about_to_write_in_place(self, segmentation_node) -> None:
        self.widget.saveSegmentEditorUndoState(segmentation_node)


#
# Logic (the Slicer-side glue; requests and MRML conversion are in TEDMSlicerLib.logic)
#
class TEDMSlicerLogic(ScriptedLoadableModuleLogic):
    def __init__(
        self, worker: Optional[TEDMWorkerLogic] = None, installer: Optional[dependencies.PackageInstaller] = None
    ) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.worker = worker or TEDMWorkerLogic(
            lambda: worker_client.start_worker_client(worker_client.WorkerSettings.load(qt.QSettings()))
        )
        self._installer = installer

    def getParameterNode(self) -> TEDMSlicerParameterNode:
        return TEDMSlicerParameterNode(super().getParameterNode())

    @staticmethod
    def dependencyPlan(settings: Optional[worker_client.WorkerSettings] = None) -> dependencies.DependencyPlan:
        settings = settings or worker_client.WorkerSettings.load(qt.QSettings())
        return dependencies.plan_dependencies(settings.runs_in_slicer_python())

    def ensureDependencies(self, settings: Optional[worker_client.WorkerSettings] = None) -> bool:
        """Install what the worker's Python lacks (only when it is Slicer's own), after one
        confirmation listing it. False if the user declined or it cannot be done here (with the reason)."""
        settings = settings or worker_client.WorkerSettings.load(qt.QSettings())
        problems = worker_client.known_problems(settings)
        if problems:
            slicer.util.warningDisplay(
                _("Worker settings (Advanced / Worker): ") + "; ".join(problems), windowTitle=_("TEDM Segmentation")
            )
            return False
        plan = self.dependencyPlan(settings)
        if plan.nothing_to_do:
            return True
        problem = plan.why_not()
        if problem:
            slicer.util.warningDisplay(problem, windowTitle=_("TEDM Segmentation"))
            return False
        if not slicer.util.confirmOkCancelDisplay(
            plan.describe(), windowTitle=_("TEDM Segmentation: install dependencies")
        ):
            slicer.util.infoDisplay(dependencies.DECLINED_CONSEQUENCE, windowTitle=_("TEDM Segmentation"))
            return False
        installer = self._installer or dependencies.SlicerPackageInstaller(slicer)
        with slicer.util.WaitCursor():
            dependencies.install_dependencies(
                plan, installer, log=lambda message: slicer.util.showStatusMessage(message, 5000)
            )
        return True

    @staticmethod
    def jumpToSlice(centreWorld) -> None:
        """Centre every slice view on the world (RAS) point: the Next uncertain slice button."""
        x, y, z = (float(v) for v in centreWorld)
        markupsLogic = slicer.modules.markups.logic() if hasattr(slicer.modules, "markups") else None
        if markupsLogic is not None:
            markupsLogic.JumpSlicesToLocation(x, y, z, True)
        else:
            slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, x, y, z)


#
# Self-test (run inside Slicer: Developer mode > Reload and Test)
#
class TEDMSlicerTest(ScriptedLoadableModuleTest):
    """Pretrain a tiny backbone, fit, correct, refine and save on a synthetic oblique volume, all
    through a real worker process (seconds on a CPU); checks geometry, that labelled and corrected
    slices are kept exactly, Cancel, and that no empty node is left behind. It never installs
    anything: with packages missing it says which and skips. The MRML-level cases (scene closed
    mid-job, node deleted, worker killed) run in plain pytest: tests/test_slicer_*.py."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_WorkerFitCorrectRefineCancel()

    def _makeVolume(self):
        import numpy as np

        k, j, i = np.mgrid[:16, :48, :40]
        sphere = ((k - 8) ** 2 * 4 + (j - 24) ** 2 + (i - 20) ** 2) < 12**2
        array = np.where(sphere, 200.0, 20.0) + np.random.default_rng(0).normal(0, 5, sphere.shape)
        # An oblique, anisotropic grid: geometry errors would show as misplaced voxels.
        ijkToRas = vtk.vtkMatrix4x4()
        transform = vtk.vtkTransform()
        transform.RotateX(20)
        transform.RotateZ(-15)
        transform.Scale(0.9, 0.8, 2.5)
        ijkToRas.DeepCopy(transform.GetMatrix())
        ijkToRas.SetElement(0, 3, -12.0)
        volume = slicer.util.addVolumeFromArray(
            array.astype("float32"), ijkToRAS=ijkToRas, name="TEDMSlicerTest volume"
        )
        return volume, sphere.astype("uint8")

    def _wait(self, logic: TEDMWorkerLogic, timeout: float = 300.0, onPoll=None) -> FinishedOperation:
        """Poll as the widget's QTimer does, letting Qt process events between polls (no sleep)."""
        import time

        deadline = time.monotonic() + timeout
        while logic.busy and time.monotonic() < deadline:
            slicer.app.processEvents()
            logic.poll(max_seconds=0.05, wait_seconds=0.05)
            if onPoll is not None:
                onPoll()
        self.assertFalse(logic.busy, "the worker did not answer in time")
        return logic.listener.finished_operations[-1]

    def test_WorkerFitCorrectRefineCancel(self) -> None:
        import tempfile

        import numpy as np

        plan = TEDMSlicerLogic.dependencyPlan()
        if not plan.nothing_to_do:
            self.delayDisplay(
                "TEDMSlicer self-test skipped: the worker's Python lacks packages (it never installs them):\n"
                + plan.describe()
                + "\nPress Segment in the module to install them, then run the test again."
            )
            return
        logic = TEDMSlicerLogic().worker
        try:
            volume, sphere = self._makeVolume()
            folder = tempfile.mkdtemp(prefix="TEDMSlicerTest-")
            self.delayDisplay("Pretraining a tiny backbone in the worker")
            logic.begin_pretrain([volume], os.path.join(folder, "backbone"), preset="tiny", steps=20, axis="k")
            pretrained = self._wait(logic)
            self.assertEqual(pretrained.status, DONE, pretrained.message)

            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "TEDMSlicerTest segmentation")
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            segmentId = segmentation.GetSegmentation().AddEmptySegment("", "sphere", [0.9, 0.5, 0.1])
            labelled = [6, 9]
            drawn = np.zeros_like(sphere)
            drawn[labelled] = sphere[labelled]
            slicer.util.updateSegmentBinaryLabelmapFromArray(drawn, segmentation, segmentId, volume)

            self.delayDisplay("Fit from two labelled slices")
            logic.begin_fit([volume], pretrained.saved_path, segmentation, axis="k", device="cpu", steps=20)
            fitted = self._wait(logic)
            self.assertEqual(fitted.status, DONE, fitted.message)
            self.assertEqual(fitted.training_slices, labelled)
            result = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
            np.testing.assert_array_equal(result[labelled], sphere[labelled])

            self.delayDisplay("Correct one slice, then refine")
            wrong = [k for k in range(len(sphere)) if k not in labelled and not np.array_equal(result[k], sphere[k])]
            corrected = wrong[0] if wrong else 3
            edited = result.copy()
            edited[corrected] = sphere[corrected]
            if not wrong:  # a perfect result: make a deliberate edit so that there is something to learn
                edited[corrected, 0, 0] = 1 - edited[corrected, 0, 0]
            slicer.util.updateSegmentBinaryLabelmapFromArray(edited, segmentation, segmentId, volume)
            logic.begin_refine(segmentation, volume, steps=10)
            refined = self._wait(logic)
            self.assertEqual(refined.status, DONE, refined.message)
            self.assertEqual(refined.changed_slices, [corrected])
            after = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
            np.testing.assert_array_equal(after[refined.training_slices], edited[refined.training_slices])

            self.delayDisplay("Next uncertain slice and saving")
            logic.begin_next_uncertain_slice(segmentation)
            uncertain = self._wait(logic)
            self.assertNotIn(uncertain.uncertain_slice.index, refined.training_slices)
            logic.begin_save_model(segmentation, os.path.join(folder, "model"))
            saved = self._wait(logic)
            self.assertTrue(os.path.isfile(os.path.join(saved.saved_path, "bundle.json")))

            self.delayDisplay("Cancel: no node is left behind")
            nodesBefore = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
            logic.begin_segment([volume], saved.saved_path, None, axis="k", device="cpu")
            logic.poll(max_seconds=0.05, wait_seconds=0.05)
            logic.cancel()  # once: pressed again, Cancel stops the worker itself
            cancelled = self._wait(logic)
            self.assertIn(cancelled.status, (CANCELLED, DONE))  # a tiny volume may finish first
            if cancelled.status == CANCELLED:
                self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), nodesBefore)
            self.delayDisplay("Worker fit, refine, save and cancel passed")
        finally:
            logic.shutdown()
