"""The solvable linear model of Sections 3 and 5.1: simulation against theory.

Task. y = A x + xi with A = sum_j s_j u_j v_j^T of rank d (u_j, v_j Gaussian directions
normalised to unit length, s_j spaced evenly from ``s_max`` down to ``s_min`` so that the
modes are distinct and the problem well conditioned), x ~ N(0, I_n), unit-variance noise xi,
p samples. By default the sample inputs are whitened (sum_mu x x^T / p = I exactly), the
assumption of eq. A4.

Network. y_hat = W2 W1 x, n -> k -> m, with a rank-r feedback B = Q P (Q k x r, P r x m) in
place of W2^T. Modes of learning (each feedback rule with its own learning rate):

* ``bp``:        B = W2^T (Saxe et al.).
* ``fixed``:     Q, P random and fixed (eqs. 4-6).
* ``learn_q``:   P fixed, Q learned as in Akrout et al. (Kolen-Pollack projected on Q, the
                 Hebbian rule of eq. A43): Delta Q = eta_q W1 (Sigma_io - W2 W1 Sigma_ii)^T P^T.
* ``normative``: Q and P by eq. 9: Delta P = Q^T (W2^T - QP), Delta Q = (W2^T - QP) P^T.
* ``oja``:       P by Oja's rule, Q fixed (Sec. 5.1):
                 Delta P = eta_p [P (C / gamma) (I - P^T P) - lambda P], gamma = max diag C
                 (Algorithm 2). C is the covariance of the targets, Sigma_oo = <y y^T>, by
                 default (``oja_signal="targets"``: eqs. A36, A41, A44, A57, and Algorithm 2's
                 use_targets, the case of an output layer), or of the error, <e e^T>
                 (``"error"``, eqs. 15-16). The error-driven rule has no stable fixed point
                 when more than r directions carry error (here d = 16 > r = 8): the subspace
                 it learns is the one whose error vanishes, so P turns away, W1 (confined to
                 range Q, rank r) overwrites learned modes, and Lambda oscillates for good.

Simulation: full-batch gradient descent with these updates on the p samples (eq. 4), or
minibatch SGD. Theory: the rotated mean dynamics, integrated numerically (RK45) from the same
initial condition rotated into the SVD basis Sigma_io = U S V^T (W1 = W1b V^T, W2 = U W2b,
P = Pb U^T, Q unrotated), with E = S - W2b W1b (eqs. 5, 10, 16; App. A, eqs. A19, A25,
A32, A35, A49, A54):

    dW1b = eta Q Pb E (bp: W2b^T E),   dW2b = eta E W1b^T,
    learn_q:   dQ  = eta_q W1b E^T Pb^T,
    normative: dPb = eta_n Q^T (W2b^T - Q Pb),   dQ = eta_n (W2b^T - Q Pb) Pb^T,
    oja:       dPb = eta_o [Pb (C / gamma) (I - Pb^T Pb) - lambda Pb],
               C = S S^T + N (targets, eq. A57) or E E^T + N (error, eq. 16),

time in steps. N = U^T (Sigma_oo - Sigma_io Sigma_io^T) U is the noise part of the error
covariance; eq. 16 as printed omits it (isotropic in expectation, it only adds to the
orthonormalising pull), and it is kept here so that theory and simulation share one mean
dynamics. With whitened inputs and full batches the simulation is then exactly the explicit
Euler discretisation, step 1, of the theory's ODE: what differs is the first-order
discretisation error, proportional to the learning rates.

Output: Lambda_i(t) = u_i^T W2 W1 v_i / S_ii for each task mode i (eq. 7).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.integrate import solve_ivp

from ldfa_cli.errors import ConfigError

DIVERGED = 1e6  # a weight this large in the mode basis: the linear dynamics have blown up

MODES = ("bp", "fixed", "learn_q", "normative", "oja")
FEEDBACK_LEARNS = {"learn_q": ("Q",), "normative": ("Q", "P"), "oja": ("P",)}


@dataclass
class TheoryConfig:
    n: int = 128
    k: int = 64
    m: int = 64
    d: int = 16
    ranks: tuple[int, ...] = (64, 8)
    p: int = 4096
    steps: int = 3000
    record_every: int = 20
    lr: float = 0.01
    lr_q: float = 0.01  # learn_q
    lr_normative: float = 0.01
    lr_oja: float = 0.01
    oja_decay: float = 0.0
    oja_signal: str = "targets"  # targets: C = Sigma_oo (eq. A44); error: C = <e e^T> (eq. 16)
    oja_gamma: bool = True  # C / max(diag(C)) (Algorithm 2)
    s_max: float = 3.0
    s_min: float = 1.0
    init_scale: float = 1e-3  # std of the initial W1, W2 entries (small: Saxe-like curves)
    batch_size: int | None = None  # None: full batch
    whiten: bool = True
    seed: int = 0
    modes: tuple[str, ...] = MODES


@dataclass
class Task:
    X: np.ndarray  # n x p
    Y: np.ndarray  # m x p
    sigma_io: np.ndarray  # m x n
    sigma_ii: np.ndarray  # n x n
    sigma_oo: np.ndarray  # m x m
    U: np.ndarray  # m x m
    s: np.ndarray  # singular values of sigma_io, min(m, n)
    V: np.ndarray  # n x n


def make_task(cfg: TheoryConfig, rng: np.random.Generator) -> Task:
    def directions(dim: int) -> np.ndarray:
        vectors = rng.standard_normal((dim, cfg.d))
        return vectors / np.linalg.norm(vectors, axis=0)

    strengths = np.linspace(cfg.s_max, cfg.s_min, cfg.d)
    A = (directions(cfg.m) * strengths) @ directions(cfg.n).T  # m x n, rank d
    X = rng.standard_normal((cfg.n, cfg.p))
    if cfg.whiten:
        evals, evecs = np.linalg.eigh(X @ X.T / cfg.p)
        X = evecs @ np.diag(evals**-0.5) @ evecs.T @ X
    Y = A @ X + rng.standard_normal((cfg.m, cfg.p))
    sigma_io = Y @ X.T / cfg.p
    U, s, Vt = np.linalg.svd(sigma_io, full_matrices=True)
    return Task(X, Y, sigma_io, X @ X.T / cfg.p, Y @ Y.T / cfg.p, U, s, Vt.T)


@dataclass
class State:
    W1: np.ndarray  # k x n
    W2: np.ndarray  # m x k
    Q: np.ndarray  # k x r
    P: np.ndarray  # r x m

    def copy(self) -> State:
        return State(self.W1.copy(), self.W2.copy(), self.Q.copy(), self.P.copy())


def initial_state(cfg: TheoryConfig, rank: int, rng: np.random.Generator) -> State:
    return State(
        W1=rng.standard_normal((cfg.k, cfg.n)) * cfg.init_scale,
        W2=rng.standard_normal((cfg.m, cfg.k)) * cfg.init_scale,
        Q=rng.standard_normal((cfg.k, rank)) / np.sqrt(rank),
        P=rng.standard_normal((rank, cfg.m)) / np.sqrt(cfg.m),
    )


def feedback_lr(cfg: TheoryConfig, mode: str) -> float:
    return {"learn_q": cfg.lr_q, "normative": cfg.lr_normative, "oja": cfg.lr_oja}.get(mode, 0.0)


def mode_overlaps(W1, W2, task: Task, d: int) -> np.ndarray:
    """Lambda_i = u_i^T W2 W1 v_i / S_ii for i < d (eq. 7)."""
    M = task.U[:, :d].T @ W2 @ W1 @ task.V[:, :d]
    return np.diag(M) / task.s[:d]


# ----------------------------------------------------------------------- simulation
def _updates(mode, st: State, sigma_io, sigma_ii, sigma_oo, decay, signal="targets", gamma=True):
    """The increments of eq. 4 and of each feedback rule (before learning rates);
    ``sigma_ii`` None stands for whitened inputs (the identity)."""
    M = st.W2 @ st.W1
    M_ii = M if sigma_ii is None else M @ sigma_ii
    E = sigma_io - M_ii  # <e x^T>
    B = st.W2.T if mode == "bp" else st.Q @ st.P
    d_w1, d_w2 = B @ E, E @ st.W1.T
    d_q = d_p = None
    if mode == "learn_q":
        d_q = st.W1 @ E.T @ st.P.T
    elif mode == "normative":
        R = st.W2.T - st.Q @ st.P
        d_p, d_q = st.Q.T @ R, R @ st.P.T
    elif mode == "oja":
        if signal == "targets":
            C = sigma_oo  # <y y^T>
        else:
            MS = M @ sigma_io.T
            C = sigma_oo - MS - MS.T + M_ii @ M.T  # <e e^T>
        if gamma:
            C = C / np.max(np.diag(C))
        PC = st.P @ C
        d_p = PC - (PC @ st.P.T) @ st.P - decay * st.P
    return d_w1, d_w2, d_q, d_p


def simulate(cfg: TheoryConfig, task: Task, mode: str, start: State, rng) -> np.ndarray:
    """Lambda over time (records x d) of gradient descent on the samples."""
    st, eta, eta_fb = start.copy(), cfg.lr, feedback_lr(cfg, mode)
    records = [mode_overlaps(st.W1, st.W2, task, cfg.d)]
    sigmas = (task.sigma_io, None if cfg.whiten else task.sigma_ii, task.sigma_oo)
    for step in range(1, cfg.steps + 1):
        if cfg.batch_size:
            idx = rng.choice(cfg.p, cfg.batch_size, replace=False)
            x, y = task.X[:, idx], task.Y[:, idx]
            b = cfg.batch_size
            sigmas = (y @ x.T / b, x @ x.T / b, y @ y.T / b)
        d_w1, d_w2, d_q, d_p = _updates(mode, st, *sigmas, cfg.oja_decay, cfg.oja_signal,
                                        cfg.oja_gamma)  # fmt: skip
        st.W1 += eta * d_w1
        st.W2 += eta * d_w2
        if d_q is not None:
            st.Q += eta_fb * d_q
        if d_p is not None:
            st.P += eta_fb * d_p
        if step % cfg.record_every == 0:
            records.append(mode_overlaps(st.W1, st.W2, task, cfg.d))
    return np.array(records)


# --------------------------------------------------------------------------- theory
def theory(cfg: TheoryConfig, task: Task, mode: str, start: State) -> np.ndarray:
    """Lambda over time from the rotated mean dynamics, integrated with RK45."""
    k, n, m = cfg.k, cfg.n, cfg.m
    r = start.P.shape[0]
    S = np.zeros((m, n))
    S[: len(task.s), : len(task.s)] = np.diag(task.s)
    noise = task.U.T @ (task.sigma_oo - task.sigma_io @ task.sigma_io.T) @ task.U
    eta, eta_fb = cfg.lr, feedback_lr(cfg, mode)
    shapes = [(k, n), (m, k), (k, r), (r, m)]
    sizes = [a * b for a, b in shapes]

    def unpack(y):
        parts, offset = [], 0
        for shape, size in zip(shapes, sizes, strict=True):
            parts.append(y[offset : offset + size].reshape(shape))
            offset += size
        return parts

    def rhs(t, y):
        if not np.abs(y).max() < DIVERGED:  # (NaN too) the solver would shrink its step forever
            raise ConfigError(f"the theory's dynamics diverge at these learning rates (a "
                              f"weight passes {DIVERGED:g} by step {t:.3g}): lower --lr (and "
                              "the feedback's)")  # fmt: skip
        W1b, W2b, Q, Pb = unpack(y)
        E = S - W2b @ W1b
        B = W2b.T if mode == "bp" else Q @ Pb
        d_q, d_p = np.zeros_like(Q), np.zeros_like(Pb)
        if mode == "learn_q":
            d_q = eta_fb * (W1b @ E.T @ Pb.T)
        elif mode == "normative":
            R = W2b.T - Q @ Pb
            d_p, d_q = eta_fb * (Q.T @ R), eta_fb * (R @ Pb.T)
        elif mode == "oja":
            C = (S @ S.T if cfg.oja_signal == "targets" else E @ E.T) + noise
            if cfg.oja_gamma:  # max diag of C in the unrotated basis, U C U^T
                C = C / np.max(np.einsum("ij,jk,ik->i", task.U, C, task.U))
            PC = Pb @ C
            d_p = eta_fb * (PC - (PC @ Pb.T) @ Pb - cfg.oja_decay * Pb)
        parts = (eta * (B @ E), eta * (E @ W1b.T), d_q, d_p)
        return np.concatenate([p.ravel() for p in parts])

    y0 = np.concatenate([(start.W1 @ task.V).ravel(), (task.U.T @ start.W2).ravel(),
                         start.Q.ravel(), (start.P @ task.U).ravel()])  # fmt: skip
    times = np.arange(0, cfg.steps + 1, cfg.record_every, dtype=float)
    solution = solve_ivp(rhs, (0.0, float(cfg.steps)), y0, t_eval=times, method="RK45",
                         rtol=1e-6, atol=1e-8)  # fmt: skip
    if not solution.success:
        raise ConfigError(f"the theory's integration failed ({solution.message}): lower --lr")
    overlaps = []
    for column in solution.y.T:
        W1b, W2b, _, _ = unpack(column)
        overlaps.append(np.diag(W2b @ W1b)[: cfg.d] / task.s[: cfg.d])
    return np.array(overlaps)


@dataclass
class Curves:
    mode: str
    rank: int
    steps: np.ndarray
    simulation: np.ndarray  # records x d
    theory: np.ndarray

    @property
    def discrepancy(self) -> float:
        return float(np.max(np.abs(self.simulation - self.theory)))


@dataclass
class TheoryResult:
    config: TheoryConfig
    curves: list[Curves] = field(default_factory=list)
    singular_values: np.ndarray | None = None


def run(cfg: TheoryConfig) -> TheoryResult:
    """Every (mode, rank) pair from one task and, per rank, one initial condition.
    The matrices are small: one BLAS thread is faster than several."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _run(cfg)


