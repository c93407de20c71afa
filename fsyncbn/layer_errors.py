"""How a synchronized layer names itself in errors, and the fix each of its checks suggests.

A layer is named by its class and its qualified name in the model, e.g.
``SynchronizedBatchNorm2d 'features.1'``. The name comes from where the layer was attached:
fsyncbn records each module's parent and attribute name when a module is registered in
another (torch's module-registration hook, installed at import; the records are weak and go
with their modules), and walks them up to the outermost module when an error needs the name.
Copies made without registration (DataParallel replicas, a deepcopy) keep the name given at
:func:`name_layers`, which :func:`fsyncbn.convert_model`, DataParallelWithCallback and
:class:`fsyncbn.Join` call; a layer attached nowhere is named by its class and channel count.
"""

import weakref

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from .functional.agreement import SynchronizationError

__all__ = ["explained", "labelled", "layer_label", "name_layers", "rank_error"]

# Where each module was last registered: child -> (parent, attribute name). Weak both ways.
_attached: "weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref[nn.Module], str]]" = (
    weakref.WeakKeyDictionary()
)


def _record_attachment(parent: nn.Module, name: str, child: "nn.Module | None") -> None:
    if child is not None:
        _attached[child] = (weakref.ref(parent), name)


register_module_module_registration_hook(_record_attachment)

_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def _attached_name(layer: nn.Module) -> "str | None":
    """The dotted path from the outermost module holding ``layer`` down to it, from the
    attachment records (a wrapper's ``module`` is the model's root), or None."""
    path: list[str] = []
    child, seen = layer, {id(layer)}
    while True:
        link = _attached.get(child)
        parent = link[0]() if link is not None else None
        if link is None or parent is None or parent._modules.get(link[1]) is not child:
            break  # never attached, or detached since
        if isinstance(parent, _WRAPPERS) or id(parent) in seen:
            break
        seen.add(id(parent))
        path.append(link[1])
        child = parent
    return ".".join(reversed(path)) or None


def layer_label(layer: nn.Module) -> str:
    """``SynchronizedBatchNorm2d 'features.1'`` (``SynchronizedBatchNorm2d(64)`` unnamed)."""
    name = _attached_name(layer) or getattr(layer, "qualified_name", None)
    if name:
        return f"{type(layer).__name__} {name!r}"
    return f"{type(layer).__name__}({getattr(layer, 'num_features', '?')})"


def name_layers(root: nn.Module) -> None:
    """Give every layer of ``root`` that declares a ``qualified_name`` (fsyncbn's layers) its
    dotted path in ``root``, for copies that will not be registered anywhere (replicas); the
    wrapped module of a DataParallel or DDP is the root."""
    if isinstance(root, _WRAPPERS):
        root = root.module
    for name, module in root.named_modules():
        if hasattr(type(module), "qualified_name"):
            module.qualified_name = name or "<the model itself>"


# The fix that goes with each argument or input check a layer can fail (constructor, input rank,
# the functional op's checks), where the check's own message offers none: (what the message
# says, what to do).
_FIXES = (
    ("more than 1 value per channel", "use at least 2 values per channel in each training step "
     "(a batch of 2 or more), or call model.eval() to normalise with the running statistics"),
    ("floating-point input", "pass input.float() (or the dtype of the layer)"),
    ("channels (from", "give the layer input with num_features channels, or build it with "
     "num_features set to the input's C"),
    ("to be floating point", "keep the layer's parameters and buffers floating point: model.float()"),
    (" of shape (", "keep the layer's weight, bias and running statistics of shape (num_features,)"),
    ("to be a torch.Tensor or None", "assign tensors (or None) to the layer's weight and bias"),
    ("momentum", "set momentum to a float in [0, 1], or None for a cumulative average"),
    ("eps_mode", "set eps_mode to 'plus' (torch's), 'clamp' (the original package's) or None"),
    ("eps", "set eps to a positive float such as 1e-5"),
    ("num_features > 0", "pass the number of channels C of the input"),
    ("num_features to be", "pass the number of channels C of the input, an int"),
    ("to be a torch.Tensor", "call the layer on a tensor of shape (N, C, *)"),
)


def explained(exc: BaseException, label: "str | None" = None) -> BaseException:
    """A TypeError/ValueError ``exc`` whose message names ``label`` (in place of the function
    or class it names) and ends with the fix; other exceptions unchanged."""
    if type(exc) not in (TypeError, ValueError):
        return exc
    message = str(exc)
    if label is not None and not message.startswith(label):
        head, sep, tail = message.partition(": ")
        message = f"{label}: {tail}" if sep and " " not in head else f"{label}: {message}"
    if ";" not in message:
        fix = next((fix for key, fix in _FIXES if key in message), None)
        if fix is not None:
            message = f"{message}; {fix}"
    return exc if message == str(exc) else type(exc)(message)


def rank_error(cls_name: str, expected: str, dim: int) -> str:
    """A wrong input rank, and the class that takes it (TorchScript compiles this too)."""
    right = ""
    if dim == 2 or dim == 3:
        right = "SynchronizedBatchNorm1d"
    elif dim == 4:
        right = "SynchronizedBatchNorm2d"
    elif dim == 5:
        right = "SynchronizedBatchNorm3d"
    fix = "use SyncBatchNorm, which takes any rank from 2"
    if dim < 2:
        fix = "give it input of shape (N, C, *)"
    elif right != "":
        fix = "for " + str(dim) + "D input use " + right + " (or SyncBatchNorm, any rank from 2)"
    return f"{cls_name}: expected {expected} input (got {dim}D input); {fix}"


def labelled(exc: BaseException, layer: nn.Module) -> BaseException:
    """``exc`` as ``layer`` raises it: a TypeError/ValueError (a check) names the layer in place
    of the op, with the fix; a SynchronizationError not yet naming the layer gets its name;
    anything else is unchanged."""
    if type(exc) in (TypeError, ValueError):
        return explained(exc, layer_label(layer))
    if not isinstance(exc, SynchronizationError):
        return exc
    label = layer_label(layer)
    return exc if str(exc).startswith(label) else SynchronizationError(f"{label}: {exc}")
