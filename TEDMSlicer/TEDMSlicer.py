"""TEDMSlicer: few-shot segmentation with timestep-ensembled diffusion features, in 3D Slicer.

Segment a volume with a fitted model; fit a new model from 1-3 slices labelled in the Segment
Editor; correct a few slices and Refine (the corrected slices join the training set, the head is
fine-tuned warm-started and re-applied to every other slice); jump to the slice the model is
least sure about; save the model.

This file is the thin Slicer face. All the work is in ``TEDMSlicerLib`` (Qt-free, tested in plain
pytest with real MRML): the widget only reads parameters, starts a background task and applies
its result on the GUI thread.
"""

import logging
import os
import time
from pathlib import Path
from typing import Annotated, List, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
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


from TEDMSlicerLib import dependencies
from TEDMSlicerLib.logic import AXES, METHODS, TEDMSlicerCoreLogic, UserInputError, is_cancellation
from TEDMSlicerLib.tasks import BackgroundTask, TaskEvent

MODULE_DIR = Path(__file__).resolve().parent
DEVICE_CHOICES = ["auto", "GPU", "CPU"]
POLL_INTERVAL_MS = 100  # how often the GUI thread drains the worker's event queue


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
            "Work runs in the background: the progress bar shows it and <b>Cancel</b> stops it."
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
    inputVolume: vtkMRMLScalarVolumeNode
    # Further modalities, in the model's channel order (e.g. FLAIR then T1).
    channel2Volume: vtkMRMLScalarVolumeNode
    channel3Volume: vtkMRMLScalarVolumeNode
    channel4Volume: vtkMRMLScalarVolumeNode
    modelPath: Path
    outputSegmentation: vtkMRMLSegmentationNode
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    axis: Annotated[str, Choice(list(AXES))] = "auto"
    method: Annotated[str, Choice(list(METHODS))] = "tedm"
    fitSteps: Annotated[int, WithinRange(10, 5000)] = 300
    refineSteps: Annotated[int, WithinRange(5, 2000)] = 100


def _path_or_empty(path: Optional[Path]) -> str:
    """ctkPathLineEdit's empty path reads back as Path('.'): treat it as unset."""
    text = "" if path is None else str(path)
    return "" if text in ("", ".") else text


