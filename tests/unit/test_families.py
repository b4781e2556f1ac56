"""The family table's decisions, as pure functions: which attention each family gets on CPU and GPU,
what packed rows need with it, and the one-line refusals."""

import pytest
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig, PretrainedConfig

from deepfleet.errors import DeepfleetError
from deepfleet.train.families import FAMILIES, PER_SEQUENCE, check_packing, choose_attention, family_of


def choice(model_type, *, device="cpu", packed=True, flash=False, requested="auto"):
    return choose_attention(FAMILIES[model_type], requested=requested, device_type=device, packed_rows=packed,
                            flash_available=flash)


def test_cpu_packed_rows_use_the_per_sequence_kernel_where_the_family_passes_position_ids():
    assert choice("llama").implementation == PER_SEQUENCE
    assert choice("gemma2").implementation == PER_SEQUENCE     # soft-capping, done inside the kernel
    assert choice("opt").implementation == PER_SEQUENCE and choice("opt").block_mask is None
    assert choice("falcon").implementation == "sdpa"           # no custom kernels in Falcon


def test_gpu_packed_rows_use_flash_with_flattened_rows_else_sdpa_never_the_python_loop():
    for model_type, family in FAMILIES.items():
        for flash in (False, True):
            picked = choice(model_type, device="cuda", flash=flash)
            assert picked.implementation != PER_SEQUENCE, model_type
            assert picked.flatten_rows == (picked.implementation == "flash_attention_2")
            if flash and family.flash:
                assert picked.implementation == "flash_attention_2"
    assert choice("llama", device="cuda").implementation == "sdpa"
    assert choice("gemma2", device="cuda").implementation == "eager"
    assert choice("opt", device="cuda").block_mask == "bool"
    assert choice("opt", device="cuda", flash=True).block_mask is None


def test_unpacked_and_generation_use_the_family_default():
    assert choice("llama", packed=False).implementation == "sdpa"
    assert choice("gemma2", packed=False).implementation == "eager"
    assert choice("bloom", packed=False).implementation == "eager"
    assert choice("opt", packed=False).block_mask is None


def test_requested_attention_is_checked_against_the_family():
    assert choice("opt", requested="eager").block_mask == "additive"
    with pytest.raises(DeepfleetError, match="Gemma 2 has no verified sdpa attention"):
        choice("gemma2", requested="sdpa")
    with pytest.raises(DeepfleetError, match="needs a CUDA GPU and the flash-attn package"):
        choice("llama", requested="flash_attention_2")
    with pytest.raises(DeepfleetError, match="Falcon has no verified flash_attention_2 attention for packed rows"):
        choice("falcon", requested="flash_attention_2", device="cuda", flash=True)


def test_bloom_packing_is_refused_in_one_line():
    check_packing(FAMILIES["bloom"], packing=False)
    with pytest.raises(DeepfleetError) as info:
        check_packing(FAMILIES["bloom"], packing=True)
    line = info.value.render()
    assert "BLOOM" in line and "data.packing: false" in line and "\n" not in line


def test_unknown_architectures_and_unrequested_remote_code_are_refused():
    with pytest.raises(DeepfleetError, match="model type 'mamba' .* is not a family deepfleet has proven") as info:
        family_of(PretrainedConfig(model_type="mamba"), model_name="m", trust_remote_code=False)
    assert "llama" in info.value.render()
    remote = LlamaConfig()
    remote.auto_map = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    with pytest.raises(DeepfleetError, match="ships its own modeling code") as info:
        family_of(remote, model_name="m", trust_remote_code=False)
    assert "trust_remote_code: true" in info.value.render()
    assert family_of(remote, model_name="m", trust_remote_code=True).model_type == "llama"


def test_family_flags_agree_with_transformers_classes():
    for model_type, family in FAMILIES.items():
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        import transformers
        model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        assert family.sdpa == model_class._supports_sdpa, model_type
        assert not family.flash or model_class._supports_flash_attn, model_type
        assert not family.per_sequence or model_class._supports_attention_backend, model_type
