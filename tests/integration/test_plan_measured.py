"""Measured check: the optimizer-state partition DeepSpeed holds per rank matches the planner's prediction.

A real 2-rank torchrun on CPU (gloo), a tiny Llama built from a config, ZeRO-2 with the config deepfleet
builds, a couple of steps. On CPU deepfleet trains in fp32, so the prediction is the fp32 layout
(`estimate_model_state_bytes(precision="fp32")`): Adam's momentum and variance (8 bytes per parameter) and
a cloned fp32 master partition (4 bytes per parameter), each split over the 2 ranks. The same file is the
rank program: torchrun runs it as a script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORLD = 2
TOLERANCE = 0.05


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=257, tie_word_embeddings=False)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _adam_bytes(state: dict) -> int:
    return _tensor_bytes(t for per_param in state.values() for key, t in per_param.items()
                         if key in ("exp_avg", "exp_avg_sq"))


def rank_main(out_dir: Path) -> None:
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from deepfleet.plan.deepspeed_config import deepspeed_config_for_run
    from deepfleet.plan.recipe_io import parse_recipe

    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    recipe = parse_recipe("train: {global_batch: 4, micro_batch: 2, lr: 0.001}\ndeepspeed: 2")
    config = deepspeed_config_for_run(recipe, world_size=WORLD, total_steps=2, accelerator="cpu",
                                      bf16_supported=False)
    model = AutoModelForCausalLM.from_config(tiny_config())
    engine, optimizer, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    for _ in range(2):
        ids = torch.randint(0, 257, (2, 16))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    engine.save_checkpoint(str(out_dir / "ckpt"), tag="step2")
    saved = torch.load(out_dir / "ckpt" / "step2" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                       weights_only=False)["optimizer_state_dict"]
    measured = {
        "stage": engine.zero_optimization_stage(),
        "param_bytes": _tensor_bytes(engine.module.parameters()),
        "adam_bytes": _adam_bytes(optimizer.optimizer.state),
        "master_bytes": _tensor_bytes(optimizer.single_partition_of_fp32_groups),
        "checkpoint_adam_bytes": _adam_bytes(saved["base_optimizer_state"]["state"]),
        "checkpoint_master_bytes": _tensor_bytes(saved["single_partition_of_fp32_groups"]),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(measured))


@pytest.mark.integration
def test_optimizer_partition_matches_prediction(tmp_path):
    from deepfleet.plan.memory import estimate_model_state_bytes, model_shape_from_config

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                          f"--nproc-per-node={WORLD}", __file__, str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    predicted = estimate_model_state_bytes(model_shape_from_config(tiny_config()), stage=2, offload="none",
                                           nodes=1, ranks_per_node=WORLD, precision="fp32")
    for rank in range(WORLD):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert measured["stage"] == 2
        for key, prediction in (("param_bytes", predicted.params),   # fp32 weights in full on every rank
                                ("adam_bytes", predicted.optimizer_states),
                                ("checkpoint_adam_bytes", predicted.optimizer_states),
                                ("master_bytes", predicted.master_params),
                                ("checkpoint_master_bytes", predicted.master_params)):
            error = abs(measured[key] - prediction) / prediction
            print(f"rank {rank} {key}: measured {measured[key]} predicted {prediction} ({error:+.2%})")
            assert error <= TOLERANCE, (rank, key, measured[key], prediction)


if __name__ == "__main__":
    rank_main(Path(sys.argv[1]))
