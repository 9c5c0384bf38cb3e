"""Structured one-shot pruning: whole output units (channels) or N:M patterns (docs/algorithm.md §7).

- ``structure="channel"``: remove the ``sparsity``-fraction of output units (Linear rows, conv
  filters) with the smallest weight-row L2 norms. A removed unit loses its weight row, its bias
  entry and the matching BatchNorm scale and shift, so its output is exactly 0 and
  :func:`sfwprune.prune.shrink.shrink` can drop it (with the next layer's input channels).
- ``structure="N:M"`` (e.g. ``"2:4"``): in every group of M consecutive entries of every weight
  row (conv: along ``C·kh·kw``), keep the N of largest ``|w|``.

Which units can go follows the model's *channel spaces* (:func:`channel_spaces`): one per layer
output, except that ResNet's residual adds tie the stem, the second conv of every block and the
shortcut convs of a stage into one space. Channel masks prune only untied spaces (block-internal
convs in ResNet; every hidden layer in the chain models) and never the model's output layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..models.lenet import LeNet5, LeNet300
from ..models.resnet import BasicBlock, ResNet18
from ..models.vgg import VGG
from .masks import check_sparsity

Tensor = torch.Tensor

SCOPES = ("global", "layer")
# Leaves that map a zero channel to a zero channel and keep channels apart.
_PASS_THROUGH = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.GELU, nn.Identity, nn.Dropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)  # fmt: skip


@dataclass
class Space:
    """A set of channels that layers write (``producers``, summed) and read (``consumers``).

    ``producers``: ``(layer name, BatchNorm name or None)``; ``consumers``: ``(layer name,
    block)``, where a consumer sees each channel as ``block`` consecutive input features
    (conv: 1 input channel; a Linear after ``Flatten``: ``H·W`` columns).
    """

    size: int
    producers: list[tuple[str, str | None]] = field(default_factory=list)
    consumers: list[tuple[str, int]] = field(default_factory=list)
    output: bool = False  # the model's output: never pruned

    @property
    def tied(self) -> bool:
        return len(self.producers) > 1


def parse_structure(structure: object) -> tuple[int, int] | None:
    """``None`` for ``"channel"``, ``(N, M)`` for ``"N:M"`` with ``1 <= N <= M``."""
    if structure == "channel":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", structure) if isinstance(structure, str) else None
    if match is None:
        raise ValueError(
            f"Invalid structure: {structure!r} (expected 'channel' or 'N:M', e.g. '2:4')"
        )
    n, m = int(match[1]), int(match[2])
    if not 1 <= n <= m:
        raise ValueError(f"Invalid structure: {structure!r} (expected 1 <= N <= M)")
    return n, m


def _check_scope(scope: object) -> str:
    if not isinstance(scope, str) or scope not in SCOPES:
        raise ValueError(f"Invalid scope: {scope!r} (expected one of {', '.join(SCOPES)})")
    return scope


def _chain_spaces(model: nn.Module, prefix: str = "") -> list[Space]:
    """Spaces of a model whose forward applies its leaf modules in registration order."""
    spaces: list[Space] = []
    current: Space | None = None  # the space the next layer reads
    flattened_from: int | None = None  # channels of the space before a Flatten
    for name, mod in model.named_modules(prefix=prefix):
        if list(mod.children()):
            continue
        if isinstance(mod, (nn.Linear, _ConvNd)):
            if isinstance(mod, _ConvNd) and mod.groups != 1:
                raise ValueError(
                    f"Invalid model: grouped convolution {name!r} (shrink cannot split it)"
                )
            fan_in = mod.weight.shape[1]
            if current is not None:
                block = 1
                if flattened_from is not None and isinstance(mod, nn.Linear):
                    if fan_in % current.size:
                        raise ValueError(
                            f"Invalid model: {name!r} reads {fan_in} features from {current.size} channels"
                        )
                    block = fan_in // current.size
                elif fan_in != current.size:
                    raise ValueError(
                        f"Invalid model: {name!r} reads {fan_in} channels, not {current.size}"
                    )
                current.consumers.append((name, block))
            current = Space(mod.weight.shape[0], producers=[(name, None)])
            spaces.append(current)
            flattened_from = None
        elif isinstance(mod, _BatchNorm):
            if (
                current is None
                or current.producers[0][1] is not None
                or mod.num_features != current.size
            ):
                raise ValueError(
                    f"Invalid model: BatchNorm {name!r} does not follow one layer's output"
                )
            current.producers[0] = (current.producers[0][0], name)
        elif isinstance(mod, nn.Flatten):
            flattened_from = current.size if current is not None else None
        elif not isinstance(mod, _PASS_THROUGH):
            raise ValueError(
                f"Invalid model: module {name!r} ({type(mod).__name__}) is not supported by structured pruning"
            )
    if spaces:
        spaces[-1].output = True
    return spaces


def _resnet_spaces(model: ResNet18) -> list[Space]:
    stem_conv, stem_bn = model.stem[0], model.stem[1]
    if not isinstance(stem_conv, nn.Conv2d) or not isinstance(stem_bn, nn.BatchNorm2d):
        raise ValueError("Invalid model: ResNet18.stem is not conv -> BatchNorm")
    stage = Space(stem_conv.out_channels, producers=[("stem.0", "stem.1")])
    spaces = [stage]
    for layer_name in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(model, layer_name)):
            if type(block) is not BasicBlock:
                raise ValueError(
                    f"Invalid model: {layer_name}.{i} ({type(block).__name__}) is not a BasicBlock"
                )
            p = f"{layer_name}.{i}"
            inner = Space(block.conv1.out_channels, producers=[(f"{p}.conv1", f"{p}.bn1")])
            inner.consumers.append((f"{p}.conv2", 1))
            stage.consumers.append((f"{p}.conv1", 1))
            spaces.append(inner)
            if isinstance(block.shortcut, nn.Identity):
                stage.producers.append((f"{p}.conv2", f"{p}.bn2"))
            else:
                stage.consumers.append((f"{p}.shortcut.0", 1))
                stage = Space(
                    block.conv2.out_channels,
                    producers=[(f"{p}.conv2", f"{p}.bn2"), (f"{p}.shortcut.0", f"{p}.shortcut.1")],
                )
                spaces.append(stage)
    stage.consumers.append(("fc", 1))
    spaces.append(Space(model.fc.out_features, producers=[("fc", None)], output=True))
    return spaces


def channel_spaces(model: nn.Module) -> list[Space]:
    """The channel spaces of a supported model, in forward order.

    Supported: :class:`~sfwprune.models.ResNet18` (with BasicBlocks), and models whose forward
    applies their leaves in registration order: ``nn.Sequential``, LeNet-300-100, LeNet-5(-BN),
    VGG, built from Linear / ungrouped conv / BatchNorm / ReLU-like / pooling / Flatten /
    Dropout modules. Anything else raises ``ValueError`` naming the module.
    """
    if type(model) is ResNet18:
        return _resnet_spaces(model)
    if type(model) in (nn.Sequential, LeNet300, LeNet5, VGG):
        return _chain_spaces(model)
    raise ValueError(
        f"Invalid model: {type(model).__name__} (structured pruning supports nn.Sequential, "
        "LeNet300, LeNet5, VGG and ResNet18)"
    )


def _row_norms(layer: nn.Module, norm: int) -> Tensor:
    rows = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
    return torch.linalg.vector_norm(rows, ord=norm, dim=1)


def _channel_masks(model: nn.Module, sparsity: float, scope: str, norm: int) -> dict[str, Tensor]:
    if sparsity >= 1.0:
        raise ValueError(
            f"Invalid sparsity: {sparsity} (channel pruning keeps at least one unit per layer; "
            "expected a number in [0, 1))"
        )
    modules = dict(model.named_modules())
    spaces = [s for s in channel_spaces(model) if not s.output and not s.tied]
    norms = [_row_norms(modules[s.producers[0][0]], norm).cpu() for s in spaces]
    # Units to drop per space: (score, index) order, the largest unit always kept.
    order = [torch.sort(n, stable=True).indices for n in norms]
    if scope == "layer":
        counts = [min(round(sparsity * n.numel()), n.numel() - 1) for n in norms]
    else:
        total = sum(n.numel() for n in norms)
        cands = (
            torch.cat([n[o[:-1]] for n, o in zip(norms, order, strict=True)])
            if norms
            else torch.zeros(0)
        )
        owner = (
            torch.cat([torch.full((o.numel() - 1,), i) for i, o in enumerate(order)])
            if norms
            else torch.zeros(0)
        )
        take = min(round(sparsity * total), cands.numel())
        picked = owner[torch.sort(cands, stable=True).indices[:take]]
        counts = [int((picked == i).sum()) for i in range(len(spaces))]
    masks: dict[str, Tensor] = {}
    for space, o, count in zip(spaces, order, counts, strict=True):
        keep = torch.ones(space.size, dtype=torch.bool)
        keep[o[:count]] = False
        layer_name, bn_name = space.producers[0]
        for owner_name in (layer_name, bn_name):
            if owner_name is None:
                continue
            for attr, p in modules[owner_name].named_parameters(recurse=False):
                shape = (-1,) + (1,) * (p.dim() - 1)
                full = f"{owner_name}.{attr}" if owner_name else attr
                masks[full] = keep.to(p.device).view(shape).expand_as(p).clone()
    return masks


def _n_m_masks(model: nn.Module, n: int, m: int, indivisible: str) -> dict[str, Tensor]:
    masks: dict[str, Tensor] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, _ConvNd)):
            continue
        w = mod.weight.detach()
        row = w[0].numel()
        full = f"{name}.weight" if name else "weight"
        if row % m:
            if indivisible == "skip":
                continue
            raise ValueError(
                f"Invalid M: {m} does not divide the rows of {full} (length {row}); "
                "pass indivisible='skip' to leave such layers dense"
            )
        groups = w.abs().reshape(-1, m)
        # N largest |w| per group; ties go to the lower index (stable sort of -|w|)
        top = torch.sort(-groups, dim=1, stable=True).indices[:, :n]
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True)
        masks[full] = keep.view_as(w)
    if not masks:
        raise ValueError("Invalid model: no Linear or conv weight to prune N:M")
    return masks


@torch.no_grad()
def structured_masks(
    model: nn.Module,
    sparsity: float | None = None,
    structure: str = "channel",
    *,
    scope: str = "global",
    indivisible: str = "error",
    norm: int = 2,
) -> dict[str, Tensor]:
    """Keep masks (``{parameter name: bool tensor}``, ``True`` = kept) for structured pruning.

    Args:
        model: a model :func:`channel_spaces` supports (any model for N:M).
        sparsity: channel: the fraction of prunable units removed, in ``[0, 1)``; N:M: ``None``
            or ``1 - N/M``.
        structure: ``"channel"`` or ``"N:M"`` (e.g. ``"2:4"``).
        scope: channel only. ``"global"``: one ranking of the units of all prunable layers by
            their weight-row L2 norms as they are (no per-layer normalisation), keeping the
            largest unit of every layer; ``"layer"``: ``round(s·units)`` per layer, at most
            ``units - 1``.
        indivisible: N:M only. ``"error"`` (a row length not a multiple of M raises) or
            ``"skip"`` (such layers stay dense and get no mask).
        norm: channel only. ``2`` ranks units by the L2 norm of their weight row (the norm of
            the group set), ``1`` by the L1 norm (Li et al. 2017's filter pruning).

    Example:
        >>> masks = structured_masks(model, 0.5, "channel")   # half the hidden units
        >>> masks = structured_masks(model, structure="2:4")
    """
    nm = parse_structure(structure)
    if nm is None:
        if sparsity is None:
            raise ValueError("Invalid sparsity: None (channel pruning needs a fraction of units)")
        if norm not in (1, 2) or isinstance(norm, bool):
            raise ValueError(f"Invalid norm: {norm!r} (expected 1 or 2)")
        return _channel_masks(model, check_sparsity(sparsity), _check_scope(scope), norm)
    n, m = nm
    if sparsity is not None and abs(check_sparsity(sparsity) - (1 - n / m)) > 1e-9:
        raise ValueError(
            f"Invalid sparsity: {sparsity} (structure {structure} means {1 - n / m:g})"
        )
    if indivisible not in ("error", "skip"):
        raise ValueError(f"Invalid indivisible: {indivisible!r} (expected 'error' or 'skip')")
    return _n_m_masks(model, n, m, indivisible)


def structure_masks(
    model: nn.Module,
    sparsity: float | None,
    structure: str,
    *,
    scope: str = "global",
    criterion: str = "magnitude",
    include: str = "weights",
    norm: int = 2,
    indivisible: str = "error",
) -> dict[str, Tensor]:
    """:func:`structured_masks` behind ``prune_``'s options: the unstructured-only ones checked.

    ``criterion`` must be ``"magnitude"`` (row norms for channels, ``|w|`` for N:M) and
    ``include`` ``"weights"`` (channel masks also cover the bias and BatchNorm entries of a
    removed unit; N:M masks cover Linear/conv weights); ``norm`` is for channels only.
    """
    nm = parse_structure(structure)
    if criterion != "magnitude":
        raise ValueError(
            f"Invalid criterion: {criterion!r} (structure {structure!r} ranks by magnitude only)"
        )
    if include != "weights":
        raise ValueError(
            f"Invalid include: {include!r} (structure {structure!r} takes include='weights')"
        )
    if nm is not None and norm != 2:
        raise ValueError(f"Invalid norm: {norm!r} (norm is for structure='channel' only)")
    return structured_masks(
        model, sparsity, structure, scope=scope, indivisible=indivisible, norm=norm
    )


@torch.no_grad()
def measured_sparsity(model: nn.Module, masks: dict[str, Tensor], structure: str) -> float:
    """The sparsity the model has in the weights ``masks`` covers, in ``structure``'s units.

    Channel: the fraction of their output units whose weight row is entirely zero; N:M: the
    fraction of zero entries (``1 - N/M`` after pruning, more if weights were already zero).
    """
    params = dict(model.named_parameters())
    weights = [params[n] for n, k in masks.items() if n.endswith("weight") and k.dim() >= 2]
    if parse_structure(structure) is None:
        zero = [(w.reshape(w.shape[0], -1) == 0).all(dim=1) for w in weights]
    else:
        zero = [(w == 0).flatten() for w in weights]
    total = sum(z.numel() for z in zero)
    return sum(int(z.sum()) for z in zero) / total if total else 0.0
