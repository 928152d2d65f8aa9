"""PiSSA for MLX (neither mlx-lm nor mlx-tune has it).

PiSSA (arXiv 2404.02948) starts the adapter at the principal part of each target
weight and trains it; the base keeps the residual::

    W = U S Vᵀ,   principal = U_r S_r V_rᵀ,   W_res = W − principal
    scale · B A = principal     with  A = √S_r V_rᵀ / √scale,  B = U_r √S_r / √scale

so base + adapter computes exactly W at step 0. On a quantized base (QPiSSA) the SVD
is taken of the dequantized full-precision W and the *residual* is quantized.
A trained PiSSA adapter is converted back to a plain LoRA on the original W with
ΔW = scale(BA − B₀A₀) = scale [B | −B₀][A ; A₀] (rank 2r).

The SVD runs in numpy (LAPACK; float32), exact or randomized (Halko et al.: a
Gaussian sketch of r + oversampling columns refined by ``niter`` power iterations).
mlx-lm stores ``lora_a`` as (in, r) and ``lora_b`` as (r, out): the transposes of A, B.
"""

from __future__ import annotations

import math

import numpy as np


def principal(w: np.ndarray, r: int, niter: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-r (U, S, Vᵀ) of w (out, in); exact when niter == 0, randomized otherwise."""
    w = np.asarray(w, dtype=np.float32)
    if niter == 0 or r >= min(w.shape) // 2:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        return u[:, :r], s[:r], vt[:r]
    rng = np.random.default_rng(seed)
    k = min(min(w.shape), r + max(10, r))  # oversampling
    q, _ = np.linalg.qr(w @ rng.standard_normal((w.shape[1], k), dtype=np.float32))
    for _ in range(niter):
        q, _ = np.linalg.qr(w.T @ q)
        q, _ = np.linalg.qr(w @ q)
    ub, s, vt = np.linalg.svd(q.T @ w, full_matrices=False)
    return (q @ ub)[:, :r], s[:r], vt[:r]


def pissa_init(w: np.ndarray, r: int, scale: float, niter: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lora_a (in, r), lora_b (r, out), residual (out, in)) in mlx-lm's layout."""
    u, s, vt = principal(w, r, niter, seed)
    root = np.sqrt(s)[None, :] / math.sqrt(scale)
    lora_a = (vt.T * root).astype(np.float32)  # (in, r)
    lora_b = (u * root).T.astype(np.float32)  # (r, out)
    residual = (np.asarray(w, np.float32) - scale * (lora_a @ lora_b).T).astype(np.float32)
    return lora_a, lora_b, residual


def to_plain_lora(a: np.ndarray, b: np.ndarray, a0: np.ndarray, b0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trained PiSSA (a, b) and its init (a0, b0) → a plain LoRA of rank 2r on the original W."""
    return np.concatenate([a, a0], axis=1), np.concatenate([b, -b0], axis=0)
