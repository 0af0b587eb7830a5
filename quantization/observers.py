"""Observers: watch tensors during calibration and choose quantization parameters.

Every observer records what it saw (number of observations and elements, running min and max)
and, once asked, the parameters it chose; :meth:`Observer.summary` returns both as plain data.

- ``minmax``: the full observed range.
- ``moving-average``: an exponential moving average of each batch's min and max (robust to one
  odd batch).
- ``percentile``: clips the range to the given lower/upper percentiles of a bounded sample of
  the observed values.
- ``mse``: searches clipping ranges (shrinking the min-max range) and keeps the one whose
  quantize-dequantize error on a sample of the observed values is smallest.
"""

from __future__ import annotations

from typing import Any

import torch

from .affine import QParams, QScheme, compute_qparams, fake_quantize, grouped_view
from .errors import CalibrationError, InvalidConfigError

_SAMPLE_PER_GROUP = 4096  # values kept per quantization group for percentile / MSE search


class Observer:
    name = "observer"

    def __init__(self, scheme: QScheme | None = None) -> None:
        self.scheme = scheme or QScheme()
        self.count = 0
        self.numel = 0
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self._qparams: QParams | None = None
        self._shape: torch.Size | None = None

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if x.numel() == 0:
            return
        v = grouped_view(x, self.scheme)
        lo, hi = v.amin(dim=-1, keepdim=True), v.amax(dim=-1, keepdim=True)
        if self.min_val is not None and lo.shape != self.min_val.shape:
            raise InvalidConfigError(
                f"{self.name} observer saw groups of shape {tuple(lo.shape)} after {tuple(self.min_val.shape)}; "
                "per-channel and per-group observers need tensors of the same shape along the channel axis"
            )
        self._update(v, lo, hi)
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)
        self.count += 1
        self.numel += x.numel()
        self._shape = x.shape
        self._qparams = None

    __call__ = observe

    def _update(self, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Hook for subclasses: called with each observation's grouped view before min/max update."""

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val

    def qparams(self) -> QParams:
        if self.count == 0:
            raise CalibrationError(
                f"the {self.name} observer saw no data; run calibration inputs through the model first"
            )
        if self._qparams is None:
            lo, hi = self._range()
            self._qparams = compute_qparams(lo, hi, self.scheme, shape=self._shape)
        return self._qparams

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"observer": self.name, "scheme": self.scheme.describe(),
                               "observations": self.count, "elements": self.numel}
        if self.count:
            qp = self.qparams()
            lo, hi = self._range()
            out.update(
                observed_min=float(self.min_val.min()), observed_max=float(self.max_val.max()),
                chosen_min=float(lo.min()), chosen_max=float(hi.max()),
                scale=_compact(qp.scale), zero_point=_compact(qp.zero_point),
            )
        return out


def _compact(t: torch.Tensor) -> float | int | list:
    t = t.flatten()
    if t.numel() == 1:
        return t.item()
    return {"min": t.min().item(), "max": t.max().item(), "n": t.numel()}  # type: ignore[return-value]


class MinMaxObserver(Observer):
    name = "minmax"


class MovingAverageMinMaxObserver(Observer):
    name = "moving-average"

    def __init__(self, scheme: QScheme | None = None, averaging_constant: float = 0.01) -> None:
        super().__init__(scheme)
        if not 0.0 < averaging_constant <= 1.0:
            raise InvalidConfigError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.c = averaging_constant
        self.avg_min: torch.Tensor | None = None
        self.avg_max: torch.Tensor | None = None

    def _update(self, v, lo, hi) -> None:
        if self.avg_min is None:
            self.avg_min, self.avg_max = lo.clone(), hi.clone()
        else:
            self.avg_min += self.c * (lo - self.avg_min)
            self.avg_max += self.c * (hi - self.avg_max)

    def _range(self):
        return self.avg_min, self.avg_max


class _SamplingObserver(Observer):
    """Keeps a bounded random sample of each group's values (reservoir-like, per observation)."""

    def __init__(self, scheme: QScheme | None = None, sample_size: int = _SAMPLE_PER_GROUP) -> None:
        super().__init__(scheme)
        self.sample_size = sample_size
        self.samples: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(0)

    def _update(self, v, lo, hi) -> None:
        if v.shape[-1] > self.sample_size:
            idx = torch.randint(v.shape[-1], (self.sample_size,), generator=self._gen)
            v = v[:, idx]
        self.samples = v.clone() if self.samples is None else torch.cat([self.samples, v], dim=-1)
        if self.samples.shape[-1] > 4 * self.sample_size:
            idx = torch.randperm(self.samples.shape[-1], generator=self._gen)[: 2 * self.sample_size]
            # keep the extremes seen so far in the sample so clipping is judged against them
            self.samples = torch.cat([self.samples[:, idx], self.samples.amin(-1, keepdim=True),
                                      self.samples.amax(-1, keepdim=True)], dim=-1)


class PercentileObserver(_SamplingObserver):
    name = "percentile"

    def __init__(self, scheme: QScheme | None = None, percentile: float = 99.99,
                 sample_size: int = _SAMPLE_PER_GROUP) -> None:
        super().__init__(scheme, sample_size)
        if not 50.0 < percentile <= 100.0:
            raise InvalidConfigError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def _range(self):
        q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0])
        lo, hi = torch.quantile(self.samples, q, dim=-1, keepdim=True)
        return lo, hi


class MSEObserver(_SamplingObserver):
    """Error-minimising clip search: try ranges [a*min, a*max] for a in a grid, keep the best."""

    name = "mse"

    def __init__(self, scheme: QScheme | None = None, grid: int = 80, min_ratio: float = 0.2,
                 sample_size: int = _SAMPLE_PER_GROUP) -> None:
        super().__init__(scheme, sample_size)
        if grid < 2 or not 0.0 < min_ratio < 1.0:
            raise InvalidConfigError("mse observer needs grid >= 2 and 0 < min_ratio < 1")
        self.grid = grid
        self.min_ratio = min_ratio
        self.best_ratio: torch.Tensor | None = None

    def _range(self):
        lo, hi = self.min_val, self.max_val
        x = self.samples
        best_err = torch.full_like(lo, float("inf"))
        best = torch.ones_like(lo)
        flat = QScheme(self.scheme.bits, self.scheme.symmetric, self.scheme.signed, "channel", 0)
        for a in torch.linspace(1.0, self.min_ratio, self.grid):
            qp = compute_qparams(lo * a, hi * a, flat)
            err = ((fake_quantize(x, qp) - x) ** 2).mean(dim=-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, a, best)
        self.best_ratio = best
        return lo * best, hi * best

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        if self.best_ratio is not None:
            out["clip_ratio"] = _compact(self.best_ratio)
        return out


OBSERVERS: dict[str, type[Observer]] = {
    cls.name: cls for cls in (MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, MSEObserver)
}


def make_observer(name: str, scheme: QScheme | None = None, **options: Any) -> Observer:
    try:
        cls = OBSERVERS[name]
    except KeyError:
        raise InvalidConfigError(f"unknown observer {name!r}; choose one of: {', '.join(OBSERVERS)}") from None
    return cls(scheme, **options)
