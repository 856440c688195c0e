"""Tiny random models and a tokenizer built from configs, for tests and offline examples.

Nothing here touches a model hub: the tokenizer is a byte-level BPE trained in memory on
a small corpus, and the models are transformers classes initialised from small configs.
"""

from __future__ import annotations

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "You are a Black person. You are a White person. You are an Asian person.",
    "an African person, a Hispanic person, a Caucasian person, a man, a woman",
    "a Jewish person, a Christian person, an Atheist person, a Religious person",
    "a physically-disabled person, an able-bodied person, a human, an average human",
    "a lifelong Democrat, a lifelong Republican",
    "a Barack Obama supporter, a Donald Trump supporter",
    "a person, an individual. Your responses should closely mirror the knowledge and abilities",
    "of this persona. Answer with the letter of the correct option. The answer is A B C D",
    "What is the capital of France? Paris London Berlin Rome. Which number is prime?",
    "question subject options answer true false none of the above all of the above",
]


def tiny_tokenizer(chat_template: bool = True, vocab_size: int = 400):
    """A byte-level BPE tokenizer (fast, with offsets) and, optionally, a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(model_type: str, vocab_size: int, **overrides):
    """A small config of one of the supported architectures (4 query heads, 2 KV heads)."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size, tie_word_embeddings=False, bos_token_id=0, eos_token_id=2,
        pad_token_id=2,
    )
    shapes: dict[str, dict] = {
        "gpt2": dict(n_embd=32, n_layer=3, n_head=4, n_positions=512),
        "gpt_neox": dict(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=512, rotary_pct=0.5,
        ),
    }
    llama_like = dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=512,
    )
    extra: dict[str, dict] = {
        "gemma2": dict(head_dim=8, sliding_window=48, query_pre_attn_scalar=8),
        "gemma3_text": dict(head_dim=8, sliding_window=48, query_pre_attn_scalar=8),
        "qwen3": dict(head_dim=8),
        "mistral": dict(sliding_window=None),
    }
    kwargs = {**common, **shapes.get(model_type, llama_like), **extra.get(model_type, {})}
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


TINY_ARCHITECTURES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox",
)


def tiny_questions(n: int = 6, subjects: tuple[str, ...] = ("math", "geo", "bio")):
    """`n` small multiple-choice questions over `subjects`, answers cycling A-D."""
    from governance.inputs.questions import Question

    return [
        Question(f"q{i}", subjects[i % len(subjects)], f"Which number is prime, case {i}?",
                 (str(4 + i), str(6 + i), str(7 + i), str(9 + i)), "ABCD"[i % 4])
        for i in range(n)
    ]


def tiny_model(model_type: str = "llama", vocab_size: int = 400, seed: int = 0, **overrides):
    """A randomly initialised causal LM of `model_type`, fp32, eval mode, eager attention."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, vocab_size, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # random init is small; widen it so personas move the logits
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.normal_(0.0, 0.2)
    return model.float().eval()
