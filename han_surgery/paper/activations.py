"""Gradient-norm-preserving activations of the checkerboard ablation (paper Table 3, rows c and d).

* :class:`GroupSort` -- split the last dimension into groups of ``group_size`` consecutive
  features and sort each group (Anil, Lucas & Grosse, "Sorting out Lipschitz function
  approximation", ICML 2019). Its Jacobian is a permutation matrix, so like ``|.|`` it keeps
  gradient norms. Row (d) of Table 3 is ``GroupSort(5)``.
* MaxMin (row c) is ``GroupSort(2)``: each pair ``(a, b)`` becomes ``(min(a, b), max(a, b))``,
  the MaxMin of Anil et al. up to a fixed order of the two outputs.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["GroupSort"]


class GroupSort(nn.Module):
    """Sort each group of ``group_size`` consecutive features of the last dimension (ascending).

    Shapes: ``(..., n) -> (..., n)``; ``n`` must be a multiple of ``group_size``.
    """

    def __init__(self, group_size: int) -> None:
        super().__init__()
        if group_size < 1:
            raise ValueError(f"GroupSort: group_size must be >= 1, got {group_size}")
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[-1]
        if n % self.group_size:
            raise ValueError(f"GroupSort: {n} features are not a multiple of group_size={self.group_size}")
        grouped = x.unflatten(-1, (n // self.group_size, self.group_size))
        return grouped.sort(dim=-1).values.flatten(-2)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"
