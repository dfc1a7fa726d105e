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
from ._evaluate import EvalResult, evaluate, evaluate_tasks, mean_ci95
from ._metabatch import meta_batch_grad
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
from ._tasks import (
    QuadraticTasks,
    SinusoidFamily,
    SinusoidTasks,
    quadratic_grad,
    quadratic_hessian,
    quadratic_loss,
    quadratic_matrix,
    quadratic_meta_grad,
    sample_quadratic_tasks,
    sample_sinusoid_tasks,
    sinusoid,
    sinusoid_grid,
)
from ._train import TrainResult, load_checkpoint, meta_train, save_checkpoint

__version__ = "0.1.0"

__all__ = [
    "EvalResult",
    "IMAMLResult",
    "MSELoss",
    "MetaGradientReport",
    "QuadraticTasks",
    "SinusoidFamily",
    "SinusoidTasks",
    "TrainResult",
    "adapt",
    "compare_meta_gradient",
    "es_maml_grad",
    "evaluate",
    "evaluate_tasks",
    "flatten_params",
    "fomaml_grad",
    "hessian",
    "hvp",
    "imaml",
    "imaml_grad",
    "init_mlp",
    "inner_jacobian",
    "load_checkpoint",
    "make_mse_loss",
    "maml_grad",
    "maml_grad_hvp",
    "maml_grad_jacobian",
    "mean_ci95",
    "meta_batch_grad",
    "meta_train",
    "mlp",
    "mse_hessian_parts",
    "num_params",
    "quadratic_grad",
    "quadratic_hessian",
    "quadratic_loss",
    "quadratic_matrix",
    "quadratic_meta_grad",
    "reptile_grad",
    "sample_quadratic_tasks",
    "sample_sinusoid_tasks",
    "save_checkpoint",
    "set_cpu_threads",
    "sinusoid",
    "sinusoid_grid",
    "symbolic",
    "unflatten_params",
]
