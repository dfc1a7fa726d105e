r"""Task families, sampled as batched tensors: the MAML sinusoids and the article's quadratics.

Every sampler draws a whole meta-batch at once from a ``torch.Generator`` (no per-task Python
loop, the global RNG is never touched). Tensors are drawn in float64 and then cast, so the
numbers do not depend on the requested dtype beyond rounding.

**Sinusoids** (Finn et al. 2017, §5.1, and their ``data_generator.py``): a task is
``y = A·sin(x − φ)`` with amplitude ``A ~ U[0.1, 5.0]``, phase ``φ ~ U[0, π]`` and inputs
``x ~ U[−5, 5]``. For every task ``K_s + K_q`` inputs are drawn together; the first ``K_s`` are
the support set, the rest the query set (as the paper's code splits its 2K points).

**Quadratics** (the interactive article on first-order MAML): the point ``x ∈ ℝ²`` is the
parameter and a task is the pair ``(C, g)``,

.. math::

    f(x) = ½ (x − ½𝟙)ᵀ C (x − ½𝟙) + gᵀx, \qquad ∇f = C(x − ½𝟙) + g, \qquad ∇²f = C,
    \qquad C = \begin{bmatrix} a & b \\ b & c \end{bmatrix}.

Design: ``params = {"x": (2,) tensor}`` and ``batch = (C, g)`` with ``C`` of shape (2, 2) and
``g`` of shape (2,), so :func:`quadratic_loss` is an ordinary ``loss_fn(params, batch)`` that
every engine (``maml_grad``, ``hvp``, ``meta_batch_grad`` …) accepts unchanged; a meta-batch is
``(C, g)`` with shapes (T, 2, 2) and (T, 2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_batch, check_finite, check_int, check_params, check_positive_int
from ._params import Batch, Params

Range = tuple[float, float]


class SinusoidTasks(NamedTuple):
    """A meta-batch of sinusoid tasks.

    Attributes:
        support: ``(x, y)``, each of shape (T, K_s, 1).
        query: ``(x, y)``, each of shape (T, K_q, 1).
        amplitude: A, shape (T,).
        phase: φ, shape (T,).
    """

    support: Batch
    query: Batch
    amplitude: Tensor
    phase: Tensor


class QuadraticTasks(NamedTuple):
    """A meta-batch of quadratic tasks ``f(x) = ½(x − ½𝟙)ᵀC(x − ½𝟙) + gᵀx``.

    Attributes:
        support: ``(C, g)`` with shapes (T, 2, 2) and (T, 2).
        query: ``(C, g)``; the same function as ``support`` (a quadratic task has no data noise).
        coefficients: ``(a, b, c)`` per task, shape (T, 3).
    """

    support: Batch
    query: Batch
    coefficients: Tensor


def _check_range(value: object, name: str) -> Range:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (low, high), got {value!r}")
    low, high = (check_finite(v, name) for v in value)
    if not low <= high:
        raise ValueError(f"{name} must satisfy low <= high, got {tuple(value)}")
    return low, high


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


def _uniform(shape: tuple[int, ...], bounds: Range, generator: torch.Generator) -> Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def sinusoid(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
    """The true function ``A·sin(x − φ)`` of each task, broadcast over the points.

    Args:
        x: inputs of shape (T, N, 1) (per-task points) or (N, 1) (one grid shared by all tasks).
        amplitude: A, shape (T,).
        phase: φ, shape (T,).

    Returns:
        y of shape (T, N, 1).

    Example:
        >>> sinusoid(torch.tensor([[0.0], [math.pi / 2]]), torch.tensor([2.0]), torch.tensor([0.0]))
        tensor([[[0.],
                 [2.]]])
    """
    if amplitude.ndim != 1 or phase.shape != amplitude.shape:
        raise ValueError(
            f"amplitude and phase must both have shape (T,), got {tuple(amplitude.shape)} "
            f"and {tuple(phase.shape)}"
        )
    if x.ndim not in (2, 3) or x.shape[-1] != 1:
        raise ValueError(f"x must have shape (N, 1) or (T, N, 1), got {tuple(x.shape)}")
    a = amplitude.reshape(-1, 1, 1)
    p = phase.reshape(-1, 1, 1)
    return a * torch.sin(x - p)


def sinusoid_grid(
    amplitude: Tensor, phase: Tensor, *, num: int = 200, input_range: Range = (-5.0, 5.0)
) -> tuple[Tensor, Tensor]:
    """The true functions on an evenly spaced grid, for plots.

    Returns:
        ``(x, y)``: x of shape (num, 1) shared by all tasks, y of shape (T, num, 1).

    Example:
        >>> x, y = sinusoid_grid(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.5]), num=5)
        >>> tuple(x.shape), tuple(y.shape)
        ((5, 1), (2, 5, 1))
    """
    num = check_positive_int(num, "num")
    low, high = _check_range(input_range, "input_range")
    x = torch.linspace(low, high, num, dtype=amplitude.dtype, device=amplitude.device)[:, None]
    return x, sinusoid(x, amplitude, phase)


def sample_sinusoid_tasks(
    num_tasks: int,
    *,
    k_support: int,
    k_query: int | None = None,
    generator: torch.Generator,
    amplitude_range: Range = (0.1, 5.0),
    phase_range: Range = (0.0, math.pi),
    input_range: Range = (-5.0, 5.0),
    dtype: torch.dtype | None = None,
) -> SinusoidTasks:
    r"""Draw ``num_tasks`` sinusoid regression tasks at once.

    .. math:: A ∼ U[0.1, 5.0], \quad φ ∼ U[0, π], \quad x ∼ U[−5, 5], \quad y = A \sin(x − φ)

    Draw order (fixed, so a seed always gives the same tasks): amplitudes (T,), phases (T,),
    then all inputs (T, K_s + K_q, 1); the first K_s inputs of a task are its support set.

    Args:
        num_tasks: T ≥ 1.
        k_support: K_s ≥ 1, support points per task (the K of K-shot).
        k_query: K_q ≥ 1 query points per task; defaults to ``k_support`` (as the paper's code).
        generator: the ``torch.Generator`` to draw from (advanced in place).
        amplitude_range, phase_range, input_range: the ``(low, high)`` of each uniform law.
        dtype: defaults to ``torch.get_default_dtype()``.

    Returns:
        :class:`SinusoidTasks` with tensors of shape (T, K, 1) and (T,).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> tasks = sample_sinusoid_tasks(4, k_support=5, generator=g)
        >>> tuple(tasks.support[0].shape), tuple(tasks.query[1].shape), tuple(tasks.amplitude.shape)
        ((4, 5, 1), (4, 5, 1), (4,))
    """
    num_tasks = check_positive_int(num_tasks, "num_tasks")
    k_support = check_positive_int(k_support, "k_support")
    k_query = k_support if k_query is None else check_positive_int(k_query, "k_query")
    generator = _check_generator(generator)
    amplitude_range = _check_range(amplitude_range, "amplitude_range")
    phase_range = _check_range(phase_range, "phase_range")
    input_range = _check_range(input_range, "input_range")
    dtype = dtype or torch.get_default_dtype()

    amplitude = _uniform((num_tasks,), amplitude_range, generator)
    phase = _uniform((num_tasks,), phase_range, generator)
    x = _uniform((num_tasks, k_support + k_query, 1), input_range, generator)
    y = sinusoid(x, amplitude, phase)
    x, y, amplitude, phase = (t.to(dtype) for t in (x, y, amplitude, phase))
    return SinusoidTasks(
        support=(x[:, :k_support], y[:, :k_support]),
        query=(x[:, k_support:], y[:, k_support:]),
        amplitude=amplitude,
        phase=phase,
    )


@dataclass(frozen=True)
class SinusoidFamily:
    """The sinusoid task distribution as a callable ``sample_tasks(num_tasks, *, generator)``.

    Only composes :func:`sample_sinusoid_tasks`; its fields are plain numbers, so
    ``dataclasses.asdict(family)`` is a JSON-ready record of the distribution (used in
    checkpoints).

    Example:
        >>> family = SinusoidFamily(k_support=10)
        >>> family(25, generator=torch.Generator().manual_seed(0)).support[0].shape
        torch.Size([25, 10, 1])
    """

    k_support: int = 10
    k_query: int | None = None
    amplitude_range: Range = (0.1, 5.0)
    phase_range: Range = (0.0, math.pi)
    input_range: Range = (-5.0, 5.0)

    def __call__(
        self, num_tasks: int, *, generator: torch.Generator, dtype: torch.dtype | None = None
    ) -> SinusoidTasks:
        return sample_sinusoid_tasks(
            num_tasks,
            k_support=self.k_support,
            k_query=self.k_query,
            generator=generator,
            amplitude_range=self.amplitude_range,
            phase_range=self.phase_range,
            input_range=self.input_range,
            dtype=dtype,
        )


# ---------------------------------------------------------------------------------------------
# The quadratic family
# ---------------------------------------------------------------------------------------------


def quadratic_matrix(
    a: Tensor | float, b: Tensor | float, c: Tensor | float, *, dtype: torch.dtype | None = None
) -> Tensor:
    """``C = [[a, b], [b, c]]``, batched over the (broadcast) shape of ``a``, ``b``, ``c``.

    Python numbers become tensors of ``dtype`` (default: ``torch.get_default_dtype()``).

    Example:
        >>> quadratic_matrix(1.0, 0.5, 2.0)
        tensor([[1.0000, 0.5000],
                [0.5000, 2.0000]])
    """
    a, b, c = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=dtype) for v in (a, b, c)))
    if not a.is_floating_point():
        a, b, c = (v.to(torch.get_default_dtype()) for v in (a, b, c))
    return torch.stack([torch.stack([a, b], -1), torch.stack([b, c], -1)], -2)


def _check_quadratic(params: Mapping[str, Tensor], batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    params = check_params(params)
    if list(params) != ["x"] or params["x"].shape != (2,):
        shapes = {k: tuple(v.shape) for k, v in params.items()}
        raise ValueError(f"params must be {{'x': tensor of shape (2,)}}, got {shapes}")
    matrix, g = check_batch(batch, "batch")
    if matrix.shape != (2, 2) or g.shape != (2,):
        raise ValueError(
            f"batch must be (C, g) with shapes (2, 2) and (2,), got {tuple(matrix.shape)} "
            f"and {tuple(g.shape)}"
        )
    return params["x"], matrix, g


def quadratic_loss(params: Mapping[str, Tensor], batch: Batch) -> Tensor:
    r"""``f(x) = ½(x − ½𝟙)ᵀC(x − ½𝟙) + gᵀx`` as a ``loss_fn(params, batch)``.

    Args:
        params: ``{"x": x}`` with x of shape (2,).
        batch: ``(C, g)``, C of shape (2, 2) (symmetric in this family, not required), g (2,).

    Returns:
        The scalar f(x).

    Example:
        >>> C = quadratic_matrix(2.0, 0.0, 2.0)
        >>> quadratic_loss({"x": torch.tensor([1.5, 0.5])}, (C, torch.tensor([1.0, 0.0])))
        tensor(2.5000)
    """
    x, matrix, g = _check_quadratic(params, batch)
    d = x - 0.5
    return 0.5 * d @ matrix @ d + g @ x


def quadratic_grad(params: Mapping[str, Tensor], batch: Batch) -> Params:
    """The closed-form gradient ``∇f = ½(C + Cᵀ)(x − ½𝟙) + g`` (``C(x − ½𝟙) + g`` for symmetric C).

    Example:
        >>> C = quadratic_matrix(2.0, 0.0, 2.0)
        >>> quadratic_grad({"x": torch.tensor([1.5, 0.5])}, (C, torch.tensor([1.0, 0.0])))
        {'x': tensor([3., 0.])}
    """
    x, matrix, g = _check_quadratic(params, batch)
    return {"x": 0.5 * (matrix + matrix.T) @ (x - 0.5) + g}


def quadratic_hessian(params: Mapping[str, Tensor], batch: Batch) -> Tensor:
    """The closed-form (2, 2) Hessian ``∇²f = ½(C + Cᵀ)`` (= C in this family), constant in x.

    Example:
        >>> task = (quadratic_matrix(1.0, 0.5, 2.0), torch.zeros(2))
        >>> quadratic_hessian({"x": torch.zeros(2)}, task)
        tensor([[1.0000, 0.5000],
                [0.5000, 2.0000]])
    """
    _, matrix, _ = _check_quadratic(params, batch)
    return 0.5 * (matrix + matrix.T)


def quadratic_meta_grad(
    params: Mapping[str, Tensor],
    support: Batch,
    query: Batch,
    *,
    lr: float,
    steps: int = 1,
    first_order: bool = False,
) -> Params:
    r"""The MAML (or FOMAML) meta-gradient on the quadratic family, in closed form.

    With ``H_s = ½(C_s + C_sᵀ)`` constant, every inner Jacobian is the same matrix, so

    .. math::

        x_{j+1} = x_j − α\big(H_s(x_j − ½𝟙) + g_s\big), \qquad
        \frac{dL_q(x_k)}{dx} = (I − αH_s)^k \big(H_q(x_k − ½𝟙) + g_q\big),

    and the first-order gradient drops the factor ``(I − αH_s)^k``. The difference between the
    two, ``(I − (I − αH_s)^k)∇L_q(x_k) = kαH_s∇L_q(x_k) + O(α²)``, is the first-order error,
    which grows with the curvature (a, b, c). An independent reference for the autodiff engines.

    Args:
        params: ``{"x": x}``, x of shape (2,).
        support: ``(C_s, g_s)``; query: ``(C_q, g_q)``.
        lr: α. steps: k ≥ 0. first_order: return the FOMAML gradient ∇L_q(x_k) instead.

    Returns:
        ``{"x": meta-gradient}``.

    Example:
        >>> C, g = quadratic_matrix(1.0, 0.0, 1.0), torch.zeros(2)
        >>> quadratic_meta_grad({"x": torch.tensor([1.5, 0.5])}, (C, g), (C, g), lr=0.5)
        {'x': tensor([0.2500, 0.0000])}
    """
    x, c_s, g_s = _check_quadratic(params, support)
    _, c_q, g_q = _check_quadratic(params, query)
    lr, steps = check_finite(lr, "lr"), check_int(steps, "steps")
    if not isinstance(first_order, bool):
        raise TypeError(f"first_order must be a bool, got {type(first_order).__name__}")
    h_s, h_q = 0.5 * (c_s + c_s.T), 0.5 * (c_q + c_q.T)
    for _ in range(steps):
        x = x - lr * (h_s @ (x - 0.5) + g_s)
    g = h_q @ (x - 0.5) + g_q
    if first_order:
        return {"x": g}
    jacobian = torch.linalg.matrix_power(torch.eye(2, dtype=x.dtype) - lr * h_s, steps)
    return {"x": jacobian.T @ g}


def sample_quadratic_tasks(
    num_tasks: int,
    *,
    generator: torch.Generator,
    a_range: Range = (0.0, 2.0),
    b_range: Range = (-0.5, 0.5),
    c_range: Range = (0.0, 2.0),
    g_scale: float = 1.0,
    dtype: torch.dtype | None = None,
) -> QuadraticTasks:
    r"""Draw ``num_tasks`` quadratic tasks ``(C, g)`` at once.

    ``a, b, c`` are uniform on their ranges (in that draw order), then ``g ∼ N(0, g_scale² I)``.
    A task is one function, so ``support`` and ``query`` are the same ``(C, g)`` pair: the MAML
    objective is then ``f(x − α∇f(x))``. Use :func:`quadratic_matrix` to build a single C with
    chosen curvature instead.

    Example:
        >>> tasks = sample_quadratic_tasks(3, generator=torch.Generator().manual_seed(0))
        >>> tuple(tasks.support[0].shape), tuple(tasks.support[1].shape)
        ((3, 2, 2), (3, 2))
    """
    num_tasks = check_positive_int(num_tasks, "num_tasks")
    generator = _check_generator(generator)
    ranges = [
        _check_range(r, n)
        for r, n in ((a_range, "a_range"), (b_range, "b_range"), (c_range, "c_range"))
    ]
    g_scale = check_finite(g_scale, "g_scale")
    if g_scale < 0:
        raise ValueError(f"g_scale must be >= 0, got {g_scale}")
    dtype = dtype or torch.get_default_dtype()
    a, b, c = (_uniform((num_tasks,), r, generator) for r in ranges)
    g = g_scale * torch.randn(num_tasks, 2, generator=generator, dtype=torch.float64)
    matrix = quadratic_matrix(a, b, c).to(dtype)
    g = g.to(dtype)
    return QuadraticTasks(
        support=(matrix, g), query=(matrix, g), coefficients=torch.stack([a, b, c], -1).to(dtype)
    )


__all__ = [
    "QuadraticTasks",
    "SinusoidFamily",
    "SinusoidTasks",
    "quadratic_grad",
    "quadratic_hessian",
    "quadratic_loss",
    "quadratic_matrix",
    "quadratic_meta_grad",
    "sample_quadratic_tasks",
    "sample_sinusoid_tasks",
    "sinusoid",
    "sinusoid_grid",
]
