"""Persona prompts (governance/prompts.py): rendering, identity positions, alignment."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizer

from governance.errors import PromptError
from governance.inputs.personas import load_catalogue
from governance.inputs.prompts import USER_SUFFIX, PromptBuilder, PromptFormat
from governance.inputs.questions import Question
from governance.models.tiny import CHATML_TEMPLATE, tiny_tokenizer

CATALOGUE = load_catalogue()
PHRASES = [p.phrase for p in CATALOGUE.personas()]
INSTRUCTIONS = sorted(CATALOGUE.instructions)
QUESTION = Question(
    "geography-0001", "geography", "What is the capital of France?",
    ("Paris", "London", "Berlin", "Rome"), "A",
)

# A ChatML template that, like some models' templates, refuses a system message.
NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def no_system_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = NO_SYSTEM_TEMPLATE
    return tok


@pytest.fixture(params=["chat", "plain"])
def any_tokenizer(request, tokenizer, plain_tokenizer):
    return tokenizer if request.param == "chat" else plain_tokenizer


def builder(tok, instruction: str = "mirror", **fmt) -> PromptBuilder:
    return PromptBuilder(tok, PromptFormat(CATALOGUE.instruction(instruction), **fmt))


def decode_at(tok, ids, positions) -> str:
    return tok.decode([ids[i] for i in positions])


def outside(ids, identity) -> list[int]:
    keep = set(range(len(ids))) - set(identity)
    return [ids[i] for i in sorted(keep)]


# -- rendering -----------------------------------------------------------------------------


@pytest.mark.parametrize("instruction", INSTRUCTIONS)
def test_chat_prompt_puts_instruction_in_system_turn(tokenizer, instruction):
    b = builder(tokenizer, instruction)
    assert b.uses_chat_template
    text, span = b.render("a Black person", QUESTION)
    system = CATALOGUE.instruction(instruction).replace("{persona}", "a Black person")
    options = "A. Paris\nB. London\nC. Berlin\nD. Rome"
    assert text == (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION.question}\n{options}\n{USER_SUFFIX}<|im_end|>\n"
        "<|im_start|>assistant\nThe answer is"
    )
    assert text[span[0]:span[1]] == "a Black person"
    system_turn = text[: text.index("<|im_end|>")]
    assert span[1] <= len(system_turn)


@pytest.mark.parametrize("instruction", INSTRUCTIONS)
def test_plain_prompt_puts_instruction_first(plain_tokenizer, instruction):
    b = builder(plain_tokenizer, instruction)
    assert not b.uses_chat_template
    text, span = b.render("a woman", QUESTION)
    system = CATALOGUE.instruction(instruction).replace("{persona}", "a woman")
    assert text.startswith(f"{system}\n\n{QUESTION.question}\n")
    assert text.endswith(f"{USER_SUFFIX}\nThe answer is")
    assert text[span[0]:span[1]] == "a woman"


def test_no_persona_prompt(any_tokenizer):
    b = builder(any_tokenizer)
    text, span = b.render(None, QUESTION)
    assert span is None
    assert "You are" not in text and "<|im_start|>system" not in text
    assert text.endswith("The answer is")
    prompt = b.encode(None, QUESTION)
    assert prompt.identity == ()
    assert any_tokenizer.decode(list(prompt.ids)) == text


def test_custom_answer_prefix(tokenizer):
    b = builder(tokenizer, answer_prefix="Answer:")
    assert b.render("a man", QUESTION)[0].endswith("assistant\nAnswer:")


# -- identity positions ----------------------------------------------------------------------


@pytest.mark.parametrize("instruction", INSTRUCTIONS)
@pytest.mark.parametrize("phrase", PHRASES)
def test_identity_decodes_to_persona(any_tokenizer, instruction, phrase):
    b = builder(any_tokenizer, instruction)
    prompt = b.encode(phrase, QUESTION)
    identity = prompt.identity
    assert identity == tuple(range(identity[0], identity[-1] + 1))
    assert decode_at(any_tokenizer, prompt.ids, identity).strip() == phrase
    # the tokens just outside the identity span are not part of the phrase
    text, (start, end) = b.render(phrase, QUESTION)
    assert any_tokenizer.decode(list(prompt.ids[: identity[0]])) == text[: start - 1]
    assert any_tokenizer.decode(list(prompt.ids[identity[-1] + 1:])) == text[end:]


def test_identity_found_in_the_system_turn_not_elsewhere(tokenizer):
    # the persona phrase also occurs in the question: identity must be the system-turn copy
    q = Question("x-1", "x", "Is a man a person?", ("yes", "no", "maybe", "a man"), "A")
    b = builder(tokenizer)
    prompt = b.encode("a man", q)
    system_end = prompt.ids.index(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert prompt.identity[-1] < system_end
    assert decode_at(tokenizer, prompt.ids, prompt.identity).strip() == "a man"


# -- aligned pairs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clean", "corrupt"),
    [("a man", "a woman"), ("a lifelong Democrat", "a lifelong Republican"),
     ("a Jewish person", "a Christian person"), ("a human", "a person")],
)
@pytest.mark.parametrize("alignment", ["pad", "refuse"])
def test_pair_equal_length(any_tokenizer, clean, corrupt, alignment):
    b = builder(any_tokenizer, alignment=alignment)
    pair = b.pair(clean, corrupt, QUESTION)
    assert (pair.padded, pair.n_filler, pair.filler_id) == (None, 0, None)
    assert pair.question_id == QUESTION.id
    assert len(pair.clean_ids) == len(pair.corrupt_ids) == pair.length
    assert pair.clean_ids == b.encode(clean, QUESTION).ids
    assert pair.corrupt_ids == b.encode(corrupt, QUESTION).ids
    assert pair.identity == b.encode(clean, QUESTION).identity
    assert outside(pair.clean_ids, pair.identity) == outside(pair.corrupt_ids, pair.identity)
    assert pair.clean_ids != pair.corrupt_ids
    assert decode_at(any_tokenizer, pair.clean_ids, pair.identity).strip() == clean
    assert decode_at(any_tokenizer, pair.corrupt_ids, pair.identity).strip() == corrupt


@pytest.mark.parametrize(
    ("clean", "corrupt"),
    [("a Black person", "a White person"), ("a White person", "a Black person"),
     ("a human", "an average human"), ("a physically-disabled person", "a man")],
)
def test_pair_pads_the_shorter_phrase(any_tokenizer, clean, corrupt):
    b = builder(any_tokenizer)
    a, c = b.encode(clean, QUESTION), b.encode(corrupt, QUESTION)
    la, lc = len(a.identity), len(c.identity)
    assert la != lc, "test needs phrases of different token length"
    pair = b.pair(clean, corrupt, QUESTION)
    filler = any_tokenizer(" ", add_special_tokens=False)["input_ids"]
    assert filler == [pair.filler_id] == [b.filler_id()]
    n = abs(la - lc)
    assert pair.n_filler == n
    assert pair.padded == ("clean" if la < lc else "corrupt")
    assert len(pair.clean_ids) == len(pair.corrupt_ids) == max(len(a.ids), len(c.ids))
    start = a.identity[0]
    assert pair.identity == tuple(range(start, start + max(la, lc)))
    padded_ids, short, long_ids, long_ = (
        (pair.clean_ids, a, pair.corrupt_ids, c) if la < lc
        else (pair.corrupt_ids, c, pair.clean_ids, a)
    )
    # the filler sits immediately before the shorter phrase, then the phrase itself
    assert padded_ids[start:start + n] == (pair.filler_id,) * n
    assert padded_ids[start + n:] == short.ids[start:]
    assert padded_ids[:start] == short.ids[:start]
    assert long_ids == long_.ids
    assert outside(pair.clean_ids, pair.identity) == outside(pair.corrupt_ids, pair.identity)
    assert decode_at(any_tokenizer, pair.clean_ids, pair.identity).strip() == clean
    assert decode_at(any_tokenizer, pair.corrupt_ids, pair.identity).strip() == corrupt


@pytest.mark.parametrize(
    ("clean", "corrupt"), [("a Black person", "a White person"), ("a human", "an individual")]
)
def test_pair_refuse_names_both_phrases(any_tokenizer, clean, corrupt):
    b = builder(any_tokenizer, alignment="refuse")
    with pytest.raises(PromptError, match="differ in token length") as info:
        b.pair(clean, corrupt, QUESTION)
    assert repr(clean) in str(info.value) and repr(corrupt) in str(info.value)


@pytest.mark.parametrize("filler", [" xyzzy quux", ""])
def test_filler_must_be_one_token(tokenizer, filler):
    b = builder(tokenizer, filler=filler)
    with pytest.raises(PromptError, match="exactly one token"):
        b.pair("a Black person", "a White person", QUESTION)
    # equal-length pairs never need the filler
    assert b.pair("a man", "a woman", QUESTION).n_filler == 0


def test_custom_one_token_filler(tokenizer):
    b = builder(tokenizer, filler=",")
    pair = b.pair("a human", "an average human", QUESTION)
    comma = tokenizer(",", add_special_tokens=False)["input_ids"]
    assert [pair.filler_id] == comma
    start = pair.identity[0]
    assert pair.clean_ids[start:start + pair.n_filler] == tuple(comma) * pair.n_filler


# -- option letters ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["chat", "plain"])
def test_option_ids(tokenizer, plain_tokenizer, which):
    tok = tokenizer if which == "chat" else plain_tokenizer
    b = builder(tok)
    ids = b.option_ids()
    assert len(ids) == 4 and len(set(ids)) == 4
    for letter, option_id in zip("ABCD", ids, strict=True):
        full = tok(f"The answer is {letter}", add_special_tokens=False)["input_ids"]
        assert full[-1] == option_id
        assert tok.decode([option_id]) == f" {letter}"
    # the letter token follows the rendered prompt exactly as it follows the bare prefix
    text, _ = b.render("a man", QUESTION)
    prompt = b.encode("a man", QUESTION).ids
    assert tuple(tok(text + " C", add_special_tokens=False)["input_ids"]) == prompt + (ids[2],)
    assert b.option_ids() is ids  # cached


# -- tokenizers and templates ----------------------------------------------------------------


class _CharTokenizer(PreTrainedTokenizer):
    """A slow (pure Python) tokenizer: one token per character."""

    def __init__(self, **kwargs):
        self._vocab = {chr(i): i for i in range(32, 127)}
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def _tokenize(self, text, **kwargs):
        return list(text)

    def _convert_token_to_id(self, token):
        return self._vocab.get(token, 32)

    def _convert_id_to_token(self, index):
        return chr(index)


def test_slow_tokenizer_is_refused():
    slow = _CharTokenizer()
    assert not slow.is_fast
    with pytest.raises(PromptError, match="fast"):
        builder(slow)


def test_system_role_rejected_falls_back_to_user_turn(no_system_tokenizer, tokenizer):
    tok = no_system_tokenizer
    b = builder(tok)
    text, span = b.render("a Black person", QUESTION)
    assert "<|im_start|>system" not in text
    system = CATALOGUE.instruction().replace("{persona}", "a Black person")
    assert text.startswith(f"<|im_start|>user\n{system}\n\n{QUESTION.question}\n")
    assert text.endswith("<|im_start|>assistant\nThe answer is")
    assert text[span[0]:span[1]] == "a Black person"
    prompt = b.encode("a Black person", QUESTION)
    assert decode_at(tok, prompt.ids, prompt.identity).strip() == "a Black person"
    pair = b.pair("a Black person", "a White person", QUESTION)
    assert decode_at(tok, pair.corrupt_ids, pair.identity).strip() == "a White person"
    assert outside(pair.clean_ids, pair.identity) == outside(pair.corrupt_ids, pair.identity)
    # the no-persona prompt needs no fallback and matches the ChatML template's
    assert b.render(None, QUESTION) == builder(tokenizer).render(None, QUESTION)


@pytest.mark.parametrize("persona", [None, "a man"])
def test_template_that_always_fails_raises_prompt_error(persona):
    tok = tiny_tokenizer()
    tok.chat_template = "{{ raise_exception('broken template') }}"
    with pytest.raises(PromptError, match="broken template"):
        builder(tok).render(persona, QUESTION)


def test_template_repeating_system_text_is_refused():
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}\n{{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(PromptError, match="cannot locate the persona instruction"):
        builder(tok).render("a man", QUESTION)


def test_chatml_template_is_the_fixture_template(tokenizer, plain_tokenizer):
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert not plain_tokenizer.chat_template
