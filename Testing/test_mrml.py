"""The MRML adapter against slicer-core's real scene, nodes and storage (no fake `slicer`).

Every check of position is made in physical space on an oblique, anisotropic grid: lesion
voxels are mapped to RAS with the input node's own IJKToRAS, independently of the Lib's
geometry code, and compared with what the segmentation, the markups and the files say.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer_core", reason="slicer-core (the Qt-free MRML engine) is not installed")

import slicer  # noqa: E402
import slicer.util  # noqa: E402
import vtk  # noqa: E402

import slicer_headless as sh  # noqa: E402
from CMBDetectLib.mrml.display import MAX_REJECTED_LABELS, show_rejected  # noqa: E402
from CMBDetectLib.mrml.job import run_detection  # noqa: E402
from CMBDetectLib.mrml.navigation import jump_to_lesion, lesion_index, lesion_position_world  # noqa: E402
from CMBDetectLib.mrml.nodes import (  # noqa: E402
    PROBABILITY_ROLE,
    REJECTED_ROLE,
    TABLE_ROLE,
    geometry_of_node,
    ijk_to_ras_of,
    is_own_output,
    load_segmentation_file,
    outputs_of,
    save_segmentation_file,
    summary_of,
    volume_from_node,
    vtk_matrix,
)
from CMBDetectLib.mrml.results import probability_of, rethreshold, write_result  # noqa: E402
from CMBDetectLib.detection import outputs, records  # noqa: E402
from CMBDetectLib.detection.records import Candidate  # noqa: E402
from CMBDetectLib.io import Geometry, read_volume  # noqa: E402
from CMBDetectLib.detection.lesions import CLASS_COLORS, extract_lesions  # noqa: E402
from CMBDetectLib.detection.pipeline import DetectionParams, DetectionResult  # noqa: E402

SHAPE = (14, 48, 56)  # (k, j, i)
# (k, j, i) centre and radius in mm: three small (2-5 mm) and one large (5-10 mm) lesion, and
# one too small to keep (under 1 mm) that the size filter must drop.
SPHERES = [((4, 12, 14), 1.4), ((7, 30, 20), 1.8), ((9, 20, 40), 2.2), ((6, 34, 42), 3.2), ((10, 8, 44), 0.4)]


def sphere_probability(shape=SHAPE, spacing=sh.OBLIQUE_SPACING, spheres=SPHERES) -> np.ndarray:
    kk, jj, ii = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
    p = np.zeros(shape, np.float32)
    for n, ((ck, cj, ci), r) in enumerate(spheres):
        d2 = ((kk - ck) * spacing[2]) ** 2 + ((jj - cj) * spacing[1]) ** 2 + ((ii - ci) * spacing[0]) ** 2
        p[d2 <= r * r] = 0.6 + 0.05 * n
    return p


def make_result(volume_node, probability: np.ndarray | None = None, min_mm: float = 2.0, max_mm: float = 10.0) -> DetectionResult:
    """A DetectionResult on the node's grid, from a hand-made probability map."""
    geometry = volume_from_node(volume_node).geometry
    probability = sphere_probability() if probability is None else probability
    labels, lesions = extract_lesions(probability, geometry, 0.4, min_mm, max_mm)
    return DetectionResult(probability, labels, lesions, geometry, "test", "0", False, 0.0, DetectionParams())


def swi_node(mrml_app, ijk_to_ras: np.ndarray | None = None):
    """A noisy SWI-like volume node on the oblique, anisotropic test grid (needs the app)."""
    rng = np.random.default_rng(0)
    return sh.add_oblique_volume(rng.normal(400, 20, SHAPE).astype(np.float32), "swi", ijk_to_ras)


def voxel_centroid_ras(volume_node, labels: np.ndarray, lesion_id: int) -> np.ndarray:
    """Mean RAS of a lesion's voxels, through the node's own matrix (independent of the Lib)."""
    kji = np.argwhere(labels == lesion_id)
    ijk1 = np.c_[kji[:, ::-1], np.ones(len(kji))]
    return (ijk_to_ras_of(volume_node) @ ijk1.T).T[:, :3].mean(axis=0)


def segment_array(seg_node, segment_id: str, volume_node) -> np.ndarray:
    return slicer.util.arrayFromSegmentBinaryLabelmap(seg_node, segment_id, volume_node)


def reference_geometry_matrix_and_extent(seg_node) -> tuple[np.ndarray, tuple[int, ...]]:
    """The segmentation's reference image geometry, deserialised from its conversion parameter."""
    converter = slicer.vtkSegmentationConverter
    text = seg_node.GetSegmentation().GetConversionParameter(converter.GetReferenceImageGeometryParameterName())
    image = slicer.vtkOrientedImageData()
    assert converter.DeserializeImageGeometry(text, image)
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)]), tuple(image.GetExtent())


# --- Volumes ----------------------------------------------------------------------------


