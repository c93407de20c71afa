"""Stateful batch-norm layers: SynchronizedBatchNorm1d/2d/3d and SyncBatchNorm.

Each training forward takes one path: the context picks a *route*, a reducer and a commit
policy; the layer's buffers go through the functional op (:func:`fsyncbn.functional.ops.
run_batch_norm`) with that reducer; the route commits the new statistics. Behaviour
(numerics, checks, empty batches) is documented once, in :mod:`fsyncbn.functional`.

The routes, in training:

(a) a replica inside :class:`fsyncbn.DataParallelWithCallback` (or a patched nn.DataParallel)
    sums with the other replicas of the same forward and *stages* its new statistics: they
    are written only once every replica's forward has succeeded;
(b) with torch.distributed initialised and ``process_group`` (default WORLD) of size > 1,
    the layer sums over the ranks of that group and *journals* its writes: the values from
    before the step are kept, and restored in every layer of the step if any of them fails
    (see :mod:`fsyncbn.step_journal`; under torch.compile writes are not journaled); inside
    :class:`fsyncbn.Join` the sums are announced, on fsyncbn's own copy of the group, so that
    ranks out of data can answer them (see :mod:`fsyncbn.join`);
(c) otherwise nobody: the layer *writes* in place, and is nn.BatchNormXd bit for bit.

In eval mode the running statistics are used and nothing is synchronised or written.
"""

# No `from __future__ import annotations`: TorchScript reads these annotations at runtime.
import gc
import inspect
import warnings
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from .functional.agreement import SynchronizationError
from .functional.checks import EPS_MODES, check_hyperparameters
from .functional.ops import run_batch_norm
from .functional.state import STATE_KEYS, State, check_num_features
from .join import announced_reducer
from .recompute import RecomputeCache, is_recomputing, may_be_recomputed
from .reducers import ProcessGroupReducer
from .replicas import ReplicaGroup
from .step_journal import StepJournal, journal_for, roll_back_thread

__all__ = [
    "SyncBatchNorm",
    "SynchronizedBatchNorm1d",
    "SynchronizedBatchNorm2d",
    "SynchronizedBatchNorm3d",
    "SynchronizedBatchNormBase",
    "get_sbn_eps_mode",
    "layer_label",
    "roll_back_step",
    "set_sbn_eps_mode",
    "transfer_batch_norm",
]

# Older torch has no ``bias`` keyword on batch norm; offer it where the installed one does.
TORCH_HAS_BIAS = "bias" in inspect.signature(_NormBase.__init__).parameters

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
        raise ValueError(f"set_sbn_eps_mode: expected 'plus' or 'clamp', got {mode!r}")
    _default_eps_mode = mode


def get_sbn_eps_mode() -> str:
    """The eps mode used by layers built without an explicit ``eps_mode``."""
    return _default_eps_mode


def roll_back_step() -> None:
    """Undo the running-statistics writes of the current training step (torch.distributed path).

    fsyncbn does this by itself when a synchronized layer fails, on every rank that sees the
    failure. Call it when your own code raises in the middle of a step, so that this rank too
    keeps nothing of it. It undoes the steps of the calling thread, on every process group.
    The replica path (DataParallel) never writes a failed step, and the local path has
    nothing to undo.

    Example:
        >>> roll_back_step()  # nothing to undo outside a step
    """
    roll_back_thread()


def layer_label(layer: nn.Module) -> str:
    """How errors name a layer: ``SynchronizedBatchNorm2d 'features.1'``, its class and its
    qualified name in the model that holds it (found when first needed)."""
    name = getattr(layer, "qualified_name", None)
    if name is None:
        name = _find_qualified_name(layer)
    return f"{type(layer).__name__} {name!r}" if name else f"{type(layer).__name__}({layer.num_features})"


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


def _explained(exc: BaseException, label: str | None = None) -> BaseException:
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


def _rank_error(cls_name: str, expected: str, dim: int) -> str:
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


