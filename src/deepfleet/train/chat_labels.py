"""Answer-only labels for any HF chat template.

A template with `{% generation %}` markers says itself which characters are the assistant's. For
any other template, each assistant turn's character span is found by rendering the conversation up
to that turn (the prefix with the generation prompt, then the prefix including the turn). When a
template renders a prefix differently from the whole conversation (some templates drop earlier
reasoning, or close the conversation with a marker), the turn is located by its content.

The tokens whose characters fall inside a span are trained, all others get IGNORE_INDEX. A trained
run stops at the token that ends the turn (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`, eos):
what a template writes after it (a newline) is not the answer. A conversation whose template does
not close the last answer gets the eos appended, so every sequence teaches the model to stop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

IGNORE_INDEX = -100
Conversation = list[dict[str, str]]
Span = tuple[int, int]


@dataclass(frozen=True, kw_only=True)
class RenderedChat:
    text: str
    spans: list[Span]     # character spans of the assistant turns, in order


def render_chats(tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation], *,
                 generation_prompt: bool) -> list[str]:
    """The template's text for each conversation (one batched call; raises jinja2.TemplateError)."""
    if not conversations:
        return []
    return tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=generation_prompt)


def _located_span(text: str, content: str, cursor: int, eos: str | None) -> Span:
    start = text.find(content, cursor)
    if start < 0:
        return cursor, cursor
    end = start + len(content)
    if eos and text.startswith(eos, end):
        end += len(eos)
    return start, end


def _assistant_indices(messages: Conversation) -> list[int]:
    return [index for index, message in enumerate(messages) if message["role"] == "assistant"]


def _spans(text: str, messages: Conversation, before: dict[int, str], through: dict[int, str],
           eos: str | None) -> list[Span]:
    spans: list[Span] = []
    cursor = 0
    for index in _assistant_indices(messages):
        # An assistant turn that opens the conversation has no prefix to render (templates may add
        # a default system prompt before it), so it is located by content.
        start_text, end_text = before.get(index), through.get(index, text)
        if (start_text is not None and text.startswith(start_text) and text.startswith(end_text)
                and len(end_text) > len(start_text) >= cursor):
            span = (len(start_text), len(end_text))
        else:
            span = _located_span(text, messages[index]["content"], cursor, eos)
        spans.append(span)
        cursor = span[1]
    return spans


GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
TURN_PROBE = "deepfleet-turn-probe"


def has_generation_markers(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(GENERATION_MARKER.search(tokenizer.get_chat_template()))


def _marked_spans(tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation]) -> list[RenderedChat]:
    texts, spans = render_jinja_template(conversations=conversations, chat_template=tokenizer.get_chat_template(),
                                         return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
    return [RenderedChat(text=text, spans=[tuple(span) for span in chat_spans])
            for text, chat_spans in zip(texts, spans)]


def render_with_spans(tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation]) -> list[RenderedChat]:
    """Each conversation's text and assistant spans, with all prefixes rendered in two batched calls."""
    if not conversations:
        return []
    if has_generation_markers(tokenizer):
        return _marked_spans(tokenizer, conversations)
    texts = render_chats(tokenizer, conversations, generation_prompt=False)
    before_keys: list[tuple[int, int]] = []
    through_keys: list[tuple[int, int]] = []
    for number, messages in enumerate(conversations):
        for index in _assistant_indices(messages):
            if index > 0:
                before_keys.append((number, index))
            if index + 1 < len(messages):
                through_keys.append((number, index))
    before_texts = render_chats(tokenizer, [conversations[n][:i] for n, i in before_keys], generation_prompt=True)
    through_texts = render_chats(tokenizer, [conversations[n][:i + 1] for n, i in through_keys], generation_prompt=False)
    before: dict[int, dict[int, str]] = {}
    through: dict[int, dict[int, str]] = {}
    for (number, index), text in zip(before_keys, before_texts):
        before.setdefault(number, {})[index] = text
    for (number, index), text in zip(through_keys, through_texts):
        through.setdefault(number, {})[index] = text
    rendered = []
    for number, (text, messages) in enumerate(zip(texts, conversations)):
        spans = _spans(text, messages, before.get(number, {}), through.get(number, {}), tokenizer.eos_token)
        rendered.append(RenderedChat(text=text, spans=spans))
    return rendered


