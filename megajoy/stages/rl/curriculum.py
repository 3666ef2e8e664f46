"""The multi-domain Gaussian curriculum (JOYAI.md section 5): each prompt's pass rate p_i is profiled once
with a few rollouts, prompts always solved (p_i = 1) are dropped; at progress x in [0, 1] a prompt is drawn
with weight exp(-((p_i - mu)/sigma)^2 / 2), mu moving linearly from mu_start to mu_end, after a domain
g is drawn with probability proportional to sqrt(N_g) (N_g: the domain's remaining prompts)."""

import math
import random
from collections import defaultdict


class CurriculumSampler:
    def __init__(self, pass_rates: list[float], domains: list[str], seed: int = 0, mu_start: float = 0.8,
                 mu_end: float = 0.2, sigma: float = 0.15):
        self.pass_rates = pass_rates
        self.mu_start, self.mu_end, self.sigma = mu_start, mu_end, sigma
        self.by_domain: dict[str, list[int]] = defaultdict(list)
        for i, (p, d) in enumerate(zip(pass_rates, domains)):
            if p < 1.0:
                self.by_domain[d].append(i)
        if not self.by_domain:
            raise ValueError("curriculum: every prompt is always solved (pass rate 1); nothing to learn from")
        self.rng = random.Random(seed)

    def mu(self, progress: float) -> float:
        return self.mu_start + (self.mu_end - self.mu_start) * min(max(progress, 0.0), 1.0)

    def domain_probabilities(self) -> dict[str, float]:
        total = sum(math.sqrt(len(v)) for v in self.by_domain.values())
        return {d: math.sqrt(len(v)) / total for d, v in sorted(self.by_domain.items())}

    def prompt_weights(self, domain: str, progress: float) -> list[float]:
        mu = self.mu(progress)
        return [math.exp(-0.5 * ((self.pass_rates[i] - mu) / self.sigma) ** 2) for i in self.by_domain[domain]]

    def sample(self, n: int, progress: float, rng: random.Random | None = None) -> list[int]:
        """`rng`: the draws' source (default the sampler's own); a per-step one makes them depend on the step
        alone, as a resumed run needs."""
        rng = rng or self.rng
        probabilities = self.domain_probabilities()
        domains = rng.choices(list(probabilities), weights=list(probabilities.values()), k=n)
        return [rng.choices(self.by_domain[d], weights=self.prompt_weights(d, progress))[0] for d in domains]
