"""Token ids of causal-LM examples: the prompt as the model's chat template
renders it (up to the assistant's turn) and the response after it, each
example fitted into max_length.

The response is what the template writes for the assistant's message, its
end-of-turn marker included, so that the model learns to stop. A tokenizer
without a chat template gets the plain layout "<turns joined by blank
lines>\\n" + response + eos. Fitting never drops the answer: the last user
message's content is shortened (its end cut) until prompt and response fit; a
response longer than half of max_length is itself cut at its end. Plain text
is cut at max_length.
"""

from __future__ import annotations

from dataclasses import dataclass

from pypeft.finetune.chat_data import TEXT, ChatDataset, Example
from pypeft.finetune.errors import UsageError


@dataclass
class Encoded:
    prompts: list[list[int]]     # ids before the answer (empty for plain text)
    responses: list[list[int]]   # ids of the answer, end-of-turn included (plain text: all of it)
    shortened: int               # examples whose prompt or response was cut to fit

    def __len__(self) -> int:
        return len(self.prompts)


class ChatFormat:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.templated = bool(getattr(tokenizer, "chat_template", None))

    # --- text ----------------------------------------------------------------------
    def prompt_text(self, messages: list[dict]) -> str:
        if self.templated:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages) + "\n"

    def response_text(self, messages: list[dict], response: str) -> str:
        if not self.templated:
            return response + (self.tokenizer.eos_token or "")
        prompt = self.prompt_text(messages)
        full = self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                                  tokenize=False)
        if not full.startswith(prompt):
            raise UsageError("the model's chat template writes the conversation differently with and without "
                             "the answer (it does not end the prompt where the answer starts); give plain "
                             "{text} examples instead")
        return full[len(prompt):]

    def ids(self, text: str) -> list[int]:
        # The template's text carries its own special tokens (BOS where the model wants one).
        special = not self.templated
        return self.tokenizer(text, add_special_tokens=special)["input_ids"] if text else []

    # --- fitting -------------------------------------------------------------------
    def encode_example(self, example: Example, max_length: int, kind: str) -> tuple[list[int], list[int], bool]:
        if kind == TEXT:
            ids = self.tokenizer(example.response, add_special_tokens=True)["input_ids"]
            return [], ids[:max_length], len(ids) > max_length
        response = self.tokenizer(self.response_text(example.messages, example.response),
                                  add_special_tokens=False)["input_ids"]
        shortened = False
        if len(response) > max_length // 2:
            response, shortened = response[:max_length // 2], True
        messages = [dict(m) for m in example.messages]
        prompt = self.ids(self.prompt_text(messages))
        budget = max_length - len(response)
        if len(prompt) > budget:
            shortened = True
            prompt = self._shorten(messages, prompt, budget, len(response))
        return prompt, response, shortened

    def _shorten(self, messages: list[dict], prompt: list[int], budget: int, answer: int) -> list[int]:
        """Cut the end of the last user message until the rendered prompt fits
        (decoding and re-encoding can shift a token or two, so it re-checks)."""
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise UsageError(f"an example's prompt has {len(prompt)} tokens and no user message to shorten; "
                             f"raise --max-length above {len(prompt)}")
        last = messages[users[-1]]
        content = self.tokenizer(last["content"], add_special_tokens=False)["input_ids"]
        overhead = len(prompt) - len(content)
        keep = budget - overhead
        for _ in range(8):
            if keep < 1:
                raise UsageError(f"argument --max-length: expected room for the prompt's text beside the chat "
                                 f"template's {overhead} tokens and the answer's {answer} tokens, got "
                                 f"{overhead + answer}; raise --max-length")
            last["content"] = self.tokenizer.decode(content[:keep])
            prompt = self.ids(self.prompt_text(messages))
            if len(prompt) <= budget:
                return prompt
            keep -= len(prompt) - budget
        return prompt[:budget]  # never reached in practice; keeps the budget if re-encoding keeps drifting

    def encode(self, data: ChatDataset, max_length: int) -> Encoded:
        prompts, responses, shortened = [], [], 0
        for example in data.examples:
            prompt, response, cut = self.encode_example(example, max_length, data.kind)
            prompts.append(prompt)
            responses.append(response)
            shortened += cut
        return Encoded(prompts, responses, shortened)

    # --- generation ----------------------------------------------------------------
    def stop_ids(self, generation_config=None) -> list[int]:
        """Token ids that end the assistant's turn: eos, the generation config's
        eos ids, and the special token the template puts after an answer."""
        ids = set()
        for source in (self.tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        if self.templated:
            probe = [{"role": "user", "content": "hi"}]
            answer = self.tokenizer("ok", add_special_tokens=False)["input_ids"]
            after = self.tokenizer(self.response_text(probe, "ok"), add_special_tokens=False)["input_ids"]
            special = set(self.tokenizer.all_special_ids)
            rest = after[len(answer):] if after[:len(answer)] == answer else []
            ids.update(i for i in rest[:1] if i in special)
        return sorted(ids)
