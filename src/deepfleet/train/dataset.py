"""Training data: read every source, convert records, tokenize, mask labels, hold out validation.

Loss is only on assistant tokens for chat formats (messages, alpaca, sharegpt), found with the
tokenizer's own chat template (see chat_labels.py), so any HF template works. The text format
trains on every token.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from deepfleet.errors import DeepfleetError
from deepfleet.plan.recipe import DataSpec
from deepfleet.train.chat_labels import IGNORE_INDEX, render_with_spans, tokenize_chats
from deepfleet.train.data_formats import CHAT_FORMATS, Conversation, convert_records, detect_format
from deepfleet.train.data_sources import SourceRecord, read_source
from deepfleet.train.examples import DatasetReport, TokenizedExample

TOKENIZE_CHUNK = 2048    # conversations rendered and tokenized per batched call
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Sample:
    content: Conversation | str
    where: str


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: Conversation) -> TokenizedExample:
    """Token ids of the chat-template rendering, with labels only on assistant turns."""
    (ids, labels), = tokenize_chats(tokenizer, render_with_spans(tokenizer, [messages]))
    return TokenizedExample(input_ids=ids, labels=labels)


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> TokenizedExample:
    """Token ids of plain text (with the tokenizer's special tokens and a closing eos), all trained."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return TokenizedExample(input_ids=ids, labels=list(ids))


def finish_example(example: TokenizedExample, max_length: int) -> tuple[TokenizedExample, bool]:
    """Cut to max_length and mask the first label (no token predicts it); returns (example, was_truncated)."""
    truncated = len(example.input_ids) > max_length
    ids, labels = example.input_ids[:max_length], example.labels[:max_length]
    if labels:
        labels = [IGNORE_INDEX, *labels[1:]]
    return TokenizedExample(input_ids=ids, labels=labels), truncated


def _load_samples(sources: list[str], *, fmt: str, key: str, seed: int,
                  validation: bool) -> tuple[list[Sample], list[str]]:
    """Samples from every source and the format each source was read as."""
    samples: list[Sample] = []
    formats: list[str] = []
    for source in sources:
        records: list[SourceRecord] = read_source(source, key=key, seed=seed, validation=validation)
        source_format = detect_format(records[0]) if fmt == "auto" else fmt
        contents = convert_records(records, source_format)
        samples += [Sample(content=content, where=record.where) for content, record in zip(contents, records)]
        formats.append(source_format)
    return samples, formats


def check_chat_template(tokenizer: PreTrainedTokenizerBase, formats: list[str], sources: list[str]) -> None:
    """Chat formats need the tokenizer's chat template; say which source needs it when it is missing."""
    if getattr(tokenizer, "chat_template", None):
        return
    chat_sources = [source for source, fmt in zip(sources, formats) if fmt in CHAT_FORMATS]
    if chat_sources:
        fmt = formats[sources.index(chat_sources[0])]
        raise DeepfleetError(f"{fmt}-format data needs a chat template, and the model's tokenizer has none",
                             where=chat_sources[0],
                             fix="use a chat/instruct model (e.g. a *-Instruct id), or data in format: text")


def _tokenize_one(tokenizer: PreTrainedTokenizerBase, sample: Sample) -> TokenizedExample:
    if isinstance(sample.content, str):
        return tokenize_text(tokenizer, sample.content)
    try:
        return tokenize_conversation(tokenizer, sample.content)
    except TemplateError as exc:
        raise DeepfleetError(f"the chat template rejected this conversation: {exc}", where=sample.where,
                             fix="check the roles and their order (many templates need user/assistant turns alternating)") from None


def _tokenize_chunk(tokenizer: PreTrainedTokenizerBase, samples: list[Sample]) -> list[TokenizedExample]:
    """Batched rendering and tokenization; on a template error, one by one to name the record."""
    if not all(isinstance(sample.content, list) for sample in samples):
        return [_tokenize_one(tokenizer, sample) for sample in samples]
    try:
        chats = render_with_spans(tokenizer, [sample.content for sample in samples])
    except TemplateError:
        return [_tokenize_one(tokenizer, sample) for sample in samples]
    return [TokenizedExample(input_ids=ids, labels=labels) for ids, labels in tokenize_chats(tokenizer, chats)]


@dataclass(frozen=True, kw_only=True)
class TokenizedSet:
    examples: list[TokenizedExample]
    n_truncated: int
    n_without_answer: int


def tokenize_samples(tokenizer: PreTrainedTokenizerBase, samples: list[Sample], max_length: int) -> TokenizedSet:
    """Tokenized, truncated examples; those left with no trained token are dropped and counted."""
    examples: list[TokenizedExample] = []
    n_truncated = n_without_answer = 0
    for start in range(0, len(samples), TOKENIZE_CHUNK):
        for raw in _tokenize_chunk(tokenizer, samples[start:start + TOKENIZE_CHUNK]):
            example, truncated = finish_example(raw, max_length)
            n_truncated += truncated
            if all(label == IGNORE_INDEX for label in example.labels):
                n_without_answer += 1
                continue
            examples.append(example)
    return TokenizedSet(examples=examples, n_truncated=n_truncated, n_without_answer=n_without_answer)


def held_out_indices(n_examples: int, fraction: float, seed: int) -> set[int]:
    """The indices of the round(fraction * n) examples (at least 1) held out for validation, chosen by `seed`."""
    n_validation = max(1, round(fraction * n_examples))
    if n_validation >= n_examples:
        raise DeepfleetError(f"data.validation.split={fraction} leaves no training data from {n_examples} examples",
                             where="data.validation.split", fix="lower the split or add data")
    order = list(range(n_examples))
    random.Random(f"deepfleet-validation:{seed}").shuffle(order)
    return set(order[:n_validation])


def split_validation(examples: list[TokenizedExample], fraction: float,
                     seed: int) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """Hold out round(fraction * n) examples (at least 1), chosen by `seed`; both parts keep file order."""
    if fraction <= 0:
        return examples, []
    held = held_out_indices(len(examples), fraction, seed)
    train = [example for index, example in enumerate(examples) if index not in held]
    validation = [example for index, example in enumerate(examples) if index in held]
    return train, validation


def warn_truncated(n_truncated: int, n_total: int, max_length: int) -> None:
    if n_truncated:
        log.warning("%d of %d sequences are longer than data.max_length=%d and were truncated",
                    n_truncated, n_total, max_length)


def empty_dataset_error(data: DataSpec, n_without_answer: int) -> DeepfleetError:
    if n_without_answer:
        return DeepfleetError(f"no training example has an answer token left ({n_without_answer} had none)",
                              where="data.train", fix="raise data.max_length, or check the records have assistant turns")
    return DeepfleetError("the training data is empty", where="data.train", fix="add records to the data files")


def check_one_validation(data: DataSpec) -> None:
    if data.validation.files and data.validation.split > 0:
        raise DeepfleetError("both data.validation.split and data.validation.files are set",
                             where="data.validation", fix="keep one of them")


def build_datasets(data: DataSpec, tokenizer: PreTrainedTokenizerBase, *,
                   seed: int) -> tuple[list[TokenizedExample], list[TokenizedExample], DatasetReport]:
    """(train, validation, report) from `data`: deterministic for `seed`, identical on every rank.

    Validation is `data.validation.files` (where `builtin:tasks` means its held-out split) or a
    `data.validation.split` fraction of the training examples. Sequences over `data.max_length`
    are truncated and counted, with one warning.
    """
    check_one_validation(data)
    samples, formats = _load_samples(data.train, fmt=data.format, key="data.train", seed=seed, validation=False)
    check_chat_template(tokenizer, formats, data.train)
    train_set = tokenize_samples(tokenizer, samples, data.max_length)
    if not train_set.examples:
        raise empty_dataset_error(data, train_set.n_without_answer)
    train, validation = split_validation(train_set.examples, data.validation.split, seed)
    n_truncated, n_without_answer = train_set.n_truncated, train_set.n_without_answer
    n_total = len(samples)
    if data.validation.files:
        files = data.validation.files
        held_samples, held_formats = _load_samples(files, fmt=data.format, key="data.validation.files",
                                                   seed=seed, validation=True)
        check_chat_template(tokenizer, held_formats, files)
        held_set = tokenize_samples(tokenizer, held_samples, data.max_length)
        validation = held_set.examples
        n_truncated += held_set.n_truncated
        n_without_answer += held_set.n_without_answer
        n_total += len(held_samples)
        formats += held_formats
    warn_truncated(n_truncated, n_total, data.max_length)
    report = DatasetReport(
        n_train=len(train), n_validation=len(validation), n_truncated=n_truncated,
        n_tokens=sum(len(example) for example in train), format="+".join(dict.fromkeys(formats)),
        n_label_tokens=sum(sum(label != IGNORE_INDEX for label in example.labels) for example in train),
        n_without_answer=n_without_answer, max_length=data.max_length,
    )
    return train, validation, report