#
# Widget
#
class TEDMSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Reads parameters, starts background tasks, applies their results. No computation here."""

    def __init__(self, parent=None, logic: Optional["TEDMSlicerLogic"] = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = logic  # injectable, as in SlicerNNUnet; created in setup() otherwise
        self._parameterNode: Optional[TEDMSlicerParameterNode] = None
        self._parameterNodeGuiTag = None
        self._task: Optional[BackgroundTask] = None
        self._job = None
        self._pollTimer: Optional[qt.QTimer] = None

    # -- set-up and tear-down ----------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TEDMSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        if self.logic is None:
            self.logic = TEDMSlicerLogic()

        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.fitButton.connect("clicked(bool)", self.onFit)
        self.ui.refineButton.connect("clicked(bool)", self.onRefine)
        self.ui.nextUncertainButton.connect("clicked(bool)", self.onNextUncertainSlice)
        self.ui.saveModelButton.connect("clicked(bool)", self.onSaveModel)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateDeviceNote)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._pollTask)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)
        self._setBusy(False)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeRemoved(self, caller, event, node) -> None:
        # A removed segmentation's cached features can take gigabytes: let them go.
        if node is not None and node.IsA("vtkMRMLSegmentationNode") and self.logic is not None:
            self.logic.core.forget(node.GetID())

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode: Optional[TEDMSlicerParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    # -- state -------------------------------------------------------------------------------
    def _inputVolumes(self) -> List[vtkMRMLScalarVolumeNode]:
        p = self._parameterNode
        return [n for n in (p.inputVolume, p.channel2Volume, p.channel3Volume, p.channel4Volume) if n is not None]

    def _hasResult(self) -> bool:
        segmentation = self._parameterNode.outputSegmentation if self._parameterNode else None
        return segmentation is not None and (segmentation.GetID() in self.logic.core.sessions)

    def _updateButtons(self, caller=None, event=None) -> None:
        if self._parameterNode is None:
            return
        busy = self._task is not None
        hasInput = self._parameterNode.inputVolume is not None
        hasModel = bool(_path_or_empty(self._parameterNode.modelPath))
        hasSegmentation = self._parameterNode.outputSegmentation is not None
        hasResult = self._hasResult()
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
        for widget in (self.ui.inputsCollapsibleButton, self.ui.settingsCollapsibleButton):
            widget.enabled = not busy
        self._updateButtons()

    def updateDeviceNote(self, *_args) -> None:
        """Say before any work where it will run (CPU: slow; GPU: how much memory is free)."""
        if self._parameterNode is None or not dependencies.plan_dependencies(MODULE_DIR).nothing_to_do:
            self.ui.deviceNoteLabel.text = _("Device details appear once the dependencies are installed.")
            return
        try:
            self.ui.deviceNoteLabel.text = "\n".join(self.logic.core.device_notes(self._parameterNode.device))
        except Exception as error:
            self.ui.deviceNoteLabel.text = str(error)

    # -- actions -----------------------------------------------------------------------------
    def _ensureReady(self) -> bool:
        try:
            return self.logic.ensureDependencies()
        except Exception as error:
            import traceback

            slicer.util.errorDisplay(
                _("Installing the dependencies failed: ") + str(error), detailedText=traceback.format_exc()
            )
            return False

    def _ensureOutputSegmentation(self) -> vtkMRMLSegmentationNode:
        if self._parameterNode.outputSegmentation is None:
            node = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", f"{self._parameterNode.inputVolume.GetName()} TEDM"
            )
            node.CreateDefaultDisplayNodes()
            self._parameterNode.outputSegmentation = node
        return self._parameterNode.outputSegmentation

    def _start(self, makeJob) -> None:
        """Prepare on the GUI thread (reads MRML), then compute in the background."""
        if not self._ensureReady():
            return
        try:
            job = makeJob()
        except UserInputError as error:
            slicer.util.warningDisplay(str(error), windowTitle=_("TEDM Segmentation"))
            return
        except Exception as error:
            import traceback

            slicer.util.errorDisplay(str(error), detailedText=traceback.format_exc())
            return
        self.updateDeviceNote()
        self._job = job
        self._task = BackgroundTask(job.title, job.compute)
        self.ui.progressBar.value = 0
        self.ui.logTextEdit.clear()
        self._setStatus(_("{title}: starting").format(title=job.title))
        self._setBusy(True)
        self._task.start()
        self._pollTimer.start()

    def onSegment(self) -> None:
        p = self._parameterNode

        def makeJob():
            return self.logic.core.begin_segment(
                self._inputVolumes(), _path_or_empty(p.modelPath), self._ensureOutputSegmentation(), p.axis, p.device
            )

        self._start(makeJob)

    def onFit(self) -> None:
        p = self._parameterNode
        self._start(
            lambda: self.logic.core.begin_fit(
                self._inputVolumes(),
                _path_or_empty(p.modelPath),
                p.outputSegmentation,
                p.axis,
                p.device,
                p.method,
                p.fitSteps,
            )
        )

    def onRefine(self) -> None:
        p = self._parameterNode
        self._start(lambda: self.logic.core.begin_refine(p.outputSegmentation, p.inputVolume, p.refineSteps, p.device))

    def onCancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._setStatus(_("Cancelling at the next slice batch or training step..."))

    def onNextUncertainSlice(self) -> None:
        try:
            candidate = self.logic.core.next_uncertain_slice(self._parameterNode.outputSegmentation)
        except UserInputError as error:
            slicer.util.warningDisplay(str(error))
            return
        if candidate is None:
            self._setStatus(_("Every slice was labelled or corrected."))
            return
        self.logic.jumpToSlice(candidate.centre_ras)
        self._setStatus(
            _("Slice {index}: timestep disagreement {score:.3f}. Correct it if needed, then Refine.").format(
                index=candidate.index, score=candidate.score
            )
        )

    def onSaveModel(self) -> None:
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(),
            _("Save the model as a folder"),
            _path_or_empty(self._parameterNode.modelPath) or os.path.expanduser("~"),
            "",
        )
        if not path:
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("Saving the model failed."), waitCursor=True):
                saved = self.logic.core.save_bundle(self._parameterNode.outputSegmentation, path, overwrite=False)
                self._parameterNode.modelPath = Path(saved)
                self.ui.modelPathLineEdit.addCurrentPathToHistory()
                self._setStatus(_("Model saved to {path}").format(path=saved))
        except Exception:
            pass

    # -- the background task's events, on the GUI thread ------------------------------------------
    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text
        slicer.util.showStatusMessage(text, 3000)

    def _pollTask(self) -> None:
        task = self._task
        if task is None:
            self._pollTimer.stop()
            return
        for event in task.poll():
            self._handleEvent(task, event)
        if self._task is not None and not self._task.finished:
            # Elapsed time keeps moving even between progress reports.
            self.ui.elapsedLabel.text = _("{seconds:.0f} s").format(seconds=task.elapsed)

    def _handleEvent(self, task: BackgroundTask, event: TaskEvent) -> None:
        elapsed = task.elapsed
        if event.kind == "progress":
            self.ui.progressBar.value = int(round(1000 * event.fraction))
            if not task.cancel_requested:
                self._setStatus(f"{task.title}: {event.message}")
        elif event.kind == "log":
            self.ui.logTextEdit.appendPlainText(f"[{elapsed:6.1f} s] {event.message}")
            logging.info("TEDMSlicer: %s", event.message)
        elif event.kind == "done":
            try:
                outcome = self._job.apply(event.result)  # MRML writes: GUI thread only
                self._afterResult(outcome)
                self._setStatus(_("{title} done in {seconds:.1f} s").format(title=task.title, seconds=elapsed))
            except Exception as error:
                import traceback

                slicer.util.errorDisplay(
                    _("Writing the result failed: ") + str(error), detailedText=traceback.format_exc()
                )
            self._finish()
        elif event.kind == "error":
            if is_cancellation(event.error):
                self._setStatus(
                    _("{title} cancelled after {seconds:.1f} s; nothing was changed").format(
                        title=task.title, seconds=elapsed
                    )
                )
            elif isinstance(event.error, UserInputError):
                self._setStatus(event.message)
                slicer.util.warningDisplay(event.message, windowTitle=task.title)
            else:
                self._setStatus(_("{title} failed after {seconds:.1f} s").format(title=task.title, seconds=elapsed))
                slicer.util.errorDisplay(f"{task.title} failed: {event.message}", detailedText=event.details)
            self._finish()

    def _afterResult(self, outcome) -> None:
        segmentation = self._parameterNode.outputSegmentation
        if segmentation is not None:
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetDisplayVisibility(True)
        if outcome.operation in ("segment", "fit"):
            self.ui.modelPathLineEdit.addCurrentPathToHistory()  # the recent-models list
        if outcome.changed_slices and outcome.operation == "refine":
            self.ui.logTextEdit.appendPlainText(
                _("Learnt from corrected slices {slices}.").format(
                    slices=", ".join(str(s) for s in outcome.changed_slices)
                )
            )

    def _finish(self) -> None:
        self._pollTimer.stop()
        self._task, self._job = None, None
        self._setBusy(False)


#
# Logic (the Slicer-side glue; the work is in TEDMSlicerLib.logic.TEDMSlicerCoreLogic)
#
class TEDMSlicerLogic(ScriptedLoadableModuleLogic):
    def __init__(
        self, core: Optional[TEDMSlicerCoreLogic] = None, installer: Optional[dependencies.PackageInstaller] = None
    ) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.core = core or TEDMSlicerCoreLogic()
        self._installer = installer

    def getParameterNode(self) -> TEDMSlicerParameterNode:
        return TEDMSlicerParameterNode(super().getParameterNode())

    def ensureDependencies(self, confirm: bool = True) -> bool:
        """Install what is missing after one confirmation listing it. False if the user declined."""
        plan = dependencies.plan_dependencies(MODULE_DIR)
        if plan.nothing_to_do:
            return True
        if plan.tedm_core_unavailable:
            raise RuntimeError("tedm_core is not installed and no source tree was found next to the module")
        if confirm and not slicer.util.confirmOkCancelDisplay(
            plan.describe(), windowTitle=_("TEDM Segmentation: install dependencies")
        ):
            return False
        installer = self._installer or dependencies.SlicerPackageInstaller(slicer)
        with slicer.util.WaitCursor():
            dependencies.install_dependencies(
                plan, installer, log=lambda message: slicer.util.showStatusMessage(message, 5000)
            )
        return True

    @staticmethod
    def jumpToSlice(centreRas) -> None:
        """Centre every slice view on the point (the Next uncertain slice button)."""
        x, y, z = (float(v) for v in centreRas)
        markupsLogic = slicer.modules.markups.logic() if hasattr(slicer.modules, "markups") else None
        if markupsLogic is not None:
            markupsLogic.JumpSlicesToLocation(x, y, z, True)
        else:
            slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, x, y, z)


#
# Self-test (run inside Slicer: Developer mode > Reload and Test)
#
class TEDMSlicerTest(ScriptedLoadableModuleTest):
    """Fit, segment, correct, refine and save on a synthetic volume with an untrained tiny
    backbone made on the spot (seconds on a CPU); checks geometry and that labelled and
    corrected slices are kept exactly. The same scenarios run against real data in
    tests/test_slicer_logic.py (plain pytest with slicer-core)."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_FitCorrectRefine()
        self.setUp()
        self.test_BackgroundTaskAndCancel()

    def _makeBackbone(self) -> str:
        import tempfile

        import torch

        from tedm_core.model.backbone import PRESETS
        from tedm_core.model.checkpoint import Backbone, save_backbone
        from tedm_core.preprocessing.intensity import IntensityConfig

        torch.manual_seed(0)
        folder = Path(tempfile.mkdtemp(prefix="TEDMSlicerTest-")) / "tiny_backbone"
        save_backbone(folder, Backbone.new(PRESETS["tiny"], intensity=IntensityConfig("percentile", 0.5, 99.5)))
        return str(folder)

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

    def test_FitCorrectRefine(self) -> None:
        import numpy as np

        self.delayDisplay("Checking dependencies")
        logic = TEDMSlicerLogic()
        if not logic.ensureDependencies(confirm=not slicer.app.testingEnabled()):
            self.delayDisplay("Dependencies not installed: test skipped")
            return
        volume, sphere = self._makeVolume()
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "TEDMSlicerTest segmentation")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("", "sphere", [0.9, 0.5, 0.1])
        labelled = [6, 9]
        drawn = np.zeros_like(sphere)
        drawn[labelled] = sphere[labelled]
        slicer.util.updateSegmentBinaryLabelmapFromArray(drawn, segmentation, segmentId, volume)

        self.delayDisplay("Fit from two labelled slices")
        outcome = logic.core.fit([volume], self._makeBackbone(), segmentation, axis="k", device="cpu", steps=20)
        self.assertEqual(outcome.session.training_slices, labelled)
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
        refined = logic.core.refine(segmentation, volume, steps=10)
        self.assertEqual(refined.changed_slices, [corrected])
        after = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
        np.testing.assert_array_equal(after[refined.session.training_slices], edited[refined.session.training_slices])

        self.delayDisplay("Uncertain slices and saving")
        ranked = logic.core.uncertain_slices(segmentation)
        self.assertTrue(all(r.index not in refined.session.training_slices for r in ranked))
        import tempfile

        saved = logic.core.save_bundle(segmentation, os.path.join(tempfile.mkdtemp(prefix="TEDMSlicerTest-"), "model"))
        self.assertTrue(os.path.isfile(os.path.join(saved, "bundle.json")))
        self.delayDisplay("Fit, refine and save passed")

    def test_BackgroundTaskAndCancel(self) -> None:
        logic = TEDMSlicerLogic()
        if not logic.ensureDependencies(confirm=not slicer.app.testingEnabled()):
            self.delayDisplay("Dependencies not installed: test skipped")
            return
        import numpy as np

        volume, sphere = self._makeVolume()
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentId = segmentation.GetSegmentation().AddEmptySegment("", "sphere", [0.9, 0.5, 0.1])
        drawn = np.zeros_like(sphere)
        drawn[8] = sphere[8]
        slicer.util.updateSegmentBinaryLabelmapFromArray(drawn, segmentation, segmentId, volume)
        job = logic.core.begin_fit([volume], self._makeBackbone(), segmentation, axis="k", device="cpu", steps=200)
        task = BackgroundTask(job.title, job.compute)
        task.start()
        events: List[TaskEvent] = []
        deadline = time.monotonic() + 120
        while not task.finished and time.monotonic() < deadline:
            slicer.app.processEvents()  # the GUI stays responsive while the worker computes
            events += task.poll()
            if any(e.kind == "progress" and "training step" in e.message for e in events):
                task.cancel()
            time.sleep(0.02)
        self.assertTrue(task.finished)
        self.assertEqual(events[-1].kind, "error")
        self.assertTrue(is_cancellation(events[-1].error))
        self.delayDisplay("Background task and Cancel passed")
