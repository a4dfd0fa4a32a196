"""Compensation: refit the kept neurons' down-projection columns after the cut. Pure math.

For one FF layer with prompt down-projection inputs ``Z`` (``T x d_ff``), the full output
``Y = Z W^T`` (``W`` the down weight in ``[out, in]`` form, ``d_model x d_ff``) and the kept
neurons ``S`` (``k`` of them, ``D`` the dropped ones), the refit solves

    min_{W', b}  ||Z_S W'^T + 1 b^T - Y||^2 + lam ||W' - W_S||^2,
    lam = alpha * mean(diag(Z_S^T Z_S))

in closed form (one ``k x k`` Cholesky solve). Everything it needs is the Gram matrix
``G = Z^T Z`` (``Z_S^T Y = G[S, :] W^T``), plus the column sums ``m = Z^T 1`` and the token
count ``T`` for the bias variant, so the prompt pass only accumulates :class:`GramStats`.

Writing ``Y = Z_S W_S^T + Z_D W_D^T`` the solution is

    W'^T = W_S^T + (G_SS + lam I)^-1 G_SD W_D^T                      (no bias)

i.e. the dropped neurons' contribution is carried by a ridge regression of the dropped
activations on the kept ones (``alpha -> inf`` gives back the plain slice ``W_S``). With a
bias (unpenalised) the same holds with the centred Gram ``G - m m^T / T``, and ``b`` is the
mean residual ``(W m - W' m_S) / T`` (added to any bias the layer already has).

A prompt shorter than ``k`` (``T < k``) leaves ``G_SS`` singular; the ridge term keeps the
system positive definite as long as some kept neuron is non-zero on the prompt, and the
change ``W' - W_S`` then lies in the span of the prompt's ``T`` kept-activation vectors (a
5-token prompt moves ``W'`` in at most 5 directions). If every kept neuron is exactly zero on
the prompt, there is nothing to fit and the plain slice is returned.

GPT-2's ``Conv1D`` stores the down weight as ``[in, out]``; :func:`refit_down` takes ``W`` in
``[out, in]`` form and :func:`refit_stored` adapts a weight as the module stores it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from griffin_export.errors import UsageError

#: What ``--compensate`` offers. ``refit`` has no bias (stock configs of most families have
#: none); ``refit-bias`` also fits one, added to the down projection's own bias (only for
#: families whose stock down projection has one).
METHODS = ("none", "refit", "refit-bias")
#: Default of ``griffin export`` and ``griffin ppl``: stock-loadable everywhere
#: (benchmarks/RESULTS-compensation.md).
DEFAULT_METHOD = "refit"
#: Ridge strength (``lam = alpha * mean(diag(Z_S^T Z_S))``) where no keep ratio is known.
DEFAULT_ALPHA = 1.0
#: Default ridge strength by keep ratio: ``alpha = 1`` below this ratio, :data:`HIGH_KEEP_ALPHA`
#: from it up (measured at keep 0.25/0.5/0.75 and 0.9; benchmarks/RESULTS-compensation.md).
HIGH_KEEP_RATIO = 0.8
HIGH_KEEP_ALPHA = 10.0
#: Whether a refresh (the runtime's, ``griffin ppl --refresh``) refits a compensated export's
#: down projections on its window when the caller does not say
#: (benchmarks/RESULTS-compensation.md, "Refit at refresh").
DEFAULT_REFIT_ON_REFRESH = True


def default_alpha(ratio: float) -> float:
    """The default ``--alpha`` for keep ratio ``ratio``: 1, or 10 from keep 0.8 up (where the
    dropped neurons carry little and a weak ridge overfits the prompt)."""
    return HIGH_KEEP_ALPHA if ratio >= HIGH_KEEP_RATIO else DEFAULT_ALPHA


@dataclass(frozen=True)
class Compensation:
    """How an export repairs its pruned layers: ``method`` (one of :data:`METHODS`) and the
    ridge strength ``alpha``."""

    method: str = DEFAULT_METHOD
    alpha: float = DEFAULT_ALPHA

    def __post_init__(self) -> None:
        check_method(self.method)
        check_alpha(self.alpha)

    @property
    def active(self) -> bool:
        return self.method != "none"

    @property
    def bias(self) -> bool:
        return self.method == "refit-bias"

    def record(self) -> dict[str, object]:
        """What the manifest records."""
        return {"method": self.method, "alpha": self.alpha, "bias": self.bias}

    def check_model(self, has_down_bias: bool, model_type: str) -> None:
        """Refuse ``refit-bias`` where the stock config has no down-projection bias (writing
        one would need another config or ``model_type``)."""
        if self.bias and not has_down_bias:
            raise UsageError(
                f"--compensate refit-bias needs a down-projection bias, which a stock "
                f"'{model_type}' config does not have; use --compensate refit"
            )


def check_method(method: str) -> str:
    """Return ``method`` if it is a known compensation, else raise naming the choices."""
    if method not in METHODS:
        raise UsageError(f"--compensate '{method}' is not known; use one of {', '.join(METHODS)}")
    return method


def check_alpha(alpha: float) -> float:
    """Reject ridge strengths that are negative, NaN or infinite."""
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise UsageError(
            f"--alpha must be a finite number >= 0, got {alpha!r}; e.g. --alpha 1 (the default)"
        )
    return float(alpha)


@dataclass
class GramStats:
    """What the refit needs from one layer's prompt tokens: ``m = sum_t z_t`` (float64), ``T``
    and either the tokens' rows themselves (while ``T <= rows_limit``, default ``d_ff / 2``:
    ``T x d_ff`` floats, and the refit solves a ``T x T`` system) or the Gram matrix ``G =
    sum_t z_t z_t^T`` (``d_ff^2`` floats; the refit solves ``k x k``). Products and sums run in
    ``dtype`` (float32 by default; float64 for exact checks)."""

    d_ff: int
    rows_limit: int
    dtype: torch.dtype
    device: torch.device
    sums: Tensor
    rows: list[Tensor] = field(default_factory=list)
    gram: Tensor | None = None
    tokens: int = 0

    @classmethod
    def zeros(
        cls,
        d_ff: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        rows_limit: int | None = None,
    ) -> GramStats:
        return cls(
            d_ff=d_ff,
            rows_limit=d_ff // 2 if rows_limit is None else rows_limit,
            dtype=dtype,
            device=torch.device(device),
            sums=torch.zeros(d_ff, dtype=torch.float64, device=device),
        )

    def add(self, z: Tensor) -> None:
        """Accumulate tokens ``z`` (``[..., d_ff]``; all leading axes are tokens)."""
        flat = z.detach().reshape(-1, z.shape[-1]).to(self.device, self.dtype)
        self.sums += flat.sum(dim=0, dtype=torch.float64)
        self.tokens += int(flat.shape[0])
        if self.gram is None and self.tokens <= self.rows_limit:
            # Own copy of the rows; ``to`` already made one unless z was in ``dtype`` here.
            shared = flat.untyped_storage().data_ptr() == z.untyped_storage().data_ptr()
            self.rows.append(flat.clone() if shared else flat)
            return
        if self.gram is None:
            self.gram = torch.zeros(self.d_ff, self.d_ff, dtype=self.dtype, device=self.device)
            for chunk in self.rows:
                self.gram.addmm_(chunk.T, chunk)
            self.rows = []
        self.gram.addmm_(flat.T, flat)

    def matrix(self) -> Tensor:
        """``G`` (computed from the rows while they are kept)."""
        if self.gram is not None:
            return self.gram
        rows = self._stacked()
        return rows.T @ rows

    def regression(self, keep: Tensor, alpha: float, bias: bool) -> Regression:
        """:func:`regression` from these statistics: from the rows (a ``T x T`` solve, by
        the push-through identity) while they are kept, else from the Gram matrix."""
        if self.gram is not None:
            return regression(self.gram, keep, alpha, sums=self.sums, tokens=self.tokens, bias=bias)
        return _regression_from_rows(self._stacked(), self.sums, keep, alpha, bias)

    def _stacked(self) -> Tensor:
        if not self.rows:
            return torch.zeros(0, self.d_ff, dtype=self.dtype, device=self.device)
        return self.rows[0] if len(self.rows) == 1 else torch.cat(self.rows)


@dataclass
class Refit:
    """The refitted down projection of one layer: ``weight`` ``[out, k]`` (columns in the
    order of ``keep``) and ``bias`` ``[out]`` to *add* to the layer's bias (``None`` without
    the bias variant)."""

    weight: Tensor
    bias: Tensor | None


def ridge_lambda(gram_kept_diag: Tensor, alpha: float) -> float:
    """``lam = alpha * mean(diag(Z_S^T Z_S))``."""
    return float(alpha) * float(gram_kept_diag.double().mean())


@dataclass
class Regression:
    """The dropped neurons' activations as a ridge regression on the kept ones:
    ``z_D ~ z_S @ coef + offset``. ``coef`` ``[k, d_ff - k]`` (rows in ``keep``'s order,
    columns in ``dropped``'s), ``offset`` ``[d_ff - k]`` or ``None`` without a bias."""

    keep: Tensor
    dropped: Tensor
    coef: Tensor
    offset: Tensor | None
    #: ``coef = factors[0] @ factors[1]`` (``[k, T] @ [T, d_ff - k]``) when it came from the
    #: prompt's rows: products with it then cost ``T`` instead of ``k`` per output.
    factors: tuple[Tensor, Tensor] | None = None

    def predict(self, kept: Tensor) -> Tensor:
        """The dropped neurons' activations predicted from the kept ones (``[..., k]`` ->
        ``[..., d_ff - k]``, in ``kept``'s dtype): what the refitted down projection adds."""
        x = kept.to(self.coef.dtype)
        out = x @ self.coef if self.factors is None else (x @ self.factors[0]) @ self.factors[1]
        if self.offset is not None:
            out = out + self.offset
        return out.to(kept.dtype)


def regression(
    gram: Tensor,
    keep: Tensor,
    alpha: float = DEFAULT_ALPHA,
    *,
    sums: Tensor | None = None,
    tokens: int = 0,
    bias: bool = False,
) -> Regression:
    """Ridge regression of the dropped neurons on the kept ones (in float64 for a float64
    Gram matrix, else float32): the part of the refit that does not depend on the down
    weight (:func:`refit_down`).

    ``coef = (G_SS + lam I)^-1 G_SD`` (centred Gram with ``bias``), ``offset = (m_D - coef^T
    m_S) / T``.
    """
    alpha = check_alpha(alpha)
    d_ff = gram.shape[0] if gram.dim() else 0
    if gram.dim() != 2 or gram.shape != (d_ff, d_ff):
        raise UsageError(
            f"the Gram matrix is {tuple(gram.shape)}, not square; pass Z^T Z ([d_ff, d_ff])"
        )
    if bias and (sums is None or tokens < 1):
        raise UsageError(
            f"bias=True needs sums= (the column sums) and tokens >= 1, got tokens={tokens}; "
            "pass both, or bias=False"
        )
    device = gram.device
    dtype = _math_dtype(gram)
    keep = keep.to(device=device, dtype=torch.int64)
    dropped_mask = torch.ones(d_ff, dtype=torch.bool, device=device)
    dropped_mask[keep] = False
    drop = dropped_mask.nonzero().flatten()
    g = gram.detach().to(dtype)
    m = sums.detach().to(device, dtype) if bias and sums is not None else None
    centred = g - torch.outer(m, m) / tokens if m is not None else g
    lam = ridge_lambda(g[keep, keep], alpha)  # paired indices: the diagonal of G_SS
    kept_block = centred[keep][:, keep]
    if drop.numel() == 0 or (lam == 0.0 and alpha > 0) or not _finite(centred):
        # Nothing dropped, every kept neuron zero on the prompt (nothing to regress on), or
        # activations that overflowed the model's dtype (selection refuses those; nothing to
        # fit either way): the plain slice.
        coef = torch.zeros(keep.numel(), drop.numel(), dtype=dtype, device=device)
    else:
        system = kept_block + lam * torch.eye(keep.numel(), dtype=dtype, device=device)
        coef = _spd_solve(system, centred[keep][:, drop])
    offset = (m[drop] - coef.T @ m[keep]) / tokens if m is not None else None
    if offset is not None and not _finite(offset):
        offset = torch.zeros_like(offset)
    return Regression(keep=keep, dropped=drop, coef=coef, offset=offset)


def _regression_from_rows(
    rows: Tensor, sums: Tensor, keep: Tensor, alpha: float, bias: bool
) -> Regression:
    """:func:`regression` from the tokens' rows ``Z`` (``T x d_ff``): ``coef = (Z_S^T Z_S + lam
    I)^-1 Z_S^T Z_D = Z_S^T (Z_S Z_S^T + lam I)^-1 Z_D`` (centred rows with a bias), one
    ``T x T`` solve."""
    alpha = check_alpha(alpha)
    d_ff = rows.shape[1]
    device, dtype = rows.device, _math_dtype(rows)
    tokens = rows.shape[0]
    if tokens < 1:
        raise UsageError("the refit needs at least one prompt token; pass a non-empty prompt")
    keep = keep.to(device=device, dtype=torch.int64)
    dropped_mask = torch.ones(d_ff, dtype=torch.bool, device=device)
    dropped_mask[keep] = False
    drop = dropped_mask.nonzero().flatten()
    z = rows.to(dtype)
    m = sums.to(device, dtype)
    lam = float(alpha) * float(z[:, keep].double().square().sum()) / max(keep.numel(), 1)
    centred = z - m / tokens if bias else z
    kept, dropped = centred[:, keep], centred[:, drop]
    if drop.numel() == 0 or (lam == 0.0 and alpha > 0) or not _finite(centred):
        coef = torch.zeros(keep.numel(), drop.numel(), dtype=dtype, device=device)
    else:
        system = kept @ kept.T + lam * torch.eye(tokens, dtype=dtype, device=device)
        solved = _spd_solve(system, dropped)  # [T, d_ff - k]
        offset = (m[drop] - solved.T @ (kept @ m[keep])) / tokens if bias else None
        if offset is not None and not _finite(offset):
            offset = torch.zeros_like(offset)
        coef = torch.empty(keep.numel(), drop.numel(), dtype=dtype, device="meta")
        return Regression(keep, drop, coef, offset, factors=(kept.T, solved))
    offset = (m[drop] - coef.T @ m[keep]) / tokens if bias else None
    if offset is not None and not _finite(offset):
        offset = torch.zeros_like(offset)
    return Regression(keep=keep, dropped=drop, coef=coef, offset=offset)


def refit_down(
    gram: Tensor,
    weight: Tensor,
    keep: Tensor,
    alpha: float = DEFAULT_ALPHA,
    *,
    sums: Tensor | None = None,
    tokens: int = 0,
    bias: bool = False,
) -> Refit:
    """Closed-form ridge refit of the kept columns of one down projection.

    Args:
        gram: ``G = Z^T Z`` over the prompt tokens (``[d_ff, d_ff]``, float32 or float64).
        weight: the full down weight in ``[out, in]`` form (``[d_model, d_ff]``).
        keep: ``[k]`` kept neuron indices; the refitted columns follow this order.
        alpha: ridge strength relative to the kept neurons' mean energy (>= 0).
        sums: ``m = Z^T 1`` (``[d_ff]``), needed with ``bias``.
        tokens: ``T``, needed with ``bias``.
        bias: also fit an unpenalised output bias.

    Returns:
        :class:`Refit` in ``weight``'s dtype and device; the math runs in float32 (float64
        for a float64 Gram matrix):
        ``W' = W_S + W_D coef^T`` and ``b = W_D offset`` (:func:`regression`).
    """
    if weight.dim() != 2 or gram.shape != (weight.shape[1], weight.shape[1]):
        raise UsageError(
            f"the Gram matrix {tuple(gram.shape)} does not match the down weight "
            f"{tuple(weight.shape)}; pass G = Z^T Z of its inputs ([in, in]) and the [out, in] "
            "weight"
        )
    reg = regression(gram.to(weight.device), keep, alpha, sums=sums, tokens=tokens, bias=bias)
    return apply_regression(reg, weight)


#: :func:`apply_regression` works through the down weight in pieces of about this many bytes
#: of float32 (its temporaries: a few such pieces, not copies of the whole weight).
APPLY_PIECE_BYTES = 2 << 20


def apply_regression(reg: Regression, weight: Tensor) -> Refit:
    """The refitted down projection from a :class:`Regression` and the full down weight
    (``[out, in]``): ``W' = W_S + W_D coef^T``, ``b = W_D offset``, computed a block of output
    rows at a time (:data:`APPLY_PIECE_BYTES`)."""
    dtype = reg.coef.dtype
    w = weight.detach().to(reg.dropped.device)
    out, width = w.shape
    new = torch.empty(out, reg.keep.numel(), dtype=weight.dtype, device=w.device)
    offset = None if reg.offset is None else torch.empty(out, dtype=dtype, device=w.device)
    step = max(1, APPLY_PIECE_BYTES // (4 * max(width, 1)))
    for start in range(0, out, step):
        piece = w[start : start + step]
        dropped = piece[:, reg.dropped].to(dtype)
        kept = piece[:, reg.keep].to(dtype)
        if reg.factors is None:
            kept += dropped @ reg.coef.T
        else:  # W_D (L R)^T = (W_D R^T) L^T: T instead of k inner products per output
            left, right = reg.factors
            kept += (dropped @ right.T) @ left.T
        new[start : start + step] = kept
        if offset is not None and reg.offset is not None:
            offset[start : start + step] = dropped @ reg.offset
    return Refit(weight=new, bias=None if offset is None else offset.to(weight.dtype))


def _finite(tensor: Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def _math_dtype(gram: Tensor) -> torch.dtype:
    """float64 for a float64 Gram matrix, else float32 (the ridge keeps the ``k x k`` system's
    condition number below about ``1 + k / alpha``)."""
    return torch.float64 if gram.dtype == torch.float64 else torch.float32


def _spd_solve(system: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``system x = rhs`` for a symmetric positive semi-definite ``system``: Cholesky,
    or the minimum-norm least-squares solution when it is singular (``alpha = 0`` with a
    prompt shorter than ``k``)."""
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.pinv(system, hermitian=True) @ rhs


def refit_stored(
    weight: Tensor, keep: Tensor, stats: GramStats, how: Compensation, transposed: bool
) -> Refit:
    """:func:`refit_down` for a down weight as a module stores it (``transposed``: GPT-2's
    ``Conv1D``, ``[in, out]``); the refitted weight comes back in the same layout, its
    columns (rows) in ``keep``'s order, contiguous."""
    reg = stats.regression(keep.to(stats.device), how.alpha, how.bias)
    return apply_stored(reg, weight, transposed)


def apply_stored(reg: Regression, weight: Tensor, transposed: bool) -> Refit:
    """:func:`apply_regression` for a down weight as a module stores it (``transposed``:
    ``[in, out]``), the refitted weight in the same layout, contiguous."""
    out_in = weight.T if transposed else weight
    refit = apply_regression(reg, out_in)
    stored = refit.weight.T if transposed else refit.weight
    return Refit(weight=stored.contiguous(), bias=refit.bias)