def labels_from_offsets(ids: list[int], offsets: list[Span], spans: list[Span]) -> list[int]:
    """ids where a token holds characters of a span, IGNORE_INDEX elsewhere (spans and offsets ascending).

    A token that starts before the answer but holds its first characters (" Paris" after a prompt
    ending in "Falcon:") is trained, like transformers' own assistant masks do."""
    labels = [IGNORE_INDEX] * len(ids)
    span_index = 0
    for position, (start, end) in enumerate(offsets):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and end > spans[span_index][0] and end > start:
            labels[position] = ids[position]
    return labels


def _tokenize_by_pieces(tokenizer: PreTrainedTokenizerBase, chat: RenderedChat) -> tuple[list[int], list[int]]:
    # Slow tokenizers have no offsets: tokenize the text between span boundaries piece by piece.
    ids: list[int] = []
    labels: list[int] = []
    cursor = 0
    for start, end in [*chat.spans, (len(chat.text), len(chat.text))]:
        for piece, trained in ((chat.text[cursor:start], False), (chat.text[start:end], True)):
            piece_ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"]) if piece else []
            ids += piece_ids
            labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
        cursor = end
    return ids, labels


def turn_end_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template writes right after an assistant's answer, if any."""
    try:
        text, = render_chats(tokenizer, [[{"role": "user", "content": "ping"},
                                          {"role": "assistant", "content": TURN_PROBE}]], generation_prompt=False)
    except Exception:   # a template that needs other roles: no probe, eos still counts
        return None
    after = text.rfind(TURN_PROBE)
    ids = tokenizer(text[after + len(TURN_PROBE):], add_special_tokens=False)["input_ids"] if after >= 0 else []
    return ids[0] if ids and is_special_token(tokenizer, ids[0]) else None


def is_special_token(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bool:
    """A named special token, or an added token marked special (`<|eot_id|>` is only the latter)."""
    added = tokenizer.added_tokens_decoder.get(token_id)
    return token_id in tokenizer.all_special_ids or bool(added is not None and added.special)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that end an answer: eos and the template's end-of-turn token."""
    ids = [tokenizer.eos_token_id, turn_end_token_id(tokenizer)]
    return list(dict.fromkeys(token for token in ids if token is not None))


def generation_stop_ids(model, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The model's own generation_config eos ids, then eos and the template's end-of-turn token."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(token for token in [*configured, *stop_token_ids(tokenizer)] if token is not None))


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer itself starts every encoding with its bos token (Llama, Gemma, OPT...)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def _end_answers(ids: list[int], labels: list[int], *, stops: set[int], eos: int | None) -> tuple[list[int], list[int]]:
    """Cut each trained run after its first stop token and the sequence after its last trained token
    (what follows carries no loss); close an unclosed final answer with eos."""
    labels = list(labels)
    stopped = False
    for position, label in enumerate(labels):
        if label == IGNORE_INDEX:
            stopped = False
        elif stopped:
            labels[position] = IGNORE_INDEX
        elif ids[position] in stops:
            stopped = True
    trained = [position for position, label in enumerate(labels) if label != IGNORE_INDEX]
    if not trained:
        return ids, labels
    ids, labels = ids[:trained[-1] + 1], labels[:trained[-1] + 1]
    if eos is not None and ids[-1] not in stops:
        ids, labels = [*ids, eos], [*labels, eos]
    return ids, labels


def tokenize_chats(tokenizer: PreTrainedTokenizerBase, chats: list[RenderedChat]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) for each rendered chat: exactly one bos where the tokenizer uses one (the
    template's own, else the tokenizer's), answers ending at their stop token."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    if backend is None:
        pairs = [_tokenize_by_pieces(tokenizer, chat) for chat in chats]
    else:
        encodings = backend.encode_batch([chat.text for chat in chats], add_special_tokens=False)
        pairs = [(list(encoding.ids), labels_from_offsets(encoding.ids, encoding.offsets, chat.spans))
                 for encoding, chat in zip(encodings, chats)]
    stops, bos = set(stop_token_ids(tokenizer)), tokenizer.bos_token_id if adds_bos(tokenizer) else None
    finished = []
    for ids, labels in pairs:
        ids, labels = _end_answers(ids, labels, stops=stops, eos=tokenizer.eos_token_id)
        if bos is not None and ids[:1] != [bos]:
            ids, labels = [bos, *ids], [IGNORE_INDEX, *labels]
        finished.append((ids, labels))
    return finished
