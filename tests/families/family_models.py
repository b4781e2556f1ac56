"""Tiny random-weight Hugging Face models, one per model family, built offline for tests.

Each model dir is what `save_pretrained` writes for a real checkpoint of that family: config.json,
model.safetensors, generation_config.json and a fast tokenizer (tokenizer.json, tokenizer_config.json,
chat_template.jinja). Tokenizers are trained here in milliseconds on a small English corpus, in the
family's style (GPT-2 style byte-level BPE, or SentencePiece-like BPE with byte fallback), with the
family's real special tokens, their usual id layout, and a chat template in the family's format.

`build_all(cache_root())` builds every family once; the cache dir is named by a hash of these sources
and the library versions, so editing this file (or chat_templates.py) rebuilds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

import chat_templates as T

FAMILIES: tuple[str, ...] = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                             "gemma2", "gemma3_text", "phi3", "falcon", "opt", "bloom", "gpt_neox", "gpt2")

BYTE_LEVEL, SENTENCEPIECE = "byte-level", "sentencepiece"
MAX_POSITIONS = 1024


@dataclass(frozen=True, kw_only=True)
class FamilyModel:
    family: str                 # one of FAMILIES; equals config.model_type
    model_dir: Path             # save_pretrained dir: config, weights, generation config, tokenizer files
    bos_token: str | None       # what the chat template writes first, if any
    eos_token: str              # tokenizer.eos_token
    end_of_turn: str            # the token string that closes an assistant turn (may equal eos)
    has_pad_token: bool
    generation_markers: bool    # template uses {% generation %} ... {% endgeneration %}
    style: str                  # "byte-level" or "sentencepiece"


# ---------------------------------------------------------------------------------------------
# Per-family specs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class _Spec:
    config: Callable[..., transformers.PretrainedConfig]  # called with vocab_size and token ids
    style: str
    template: str
    eos: str
    bos: str | None = None          # tokenizer.bos_token
    pad: str | None = None
    unk: str | None = None
    end_of_turn: str | None = None  # None: the eos closes assistant turns
    leading: tuple[str, ...] = ()   # special tokens at ids 0.. (before the bytes / the trained vocab)
    trailing: tuple[str, ...] = ()  # special tokens appended after the trained vocab
    adds_bos: bool = False          # the tokenizer prepends BOS itself, like the real one
    template_bos: bool = False      # the chat template writes BOS first
    markers: bool = False
    vocab_multiple: int = 1         # embedding rows rounded up to a multiple of this
    split_regex: str | None = None  # byte-level: the family's pre-tokenizer regex (None: GPT-2's)


def _cfg(cls: type, **kwargs) -> Callable[..., transformers.PretrainedConfig]:
    return functools.partial(cls, **kwargs)


_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=MAX_POSITIONS)
_GQA = dict(_SMALL, num_key_value_heads=2)
_GEMMA = dict(_SMALL, hidden_size=32, head_dim=16, query_pre_attn_scalar=16)


def _rope(theta: float, **extra) -> dict:
    return {"rope_type": "default", "rope_theta": theta, **extra}


# Pre-tokenizer regexes of the real tokenizer.json files (GPT-2's is ByteLevel's built-in one).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2: digits one by one
_LLAMA2_SPECIALS = ("<unk>", "<s>", "</s>")
_MISTRAL_TOKENS = dict(style=SENTENCEPIECE, bos="<s>", eos="</s>", unk="<unk>",
                       leading=(*_LLAMA2_SPECIALS, "[INST]", "[/INST]"), adds_bos=True, template_bos=True)
_QWEN_TOKENS = dict(style=BYTE_LEVEL, eos="<|im_end|>", pad="<|endoftext|>",
                    trailing=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), vocab_multiple=64,
                    split_regex=_QWEN_SPLIT)
_GEMMA_TOKENS = dict(style=SENTENCEPIECE, bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>",
                     end_of_turn="<end_of_turn>", adds_bos=True, template_bos=True,
                     leading=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"))
_INSTRUCTION = dict(style=BYTE_LEVEL, template=T.INSTRUCTION)
_FALCON_SPECIALS = (">>TITLE<<", ">>ABSTRACT<<", ">>INTRODUCTION<<", ">>SUMMARY<<", ">>COMMENT<<", ">>ANSWER<<",
                    ">>QUESTION<<", ">>DOMAIN<<", ">>PREFIX<<", ">>SUFFIX<<", ">>MIDDLE<<", "<|endoftext|>")

SPECS: dict[str, _Spec] = {
    "llama": _Spec(
        config=_cfg(transformers.LlamaConfig, **_GQA, tie_word_embeddings=False, rope_parameters=_rope(500000.0)),
        style=BYTE_LEVEL, template=T.LLAMA3, bos="<|begin_of_text|>", eos="<|end_of_text|>", end_of_turn="<|eot_id|>",
        trailing=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        adds_bos=True, template_bos=True, vocab_multiple=16, split_regex=_LLAMA3_SPLIT),
    "mistral": _Spec(config=_cfg(transformers.MistralConfig, **_GQA, sliding_window=16),
                     template=T.MISTRAL, **_MISTRAL_TOKENS),
    "mixtral": _Spec(config=_cfg(transformers.MixtralConfig, **_GQA, num_local_experts=4, num_experts_per_tok=2,
                                 router_aux_loss_coef=0.02, sliding_window=None),
                     template=T.MIXTRAL, markers=True, **_MISTRAL_TOKENS),
    "qwen2": _Spec(config=_cfg(transformers.Qwen2Config, **_GQA, tie_word_embeddings=True, rope_parameters=_rope(1e6)),
                   template=T.QWEN2, **_QWEN_TOKENS),
    "qwen2_moe": _Spec(config=_cfg(transformers.Qwen2MoeConfig, **_GQA, num_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                   router_aux_loss_coef=0.001, decoder_sparse_step=1, mlp_only_layers=[]),
                       template=T.QWEN2_MOE, markers=True, **_QWEN_TOKENS),
    "qwen3": _Spec(config=_cfg(transformers.Qwen3Config, **dict(_GQA, hidden_size=32), head_dim=16,
                               tie_word_embeddings=True, rope_parameters=_rope(1e6)),
                   template=T.QWEN3, **_QWEN_TOKENS),
    "qwen3_moe": _Spec(config=_cfg(transformers.Qwen3MoeConfig, **dict(_GQA, hidden_size=32), head_dim=16,
                                   num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                   router_aux_loss_coef=0.001, decoder_sparse_step=1, mlp_only_layers=[],
                                   tie_word_embeddings=False, rope_parameters=_rope(1e6)),
                       template=T.QWEN3, **_QWEN_TOKENS),
    "gemma": _Spec(config=_cfg(transformers.GemmaConfig, **_GEMMA, num_key_value_heads=1),
                   template=T.GEMMA, **_GEMMA_TOKENS),
    "gemma2": _Spec(config=_cfg(transformers.Gemma2Config, **_GEMMA, num_key_value_heads=2, sliding_window=16,
                                attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                layer_types=["sliding_attention", "full_attention"]),
                    template=T.GEMMA, **_GEMMA_TOKENS),
    "gemma3_text": _Spec(config=_cfg(transformers.Gemma3TextConfig, **_GEMMA, num_key_value_heads=2, sliding_window=16,
                                     layer_types=["sliding_attention", "full_attention"]),
                         template=T.GEMMA3, markers=True, vocab_multiple=64, **_GEMMA_TOKENS),
    "phi3": _Spec(config=_cfg(transformers.Phi3Config, **_GQA, original_max_position_embeddings=MAX_POSITIONS),
                  style=SENTENCEPIECE, template=T.PHI3, bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<unk>",
                  end_of_turn="<|end|>", leading=_LLAMA2_SPECIALS,
                  trailing=("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
                  adds_bos=True, template_bos=True, vocab_multiple=64),
    "falcon": _Spec(config=_cfg(transformers.FalconConfig, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                new_decoder_architecture=True, num_kv_heads=2, alibi=False, bias=False,
                                max_position_embeddings=MAX_POSITIONS),
                    style=BYTE_LEVEL, template=T.FALCON, eos="<|endoftext|>", leading=_FALCON_SPECIALS),
    "opt": _Spec(config=_cfg(transformers.OPTConfig, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                             num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=MAX_POSITIONS,
                             dropout=0.0),
                 bos="</s>", eos="</s>", pad="<pad>", unk="<unk>", leading=("<s>", "<pad>", "</s>", "<unk>"),
                 adds_bos=True, vocab_multiple=8, **_INSTRUCTION),
    "bloom": _Spec(config=_cfg(transformers.BloomConfig, hidden_size=64, n_layer=2, n_head=4),  # ALiBi: no positions
                   bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", leading=("<unk>", "<s>", "</s>", "<pad>"),
                   vocab_multiple=64, **_INSTRUCTION),
    "gpt_neox": _Spec(config=_cfg(transformers.GPTNeoXConfig, **_SMALL, use_parallel_residual=True,
                                  rope_parameters=_rope(10000.0, partial_rotary_factor=0.25)),
                      bos="<|endoftext|>", eos="<|endoftext|>", leading=("<|endoftext|>", "<|padding|>"),
                      vocab_multiple=64, **_INSTRUCTION),
    "gpt2": _Spec(config=_cfg(transformers.GPT2Config, n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS,
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                  style=BYTE_LEVEL, template=T.INSTRUCTION_MARKED, markers=True, bos="<|endoftext|>",
                  eos="<|endoftext|>", trailing=("<|endoftext|>",)),
}
assert tuple(SPECS) == FAMILIES


# ---------------------------------------------------------------------------------------------
# Tokenizers: one BPE training per style, then per-family vocab layout, specials and processors
# ---------------------------------------------------------------------------------------------

_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "And of Italy? Rome is the capital of Italy, and Madrid is the capital of Spain.",
    "You are a helpful assistant. Answer the question in one short sentence.",
    "Please write a short poem about the sea, the sun and the wind.",
    "The model reads a question and writes an answer; the answer should be correct.",
    "How many days are there in a week? There are seven days in a week.",
    "Add two numbers: 12 plus 30 is 42, and 7 times 6 is also 42.",
    "She said that the weather would be warm and sunny for the rest of the week.",
    "Training a language model needs data, a tokenizer, an optimizer and some patience.",
    "Translate to French: good morning means bonjour, thank you means merci.",
    "Summarize the text below in three words: small models learn quickly.",
    "The user asks and the assistant answers; the system message sets the rules.",
    "Water boils at 100 degrees and freezes at 0 degrees at sea level.",
    "List the colors of the rainbow: red, orange, yellow, green, blue, indigo and violet.",
    "My name is Falcon and I am a language model that was trained to help people.",
    "Sort these words: apple, banana, cherry. Then count the letters in each word.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
)
_ROLES = ("### System:\n", "### User:\n", "### Assistant:\n", "System: ", "User: ", "Falcon: ",
          "system\n", "user\n", "assistant\n", "model\n")
CORPUS: tuple[str, ...] = _SENTENCES * 4 + tuple(role + s for role in _ROLES for s in _SENTENCES[:6])
_BYTE_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))


@functools.cache
def _base_bpe(style: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(pieces in id order, merges) of a BPE trained once per style on CORPUS, no special tokens."""
    if style == BYTE_LEVEL:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        corpus = CORPUS
    else:  # SentencePiece-like: words start with "▁"; newlines and non-ASCII fall back to <0xNN> bytes
        backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False)
        corpus = tuple(text.replace("\n", " ") for text in CORPUS)
    backend.train_from_iterator(corpus, trainer)
    model = json.loads(backend.to_str())["model"]
    pieces = tuple(sorted(model["vocab"], key=model["vocab"].__getitem__))
    return pieces, tuple(tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"])


def _backend_tokenizer(spec: _Spec) -> Tokenizer:
    pieces, merges = _base_bpe(spec.style)
    vocab: dict[str, int] = {}
    body = (_BYTE_TOKENS if spec.style == SENTENCEPIECE else ()) + pieces
    for token in (*spec.leading, *body, *spec.trailing):
        vocab.setdefault(token, len(vocab))
    if spec.style == BYTE_LEVEL:
        backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
        backend.pre_tokenizer = _byte_level_pre_tokenizer(spec.split_regex)
        if spec.split_regex == _QWEN_SPLIT:
            backend.normalizer = normalizers.NFC()
        backend.decoder = decoders.ByteLevel()
        byte_level = processors.ByteLevel(trim_offsets=False)
        backend.post_processor = processors.Sequence([byte_level, _bos_processor(spec, vocab)]) if spec.adds_bos \
            else byte_level
    else:
        backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token=spec.unk, byte_fallback=True,
                                       fuse_unk=True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        # Like Llama 2's Replace("▁", " ") / ByteFallback / Fuse / Strip: Metaspace works per token, so it goes first.
        backend.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False),
                                             decoders.ByteFallback(), decoders.Fuse()])
        if spec.adds_bos:
            backend.post_processor = _bos_processor(spec, vocab)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*spec.leading, *spec.trailing)])
    return backend


