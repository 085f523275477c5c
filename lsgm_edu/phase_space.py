"""Phase space: the complete recipe of linear diffusions, with CLD and PSLD as instances.

Pandey & Mandt 2023 (after Ma, Chen & Fox 2015): for a Hamiltonian H(z) and constant matrices
D ⪰ 0 (dissipation) and Q = -Q^T (conservative mixing), the SDE

    dz = -beta(t) (D + Q) ∇H(z) dt + sqrt(2 beta(t) D) dW                       (PSLD eq. 4)

leaves p_s(z) ∝ exp(-H(z)) stationary. With z = (x, m) and H = |x|^2 / 2 + M^-1 |m|^2 / 2 the
stationary law is N(0, I) ⊗ N(0, M I) and ∇H = diag(1, M^-1) z, so the SDE is linear:
F = -(D + Q) diag(1, M^-1), G = sqrt(2 D), and every kernel is Gaussian with a closed-form
transition (`lsgm_edu.sde.LinearSDE`). VP is the one-variable recipe D = 1/2, Q = 0; CLD
(Dockhorn, Vahdat & Kreis 2022) puts all dissipation on m; PSLD dissipates on both.

The state stacks data and momentum along dim 1: z = (x, m), [B, 2 C, ...]. Data are lifted
with m0 = 0 and initial covariance diag(0, gamma M) (the hybrid kernel of HSM, what
`sde.kernel(x0, t)` gives) or with m0 ~ N(0, gamma M) sampled (`sde.lift`, DSM kernels through
`sde.kernel(x0, t, m0)`); `sde.project(z)` returns x.
"""

from __future__ import annotations

import math

import torch

from lsgm_edu.checks import check_float
from lsgm_edu.registry import SDES
from lsgm_edu.sde import LinearSDE
from lsgm_edu.utils import phase_apply, psd_sqrt

__all__ = ["CLD", "PSLD", "PhaseSpaceSDE", "recipe"]

F64 = torch.float64


def _check_recipe(D, Q, m_inv, gamma) -> tuple[torch.Tensor, torch.Tensor]:
    """D, Q as float64 K x K (K = 1 or 2); D symmetric PSD, Q skew-symmetric."""
    D, Q = (torch.as_tensor(v, dtype=F64) for v in (D, Q))
    D, Q = (v.reshape(1, 1) if v.ndim == 0 else v for v in (D, Q))
    if D.ndim != 2 or D.shape[0] != D.shape[1] or D.shape[0] not in (1, 2) or Q.shape != D.shape:
        raise ValueError(f"recipe: D and Q must be K x K matrices of one size with K = 1 (data "
                         f"only) or 2 (data and momentum), got {tuple(D.shape)} and "
                         f"{tuple(Q.shape)}")
    if not torch.isfinite(D).all() or not torch.isfinite(Q).all():
        raise ValueError(f"recipe: D and Q must be finite, got D={D.tolist()}, Q={Q.tolist()}")
    if not torch.allclose(D, D.mT, rtol=0, atol=1e-12):
        raise ValueError(f"recipe: D must be symmetric positive semidefinite, got {D.tolist()} "
                         f"(not symmetric)")
    smallest = torch.linalg.eigvalsh(D).min().item()
    if smallest < -1e-12:
        raise ValueError(f"recipe: D must be positive semidefinite, got {D.tolist()} with "
                         f"eigenvalue {smallest:.3g}; the noise sqrt(2 D) needs D ⪰ 0")
    if not torch.allclose(Q, -Q.mT, rtol=0, atol=1e-12):
        raise ValueError(f"recipe: Q must be skew-symmetric (Q = -Q^T), got {Q.tolist()}")
    check_float("recipe", "m_inv", m_inv, positive=True)
    check_float("recipe", "gamma", gamma, low=0.0)
    return D, Q


