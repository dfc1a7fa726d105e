"""mamlkit: the MAML meta-gradient, derived, checked and fast.

Parameters are ``dict[str, Tensor]``, losses are ``loss_fn(params, batch)`` with
``batch = (x, y)``, models are ``model_fn(params, x)`` — the ``torch.func`` way.

The top level holds the derivation's engines; four public submodules hold the rest:
``mamlkit.tasks`` (task families), ``mamlkit.train`` (meta-training, Adam, checkpoints,
evaluation), ``mamlkit.symbolic`` (sympy receipts) and ``mamlkit.profiling`` (peak tensor
memory), each imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import _startup

if _startup.running_the_cli():  # before torch loads: a signal now is one line, not a traceback
    _startup.quiet_signals()

from ._backends import BACKENDS
from ._curvature import cross_entropy_hessian_parts, hessian, hvp, mse_hessian_parts
from ._estimators import (
    IMAMLResult,
    MetaGradientReport,
    compare_meta_gradient,
    es_maml_grad,
    imaml,
    reptile_grad,
)
from ._metabatch import meta_batch_grad
from ._metagrad import (
    adapt,
    fomaml_grad,
    inner_jacobian,
    maml_grad,
    maml_grad_hvp,
    maml_grad_jacobian,
    metasgd_grad,
)
from ._methods import METHODS, Adaptation, Hyper, Method, register_method
from ._models import init_mlp, make_cross_entropy_loss, make_mse_loss, mlp
from ._module import from_module
from ._params import flatten_params, num_params, unflatten_params
from ._runtime import set_cpu_threads

__version__ = "0.4.0"

_SUBMODULES = ("profiling", "symbolic", "tasks", "train")


def __getattr__(name: str) -> Any:
    """``mamlkit.symbolic``, ``mamlkit.tasks``, ``mamlkit.train`` and ``mamlkit.profiling`` load
    on first use (sympy alone would add a quarter of a second to ``import mamlkit``)."""
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mamlkit' has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "METHODS",
    "Adaptation",
    "Hyper",
    "IMAMLResult",
    "MetaGradientReport",
    "Method",
    "adapt",
    "compare_meta_gradient",
    "cross_entropy_hessian_parts",
    "es_maml_grad",
    "flatten_params",
    "fomaml_grad",
    "from_module",
    "hessian",
    "hvp",
    "imaml",
    "init_mlp",
    "inner_jacobian",
    "make_cross_entropy_loss",
    "make_mse_loss",
    "maml_grad",
    "maml_grad_hvp",
    "maml_grad_jacobian",
    "meta_batch_grad",
    "metasgd_grad",
    "mlp",
    "mse_hessian_parts",
    "num_params",
    "profiling",
    "register_method",
    "reptile_grad",
    "set_cpu_threads",
    "symbolic",
    "tasks",
    "train",
    "unflatten_params",
]
