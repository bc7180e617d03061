"""The in-Slicer self-test of CMBDetect (run by CMBDetectTest under ctest or "Reload and Test").

A synthetic SWI-like volume with dark spheres on an oblique, anisotropic grid goes through the
module's Logic (child process included); the outputs must lie on the input's grid, a
re-threshold must rewrite them, and a segmentation the module did not make must survive.
Detection quality is not checked here. Needs the Slicer application (slicer.util, the scene).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import slicer
import vtk


def outputs_on_input_grid(test: Any, logic: Any) -> None:
    """`test`: the unittest.TestCase (for asserts and delayDisplay); `logic`: a CMBDetectLogic."""
    test.delayDisplay("Starting the test")
    # SWI-like: bright tissue in an ellipse, dark air around it, two dark spheres (4 and 7 mm).
    spacing = np.array([0.45, 0.6, 2.0])
    shape = (12, 200, 240)
    kk, jj, ii = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
    head = ((jj - 100) / 90.0) ** 2 + ((ii - 120) / 108.0) ** 2 < 1
    array = np.where(head, 420.0, 8.0).astype(np.float32)
    array += np.random.default_rng(0).normal(0, 6, shape).astype(np.float32)
    for (ck, cj, ci), diameter in (((6, 100, 80), 4.0), ((5, 130, 165), 7.0)):
        r2 = ((kk - ck) * spacing[2]) ** 2 + ((jj - cj) * spacing[1]) ** 2 + ((ii - ci) * spacing[0]) ** 2
        array[r2 <= (diameter / 2) ** 2] = 10.0
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(angle / 2), -np.sin(angle / 2)], [0, np.sin(angle / 2), np.cos(angle / 2)]])
    ijkToRas = np.eye(4)
    ijkToRas[:3, :3] = rotation @ tilt @ np.diag(spacing)
    ijkToRas[:3, 3] = (30.0, -12.0, 7.5)
    inputVolume = slicer.util.addVolumeFromArray(np.abs(array), ijkToRas, "CMBDetectTestSWI")

    # A user's own segmentation, chosen as output: it must survive untouched.
    manual = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    manual.GetSegmentation().AddEmptySegment("mine")

    test.delayDisplay("Detecting (child process)")
    result, segmentation, table, markups = logic.process(inputVolume, manual)
    test.assertIsNot(segmentation, manual)
    test.assertEqual(manual.GetSegmentation().GetNumberOfSegments(), 1)
    test.assertTrue(logic.isOwnOutput(segmentation))

    # Outputs exist, count the same lesions, and the segmentation lies on the input grid.
    nLesions = len(result.lesions)
    test.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), nLesions)
    test.assertEqual(table.GetNumberOfRows(), nLesions)
    test.assertEqual(markups.GetNumberOfControlPoints(), nLesions)
    role = segmentation.GetReferenceImageGeometryReferenceRole()
    test.assertIs(segmentation.GetNodeReference(role), inputVolume)
    converter = slicer.vtkSegmentationConverter
    geometryImage = slicer.vtkOrientedImageData()
    converter.DeserializeImageGeometry(
        segmentation.GetSegmentation().GetConversionParameter(converter.GetReferenceImageGeometryParameterName()), geometryImage
    )
    matrix = vtk.vtkMatrix4x4()
    geometryImage.GetImageToWorldMatrix(matrix)
    test.assertTrue(np.allclose(slicer.util.arrayFromVTKMatrix(matrix), ijkToRas, atol=1e-4))
    for n, lesion in enumerate(result.lesions):
        ras = (ijkToRas @ [*lesion.centroid_ijk, 1.0])[:3]
        test.assertTrue(np.allclose(slicer.util.arrayFromMarkupsControlPoints(markups)[n], ras, atol=1e-4))
        test.assertEqual(segmentation.GetSegmentation().GetNthSegment(n).GetName(), f"CMB {lesion.id}")

    # Live threshold: the kept probability map gives the lesions again, into the same nodes;
    # at the run's own threshold, the run's lesions.
    nodeCount = slicer.mrmlScene.GetNumberOfNodes()
    again = logic.rethreshold(segmentation, 0.9, 2.0, 10.0)
    test.assertIs(again[1], segmentation)
    test.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), len(again[0].lesions))
    test.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCount)
    same = logic.rethreshold(segmentation, result.threshold, 2.0, 10.0)
    test.assertEqual([lesion.n_voxels for lesion in same[0].lesions], [lesion.n_voxels for lesion in result.lesions])

    # Running again on its own segmentation replaces the outputs instead of adding nodes.
    rerun = logic.process(inputVolume, segmentation)
    test.assertIs(rerun[1], segmentation)
    test.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCount)
    test.delayDisplay("Test passed")