def test_volume_from_node_keeps_oblique_anisotropic_geometry(mrml, tmp_path):
    m = sh.oblique_ijk_to_ras()
    assert not np.allclose(np.abs(m[:3, :3] / np.array(sh.OBLIQUE_SPACING)), np.eye(3), atol=0.1)  # really oblique
    data = np.random.default_rng(3).random(SHAPE).astype(np.float32) * 1000
    node = sh.add_oblique_volume(data, "oblique", m)
    volume = volume_from_node(node)

    np.testing.assert_array_equal(volume.array, data)
    assert volume.array.dtype == np.float32 and volume.array.shape == SHAPE
    np.testing.assert_allclose(volume.geometry.spacing, sh.OBLIQUE_SPACING, atol=1e-12)
    np.testing.assert_allclose(volume.geometry.ijk_to_ras(), m, atol=1e-12)
    # Same voxel, same point: the LPS geometry maps voxels where the node does.
    for ijk in [(0, 0, 0), (55, 47, 13), (17, 5, 9)]:
        np.testing.assert_allclose(volume.geometry.index_to_ras(np.array(ijk)), (m @ [*ijk, 1])[:3], atol=1e-9)

    # And where Slicer's own NRRD writer + SimpleITK's reader put it (LPS on disk).
    storage = mrml.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "oblique.nrrd"))
    assert storage.WriteData(node)
    from_file = read_volume(tmp_path / "oblique.nrrd")
    assert from_file.geometry.matches(volume.geometry, tol=1e-6)
    np.testing.assert_array_equal(from_file.array, data)


def test_volume_from_node_is_a_copy(mrml):
    node = swi_node(mrml)
    volume = volume_from_node(node)
    before = volume.array.copy()
    slicer.util.arrayFromVolume(node)[:] = 0
    slicer.util.arrayFromVolumeModified(node)
    np.testing.assert_array_equal(volume.array, before)


def test_volume_from_node_refuses_non_scalar_and_empty(mrml):
    vector = slicer.util.addVolumeFromArray(np.zeros((*SHAPE, 3), np.float32), nodeClassName="vtkMRMLVectorVolumeNode")
    with pytest.raises(ValueError, match="components"):
        volume_from_node(vector)
    empty = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(ValueError, match="no image data"):
        volume_from_node(empty)
    with pytest.raises(ValueError, match="no input volume"):
        volume_from_node(None)


# --- write_result -----------------------------------------------------------------------


def test_write_result_segments_table_markups(mrml):
    node = swi_node(mrml)
    result = make_result(node)
    assert [l.size_class for l in result.lesions].count("large") >= 1 and len(result.lesions) == 4
    seg, table, markups = write_result(result, node)

    # Segments: one per lesion, ids, names, class colours, tags, terminology, voxels.
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(result.lesions)
    assert segmentation.GetNumberOfLayers() == 1  # one shared labelmap, not one per lesion
    for lesion in result.lesions:
        segment = segmentation.GetSegment(f"CMB_{lesion.id}")
        assert segment is not None and segment.GetName() == f"CMB {lesion.id}"
        np.testing.assert_allclose(segment.GetColor(), CLASS_COLORS[lesion.size_class], atol=1e-6)
        assert segment.GetTerminology() == records.TERMINOLOGY_ENTRY
        assert _tag(segment, "CMBDetect.SizeClass") == lesion.size_class
        assert float(_tag(segment, "CMBDetect.DiameterMm")) == pytest.approx(lesion.diameter_mm, abs=0.006)
        assert float(_tag(segment, "CMBDetect.MaxProbability")) == pytest.approx(lesion.max_probability, abs=6e-4)
        np.testing.assert_array_equal(segment_array(seg, f"CMB_{lesion.id}", node), result.labels == lesion.id)
        # Slicer's own centre of the segment agrees with the voxel centroid in RAS.
        np.testing.assert_allclose(seg.GetSegmentCenterRAS(f"CMB_{lesion.id}"), voxel_centroid_ras(node, result.labels, lesion.id), atol=0.6)

    # Reference geometry = the input: node reference and the serialised grid.
    role = seg.GetReferenceImageGeometryReferenceRole()
    assert seg.GetNodeReference(role) is node
    matrix, extent = reference_geometry_matrix_and_extent(seg)
    np.testing.assert_allclose(matrix, ijk_to_ras_of(node), atol=1e-6)
    assert extent == (0, SHAPE[2] - 1, 0, SHAPE[1] - 1, 0, SHAPE[0] - 1)

    # Table: one row per lesion, the CSV's columns, values as the lesions say.
    t = table.GetTable()
    assert t.GetNumberOfRows() == len(result.lesions)
    assert [t.GetColumnName(c) for c in range(t.GetNumberOfColumns())] == records.LESION_COLUMNS
    for r, lesion in enumerate(result.lesions):
        assert table.GetCellText(r, records.LESION_COLUMNS.index("id")) == str(lesion.id)
        assert table.GetCellText(r, records.LESION_COLUMNS.index("size_class")) == lesion.size_class
        assert float(table.GetCellText(r, records.LESION_COLUMNS.index("diameter_mm"))) == pytest.approx(lesion.diameter_mm, abs=1e-4)
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(table, "n_voxels"), [l.n_voxels for l in result.lesions])
    assert table.GetColumnUnitLabel("diameter_mm") == "mm"
    assert table.GetColumnTitle("diameter_mm") == "Diameter (mm)"
    assert table.GetLocked()

    # Markups: locked points at the lesions' voxel centroids in RAS, labelled CMB <id>.
    points = slicer.util.arrayFromMarkupsControlPoints(markups)
    assert points.shape == (len(result.lesions), 3)
    for n, lesion in enumerate(result.lesions):
        assert markups.GetNthControlPointLabel(n) == f"CMB {lesion.id}"
        assert markups.GetNthControlPointLocked(n)
        np.testing.assert_allclose(points[n], voxel_centroid_ras(node, result.labels, lesion.id), atol=1e-6)
        np.testing.assert_allclose(points[n], lesion.centroid_ras, atol=1e-6)
    assert markups.GetLocked() and markups.GetFixedNumberOfControlPoints()
    last = result.lesions[-1]
    assert lesion_index(markups, last.id) == len(result.lesions) - 1
    assert lesion_index(markups, 999) is None

    # The outputs find each other and the input; the summary travels with them.
    assert outputs_of(seg) == (node, table, markups)
    assert summary_of(seg)["n_lesions"] == len(result.lesions)


