"""Task families, sampled as batched tensors from a ``torch.Generator``.

- The sinusoid regression family of Finn et al. (2017, §5.1): :class:`SinusoidFamily`,
  :func:`sample_sinusoid_tasks`, the true functions :func:`sinusoid` and :func:`sinusoid_grid`.
- The glyph benchmark, an offline Omniglot-shaped few-shot classification family rendered from
  the fonts matplotlib ships: :class:`GlyphFamily`, :func:`glyph_bank`, and the MAML paper's
  Omniglot network, :func:`conv_net`.
- The quadratic family of the interactive article on first-order MAML, whose meta-gradient has a
  closed form: :func:`quadratic_loss`, :func:`quadratic_grad`, :func:`quadratic_hessian`,
  :func:`quadratic_matrix`, :func:`quadratic_meta_grad`, :func:`sample_quadratic_tasks`.
"""

from ._glyphs import GlyphBank, GlyphFamily, GlyphTasks, conv_net, glyph_bank
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

__all__ = [
    "GlyphBank",
    "GlyphFamily",
    "GlyphTasks",
    "QuadraticTasks",
    "SinusoidFamily",
    "SinusoidTasks",
    "conv_net",
    "glyph_bank",
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
