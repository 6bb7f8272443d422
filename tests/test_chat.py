"""softcache.chat: input shapes, row validation, and the assistant mask on three template styles.

The tokenizers are trained here (nothing is downloaded): a byte-level BPE for the ChatML and Llama 3
styles, a SentencePiece-like (Metaspace) BPE for the [INST] style, each with its chat special tokens
and, where the real one does, a post-processor that adds BOS. The expected assistant text of each
conversation is written out by hand from the template's definition.
"""

from __future__ import annotations

import re
import string

import numpy as np
import pytest

from softcache.chat import (InputShape, Rendered, TrainOn, chat_template_of, conversation, input_shape,
                            read_chat_template, render, teaching_positions)
from softcache.errors import BadRow, SoftcacheError

from conftest import CHATML, SMOLLM_SYSTEM, fast_tokenizer, train_bpe

MESSAGES, PAIRS = InputShape.MESSAGES, InputShape.PROMPT_COMPLETION

# Meta-Llama-3-8B-Instruct's template, verbatim: BOS, role headers, content trimmed, <|eot_id|>.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama 2 / Mistral [INST] style: BOS, the system prompt folded into the first user turn, tool results
# in Mistral's [TOOL_RESULTS] brackets, the reply after a space and closed by </s>; no generation prompt.
INST = (
    "{%- if messages and messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system = none %}{%- set loop_messages = messages %}"
    "{%- endif %}{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{%- if loop.first and system %}"
    "{{- '[INST] ' + system + '\n\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'tool' %}{{- '[TOOL_RESULTS] ' + message['content'] + ' [/TOOL_RESULTS]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user, assistant and tool roles are supported') }}{%- endif %}"
    "{%- endfor %}"
)

CONVERSATION = [
    {"role": "system", "content": "You answer questions about Python."},
    {"role": "user", "content": "What does len() return?"},
    {"role": "assistant", "content": "The number of items in a container."},
    {"role": "user", "content": "Count the list [1, 2, 3] with the tool."},
    {"role": "tool", "content": "3"},
    {"role": "assistant", "content": "The list holds 3 items."},
]

# What a person marks as the assistant's, per style: each reply and its end-of-turn token; not the
# generation prompt header before it, not the newline ChatML writes after <|im_end|>.
EXPECTED = {
    "chatml": ["The number of items in a container.<|im_end|>", "The list holds 3 items.<|im_end|>"],
    "llama3": ["The number of items in a container.<|eot_id|>", "The list holds 3 items.<|eot_id|>"],
    "inst": [" The number of items in a container.</s>", " The list holds 3 items.</s>"],
}


