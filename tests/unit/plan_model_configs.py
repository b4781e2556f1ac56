"""Real shapes of public models, written out so tests never touch the Hub (numbers from each model's config.json)."""

from transformers import LlamaConfig, MistralConfig, Qwen2Config


def qwen25_05b() -> Qwen2Config:
    return Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=32768)


def llama32_1b() -> LlamaConfig:
    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)


def mistral_7b() -> MistralConfig:
    return MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)


def llama3_8b() -> LlamaConfig:
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


def llama2_70b() -> LlamaConfig:
    return LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)


# name -> (config factory, parameter count published for the model)
MODELS = {
    "Qwen2.5-0.5B": (qwen25_05b, 494_032_768),
    "Llama-3.2-1B": (llama32_1b, 1_235_814_400),
    "Mistral-7B": (mistral_7b, 7_241_732_096),
    "Llama-3-8B": (llama3_8b, 8_030_261_248),
    "Llama-2-70B": (llama2_70b, 68_976_648_192),
}
