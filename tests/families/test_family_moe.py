"""MoE families: training adds the router load-balancing loss with the model's own coefficient."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from deepfleet.train.families import FAMILIES

MOE_FAMILIES = [name for name, family in FAMILIES.items() if family.is_moe]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_training_loss_is_lm_loss_plus_coefficient_times_router_loss(family_models, family):
    model = AutoModelForCausalLM.from_pretrained(family_models[family].model_dir).train()
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_router = model(input_ids=ids, labels=ids, use_cache=False, output_router_logits=True)
        plain = model(input_ids=ids, labels=ids, use_cache=False, output_router_logits=False)
    coefficient = model.config.router_aux_loss_coef
    assert coefficient > 0 and with_router.aux_loss > 0
    torch.testing.assert_close(with_router.loss, plain.loss + coefficient * with_router.aux_loss)


def test_every_moe_family_names_its_block_class(family_models):
    for family in MOE_FAMILIES:
        model = AutoModelForCausalLM.from_pretrained(family_models[family].model_dir)
        blocks = [m for m in model.modules() if type(m).__name__ == FAMILIES[family].moe_block]
        assert len(blocks) == model.config.num_hidden_layers, family
