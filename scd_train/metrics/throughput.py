"""Throughput over a logging window: samples/s, latent frames/s, tokens/s, TFLOP/s, MFU, data wait.

Definitions (per rank unless noted): a sample is one clip; latent frames = clips x frames;
TFLOP/s uses the analytic counts in ``flops.py``; MFU = achieved / peak dense bf16 of the device;
data wait = share of wall time spent waiting for the next batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from scd_train.metrics.flops import StepFlops


@dataclass
class ThroughputMeter:
    world_size: int
    tokens_per_frame: int
    peak_tflops: float | None
    _start: float = field(default_factory=time.perf_counter)
    _steps: int = 0
    _clips: int = 0
    _frames: int = 0
    _data_wait: float = 0.0
    _encoder_flops: float = 0.0
    _decoder_flops: float = 0.0

    def add_step(self, clips: int, frames_per_clip: int, flops: StepFlops, data_wait: float) -> None:
        self._steps += 1
        self._clips += clips
        self._frames += clips * frames_per_clip
        self._data_wait += data_wait
        self._encoder_flops += flops.encoder
        self._decoder_flops += flops.decoder

    def window(self) -> dict[str, float]:
        """Rates since the last call; resets the window."""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        enc_tflops = self._encoder_flops / elapsed / 1e12
        dec_tflops = self._decoder_flops / elapsed / 1e12
        out = {
            "perf/step_seconds": elapsed / max(self._steps, 1),
            "perf/samples_per_s": self._clips / elapsed,
            "perf/samples_per_s_global": self._clips * self.world_size / elapsed,
            "perf/latent_frames_per_s": self._frames / elapsed,
            "perf/tokens_per_s": self._frames * self.tokens_per_frame / elapsed,
            "perf/tflops": enc_tflops + dec_tflops,
            "perf/tflops_encoder": enc_tflops,
            "perf/tflops_decoder": dec_tflops,
            "perf/data_wait_share": self._data_wait / elapsed,
        }
        if self.peak_tflops:
            out["perf/mfu"] = (enc_tflops + dec_tflops) / self.peak_tflops
            out["perf/mfu_encoder"] = enc_tflops / self.peak_tflops
            out["perf/mfu_decoder"] = dec_tflops / self.peak_tflops
        self.reset()
        return out

    def reset(self) -> None:
        self._start = time.perf_counter()
        self._steps = self._clips = self._frames = 0
        self._data_wait = self._encoder_flops = self._decoder_flops = 0.0
