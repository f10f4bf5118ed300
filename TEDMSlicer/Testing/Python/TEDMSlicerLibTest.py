"""Build-tree checks of TEDMSlicerLib inside Slicer (ctest runs this file with Slicer's Python).

Slicer-only facts that the slicer-core pytest suite cannot see: the Slicer application has
registered the segmentation converters, the module's package imports without torch (the model
runs in the worker process), and the dependency plan can be computed without importing torch.
"""

import unittest


class TEDMSlicerLibTest(unittest.TestCase):
    def test_import_without_torch(self):
        import sys

        import TEDMSlicerLib  # noqa: F401
        from TEDMSlicerLib import worker_client  # noqa: F401

        self.assertNotIn("torch", sys.modules)  # torch runs in the worker process only

    def test_dependency_plan(self):
        from TEDMSlicerLib import dependencies

        plan = dependencies.plan_dependencies(worker_in_slicer_python=True)
        text = plan.describe()
        for provided in ("numpy", "SimpleITK", "vtk"):
            self.assertIn(provided, text)
        self.assertTrue(dependencies.plan_dependencies(worker_in_slicer_python=False).nothing_to_do)

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