def _run(cfg: TheoryConfig) -> TheoryResult:
    rng = np.random.default_rng(cfg.seed)
    task = make_task(cfg, rng)
    result = TheoryResult(cfg, singular_values=task.s[: cfg.d])
    steps = np.arange(0, cfg.steps + 1, cfg.record_every)
    backprop = None  # bp ignores Q and P: one run serves every rank
    for rank in cfg.ranks:
        start = initial_state(cfg, rank, np.random.default_rng([cfg.seed, rank]))
        for mode in cfg.modes:
            if mode == "bp" and backprop is not None:
                result.curves.append(Curves(mode, rank, steps, backprop.simulation,
                                            backprop.theory))  # fmt: skip
                continue
            sim_rng = np.random.default_rng([cfg.seed, rank, MODES.index(mode)])
            curves = Curves(mode, rank, steps, simulate(cfg, task, mode, start, sim_rng),
                            theory(cfg, task, mode, start))  # fmt: skip
            result.curves.append(curves)
            if mode == "bp":
                backprop = curves
    return result


def learning_times(curves: np.ndarray, steps: np.ndarray, level: float = 0.9) -> np.ndarray:
    """The first recorded step at which each mode's Lambda reaches ``level`` (inf: never)."""
    reached = curves >= level
    return np.where(reached.any(axis=0), steps[reached.argmax(axis=0)], np.inf)