class PhaseSpaceSDE(LinearSDE):
    """dz = -beta(t) (D + Q) ∇H dt + sqrt(2 beta(t) D) dW, H = |x|^2 / 2 + M^-1 |m|^2 / 2.

    Pandey & Mandt 2023, eq. 4 with constant D ⪰ 0 and Q = -Q^T (K = 2), or the one-variable
    recipe H = |x|^2 / 2 (K = 1). Prior exp(-H) = N(0, diag(1, M)) per coordinate; lift
    covariance diag(0, gamma M) (the HSM initial condition: m0 ~ N(0, gamma M)). `noise_label`
    is log t, the input of the references' Fourier time embedding. `factorization` is the
    kernel's scale in z = mean + L ε and s = -L^{-T} ε: "lower" (Cholesky, the references'
    default) or "upper" (PSLD's `decomp_mode="upper"`, U U^T = Σ with U upper-triangular).
    Built by `recipe`, `CLD` and `PSLD`.
    """

    def __init__(self, D, Q, m_inv: float = 1.0, beta_min: float = 1.0,
                 beta_max: float | None = None, *, gamma: float = 0.04,
                 numerical_eps: float = 1e-9, factorization: str = "lower", N: int = 1000):
        D, Q = _check_recipe(D, Q, m_inv, gamma)
        if factorization not in ("lower", "upper"):
            raise ValueError(f"{type(self).__name__}: factorization must be 'lower' (Cholesky) or "
                             f"'upper' (PSLD's U-first decomposition), got {factorization!r}")
        self.factorization = factorization
        K = D.shape[0]
        self.D, self.Q, self.m_inv, self.gamma = D, Q, float(m_inv), float(gamma)
        self.hessian = torch.diag(torch.tensor([1.0, self.m_inv], dtype=F64)[:K])  # ∇H = hessian z
        prior = torch.linalg.inv(self.hessian)
        lift = torch.zeros(K, K, dtype=F64)
        if K == 2:
            lift[1, 1] = self.gamma / self.m_inv
        super().__init__(-(D + Q) @ self.hessian, psd_sqrt(2 * D), beta_min=beta_min,
                         beta_max=beta_max, lift_covariance=lift, prior_covariance=prior,
                         numerical_eps=numerical_eps, N=N)

    @property
    def mass(self) -> float:
        """M = 1 / m_inv."""
        return 1.0 / self.m_inv

    def __repr__(self) -> str:
        return (f"PhaseSpaceSDE(D={self.D.tolist()}, Q={self.Q.tolist()}, m_inv={self.m_inv}, "
                f"beta_min={self.beta_min}, beta_max={self.beta_max}, gamma={self.gamma})")

    supports_splitting = True

    @property
    def momentum_head_allowed(self) -> bool:
        return self.K == 2 and not bool(self.G[0].any()) and self.factorization == "lower"

    def noise_label(self, t: torch.Tensor) -> torch.Tensor:
        """c(t) = log t (the CLD / PSLD networks' Fourier features of log t)."""
        return torch.log(t)

    def grad_hamiltonian(self, z: torch.Tensor) -> torch.Tensor:
        """∇H(z) = (x, M^-1 m)."""
        return phase_apply(self.hessian.to(z.device).expand(z.shape[0], -1, -1), z)

    def hamiltonian_reversed(self) -> PhaseSpaceSDE:
        """recipe(D, -Q) with the same schedule: the linear part of the reverse-time SDE.

        In reverse time the Hamiltonian part runs backwards while dissipation and noise stay
        (Dockhorn et al. 2022, App. D; PSLD App. SSCS); SSCS samples it exactly.
        """
        return PhaseSpaceSDE(self.D, -self.Q, self.m_inv, self.beta_min, self.beta_max,
                             gamma=self.gamma, numerical_eps=self.numerical_eps,
                             factorization=self.factorization, N=self.N)

    def dissipation_drift(self, z: torch.Tensor, score: torch.Tensor, t: torch.Tensor
                          ) -> torch.Tensor:
        """2 beta(t) D (s + ∇H): the reverse-time drift minus that of `hamiltonian_reversed`.

        The reverse-time drift -f + G G^T s = beta (D + Q) ∇H + 2 beta D s splits into
        -beta (D - Q) ∇H (a linear SDE, sampled exactly) and 2 beta D (s + ∇H), which vanishes
        at the stationary score s = -∇H (Dockhorn et al. 2022, eq. 20; PSLD, SSCS).
        """
        beta = self.beta(t.double())[:, None, None]
        block = (2 * beta * self.D.to(beta.device)).to(z.dtype)
        return phase_apply(block, score + self.grad_hamiltonian(z))