def _tag(segment, name: str) -> str:
    # vtkSegment.GetTag(name, std::string&) fills its output argument through a reference.
    value = vtk.reference("")
    assert segment.GetTag(name, value), f"segment {segment.GetName()} has no tag {name}"
    return str(value)


def test_write_result_zero_lesions(mrml):
    node = swi_node(mrml)
    result = make_result(node, np.zeros(SHAPE, np.float32))
    assert result.lesions == []
    seg, table, markups = write_result(result, node)
    assert seg.GetSegmentation().GetNumberOfSegments() == 0
    assert table.GetTable().GetNumberOfRows() == 0
    assert table.GetTable().GetNumberOfColumns() == len(records.LESION_COLUMNS)
    assert markups.GetNumberOfControlPoints() == 0
    matrix, _ = reference_geometry_matrix_and_extent(seg)
    np.testing.assert_allclose(matrix, ijk_to_ras_of(node), atol=1e-6)
    assert summary_of(table)["n_lesions"] == 0


def test_running_twice_replaces_instead_of_appending(mrml):
    node = swi_node(mrml)
    seg, table, markups = write_result(make_result(node), node)
    nodes_before = mrml.scene.GetNumberOfNodes()
    # Second run: only the segmentation is passed (as the widget does); the rest is found.
    fewer = make_result(node, min_mm=4.0)
    assert 0 < len(fewer.lesions) < 4
    again = write_result(fewer, node, segmentation_node=seg)
    assert again == (seg, table, markups)
    assert mrml.scene.GetNumberOfNodes() == nodes_before  # no stray temporary or duplicate nodes
    assert seg.GetSegmentation().GetNumberOfSegments() == len(fewer.lesions)
    assert seg.GetSegmentation().GetNumberOfLayers() == 1
    assert table.GetTable().GetNumberOfRows() == len(fewer.lesions)
    assert markups.GetNumberOfControlPoints() == len(fewer.lesions)
    for lesion in fewer.lesions:
        np.testing.assert_array_equal(segment_array(seg, f"CMB_{lesion.id}", node), fewer.labels == lesion.id)


def test_more_than_255_lesions_use_a_16_bit_layer(mrml):
    node = swi_node(mrml)
    probability = np.zeros(SHAPE, np.float32)
    probability[1:-1:2, 1:-1:3, 1:-1:3] = 0.9  # isolated voxels: hundreds of 1-voxel lesions
    result = make_result(node, probability, min_mm=0.0)
    assert len(result.lesions) > 255
    seg, _, markups = write_result(result, node)
    assert seg.GetSegmentation().GetNumberOfSegments() == len(result.lesions)
    last = result.lesions[-1]
    np.testing.assert_array_equal(segment_array(seg, f"CMB_{last.id}", node), result.labels == last.id)
    assert markups.GetNumberOfControlPoints() == len(result.lesions)


def test_result_on_another_grid_is_refused(mrml):
    node = swi_node(mrml)
    result = make_result(node)
    other = sh.add_oblique_volume(np.zeros(SHAPE, np.float32), "shifted", sh.oblique_ijk_to_ras(origin_ras=(0.0, 0.0, 0.0)))
    with pytest.raises(ValueError, match="geometry"):
        write_result(result, other)
    small = slicer.util.addVolumeFromArray(np.zeros((3, 4, 5), np.float32), sh.oblique_ijk_to_ras(), "small")
    with pytest.raises(ValueError, match="does not match"):
        write_result(result, small)
    result.lesions = result.lesions[:-1]  # a label without its lesion would make an empty segment
    with pytest.raises(ValueError, match="disagree"):
        write_result(result, node)


