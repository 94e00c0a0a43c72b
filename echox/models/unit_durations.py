"""What the unit vocoders share: deduplicated units, their durations, and `synthesize`.

Both vocoders (`UnitVocoder`, the released HiFi-GAN layout, and `IstftVocoder`, the tiny
recipe's) read deduplicated units through a unit table, predict each unit's frames with
fairseq's duration predictor, and speak the units repeated to the frame rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DurationPredictor(nn.Module):
    """fairseq's VariancePredictor: two conv+ReLU+LayerNorm+dropout blocks, then a linear head.

    Predicts log(1 + duration) per deduplicated unit. An optional mask zeroes padded positions
    before each conv so a padded batch predicts what each sequence would predict alone.
    """

    def __init__(self, in_dim: int, hidden_dim: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        pad = (kernel_size - 1) // 2  # fairseq hard-codes conv2 padding=1: the same for k=3
        self.conv1 = nn.Sequential(nn.Conv1d(in_dim, hidden_dim, kernel_size, padding=pad), nn.ReLU())
        self.ln1 = nn.LayerNorm(hidden_dim)
        self.conv2 = nn.Sequential(nn.Conv1d(hidden_dim, hidden_dim, kernel_size, padding=pad), nn.ReLU())
        self.ln2 = nn.LayerNorm(hidden_dim)
        self.proj = nn.Linear(hidden_dim, 1)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, C] (+ bool mask [B, N], True = real) → log-durations [B, N]."""
        keep = None if mask is None else mask.unsqueeze(-1).to(x.dtype)
        for conv, norm in ((self.conv1, self.ln1), (self.conv2, self.ln2)):
            if keep is not None:
                x = x * keep
            x = conv(x.transpose(1, 2)).transpose(1, 2)
            x = F.dropout(norm(x), self.dropout, self.training)
        out: torch.Tensor = self.proj(x).squeeze(-1)
        return out


class DurationUnitVocoder(nn.Module):
    """Base of the unit vocoders. A subclass builds `unit_embed` and `dur_predictor` and turns
    frame-rate units into audio in `waveform`; durations, their loss and `synthesize` live here."""

    unit_embed: nn.Embedding
    dur_predictor: DurationPredictor

    @property
    def device(self) -> torch.device:
        return self.unit_embed.weight.device

    @property
    def num_units(self) -> int:
        return self.unit_embed.num_embeddings

    def waveform(self, units: torch.Tensor) -> torch.Tensor:
        """Units at the frame rate, LongTensor [B, T] → waveform [B, samples]."""
        raise NotImplementedError

    def log_durations(self, dedup_units: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Raw duration-predictor output log(1 + d) per deduplicated unit, [B, N]."""
        return self.dur_predictor(self.unit_embed(dedup_units), mask)  # type: ignore[no-any-return]

    def predict_durations(self, dedup_units: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Frames per deduplicated unit [B, N] → LongTensor [B, N], >= 1 (0 at padding).

        Rounds like fairseq: clamp(round(exp(log_d) - 1), min=1). `lengths` [B] marks padding.
        """
        mask = None
        if lengths is not None:
            positions = torch.arange(dedup_units.shape[1], device=dedup_units.device)
            mask = positions.unsqueeze(0) < lengths.to(dedup_units.device).unsqueeze(1)
        log_dur = self.log_durations(dedup_units, mask)
        durations = torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1)
        return durations if mask is None else durations.masked_fill(~mask, 0)

    def duration_loss(self, dedup_units: torch.Tensor, target_durations: torch.Tensor) -> torch.Tensor:
        """MSE between predicted log-durations and log(1 + target), over real units.

        Padding is marked by target duration 0 (every real unit lasts >= 1 frame).
        """
        mask = target_durations > 0
        if not bool(mask.any()):
            raise ValueError("duration_loss: every target duration is padding (0)")
        log_dur = self.log_durations(dedup_units, mask)
        target = torch.log1p(target_durations.to(log_dur.dtype))
        return F.mse_loss(log_dur[mask], target[mask])

    @torch.no_grad()
    def synthesize(
        self, dedup_units: torch.Tensor | Sequence[int], durations: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One utterance of deduplicated units [N] → float32 waveform [samples] on the CPU.

        Uses predicted durations when `durations` is None. Runs in eval mode (no dropout)
        and restores the previous mode afterwards.
        """
        units = self._check_units(dedup_units)
        was_training = self.training
        self.eval()
        try:
            if durations is None:
                frames = self.predict_durations(units.unsqueeze(0))[0]
            else:
                frames = self._check_durations(durations, units.shape[0])
            audio = self.waveform(torch.repeat_interleave(units, frames).unsqueeze(0))[0]
        finally:
            self.train(was_training)
        return audio.float().cpu().contiguous()

    def _check_units(self, dedup_units: torch.Tensor | Sequence[int]) -> torch.Tensor:
        units = torch.as_tensor(dedup_units)
        if units.ndim != 1:
            raise ValueError(f"synthesize: expected a 1-D sequence of unit ids, got shape {tuple(units.shape)}")
        if units.numel() == 0:
            raise ValueError("synthesize: the unit sequence is empty; there is nothing to speak")
        if units.is_floating_point() or units.is_complex() or units.dtype == torch.bool:
            raise ValueError(f"synthesize: unit ids must be integers, got {units.dtype}")
        low, high = int(units.min()), int(units.max())
        if low < 0 or high >= self.num_units:
            raise ValueError(f"synthesize: unit ids must be in [0, {self.num_units}), got range [{low}, {high}]")
        return units.long().to(self.device)

    def _check_durations(self, durations: torch.Tensor, num_units: int) -> torch.Tensor:
        frames = torch.as_tensor(durations)
        if frames.shape != (num_units,):
            raise ValueError(f"synthesize: durations shape {tuple(frames.shape)} != units shape ({num_units},)")
        if frames.is_floating_point() or int(frames.min()) < 1:
            raise ValueError("synthesize: durations must be integers >= 1")
        return frames.long().to(self.device)
