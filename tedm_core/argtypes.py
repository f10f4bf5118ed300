"""Command-line argument types shared by the faces (``tedm`` and ``scripts/batch_segment.py``).

Every value is checked when it is parsed, so a usage error ends the command with one line and
exit status 2 before anything is loaded or computed. Torch-free: ``--help`` and usage errors
stay instant.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Callable, NoReturn, Optional

from .choices import NUM_TRAIN_TIMESTEPS

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``prog: error: ...``), exit status 2.

    argparse prints the whole usage block before the error; in a log of a batch job that buries
    the one line that says what is wrong. ``--help`` still shows the usage.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


# Counts (steps, batch sizes, slices) above this are typos, and torch overflows on some of them
# (a C long long); seeds within what numpy's and torch's generators both take.
COUNT_MAX = 2**31 - 1


def int_at_least(minimum: int, maximum: Optional[int] = None) -> Callable[[str], int]:
    """An integer type within ``[minimum, maximum]``; a bound of ``COUNT_MAX`` or more is a
    guard against typos, named only to a value beyond it."""

    def parse(text: str) -> int:
        value = _integer(text)
        if value < minimum or (maximum is not None and value > maximum):
            if maximum is not None and maximum < COUNT_MAX:
                bound = f"from {minimum} to {maximum}"
            else:
                bound = f"at least {minimum}" if value < minimum else f"at most {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


positive_int = int_at_least(1, COUNT_MAX)
non_negative_int = int_at_least(0, COUNT_MAX)
seed = int_at_least(0, 2**32 - 1)
timestep = int_at_least(0, NUM_TRAIN_TIMESTEPS - 1)  # the DDPM's noise levels
label_value = int_at_least(0, 65535)  # what a uint16 label file can hold


def float_in(low: float, high: float, low_open: bool = True, high_open: bool = False) -> Callable[[str], float]:
    """A finite float within ``(low, high]`` (by default); NaN and infinities are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if not math.isfinite(value) or below or above:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


positive_float = float_in(0.0, math.inf, high_open=True)
ema_decay = float_in(0.0, 1.0, high_open=True)


def device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether CUDA is there is checked before the work)."""
    value = text.strip().lower()
    if not _DEVICE.match(value):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return value


def shard(text: str) -> str:
    """``K/N`` with 1 <= K <= N."""
    match = re.match(r"^(\d+)/(\d+)$", text.strip())
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise argparse.ArgumentTypeError(f"expected K/N with K from 1 to N (e.g. 1/4), got {text!r}")
    return text.strip()


def flag_of(setting: str) -> str:
    """The CLI spelling of a library setting: ``learning_rate`` -> ``--lr``, ``max_shift`` -> ``--shift``."""
    return _FLAGS.get(setting, "--" + setting.replace("_", "-"))


_FLAGS = {"learning_rate": "--lr", "max_shift": "--shift", "ema_decay": "--ema"}
