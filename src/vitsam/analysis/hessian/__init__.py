"""Hessian spectrum of the training loss: top eigenvalues, trace and spectral density.

The operator is the Hessian of the *sample-weighted mean loss over all given batches*,
``H = sum_b (n_b / N) * hess(loss_b)``, applied to flat parameter vectors of length P (all
parameters with ``requires_grad``, in ``model.parameters()`` order). Everything is matrix-free:
Hessian-vector products (HVPs) go through autograd, one batch at a time.

Memory bound (beyond one batch's autograd graph): Lanczos keeps its basis of at most
``max_iter`` vectors plus ``k`` Ritz vectors and three work vectors of P floats, i.e.
``(max_iter + k + 3) * P * 4`` bytes in float32; the basis can live on the CPU when the model is
on a GPU (``basis_device="cpu"``). Power iteration keeps ``k + 3`` vectors. With a single batch
the gradient graph is cached between HVPs (as a training step would hold it), which saves the
forward and first backward pass of every HVP; with several batches nothing is cached unless
asked for, so only one batch's graph is alive at a time.

Measured on CPU (see docs/benchmarks.md): without caching, double backward and torch.func's
forward-over-reverse ``jvp(grad)`` cost the same on ViT (within run-to-run noise) and double
backward is 5-13 % cheaper on MLP-Mixer and ResNet; only double backward can reuse a cached
graph (25-30 % cheaper again). ``backend="auto"`` therefore uses double backward for every
family; ``"func"`` stays available. Lanczos reaches the same residual with 1.4-4.5x fewer HVPs
than power iteration (far fewer for k > 1), so it is the default method. Its default stopping
test is the Ritz residual; ``stop="change"`` (PyHessian's test) stops 30-40 % earlier (top-1
at tol 1e-3: 1e-4 to 1e-3 relative error) but can stop on a plateau far from the answer
(MLP-Mixer at tol 1.5e-3: 5e-2 off), so it is opt-in.

Block Lanczos (``method="block-lanczos"``, ``block_size`` b) applies H to b vectors per pass
(``HessianOperator.matmat``: one gradient graph per batch for all b, one vmapped double
backward). On CPU it needs more HVPs than single-vector Lanczos and a batched HVP costs at
least as much per vector as a single one, so single-vector Lanczos stays the default (numbers
in docs/benchmarks.md); block Lanczos also resolves repeated eigenvalues up to multiplicity b.

One module per concept: ``operator`` (the HVP operator), ``lanczos`` (the Krylov driver),
``block_lanczos`` (its block form), ``eigen`` (top eigenvalues by Lanczos, block Lanczos or
power iteration), ``hutchinson`` (trace), ``blocks``
(both restricted to each block's parameters), ``density``
(stochastic Lanczos quadrature) and ``plugin`` (the ``vitsam analyze`` entry: ``HessianConfig``,
``run``, ``figures``). Everything is importable from ``vitsam.analysis.hessian``.
"""
from __future__ import annotations

from vitsam.analysis.state import analysis_state

from .block_lanczos import block_lanczos
from .blocks import parameter_blocks, per_block
from .density import DensityResult, check_density, plot_density, quadrature, spectral_density
from .eigen import METHODS, SELECTIONS, STOPS, EigenResult, top_eigenvalues
from .eigen import _lanczos_top  # noqa: F401  (bench/bench_hvp_floor.py drives it directly)
from .hutchinson import TraceResult, trace
from .lanczos import lanczos
from .operator import BACKENDS, STARTS, Batch, HessianOperator, LossFn
from .plugin import HessianConfig, figures, run

__all__ = [
    "BACKENDS", "METHODS", "SELECTIONS", "STARTS", "STOPS", "Batch", "DensityResult",
    "EigenResult", "HessianConfig", "HessianOperator", "LossFn", "TraceResult",
    "analysis_state", "block_lanczos", "check_density", "figures", "lanczos",
    "parameter_blocks", "per_block",
    "plot_density", "quadrature", "run", "spectral_density", "top_eigenvalues", "trace",
]