def test_transformed_input_outputs_follow_and_jump_lands_on_lesion(mrml):
    node = swi_node(mrml)
    transform = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "head motion")
    moved = np.eye(4)
    moved[:3, :3] = sh.rotation_matrix((0.0, 1.0, 1.0), 15.0)
    moved[:3, 3] = (5.0, -3.0, 8.0)
    transform.SetMatrixTransformToParent(vtk_matrix(moved))
    node.SetAndObserveTransformNodeID(transform.GetID())

    result = make_result(node)
    seg, _, markups = write_result(result, node)
    assert seg.GetTransformNodeID() == transform.GetID() == markups.GetTransformNodeID()

    lesion = result.lesions[2]
    expected_world = (moved @ [*voxel_centroid_ras(node, result.labels, lesion.id), 1.0])[:3]
    np.testing.assert_allclose(lesion_position_world(markups, 2), expected_world, atol=1e-6)

    point = jump_to_lesion(lesion, volume_node=node)
    np.testing.assert_allclose(point, expected_world, atol=1e-6)
    slice_nodes = mrml.slice_nodes()
    assert {n.GetName() for n in slice_nodes} == {"Red", "Yellow", "Green"}
    for slice_node in slice_nodes:
        m = slice_node.GetSliceToRAS()
        np.testing.assert_allclose([m.GetElement(r, 3) for r in range(3)], expected_world, atol=1e-6)

    # A plain world point works too (what the widget passes from the markups).
    jump_to_lesion((1.0, 2.0, 3.0), scene=mrml.scene)
    m = slice_nodes[0].GetSliceToRAS()
    np.testing.assert_allclose([m.GetElement(r, 3) for r in range(3)], (1.0, 2.0, 3.0), atol=1e-9)


def test_outputs_go_beside_the_input_in_the_subject_hierarchy(mrml):
    node = swi_node(mrml)
    sh_node = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    study = sh_node.CreateFolderItem(sh_node.GetSceneItemID(), "SWI study")
    # In Slicer a Qt plugin gives each new data node its item; under slicer-core we do it.
    sh_node.CreateItem(study, node)
    for output in write_result(make_result(node), node):
        assert sh_node.GetItemParent(sh_node.GetItemByDataNode(output)) == study


def test_terminology_entry_is_slicer_dicom_haemorrhage_in_brain():
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(records.TERMINOLOGY_ENTRY, entry)
    assert entry.GetTerminologyContextName() == "Segmentation category and type - DICOM master list"
    assert (entry.GetCategoryObject().GetCodeValue(), entry.GetCategoryObject().GetCodingSchemeDesignator()) == ("49755003", "SCT")
    assert (entry.GetTypeObject().GetCodeValue(), entry.GetTypeObject().GetCodeMeaning()) == ("50960005", "Hemorrhage")
    assert (entry.GetRegionObject().GetCodeValue(), entry.GetRegionObject().GetCodeMeaning()) == ("12738006", "Brain")


# --- Files ------------------------------------------------------------------------------


def _check_loaded_segmentation(loaded, result, volume_node) -> None:
    """A segmentation read from disk matches the result: segments, names, colours, tags, voxels, grid."""
    segmentation = loaded.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(result.lesions)
    for n, lesion in enumerate(result.lesions):
        segment = segmentation.GetNthSegment(n)
        assert segmentation.GetNthSegmentID(n) == f"CMB_{lesion.id}"
        assert segment.GetName() == f"CMB {lesion.id}"
        np.testing.assert_allclose(segment.GetColor(), CLASS_COLORS[lesion.size_class], atol=1e-5)
        assert segment.GetTerminology() == records.TERMINOLOGY_ENTRY
        assert _tag(segment, "CMBDetect.SizeClass") == lesion.size_class
        assert _tag(segment, "CMBDetect.DiameterMm") == f"{lesion.diameter_mm:.2f}"
        # The segment's own labelmap lies on the input's grid (oblique, anisotropic) ...
        labelmap = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
        m = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(m)
        np.testing.assert_allclose([[m.GetElement(r, c) for c in range(4)] for r in range(4)], ijk_to_ras_of(volume_node), atol=1e-5)
        # ... and holds exactly the lesion's voxels.
        np.testing.assert_array_equal(segment_array(loaded, f"CMB_{lesion.id}", volume_node), result.labels == lesion.id)


def test_seg_nrrd_round_trip_through_slicer_storage(mrml, tmp_path):
    node = swi_node(mrml)
    result = make_result(node)
    seg, _, _ = write_result(result, node)
    path = tmp_path / "case.seg.nrrd"
    save_segmentation_file(seg, str(path))
    loaded = load_segmentation_file(str(path), mrml.scene)
    assert loaded is not seg and loaded.GetName() == "case"
    _check_loaded_segmentation(loaded, result, node)
    matrix, extent = reference_geometry_matrix_and_extent(loaded)
    np.testing.assert_allclose(matrix, ijk_to_ras_of(node), atol=1e-5)
    assert extent == (0, SHAPE[2] - 1, 0, SHAPE[1] - 1, 0, SHAPE[0] - 1)


