"""How an ADD step runs within a GPU's memory: precision, micro-batches, gradient checkpointing, chunked VAE passes.

* ``precision`` (a config field, it changes the numbers within bf16 tolerance): ``bf16`` runs the forward
  passes of the student, teacher, VAE, feature network and c_img network under ``torch.autocast`` (CUDA and
  CPU alike). The weights, their gradients, the Adam states and the EMA stay fp32 (master weights); every
  network output is cast to fp32 before a loss; the discriminator heads run outside autocast, so the GAN
  hinge loss and R1 (a gradient of a gradient) are fp32 throughout.
* ``micro_batch_size`` (a config field): gradient accumulation. The step draws every random number for the
  whole batch first (timesteps, noise, DiffAugment parameters, the teacher's t and ε'), in the order one
  batch draws them, then runs the micro-batches on slices of those draws; each micro-batch's loss is scaled
  by its share of the batch (micro_batch_size / batch), so the summed gradient is the whole batch's mean
  gradient. The discriminator's batch statistics are taken within each micro-batch: BatchNormLocal's groups
  (8 consecutive samples) are the whole batch's when micro_batch_size is a multiple of 8, so the step then
  equals one batch within float tolerance; with a smaller micro-batch each micro-batch is one group (as each
  GPU's share is in StyleGAN-T's multi-GPU training), and minibatch-std groups (``discriminator.minibatch_std``)
  are always formed within the micro-batch.
* ``gradient_checkpointing`` and ``vae_decode_chunk`` (execution keys, left out of the cell id): the same
  numbers within float tolerance, less activation memory (checkpointing: recomputed in the backward pass)
  or a lower peak (VAE passes a few samples at a time).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch

from add_bench.errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward passes' context: bf16 autocast on ``device``'s type, or nothing (fp32)."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def full_precision(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """fp32 inside a bf16 autocast region (the discriminator heads, the GAN losses, R1); nothing for fp32."""
    return torch.autocast(device.type, enabled=False) if PRECISIONS[precision] is not None else contextlib.nullcontext()


def micro_batches(n: int, size: int, batch_size: int | None = None) -> list[tuple[slice, float]]:
    """The micro-batches of a batch of ``n`` samples as (rows, share of the batch); ``size`` 0 (or ≥ n) = one.
    ``batch_size``: the config's, named in the error when ``size`` does not divide ``n``."""
    if size <= 0 or size >= n:
        return [(slice(0, n), 1.0)]
    if n % size:
        whole = f"batch_size={n}" if batch_size in (None, n) else f"batch_size={batch_size} ({n} per process)"
        divisors = [d for d in range(1, n) if n % d == 0]
        raise ConfigError(
            f"micro_batch_size={size} does not divide {whole}: accepted: 0 (the whole batch) or a divisor of {n} "
            f"({', '.join(map(str, divisors))})"
        )
    return [(slice(i, i + size), size / n) for i in range(0, n, size)]


def scaled(loss: torch.Tensor | None, share: float) -> torch.Tensor | None:
    """A micro-batch's loss scaled by its share of the batch (the loss itself for the whole batch; None as is)."""
    return loss if share == 1.0 or loss is None else loss * share


def rows_of(x: Any, rows: slice) -> Any:
    """``x[rows]`` for a tensor, None as is."""
    return None if x is None else x[rows]


def joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """Micro-batches' tensors concatenated along the batch (the tensor itself for one)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class SpectralNormReplay:
    """Micro-batches see the spectral normalisation of one batch. A spectral-norm layer in training mode runs
    a power iteration at every forward pass (updating its u, v), so k micro-batches would iterate k times
    where one batch iterates once. Here the first micro-batch of each named pass (``generator``, ``real``,
    ``fake``) iterates as the batch would and its u, v are kept; the later micro-batches of that pass use
    them without iterating (the layers in eval mode), and leave them as the pass left them."""

    def __init__(self, module: torch.nn.Module):
        from torch.nn.utils.parametrizations import _SpectralNorm

        self.norms = [m for m in module.modules() if isinstance(m, _SpectralNorm)]
        self.saved: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, rows: slice, whole: bool) -> Iterator[None]:
        """The forward pass ``name`` of the micro-batch ``rows``; ``whole``: the batch is one micro-batch."""
        if whole:
            yield
        elif rows.start == 0:
            yield
            self.saved[name] = [(m._u.clone(), m._v.clone()) for m in self.norms]
        else:
            modes = [m.training for m in self.norms]
            with torch.no_grad():
                for m, (u, v) in zip(self.norms, self.saved[name]):
                    m._u.copy_(u)
                    m._v.copy_(v)
                    m.train(False)
            try:
                yield
            finally:
                for m, mode in zip(self.norms, modes):
                    m.train(mode)


def chunks(x: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    """``x`` in pieces of at most ``size`` samples (0: ``x`` whole)."""
    yield from (x.split(size) if 0 < size < x.shape[0] else (x,))


def enable_gradient_checkpointing(module: torch.nn.Module, what: str) -> bool:
    """diffusers' gradient checkpointing on ``module`` (or on the UNet it wraps, ``.unet``); a log line and
    False when it has none."""
    for target in (module, getattr(module, "unet", None)):
        if target is not None and getattr(target, "_supports_gradient_checkpointing", False):
            target.enable_gradient_checkpointing()
            return True
    print(
        f"gradient_checkpointing=true: {what} ({type(module).__name__}) has no gradient checkpointing; it runs without",
        file=sys.stderr,
    )
    return False


def check(precision: str, micro_batch_size: int, batch_size: int, vae_decode_chunk: int) -> None:
    """The execution fields of a TrainConfig, each error naming the key, the value and what is accepted."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: unknown; accepted: {', '.join(PRECISIONS)}")
    if micro_batch_size < 0:
        raise ConfigError(f"micro_batch_size={micro_batch_size}: accepted: 0 (the whole batch) or a positive divisor")
    micro_batches(batch_size, micro_batch_size)
    if vae_decode_chunk < 0:
        raise ConfigError(f"vae_decode_chunk={vae_decode_chunk}: accepted: 0 (all at once) or a positive sample count")
