"""Sub-commands of the ``oncopilot`` command line (one module each, discovered automatically)."""