def test_seg_nrrd_from_the_command_line_writer_loads_in_slicer(mrml, tmp_path):
    """outputs.write_segmentation_nrrd (pynrrd, no Slicer) gives what Slicer itself would."""
    node = swi_node(mrml)
    result = make_result(node)
    path = tmp_path / "cli.seg.nrrd"
    outputs.write_segmentation_nrrd(path, result.labels, result.lesions, result.geometry)
    loaded = load_segmentation_file(str(path), mrml.scene)
    _check_loaded_segmentation(loaded, result, node)


def test_loading_a_missing_file_fails_cleanly(mrml, tmp_path):
    nodes = mrml.scene.GetNumberOfNodes()
    with pytest.raises(OSError, match="could not read"):
        load_segmentation_file(str(tmp_path / "missing.seg.nrrd"), mrml.scene)
    assert mrml.scene.GetNumberOfNodes() == nodes


def test_geometry_helper_matches_lib_geometry():
    """The oblique test grid is a proper rotation times the anisotropic spacing."""
    m = sh.oblique_ijk_to_ras()
    rotation = m[:3, :3] / np.array(sh.OBLIQUE_SPACING)
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-12)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    g = Geometry(sh.OBLIQUE_SPACING, (0.0, 0.0, 0.0), tuple((np.diag([-1, -1, 1]) @ rotation).ravel()))
    np.testing.assert_allclose(g.ijk_to_ras()[:3, :3], m[:3, :3], atol=1e-12)


# --- The whole Slicer-side run in one process (the module's child process: test_detection_job.py)


def test_run_detection_from_volume_node_to_output_nodes(mrml, tmp_path):
    """Volume node -> pipeline -> nodes, with the hand-wired dark-spot model of handmade.py.

    The model answers "dark = bleed", so the phantom's 4 mm and 7 mm dark spheres must come
    back as one small and one large lesion, at their places in RAS on an oblique grid.
    """
    from handmade import phantom, save_dark_spot_model

    from CMBDetectLib.detection.pipeline import Cancelled

    array, geometry, spheres = phantom()
    node = slicer.util.addVolumeFromArray(array, geometry.ijk_to_ras(), "phantom")
    params = DetectionParams(device="cpu", model=str(save_dark_spot_model(tmp_path / "dark-spot.safetensors")))
    steps: list[float] = []
    result, seg, table, markups = run_detection(node, params, progress=lambda f, m: steps.append(f))

    assert steps[0] == 0.0 and steps[-1] == 1.0 and np.all(np.diff(steps) >= -1e-9)  # never goes back
    assert sorted(l.size_class for l in result.lesions) == ["large", "small"]
    assert seg.GetSegmentation().GetNumberOfSegments() == 2
    assert table.GetTable().GetNumberOfRows() == 2 and markups.GetNumberOfControlPoints() == 2
    expected = {"small": spheres[0][0], "large": spheres[1][0]}  # (k, j, i) centres
    for n, lesion in enumerate(result.lesions):
        ck, cj, ci = expected[lesion.size_class]
        sphere_ras = (ijk_to_ras_of(node) @ [ci, cj, ck, 1.0])[:3]
        np.testing.assert_allclose(lesion_position_world(markups, n), sphere_ras, atol=1.5)  # within a voxel or so
    assert summary_of(seg)["model_id"] == "test-dark-spot"

    # Cancel: nothing is written, the previous outputs stay as they were.
    with pytest.raises(Cancelled):
        run_detection(node, params, segmentation_node=seg, cancel=lambda: True)
    assert seg.GetSegmentation().GetNumberOfSegments() == 2 and markups.GetNumberOfControlPoints() == 2


# --- Never destroy user data: only CMBDetect's own segmentations are refilled -------------


def segment_ids(seg_node) -> list[str]:
    segmentation = seg_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]


def test_a_foreign_segmentation_is_never_emptied(mrml):
    node = swi_node(mrml)
    manual = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reader 1 ground truth")
    manual.GetSegmentation().AddEmptySegment("my_bleed", "my bleed", [0.1, 0.9, 0.1])
    # A table reference planted on it must not make the user's table look like ours either.
    user_table = mrml.scene.AddNewNodeByClass("vtkMRMLTableNode", "user table")
    user_table.AddColumn().SetName("notes")
    manual.SetNodeReferenceID(TABLE_ROLE, user_table.GetID())
    assert not is_own_output(manual)

    seg, table, markups = write_result(make_result(node), node, segmentation_node=manual)

    assert seg is not manual and is_own_output(seg)
    assert segment_ids(manual) == ["my_bleed"]  # untouched
    assert table is not user_table and user_table.GetNumberOfColumns() == 1
    assert seg.GetSegmentation().GetNumberOfSegments() == 4
    assert all(is_own_output(n) for n in (seg, table, markups))


