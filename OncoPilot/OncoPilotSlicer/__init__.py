"""Slicer-side helpers of the OncoPilot module: MRML <-> numpy (no Qt), the worker thread, the self-test.

Everything here runs in Slicer's Python and on slicer-core (MRML without the application), so pytest can
exercise it on a real MRML scene. The Qt widget lives in ``OncoPilot.py`` only.
"""
