"""Collection rules for the whole tree (pytest also imports the package's modules for doctests)."""

import importlib.util

# The CUDA path's glue kernels need Triton, an optional dependency (it ships with CUDA builds
# of torch).
collect_ignore = (
    [] if importlib.util.find_spec("triton") is not None
    else ["fsyncbn/functional/paths/cuda_glue.py"]
)