def test_a_foreign_segmentation_is_refilled_only_when_the_user_agreed(mrml):
    node = swi_node(mrml)
    manual = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "scratch")
    manual.GetSegmentation().AddEmptySegment("old")
    seg, _, _ = write_result(make_result(node), node, segmentation_node=manual, reuse_foreign=True)
    assert seg is manual and is_own_output(manual)
    assert segment_ids(manual) == [f"CMB_{n}" for n in range(1, 5)]
    # From now on it is CMBDetect's own: a plain re-run reuses it without asking.
    assert write_result(make_result(node, min_mm=4.0), node, segmentation_node=manual)[0] is manual


# --- Live threshold from the kept probability map ---------------------------------------


def test_probability_map_is_kept_hidden_on_the_input_grid(mrml):
    node = swi_node(mrml)
    result = make_result(node)
    seg, _, _ = write_result(result, node)
    kept = seg.GetNodeReference(PROBABILITY_ROLE)
    assert kept is not None and kept.IsA("vtkMRMLScalarVolumeNode")
    assert kept.GetHideFromEditors() and kept.GetDisplayNode() is None  # not shown, not offered as an input
    assert is_own_output(kept)
    np.testing.assert_array_equal(probability_of(seg), result.probability)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(kept), result.probability)
    np.testing.assert_allclose(ijk_to_ras_of(kept), ijk_to_ras_of(node), atol=1e-12)


def test_rethreshold_rewrites_segments_table_markups_and_summary_without_a_network(mrml):
    node = swi_node(mrml)
    probability = sphere_probability()  # sphere n has probability 0.6 + 0.05 n
    seg, table, markups = write_result(make_result(node, probability), node)
    nodes_before = mrml.scene.GetNumberOfNodes()

    # A threshold above the two first spheres' probability keeps only the others.
    result, seg2, table2, markups2 = rethreshold(seg, 0.67, 2.0, 10.0)
    expected_labels, expected_lesions = extract_lesions(probability, geometry_of_node(node), 0.67, 2.0, 10.0)
    assert (seg2, table2, markups2) == (seg, table, markups)
    assert mrml.scene.GetNumberOfNodes() == nodes_before
    assert 0 < len(result.lesions) == len(expected_lesions) < 4
    np.testing.assert_array_equal(result.labels, expected_labels)
    assert seg.GetSegmentation().GetNumberOfSegments() == len(expected_lesions)
    assert table.GetNumberOfRows() == len(expected_lesions) and markups.GetNumberOfControlPoints() == len(expected_lesions)
    for lesion in expected_lesions:
        np.testing.assert_array_equal(segment_array(seg, f"CMB_{lesion.id}", node), expected_labels == lesion.id)
        index = lesion_index(markups, lesion.id)
        np.testing.assert_allclose(lesion_position_world(markups, index), voxel_centroid_ras(node, expected_labels, lesion.id), atol=1e-6)
    summary = summary_of(seg)
    assert summary["threshold"] == 0.67 and summary["n_lesions"] == len(expected_lesions)
    assert summary["model_id"] == "test"  # the run's model is still named
    np.testing.assert_array_equal(probability_of(seg), probability)  # the map itself is unchanged

    # The size range acts the same way: only the large sphere is 5-10 mm.
    result, *_ = rethreshold(seg, 0.4, 5.0, 10.0)
    assert [l.size_class for l in result.lesions] == ["large"]
    assert summary_of(table)["size_range_mm"] == [5.0, 10.0]


def test_rethreshold_needs_a_kept_map(mrml):
    node = swi_node(mrml)
    plain = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "plain")
    with pytest.raises(ValueError, match="no probability map"):
        rethreshold(plain, 0.5, 2.0, 10.0)
    seg, _, _ = write_result(make_result(node), node)
    mrml.scene.RemoveNode(node)
    with pytest.raises(ValueError, match="no probability map and input volume"):
        rethreshold(seg, 0.5, 2.0, 10.0)


def test_markups_labels_are_off_by_default(mrml):
    node = swi_node(mrml)
    _, _, markups = write_result(make_result(node), node)
    assert markups.GetDisplayNode().GetPointLabelsVisibility() == 0


