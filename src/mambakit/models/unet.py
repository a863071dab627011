"""A U-Net of SSM blocks for raw audio, in SaShiMi's layout (Goel et al. 2022, "It's Raw!"; Mamba paper Section 4.4).

Shapes (legend): B batch, L samples, V levels (256 mu-law levels), H_k width at level k, p_k pooling factor.

    embedding                         (B, L) levels -> (B, L, H_0)
    level k < K:  blocks_down[k]      (B, L_k, H_k) residual blocks
                  skip_k = output
                  DownPool_k          (B, L_k, H_k) -> (B, L_k / p_k, H_{k+1})   groups of p_k samples, one linear
    level K:      blocks_center       (B, L_K, H_K)
    level k < K:  UpPool_k            (B, L_k / p_k, H_{k+1}) -> (B, L_k, H_k)   one linear, *shifted by one group*
                  + skip_k, then blocks_up[k]
    norm, head                        (B, L, H_0) -> (B, L, V) logits of the next sample

H_{k+1} = expand * H_k, L_{k+1} = L_k / p_k. A residual block is x + mixer(norm(x)), then x + mlp(norm(x))
when `mlp` (SaShiMi's S4 + MLP; the Mamba-UNet has mixers only, as the Mamba paper's).

Causality. Every mixer is causal and the norms, MLPs and head act per position. DownPool's group j reads samples
[j p, (j + 1) p); UpPool shifts its output right by one group, so the samples of group j receive the deeper
levels' output of group j - 1, which read only samples before j p. So output t depends on inputs 0..t and no
later one (tests/test_audio.py perturbs the future and checks). L must be a multiple of prod(pool); `forward`
pads shorter tails on the right and crops (right padding cannot reach earlier outputs).

Mixers (`mixer`): "mamba" (Mamba-1, real A, selective), "s4d-lin" (S4D with complex A = -1/2 + i pi n, the
complex-A option; time invariant), "s4d-real" (S4D with real A). S4D mixers are ungated, as SaShiMi's S4.

Decoding. `allocate_state(batch)` and `step(levels (B,))` run the same network one sample at a time at
constant cost per sample: level k steps once every prod(p_0..p_{k-1}) samples, when a group is complete, and the
up-pooled vectors of that group wait in the state for the next p_k samples. The step logits equal the parallel
forward's (tests/test_audio.py). `sample_audio` draws waveforms with it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import GatedMLP, Mamba1, RMSNorm, S4D
from .mamba_lm import _init_weights

__all__ = ["UNetConfig", "AudioUNet", "UNetState", "sample_audio", "UNET_MIXERS"]

UNET_MIXERS = ("mamba", "s4d-lin", "s4d-real")


@dataclass
class UNetConfig:
    """An audio U-Net. `pool` holds one pooling factor per level (SaShiMi: (4, 4)); `n_layers` blocks per stage."""

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    pool: list[int] = field(default_factory=lambda: [4, 4])
    expand: int = 2
    mixer: str = "mamba"
    mlp: bool = False
    d_state: int = 16
    mixer_expand: int = 2
    d_conv: int = 4

    def __post_init__(self) -> None:
        self.pool = list(self.pool)
        if self.mixer not in UNET_MIXERS:
            raise ValueError(f"UNetConfig: mixer must be one of {UNET_MIXERS}, got {self.mixer!r}")
        for name in ("vocab_size", "d_model", "n_layers", "expand", "d_state", "mixer_expand"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"UNetConfig: {name} must be a positive int, got {getattr(self, name)!r}")
        if any(not isinstance(p, int) or p < 2 for p in self.pool):
            raise ValueError(f"UNetConfig: every pooling factor must be an int >= 2, got {self.pool}")

    @property
    def widths(self) -> list[int]:
        return [self.d_model * self.expand ** k for k in range(len(self.pool) + 1)]

    @property
    def multiple(self) -> int:
        """Input lengths are padded to a multiple of this (the product of the pooling factors)."""
        return math.prod(self.pool)

    def to_dict(self) -> dict:
        return asdict(self)


class _Block(nn.Module):
    """x + mixer(norm(x)) (+ x + mlp(norm2(x)))."""

    def __init__(self, dim: int, cfg: UNetConfig, index: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        if cfg.mixer == "mamba":
            self.mixer = Mamba1(dim, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.mixer_expand, layer_idx=index)
        else:
            self.mixer = S4D(dim, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.mixer_expand, gated=False,
                             A_init="S4D-Lin" if cfg.mixer == "s4d-lin" else "S4D-Real", layer_idx=index)
        self.norm2 = RMSNorm(dim) if cfg.mlp else None
        self.mlp = GatedMLP(dim, hidden_features=2 * dim, out_features=dim, multiple_of=16) if cfg.mlp else None

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.mixer(self.norm(x), cache=cache)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class _Stage(nn.ModuleList):
    def forward(self, x: torch.Tensor, caches=None) -> torch.Tensor:
        for i, block in enumerate(self):
            x = block(x, None if caches is None else caches[i])
        return x


class _DownPool(nn.Module):
    """(B, L, H) -> (B, L / p, H * expand): each group of p samples, flattened, through one linear layer."""

    def __init__(self, dim: int, pool: int, expand: int):
        super().__init__()
        self.pool = pool
        self.linear = nn.Linear(dim * pool, dim * expand)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        return self.linear(x.reshape(batch, length // self.pool, self.pool * dim))


class _UpPool(nn.Module):
    """(B, L / p, H * expand) -> (B, L, H): one linear layer to p vectors per group, shifted right by one group
    (group j gets the vectors computed from group j - 1; group 0 gets zeros): that shift is what keeps it causal."""

    def __init__(self, dim: int, pool: int, expand: int):
        super().__init__()
        self.pool = pool
        self.linear = nn.Linear(dim * expand, dim * pool)

    def groups(self, z: torch.Tensor) -> torch.Tensor:
        """(B, G, H * expand) -> (B, G, p, H), unshifted."""
        out = self.linear(z)
        return out.reshape(*out.shape[:-1], self.pool, out.shape[-1] // self.pool)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch, n_groups, _ = z.shape
        g = self.groups(z)  # (B, G, p, H)
        g = F.pad(g[:, :-1], (0, 0, 0, 0, 1, 0))  # shift by one group: (B, G, p, H), group 0 zero
        return g.reshape(batch, n_groups * self.pool, -1)


@dataclass
class UNetState:
    """Recurrent state of `AudioUNet.step`: per level k, the mixer caches of its down / up stages, the group of
    samples being collected for DownPool (buffers[k], (B, p_k, H_k): slot r holds the group's r-th sample) and the
    up-pooled vectors (B, p_k, H_k) that the current group adds (pending[k]); t, the samples consumed. Every tensor
    is updated in place, so a captured step (`UNetStepGraphs`) stays valid."""

    caches_down: list[list]
    caches_up: list[list]
    caches_center: list
    buffers: list[torch.Tensor]
    pending: list[torch.Tensor]
    t: int = 0

    def reset(self) -> "UNetState":
        """Back to the empty state, in place (the tensors keep their addresses)."""
        for cache in [c for stage in self.caches_down + self.caches_up for c in stage] + self.caches_center:
            cache.zero_()
        for tensor in self.buffers + self.pending:
            tensor.zero_()
        self.t = 0
        return self


class AudioUNet(nn.Module):
    """SaShiMi-style U-Net language model over mu-law levels.   forward(levels (B, L)) -> logits (B, L, V).

    Example:
        >>> model = AudioUNet(UNetConfig(d_model=32, pool=[4, 4], mixer="mamba"))
        >>> logits = model(torch.randint(0, 256, (2, 64)))       # (2, 64, 256); logits[:, t] predict sample t + 1
    """

    def __init__(self, config: UNetConfig, device=None):
        super().__init__()
        self.config = config
        widths = config.widths
        K = len(config.pool)
        self.embedding = nn.Embedding(config.vocab_size, widths[0])
        n = 0

        def stage(dim):
            nonlocal n
            blocks = _Stage(_Block(dim, config, n + i) for i in range(config.n_layers))
            n += config.n_layers
            return blocks

        self.down = nn.ModuleList(stage(widths[k]) for k in range(K))
        self.pools = nn.ModuleList(_DownPool(widths[k], config.pool[k], config.expand) for k in range(K))
        self.center = stage(widths[K])
        self.unpools = nn.ModuleList(_UpPool(widths[k], config.pool[k], config.expand) for k in range(K))
        self.up = nn.ModuleList(stage(widths[k]) for k in range(K))
        self.norm_f = RMSNorm(widths[0])
        self.lm_head = nn.Linear(widths[0], config.vocab_size, bias=False)
        self.apply(partial(_init_weights, n_layer=n))
        self.to(device)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory) -> None:
        """unet_config.json + model.safetensors in `directory` (what `from_pretrained` reads)."""
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "unet_config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(directory / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory, device=None) -> "AudioUNet":
        """Load what `save_pretrained` wrote.

        Example:
            >>> model = AudioUNet.from_pretrained("results/spoken-digits/mamba-unet")
        """
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        directory = Path(directory)
        model = cls(UNetConfig(**json.loads((directory / "unet_config.json").read_text())))
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.to(device)

    def hidden_states(self, levels: torch.Tensor) -> torch.Tensor:
        """(B, L) levels -> (B, L, H_0) final hidden states (before norm_f and head); any L (padded inside)."""
        if levels.dim() != 2 or levels.is_floating_point():
            raise ValueError(f"AudioUNet: levels must be an integer tensor (batch, seqlen), got "
                             f"{levels.dtype} {tuple(levels.shape)}")
        length = levels.shape[1]
        padded = -(-length // self.config.multiple) * self.config.multiple
        x = self.embedding(F.pad(levels, (0, padded - length)))  # right padding: no earlier output sees it
        skips = []
        for k in range(len(self.down)):
            x = self.down[k](x)
            skips.append(x)
            x = self.pools[k](x)
        x = self.center(x)
        for k in reversed(range(len(self.up))):
            x = self.up[k](self.unpools[k](x) + skips[k])
        return x[:, :length]

    def forward(self, levels: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm_f(self.hidden_states(levels)))

    # ---------------------------------------------------------------- decoding

    def allocate_state(self, batch_size: int) -> UNetState:
        device = self.lm_head.weight.device
        alloc = lambda stage: [b.mixer.allocate_state(batch_size, device=device) for b in stage]  # noqa: E731
        dtype = self.lm_head.weight.dtype
        groups = lambda: [torch.zeros(batch_size, p, w, device=device, dtype=dtype)  # noqa: E731
                          for p, w in zip(self.config.pool, self.config.widths)]
        return UNetState(caches_down=[alloc(s) for s in self.down], caches_up=[alloc(s) for s in self.up],
                         caches_center=alloc(self.center), buffers=groups(), pending=groups())

    def step(self, levels: torch.Tensor, state: UNetState) -> torch.Tensor:
        """One sample per row: levels (B,) -> logits (B, V) of the next sample, advancing `state`."""
        x = self.embedding(levels)[:, None]  # (B, 1, H_0)
        x = self._step_level(0, x, state.t, state)
        state.t += 1
        return self.lm_head(self.norm_f(x))[:, 0]

    def _step_level(self, k: int, x: torch.Tensor, t: int, state: UNetState) -> torch.Tensor:
        """x (B, 1, H_k) at level-k time t -> (B, 1, H_k) output of level k (deeper levels step when a group ends)."""
        if k == len(self.down):
            return self.center(x, state.caches_center)
        x = self.down[k](x, state.caches_down[k])
        p, r = self.config.pool[k], t % self.config.pool[k]
        state.buffers[k][:, r] = x[:, 0]
        out = self.up[k](state.pending[k][:, r:r + 1] + x, state.caches_up[k])
        if r == p - 1:  # the group is complete: the deeper levels step once, for the next group's samples
            pooled = self.pools[k](state.buffers[k])  # (B, 1, H_{k+1})
            deeper = self._step_level(k + 1, pooled, t // p, state)
            state.pending[k].copy_(self.unpools[k].groups(deeper)[:, 0])  # (B, p, H_k)
        return out


class UNetStepGraphs:
    """`AudioUNet.step` for a fixed batch, replayed from CUDA graphs: one launch per sample instead of the many small
    kernels of a step (sampling 1 s clips eagerly on an H200 took 4.5-6.1 ms a sample, BENCHMARKS.md).

    Which levels step depends on the phase t mod prod(pool) (level k steps when a group of level k - 1 completes),
    so there is one graph per phase (16 for pool [4, 4]), all in one memory pool, each reading the same static
    levels buffer (B,) and state (`state`, updated in place) and writing its own logits (B, V). Sampling stays
    outside. graphs=False runs the same steps eagerly on the same state (what the CPU tests check).

    Example:
        >>> steps = UNetStepGraphs(model, batch_size=64)
        >>> logits = steps(levels_B)           # (64, 256); valid until the next call with the same phase
    """

    def __init__(self, model: "AudioUNet", batch_size: int, *, graphs: bool | None = None, warmup_rounds: int = 1):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"UNetStepGraphs: batch_size must be an int >= 1, got {batch_size!r}")
        self.model = model
        self.device = model.lm_head.weight.device
        if graphs is None:
            graphs = self.device.type == "cuda"
        if graphs and self.device.type != "cuda":
            raise ValueError(f"UNetStepGraphs: graphs=True needs a model on CUDA, this one is on {self.device}")
        self.period = model.config.multiple
        self.state = model.allocate_state(batch_size)
        self._levels_B = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._graphs: list[tuple[torch.cuda.CUDAGraph, torch.Tensor]] = []
        if graphs:
            self._capture(warmup_rounds)

    @property
    def graphed(self) -> bool:
        return bool(self._graphs)

    def _capture(self, warmup_rounds: int) -> None:
        pool = None
        with torch.cuda.device(self.device), torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # every phase runs eagerly first: Triton compiles, cuBLAS makes handles
                for _ in range(warmup_rounds * self.period):
                    self.model.step(self._levels_B, self.state)
            torch.cuda.current_stream().wait_stream(side)
            for phase in range(self.period):
                self.state.t = phase
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.model.step(self._levels_B, self.state)
                pool = graph.pool()
                self._graphs.append((graph, logits))
        self.state.reset()

    def __call__(self, levels: torch.Tensor) -> torch.Tensor:
        """levels (B,) -> logits (B, V) of the next sample, advancing `state` by one sample."""
        if not self._graphs:
            return self.model.step(levels, self.state)
        graph, logits = self._graphs[self.state.t % self.period]
        self._levels_B.copy_(levels)
        graph.replay()
        self.state.t += 1
        return logits


@torch.no_grad()
def sample_audio(model: AudioUNet, batch_size: int, num_samples: int, *, temperature: float = 1.0,
                 prompt: torch.Tensor | None = None, seed: int | None = None,
                 cuda_graph: bool = False) -> torch.Tensor:
    """Draw (B, num_samples) mu-law levels from the model, one sample at a time (constant cost per sample).

    The first input is the level of silence (mu-law 0.0 -> level vocab // 2) unless `prompt` (B, P) levels is given;
    the returned tensor holds the prompt followed by the new samples, num_samples in all. cuda_graph: replay the
    step from CUDA graphs (`UNetStepGraphs`; a model on CUDA), captured at the start of the call.

    Example:
        >>> levels = sample_audio(model, 4, 16000, seed=0)                   # 1 s at 16 kHz
        >>> write_wav("s.wav", mu_law_decode(levels[0]), 16000)
    """
    if temperature < 0:
        raise ValueError(f"sample_audio: temperature must be >= 0, got {temperature}")
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    if prompt is None:
        prompt = torch.full((batch_size, 1), model.config.vocab_size // 2, dtype=torch.long, device=device)
    if prompt.dim() != 2 or prompt.shape[0] != batch_size or prompt.shape[1] < 1:
        raise ValueError(f"sample_audio: prompt must be (batch_size={batch_size}, P >= 1), got {tuple(prompt.shape)}")
    step = UNetStepGraphs(model, batch_size, graphs=cuda_graph)
    out = [prompt[:, i] for i in range(prompt.shape[1])]
    for i in range(prompt.shape[1] - 1):
        step(prompt[:, i].to(device))
    current = prompt[:, -1].to(device)
    while len(out) < num_samples:
        logits = step(current).float()
        if temperature == 0:
            current = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            current = torch.multinomial(probs, 1, generator=gen)[:, 0]
        out.append(current)
    model.train(was_training)
    return torch.stack(out[:num_samples], dim=1)
