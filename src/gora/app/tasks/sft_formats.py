"""The row formats of causal-LM supervised fine-tuning, turned into `SftExample`s (text segments marked learned or
not).

Three row formats (DataConfig.sft_format; "auto" takes the first whose columns the data has):
  messages           a conversation [{role, content}, ...] rendered by the tokenizer's chat template; the loss is on
                     every assistant turn (its content and the template's end-of-turn marker)
  prompt-completion  TRL's: strings concatenated as they are (prompt + completion + eos, loss on the completion), or
                     both lists of messages (chat template; loss on the completion's assistant turns)
  prompt-response    gora's own: the prompt in the chat template's user turn (generation prompt included) if the
                     tokenizer has a template, else followed by a newline; loss on the response (+ eos)
Each row becomes an `SftExample`: text segments marked learned or not, the text a model generates from at
evaluation, and the reference answer for exact match.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    from ..config.runconfig import DataConfig

logger = logging.getLogger(__name__)

SFT_FORMATS = ("messages", "prompt-completion", "prompt-response")


@dataclass(frozen=True)
class SftExample:
    """One SFT example as text.

    Attributes:
        segments: (text, learned) in order; the tokens of learned segments carry the loss.
        head: What the model is given to generate from at evaluation (the prompt as the model sees it).
        answer: The reference final answer for exact match (the answer column, else parsed from the target text).
        special_tokens: Whether the first segment is tokenized with the tokenizer's special tokens (plain text; a
            chat template writes its own).
        eos: Whether the example ends with the eos token (appended when the text does not end with it).
    """

    segments: tuple[tuple[str, bool], ...]
    head: str
    answer: str | None
    special_tokens: bool = False
    eos: bool = False


def prompt_and_response_text(tokenizer: Any, prompt: str, response: str | None = None) -> tuple[str, str]:
    """The prompt as the model sees it (chat template with the generation prompt, if the tokenizer has one) and the
    response text that follows it (ending with the end-of-turn / end-of-sequence marker)."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        if response is None:
            return head, ""
        full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(head):
            return head, full[len(head) :]
        logger.debug("chat template does not extend the generation prompt; using a plain continuation")
        return head, response + (tokenizer.eos_token or "")
    head = prompt.rstrip() + "\n"
    return head, "" if response is None else response + (tokenizer.eos_token or "")


def resolve_sft_format(data: DataConfig, columns: set[str], source: str) -> str:
    """The row format of SFT data: `data.sft_format`, or with "auto" the first of messages, prompt-completion,
    prompt-response whose columns the data has.

    Raises:
        UsageError: the columns of no format (auto), or of the format asked for, are there.
    """
    needs = {
        "messages": [(data.messages_column, "--messages-column")],
        "prompt-completion": [
            (data.prompt_column, "--prompt-column"),
            (data.completion_column, "--completion-column"),
        ],
        "prompt-response": [(data.prompt_column, "--prompt-column"), (data.response_column, "--response-column")],
    }
    if data.sft_format != "auto":
        for column, option in needs[data.sft_format]:
            if column not in columns:
                raise UsageError(
                    f"{source} has no column {column!r} (columns: {', '.join(sorted(map(str, columns)))}): name the "
                    f"right one with {option}"
                )
        return data.sft_format
    for fmt in SFT_FORMATS:
        if all(column in columns for column, _ in needs[fmt]):
            return fmt
    raise UsageError(
        f"{source} has none of the SFT formats' columns (columns: {', '.join(sorted(map(str, columns)))}): give "
        f"{data.messages_column!r} (chat messages), {data.prompt_column!r} + {data.completion_column!r}, or "
        f"{data.prompt_column!r} + {data.response_column!r} columns, or name yours with --messages-column, "
        "--prompt-column, --completion-column, --response-column"
    )


