"""CrAM and CrAM+: a compression-aware minimizer wrapped around any base optimizer.

Peste, Vladu, Kurtic, Lampert, Alistarh, "CrAM: A Compression-Aware Minimizer" (ICLR 2023). Per
step, with ``g = ∇L(θ)``, a sparsity ``s`` drawn from ``sparsities`` and ``C_s`` global magnitude
top-k (zero the ``round(s·N)`` smallest ``|w|`` of the compressed tensors)::

    θ̃ = C_s(θ + ρ g)                      (perturb along the gradient, then compress)
    d = M ⊙ ∇L(θ̃)      (CrAM)     or     d = M ⊙ ∇L(θ̃) + g     (CrAM+)
    θ ← base_step(θ, d)                    (the step is taken from the dense weights θ)

``M`` is the mask of the entries ``C_s`` kept (1 on tensors that are not compressed): the
gradient taken at the compressed point updates the dense weights it kept, and the pruned entries
move with the plain gradient ``g`` alone (CrAM+). This is the official code's ``sparse_grad``,
on in all its published configurations, and the default here (``sparse_grad=True``).

Two forward/backward passes per step, with the contract SAM-style optimizers use in PyTorch:
the caller runs the first pass (``loss.backward()`` at θ, so ``g`` is in ``.grad``), then calls
``step(closure)``; the closure runs the second pass (forward and ``backward`` at whatever the
weights are when it is called) and returns the loss. ``step`` clears the gradients before it.
BatchNorm running statistics see both passes (the official code freezes them in the second).

Why the mask: applied to every entry (``sparse_grad=False``), ``∇L(θ̃)`` on the 90-98% pruned
entries is the "grow this weight back" signal of a network that is mostly missing, and it inflates
the weights: on Fashion-MNIST LeNet-300-100 (SGD lr 0.1, nesterov 0.9) all three seeds of the
90b563b grid stuck at chance that way (RESULTS.md of that grid). The perturbation is ``ρ g`` as in
the paper and the official code (``normalize=True`` gives SAM's ``ρ g/||g||``)
(docs/algorithm.md §8).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ..prune.masks import SCOPES, check_sparsity, zero_lowest_

Tensor = torch.Tensor


class CrAM(torch.optim.Optimizer):
    """CrAM / CrAM+ over a base optimizer (SGD by default).

    Args:
        params: tensors or param groups, handed to the base optimizer as they are (so SFW's
            :func:`sfwprune.constraint_groups` groups work: SFW fed the CrAM gradient).
        base_optimizer: the optimizer class that takes the step (default ``torch.optim.SGD``).
        rho: perturbation size ρ >= 0 (default 0.05).
        sparsities: the sparsities ``s`` drawn uniformly, one per step (default 0.9, 0.95, 0.98).
        plus: CrAM+ (add the plain gradient, default True) or CrAM.
        compress: the tensors ranked by the top-k compression (default: every parameter of
            ``params`` with ``dim >= 2``, the weights :func:`sfwprune.prune_` ranks).
        scope: ``"global"`` (one ranking over all compressed tensors, default) or ``"layer"``
            (each tensor compressed to ``s`` on its own).
        normalize: perturb by ``ρ g / ||g||`` (SAM's form) or by ``ρ g`` (default False, the
            paper's and official code's form).
        sparse_grad: keep the compressed point's gradient only on the entries the compression
            kept (default True, as the official code); False applies it to every entry.
        generator: random source for drawing ``s`` (default: the global torch RNG).
        **base_kwargs: passed to ``base_optimizer`` (e.g. ``lr``, ``momentum``).

    Example:
        >>> opt = CrAM(model.parameters(), lr=0.1, momentum=0.9, rho=0.05)
        >>> def closure():
        ...     loss = loss_fn(model(x), y); loss.backward(); return loss
        >>> opt.zero_grad(); closure()   # first pass: the gradient at θ
        >>> opt.step(closure)            # second pass at the compressed point, then the step
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        sparsities: Sequence[float] = (0.9, 0.95, 0.98),
        plus: bool = True,
        compress: Iterable[Tensor] | None = None,
        scope: str = "global",
        normalize: bool = False,
        sparse_grad: bool = True,
        generator: torch.Generator | None = None,
        **base_kwargs: Any,
    ):
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 0:
            raise ValueError(f"Invalid rho: {rho!r} (expected a number >= 0)")
        if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Iterable):
            raise ValueError(f"Invalid sparsities: {sparsities!r} (expected numbers in [0, 1])")
        levels = tuple(check_sparsity(s, "sparsities") for s in sparsities)
        if not levels:
            raise ValueError("Invalid sparsities: () (expected at least one number in [0, 1])")
        if not (
            isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)
        ):
            raise ValueError(
                f"Invalid base_optimizer: {base_optimizer!r} (expected a torch.optim.Optimizer class)"
            )
        if scope not in SCOPES:
            raise ValueError(f"Invalid scope: {scope!r} (expected one of {', '.join(SCOPES)})")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"Invalid generator: {generator!r} (expected a torch.Generator or None)"
            )
        self.base_optimizer = base_optimizer(params, **base_kwargs)
        # share the groups, so schedulers, state_dict and add_param_group see one set of groups
        super().__init__(self.base_optimizer.param_groups, {})
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self.rho, self.sparsities, self.plus = float(rho), levels, bool(plus)
        self.normalize, self.generator, self.scope = bool(normalize), generator, scope
        members = [p for group in self.param_groups for p in group["params"]]
        if compress is None:
            self.compress = [p for p in members if p.dim() >= 2]
        else:
            ids = {id(p) for p in members}
            self.compress = list(compress)
            if any(id(p) not in ids for p in self.compress):
                raise ValueError(
                    "Invalid compress: a tensor that is not among the optimized params"
                )
        if not self.compress:
            raise ValueError("Invalid compress: no tensors to compress (expected >= 1 tensor)")
        self.last_sparsity: float | None = None
        self.sparse_grad = bool(sparse_grad)

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.state = self.base_optimizer.state

    def _draw_sparsity(self) -> float:
        if len(self.sparsities) == 1:
            return self.sparsities[0]
        i = torch.randint(len(self.sparsities), (), generator=self.generator)
        return self.sparsities[int(i)]

    @torch.no_grad()
    def _compress_(self, sparsity: float) -> dict[int, Tensor]:
        """Zero the ``round(s·N)`` smallest ``|w|`` of each ranked set (all tensors, or each);
        returns ``{id(p): bool mask of the zeroed entries}``."""
        scores = [p.detach().reshape(-1).abs().float() for p in self.compress]
        keeps = zero_lowest_(self.compress, scores, sparsity, self.scope)
        return {id(p): ~keep for p, keep in zip(self.compress, keeps, strict=True)}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One CrAM(+) step from the gradient already in ``.grad``; returns the closure's loss
        (at the compressed point)."""
        if closure is None:
            raise ValueError(
                "Invalid closure: None (CrAM takes a second gradient a step: pass a closure "
                "that computes the loss, calls backward and returns the loss)"
            )
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            raise ValueError(
                "Invalid step: no gradients (run the first backward pass before step(closure))"
            )
        saved = [p.detach().clone() for p in params]
        first = [p.grad.detach().clone() for p in params]
        scale = self.rho
        if self.normalize:
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in first]))
            scale = self.rho / float(norm.clamp_min(1e-12))
        for p, g in zip(params, first):
            p.add_(g, alpha=scale)
        self.last_sparsity = self._draw_sparsity()
        cuts = self._compress_(self.last_sparsity)
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        for p, w, g in zip(params, saved, first):
            p.copy_(w)
            if p.grad is None:  # no gradient at the compressed point: keep the plain one
                p.grad = g
                continue
            if self.sparse_grad and id(p) in cuts:
                p.grad.masked_fill_(cuts[id(p)], 0)
            if self.plus:
                p.grad.add_(g)
        self.base_optimizer.step()
        return loss
