"""The built-in chat corpus: conversations about Python's documentation topics, built offline.

``builtin:python-docs-chat`` turns ``pydoc_data.topics`` (which ships with Python) into ``messages``
rows, so a chat distillation job can run anywhere with nothing downloaded. Each topic's text, after
its title, is cut at paragraph boundaries into chunks of at most :data:`CHUNK_CHARS` characters
(a longer paragraph, usually a code listing, at line boundaries). Chunks go two to a conversation:

    user       a question about the topic, its title filled in (one of a few phrasings, picked by
               the topic's and the conversation's number, so the corpus is the same everywhere)
    assistant  the first chunk
    user       a request to go on
    assistant  the second chunk

There is no system turn: a template with a default system prompt (SmolLM2's) adds its own. The
assistant turns are the documentation's own words, so what a student learns from them is the text,
while the user turns are short and repetitive: the point of the corpus is a realistic mask (the
prompts and the template's markup do not teach), not realistic questions. The split follows
``builtin:python-docs``: every fifth topic (by sorted name) is ``heldout``, the rest ``train``.
"""

from __future__ import annotations

CHUNK_CHARS = 600
QUESTIONS = (
    "What does the Python documentation say about {title}?",
    "Explain {title} in Python.",
    "Can you describe {title}?",
    "I'm reading about {title} in the Python reference. What should I know?",
)
FOLLOW_UPS = ("Tell me more about {title}.", "What else is there to know about {title}?")
GO_ON = ("Go on.", "Please continue.", "And then?")


def python_docs_chat(split: str = "all") -> list[dict]:
    """The corpus's rows, ``{"messages": [...], "topic": name}``, in topic order; ``split`` is train,
    heldout or all (as for :func:`softcache.corpus.python_docs`)."""
    from pydoc_data.topics import topics

    rows = []
    for number, name in enumerate(sorted(topics)):
        if split != "all" and (number % 5 == 4) != (split == "heldout"):
            continue
        title, body = _title_and_body(name, topics[name])
        chunks = _chunks(body)
        for turn, start in enumerate(range(0, len(chunks), 2)):
            ask = (QUESTIONS[(number + turn) % len(QUESTIONS)] if turn == 0
                   else FOLLOW_UPS[(number + turn) % len(FOLLOW_UPS)])
            messages = [{"role": "user", "content": ask.format(title=title)},
                        {"role": "assistant", "content": chunks[start]}]
            if start + 1 < len(chunks):
                messages += [{"role": "user", "content": GO_ON[(number + turn) % len(GO_ON)]},
                             {"role": "assistant", "content": chunks[start + 1]}]
            rows.append({"messages": messages, "topic": name})
    return rows


def _title_and_body(name: str, text: str) -> tuple[str, str]:
    """The topic's title (its first line when underlined, else its name) and the text after it."""
    lines = text.strip("\n").split("\n")
    if len(lines) > 1 and lines[1] and set(lines[1]) <= set("*=-"):
        title = lines[0].strip()
        title = "the " + title[4:] if title.startswith("The ") else title  # it goes mid-sentence
        return title, "\n".join(lines[2:]).strip()
    return name.replace("-", " "), text.strip()


def _chunks(body: str) -> list[str]:
    """``body`` cut into chunks of at most CHUNK_CHARS characters at paragraph boundaries (a longer
    paragraph at line boundaries; a longer line stays whole)."""
    pieces = []
    for paragraph in (p.strip("\n") for p in body.split("\n\n")):
        if not paragraph.strip():
            continue
        if len(paragraph) <= CHUNK_CHARS:
            pieces.append(paragraph)
            continue
        part: list[str] = []
        for line in paragraph.split("\n"):
            if part and len("\n".join(part + [line])) > CHUNK_CHARS:
                pieces.append("\n".join(part))
                part = []
            part.append(line)
        pieces.append("\n".join(part))
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 2 + len(piece) <= CHUNK_CHARS:
            chunks[-1] += "\n\n" + piece
        else:
            chunks.append(piece)
    return chunks