@pytest.fixture(scope="module")
def tokenizers():
    from tokenizers import decoders, pre_tokenizers

    byte_level = train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(),
                        ["<eos>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                         "<|end_header_id|>", "<|eot_id|>"], pre_tokenizers.ByteLevel.alphabet())
    metaspace = train_bpe(pre_tokenizers.Metaspace(prepend_scheme="first"), decoders.Metaspace(prepend_scheme="never"),
                       ["<s>", "</s>"], list(string.printable))
    return {
        "chatml": fast_tokenizer(byte_level, CHATML, eos_token="<|im_end|>"),
        "llama3": fast_tokenizer(byte_level, LLAMA3, bos="<|begin_of_text|>", eos_token="<|eot_id|>"),
        "inst": fast_tokenizer(metaspace, INST, bos="<s>", eos_token="</s>"),
        "none": fast_tokenizer(byte_level, None, eos_token="<eos>"),
    }


def runs(tokenizer, rendered: Rendered) -> list[str]:
    """The decoded text of each maximal run of assistant tokens."""
    mask = rendered.assistant
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [tokenizer.decode(rendered.input_ids[lo:hi].tolist(), clean_up_tokenization_spaces=False)
            for lo, hi in zip(edges[::2], edges[1::2])]


def test_input_shape():
    assert input_shape(["messages", "id"]) is MESSAGES
    assert input_shape(["prompt", "completion"]) is PAIRS
    assert input_shape(["text", "id"]) is InputShape.TEXT
    assert input_shape(["body"], text_column="body") is InputShape.TEXT
    assert input_shape(["messages", "text"], override="text") is InputShape.TEXT
    for columns, override, message in [
        (["messages", "text"], None, "the corpus fits more than one input shape (messages, text; columns: messages, "
                                     "text); choose one with --input-shape"),
        (["prompt", "answer"], None, "the corpus has no 'messages', 'prompt' and 'completion', or 'text' column "
                                     "(columns: prompt, answer) ('prompt' needs a 'completion' column); choose a "
                                     "text column with --text-column"),
        (["text"], "messages", "--input-shape messages needs the column 'messages' (columns: text)"),
        (["text"], "chat", "--input-shape chat: unknown; choose one of messages, prompt_completion, text"),
    ]:
        with pytest.raises(SoftcacheError, match="^" + re.escape(message) + "$"):
            input_shape(columns, override)


@pytest.mark.parametrize("style", ["chatml", "llama3", "inst"])
def test_assistant_mask_matches_hand_marked(tokenizers, style):
    tokenizer = tokenizers[style]
    rendered = render(tokenizer, {"messages": CONVERSATION}, MESSAGES, index=0)
    assert runs(tokenizer, rendered) == EXPECTED[style]
    assert rendered.input_ids.dtype == np.uint32 and rendered.assistant.dtype == bool
    assert rendered.input_ids.shape == rendered.assistant.shape
    assert tokenizer.decode(rendered.input_ids.tolist()) == rendered.text  # the mask is over the whole rendering
    prompt_side = tokenizer.decode(rendered.input_ids[~rendered.assistant].tolist())
    for turn in CONVERSATION:
        assert (turn["content"] in prompt_side) == (turn["role"] != "assistant")


def test_mask_agrees_with_generation_markers(tokenizers):
    """transformers' own mask, from the same ChatML with {% generation %} around each reply and its
    <|im_end|>, is an independent oracle: the two must agree token for token."""
    tokenizer = tokenizers["chatml"]
    marked = CHATML.replace(
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
        "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
        "{{message['content'] + '<|im_end|>'}}{% endgeneration %}{% else %}{{message['content'] + '<|im_end|>'}}"
        "{% endif %}{{'\n'}}")
    assert marked != CHATML
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:3] + CONVERSATION[2:3]):
        ours = render(tokenizer, {"messages": messages}, MESSAGES, index=0)
        theirs = tokenizer.apply_chat_template(messages, chat_template=marked, return_dict=True,
                                               return_assistant_tokens_mask=True)
        assert ours.input_ids.tolist() == theirs["input_ids"]
        assert ours.assistant.astype(int).tolist() == theirs["assistant_masks"]


def test_smollm_default_system_prompt_does_not_teach(tokenizers):
    tokenizer = tokenizers["chatml"]
    rendered = render(tokenizer, {"messages": CONVERSATION[1:3]}, MESSAGES, index=0)
    assert rendered.text.startswith(f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert runs(tokenizer, rendered) == EXPECTED["chatml"][:1]


@pytest.mark.parametrize("style", ["llama3", "inst"])
def test_one_bos(tokenizers, style):
    """The template writes BOS and the tokenizer would add one too: the rendering has exactly one."""
    tokenizer = tokenizers[style]
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id  # the tokenizer does add one by default
    ids = render(tokenizer, {"messages": CONVERSATION}, MESSAGES, index=0).input_ids
    assert ids[0] == tokenizer.bos_token_id and (ids == tokenizer.bos_token_id).sum() == 1


def test_string_pairs_use_the_template(tokenizers):
    tokenizer = tokenizers["llama3"]
    rendered = render(tokenizer, {"prompt": "What is a tuple?", "completion": "An immutable sequence."}, PAIRS, index=0)
    assert rendered.text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is a tuple?<|eot_id|>"
                             "<|start_header_id|>assistant<|end_header_id|>\n\nAn immutable sequence.<|eot_id|>")
    assert runs(tokenizer, rendered) == ["An immutable sequence.<|eot_id|>"]


