"""Running calibration texts through a model and handing each layer's real inputs to a callback."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


def collect_layer_inputs(module: nn.Module, names: list[str], calibration: list[Batch] | None,
                         fn: Callable[[str, torch.Tensor], Any]) -> None:
    """Run calibration batches through the FP32 module, calling fn(name, input) for each layer.

    Padding tokens are dropped first (with the batch's attention mask) so that they do not widen
    the observed ranges: at run time they never matter to the output.
    """
    current_mask: list[torch.Tensor | None] = [None]

    def hook_for(name: str):
        def hook(_mod, args):
            x = args[0].detach().float()
            mask = current_mask[0]
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask.bool()]
            fn(name, x)
        return hook

    handles = [module.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.inference_mode():
            for batch in calibration or []:
                current_mask[0] = batch.get("attention_mask")
                module(**batch)
    finally:
        for h in handles:
            h.remove()


def layers_sharing_inputs(module: nn.Module, names: list[str], run: Callable[[], Any]) -> list[tuple[str, ...]]:
    """Groups (two or more) of the named layers that received the very same input tensor on every call in run().

    Attention's query, key and value read the same hidden states; a layer also called on other inputs
    (or with other company) belongs to no group.
    """
    readers: dict[int, tuple[torch.Tensor, list[str]]] = {}

    def hook_for(name: str):
        def hook(_mod, args):
            # the tensor is kept so that its id cannot be reused by another input during the run
            readers.setdefault(id(args[0]), (args[0], []))[1].append(name)
        return hook

    handles = [module.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    groups_of: dict[str, set[tuple[str, ...]]] = {}
    for _, group in readers.values():
        for name in group:
            groups_of.setdefault(name, set()).add(tuple(dict.fromkeys(group)))
    return sorted({group for found in groups_of.values() for group in found
                   if len(group) > 1 and all(groups_of[n] == {group} for n in group)})


def smoothing_factors(module: nn.Module, names: list[str], calibration: list[Batch] | None,
                      alpha: float, joint: bool = False, floor: float = 0.0) -> dict[str, torch.Tensor]:
    """SmoothQuant per-input-channel factors s_j = max|x_j|^alpha / max|w_j|^(1 - alpha).

    Dividing activation channel j by s_j and multiplying weight column j by it leaves the
    product unchanged while moving quantization difficulty from outlier activation channels
    into the weights (alpha = 0: none moved; 1: all of it).

    ``joint``: layers that read the very same input (attention's query, key and value) get one
    factor vector, with max|w_j| over all their weights, as SmoothQuant smooths them: their smoothed
    inputs are then identical, so one quantized input and one GEMM can serve them all
    (:func:`quantization.layers.share_input_gemms`).

    ``floor``: each channel's activation maximum counts as at least ``floor`` x the median over the
    layer's channels. A channel the calibration texts never woke (a ReLU output that stayed 0) would
    otherwise get s_j ~ 1e-5: the first input that wakes it is divided by that and crushes every other
    channel of its token to zero in the int8 grid.
    """
    absmax: dict[str, torch.Tensor] = {}

    def channel_absmax(name: str, x: torch.Tensor) -> None:
        m = x.abs().reshape(-1, x.shape[-1]).amax(0)
        absmax[name] = torch.maximum(absmax[name], m) if name in absmax else m

    collect_layer_inputs(module, names, calibration, channel_absmax)
    groups: dict[str, tuple[str, ...]] = {name: (name,) for name in names}
    if joint and calibration:
        for group in layers_sharing_inputs(module, names, lambda: module(**calibration[0])):
            groups.update(dict.fromkeys(group, group))
    factors = {}
    for name in names:
        w_absmax = torch.stack([module.get_submodule(n).weight.detach().float().abs().amax(0)
                                for n in groups[name]]).amax(0).clamp_min(1e-5)
        a = absmax[name].clamp_min(max(1e-5, floor * float(absmax[name].median())))
        factors[name] = (a.pow(alpha) / w_absmax.pow(1 - alpha)).clamp_min(1e-5)
    return factors