def sft_examples(
    rows: Sequence[dict[str, Any]], tokenizer: Any, data: DataConfig, fmt: str, source: str
) -> list[SftExample]:
    """The rows of SFT data in format `fmt` as `SftExample`s.

    Raises:
        UsageError: a conversation that is not a list of {role, content} messages, one without an assistant turn,
            messages without a chat template, or a chat template under which the assistant turns cannot be found.
    """
    from .. import assets

    def answer(row: dict[str, Any], target: str) -> str | None:
        return str(row[data.answer_column]) if data.answer_column else assets.final_answer(target)

    out = []
    for number, row in enumerate(rows, 1):
        where = f"row {number} of {source}"
        if fmt == "messages":
            messages = _messages(row[data.messages_column], f"{where}, column {data.messages_column!r}")
            learned = [m["role"] == "assistant" for m in messages]
            if not any(learned):
                raise UsageError(
                    f"{where} has no assistant turn in {data.messages_column!r}: every conversation needs at least "
                    "one assistant message to learn from (add the reply, or drop the row)"
                )
            last = max(i for i, flag in enumerate(learned) if flag)
            out.append(
                _chat_example(tokenizer, messages, learned, last, answer(row, messages[last]["content"]), where)
            )
            continue
        prompt, target_column = (
            row[data.prompt_column],
            (data.completion_column if fmt == "prompt-completion" else data.response_column),
        )
        target = row[target_column]
        if fmt == "prompt-completion" and not isinstance(prompt, str):  # conversational prompt-completion
            prompt_messages = _messages(prompt, f"{where}, column {data.prompt_column!r}")
            completion = _messages(target, f"{where}, column {target_column!r}")
            messages = prompt_messages + completion
            learned = [i >= len(prompt_messages) and m["role"] == "assistant" for i, m in enumerate(messages)]
            if not any(learned):
                raise UsageError(
                    f"{where} has no assistant turn in its completion {target_column!r}: nothing to learn"
                )
            last = max(i for i, flag in enumerate(learned) if flag)
            out.append(
                _chat_example(tokenizer, messages, learned, last, answer(row, messages[last]["content"]), where)
            )
        elif fmt == "prompt-completion":
            prompt, target = str(prompt), str(target)
            out.append(SftExample(((prompt, False), (target, True)), prompt, answer(row, target), True, True))
        else:
            chat = bool(getattr(tokenizer, "chat_template", None))
            head, tail = prompt_and_response_text(tokenizer, str(prompt), str(target))
            out.append(SftExample(((head, False), (tail, True)), head, answer(row, str(target)), not chat, not chat))
    return out


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    """A conversation as a list of {"role", "content"} with text content (a JSON string of one is read too)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise UsageError(f"{where} is text, not a list of messages: {err}") from err
    ok = isinstance(value, (list, tuple)) and len(value) > 0
    ok = ok and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    if not ok:
        raise UsageError(f"{where} must be a non-empty list of messages {{'role': ..., 'content': <text>}}")
    return [dict(m) for m in value]


def _chat_example(
    tokenizer: Any, messages: list[dict[str, str]], learned: list[bool], last: int, answer: str | None, where: str
) -> SftExample:
    """The segments of a conversation under the tokenizer's chat template, found by rendering prefixes: a learned
    turn i spans from the end of render(messages[:i], generation prompt) to the end of render(messages[:i+1])."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            f"{where}: chat messages need a tokenizer with a chat template, and this one has none: set "
            "tokenizer.chat_template and save it in the model folder, or use prompt/completion columns"
        )

    def render(prefix: list[dict[str, str]], generation: bool) -> str:
        try:
            return tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation)
        except Exception as err:  # the template refuses this conversation (roles, order)
            raise UsageError(f"{where}: the chat template cannot render this conversation ({err})") from err

    segments: list[tuple[str, bool]] = []
    done = ""
    for i, flag in enumerate(learned):
        if not flag:
            continue
        head, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not (head.startswith(done) and full.startswith(head)):
            raise UsageError(
                f"{where}: the chat template renders the conversation differently as it grows (a turn's text "
                "changes once later turns follow), so the assistant turns cannot be told apart: use prompt/completion "
                "columns instead"
            )
        segments += [(head[len(done) :], False), (full[len(head) :], True)]
        done = full
    whole = render(messages, False)
    if not whole.startswith(done):
        raise UsageError(f"{where}: the chat template renders the whole conversation differently from its turns")
    if whole[len(done) :]:
        segments.append((whole[len(done) :], False))
    return SftExample(tuple(s for s in segments if s[0]), render(messages[:last], True), answer)
