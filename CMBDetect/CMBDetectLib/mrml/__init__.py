"""The MRML adapter: numpy + Geometry <-> vtkMRML nodes. The only core file that imports slicer.

It uses only what both the Slicer application and slicer-core provide (node classes, storage
nodes, static logic methods), never `slicer.app`, `slicer.util.loadVolume`/`saveNode` or Qt,
so it is tested headless against slicer-core's real scene.

Modules: `nodes` (grids, roles, files), `display` (segments, table, points), `results`
(write_result, the live threshold), `navigation` (jump to a lesion), `job` (the child-process run).
"""