def test_rejected_candidates_are_grey_points_on_the_input_grid_labelled_while_few(mrml):
    node = swi_node(mrml)
    seg, _, _ = write_result(make_result(node), node)
    assert show_rejected(seg, node, None) is None  # a single-stage result: no node made
    ijk_to_ras = ijk_to_ras_of(node)

    def rows(n):
        return [Candidate(id=i + 1, n_voxels=10, volume_mm3=14.0, diameter_mm=3.0, size_class="small",
                          centroid_ijk=(3.5 + i, 7.25, 2.0), centroid_lps=(0.0, 0.0, 0.0), centroid_ras=(0.0, 0.0, 0.0),
                          mean_probability=0.5, max_probability=0.6, p_microbleed=0.1, reason="vein")
                for i in range(n)]  # fmt: skip

    few = show_rejected(seg, node, rows(3))
    assert seg.GetNodeReference(REJECTED_ROLE) is few and is_own_output(few)
    assert few.GetNumberOfControlPoints() == 3 and few.GetNthControlPointLabel(0) == "vein"
    np.testing.assert_allclose(few.GetNthControlPointPosition(1), (ijk_to_ras @ [4.5, 7.25, 2.0, 1.0])[:3], atol=1e-6)
    assert "P(microbleed) 0.10" in few.GetNthControlPointDescription(0) and few.GetLocked()
    assert few.GetDisplayNode().GetPointLabelsVisibility()
    many = show_rejected(seg, node, rows(MAX_REJECTED_LABELS + 1))
    assert many is few and many.GetNumberOfControlPoints() == MAX_REJECTED_LABELS + 1
    assert not many.GetDisplayNode().GetPointLabelsVisibility()  # tens of labels would cover the views
    assert show_rejected(seg, node, []) is few and few.GetNumberOfControlPoints() == 0


def test_manual_edits_since_the_module_wrote_the_segments_are_noticed(mrml, tmp_path):
    """Moving the threshold rewrites every segment: the module asks first when a reader has
    edited them. What counts as an edit: a voxel painted or erased, a segment added, removed or
    renamed. Re-writing (a run, a re-threshold) or saving and reloading the scene's file is not."""
    from CMBDetectLib.mrml.nodes import WRITTEN_ATTRIBUTE
    from CMBDetectLib.mrml.results import edited_since_written

    node = swi_node(mrml)
    seg, _, _ = write_result(make_result(node), node)
    assert not edited_since_written(seg)
    assert not edited_since_written(mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "never written"))

    first = seg.GetSegmentation().GetNthSegmentID(0)
    painted = segment_array(seg, first, node).copy()
    painted[0, 0, 0] = 1  # one voxel painted with the Segment Editor
    slicer.util.updateSegmentBinaryLabelmapFromArray(painted, seg, first, node)
    assert edited_since_written(seg)
    rethreshold(seg, 0.4, 2.0, 10.0)  # after the user agreed: written again, nothing edited
    assert not edited_since_written(seg)

    seg.GetSegmentation().GetNthSegment(1).SetName("reader's name")
    assert edited_since_written(seg)
    rethreshold(seg, 0.4, 2.0, 10.0)
    seg.GetSegmentation().RemoveSegment(first)
    assert edited_since_written(seg)
    rethreshold(seg, 0.4, 2.0, 10.0)
    seg.GetSegmentation().AddEmptySegment("missed lesion")
    assert edited_since_written(seg)

    rethreshold(seg, 0.4, 2.0, 10.0)
    save_segmentation_file(seg, tmp_path / "saved.seg.nrrd")
    reloaded = load_segmentation_file(tmp_path / "saved.seg.nrrd", mrml.scene)
    reloaded.SetAttribute(WRITTEN_ATTRIBUTE, seg.GetAttribute(WRITTEN_ATTRIBUTE))  # as a saved scene keeps it
    assert not edited_since_written(reloaded)


def test_points_are_small_hollow_glyphs_that_leave_the_dots_visible(mrml):
    """Slicer's default glyph (a filled 3D sphere, scale 3, projected into other slices) covers a
    2-5 mm bleed. Lesions and rejected candidates are drawn as small hollow 2D outlines of two
    shapes, in their own slice only."""
    node = swi_node(mrml)
    seg, _, markups = write_result(make_result(node), node)
    rejected = show_rejected(seg, node, [])
    default = slicer.vtkMRMLMarkupsFiducialDisplayNode()
    shapes = set()
    for points in (markups, rejected):
        display = points.GetDisplayNode()
        shapes.add(display.GetGlyphTypeAsString())
        assert display.GetGlyphTypeAsString() in ("Circle2D", "Square2D", "Diamond2D")
        assert display.GetUseGlyphScale() and display.GetGlyphScale() < default.GetGlyphScale()
        assert not display.GetSliceProjection() and not display.GetFillVisibility()
    assert len(shapes) == 2  # told apart by shape, not by colour alone


def make_rejected(n: int, reason: str = "vein") -> list:
    return [Candidate(id=i + 1, n_voxels=10, volume_mm3=14.0, diameter_mm=3.0 + i, size_class="small",
                      centroid_ijk=(3.5 + 2 * i, 7.25, 2.0), centroid_lps=(0.0, 0.0, 0.0), centroid_ras=(0.0, 0.0, 0.0),
                      mean_probability=0.5, max_probability=0.6, p_microbleed=0.1 * i, reason=reason,
                      class_probabilities={"microbleed": 0.1 * i, reason: 0.9 - 0.1 * i})
            for i in range(n)]  # fmt: skip


