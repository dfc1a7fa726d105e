"""Task families: the sinusoid distribution of Finn et al. (2017) and the article's quadratics."""

import dataclasses
import math

import pytest
import torch
from torch.func import grad, hessian

from mamlkit import fomaml_grad, maml_grad
from mamlkit._tasks import (
    SinusoidFamily,
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


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- sinusoids -------------------------------------------------------------------------------


@pytest.mark.parametrize(("tasks", "k_s", "k_q"), [(1, 1, None), (25, 10, None), (7, 5, 20)])
def test_sinusoid_shapes(tasks, k_s, k_q):
    t = sample_sinusoid_tasks(tasks, k_support=k_s, k_query=k_q, generator=gen())
    k_q = k_s if k_q is None else k_q
    assert t.support[0].shape == t.support[1].shape == (tasks, k_s, 1)
    assert t.query[0].shape == t.query[1].shape == (tasks, k_q, 1)
    assert t.amplitude.shape == t.phase.shape == (tasks,)


def test_sinusoid_ranges_and_law():
    t = sample_sinusoid_tasks(4000, k_support=10, generator=gen(1), dtype=torch.float64)
    x = torch.cat([t.support[0], t.query[0]], 1)
    assert 0.1 <= t.amplitude.min() and t.amplitude.max() <= 5.0
    assert 0.0 <= t.phase.min() and t.phase.max() <= math.pi
    assert -5.0 <= x.min() and x.max() <= 5.0
    # uniform laws: means within 5 standard errors
    for values, low, high in ((t.amplitude, 0.1, 5.0), (t.phase, 0.0, math.pi), (x, -5, 5)):
        se = (high - low) / math.sqrt(12 * values.numel())
        assert abs(values.mean().item() - (low + high) / 2) < 5 * se
    # and they fill their ranges
    assert t.amplitude.min() < 0.2 and t.amplitude.max() > 4.9
    assert t.phase.min() < 0.05 and t.phase.max() > math.pi - 0.05


def test_sinusoid_targets_are_exactly_a_sin_x_minus_phase():
    t = sample_sinusoid_tasks(50, k_support=5, k_query=7, generator=gen(2), dtype=torch.float64)
    a, p = t.amplitude[:, None, None], t.phase[:, None, None]
    for x, y in (t.support, t.query):
        assert torch.equal(y, a * torch.sin(x - p))
    # the sign convention: x − φ, not x + φ (the paper's code)
    x, y = t.support
    assert not torch.allclose(y, a * torch.sin(x + p))


def test_sinusoid_deterministic_and_split_of_one_draw():
    a = sample_sinusoid_tasks(10, k_support=5, generator=gen(3))
    b = sample_sinusoid_tasks(10, k_support=5, generator=gen(3))
    c = sample_sinusoid_tasks(10, k_support=5, generator=gen(4))
    for u, v in zip(a, b):
        if isinstance(u, tuple):
            assert all(torch.equal(s, r) for s, r in zip(u, v))
        else:
            assert torch.equal(u, v)
    assert not torch.equal(a.amplitude, c.amplitude)
    # support and query are the first K and the last K of one (T, 2K, 1) draw
    whole = sample_sinusoid_tasks(10, k_support=9, k_query=1, generator=gen(3))
    x_whole = torch.cat([whole.support[0], whole.query[0]], 1)
    assert torch.equal(x_whole, torch.cat([a.support[0], a.query[0]], 1))


def test_sinusoid_dtype_only_rounds():
    a = sample_sinusoid_tasks(5, k_support=3, generator=gen(5), dtype=torch.float64)
    b = sample_sinusoid_tasks(5, k_support=3, generator=gen(5), dtype=torch.float32)
    assert b.support[0].dtype == torch.float32
    torch.testing.assert_close(b.support[1], a.support[1].float())


def test_sinusoid_family_composes_the_sampler():
    family = SinusoidFamily(k_support=5, k_query=8)
    a = family(6, generator=gen(7))
    b = sample_sinusoid_tasks(6, k_support=5, k_query=8, generator=gen(7))
    assert torch.equal(a.query[1], b.query[1])
    record = dataclasses.asdict(family)
    assert record["k_support"] == 5 and record["amplitude_range"] == (0.1, 5.0)


def test_sinusoid_grid():
    amp, phase = (
        torch.tensor([1.0, 3.0], dtype=torch.float64),
        torch.tensor([0.0, 1.0], dtype=torch.float64),
    )
    x, y = sinusoid_grid(amp, phase, num=11)
    assert x.shape == (11, 1) and y.shape == (2, 11, 1)
    assert x[0].item() == -5.0 and x[-1].item() == 5.0
    torch.testing.assert_close(y[1, :, 0], 3.0 * torch.sin(x[:, 0] - 1.0))
    torch.testing.assert_close(sinusoid(x, amp, phase), y)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_tasks": 0}, ValueError, "num_tasks"),
        ({"num_tasks": 2.0}, TypeError, "num_tasks"),
        ({"k_support": 0}, ValueError, "k_support"),
        ({"k_query": 0}, ValueError, "k_query"),
        ({"generator": 0}, TypeError, "generator"),
        ({"amplitude_range": (5.0, 0.1)}, ValueError, "amplitude_range"),
        ({"phase_range": (0.0,)}, TypeError, "phase_range"),
        ({"input_range": (0.0, math.inf)}, ValueError, "input_range"),
    ],
)
def test_sinusoid_bad_inputs(kwargs, error, match):
    args = {"num_tasks": 3, "k_support": 2, "generator": gen()} | kwargs
    with pytest.raises(error, match=match):
        sample_sinusoid_tasks(args.pop("num_tasks"), **args)


