"""Hadamard matrices: Sylvester's for powers of two, Paley's first construction for q + 1 (q a prime with
q = 3 mod 4), and Kronecker products of the two, which give every width the supported models use (SmolLM2's 576
= 8 x 72, 1536 = 128 x 12; Qwen3's 3072 = 256 x 12, 5120 = 256 x 20, 17408 = 256 x 68). All in float64, with
entries +-1 (``normalized`` divides by sqrt(n): an orthogonal matrix)."""

from __future__ import annotations

import math

import torch

# Paley's construction is used for these orders (q + 1 with q prime, q = 3 mod 4), smallest first.
PALEY_ORDERS = tuple(q + 1 for q in range(3, 400) if q % 4 == 3 and all(q % d for d in range(2, int(q**0.5) + 1)))


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def sylvester(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order ``n`` (a power of two): ``H_2n = [[H, H], [H, -H]]``, which is
    what the fast Walsh-Hadamard transform computes in natural order (and compressed-tensors' ``hadamard``)."""
    if not is_power_of_two(n):
        raise ValueError(f"Sylvester's Hadamard matrix needs a power of two, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def paley(order: int) -> torch.Tensor:
    """Paley's first construction, order q + 1 for a prime q = 3 mod 4: ``I + S`` with ``S`` the skew
    conference matrix built from the quadratic residues of q."""
    q = order - 1
    if order not in PALEY_ORDERS:
        raise ValueError(f"no Paley construction here for order {order}")
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in residues else -1 for a in range(1, q)]
    jacobsthal = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(order, order, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal
    return torch.eye(order, dtype=torch.float64) + s


def hadamard(n: int, normalized: bool = True) -> torch.Tensor:
    """A Hadamard matrix of order ``n``: Sylvester's, or Sylvester's (the largest power of two that leaves a
    Paley order) Kronecker Paley's; ValueError for an order neither reaches."""
    if is_power_of_two(n):
        h = sylvester(n)
    else:
        paley_order = next((m for m in PALEY_ORDERS if n % m == 0 and is_power_of_two(n // m)), None)
        if paley_order is None:
            raise ValueError(
                f"no Hadamard matrix of order {n} here (a power of two times one of {PALEY_ORDERS[:8]}...)"
            )
        h = torch.kron(sylvester(n // paley_order), paley(paley_order))
    return h / math.sqrt(n) if normalized else h


def block_diagonal(n: int, block: int, normalized: bool = True) -> torch.Tensor:
    """``n / block`` copies of Sylvester's matrix of order ``block`` on the diagonal."""
    if n % block:
        raise ValueError(f"a block of {block} does not divide {n}")
    h = sylvester(block) / (math.sqrt(block) if normalized else 1.0)
    return torch.block_diag(*[h] * (n // block))


def largest_power_of_two_block(n: int, limit: int) -> int:
    """The largest power of two that divides ``n`` and is at most ``limit``."""
    block = 1
    while n % (block * 2) == 0 and block * 2 <= limit:
        block *= 2
    return block