def test_string_pairs_without_a_template_are_plain_text(tokenizers):
    tokenizer = tokenizers["none"]
    rendered = render(tokenizer, {"prompt": "Q: What is a tuple?\nA:", "completion": " An immutable sequence."},
                      PAIRS, index=0)
    assert rendered.text == "Q: What is a tuple?\nA: An immutable sequence.<eos>"
    assert rendered.input_ids[-1] == tokenizer.eos_token_id and rendered.input_ids[0] != tokenizer.bos_token_id
    assert runs(tokenizer, rendered) == [" An immutable sequence.<eos>"]
    # A token across the boundary holds some of the completion: it teaches, or the reply loses its first word.
    straddle = render(tokenizer, {"prompt": "in th", "completion": "e end"}, PAIRS, index=0)
    assert tokenizer.convert_ids_to_tokens(straddle.input_ids.tolist())[:2] == ["in", "Ġthe"]  # " th|e" is one token
    assert runs(tokenizer, straddle) == [" the end<eos>"]
    empty = render(tokenizer, {"prompt": "Q?", "completion": ""}, PAIRS, index=0)
    assert runs(tokenizer, empty) == ["<eos>"]  # only the EOS: the end is still to be learnt


def test_message_list_pairs_teach_the_completion_only(tokenizers):
    tokenizer = tokenizers["chatml"]
    row = {"prompt": CONVERSATION[:5], "completion": CONVERSATION[5:]}
    rendered = render(tokenizer, row, PAIRS, index=0)
    assert rendered.text == render(tokenizer, {"messages": CONVERSATION}, MESSAGES, index=0).text
    assert runs(tokenizer, rendered) == EXPECTED["chatml"][1:]  # the prompt's assistant turn is context


def test_extra_keys_and_tool_calls(tokenizers):
    """Columnar readers give every turn the keys of every other, as null: those are dropped (transformers
    5 drops them too when rendering; the conversation is clean for any caller), so a template's
    `is defined` tests see what the row meant; a tool-call turn may have null content."""
    template = CHATML.replace("message['content']", "(message['content'] if message.tool_calls is not defined "
                              "else 'CALL ' + message.tool_calls[0].name)")
    turns = [{"role": "user", "content": "Count [1, 2].", "tool_calls": None},
             {"role": "assistant", "content": None, "tool_calls": [{"name": "len"}]},
             {"role": "tool", "content": "2", "tool_calls": None},
             {"role": "assistant", "content": "Two.", "tool_calls": None}]
    tokenizer = tokenizers["chatml"]
    rendered = render(tokenizer, {"messages": turns}, MESSAGES, index=0, chat_template=template)
    assert runs(tokenizer, rendered) == ["CALL len<|im_end|>", "Two.<|im_end|>"]
    assert [sorted(turn) for turn in conversation({"messages": turns}, MESSAGES, 0).messages] == [
        ["content", "role"], ["content", "role", "tool_calls"], ["content", "role"], ["content", "role"]]


@pytest.mark.parametrize("row, shape, expected", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, MESSAGES,
     "row 7, column 'messages': turn 0 has the role 'robot'; roles are system, user, assistant, tool"),
    ({"messages": []}, MESSAGES,
     "row 7, column 'messages': is an empty list: a conversation needs at least one turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["hello"]}]}, MESSAGES,
     "row 7, column 'messages': turn 1 (assistant) has content that is a list, not a string"),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}, MESSAGES,
     "row 7, column 'messages': has no assistant turn, so nothing in it teaches"),
    ({"messages": '[{"role": "user", "content": "hi"}]'}, MESSAGES,
     "row 7, column 'messages': is a str, not a list of {role, content} turns"),
    ({"messages": ["hi"]}, MESSAGES, "row 7, column 'messages': turn 0 is a str, not a {role, content} mapping"),
    ({"messages": [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "hi"}]}, MESSAGES,
     "row 7, column 'messages': starts with an assistant turn; a chat template needs a turn before it"),
    ({"prompt": "hi", "completion": [{"role": "assistant", "content": "hello"}]}, PAIRS,
     "row 7, columns 'prompt' and 'completion': 'prompt' is a str and 'completion' is a list; "
     "both must be strings or both lists of turns"),
    ({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "tool", "content": "1"}]}, PAIRS,
     "row 7, column 'completion': has no assistant turn, so nothing in it teaches"),
    ({"prompt": None, "completion": "hello"}, PAIRS,
     "row 7, columns 'prompt' and 'completion': 'prompt' is null and 'completion' is a str; "
     "both must be strings or both lists of turns"),
])
def test_bad_rows(tokenizers, row, shape, expected):
    with pytest.raises(BadRow) as caught:
        render(tokenizers["chatml"], row, shape, index=7)
    assert str(caught.value) == expected and caught.value.row == 7


