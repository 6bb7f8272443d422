"""Chat and instruction rows: a corpus's input shape, one row's conversation, and which tokens of
its rendering are the assistant's (the ones that teach).

The assistant mask is found without ``{% generation %}`` markers, which most templates lack
(SmolLM2's ChatML has none, and transformers' ``return_assistant_tokens_mask`` then returns zeros):
for each assistant turn ``i`` the template renders, as text, ``messages[:i]`` with the generation
prompt and ``messages[:i + 1]`` without it; the turn's text is what the second adds to the first.
The whole conversation is tokenized once, with offsets, and a token is the assistant's when its
characters overlap one of those spans. The trade-off: two renders per assistant turn, plus one,
buy independence from the template's markers; and a template that rewrites earlier turns as later
ones arrive (Mistral v3 moves the system prompt into the last user turn, Qwen3 drops past
reasoning) cannot be masked, since what the whole rendering holds is not what the model was
prompted with. Such a row is refused as a :class:`BadRow`: whether a template rewrites depends on
the row (Qwen3's only on rows with reasoning), so a job may skip and count those rows.

Choices, each tested in ``tests/test_chat.py``:

- The generation prompt (``<|im_start|>assistant\\n``) is the prompt's; a turn's content and its
  end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``) are the assistant's. Whitespace
  after the turn's last character (ChatML's ``\\n`` after ``<|im_end|>``) is template glue, not
  something the model generates (it stops at the end-of-turn token), so it does not teach.
- A token that straddles a span's edge (its characters partly the prompt's) is the assistant's:
  dropping it would drop the first word of the reply.
- The rendering is tokenized with ``add_special_tokens=False``, as transformers'
  ``apply_chat_template(tokenize=True)`` does: the template writes every special token it wants
  (Llama 3's and Mistral's write ``bos_token``), so the tokenizer's BOS is never added twice.
- A string prompt/completion pair is a user turn and an assistant turn, rendered with the chat
  template when there is one (an instruct teacher sees its own format); with none it is the plain
  text ``prompt + completion`` followed by the EOS token, completion and EOS teaching, as a text
  corpus is tokenized (no BOS). Message-list pairs (TRL's conversational shape) need a template;
  only the completion's assistant turns teach, assistant turns in the prompt are context.
- A conversation without an assistant turn teaches nothing and is a :class:`BadRow`, as are a
  wrong type, an unknown role, an empty conversation and a template that fails on the row.
- Which turns teach is :class:`TrainOn` (``--train-on``): every assistant turn, the last one (a
  pair's completion), or every token of the rendering. Under ``all`` no mask is needed, so a template
  that rewrites earlier turns is no reason to refuse a row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from softcache.errors import BadRow, SoftcacheError, one_line

ROLES = ("system", "user", "assistant", "tool")
SHAPE_FLAG = "--input-shape"
TEMPLATE_FLAG = "--chat-template"


class TrainOn(StrEnum):
    """Which tokens of a chat row are targets (``--train-on``)."""

    ASSISTANT = "assistant"
    """Every assistant turn: of the whole conversation for ``messages`` rows, of the completion for pairs."""
    COMPLETION = "completion"
    """The last assistant turn of a ``messages`` row; a pair's completion (its assistant turns, as ASSISTANT)."""
    ALL = "all"
    """Every token of the rendering, template text and prompt included, as in a text corpus."""


class InputShape(StrEnum):
    """What one corpus row holds."""

    MESSAGES = "messages"
    """A ``messages`` column: a list of ``{role, content}`` turns."""
    PROMPT_COMPLETION = "prompt_completion"
    """``prompt`` and ``completion`` columns: two strings, or two lists of turns (TRL's shapes)."""
    TEXT = "text"
    """One text column, read and packed as plain text (softcache.corpus)."""