def recipe(D, Q, m_inv: float = 1.0, beta_min: float = 1.0, beta_max: float | None = None, *,
           gamma: float = 0.04, numerical_eps: float = 1e-9, factorization: str = "lower",
           N: int = 1000) -> PhaseSpaceSDE:
    """The complete recipe with constant D ⪰ 0 and skew-symmetric Q (Pandey & Mandt 2023, eq. 4),
    time-scaled by beta(t) = beta_min + t (beta_max - beta_min) (constant when beta_max is None).

    K = 2: H = |x|^2 / 2 + m_inv |m|^2 / 2 and the lift m0 ~ N(0, gamma / m_inv). K = 1 (1 x 1 D,
    Q = 0): D = 1/2 is the VP SDE.
    """
    return PhaseSpaceSDE(D, Q, m_inv, beta_min, beta_max, gamma=gamma,
                         numerical_eps=numerical_eps, factorization=factorization, N=N)


_J = [[0.0, -1.0], [1.0, 0.0]]  # the symplectic rotation


class CLD(PhaseSpaceSDE):
    """Critically-damped Langevin diffusion (Dockhorn, Vahdat & Kreis 2022, eq. 5).

    dx = beta M^-1 m dt, dm = (-beta x - Gamma M^-1 beta m) dt + sqrt(2 Gamma beta) dW with
    critical damping Gamma = 2 / sqrt(M^-1): recipe D = diag(0, Gamma), Q = [[0, -1], [1, 0]].
    beta(t) = beta + t (beta_max - beta) (the reference's beta0 + beta1 t; constant 4 by
    default). Noise enters m only; the lift is m0 ~ N(0, gamma M).
    """

    def __init__(self, beta: float = 4.0, m_inv: float = 4.0, gamma: float = 0.04, *,
                 beta_max: float | None = None, numerical_eps: float = 1e-9,
                 factorization: str = "lower", N: int = 1000):
        m_inv = check_float("CLD", "m_inv", m_inv, positive=True)
        self.friction = 2.0 / math.sqrt(m_inv)
        super().__init__([[0.0, 0.0], [0.0, self.friction]], _J, m_inv, beta, beta_max,
                         gamma=gamma, numerical_eps=numerical_eps, factorization=factorization,
                         N=N)

    def __repr__(self) -> str:
        return (f"CLD(beta={self.beta_min}, m_inv={self.m_inv}, gamma={self.gamma}, "
                f"beta_max={self.beta_max})")


class PSLD(PhaseSpaceSDE):
    """Phase space Langevin diffusion (Pandey & Mandt 2023, Sec. 3).

    D = 1/2 diag(Gamma, M nu), Q = 1/2 [[0, -1], [1, 0]], with M^-1 = (nu - Gamma)^2 / 4
    (critical damping, derived as the reference does): drift beta/2 (M^-1 m - Gamma x,
    -x - nu m), noise sqrt(Gamma beta) on x and sqrt(M nu beta) on m. Gamma = 0 is CLD with
    beta_CLD = beta / 2 and friction M nu. The lift is m0 ~ N(0, kappa M).
    """

    def __init__(self, beta: float = 8.0, Gamma: float = 0.01, nu: float = 4.01,
                 kappa: float = 0.04, *, beta_max: float | None = None,
                 numerical_eps: float = 1e-9, factorization: str = "lower", N: int = 1000):
        Gamma = check_float("PSLD", "Gamma", Gamma, low=0.0)
        nu = check_float("PSLD", "nu", nu, low=0.0)
        if nu == Gamma:
            raise ValueError(f"PSLD: nu must differ from Gamma (M^-1 = (nu - Gamma)^2 / 4 would be "
                             f"0), got Gamma = nu = {nu}; the paper uses nu = 4 + Gamma")
        m_inv = (nu - Gamma) ** 2 / 4
        self.Gamma, self.nu, self.kappa = Gamma, nu, float(kappa)
        D = [[0.5 * Gamma, 0.0], [0.0, 0.5 * nu / m_inv]]
        Q = [[0.0, -0.5], [0.5, 0.0]]
        super().__init__(D, Q, m_inv, beta, beta_max, gamma=kappa,
                         numerical_eps=numerical_eps, factorization=factorization, N=N)

    def __repr__(self) -> str:
        return (f"PSLD(beta={self.beta_min}, Gamma={self.Gamma}, nu={self.nu}, "
                f"kappa={self.kappa}, beta_max={self.beta_max})")


SDES.register("cld", CLD)
SDES.register("psld", PSLD)
