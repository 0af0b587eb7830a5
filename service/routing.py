"""Which variant serves a request: pinned by the client, or the model's weighted A/B split.

A split is sticky per ``X-Request-Key``: the key is hashed to a point in [0, 1) that always falls
in the same variant's share, so a user keeps seeing one variant. Without a key each request is
drawn at random. Shadow traffic: a sampled fraction of requests also runs on a second variant,
off the response path, to measure agreement on live inputs.
"""

from __future__ import annotations

import hashlib
import random

from .config import ModelConfig
from .errors import UnknownVariant, VariantUnavailable


class Router:
    def __init__(self, config: ModelConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.model = config.name
        self.variants = [v.name for v in config.variants]
        self.baseline = config.baseline
        self.shadow = config.routing.shadow
        self.shadow_variant = config.routing.shadow_variant
        self.rng = rng or random.Random()
        self.unavailable: dict[str, str] = {}  # variant -> why it could not be built
        self.degraded: dict[str, str] = {}     # variant -> why the serving gate keeps unpinned traffic off it
        self._off_route: set[str] = set()      # degraded variants unpinned traffic leaves (gate.action fallback)
        self._route()

    @property
    def working(self) -> list[str]:
        return [v for v in self.variants if v not in self.unavailable]

    def _route(self) -> None:
        """The configured default and split, less what is unavailable or taken off routes; the default falls
        back to the baseline, else the first variant left."""
        working = self.working
        healthy = [v for v in working if v not in self._off_route]
        self.split = [(name, w) for name, w in (self.config.routing.split or {}).items() if w > 0 and name in healthy]
        self.total = sum(w for _, w in self.split)
        self.default = self.config.default_variant
        if self.default not in healthy and working:
            self.default = next((v for v in (self.baseline, *healthy, *working) if v in working), working[0])

    def mark_unavailable(self, variant: str, reason: str) -> None:
        """Serve without ``variant``: unpinned traffic moves to the baseline or the first working variant."""
        self.unavailable[variant] = reason
        self._route()

    def mark_degraded(self, variant: str, reason: str, fallback: bool = True) -> None:
        """``variant`` failed the serving gate; with ``fallback``, unpinned traffic leaves it for the baseline."""
        self.degraded[variant] = reason
        if fallback:
            self._off_route.add(variant)
            self._route()

    def restore(self, variant: str) -> None:
        """``variant`` passes the gate again (a faster form was swapped in): its configured routes come back."""
        self.degraded.pop(variant, None)
        self._off_route.discard(variant)
        self._route()

    def check(self, variant: str) -> str:
        if variant not in self.variants:
            raise UnknownVariant(f"model {self.model!r} has no variant {variant!r}; available: "
                                 f"{', '.join(self.working)}", available=self.working)
        if variant in self.unavailable:
            raise VariantUnavailable(f"variant {variant!r} of model {self.model!r} is unavailable (it failed to "
                                     f"build at start-up); working variants: {', '.join(self.working)}",
                                     available=self.working)
        return variant

    def choose(self, pinned: str | None = None, request_key: str | None = None) -> str:
        if pinned:
            return self.check(pinned)
        if not self.split:
            return self.default
        point = _unit_hash(request_key) if request_key else self.rng.random()
        edge = 0.0
        for name, weight in self.split:
            edge += weight / self.total
            if point < edge:
                return name
        return self.split[-1][0]

    def shadow_target(self, served: str) -> str | None:
        """The variant to shadow this request on, or None (not sampled, or nothing to compare with)."""
        working = self.working
        if self.shadow <= 0 or len(working) < 2 or self.rng.random() >= self.shadow:
            return None
        target = self.shadow_variant or (self.baseline if served != self.baseline else None)
        if target is None or target == served or target not in working:
            target = next((v for v in working if v != served), None)
        return target


def _unit_hash(key: str) -> float:
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
