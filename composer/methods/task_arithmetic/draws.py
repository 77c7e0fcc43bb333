"""Random draws for DARE and DELLA from a counter-based stream: splitmix64 (Steele, Lea & Flood 2014)
of the word index and a 64-bit key drawn per model and tensor (`stream_key`), four 16-bit draws per
word, computed with int64 tensor operations on the tensor's device. Any chunk computes its own draws
from its position, so chunked and whole-tensor paths, and CPU and GPU, draw the same masks.
"""

from __future__ import annotations

import math

import torch

LEVELS = 1 << 16  # keep probabilities are resolved to 1/65536


def signed_int64(value: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


# splitmix64 (Steele, Lea & Flood 2014): the word at index w of the stream of key s is the
# finaliser applied to s + (w + 1) * golden-ratio increment, so any word is computed on its own.
_GOLDEN = signed_int64(0x9E3779B97F4A7C15)
_MIXERS = ((30, signed_int64(0xBF58476D1CE4E5B9)), (27, signed_int64(0x94D049BB133111EB)), (31, None))


def stream_key(generator: torch.Generator | int | None) -> int:
    """The 64-bit key of one random stream (one model's draws for one tensor): drawn from
    `generator` (a torch.Generator, one draw), or from a generator seeded with an int (0 for None)."""
    if not isinstance(generator, torch.Generator):
        generator = make_generator(0 if generator is None else generator)
    word = torch.empty(1, dtype=torch.int64, device=generator.device)
    return int(word.random_(-(1 << 63), None, generator=generator))


def random_words(key: int, first: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Words first .. first + count - 1 of the splitmix64 stream of `key`, as int64, computed with
    int64 tensor operations on `device` (the same bits on every device; torch's >> on int64 is
    arithmetic, so the logical shifts mask off the copied sign bits)."""
    words = torch.arange(first + 1, first + count + 1, dtype=torch.int64, device=device)
    words.mul_(_GOLDEN).add_(signed_int64(key))
    shifted = torch.empty_like(words)
    for shift, multiplier in _MIXERS:
        torch.bitwise_right_shift(words, shift, out=shifted)
        words.bitwise_xor_(shifted.bitwise_and_((1 << (64 - shift)) - 1))
        if multiplier is not None:
            words.mul_(multiplier)
    return words


def random_levels(shape, key: int, device: torch.device | str = "cpu", offset: int = 0) -> torch.Tensor:
    """Uniform integers in [-32768, 32768) (int16) of `shape`, for the flat positions offset,
    offset + 1, .. of the stream of `key`: position p is 16-bit lane p % 4 of word p // 4, so a
    tensor drawn chunk by chunk (each chunk with its own offset) gets the same levels as drawn
    whole. u < round(p * 65536) - 32768 holds with probability p to within 1/65536 (`level_of`)."""
    count = math.prod(shape) if isinstance(shape, (tuple, list, torch.Size)) else int(shape)
    first, lane = divmod(offset, 4)
    words = random_words(key, first, (lane + count + 3) // 4, device)
    levels = words.view(torch.int16)[lane : lane + count]
    return levels.reshape(shape) if isinstance(shape, (tuple, list, torch.Size)) else levels


def level_of(probability: float) -> int:
    """The int16 threshold for `random_levels` that is passed with `probability` (clamped to [0, 1])."""
    return min(max(round(probability * LEVELS), 0), LEVELS) - LEVELS // 2


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` (by default the CPU, whose draws are then moved to the tensors, so a
    merge draws the same masks on every device) seeded with `seed` (reduced to 64 bits)."""
    return torch.Generator(device=device).manual_seed(int(seed) % (1 << 64))
