"""Physically smaller models: drop channels whose output is exactly zero (docs/algorithm.md §7).

``shrink(model, masks)`` copies the model, applies the masks, and in every channel space
(:func:`~sfwprune.prune.structured.channel_spaces`) removes the channels that all its producers
leave identically zero, together with the matching input channels (or ``Flatten`` column blocks)
of every consumer and the BatchNorm entries. The result is a dense model of the same class with
smaller layers whose eval-mode outputs equal the masked model's.

Residual connections (ResNet-18): the stem, the second conv of every block and a stage's
shortcut conv write into one space (their outputs are added), so a channel of that space goes only
when it is zero in *all* of them. :func:`~sfwprune.prune.structured.structured_masks` never prunes
these tied spaces, so in practice ResNet loses block-internal channels (each block's first conv
and the matching inputs of its second).

Why not Torch-Pruning (DepGraph)? It traces any network from an example input and would cover
the zoo, but it would be a new dependency for five fixed architectures, it edits the model in place
and its documentation has pruned models saved as pickled objects (not ``weights_only`` loadable);
the zoo's channel spaces, exact equality with our masked models (BatchNorm entries of dropped
units, Flatten column blocks, residual ties) and a plain widths spec are simpler to own here.

Saving: ``shrink_spec(small)`` gives the widths of every resized layer as plain ints; with
``{"spec": ..., "state_dict": small.state_dict()}`` saved, ``resize_(build_model(...), spec)``
rebuilds the architecture and ``load_state_dict`` fills it (all loadable with
``torch.load(..., weights_only=True)``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .masks import apply_masks_
from .structured import Space, channel_spaces

Tensor = torch.Tensor


def _unit_is_zero(layer: nn.Module, bn: _BatchNorm | None) -> Tensor:
    """Per output unit: is its output (after the BatchNorm, eval mode) identically zero?"""
    w = layer.weight.detach()
    pre_zero = (w.reshape(w.shape[0], -1) == 0).all(dim=1)
    if layer.bias is not None:
        pre_zero &= layer.bias.detach() == 0
    if bn is None:
        return pre_zero
    ones = torch.ones_like(pre_zero, dtype=w.dtype)
    gamma = bn.weight.detach() if bn.affine else ones
    beta = bn.bias.detach() if bn.affine else 0 * ones
    mean = bn.running_mean if bn.running_mean is not None else 0 * ones
    return (beta == 0) & ((gamma == 0) | (pre_zero & (mean == 0)))


def _kept(space: Space, modules: dict[str, nn.Module]) -> Tensor:
    if space.output:
        return torch.arange(space.size)
    zero = torch.ones(space.size, dtype=torch.bool)
    for layer_name, bn_name in space.producers:
        bn = modules[bn_name] if bn_name is not None else None
        zero &= _unit_is_zero(modules[layer_name], bn).cpu()  # type: ignore[arg-type]
    kept = torch.nonzero(~zero).flatten()
    # A layer needs at least one channel; an all-zero space keeps channel 0 (still exact).
    return kept if kept.numel() else torch.zeros(1, dtype=torch.long)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _resized_layer(layer: nn.Module, fan_in: int, out: int) -> nn.Module:
    kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    if isinstance(layer, nn.Linear):
        return nn.Linear(fan_in, out, bias=layer.bias is not None, **kw)
    if isinstance(layer, _ConvNd):
        return type(layer)(
            fan_in, out, layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, bias=layer.bias is not None,
            padding_mode=layer.padding_mode, **kw,
        )  # fmt: skip
    raise ValueError(f"Invalid layer: {type(layer).__name__} (expected Linear or conv)")


def _resized_bn(bn: _BatchNorm, num: int) -> _BatchNorm:
    dev = bn.running_mean if bn.running_mean is not None else bn.weight
    kw = {
        "device": dev.device if dev is not None else None,
        "dtype": dev.dtype if dev is not None else None,
    }
    return type(bn)(
        num,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        **kw,
    )  # type: ignore[call-arg]


@torch.no_grad()
def shrink(model: nn.Module, masks: dict[str, Tensor] | None = None) -> nn.Module:
    """A physically smaller copy of ``model`` (with ``masks`` applied first, if given).

    Channels whose output is identically zero in every producer of their space are removed,
    with the matching consumer inputs and BatchNorm entries; eval-mode outputs are unchanged.
    Models :func:`~sfwprune.prune.structured.channel_spaces` does not support raise
    ``ValueError`` naming the module.

    Example:
        >>> masks = structured_masks(model, 0.5, "channel")
        >>> small = shrink(model, masks)
    """
    small = copy.deepcopy(model)
    if masks is not None:
        apply_masks_(small, masks)
    spaces = channel_spaces(small)
    modules = dict(small.named_modules())
    out_idx: dict[str, Tensor] = {}  # layer or BN name -> kept output channels
    in_idx: dict[str, Tensor] = {}  # layer name -> kept input features
    for space in spaces:
        kept = _kept(space, modules)
        for layer_name, bn_name in space.producers:
            out_idx[layer_name] = kept
            if bn_name is not None:
                out_idx[bn_name] = kept
        for layer_name, block in space.consumers:
            cols = (kept.unsqueeze(1) * block + torch.arange(block)).flatten()
            in_idx[layer_name] = cols
    for name, mod in modules.items():
        if isinstance(mod, (nn.Linear, _ConvNd)) and name in out_idx:
            rows = out_idx[name].to(mod.weight.device)
            cols = in_idx.get(name, torch.arange(mod.weight.shape[1])).to(mod.weight.device)
            if rows.numel() == mod.weight.shape[0] and cols.numel() == mod.weight.shape[1]:
                continue
            new = _resized_layer(mod, cols.numel(), rows.numel())
            new.weight.copy_(mod.weight[rows][:, cols])
            if mod.bias is not None:
                new.bias.copy_(mod.bias[rows])
            new.train(mod.training)
            _set_module(small, name, new)
        elif isinstance(mod, _BatchNorm) and name in out_idx:
            idx = out_idx[name]
            if idx.numel() == mod.num_features:
                continue
            new = _resized_bn(mod, idx.numel())
            for attr in ("weight", "bias", "running_mean", "running_var"):
                src = getattr(mod, attr)
                if src is not None:
                    getattr(new, attr).copy_(src[idx.to(src.device)])
            if mod.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(mod.num_batches_tracked)
            new.train(mod.training)
            _set_module(small, name, new)
    return small


def shrink_spec(model: nn.Module) -> dict[str, list[int]]:
    """Widths of every Linear / conv (``[in, out]``) and BatchNorm (``[features]``), by name."""
    spec: dict[str, list[int]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, _ConvNd)):
            spec[name] = [int(mod.weight.shape[1]), int(mod.weight.shape[0])]
        elif isinstance(mod, _BatchNorm):
            spec[name] = [int(mod.num_features)]
    return spec


@torch.no_grad()
def resize_(model: nn.Module, spec: dict[str, list[int]]) -> nn.Module:
    """Give ``model``'s layers the widths of ``spec`` (from :func:`shrink_spec`), in place.

    Resized layers are freshly initialized; load the small model's ``state_dict`` afterwards.
    """
    modules = dict(model.named_modules())
    for name, widths in spec.items():
        mod = modules.get(name)
        if isinstance(mod, (nn.Linear, _ConvNd)) and len(widths) == 2:
            if [mod.weight.shape[1], mod.weight.shape[0]] != list(widths):
                _set_module(model, name, _resized_layer(mod, int(widths[0]), int(widths[1])))
        elif isinstance(mod, _BatchNorm) and len(widths) == 1:
            if mod.num_features != widths[0]:
                _set_module(model, name, _resized_bn(mod, int(widths[0])))
        else:
            raise ValueError(f"Invalid spec entry: {name!r}: {widths!r} (no matching layer)")
    return model
