"""Empirical neural tangent kernel (NTK) of a classifier and its condition number.

For N inputs, a model with C logits and P trainable parameters, let ``J`` be the Jacobian of
the logits with respect to all parameters (class token and position embedding included),
shape (N, C, P). Three kernels are in use in the literature; each result names its own:

- ``"sum-logits"``: Jacobian of the summed logits, ``g_n = sum_c J[n, c]``;
  ``Theta = G G^T`` (N, N). This is the TE-NAS recipe (Chen, Gong, Wang, ICLR 2021) that the
  paper follows for its condition numbers, hence the default.
- ``"trace"``: ``Theta[n, m] = sum_c <J[n, c], J[m, c]>`` (N, N), the trace over classes of
  the full kernel, as neural-tangents computes it with ``trace_axes``.
- ``"full"``: ``Theta[(n, c), (m, d)] = <J[n, c], J[m, d]>`` (N*C, N*C), sample-major order.

kappa = lambda_max / lambda_min of Theta (eigenvalues in float64). Jacobians are per-sample
``torch.func`` gradients vmapped over chunks of inputs; the Gram matrix is accumulated block
by block in float64 so that only ``max_memory_mb`` worth of Jacobian rows are alive at once
(outer blocks are recomputed against streamed inner chunks when the whole Jacobian does not
fit).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from vitsam.analysis.state import analysis_state
from vitsam.io import save_figure
from vitsam.progress import progress_bar

CONVENTIONS = ("sum-logits", "trace", "full")


@dataclass
class NTKResult:
    """Condition number of the empirical NTK and its spectrum (ascending), per ``convention``."""

    kappa: float
    convention: str
    lambda_max: float
    lambda_min: float
    eigenvalues: list[float] = field(repr=False)
    num_inputs: int
    num_outputs: int
    num_params: int
    kernel: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("kernel")
        return d


def _check(convention: str, inputs: torch.Tensor, chunk: int) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown NTK convention {convention!r}; choose one of {CONVENTIONS}")
    if not torch.is_tensor(inputs) or inputs.dim() < 2 or inputs.shape[0] < 1:
        raise ValueError("inputs must be a tensor of shape (N, ...) with N >= 1")
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")


class _JacobianRows:
    """Per-sample Jacobian rows of the logits, (n, R, P) in the model's dtype, for a slice.

    R = 1 for ``"sum-logits"`` (gradient of the summed logits) and R = C otherwise.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, convention: str) -> None:
        self.model = model
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise ValueError("the model has no parameter with requires_grad=True")
        self.device = self.named[0][1].device
        self.inputs = inputs
        self.num_params = sum(p.numel() for _, p in self.named)
        self.itemsize = self.named[0][1].element_size()
        self.sum_logits = convention == "sum-logits"
        with torch.no_grad():
            out = model(inputs[:1].to(self.device))
        if out.dim() != 2:
            raise ValueError(f"model output has shape {tuple(out.shape)}; expected (batch, logits)")
        self.num_outputs = out.shape[1]
        self.rows_per_sample = 1 if self.sum_logits else self.num_outputs
        primals = {n: p.detach() for n, p in self.named}

        def logits(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(model, params, (x.unsqueeze(0),))[0]

        if self.sum_logits:
            fn = torch.func.grad(lambda p, x: logits(p, x).sum())
        else:
            fn = torch.func.jacrev(logits)
        per_sample = torch.func.vmap(fn, in_dims=(None, 0))
        self._compute = lambda x: per_sample(primals, x)

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        x = self.inputs[start:stop].to(self.device)
        jac = self._compute(x)  # {name: (n, [C,] *shape)}
        n = stop - start
        return torch.cat([jac[name].reshape(n, self.rows_per_sample, -1) for name, _ in self.named],
                         dim=2)


def _gram_block(a: torch.Tensor, b: torch.Tensor, full: bool,
                slice_cols: int = 8192) -> torch.Tensor:
    """Kernel block between Jacobian rows a (na, R, P) and b (nb, R, P), float64 on CPU.

    full: (na*R, nb*R) entries <a[i, r], b[j, s]>; otherwise (na, nb) entries summed over the
    row axis (``sum_r <a[i, r], b[j, r]>``, the class trace or the single summed row).
    Products are accumulated in float64 (a float32 sum over millions of parameters would cost
    about 1e-5 relative error, enough to corrupt lambda_min); columns are converted
    ``slice_cols`` at a time so the float64 copies stay small.
    """
    if full:
        a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    else:
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    out = torch.zeros(a2.shape[0], b2.shape[0], dtype=torch.float64, device=a2.device)
    same = a2.data_ptr() == b2.data_ptr() and a2.shape == b2.shape
    for s in range(0, a2.shape[1], slice_cols):
        ad = a2[:, s:s + slice_cols].double()
        bd = ad if same else b2[:, s:s + slice_cols].double()
        out.addmm_(ad, bd.T)
    return out.cpu()


def ntk_kernel(
    model: nn.Module,
    inputs: torch.Tensor,
    convention: str = "sum-logits",
    chunk: int = 16,
    max_memory_mb: float = 2048.0,
    progress: bool | None = False,
) -> torch.Tensor:
    """Empirical NTK Theta of ``model`` on ``inputs`` (N, ...) as a float64 CPU tensor.

    Shape (N, N) for ``"sum-logits"`` and ``"trace"``, (N*C, N*C) for ``"full"``. Jacobian rows
    are computed ``chunk`` inputs at a time; at most ``max_memory_mb`` of rows are stored (plus
    the transient memory of one vmapped chunk, a few times ``chunk * R * P`` values), so very
    wide models recompute some chunks instead of running out of memory.
    The model runs in eval mode; weights, modes and RNG state are unchanged afterwards.
    """
    return _kernel(model, inputs, convention, chunk, max_memory_mb, progress)[0]


def _kernel(model: nn.Module, inputs: torch.Tensor, convention: str, chunk: int,
            max_memory_mb: float, progress: bool | None) -> tuple[torch.Tensor, int, int]:
    """(Theta, number of logits, number of parameters); see ``ntk_kernel``."""
    _check(convention, inputs, chunk)
    with analysis_state(model, train_mode=False):
        rows = _JacobianRows(model, inputs, convention)
        n = inputs.shape[0]
        r = rows.rows_per_sample
        full = convention == "full"
        per_sample_mb = r * rows.num_params * rows.itemsize / 2**20
        outer = int(max(chunk, min(n, max_memory_mb // max(per_sample_mb, 1e-9))))
        size = n * r if full else n
        theta = torch.zeros(size, size, dtype=torch.float64)
        s = r if full else 1  # kernel rows per sample

        passes = math.ceil(n / outer)
        total = sum(math.ceil((n - i * outer) / chunk) for i in range(passes))
        quiet = None if progress is None else not progress
        bar = progress_bar(total=total, desc="ntk jacobians", disable=quiet, leave=False)
        for o0 in range(0, n, outer):
            o1 = min(n, o0 + outer)
            block = None
            for i in range(o0, o1, chunk):  # filled in place: no second copy from a concat
                part = rows(i, min(o1, i + chunk))
                if block is None:
                    block = part.new_empty((o1 - o0,) + tuple(part.shape[1:]))
                block[i - o0:i - o0 + part.shape[0]] = part
                del part
                bar.update(1)
            theta[o0 * s:o1 * s, o0 * s:o1 * s] = _gram_block(block, block, full)
            # Later samples are streamed chunk by chunk against this stored outer block.
            for i0 in range(o1, n, chunk):
                i1 = min(n, i0 + chunk)
                g = _gram_block(block, rows(i0, i1), full)
                theta[o0 * s:o1 * s, i0 * s:i1 * s] = g
                theta[i0 * s:i1 * s, o0 * s:o1 * s] = g.T
                bar.update(1)
            del block
        bar.close()
    return theta, rows.num_outputs, rows.num_params


def _spectrum(theta: torch.Tensor) -> np.ndarray:
    sym = 0.5 * (theta + theta.T)  # remove float asymmetry before the symmetric solver
    return np.linalg.eigvalsh(sym.numpy())


def ntk_condition_number(
    model: nn.Module,
    inputs: torch.Tensor,
    convention: str = "sum-logits",
    chunk: int = 16,
    max_memory_mb: float = 2048.0,
    return_kernel: bool = False,
    progress: bool | None = False,
) -> NTKResult:
    """kappa = lambda_max / lambda_min of the empirical NTK on ``inputs`` (N, C, H, W).

    convention: ``"sum-logits"`` (default, the TE-NAS recipe behind the paper's numbers),
    ``"trace"`` or ``"full"`` (see module docstring); it is stored in the result. A rank-
    deficient kernel (more kernel rows than parameters, duplicated inputs: smallest eigenvalue
    below ``size * eps64 * lambda_max``) gets kappa = inf.
    """
    theta, num_outputs, num_params = _kernel(model, inputs, convention, chunk, max_memory_mb,
                                             progress)
    ev = _spectrum(theta)
    lmax, lmin = float(ev[-1]), float(ev[0])
    # Below size * eps * lambda_max the smallest eigenvalue is rounding noise: rank deficient.
    singular = lmin <= theta.shape[0] * np.finfo(np.float64).eps * abs(lmax)
    kappa = math.inf if singular else lmax / lmin
    return NTKResult(kappa, convention, lmax, lmin, ev.tolist(), int(inputs.shape[0]),
                     num_outputs, num_params, theta if return_kernel else None)


def ntk_at_init(
    model_factory: Callable[[int], nn.Module],
    inputs: torch.Tensor,
    seeds: Sequence[int] = (0, 1, 2),
    convention: str = "sum-logits",
    chunk: int = 16,
    max_memory_mb: float = 2048.0,
    progress: bool | None = False,
) -> dict:
    """NTK condition number at initialisation, averaged over seeds.

    ``model_factory(seed)`` builds a freshly initialised model (the global torch RNG is also
    seeded with ``seed`` right before the call and restored afterwards). Returns
    ``{"convention", "seeds", "kappas", "kappa_mean", "kappa_std" (sample std, ddof=1),
    "lambda_max", "lambda_min", "num_inputs"}``.
    """
    if len(seeds) == 0:
        raise ValueError("seeds is empty; pass at least one seed, e.g. seeds=(0, 1, 2)")
    results = []
    for seed in seeds:
        saved = torch.get_rng_state()
        try:
            torch.manual_seed(seed)
            model = model_factory(seed)
        finally:
            torch.set_rng_state(saved)
        results.append(ntk_condition_number(model, inputs, convention, chunk, max_memory_mb,
                                            progress=progress))
    kappas = np.array([r.kappa for r in results], dtype=np.float64)
    return {
        "convention": convention,
        "seeds": list(seeds),
        "kappas": kappas.tolist(),
        "kappa_mean": float(kappas.mean()),
        "kappa_std": float(kappas.std(ddof=1)) if len(kappas) > 1 else 0.0,
        "lambda_max": [r.lambda_max for r in results],
        "lambda_min": [r.lambda_min for r in results],
        "num_inputs": int(inputs.shape[0]),
    }


def reinitialized(model: nn.Module, seed: int, spec: dict[str, Any] | None = None) -> nn.Module:
    """A freshly initialised model of ``model``'s architecture, drawn under ``seed``.

    spec: the model spec (``vitsam.models.make_spec``) the model was built from. The model is
    then built anew by the zoo right after ``torch.manual_seed(seed)``, exactly as training
    builds it, so every parameter and buffer is at its initial value (seed = the run's seed
    gives the run's own initial weights). Without a spec, a copy of ``model`` has every
    floating parameter and buffer set to NaN, then ``reset_parameters()`` of every module
    (normalisation layers reset their affine weights and running statistics) and the model's
    own ``init_weights()`` (timm's family-specific init, last, as at construction) draw new
    values; any tensor still holding a NaN was not re-initialised, and a ValueError names it.
    The result is on ``model``'s device and dtype; the global RNG state is restored afterwards.
    """
    saved = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        fresh = _built(model, spec) if spec is not None else _reset_copy(model)
    finally:
        torch.set_rng_state(saved)
    return fresh


def _floating(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_floating_point()]


def _built(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    from vitsam.models import build_from_spec

    first = next(iter(_floating(model)), None)
    fresh = build_from_spec(spec)
    if first is not None:
        fresh = fresh.to(device=first[1].device, dtype=first[1].dtype)
    want = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    got = {n: tuple(t.shape) for n, t in fresh.state_dict().items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise ValueError(f"model spec {spec.get('name')!r} does not describe this model "
                         f"(tensors differ: {', '.join(n for n, _ in diff)}); pass the spec the "
                         "model was built from")
    modes = {n: m.training for n, m in model.named_modules()}
    for n, m in fresh.named_modules():  # each module's own mode, as in the copy route
        m.training = modes.get(n, model.training)
    return fresh


def _reset_copy(model: nn.Module) -> nn.Module:
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for _, t in _floating(fresh):
            t.fill_(math.nan)
        for m in fresh.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
            if callable(getattr(m, "reset_running_stats", None)):
                m.reset_running_stats()
        if callable(getattr(fresh, "init_weights", None)):
            fresh.init_weights()
        kept = [n for n, t in _floating(fresh) if bool(torch.isnan(t).any())]
    if kept:
        more = f" and {len(kept) - 3} more" if len(kept) > 3 else ""
        raise ValueError(f"cannot re-initialise {type(model).__name__}: no reset_parameters() or "
                         f"init_weights() sets {', '.join(kept[:3])}{more}; pass the model spec "
                         "so the model is built anew")
    return fresh


# --------------------------------------------------------------------------------------------
# Analysis plug-in.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NTKConfig:
    """Settings of the NTK analysis: kernel on the first ``num_inputs`` inputs of the data,
    ``convention`` as in the module docstring, and, when ``seeds`` is non-empty, the same
    architecture freshly initialised under each seed (the paper's at-initialisation number).
    Jacobian rows ``chunk`` inputs at a time, at most ``max_memory_mb`` of them stored."""

    num_inputs: int = 128
    convention: str = "sum-logits"
    seeds: tuple[int, ...] = (0, 1, 2)
    chunk: int = 16
    max_memory_mb: float = 2048.0
    # The spec the model was built from (the runner fills it from the run folder): the
    # at-initialisation models are then built anew by the zoo (see ``reinitialized``).
    model_spec: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # Every setting is checked when given, before any analysis of a run starts.
        if not (isinstance(self.num_inputs, int) and self.num_inputs >= 2):
            raise ValueError(f"num_inputs must be an integer >= 2 for a condition number, "
                             f"got {self.num_inputs!r}")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"unknown NTK convention {self.convention!r}; choose one of "
                             f"{', '.join(CONVENTIONS)}")
        seeds = self.seeds
        if not (isinstance(seeds, (tuple, list)) and all(isinstance(s, int) for s in seeds)):
            raise ValueError(f"seeds must be a list of integers (empty: skip the at-init "
                             f"kappa), got {seeds!r}")
        object.__setattr__(self, "seeds", tuple(seeds))
        if not (isinstance(self.chunk, int) and self.chunk >= 1):
            raise ValueError(f"chunk must be a positive integer, got {self.chunk!r}")
        if not (isinstance(self.max_memory_mb, (int, float)) and self.max_memory_mb > 0):
            raise ValueError(f"max_memory_mb must be > 0, got {self.max_memory_mb!r}")
        if self.model_spec is not None and not (isinstance(self.model_spec, dict)
                                                and "name" in self.model_spec):
            raise ValueError("model_spec must be a model spec dict (with 'name') or none")


def _first_inputs(data: Iterable, n: int) -> torch.Tensor:
    xs, have = [], 0
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        xs.append(x[: n - have])
        have += xs[-1].shape[0]
        if have >= n:
            break
    if have == 0:
        raise ValueError("no inputs in data; pass a non-empty list of (x, y) batches")
    return torch.cat(xs)


def run(model: nn.Module, data: Iterable, cfg: NTKConfig = NTKConfig()) -> dict:
    """kappa of ``model`` (as given) and, over ``cfg.seeds``, of freshly initialised models of
    its architecture (``reinitialized``; built anew from ``cfg.model_spec`` when given).

    data: iterable of (x (B, C, H, W) normalised float, y) batches; the first
    ``cfg.num_inputs`` inputs are used (fewer if the data is smaller). JSON-serialisable.
    """
    inputs = _first_inputs(data, cfg.num_inputs)
    res = ntk_condition_number(model, inputs, cfg.convention, cfg.chunk, cfg.max_memory_mb,
                               progress=None)
    out: dict = {"analysis": "ntk", "config": asdict(cfg), **res.to_dict()}
    if cfg.seeds:
        out["at_init"] = ntk_at_init(lambda s: reinitialized(model, s, cfg.model_spec), inputs,
                                     cfg.seeds, cfg.convention, cfg.chunk, cfg.max_memory_mb,
                                     progress=None)
        out["at_init"]["init"] = ("built anew from the model spec" if cfg.model_spec is not None
                                  else "every module reset, then the model's init_weights()")
    return out


def figures(results: dict | Sequence[tuple[str, dict]], out_dir: str | Path) -> list[Path]:
    """NTK eigenvalue spectra (descending, log scale), several runs overlaid if given a list of
    (label, result). Returns the written PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [("", results)] if isinstance(results, dict) else list(results)
    fig, ax = plt.subplots(figsize=(5.0, 3.5))
    for label, r in runs:
        ev = np.sort(np.asarray(r["eigenvalues"]))[::-1]
        name = f"{label} " if label else ""
        ax.plot(np.arange(1, len(ev) + 1), np.maximum(ev, 1e-30),
                label=f"{name}kappa={r['kappa']:.4g}")
    ax.set_yscale("log")
    ax.set_xlabel("index")
    ax.set_ylabel("NTK eigenvalue")
    ax.set_title(f"Empirical NTK spectrum ({runs[0][1]['convention']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [save_figure(fig, out_dir / "ntk_spectrum.png", dpi=130)]
