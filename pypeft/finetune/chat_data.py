"""Data for `pypeft finetune --task causal-lm`: conversations to continue, and the BBC demo.

A data file is JSONL (one object a line; .jsonl / .ndjson) or JSON (a list of
objects; .json), every object in one of three forms:
- {"prompt": ..., "response": ...} (optionally "system": ...): one user turn
  and the answer to learn;
- {"messages": [{"role": ..., "content": ...}, ...]}: a conversation whose last
  message is the assistant's, the answer to learn;
- {"text": ...}: plain text, every token learnt (no chat template).
Chat forms may be mixed in one file; plain text may not be mixed with them.

The default data ("bbc") is the BBC News corpus asked as an instruction:
"Which category is this article: business, entertainment, ...? <article>"
answered by the category's name, so that what the model learnt is measured
as exact-match accuracy of its greedy answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pypeft.finetune.data import BBC, _json_rows, _jsonl_rows, load_bbc
from pypeft.finetune.errors import UsageError

CHAT, TEXT = "chat", "text"
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    messages: list[dict]       # the conversation before the answer (empty for plain text)
    response: str              # what the model learns to write (plain text: the whole text)
    group: int = 0             # a class for a stratified split (the BBC category); 0 for files


@dataclass
class ChatDataset:
    examples: list[Example]
    kind: str                  # CHAT or TEXT
    source: str                # "bbc" or the file's path, for the report
    groups: list[str] = field(default_factory=list)   # group id -> name (BBC's categories)

    def __len__(self) -> int:
        return len(self.examples)

    def subset(self, indices: list[int]) -> "ChatDataset":
        return ChatDataset([self.examples[i] for i in indices], self.kind, self.source, self.groups)


def bbc_question(categories: list[str]) -> str:
    listed = ", ".join(categories[:-1]) + f" or {categories[-1]}"
    return f"Which category is this article: {listed}? Answer with the category only.\n\n"


def load_bbc_instructions() -> ChatDataset:
    """Each BBC article as a question whose answer is its category's name."""
    bbc = load_bbc()
    question = bbc_question(bbc.label_names)
    examples = [Example([{"role": "user", "content": question + text}], bbc.label_names[label], label)
                for text, label in zip(bbc.texts, bbc.labels)]
    return ChatDataset(examples, CHAT, BBC, list(bbc.label_names))


def _string(row: dict, key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise UsageError(f"{where}: '{key}' is {json.dumps(value)[:60]}; expected a string")
    return value


def _messages(row: dict, where: str) -> tuple[list[dict], str]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or \
                message.get("role") not in ROLES:
            raise UsageError(f"{where}: message {number} must be an object with 'role' (one of "
                             f"{', '.join(ROLES)}) and string 'content', got {json.dumps(message)[:80]}")
    if messages[-1]["role"] != "assistant":
        raise UsageError(f"{where}: the last message must be the assistant's (the answer to learn), got "
                         f"role {messages[-1]['role']!r}")
    if len(messages) < 2:
        raise UsageError(f"{where}: 'messages' holds only the answer; expected a user message before it")
    return [{"role": m["role"], "content": m["content"]} for m in messages[:-1]], messages[-1]["content"]


def _example(row: dict, where: str) -> tuple[str, Example]:
    if "messages" in row:
        messages, response = _messages(row, where)
        return CHAT, Example(messages, response)
    if "prompt" in row or "response" in row:
        for key in ("prompt", "response"):
            if key not in row:
                raise UsageError(f"{where}: has '{'response' if key == 'prompt' else 'prompt'}' but no '{key}'")
        messages = [{"role": "user", "content": _string(row, "prompt", where)}]
        if "system" in row:
            messages.insert(0, {"role": "system", "content": _string(row, "system", where)})
        return CHAT, Example(messages, _string(row, "response", where))
    if "text" in row:
        return TEXT, Example([], _string(row, "text", where))
    shown = ", ".join(repr(k) for k in row) or "none"
    raise UsageError(f"{where}: expected 'prompt' and 'response', 'messages', or 'text', got keys {shown}")


def load_chat_file(path: str | Path) -> ChatDataset:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".json"):
        raise UsageError(f"argument --data: expected 'bbc' or a .jsonl/.ndjson/.json file for --task causal-lm, "
                         f"got {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise UsageError(f"argument --data: cannot read {path} ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    rows = _json_rows(path, text) if suffix == ".json" else _jsonl_rows(path, text)
    kinds, examples = set(), []
    for where, row, _ in rows:
        kind, example = _example(row, where)
        kinds.add(kind)
        if len(kinds) > 1:
            raise UsageError(f"{where}: plain 'text' mixed with chat examples; give one kind per file")
        examples.append(example)
    if not examples:
        raise UsageError(f"{path}: no examples")
    return ChatDataset(examples, kinds.pop(), str(path))


def load_chat_data(spec: str) -> ChatDataset:
    return load_bbc_instructions() if spec == BBC else load_chat_file(spec)
