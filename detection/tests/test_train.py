"""Training script: continuing a saved model (``--init``), its record's stages and totals, early stops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qcore_detection.model import load_model
from qcore_detection.train import train

# the classic world on its default grid with a very small network: a step takes well under a second on CPU
SMALL = {"channels": (4, 4, 4, 4, 4, 4), "bev_channels": 4, "blocks": 1}


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage1")
    train(out, scenes=2, epochs=1, device="cpu", batch_size=2, seed=0, val_scenes=1, model_overrides=SMALL,
          command="stage 1")
    return out


def test_continuing_starts_from_the_saved_weights_and_records_every_stage(first_stage: Path, tmp_path: Path) -> None:
    # lr 0: AdamW leaves the parameters where they were, so the continued model must equal the saved one
    rec = train(tmp_path, scenes=2, epochs=1, device="cpu", batch_size=2, seed=0, val_scenes=1, lr=0.0,
                command="stage 2", init=first_stage, first_scene=2, pct_start=0.1)
    before, after = load_model(first_stage / "model.safetensors"), load_model(tmp_path / "model.safetensors")
    assert after.cfg == before.cfg
    for (name, p0), (_, p1) in zip(before.named_parameters(), after.named_parameters(), strict=True):
        assert torch.equal(p0, p1), name
    saved = json.loads((tmp_path / "model.json").read_text())
    assert saved == json.loads(json.dumps(rec))
    stage1 = json.loads((first_stage / "model.json").read_text())
    assert [s["command"] for s in rec["previous_stages"]] == ["stage 1"]
    assert rec["previous_stages"][0]["val_mAP"] == stage1["val"]["mAP"]
    assert rec["total"]["stages"] == 2 and rec["total"]["epochs"] == 2.0 and rec["total"]["scenes_seen"] == 4
    assert rec["total"]["train_seconds"] == pytest.approx(stage1["train_seconds"] + rec["train_seconds"], abs=0.2)
    assert rec["cpu_seconds"] > 0 and rec["train_seconds"] <= rec["wall_seconds"]
    assert rec["recipe"]["pct_start"] == 0.1 and "scenes 2..3" in rec["data"]["train"]
    # a third stage keeps both earlier ones, in order; a target mAP reached at a mid-epoch evaluation stops it there
    third = train(tmp_path / "3", scenes=6, epochs=2, device="cpu", batch_size=2, seed=0, val_scenes=1, lr=1e-4,
                  command="stage 3", init=tmp_path / "model.safetensors", eval_every=1, target_map=0.0)
    assert [s["command"] for s in third["previous_stages"]] == ["stage 1", "stage 2"]
    assert third["total"]["stages"] == 3 and third["total"]["scenes_seen"] == 6
    assert third["steps_done"] == 1 and len(third["history"]) == 1 and third["history"][0]["step"] == 1
    assert third["stopped"].startswith("val mAP") and "step 1 of epoch 1" in third["stopped"]
    assert json.loads((tmp_path / "3" / "model.json").read_text())["stopped"] == third["stopped"]


def test_init_refuses_another_world_and_config_overrides(first_stage: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--world classic"):
        train(tmp_path, scenes=2, epochs=1, device="cpu", batch_size=2, seed=0, val_scenes=1, init=first_stage,
              world="nuscenes")
    with pytest.raises(ValueError, match="drop --channels"):
        train(tmp_path, scenes=2, epochs=1, device="cpu", batch_size=2, seed=0, val_scenes=1, init=first_stage,
              model_overrides=SMALL)


def test_time_budget_and_end_of_epoch_target_stop_training(first_stage: Path, tmp_path: Path) -> None:
    """``should_stop``'s other rules: a spent time budget stops inside an epoch (the model is evaluated and saved
    there, the record says why); a target reached at an epoch's end stops before the next epoch."""
    rec = train(tmp_path / "budget", scenes=4, epochs=2, device="cpu", batch_size=2, seed=0, val_scenes=1,
                lr=1e-4, init=first_stage, time_budget_min=0.0)
    assert rec["steps_done"] == 1 and [h["step"] for h in rec["history"]] == [1]
    assert rec["stopped"].startswith("time budget of 0 min: stopped at step 1 of 2 in epoch 1")
    assert json.loads((tmp_path / "budget" / "model.json").read_text())["stopped"] == rec["stopped"]
    rec = train(tmp_path / "target", scenes=2, epochs=2, device="cpu", batch_size=2, seed=0, val_scenes=1,
                lr=1e-4, init=first_stage, target_map=0.0)
    assert rec["steps_done"] == 1 and rec["epochs_done"] == 0.5 * 2 and len(rec["history"]) == 1
    assert rec["stopped"] == f"val mAP {rec['val']['mAP']:.2f} reached the target 0 at step 1 of epoch 1"