def input_shape(column_names: Sequence[str], override: str | None = None, text_column: str = "text") -> InputShape:
    """The shape of a corpus with these columns: ``override`` (the ``--input-shape`` value) when given,
    else the one shape whose columns are present. Raises :class:`SoftcacheError` when the override is
    unknown or its columns are missing, or when no shape, or more than one, fits."""
    columns = list(column_names)
    needs = {InputShape.MESSAGES: ["messages"], InputShape.PROMPT_COMPLETION: ["prompt", "completion"],
             InputShape.TEXT: [text_column]}
    listed = ", ".join(columns) or "none"
    if override is not None:
        if override not in needs:
            raise SoftcacheError(f"{SHAPE_FLAG} {override}: unknown; choose one of {', '.join(needs)}")
        missing = [c for c in needs[InputShape(override)] if c not in columns]
        if missing:
            raise SoftcacheError(f"{SHAPE_FLAG} {override} needs the column{'s' if len(missing) > 1 else ''} "
                                 f"{', '.join(map(repr, missing))} (columns: {listed})")
        return InputShape(override)
    fits = [shape for shape, need in needs.items() if all(c in columns for c in need)]
    if len(fits) == 1:
        return fits[0]
    if fits:
        raise SoftcacheError(f"the corpus fits more than one input shape ({', '.join(fits)}; columns: {listed}); "
                             f"choose one with {SHAPE_FLAG}")
    half = " ('prompt' needs a 'completion' column)" if ("prompt" in columns) != ("completion" in columns) else ""
    raise SoftcacheError(f"the corpus has no 'messages', 'prompt' and 'completion', or {text_column!r} column "
                         f"(columns: {listed}){half}; choose a text column with --text-column")


@dataclass(frozen=True)
class Conversation:
    """One validated row, ready to render."""

    messages: list[dict]
    """Turns: ``role`` (one of :data:`ROLES`), ``content`` (str), any other non-null keys the row had."""
    teach_from: int
    """Assistant turns at this index or later teach: 0 for ``messages`` rows, ``len(prompt)`` for pairs."""
    pair: tuple[str, str] | None = None
    """``(prompt, completion)`` of a string pair, rendered as plain text when there is no template."""
    columns: tuple[str, ...] = ("messages",)
    """The row's columns, for error lines."""