def test_sinusoid_function_bad_shapes():
    with pytest.raises(ValueError, match="amplitude and phase"):
        sinusoid(torch.zeros(3, 1), torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="x must have shape"):
        sinusoid(torch.zeros(3), torch.ones(2), torch.ones(2))


# --- quadratics ------------------------------------------------------------------------------

CURVATURES = [(0.0, 0.0, 0.0), (1.0, 0.0, 1.0), (2.0, 0.7, 0.5), (-1.0, 1.5, 3.0)]


def quad_batch(a, b, c, g=(0.3, -0.8)):
    return quadratic_matrix(a, b, c, dtype=torch.float64), torch.tensor(g, dtype=torch.float64)


def test_quadratic_matrix_is_symmetric_and_batched():
    m = quadratic_matrix(torch.tensor([1.0, 2.0]), torch.tensor([0.5, -0.5]), 3.0)
    assert m.shape == (2, 2, 2)
    torch.testing.assert_close(m, m.transpose(-1, -2))
    torch.testing.assert_close(m[1], torch.tensor([[2.0, -0.5], [-0.5, 3.0]]))


@pytest.mark.parametrize("abc", CURVATURES)
def test_quadratic_loss_closed_form(abc):
    batch = quad_batch(*abc)
    x = torch.tensor([0.2, -1.1], dtype=torch.float64)
    a, b, c = abc
    d0, d1 = x[0].item() - 0.5, x[1].item() - 0.5
    by_hand = (
        0.5 * (a * d0**2 + 2 * b * d0 * d1 + c * d1**2) + 0.3 * x[0].item() - 0.8 * x[1].item()
    )
    assert quadratic_loss({"x": x}, batch).item() == pytest.approx(by_hand, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("abc", CURVATURES)
def test_quadratic_gradient_and_hessian_against_torch_func(abc):
    batch = quad_batch(*abc)
    params = {"x": torch.tensor([1.3, -0.4], dtype=torch.float64)}
    torch.testing.assert_close(
        quadratic_grad(params, batch)["x"], grad(quadratic_loss)(params, batch)["x"]
    )
    torch.testing.assert_close(
        quadratic_hessian(params, batch), hessian(quadratic_loss)(params, batch)["x"]["x"]
    )
    torch.testing.assert_close(quadratic_hessian(params, batch), batch[0])


@pytest.mark.parametrize("abc", CURVATURES)
@pytest.mark.parametrize("steps", [0, 1, 3])
@pytest.mark.parametrize("lr", [0.1, 0.4])
def test_quadratic_meta_grad_matches_autodiff(abc, steps, lr):
    support, query = quad_batch(*abc), quad_batch(*abc, g=(-1.0, 0.25))
    params = {"x": torch.tensor([0.9, 0.1], dtype=torch.float64)}
    torch.testing.assert_close(
        quadratic_meta_grad(params, support, query, lr=lr, steps=steps)["x"],
        maml_grad(quadratic_loss, params, support, query, lr=lr, steps=steps)["x"],
    )
    torch.testing.assert_close(
        quadratic_meta_grad(params, support, query, lr=lr, steps=steps, first_order=True)["x"],
        fomaml_grad(quadratic_loss, params, support, query, lr=lr, steps=steps)["x"],
    )


def test_quadratic_first_order_is_exact_without_curvature():
    flat = quad_batch(0.0, 0.0, 0.0)
    params = {"x": torch.tensor([2.0, -3.0], dtype=torch.float64)}
    exact = quadratic_meta_grad(params, flat, flat, lr=0.3, steps=2)["x"]
    first = quadratic_meta_grad(params, flat, flat, lr=0.3, steps=2, first_order=True)["x"]
    torch.testing.assert_close(exact, first)
    curved = quad_batch(2.0, 0.5, 1.0)
    exact = quadratic_meta_grad(params, curved, curved, lr=0.3, steps=2)["x"]
    first = quadratic_meta_grad(params, curved, curved, lr=0.3, steps=2, first_order=True)["x"]
    assert (exact - first).norm() > 0.1


def test_sampled_quadratic_tasks():
    tasks = sample_quadratic_tasks(500, generator=gen(0), dtype=torch.float64)
    matrix, g = tasks.support
    assert matrix.shape == (500, 2, 2) and g.shape == (500, 2)
    torch.testing.assert_close(matrix, matrix.transpose(-1, -2))
    a, b, c = tasks.coefficients.unbind(-1)
    assert 0 <= a.min() and a.max() <= 2 and -0.5 <= b.min() and b.max() <= 0.5
    assert 0 <= c.min() and c.max() <= 2
    torch.testing.assert_close(matrix[:, 0, 1], b)
    assert tasks.query[0] is matrix and tasks.query[1] is g
    again = sample_quadratic_tasks(500, generator=gen(0), dtype=torch.float64)
    assert torch.equal(again.support[1], g)


def test_quadratic_bad_inputs():
    batch = quad_batch(1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="params must be"):
        quadratic_loss({"x": torch.zeros(3, dtype=torch.float64)}, batch)
    with pytest.raises(ValueError, match="params must be"):
        quadratic_loss({"w": torch.zeros(2, dtype=torch.float64)}, batch)
    with pytest.raises(ValueError, match="batch must be"):
        quadratic_loss({"x": torch.zeros(2)}, (torch.zeros(2, 3), torch.zeros(2)))
    with pytest.raises(ValueError, match="lr must be finite"):
        quadratic_meta_grad({"x": torch.zeros(2)}, batch, batch, lr=math.nan)
    with pytest.raises(ValueError, match="g_scale"):
        sample_quadratic_tasks(2, generator=gen(), g_scale=-1.0)
    with pytest.raises(ValueError, match="a_range"):
        sample_quadratic_tasks(2, generator=gen(), a_range=(1.0, 0.0))
