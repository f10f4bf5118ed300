"""Build-tree checks of TEDMSlicerLib inside Slicer (ctest runs this file with Slicer's Python).

Slicer-only facts that the slicer-core pytest suite cannot see: the Slicer application has
registered the segmentation converters, the module's package imports without Qt, and the
dependency plan can be computed without importing torch.
"""

import unittest
from pathlib import Path


class TEDMSlicerLibTest(unittest.TestCase):
    def test_import_without_torch(self):
        import sys

        import TEDMSlicerLib  # noqa: F401

        self.assertNotIn("tedm_core", sys.modules)  # imported lazily, when work starts

    def test_dependency_plan(self):
        from TEDMSlicerLib import dependencies

        plan = dependencies.plan_dependencies(Path(dependencies.__file__).resolve().parent.parent)
        text = plan.describe()
        for provided in dependencies.SLICER_PROVIDED:
            self.assertIn(provided, text)

    def test_segment_round_trip_in_the_application(self):
        import numpy as np
        import slicer

        from TEDMSlicerLib import mrml_io

        volume = slicer.util.addVolumeFromArray(np.zeros((4, 8, 6), dtype=np.float32), name="TEDMSlicerLibTest")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        labels = np.zeros((4, 8, 6), dtype=np.uint8)
        labels[1:3, 2:6, 1:4] = 1
        labels[3, 0:2, 0:2] = 2
        mrml_io.write_class_labels(segmentation, volume, labels, ["background", "a", "b"])
        np.testing.assert_array_equal(mrml_io.read_class_labels(segmentation, volume), labels)
        slicer.mrmlScene.RemoveNode(segmentation)
        slicer.mrmlScene.RemoveNode(volume)


if __name__ == "__main__":
    unittest.main()
