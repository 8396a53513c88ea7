"""OncoPilotLib: promptable CT tumour segmentation and RECIST / volumetric measurement.

Pure Python (numpy, torch, SimpleITK): no slicer, qt, vtk or ctk imports, so the same code runs in
3D Slicer's Python and headless from the ``oncopilot`` command. Heavy modules (torch) are imported by
the submodules that need them, not here.
"""

__version__ = "0.1.0"
