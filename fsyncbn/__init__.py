"""fsyncbn: synchronized batch norm for PyTorch."""

from . import functional, reducers
from .reducers import LocalReducer, ProcessGroupReducer

__version__ = "0.1.0"

__all__ = ["LocalReducer", "ProcessGroupReducer", "functional", "reducers"]