def _find_qualified_name(layer: nn.Module) -> str | None:
    """The dotted path from the outermost module holding ``layer`` down to it, or None.

    Only on error paths: it asks the garbage collector which modules hold the layer, since a
    layer is not told where it is registered.
    """
    path: list[str] = []
    child: nn.Module = layer
    seen = {id(layer)}
    while True:
        parent = _parent_of(child)
        if parent is None or id(parent[0]) in seen:
            break
        seen.add(id(parent[0]))
        owner, key = parent
        if isinstance(owner, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            break  # the user's model is the wrapped module
        path.append(key)
        child = owner
    return ".".join(reversed(path)) or None


def _parent_of(child: nn.Module) -> tuple[nn.Module, str] | None:
    for holder in gc.get_referrers(child):
        if not isinstance(holder, dict):
            continue
        key = next((k for k, v in holder.items() if v is child), None)
        if key is None:
            continue
        for owner in gc.get_referrers(holder):
            if isinstance(owner, nn.Module) and owner.__dict__.get("_modules") is holder:
                return owner, key
            if isinstance(owner, dict) and owner.get("_modules") is holder:
                for module in gc.get_referrers(owner):
                    if isinstance(module, nn.Module) and module.__dict__ is owner:
                        return module, key
    return None


class _Route(NamedTuple):
    """How one training forward of a layer synchronises and commits (see the module doc)."""

    reducer: Callable[[Tensor], Tensor] | None
    in_place: bool  # the functional op writes the buffers itself
    journal: StepJournal | None
    commit: bool = True  # False: a checkpoint's recomputation keeps no statistics


_LOCAL_ROUTE = _Route(None, True, None)


class _JournaledReducer:
    """The process-group reducer of one layer call: a failure, also in backward (which may
    run on another thread), rolls back the step of the journal the forward used, and names
    the layer.

    The autograd graph keeps it until the graph is freed (a kept loss keeps it), so it holds
    the layer weakly: a graph must not keep a dropped model alive.
    """

    def __init__(
        self, layer: "SynchronizedBatchNormBase", journal: StepJournal,
        reducer: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.reducer = reducer if reducer is not None else layer._process_group_reducer
        self.layer = weakref.ref(layer)
        self.journal = journal

    def __call__(self, t: Tensor) -> Tensor:
        try:
            return self.reducer(t)
        except BaseException as exc:
            self.journal.roll_back()
            layer = self.layer()
            labelled = exc if layer is None else layer._labelled(exc)
            if labelled is exc:
                raise
            raise labelled from exc


class SynchronizedBatchNormBase(_BatchNorm):
    """Shared body of the synchronized layers; see the module docstring."""

    # TorchScript: the scripted forward is torch's local batch norm (see _torch_forward);
    # what only Python needs stays out of the script.
    eps_mode: Optional[str]  # noqa: UP045 - TorchScript reads this annotation
    __jit_unused_properties__ = ["process_group"]
    __jit_ignored_attributes__ = [
        "_process_group_reducer", "_replica", "_staged_state", "_validated", "_recompute",
    ]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        process_group: dist.ProcessGroup | None = None,
        eps_mode: str | None = None,
    ) -> None:
        name = type(self).__name__
        try:
            check_num_features(name, num_features)
            check_hyperparameters(name, momentum, eps, eps_mode or "plus")
        except (TypeError, ValueError) as exc:
            raise _explained(exc) from None
        extra = {"bias": bias} if TORCH_HAS_BIAS else {}
        if not bias and not TORCH_HAS_BIAS:
            raise TypeError(f"{name}: bias=False needs a torch whose BatchNorm has `bias`; upgrade "
                            "torch, or keep bias=True and freeze it: layer.bias.requires_grad_(False)")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **extra
        )
        self.eps_mode = eps_mode
        self._process_group_reducer = _layer_reducer(name, process_group)
        self._replica: tuple[ReplicaGroup, int] | None = None
        self._staged_state: State | None = None
        self._validated: tuple | None = None  # the configuration the last forward checked

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The torch.distributed group this layer synchronises over (None: WORLD)."""
        return self._process_group_reducer.group

    @process_group.setter
    def process_group(self, group: dist.ProcessGroup | None) -> None:
        self._process_group_reducer = _layer_reducer(type(self).__name__, group)

    def attach_replica(self, group: ReplicaGroup | None, replica: int = 0) -> None:
        """Make this layer replica ``replica`` of ``group`` (None detaches it).

        Called by the DataParallel replication callback; not needed otherwise. While
        attached, new running statistics are staged, not written: the callback commits
        them (:meth:`commit_staged_state`) once every replica's forward has succeeded.
        """
        self._replica = None if group is None else (group, replica)
        if group is not None:  # a replica's checkpoint statistics are its own, not its origin's
            self.__dict__.pop("_recompute", None)

    def commit_staged_state(self, keep: bool) -> None:
        """Write the staged running statistics into the buffers (``keep``), or drop them."""
        staged, self._staged_state = self._staged_state, None
        if keep and staged is not None:
            with torch.no_grad():
                for key in STATE_KEYS:
                    getattr(self, key).copy_(staged[key])

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            self._check_input_dim(input)
            return self._torch_forward(input)
        return self._forward(input)

    @torch.jit.unused
    def _forward(self, input: Tensor) -> Tensor:
        """The one path: route, then buffers -> functional op -> commit."""
        try:
            if not isinstance(input, Tensor):
                raise TypeError(f"expected input to be a torch.Tensor, got {type(input).__name__}")
            self._check_input_dim(input)
        except (TypeError, ValueError) as exc:
            raise self._labelled(exc) from None
        route = self._route()
        state = self._state()
        eps_mode = self.eps_mode or _default_eps_mode
        # The argument checks depend only on this configuration: validated once, not per call.
        configuration = (
            input.dim(), input.shape[1] if input.dim() > 1 else 0, input.dtype, self.training,
            self.momentum, self.eps, eps_mode, route.reducer is None, id(self.weight), id(self.bias),
            *(id(t) for t in (state or {}).values()),
        )
        checked = configuration == self._validated
        if route.journal is not None:
            route.journal.layer_starts(self)
            if state is not None:
                route.journal.layer_writes(self)
        try:
            output, new_state = self._batch_norm_op(
                input, state, reducer=route.reducer, eps_mode=eps_mode, in_place=route.in_place,
                checked=checked,
            )
            if not checked:
                self._validated = configuration
        except BaseException as exc:
            if route.journal is not None:
                route.journal.roll_back()
            labelled = self._labelled(exc)
            if labelled is exc:
                raise
            raise labelled from exc
        if self.training and not route.in_place and route.commit:
            self._staged_state = new_state
        if route.journal is not None:
            route.journal.layer_returns(self, output)
        return output

    @torch.jit.unused
    def _batch_norm_op(
        self, input: Tensor, state: State | None, *, reducer: Callable[[Tensor], Tensor] | None,
        eps_mode: str, in_place: bool, checked: bool,
    ) -> tuple[Tensor, State | None]:
        """The functional op of this layer (a subclass may supply another, as InPlaceABN):
        ``in_place`` writes the new statistics into ``state``, ``checked`` skips the argument
        checks of a configuration validated before."""
        return run_batch_norm(
            "batch_norm", input, state, self.weight, self.bias, training=self.training,
            momentum=self.momentum, eps=self.eps, reducer=reducer, eps_mode=eps_mode,
            in_place=in_place, checked=checked,
        )

    @torch.jit.unused
    def _route(self) -> _Route:
        """Pick the reducer and commit policy of this forward (see the module docstring);
        under activation checkpointing, see :mod:`fsyncbn.recompute`."""
        route = self._sync_route()
        if not self.training or torch.compiler.is_compiling():
            return route
        if is_recomputing():
            replay = self._recompute_cache().replaying()
            return _Route(replay or route.reducer, False, None, commit=False)
        if may_be_recomputed():
            if route.reducer is None:
                self._recompute_cache().clear()
            else:
                return route._replace(reducer=self._recompute_cache().recording(route.reducer))
        return route

    @torch.jit.unused
    def _recompute_cache(self) -> RecomputeCache:
        cache = self.__dict__.get("_recompute")
        if cache is None:
            cache = self.__dict__.setdefault("_recompute", RecomputeCache())
        return cache

    @torch.jit.unused
    def _sync_route(self) -> _Route:
        if not self.training:
            return _LOCAL_ROUTE
        if self._replica is not None:
            group, replica = self._replica
            return _Route(group.reducer(replica), False, None)
        if dist.is_available() and dist.is_initialized():
            announced = announced_reducer(self)  # inside fsyncbn.Join: see fsyncbn.join
            if announced is not None:
                journal = journal_for(announced.group)
                return _Route(_JournaledReducer(self, journal, announced), True, journal)
            group = self.process_group
            if dist.get_world_size(group) > 1:
                if torch.compiler.is_compiling():
                    return _Route(self._process_group_reducer, True, None)
                journal = journal_for(group if group is not None else dist.group.WORLD)
                return _Route(_JournaledReducer(self, journal), True, journal)
        return _LOCAL_ROUTE

    @torch.jit.unused
    def _state(self) -> State | None:
        """The running statistics this forward starts from, or None when it uses none."""
        if self.running_mean is None or (self.training and not self.track_running_stats):
            return None
        # A replica calling the layer again in the same forward continues from its staged
        # (not yet written) state.
        if self._staged_state is not None:
            return self._staged_state
        buffers = self._buffers
        return {key: buffers[key] for key in STATE_KEYS}

    @torch.jit.unused
    def _labelled(self, exc: BaseException) -> BaseException:
        """``exc``, or for a SynchronizationError not yet naming this layer, one that does; a
        TypeError/ValueError (a check) names the layer in place of the op, and the fix."""
        if type(exc) in (TypeError, ValueError):
            return _explained(exc, layer_label(self))
        if not isinstance(exc, SynchronizationError):
            return exc
        label = layer_label(self)
        if str(exc).startswith(label):
            return exc
        return SynchronizationError(f"{label}: {exc}")

    def _torch_forward(self, input: Tensor) -> Tensor:
        """nn.BatchNorm's own computation, without synchronisation, updating the buffers in
        place: the forward under TorchScript.

        TorchScript cannot compile the functional op (keyword-only defaults, Literal,
        torch.distributed), so a scripted layer is local, serves eps_mode "plus" only, and
        does not see set_sbn_eps_mode.
        """
        eps_mode = self.eps_mode
        if eps_mode is not None and eps_mode == "clamp":
            raise RuntimeError("a scripted synchronized batch norm supports eps_mode 'plus' only; "
                               "set layer.eps_mode = None before torch.jit.script")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            num_batches_tracked = self.num_batches_tracked
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            input, self.running_mean if track else None, self.running_var if track else None,
            self.weight, self.bias, use_batch_stats, factor, self.eps,
        )

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.eps_mode is not None:
            text += f", eps_mode={self.eps_mode!r}"
        return text

    @classmethod
    def from_batchnorm(
        cls, module: _BatchNorm, process_group: dist.ProcessGroup | None = None
    ) -> "SynchronizedBatchNormBase":
        """A layer of this class holding ``module``'s very parameters, buffers and flags."""
        eps_mode = module.eps_mode if isinstance(module, SynchronizedBatchNormBase) else None
        return transfer_batch_norm(module, cls, process_group=process_group, eps_mode=eps_mode)


