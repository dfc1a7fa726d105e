"""mamlkit: the MAML meta-gradient, derived, checked and fast.

Parameters are ``dict[str, Tensor]``, losses are ``loss_fn(params, batch)`` with
``batch = (x, y)``, models are ``model_fn(params, x)`` — the ``torch.func`` way.
"""

from . import symbolic
from ._curvature import hessian, hvp, mse_hessian_parts
from ._metagrad import (
    adapt,
    fomaml_grad,
    inner_jacobian,
    maml_grad,
    maml_grad_hvp,
    maml_grad_jacobian,
)
from ._models import MSELoss, init_mlp, make_mse_loss, mlp
from ._params import flatten_params, num_params, unflatten_params
from ._runtime import set_cpu_threads

__version__ = "0.1.0"

__all__ = [
    "MSELoss",
    "adapt",
    "flatten_params",
    "fomaml_grad",
    "hessian",
    "hvp",
    "init_mlp",
    "inner_jacobian",
    "make_mse_loss",
    "maml_grad",
    "maml_grad_hvp",
    "maml_grad_jacobian",
    "mlp",
    "mse_hessian_parts",
    "num_params",
    "set_cpu_threads",
    "symbolic",
    "unflatten_params",
]
