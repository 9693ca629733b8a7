"""``LossMixture``: the two-Gaussian mixture fitted to recent per-sample values (losses or disagreements) whose clean
posterior is the gmm / agree score."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor



class LossMixture:
    """A two-component 1-D Gaussian mixture over the most recent ``window`` valid per-sample losses, refitted
    by EM at every call (warm-started from the last fit); the posterior of the lower-mean component is the
    probability that a sample is clean. The window is state (``state_dict``), so a resumed run refits the
    same mixture."""

    def __init__(self, window: int = 4096, iters: int = 10, min_var: float = 1e-4, min_weight: float = 0.01):
        self.window, self.iters, self.min_var = int(window), int(iters), float(min_var)
        self.min_weight = float(min_weight)
        self.values = torch.zeros(0, dtype=torch.float64)
        self.params: Optional[Tensor] = None      # [3, 2]: weights, means, variances

    def add(self, losses: Tensor, valid: Tensor) -> None:
        v = losses.detach().cpu().double().reshape(-1)[valid.detach().cpu().bool().reshape(-1)]
        v = v[torch.isfinite(v)]
        self.values = torch.cat([self.values, v])[-self.window:]

    def fit(self) -> Optional[Tensor]:
        """Refit by EM, warm-started from the last fit. A warm start can collapse (one component left with almost
        no weight, e.g. on a spike of early losses that later leave the window), and EM never revives an empty
        component: then the fit starts again cold, from the window's quartiles."""
        x = self.values
        if x.numel() < 4 or float(x.max() - x.min()) <= 0:
            self.params = None
            return None
        params = self._em(x, self.params if self.params is not None else self._cold(x))
        if float(params[0].min()) < self.min_weight:
            params = self._em(x, self._cold(x))
        self.params = params
        return self.params

    def _cold(self, x: Tensor) -> Tensor:
        lo, hi = torch.quantile(x, 0.25), torch.quantile(x, 0.75)
        var = x.var().clamp(min=self.min_var)
        return torch.stack([torch.tensor([0.5, 0.5], dtype=torch.float64), torch.stack([lo, hi]),
                            torch.stack([var, var])])

    def _em(self, x: Tensor, start: Tensor) -> Tensor:
        w, mu, var = start.clone()
        for _ in range(self.iters):
            logp = torch.log(w.clamp(min=1e-12)) - 0.5 * (torch.log(2 * math.pi * var)
                                                          + (x[:, None] - mu) ** 2 / var)
            r = torch.softmax(logp, dim=1)                                   # [n, 2] responsibilities
            nk = r.sum(0).clamp(min=1e-9)
            w = nk / nk.sum()
            mu = (r * x[:, None]).sum(0) / nk
            var = ((r * (x[:, None] - mu) ** 2).sum(0) / nk).clamp(min=self.min_var)
        return torch.stack([w, mu, var])

    def clean_posterior(self, losses: Tensor) -> Tensor:
        """p(low-loss component | ℓ) for losses [N] with the current fit (0.5 everywhere without one)."""
        x = losses.detach().cpu().double().reshape(-1)
        if self.params is None:
            return torch.full_like(x, 0.5).to(losses.device)
        w, mu, var = self.params
        logp = torch.log(w.clamp(min=1e-12)) - 0.5 * (torch.log(2 * math.pi * var) + (x[:, None] - mu) ** 2 / var)
        post = torch.softmax(logp, dim=1)[:, int(torch.argmin(mu))]
        return post.to(losses.device)

    def state_dict(self) -> dict:
        return {"values": self.values.clone(), "params": None if self.params is None else self.params.clone()}

    def load_state_dict(self, d: dict) -> None:
        self.values = d["values"].double().clone()
        self.params = None if d.get("params") is None else d["params"].double().clone()
