"""The layers people use, through from_module and every engine: token ids into an embedding,
attention (exact second order on the CPU), dropout and other randomness refused on every path,
class labels checked at every door, and the README's optimizer loop training the module.

The reference is plain autograd written out: a loop over tasks of ``functional_call`` and
``torch.autograd.grad(create_graph=True)`` (attention with the math kernel), float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import F64, assert_tree_close
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import mamlkit as mk
from mamlkit.train import evaluate, meta_train

ALPHA = 0.3
TOL = {"rtol": 1e-9, "atol": 1e-12}


class TokenNet(nn.Module):
    """Embedding of token ids, mean over the sequence, LayerNorm, a linear head."""

    def __init__(self, vocab=11, dim=6, classes=3):
        super().__init__()
        self.embed, self.norm, self.head = (
            nn.Embedding(vocab, dim),
            nn.LayerNorm(dim),
            nn.Linear(dim, classes),
        )

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids).mean(1)))


class Attention(nn.Module):
    """A multi-head self-attention block, a transformer encoder layer, or raw SDPA."""

    def __init__(self, kind, dim=8, classes=3):
        super().__init__()
        self.kind = kind
        if kind == "mha":
            self.block = nn.MultiheadAttention(dim, 2, batch_first=True)
        elif kind == "encoder":
            self.block = nn.TransformerEncoderLayer(
                dim, 2, dim_feedforward=12, dropout=0.0, batch_first=True
            )
        else:
            self.proj = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        if self.kind == "mha":
            h = self.block(x, x, x, need_weights=False)[0]
        elif self.kind == "encoder":
            h = self.block(x)
        else:
            q, k, v = self.proj(x).chunk(3, -1)
            h = F.scaled_dot_product_attention(q, k, v)
        return self.head(h.mean(1))


def _meta_batch(kind, tasks=3, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "tokens":
        x = torch.randint(0, 11, (tasks, 2 * n, 5), generator=g)
    else:
        x = torch.randn(tasks, 2 * n, 3, 8, generator=g, dtype=F64)
    y = torch.randint(0, 3, (tasks, 2 * n), generator=g)
    return (x[:, :n], y[:, :n]), (x[:, n:], y[:, n:])


def _module(kind, seed=0):
    torch.manual_seed(seed)
    return (TokenNet() if kind == "tokens" else Attention(kind)).double()


def _reference(net, support, query, steps=1):
    """Plain autograd: per task, the unrolled inner loop and the double backward."""
    names = [n for n, _ in net.named_parameters()]
    total = None
    with sdpa_kernel([SDPBackend.MATH]):
        for t in range(support[0].shape[0]):
            leaves = [p.detach().clone().requires_grad_() for _, p in net.named_parameters()]
            fast = leaves
            for _ in range(steps):
                out = torch.func.functional_call(net, dict(zip(names, fast)), (support[0][t],))
                grads = torch.autograd.grad(
                    F.cross_entropy(out, support[1][t]), fast, create_graph=True
                )
                fast = [w - ALPHA * g for w, g in zip(fast, grads)]
            out = torch.func.functional_call(net, dict(zip(names, fast)), (query[0][t],))
            g = torch.autograd.grad(F.cross_entropy(out, query[1][t]), leaves)
            total = g if total is None else [a + b for a, b in zip(total, g)]
    return {n: v / support[0].shape[0] for n, v in zip(names, total)}


ENGINES = {
    "maml_grad": lambda loss, p, s, q: _task_mean(mk.maml_grad, loss, p, s, q),
    "maml_grad_hvp": lambda loss, p, s, q: _task_mean(mk.maml_grad_hvp, loss, p, s, q),
    "meta_batch_grad vmap": lambda loss, p, s, q: mk.meta_batch_grad(
        "maml", loss, p, s, q, lr=ALPHA, backend="vmap"
    )[0],
    "meta_batch_grad auto": lambda loss, p, s, q: mk.meta_batch_grad(
        "maml", loss, p, s, q, lr=ALPHA
    )[0],
}


def _task_mean(engine, loss, params, support, query):
    grads = [
        engine(loss, params, (support[0][t], support[1][t]), (query[0][t], query[1][t]), lr=ALPHA)
        for t in range(support[0].shape[0])
    ]
    return {k: torch.stack([g[k] for g in grads]).mean(0) for k in params}


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("kind", ["tokens", "mha", "encoder", "sdpa"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_embeddings_and_attention_get_the_exact_meta_gradient(kind, engine, mode):
    net = _module(kind)
    net.train(mode == "train")
    support, query = _meta_batch(kind)
    params, model_fn = mk.from_module(net)
    got = ENGINES[engine](mk.make_cross_entropy_loss(model_fn), params, support, query)
    assert_tree_close(got, _reference(net, support, query), **TOL)


def test_token_ids_train_and_evaluate():
    net = _module("tokens")
    params, model_fn = mk.from_module(net)
    loss = mk.make_cross_entropy_loss(model_fn)

    def sample(n, *, generator, dtype):
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
        return _meta_batch("tokens", tasks=n, seed=int(g.seed() % 1000))

    run = meta_train(
        "maml",
        loss,
        params,
        sample,
        meta_batch_size=3,
        iterations=4,
        lr=ALPHA,
        meta_lr=0.01,
        steps=1,
        seed=0,
        progress=False,
    )
    support, query = _meta_batch("tokens", seed=5)
    result = evaluate(loss, run.params, support, query, lr=ALPHA, steps=2)
    assert torch.isfinite(result.losses).all() and result.accuracy.shape == (3,)


# --- randomness -----------------------------------------------------------------------------------


class FunctionalDropout(nn.Module):
    def __init__(self, always=False):
        super().__init__()
        self.layer, self.always = nn.Linear(8, 3), always

    def forward(self, x):
        h = F.dropout(x.mean(1), 0.3, training=True if self.always else self.training)
        return self.layer(h)


class Noise(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(8, 3)

    def forward(self, x):
        return self.layer(x.mean(1) + torch.randn_like(x.mean(1)))


PATHS = {
    "maml_grad": lambda loss, p, s, q: mk.maml_grad(
        loss, p, (s[0][0], s[1][0]), (q[0][0], q[1][0]), lr=ALPHA
    ),
    "fomaml_grad": lambda loss, p, s, q: mk.fomaml_grad(
        loss, p, (s[0][0], s[1][0]), (q[0][0], q[1][0]), lr=ALPHA
    ),
    "hvp": lambda loss, p, s, q: mk.hvp(loss, p, (s[0][0], s[1][0]), p),
    "meta_batch_grad vmap": lambda loss, p, s, q: mk.meta_batch_grad(
        "maml", loss, p, s, q, lr=ALPHA, backend="vmap"
    ),
    "meta_batch_grad reptile": lambda loss, p, s, q: mk.meta_batch_grad(
        "reptile", loss, p, s, q, lr=ALPHA
    ),
    "evaluate": lambda loss, p, s, q: evaluate(loss, p, s, q, lr=ALPHA, steps=1),
    "meta_train": lambda loss, p, s, q: meta_train(
        "maml",
        loss,
        p,
        _fixed(s, q),
        meta_batch_size=3,
        iterations=1,
        lr=ALPHA,
        meta_lr=0.01,
        steps=1,
        seed=0,
        progress=False,
    ),
}


def _fixed(support, query):
    """A sampler that returns these tasks, repeated to the number asked for, as a tuple."""

    def sample(n, *, generator, dtype):
        pick = torch.arange(n) % support[0].shape[0]
        return tuple(tuple(t[pick] for t in pair) for pair in (support, query))

    return sample


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(
    "make",
    [lambda: FunctionalDropout().train(), lambda: FunctionalDropout(always=True).eval(), Noise],
    ids=["F.dropout(training=self.training)", "F.dropout(training=True)", "torch.randn_like"],
)
def test_a_forward_that_draws_random_numbers_is_refused_on_every_path(make, path):
    net = make().double()
    support, query = _meta_batch("sdpa")
    params, model_fn = mk.from_module(net)
    with pytest.raises(ValueError, match=r"draws random numbers \((dropout|randn_like)"):
        PATHS[path](mk.make_cross_entropy_loss(model_fn), params, support, query)


def test_dropout_in_eval_mode_is_the_module_and_nn_dropout_in_training_mode_is_refused_at_once():
    net = FunctionalDropout().double().eval()
    params, model_fn = mk.from_module(net)
    x = _meta_batch("sdpa")[0][0][0]
    torch.testing.assert_close(model_fn(params, x), net(x))  # the module's own mode, no masks
    with pytest.raises(ValueError, match=r"Dropout\(p=0.2\) in training mode"):
        mk.from_module(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.2)).train())
    mk.from_module(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.2)).eval())  # no masks drawn: fine


# --- labels ---------------------------------------------------------------------------------------


def _labelled(value):
    support, query = _meta_batch("sdpa")
    y = support[1].clone()
    y[1, 2] = value
    return (support[0], y), query


LABEL_PATHS = {
    k: PATHS[k]
    for k in (
        "maml_grad",
        "fomaml_grad",
        "meta_batch_grad vmap",
        "meta_batch_grad reptile",
        "evaluate",
        "meta_train",
    )
}


@pytest.mark.parametrize("path", list(LABEL_PATHS))
@pytest.mark.parametrize(
    ("value", "match"),
    [(-100, r"got -100 \(torch's ignore_index"), (-1, "got -1$"), (3, r"got 3$")],
)
def test_labels_outside_the_classes_are_refused_on_every_path(path, value, match):
    params, model_fn = mk.from_module(_module("sdpa"))
    support, query = _labelled(value)
    if path in ("maml_grad", "fomaml_grad"):
        support = (support[0][1:], support[1][1:])  # the bad label is in task 1: the first one here
    with pytest.raises(
        ValueError,
        match=rf"^support y must be class labels in 0 … 2 \(the model returns 3 logits\), {match}",
    ):
        LABEL_PATHS[path](mk.make_cross_entropy_loss(model_fn), params, support, query)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16])
def test_narrow_integer_labels_work_as_int64(dtype):
    params, model_fn = mk.from_module(_module("sdpa"))
    loss = mk.make_cross_entropy_loss(model_fn)
    support, query = _meta_batch("sdpa")
    narrow = (support[0], support[1].to(dtype)), (query[0], query[1].to(dtype))
    for backend in ("vmap", "auto"):
        a = mk.meta_batch_grad("maml", loss, params, *narrow, lr=ALPHA, backend=backend)[0]
        b = mk.meta_batch_grad("maml", loss, params, support, query, lr=ALPHA, backend=backend)[0]
        assert_tree_close(a, b, rtol=0, atol=0)


# --- your own loop --------------------------------------------------------------------------------


def test_the_readme_optimizer_loop_trains_the_module():
    """from_module once, then meta_batch_grad → p.grad → torch.optim step: the parameters the
    next meta-gradient is taken at are the module's current ones, so the query loss falls."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    before = copy.deepcopy(net.state_dict())
    params, model_fn = mk.from_module(net)
    loss = mk.make_cross_entropy_loss(model_fn)
    support, query = (
        tuple(t.float() if t.is_floating_point() else t for t in b) for b in _meta_batch("sdpa")
    )
    support, query = (support[0].mean(2), support[1]), (query[0].mean(2), query[1])
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        grads, query_losses = mk.meta_batch_grad("maml", loss, params, support, query, lr=ALPHA)
        for name, p in net.named_parameters():
            p.grad = grads[name]
        optimizer.step()
        losses.append(query_losses.mean().item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert not torch.equal(
        net.state_dict()["0.weight"], before["0.weight"]
    )  # the optimizer moved it
    assert all(
        torch.equal(params[n], p) for n, p in net.named_parameters()
    )  # params follow the module


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer, self.norm, self.head = nn.Linear(8, 6), nn.GroupNorm(2, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(self.layer(x.mean(1))))


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell, self.head = cell(8, 6, batch_first=True), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.cell(x)[0][:, -1])


