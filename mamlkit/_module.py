r"""Your own ``torch.nn.Module`` as mamlkit's ``(params, model_fn)``.

``params, model_fn = from_module(module)`` gives the module's parameters as a plain dict and a
function ``model_fn(params, x)`` that runs the module's forward with *those* parameters
(``torch.func.functional_call``), so every engine — ``maml_grad``, ``hvp``, ``meta_batch_grad``
on every backend, ``meta_train`` — differentiates through the module as through a formula.

``params`` are views of the module's parameters: the same storage, no autograd history. So a
``torch.optim`` optimizer stepping ``module.parameters()`` moves the point where the next
meta-gradient is taken — the loop of the README trains the module — while mamlkit itself never
writes to them. (``module.to(...)`` makes new tensors: call ``from_module`` again after it.)

``model_fn`` runs the module in the training mode it had when ``from_module`` was called. A
forward that draws random numbers — ``nn.Dropout(p > 0)`` in training mode, ``F.dropout`` with
``training=True`` — is refused when the loss runs (every engine evaluates losses under
:func:`mamlkit._checks.exact_passes`), as is any other random operation: a meta-gradient needs the
same function in its inner and outer passes. Attention runs with the math kernel, whose second
derivative torch implements on every device.

BatchNorm is the one layer whose forward has state (its running statistics). The MAML reference
code normalises with the statistics of the batch at hand, in the inner loop and at query time;
``batch_norm="batch"`` (the default) does the same and never reads or writes the running
statistics. That evaluation is *transductive*: a query image is normalised with the statistics
of the other query images of its task, so predictions depend on which images are scored together
(cbfinn/maml issue #9 and openai/supervised-reptile issue #12 discuss it); score whole query sets,
as the paper does. ``batch_norm="running"``
normalises with the module's stored running statistics, frozen (an inductive evaluation, as
``module.eval()``). ``torch.func`` refuses the usual train-mode BatchNorm because it updates its
running statistics in place, a mutation of a tensor the transformed function captured; neither
mode here mutates anything, which is also why the caller's module is never changed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._params import Params

BatchNormMode = Literal["batch", "running"]
_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)
_DROPOUTS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


@dataclass(frozen=True, eq=False)
class ModuleFn:
    """``model_fn(params, x)``: a private copy of a module, run with the given parameters.

    Attributes:
        module: the copy (in the mode ``batch_norm`` asks for); never the caller's module.
        batch_norm: ``"batch"`` or ``"running"``.
        unbatchable: the names of layers ``torch.func.vmap`` cannot batch (recurrent layers:
            torch's RNN kernels write in place); the meta-batch backends that vmap refuse them.
    """

    module: nn.Module = field(repr=False)
    batch_norm: str
    buffers: dict[str, Tensor] = field(repr=False, default_factory=dict)
    unbatchable: tuple[str, ...] = ()

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        if self.buffers:
            return functional_call(self.module, (params, self.buffers), (x,), strict=True)
        return functional_call(self.module, params, (x,), strict=True)


class _Norm(nn.Module):
    """BatchNorm written with plain tensor operations (the same parameters, names and numbers).

    ``torch.func``'s vmap-based transforms (``jacrev``, ``hessian``, ``vmap`` of a
    vector-Jacobian product) give silently wrong second derivatives through the native
    ``batch_norm`` kernel in training mode with no running statistics (a Hessian that is not even
    symmetric, measured in mamlkit's tests against finite differences); these operations have
    exact batching rules. ``stats``: ``"batch"`` normalises with the statistics of the input over
    every dimension but the channels, ``"running"`` with the given running statistics.
    """

    def __init__(self, source: nn.modules.batchnorm._BatchNorm, stats: str) -> None:
        super().__init__()
        self.eps, self.stats, self.affine = source.eps, stats, source.affine
        if source.affine:
            self.weight, self.bias = source.weight, source.bias
        if stats == "running":
            self.register_buffer("running_mean", source.running_mean.detach().clone())
            self.register_buffer("running_var", source.running_var.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if self.stats == "batch":
            dims = [0, *range(2, x.ndim)]
            mean = x.mean(dims, keepdim=True)
            var = ((x - mean) ** 2).mean(dims, keepdim=True)  # biased, as BatchNorm normalises
        else:
            mean, var = self.running_mean.view(shape), self.running_var.view(shape)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def _replace_norms(module: nn.Module, stats: str) -> None:
    for name, child in module.named_children():
        if isinstance(child, _BATCH_NORMS):
            setattr(module, name, _Norm(child, stats))
        else:
            _replace_norms(child, stats)


def from_module(
    module: nn.Module, *, batch_norm: BatchNormMode = "batch"
) -> tuple[Params, ModuleFn]:
    r"""``(params, model_fn)`` of a ``torch.nn.Module``, for every mamlkit engine.

    Args:
        module: any module whose forward takes one tensor; never changed (parameters, buffers,
            running statistics, ``num_batches_tracked`` and the training flag stay as they are).
        batch_norm: ``"batch"``: every call normalises with the statistics of its own ``x`` and
            ignores the running statistics (the MAML reference code; transductive, see the
            module docstring); ``"running"``: the stored running statistics, frozen.

    Returns:
        ``params``: the parameters in ``named_parameters()`` order, detached views of the
        module's own tensors (an optimizer stepping the module moves them; mamlkit never writes
        them); ``model_fn``: a :class:`ModuleFn`, ``model_fn(params, x)`` = the module's forward
        in its training mode.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: an unknown ``batch_norm``; a module without parameters; dropout with p > 0
            in training mode (its random masks would differ between the inner and outer passes
            of a meta-gradient); a ``"running"`` BatchNorm without running statistics; buffers
            outside BatchNorm layers (state mamlkit would not carry).

    Example:
        >>> nn = torch.nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
        >>> params, model_fn = from_module(net)
        >>> list(params), model_fn(params, torch.ones(4, 2)).shape
        (['0.weight', '0.bias', '1.weight', '1.bias', '2.weight', '2.bias'], torch.Size([4, 1]))
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if batch_norm not in ("batch", "running"):
        raise ValueError(f"batch_norm must be 'batch' or 'running', got {batch_norm!r}")
    for name, sub in module.named_modules():
        if isinstance(sub, _DROPOUTS) and sub.training and getattr(sub, "p", 0) > 0:
            raise ValueError(
                f"module {name or type(module).__name__!r} is {type(sub).__name__}(p={sub.p}) in "
                "training mode: a meta-gradient needs the same function in its inner and outer "
                "passes, and dropout draws new masks in each; call module.eval(), set p=0, or "
                "remove it"
            )
    norm_buffers = {
        f"{name}.{b}" if name else b
        for name, sub in module.named_modules()
        if isinstance(sub, _BATCH_NORMS)
        for b, _ in sub.named_buffers(recurse=False)
    }
    others = [name for name, _ in module.named_buffers() if name not in norm_buffers]
    if others:
        raise ValueError(
            f"module has buffers outside BatchNorm layers {others[:4]}: from_module "
            "carries parameters only; make them parameters or constants"
        )
    params = {name: p.detach() for name, p in module.named_parameters()}
    if not params:
        raise ValueError("module has no parameters")
    if batch_norm == "running":
        for name, sub in module.named_modules():
            if isinstance(sub, _BATCH_NORMS) and sub.running_mean is None:
                raise ValueError(
                    f"BatchNorm {name!r} keeps no running statistics "
                    "(track_running_stats=False): use batch_norm='batch'"
                )
    clone = copy.deepcopy(module)  # in the module's own training mode
    _replace_norms(clone, batch_norm)
    buffers = {name: b for name, b in clone.named_buffers()}
    for p in clone.parameters():
        p.requires_grad_(False)
    unbatchable = tuple(
        f"{name} ({type(sub).__name__})"
        for name, sub in module.named_modules()
        if isinstance(sub, nn.RNNBase)
    )
    return params, ModuleFn(clone, batch_norm, buffers, unbatchable)


__all__ = ["ModuleFn", "from_module"]