def test_rejected_candidates_get_a_table_with_their_reasons_and_a_jump_to_each(mrml):
    """Above a few rejections labels would cover the views: every reason is readable in a table
    (the command line's rejected-CSV columns), linked from the segmentation, and a row finds
    its point."""
    from CMBDetectLib.detection.records import REJECTED_COLUMNS, rejected_row
    from CMBDetectLib.mrml.navigation import rejected_index
    from CMBDetectLib.mrml.nodes import REJECTED_TABLE_ROLE

    node = swi_node(mrml)
    seg, _, _ = write_result(make_result(node), node)
    rejected = make_rejected(MAX_REJECTED_LABELS + 5)
    points = show_rejected(seg, node, rejected)
    table = seg.GetNodeReference(REJECTED_TABLE_ROLE)
    assert table is not None and table.IsA("vtkMRMLTableNode") and is_own_output(table) and table.GetLocked()
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == REJECTED_COLUMNS
    assert (table.GetColumnTitle("id"), table.GetColumnTitle("reason")) == ("Candidate", "Reason")
    assert table.GetNumberOfRows() == len(rejected)
    for r, candidate in enumerate(rejected):
        row = rejected_row(candidate)
        assert table.GetCellText(r, REJECTED_COLUMNS.index("reason")) == "vein"
        assert float(table.GetCellText(r, REJECTED_COLUMNS.index("p_microbleed"))) == pytest.approx(row["p_microbleed"])
        index = rejected_index(points, candidate.id)
        np.testing.assert_allclose(points.GetNthControlPointPosition(index), (ijk_to_ras_of(node) @ [*candidate.centroid_ijk, 1.0])[:3], atol=1e-6)
    assert rejected_index(points, len(rejected) + 1) is None
    assert show_rejected(seg, node, []) is points and table.GetNumberOfRows() == 0  # emptied with the points
    single_stage = make_result(node)
    write_result(single_stage, node, seg)
    assert seg.GetNodeReference(REJECTED_TABLE_ROLE) is table and table.GetNumberOfRows() == 0


def test_the_rejected_candidates_can_be_hidden_and_stay_hidden_through_a_rethreshold(mrml):
    from CMBDetectLib.mrml.display import set_rejected_visibility

    node = swi_node(mrml)
    seg, _, _ = write_result(make_result(node), node)
    assert set_rejected_visibility(seg, False) is None  # nothing to hide yet
    points = show_rejected(seg, node, make_rejected(3))
    assert points.GetDisplayNode().GetVisibility()
    assert set_rejected_visibility(seg, False) is points and not points.GetDisplayNode().GetVisibility()
    show_rejected(seg, node, make_rejected(2))  # refilled by a re-threshold: the reader's choice stays
    assert not points.GetDisplayNode().GetVisibility()
    set_rejected_visibility(seg, True)
    assert points.GetDisplayNode().GetVisibility()


def test_lesion_locations_reach_the_table_and_survive_a_rethreshold(mrml):
    """The MARS columns of the results table, and the same columns after the live threshold
    re-extracted the lesions (through the transform the run's summary keeps, no registration)."""
    import SimpleITK as sitk

    from CMBDetectLib.anatomy.locate import locate_lesions
    from CMBDetectLib.anatomy.register import TemplateRegistration

    node = swi_node(mrml)
    probability = sphere_probability()
    result = make_result(node, probability)
    # A registration that takes the first lesion to MNI (-12, -18, 8), LPS (12, 18, 8): the left thalamus.
    shift = sitk.AffineTransform(3)
    shift.SetTranslation(tuple(float(v) for v in np.array([12.0, 18.0, 8.0]) - np.array(result.lesions[0].centroid_lps)))
    registration = TemplateRegistration(shift, True, 0.9, -0.8, 0.0)
    result.anatomy = locate_lesions(volume_from_node(node), [l.centroid_lps for l in result.lesions], registration)
    for lesion, where in zip(result.lesions, result.anatomy.locations):
        lesion.mars_region, lesion.mars_structure, lesion.side = where.mars_region, where.mars_structure, where.side
    seg, table, _ = write_result(result, node)

    def column(name: str) -> list[str]:
        array = table.GetTable().GetColumnByName(name)
        return [array.GetValue(r) for r in range(table.GetNumberOfRows())]

    assert (column("mars_region")[0], column("mars_structure")[0], column("side")[0]) == ("deep", "thalamus", "left")
    assert column("mars_region") == [l.mars_region for l in result.lesions]
    assert table.GetColumnName(0) and table.GetTable().GetColumnByName("side").GetName() == "side"

    again, *_ = rethreshold(seg, 0.67, 2.0, 10.0)  # drops the first two spheres; ids start again at 1
    expected = locate_lesions(None, [l.centroid_lps for l in again.lesions], registration).locations
    assert again.lesions and [(l.mars_region, l.mars_structure, l.side) for l in again.lesions] == [
        (e.mars_region, e.mars_structure, e.side) for e in expected]
    assert column("mars_structure") == [e.mars_structure for e in expected]
    regions = summary_of(seg)["regions"]
    assert regions["n_lobar"] + regions["n_deep"] + regions["n_infratentorial"] + regions["n_region_unknown"] == len(again.lesions)
    assert regions["registration"]["passed"] is True
