"""mamlkit: the MAML meta-gradient, derived, checked and fast.

Parameters are ``dict[str, Tensor]``, losses are ``loss_fn(params, batch)`` with
``batch = (x, y)``, models are ``model_fn(params, x)`` — the ``torch.func`` way.
"""

from . import symbolic
from ._curvature import hessian, hvp, mse_hessian_parts
from ._estimators import (
    IMAMLResult,
    MetaGradientReport,
    compare_meta_gradient,
    es_maml_grad,
    imaml,
    imaml_grad,
    reptile_grad,
)
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
    "IMAMLResult",
    "MSELoss",
    "MetaGradientReport",
    "adapt",
    "compare_meta_gradient",
    "es_maml_grad",
    "flatten_params",
    "fomaml_grad",
    "hessian",
    "hvp",
    "imaml",
    "imaml_grad",
    "init_mlp",
    "inner_jacobian",
    "make_mse_loss",
    "maml_grad",
    "maml_grad_hvp",
    "maml_grad_jacobian",
    "mlp",
    "mse_hessian_parts",
    "num_params",
    "reptile_grad",
    "set_cpu_threads",
    "symbolic",
    "unflatten_params",
]
