import pytest

from rlprims.data import arithmetic_preference_rows, arithmetic_sft_rows, preference_tokens, sft_tokens

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A real transformers tokenizer: one token per character, ChatML template, eos <|im_end|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(chr(c) for c in range(32, 127)) + "\n"))
    vocab = {c: i + 2 for i, c in enumerate(chars)} | {"<|im_start|>": 0, "<|im_end|>": 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   unk_token=" ")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHATML
    return fast


def decode(tokenizer, ids):
    return "".join(tokenizer.convert_ids_to_tokens(ids))


def test_single_turn_masks_exactly_the_response_and_eos(tokenizer):
    row = {"prompt": "2+2?", "response": "4"}
    ids, mask = sft_tokens(tokenizer, row)
    assert len(ids) == len(mask)
    prompt_text = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    assert decode(tokenizer, ids) == prompt_text + "4<|im_end|>"
    # prompt tokens False; "4" and <|im_end|> (2 tokens) True
    assert mask == [False] * n_prompt + [True, True]
    assert ids[-1] == tokenizer.eos_token_id
    # a chat-message prompt gives the same tokens as the str prompt
    assert sft_tokens(tokenizer, {"prompt": [{"role": "user", "content": "2+2?"}], "response": "4"}) == (ids, mask)


def test_multi_turn_masks_assistant_turns_only(tokenizer):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    ids, mask = sft_tokens(tokenizer, {"messages": messages})
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert decode(tokenizer, ids) == full
    trained = "".join(decode(tokenizer, [i]) for i, m in zip(ids, mask, strict=True) if m)
    # each assistant turn's content and end-of-turn tokens: "a1<|im_end|>\n" and "a2<|im_end|>\n"
    assert trained == "a1<|im_end|>\na2<|im_end|>\n"


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    class Rewriting:
        eos_token = "<e>"

        def apply_chat_template(self, messages, *, tokenize, add_generation_prompt):
            # drops earlier assistant content, like templates that strip old reasoning
            last = len(messages) - 1
            body = "".join(f"[{m['role']}:{m['content'] if m['role'] != 'assistant' or i == last else ''}]"
                           for i, m in enumerate(messages))
            return body + ("[assistant:" if add_generation_prompt else "")

        def __call__(self, text, *, add_special_tokens):
            return {"input_ids": [ord(c) for c in text]}

    messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "v"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="prefix"):
        sft_tokens(Rewriting(), {"messages": messages})


def test_preference_tokens_share_the_prompt(tokenizer):
    row = arithmetic_preference_rows(1, seed=0)[0]
    chosen, rejected = preference_tokens(tokenizer, row)
    n_prompt = chosen.loss_mask.index(True)
    assert chosen.input_ids[:n_prompt] == rejected.input_ids[:n_prompt]
    assert rejected.loss_mask.index(True) == n_prompt
    assert decode(tokenizer, chosen.input_ids[n_prompt:]) == row["chosen"] + "<|im_end|>"
    assert decode(tokenizer, rejected.input_ids[n_prompt:]) == row["rejected"] + "<|im_end|>"


def test_arithmetic_sft_row_tokenizes(tokenizer):
    row = arithmetic_sft_rows(1, seed=3, level=3)[0]
    ids, mask = sft_tokens(tokenizer, row)
    first = mask.index(True)
    assert not mask[0] and all(mask[first:])
    assert decode(tokenizer, ids[first:]) == row["response"] + "<|im_end|>"
    with pytest.raises(ValueError, match="row 0 response must be a non-empty str"):
        sft_tokens(tokenizer, {"prompt": "p", "response": ""})
