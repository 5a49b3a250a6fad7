"""Training with a windowed encoder: a full-history checkpoint resumed under a window (allowed and
logged), pinned sink keys through backward, the window recorded in every checkpoint."""

import json
import logging

import torch

from scd_train.config import load_config
from scd_train.trainer import Trainer

SMALL = ["model.width=64", "model.num_heads=2", "model.head_dim=32", "model.rope_axes=[8,12,12]",
         "model.encoder_layers=1", "model.decoder_layers=1", "model.layers=2", "model.attention=sdpa",
         "data.synthetic.num_videos=16", "data.synthetic.frames_per_video=8", "data.clip_frames=5",
         "data.batch_size=2", "log.every=1", "log.progress_bar=false", "log.wandb=disabled",
         "optim.warmup_steps=0", "train.checkpoint_every=2"]


def test_full_history_checkpoint_resumes_under_a_window_and_says_so(tmp_path, caplog):
    run = tmp_path / "run"
    first = Trainer(load_config("configs/tiny.yaml", [*SMALL, f"train.run_dir={run}", "train.steps=2"]))
    first.run()
    windowed = [*SMALL, f"train.run_dir={run}", "train.steps=4", "model.encoder_window=2",
                "model.encoder_sink_frames=1"]
    with caplog.at_level(logging.WARNING, logger="scd_train"):
        trainer = Trainer(load_config("configs/tiny.yaml", windowed))
    assert trainer.state.step == 2
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "trained with model.encoder_window=None, model.encoder_sink_frames=0" in message
    assert "continues with model.encoder_window=2, model.encoder_sink_frames=1" in message
    # clips of 5 frames > sinks + window = 3: the pinned sink copies take part in backward
    result = trainer.run()
    assert result.step == 4 and all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
    state = json.loads((run / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["attention_window"] == {"encoder_window": 2, "encoder_sink_frames": 1}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scd_train"):
        Trainer(load_config("configs/tiny.yaml", [*windowed[:-3], "train.steps=6", *windowed[-2:]]))
    assert "attention pattern changes" not in " ".join(r.getMessage() for r in caplog.records)