@pytest.mark.parametrize("engine", list(ENGINES))
def test_group_norm_gets_the_exact_meta_gradient(engine):
    torch.manual_seed(0)
    net = GroupNormNet().double()
    support, query = _meta_batch("sdpa")
    params, model_fn = mk.from_module(net)
    got = ENGINES[engine](mk.make_cross_entropy_loss(model_fn), params, support, query)
    assert_tree_close(got, _reference(net, support, query), **TOL)


@pytest.mark.parametrize("cell", [nn.RNN, nn.GRU, nn.LSTM])
def test_recurrent_layers_are_exact_per_task_and_refused_by_vmap_with_the_reason(cell):
    torch.manual_seed(0)
    net = Recurrent(cell).double()
    support, query = _meta_batch("sdpa")
    params, model_fn = mk.from_module(net)
    loss = mk.make_cross_entropy_loss(model_fn)
    for engine in ("maml_grad", "maml_grad_hvp"):
        assert_tree_close(
            ENGINES[engine](loss, params, support, query), _reference(net, support, query), **TOL
        )
    with pytest.raises(
        ValueError, match=rf"vmap cannot batch the recurrent layer\(s\) cell \({cell.__name__}\)"
    ):
        mk.meta_batch_grad("maml", loss, params, support, query, lr=ALPHA)
