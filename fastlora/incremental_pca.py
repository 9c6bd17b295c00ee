"""Incremental PCA (Ross et al., "Incremental Learning for Robust Visual Tracking", 2008; scikit-learn's
``IncrementalPCA``), in torch, as EVA (:mod:`fastlora.eva`) fits it to a layer's inputs one batch at a time.

Each :meth:`IncrementalPCA.partial_fit` of a batch X (n × d) updates the running mean and variance (sums in
float64) and the principal directions from the SVD of

    [ diag(S_prev) V_prevᵀ ;  X − mean(X) ;  √(n_prev · n / (n_prev + n)) · (mean_prev − mean(X)) ]

(the first batch: X − mean(X) alone), which carries what earlier batches contributed in the previous
components; the SVD is torch's randomized ``svd_lowrank`` with q = 2 · n_components, 4 subspace iterations and a
fixed seed (the global generator is left alone).  Signs are fixed so that each component's largest entry is
positive.  ``explained_variance_ratio_`` is S² over the total variance seen (the sum of the features' variances
times the sample count).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["IncrementalPCA"]


class IncrementalPCA:
    """The running fit: ``components_`` (k × d), ``singular_values_`` (k), ``explained_variance_ratio_`` (k),
    ``mean_`` / ``var_`` (d, float64) and ``n_samples_seen_`` once a batch has been fitted."""

    def __init__(self, n_components: int, seed: int = 42, subspace_iterations: int = 4):
        self.n_components = n_components
        self.seed = seed
        self.subspace_iterations = subspace_iterations

    @property
    def fitted(self) -> bool:
        return hasattr(self, "components_")

    def partial_fit(self, X: Tensor) -> "IncrementalPCA":
        """Fit one batch (n × d, n ≥ n_components ≤ d), float32 or float64 (anything else is cast to float32)."""
        samples, features = X.shape
        if self.n_components > features:
            raise ValueError(f"n_components={self.n_components} invalid for n_features={features}, need more rows "
                             f"than columns for IncrementalPCA processing.")
        if self.n_components > samples:
            raise ValueError(f"n_components={self.n_components} must be less or equal to the batch number of samples "
                             f"{samples}")
        X = X.clone() if X.dtype in (torch.float32, torch.float64) else X.to(torch.float32)
        first = not self.fitted
        if first:
            self.mean_, self.var_, self.n_samples_seen_ = None, None, torch.tensor([0], device=X.device)
            self.n_features_ = features
        elif features != self.n_features_:
            raise ValueError("Number of features of the new batch does not match the number of features of the first "
                             "batch.")
        mean, var, seen = _running_mean_and_variance(X, self.mean_, self.var_, self.n_samples_seen_)
        if first:
            X -= mean
        else:
            batch_mean = torch.mean(X, dim=0)
            X -= batch_mean
            shift = torch.sqrt((self.n_samples_seen_.double() / seen) * samples) * (self.mean_ - batch_mean)
            X = torch.vstack((self.singular_values_.view((-1, 1)) * self.components_, X, shift))
        U, S, Vt = self._svd(X)
        Vt = _positive_largest_entries(Vt)
        self.n_samples_seen_ = seen
        self.components_ = Vt[:self.n_components]
        self.singular_values_ = S[:self.n_components]
        self.mean_, self.var_ = mean, var
        self.explained_variance_ratio_ = (S ** 2 / torch.sum(var * seen))[:self.n_components]
        return self

    def _svd(self, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            U, S, V = torch.svd_lowrank(X, q=2 * self.n_components, niter=self.subspace_iterations)
        return U, S, V.mH


def _running_mean_and_variance(X: Tensor, mean: Tensor | None, var: Tensor | None,
                               seen: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, variance, count) over the samples seen so far and the batch X (Chan, Golub and LeVeque's pairwise
    update), the sums in float64."""
    if X.shape[0] == 0:
        return mean, var, seen
    batch = torch.tensor([X.shape[0]], device=X.device)
    total = seen + batch
    earlier_sum = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device) if mean is None else mean * seen
    batch_sum = X.sum(dim=0, dtype=torch.float64)
    new_mean = (earlier_sum + batch_sum) / total
    centred = X - batch_sum / batch
    correction = centred.sum(dim=0, dtype=torch.float64).square()
    centred.square_()
    batch_squares = centred.sum(dim=0, dtype=torch.float64)
    batch_squares -= correction / batch
    if var is None:
        return new_mean, batch_squares / total, total
    ratio = seen.double() / batch
    squares = var * seen + batch_squares + ratio / total * (earlier_sum / ratio - batch_sum).square()
    return new_mean, squares / total, total


def _positive_largest_entries(Vt: Tensor) -> Tensor:
    """Each row of Vt with its sign flipped where needed so that its largest-magnitude entry is positive."""
    largest = torch.argmax(torch.abs(Vt), dim=1)
    signs = torch.sign(Vt[range(Vt.shape[0]), largest])
    return Vt * signs.view(-1, 1)
