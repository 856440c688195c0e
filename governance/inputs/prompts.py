"""Persona prompts as token ids: rendering, identity positions, alignment, option letters.

A prompt puts the persona instruction in the system message (the model's chat template
when it has one, a plain template otherwise) and ends with the assistant's "The answer is",
so the next token is the answer letter. Identity positions are the tokens whose character
offsets overlap the persona phrase, found from the tokenizer's offset mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from governance.errors import PromptError
from governance.inputs.questions import LETTERS, Question

Alignment = Literal["pad", "refuse"]
USER_SUFFIX = "Answer with the letter of the correct option."


@dataclass(frozen=True)
class PromptFormat:
    instruction: str  # contains "{persona}" once
    answer_prefix: str = "The answer is"
    alignment: Alignment = "pad"
    filler: str = " "  # text whose single token pads the shorter persona phrase


@dataclass(frozen=True)
class PersonaPrompt:
    """One persona's prompt for one question. `identity` is empty for the no-persona prompt."""

    ids: tuple[int, ...]
    identity: tuple[int, ...]


@dataclass(frozen=True)
class AlignedPair:
    """Clean and corrupt prompts of equal length that differ only at `identity`."""

    question_id: str
    clean_ids: tuple[int, ...]
    corrupt_ids: tuple[int, ...]
    identity: tuple[int, ...]
    padded: Literal["clean", "corrupt"] | None = None
    n_filler: int = 0
    filler_id: int | None = None

    @property
    def length(self) -> int:
        return len(self.clean_ids)


def _user_message(question: Question) -> str:
    options = "\n".join(f"{c}. {o}" for c, o in zip(LETTERS, question.options, strict=True))
    return f"{question.question}\n{options}\n{USER_SUFFIX}"


@dataclass
class PromptBuilder:
    """Turns (persona, question) into token ids for one tokenizer."""

    tokenizer: object
    fmt: PromptFormat
    _option_ids: tuple[int, ...] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not getattr(self.tokenizer, "is_fast", False):
            raise PromptError(
                "the tokenizer must be a fast (Rust) tokenizer: identity positions are found "
                "from its offset mapping"
            )

    @property
    def uses_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, persona: str | None, question: Question) -> tuple[str, tuple[int, int] | None]:
        """The prompt text and the character span of the persona phrase in it."""
        system = self.fmt.instruction.replace("{persona}", persona) if persona else None
        user = _user_message(question)
        if self.uses_chat_template:
            text = self._chat(system, user)
        else:
            text = (f"{system}\n\n" if system else "") + f"{user}\n"
        text += self.fmt.answer_prefix
        if persona is None:
            return text, None
        if system is None or text.count(system) != 1:
            raise PromptError(
                f"cannot locate the persona instruction for {persona!r} in the rendered prompt "
                "(the chat template changed or repeated the system text)"
            )
        start = text.index(system) + self.fmt.instruction.index("{persona}")
        return text, (start, start + len(persona))

    def _chat(self, system: str | None, user: str) -> str:
        tok = self.tokenizer
        messages = [{"role": "user", "content": user}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        try:
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # templates without a system role raise from jinja
            if system is None:
                raise PromptError(f"the chat template failed on a user message: {exc}") from exc
            merged = [{"role": "user", "content": f"{system}\n\n{user}"}]
            try:
                return tok.apply_chat_template(
                    merged, tokenize=False, add_generation_prompt=True
                )
            except Exception as exc2:
                raise PromptError(
                    f"the chat template failed with a system message ({exc}) and with the "
                    f"instruction merged into the user message ({exc2})"
                ) from exc2

    def encode(self, persona: str | None, question: Question) -> PersonaPrompt:
        text, span = self.render(persona, question)
        enc = self.tokenizer(
            text, add_special_tokens=not self.uses_chat_template, return_offsets_mapping=True
        )
        ids = tuple(int(i) for i in enc["input_ids"])
        if span is None:
            return PersonaPrompt(ids, ())
        start, end = span
        identity = tuple(
            i
            for i, (a, b) in enumerate(enc["offset_mapping"])
            if b > a and a < end and b > start
        )
        if not identity:
            raise PromptError(f"persona {persona!r} maps to no token of the prompt (question "
                              f"{question.id}); the tokenizer's offsets do not cover it")
        if identity != tuple(range(identity[0], identity[-1] + 1)):
            raise PromptError(f"persona {persona!r} maps to non-contiguous tokens {identity}")
        return PersonaPrompt(ids, identity)

    def filler_id(self) -> int:
        ids = self.tokenizer(self.fmt.filler, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise PromptError(
                f"the alignment filler {self.fmt.filler!r} is {len(ids)} tokens for this "
                "tokenizer; choose a filler text that is exactly one token"
            )
        return int(ids[0])

    def pair(self, clean: str, corrupt: str, question: Question) -> AlignedPair:
        """Align the two personas' prompts token for token (see `PromptFormat.alignment`)."""
        a, b = self.encode(clean, question), self.encode(corrupt, question)
        a0, a1 = a.identity[0], a.identity[-1] + 1
        b0, b1 = b.identity[0], b.identity[-1] + 1
        if a.ids[:a0] != b.ids[:b0] or a.ids[a1:] != b.ids[b1:]:
            raise PromptError(
                f"the prompts for {clean!r} and {corrupt!r} tokenize differently outside the "
                "persona phrase (a merge across its boundary); rephrase one of them"
            )
        la, lb = a1 - a0, b1 - b0
        if la == lb:
            return AlignedPair(question.id, a.ids, b.ids, a.identity)
        if self.fmt.alignment == "refuse":
            raise PromptError(
                f"persona phrases {clean!r} ({la} tokens) and {corrupt!r} ({lb} tokens) differ "
                "in token length and alignment is 'refuse'; use alignment 'pad' or choose "
                "phrases of equal length"
            )
        filler = self.filler_id()
        n = abs(la - lb)
        if la < lb:
            clean_ids = a.ids[:a0] + (filler,) * n + a.ids[a0:]
            corrupt_ids, padded = b.ids, "clean"
        else:
            clean_ids = a.ids
            corrupt_ids, padded = b.ids[:b0] + (filler,) * n + b.ids[b0:], "corrupt"
        identity = tuple(range(a0, a0 + max(la, lb)))
        return AlignedPair(question.id, clean_ids, corrupt_ids, identity, padded, n, filler)

    def option_ids(self) -> tuple[int, ...]:
        """The token id of each answer letter as the tokenizer spells it after the prefix."""
        if self._option_ids is None:
            self._option_ids = self._find_option_ids()
        return self._option_ids

    def _find_option_ids(self) -> tuple[int, ...]:
        tok = self.tokenizer
        prefix = tok(self.fmt.answer_prefix, add_special_tokens=False)["input_ids"]
        for sep in (" ", ""):
            ids = []
            for letter in LETTERS:
                full = tok(self.fmt.answer_prefix + sep + letter, add_special_tokens=False)
                full_ids = full["input_ids"]
                if len(full_ids) == len(prefix) + 1 and full_ids[: len(prefix)] == prefix:
                    ids.append(int(full_ids[-1]))
            if len(ids) == 4 and len(set(ids)) == 4:
                return tuple(ids)
        raise PromptError(
            f"cannot find single-token answer letters after {self.fmt.answer_prefix!r} for "
            "this tokenizer (tried ' A' and 'A')"
        )