def test_a_template_that_fails_is_the_rows_fault(tokenizers):
    llama2 = INST.replace("{%- elif message['role'] == 'tool' %}", "{%- elif false %}")
    with pytest.raises(BadRow, match=r"^row 3, column 'messages': the chat template failed to render it "
                                     r"\(TemplateError: Only user, assistant and tool roles are supported\)$"):
        render(tokenizers["inst"], {"messages": CONVERSATION}, MESSAGES, index=3, chat_template=llama2)


# Mistral's v3 templates put the system prompt into the last message when it is a user turn, so the
# prompt for a reply carries it and the reply's own rendering does not.
SYSTEM_LAST = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system is defined %}{{- '[INST] ' + system + '\n\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)

# Qwen3-style: the reasoning of replies before the last user turn is dropped, so a later turn rewrites them.
DROPS_REASONING = (
    "{%- set ns = namespace(last_user=0) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- set content = m.content %}"
    "{%- if m.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip() %}{%- endif %}"
    "{{- '<|im_start|>' + m.role + '\n' + content + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def test_a_template_that_moves_the_system_prompt_is_refused(tokenizers):
    with pytest.raises(BadRow, match=r"^row 2, column 'messages': the chat template does not render it prefix by "
                                     r"prefix \(the first 3 turns do not render starting with the first 2 and the "
                                     r"generation prompt; .*pass another with --chat-template FILE$"):
        render(tokenizers["inst"], {"messages": CONVERSATION[:3]}, MESSAGES, index=2, chat_template=SYSTEM_LAST)
    tokenizer = tokenizers["inst"]  # without a system prompt it has nothing to move
    no_system = render(tokenizer, {"messages": CONVERSATION[1:3]}, MESSAGES, index=2, chat_template=SYSTEM_LAST)
    assert runs(tokenizer, no_system) == EXPECTED["inst"][:1]


def test_a_template_that_drops_past_reasoning_is_refused(tokenizers):
    tokenizer = tokenizers["chatml"]
    turns = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "<think>Add.</think> 4."},
             {"role": "user", "content": "3 + 3?"}, {"role": "assistant", "content": "6."}]
    with pytest.raises(BadRow, match=r"^row 4, column 'messages': the chat template does not render it prefix by "
                                     r"prefix \(the whole conversation does not render starting with its first 2 "
                                     r"turns; "):
        render(tokenizer, {"messages": turns}, MESSAGES, index=4, chat_template=DROPS_REASONING)
    turns[1]["content"] = "4."
    rendered = render(tokenizer, {"messages": turns}, MESSAGES, index=4, chat_template=DROPS_REASONING)
    assert runs(tokenizer, rendered) == ["4.<|im_end|>", "6.<|im_end|>"]


def test_no_template(tokenizers):
    tokenizer = tokenizers["none"]
    assert chat_template_of(tokenizer) is None and chat_template_of(tokenizer, CHATML) == CHATML
    with pytest.raises(SoftcacheError, match="^the teacher's tokenizer has no chat template to render messages rows "
                                             "with; pass one with --chat-template FILE$") as caught:
        render(tokenizer, {"messages": CONVERSATION}, MESSAGES, index=0)
    assert not isinstance(caught.value, BadRow)  # no row can be rendered: not one to skip
    rendered = render(tokenizer, {"messages": CONVERSATION}, MESSAGES, index=0, chat_template=CHATML)
    assert runs(tokenizer, rendered) == EXPECTED["chatml"]


def test_conversation_normalises_pairs():
    chat = conversation({"prompt": "hi", "completion": "hello"}, PAIRS, 0)
    assert chat.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert chat.teach_from == 1 and chat.pair == ("hi", "hello")


def test_teaching_positions():
    assistant = np.array([0, 0, 1, 1, 0, 1], dtype=bool)
    assert teaching_positions(assistant).tolist() == [False, True, True, False, True, False]
    batch = np.array([[0, 1, 1], [1, 0, 1]], dtype=bool)
    assert teaching_positions(batch).tolist() == [[True, True, False], [False, True, False]]
    assert teaching_positions(np.ones(1, dtype=bool)).tolist() == [False]  # the last position never teaches


def test_train_on_chooses_the_turns_that_teach(tokenizers):
    tokenizer = tokenizers["chatml"]
    row = {"messages": CONVERSATION}
    by_choice = {choice: render(tokenizer, row, MESSAGES, index=0, train_on=choice) for choice in TrainOn}
    assert runs(tokenizer, by_choice[TrainOn.ASSISTANT]) == EXPECTED["chatml"]
    assert runs(tokenizer, by_choice[TrainOn.COMPLETION]) == EXPECTED["chatml"][1:]  # the last assistant turn
    assert by_choice[TrainOn.ALL].assistant.all()  # every token, system prompt and template text included
    assert teaching_positions(by_choice[TrainOn.ALL].assistant).sum() == len(by_choice[TrainOn.ALL].input_ids) - 1
    assert len({r.text for r in by_choice.values()}) == 1  # the choice changes the mask, never the tokens
    # A pair: assistant and completion both mean the completion's assistant turns; all is every token.
    pair = {"prompt": CONVERSATION[:5], "completion": CONVERSATION[5:]}
    for choice in (TrainOn.ASSISTANT, TrainOn.COMPLETION):
        assert runs(tokenizer, render(tokenizer, pair, PAIRS, index=0, train_on=choice)) == EXPECTED["chatml"][1:]
    assert render(tokenizer, pair, PAIRS, index=0, train_on=TrainOn.ALL).assistant.all()
    strings = {"prompt": "What is a tuple?", "completion": "An immutable sequence."}
    assert runs(tokenizer, render(tokenizer, strings, PAIRS, index=0, train_on=TrainOn.COMPLETION)) == [
        "An immutable sequence.<|im_end|>"]
    plain = render(tokenizers["none"], {"prompt": "Q: 1 + 1?\nA:", "completion": " 2."}, PAIRS, index=0,
                   train_on=TrainOn.ALL)
    assert runs(tokenizers["none"], plain) == ["Q: 1 + 1?\nA: 2.<eos>"]


def test_train_on_all_needs_no_mask_so_a_rewriting_template_is_fine(tokenizers):
    tokenizer = tokenizers["chatml"]
    turns = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "<think>Add.</think> 4."},
             {"role": "user", "content": "3 + 3?"}, {"role": "assistant", "content": "6."}]
    with pytest.raises(BadRow):
        render(tokenizer, {"messages": turns}, MESSAGES, index=0, chat_template=DROPS_REASONING)
    rendered = render(tokenizer, {"messages": turns}, MESSAGES, index=0, chat_template=DROPS_REASONING,
                      train_on=TrainOn.ALL)
    assert rendered.assistant.all() and "<think>" not in rendered.text
    # Only the last turn teaches under completion, and the template renders that one prefix by prefix.
    last = render(tokenizer, {"messages": turns}, MESSAGES, index=0, chat_template=DROPS_REASONING,
                  train_on=TrainOn.COMPLETION)
    assert runs(tokenizer, last) == ["6.<|im_end|>"]


def test_read_chat_template(tmp_path):
    assert read_chat_template(None) is None
    (tmp_path / "t.jinja").write_text(CHATML, encoding="utf-8")
    assert read_chat_template(str(tmp_path / "t.jinja")) == CHATML
    (tmp_path / "latin1.jinja").write_bytes("{{ 'caf\u00e9' }}".encode("latin-1"))
    (tmp_path / "blank.jinja").write_text(" \n")
    for path, message in [(tmp_path / "none.jinja", "does not exist"),
                          (tmp_path / "latin1.jinja", "is not UTF-8 text (byte 7 is 0xe9)"),
                          (tmp_path / "blank.jinja", "is empty; give a Jinja chat template"),
                          (tmp_path, "cannot be read (Is a directory)")]:
        with pytest.raises(SoftcacheError, match="^" + re.escape(f"--chat-template {path} {message}") + "$"):
            read_chat_template(str(path))