def _byte_level_pre_tokenizer(split_regex: str | None) -> pre_tokenizers.PreTokenizer:
    if split_regex is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(tokenizers.Regex(split_regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _bos_processor(spec: _Spec, vocab: dict[str, int]) -> processors.TemplateProcessing:
    bos = spec.bos
    return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                         special_tokens=[(bos, vocab[bos])])


def build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    spec = SPECS[family]
    # BOS is prepended by tokenizer.json's post-processor only (as in Llama 3's files), not through an
    # `add_bos_token` kwarg: transformers does not save that kwarg, so a reload would report it differently.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_backend_tokenizer(spec), bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad,
        unk_token=spec.unk, model_max_length=MAX_POSITIONS, clean_up_tokenization_spaces=False)
    tokenizer.chat_template = spec.template
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str | None) -> int | None:
    return None if token is None else tokenizer.convert_tokens_to_ids(token)


def build_model(family: str, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    spec = SPECS[family]
    bos, eos, pad = (_token_id(tokenizer, t) for t in (spec.bos, spec.eos, spec.pad))
    end_of_turn = _token_id(tokenizer, spec.end_of_turn or spec.eos)
    config = spec.config(vocab_size=_round_up(len(tokenizer), spec.vocab_multiple),
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    assert config.model_type == family, (config.model_type, family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=bos, pad_token_id=pad, eos_token_id=eos if end_of_turn == eos else [eos, end_of_turn])
    return model


def family_model(family: str, model_dir: Path) -> FamilyModel:
    spec = SPECS[family]
    return FamilyModel(family=family, model_dir=model_dir, bos_token=spec.bos if spec.template_bos else None,
                       eos_token=spec.eos, end_of_turn=spec.end_of_turn or spec.eos, has_pad_token=spec.pad is not None,
                       generation_markers=spec.markers, style=spec.style)


def build_family_model(family: str, root: Path) -> FamilyModel:
    """Build `family` into root/family (tmp dir + rename, so a present dir is complete); reuse it if present."""
    root = Path(root)
    target = root / family
    result = family_model(family, target)
    if target.is_dir():
        return result
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is readable like any other
    try:
        tokenizer = build_tokenizer(family)
        build_model(family, tokenizer).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "family.json").write_text(json.dumps({**asdict(result), "model_dir": None}, indent=1) + "\n")
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # a concurrent builder that won the rename is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def build_all(root: Path) -> dict[str, FamilyModel]:
    return {family: build_family_model(family, root) for family in FAMILIES}


def cache_root() -> Path:
    """$DEEPFLEET_TEST_CACHE (or ~/.cache/deepfleet-tests)/families-<hash of sources and library versions>."""
    base = os.environ.get("DEEPFLEET_TEST_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                           "deepfleet-tests")
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for source in (here / "family_models.py", here / "chat_templates.py"):
        digest.update(source.read_bytes())
    digest.update(f"{transformers.__version__} {tokenizers.__version__} {torch.__version__}".encode())
    return Path(base) / f"families-{digest.hexdigest()[:12]}"
