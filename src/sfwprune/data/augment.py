"""Random crop with zero padding plus horizontal flip on whole batches, and a per-sample reference.

For sample i with offsets ``(dy_i, dx_i) ∈ [0, 2p]²`` and flip bit ``f_i``:

    out_i[c, h, w] = pad_p(x_i)[c, dy_i + h, dx_i + (W-1-w if f_i else w)]

which is torchvision's ``RandomCrop(size, padding=p)`` followed by ``RandomHorizontalFlip``.
:func:`crop_flip` does it with one ``gather`` for the batch; :func:`crop_flip_reference` loops over
samples and is the ground truth it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def draw_crop_flip(
    n: int, *, padding: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Random ``(dy, dx, flip)`` for ``n`` samples: offsets in ``[0, 2·padding]``, fair coin flips.

    Example:
        >>> dy, dx, flip = draw_crop_flip(3, padding=4, generator=torch.Generator().manual_seed(0))
        >>> dy.shape, flip.dtype
        (torch.Size([3]), torch.bool)
    """
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    return offsets[0], offsets[1], flip


def _check(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, padding: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"Invalid images: shape {tuple(x.shape)!r} (expected B×C×H×W)")
    if padding < 0:
        raise ValueError(f"Invalid padding: {padding!r} (expected >= 0)")
    n = x.shape[0]
    if dy.shape != (n,) or dx.shape != (n,) or flip.shape != (n,):
        raise ValueError(
            f"Invalid crop/flip parameters: shapes {tuple(dy.shape)}, {tuple(dx.shape)}, "
            f"{tuple(flip.shape)} (expected ({n},) each)"
        )


def crop_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, *, padding: int = 4) -> Tensor:
    """Vectorised crop + flip of a ``B×C×H×W`` batch (any dtype, any device); see module doc.

    One ``gather`` over the flattened padded images: index ``(dy + h)·W_pad + col(w)``.
    """
    _check(x, dy, dx, flip, padding)
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4) if padding else x
    w_pad = w + 2 * padding
    dev = x.device
    dy, dx, flip = dy.to(dev), dx.to(dev), flip.to(dev)
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = dy[:, None] + ar_h  # B×H
    cols = dx[:, None] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)  # B×W
    index = (rows[:, :, None] * w_pad + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, index).view(b, c, h, w)


def crop_flip_reference(
    x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, *, padding: int = 4
) -> Tensor:
    """Per-sample loop doing what :func:`crop_flip` does; slow, obviously correct."""
    _check(x, dy, dx, flip, padding)
    h, w = x.shape[2:]
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        img = F.pad(x[i], (padding,) * 4) if padding else x[i]
        top, left = int(dy[i]), int(dx[i])
        img = img[:, top : top + h, left : left + w]
        out[i] = img.flip(-1) if bool(flip[i]) else img
    return out
