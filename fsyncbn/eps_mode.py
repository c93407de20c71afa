"""The process-wide default eps mode of the synchronized layers (the original package's
``set_sbn_eps_mode``): the one piece of layer configuration that is global."""

from __future__ import annotations

from .functional.checks import EPS_MODES

__all__ = ["get_sbn_eps_mode", "set_sbn_eps_mode"]

_default_eps_mode = "plus"


def set_sbn_eps_mode(mode: str) -> None:
    """Set the eps mode of every layer built without an explicit ``eps_mode``.

    As in the original Synchronized-BatchNorm-PyTorch, it takes effect at forward time.

    Args:
        mode: ``"plus"`` (``sqrt(var + eps)``, torch's, the default) or ``"clamp"``
            (``sqrt(max(var, eps))``, the original package's).

    Raises:
        ValueError: unknown mode.

    Example:
        >>> set_sbn_eps_mode("clamp"); get_sbn_eps_mode()
        'clamp'
        >>> set_sbn_eps_mode("plus")
    """
    global _default_eps_mode
    if mode not in EPS_MODES:
        raise ValueError(
            f"set_sbn_eps_mode: expected 'plus' or 'clamp', got {mode!r}; 'plus' is torch's "
            "sqrt(var + eps), 'clamp' the original package's sqrt(max(var, eps))"
        )
    _default_eps_mode = mode


def get_sbn_eps_mode() -> str:
    """The eps mode used by layers built without an explicit ``eps_mode``."""
    return _default_eps_mode
