"""The forward (noising) process, through MONAI's ``DDPMScheduler``."""

from __future__ import annotations

from typing import Optional

import torch
from monai.networks.schedulers import DDPMScheduler

from ..choices import NUM_TRAIN_TIMESTEPS
from ..choices import SCHEDULES as SCHEDULE_NAMES
from ..errors import SettingError

# Our schedule names -> MONAI's.
SCHEDULES = {"cosine": "cosine", "linear": "linear_beta"}
assert tuple(SCHEDULES) == SCHEDULE_NAMES


class NoiseSchedule:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, T = 1000, cosine (s = 0.008, betas <= 0.999) or linear."""

    def __init__(self, schedule: str = "cosine", num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {schedule!r}; expected one of {sorted(SCHEDULES)}")
        self.name = schedule
        self.num_train_timesteps = num_train_timesteps
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule=SCHEDULES[schedule])

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        # The scheduler casts its alphas to the sample's dtype: keep them float32 whatever autocast does.
        return self.scheduler.add_noise(x0.float(), noise.float(), timesteps).to(x0.dtype)

    def sample_timesteps(
        self, batch: int, device: torch.device, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (batch,), device=device, generator=generator)

    def validate_timesteps(self, timesteps: list[int] | tuple[int, ...]) -> None:
        bad = [t for t in timesteps if not 0 <= int(t) < self.num_train_timesteps]
        if bad:
            raise SettingError("timesteps", f"{bad} are outside the schedule's [0, {self.num_train_timesteps - 1}]")