def _layer_reducer(name: str, group: Any) -> ProcessGroupReducer:
    """A layer's process-group reducer; a bad ``process_group`` is named as the layer's."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{name}: expected process_group to be a torch.distributed.ProcessGroup (for example "
            f"from torch.distributed.new_group(ranks) or fsyncbn.sync_groups) or None for WORLD, "
            f"got {type(group).__name__} {group!r}"
        )
    return ProcessGroupReducer(group, name=None)


def transfer_batch_norm(source: _BatchNorm, cls: type[nn.Module], **kwargs: Any) -> nn.Module:
    """Build ``cls`` from ``source``'s hyper-parameters and hand it the same tensors.

    Parameters and buffers are shared, not copied (as torch's convert_sync_batchnorm), so
    dtype, device, requires_grad and every value are kept; so are the training flag and a
    qconfig.
    """
    extra = {"bias": source.bias is not None} if TORCH_HAS_BIAS and source.affine else {}
    target = cls(
        source.num_features, source.eps, source.momentum, source.affine,
        source.track_running_stats, device="meta", **extra, **kwargs,
    )
    for name in ("weight", "bias"):
        setattr(target, name, getattr(source, name))
    for name in STATE_KEYS:
        setattr(target, name, getattr(source, name))
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    return target
class SynchronizedBatchNorm1d(SynchronizedBatchNormBase):
    """nn.BatchNorm1d whose training statistics span all participants.

    Input ``(N, C)`` or ``(N, C, L)``. Arguments as nn.BatchNorm1d, plus keyword-only
    ``process_group`` (torch.distributed group, default WORLD) and ``eps_mode`` (see
    :func:`fsyncbn.functional.batch_norm`; None follows :func:`set_sbn_eps_mode`).

    Example:
        >>> import torch
        >>> bn = SynchronizedBatchNorm1d(4)
        >>> bn(torch.randn(8, 4)).shape
        torch.Size([8, 4])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(_rank_error("SynchronizedBatchNorm1d", "2D or 3D", input.dim()))


class SynchronizedBatchNorm2d(SynchronizedBatchNormBase):
    """nn.BatchNorm2d whose training statistics span all participants.

    Input ``(N, C, H, W)``. Arguments as :class:`SynchronizedBatchNorm1d`.

    Example:
        >>> import torch
        >>> bn = SynchronizedBatchNorm2d(3, eps_mode="clamp")
        >>> bn(torch.randn(2, 3, 4, 4)).shape
        torch.Size([2, 3, 4, 4])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(_rank_error("SynchronizedBatchNorm2d", "4D", input.dim()))


class SynchronizedBatchNorm3d(SynchronizedBatchNormBase):
    """nn.BatchNorm3d whose training statistics span all participants.

    Input ``(N, C, D, H, W)``. Arguments as :class:`SynchronizedBatchNorm1d`.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(_rank_error("SynchronizedBatchNorm3d", "5D", input.dim()))


class SyncBatchNorm(SynchronizedBatchNormBase):
    """Drop-in for torch.nn.SyncBatchNorm: same constructor, any input rank from 2 to 5.

    Unlike torch's, it also runs on CPU (gloo), syncs DataParallel replicas, sends O(C)
    numbers per layer whatever the world size, and compiles without graph breaks.

    Example:
        >>> import torch
        >>> bn = SyncBatchNorm(3)
        >>> bn(torch.randn(4, 3, 5)).shape
        torch.Size([4, 3, 5])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        eps_mode: str | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, process_group=process_group, eps_mode=eps_mode,
        )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(_rank_error("SyncBatchNorm", "at least 2D", input.dim()))

    @classmethod
    def convert_sync_batchnorm(
        cls, module: nn.Module, process_group: dist.ProcessGroup | None = None
    ) -> nn.Module:
        """Replace every batch-norm layer in ``module`` by an fsyncbn.SyncBatchNorm.

        As torch.nn.SyncBatchNorm.convert_sync_batchnorm: parameters and buffers are
        shared with the originals; a batch-norm ``module`` itself is returned converted.
        Unlike torch's, a subclass (timm's BatchNormAct2d, which adds an activation) is left
        as it is, with a warning, since a SyncBatchNorm would not compute what it computes;
        :func:`fsyncbn.convert_model` knows timm's layers and registered ones.
        """
        converted = module
        if type(module) in _PLAIN_BATCH_NORMS:
            converted = cls.from_batchnorm(module, process_group)
        elif isinstance(module, _BatchNorm) and not isinstance(module, SynchronizedBatchNormBase):
            warnings.warn(
                f"SyncBatchNorm.convert_sync_batchnorm: left {type(module).__module__}."
                f"{type(module).__qualname__} unconverted, since a subclass may compute something else "
                "than its base class; fsyncbn.convert_model converts timm's layers and those of "
                "fsyncbn.register_conversion", UserWarning, stacklevel=2,
            )
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted


# What convert_sync_batchnorm converts: the classes whose computation a SyncBatchNorm repeats.
_PLAIN_BATCH_NORMS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    SynchronizedBatchNorm1d, SynchronizedBatchNorm2d, SynchronizedBatchNorm3d,
)