def conversation(row: Mapping, shape: InputShape, index: int) -> Conversation:
    """Validate row ``index`` (a mapping of column to value) of a ``messages`` or ``prompt_completion``
    corpus. Raises :class:`BadRow` naming the row and column: not a list of turns, an empty one, a turn
    that is not a mapping, an unknown role, content that is not a string (null is allowed only on an
    assistant turn with ``tool_calls``), a pair mixing strings and lists, or no assistant turn to teach."""
    if shape == InputShape.MESSAGES:
        messages = _turns(row.get("messages"), index, "messages", allow_empty=False)
        _teaches(messages, index, "messages")
        return Conversation(messages, 0)
    if shape != InputShape.PROMPT_COMPLETION:
        raise ValueError(f"conversation() reads messages and prompt_completion rows, not {shape}")
    prompt, completion = row.get("prompt"), row.get("completion")
    columns = ("prompt", "completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return Conversation(turns, 1, (prompt, completion), columns)
    if isinstance(prompt, str) or isinstance(completion, str):
        raise BadRow(index, columns, f"'prompt' is {_kind(prompt)} and 'completion' is {_kind(completion)}; "
                                     "both must be strings or both lists of turns")
    head = _turns(prompt, index, "prompt", allow_empty=True)
    tail = _turns(completion, index, "completion", allow_empty=False)
    _teaches(tail, index, "completion")
    return Conversation(head + tail, len(head), None, columns)


def _turns(value, index: int, column: str, allow_empty: bool) -> list[dict]:
    if not isinstance(value, (list, tuple)):
        raise BadRow(index, (column,), f"is {_kind(value)}, not a list of {{role, content}} turns")
    if not value and not allow_empty:
        raise BadRow(index, (column,), "is an empty list: a conversation needs at least one turn")
    turns = []
    for number, turn in enumerate(value):
        if not isinstance(turn, Mapping):
            raise BadRow(index, (column,), f"turn {number} is {_kind(turn)}, not a {{role, content}} mapping")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise BadRow(index, (column,), f"turn {number} has the role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str) and not (content is None and role == "assistant" and turn.get("tool_calls")):
            raise BadRow(index, (column,), f"turn {number} ({role}) has content that is {_kind(content)}, not a string")
        # Columnar readers give every turn every key another turn has, as null: a template testing
        # `tool_calls is defined` must not see those.
        turns.append({key: item for key, item in turn.items() if item is not None or key == "content"})
    return turns


def _teaches(turns: list[dict], index: int, column: str) -> None:
    if not any(turn["role"] == "assistant" for turn in turns):
        raise BadRow(index, (column,), "has no assistant turn, so nothing in it teaches")


def _kind(value) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


@dataclass(frozen=True)
class Rendered:
    """One row as the teacher sees it."""

    input_ids: np.ndarray
    """[T] uint32 token ids of the whole rendering (no BOS added beyond what the template writes)."""
    assistant: np.ndarray
    """[T] bool: True for the target tokens: those of the teaching assistant turns (content and end-of-turn
    token), or every token under ``TrainOn.ALL``."""
    text: str
    """The rendered text the ids are the tokens of (for a plain pair: ``prompt + completion + eos_token``)."""


def read_chat_template(path: str | None) -> str | None:
    """The text of the ``--chat-template`` file (UTF-8), or None when ``path`` is None. Raises
    :class:`SoftcacheError` naming the flag when it is missing, unreadable, not UTF-8 or empty."""
    if path is None:
        return None
    where = f"{TEMPLATE_FLAG} {path}"
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise SoftcacheError(f"{where} does not exist") from None
    except UnicodeDecodeError as err:
        raise SoftcacheError(f"{where} is not UTF-8 text (byte {err.start} is {err.object[err.start]:#04x})") from None
    except OSError as err:  # a directory, no permission
        raise SoftcacheError(f"{where} cannot be read ({err.strerror or err})") from None
    if not text.strip():
        raise SoftcacheError(f"{where} is empty; give a Jinja chat template")
    return text


def chat_template_of(tokenizer, override: str | None = None) -> str | None:
    """The template to render with: ``override`` (the text of ``--chat-template FILE``) if given, else
    the tokenizer's own, else None (a tokenizer may hold several named ones: the ``default``)."""
    if override is not None:
        return override
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def render(tokenizer, row: Mapping, shape: InputShape, *, index: int, chat_template: str | None = None,
           train_on: TrainOn = TrainOn.ASSISTANT) -> Rendered:
    """Validate and render row ``index`` with the fast ``tokenizer``; ``chat_template`` overrides the
    tokenizer's template and ``train_on`` says which assistant turns teach (under ``TrainOn.ALL`` every
    token does, and the template need not render the row prefix by prefix). Raises :class:`BadRow` for
    the row's own faults (see :func:`conversation`, a template that fails on it or does not render it
    prefix by prefix) and :class:`SoftcacheError` when there is no template to use, the tokenizer is not
    a fast one, or a plain pair has no EOS token."""
    chat = conversation(row, shape, index)
    if not getattr(tokenizer, "is_fast", False):
        raise SoftcacheError("the teacher's tokenizer is not a fast (tokenizers) one, which the assistant mask "
                             "needs for character offsets")
    template = chat_template_of(tokenizer, chat_template)
    if template is None and chat.pair is not None:
        return _render_plain(tokenizer, *chat.pair, everything=train_on == TrainOn.ALL)
    if template is None:
        raise SoftcacheError(f"the teacher's tokenizer has no chat template to render {shape} rows with; "
                             f"pass one with {TEMPLATE_FLAG} FILE")
    text = _apply(tokenizer, template, chat, len(chat.messages), False, index)
    ids, offsets = _tokenize(tokenizer, text)
    if train_on == TrainOn.ALL:
        return Rendered(ids, np.ones(len(ids), dtype=bool), text)
    teaching = [i for i, turn in enumerate(chat.messages) if turn["role"] == "assistant" and i >= chat.teach_from]
    if train_on == TrainOn.COMPLETION:
        teaching = teaching[-1:]  # a pair's teach_from already starts at its completion
    spans = [_span(tokenizer, template, chat, i, text, index) for i in teaching]
    return Rendered(ids, _overlapping(offsets, spans), text)


def _span(tokenizer, template: str, chat: Conversation, i: int, text: str, index: int) -> tuple[int, int]:
    """Characters ``[start, end)`` of ``text`` (the whole rendering) that assistant turn ``i`` adds."""
    if i == 0:  # transformers renders no empty conversation, so the reply would have no prompt to follow
        raise BadRow(index, chat.columns, "starts with an assistant turn; a chat template needs a turn before it")
    prompt = _apply(tokenizer, template, chat, i, True, index)
    full = _apply(tokenizer, template, chat, i + 1, False, index)
    problem = None
    if not full.startswith(prompt):
        problem = f"the first {i + 1} turns do not render starting with the first {i} and the generation prompt"
    elif not text.startswith(full):
        problem = f"the whole conversation does not render starting with its first {i + 1} turns"
    if problem:
        raise BadRow(index, chat.columns, f"the chat template does not render it prefix by prefix ({problem}; "
                     "a template that rewrites earlier turns, e.g. moves the system prompt or drops past "
                     f"reasoning, cannot give an assistant mask); pass another with {TEMPLATE_FLAG} FILE")
    end = len(full.rstrip())  # whitespace after the end-of-turn token is glue the model never generates
    if end <= len(prompt):
        raise BadRow(index, chat.columns, f"assistant turn {i} renders to no text with the chat template")
    return len(prompt), end


def _apply(tokenizer, template: str, chat: Conversation, turns: int, generation_prompt: bool, index: int) -> str:
    """The template's text for the first ``turns`` turns; any failure of the template is the row's."""
    try:
        return tokenizer.apply_chat_template(chat.messages[:turns], chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja2 errors, raise_exception() in the template, a TypeError from '+ None'
        raise BadRow(index, chat.columns, f"the chat template failed to render it ({one_line(err)})") from err


def _render_plain(tokenizer, prompt: str, completion: str, everything: bool = False) -> Rendered:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SoftcacheError("the teacher's tokenizer has neither a chat template nor an EOS token to end a "
                             f"completion with; pass a template with {TEMPLATE_FLAG} FILE")
    text = prompt + completion
    ids, offsets = _tokenize(tokenizer, text)
    start = 0 if everything else len(prompt)
    assistant = _overlapping(offsets, [(start, len(text))] if len(text) > start else [])
    return Rendered(np.append(ids, np.uint32(eos)), np.append(assistant, True), text + tokenizer.eos_token)


def _tokenize(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """[T] uint32 ids and [T, 2] character offsets of ``text``, with no special tokens added."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return np.asarray(encoded["input_ids"], dtype=np.uint32), offsets


def _overlapping(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """[T] bool: tokens whose characters ``[start, end)`` overlap a span (a zero-width token: lies in it)."""
    start, end = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(offsets), dtype=bool)
    for lo, hi in spans:
        mask |= np.where(start < end, (start < hi) & (end > lo), (start >= lo) & (start < hi))
    return mask


def teaching_positions(assistant: np.ndarray) -> np.ndarray:
    """[..., T] bool: position t teaches when token t + 1 is an assistant token (the target cached at
    t is the teacher's distribution of token t + 1); the last position never teaches.

    ``assistant`` is [..., T] bool, one document per row. Apply it to each conversation before packing:
    on a packed row the last position of one conversation would otherwise be asked for the first token
    of the next (a plain pair with an empty prompt starts with an assistant token)."""
    assistant = np.asarray(assistant, dtype=bool)
    teach = np.zeros_like(assistant)
    teach[..., :-1] = assistant[..., 1:]
    return teach
