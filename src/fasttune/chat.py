"""Chat and generation with a base model (+ a trained adapter), through the model's own chat template."""
from __future__ import annotations

from typing import Callable

from .data.chat_templates import chat_template_for
from .data.tokenize import generation_prompt_ids
from .generation import Generator, SamplingParams


class ChatSession:
    """Keeps the conversation; `reply(text)` appends the user turn, generates, appends the assistant turn."""

    def __init__(self, model, tokenizer, system: str | None = None, chat_template: str | None = None,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int = 0):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.template = chat_template_for(tokenizer, chat_template)
        self.system = system
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        self.seed, self.turns = seed, 0
        self.stop_ids = stop_token_ids(tokenizer, self.template)
        self.generator: Generator | None = None  # one slot, its cache grown as the conversation grows

    def reply(self, text: str) -> str:
        self.messages.append({"role": "user", "content": text})
        answer = self.complete(self.messages)
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def reset(self) -> None:
        """Forget the conversation; the system prompt stays."""
        self.messages = self.messages[:1] if self.system else []

    def complete(self, messages: list[dict]) -> str:
        ids = generation_prompt_ids(messages, self.tokenizer, self.template)
        return self._generate(ids)

    def _generate(self, ids: list[int]) -> str:
        needed = len(ids) + self.max_new_tokens
        if self.generator is None or self.generator.max_seq_len < needed:
            if self.generator is not None:
                self.generator.release()
            size = max(needed, 2 * self.generator.max_seq_len if self.generator is not None else 1024)
            self.generator = Generator(self.model, max_batch_size=1, max_seq_len=size, tokenizer=self.tokenizer)
        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=max(self.temperature, 0.0),
                                top_p=self.top_p, top_k=self.top_k, stop_token_ids=self.stop_ids,
                                seed=self.seed + self.turns)
        self.turns += 1
        new = self.generator.generate([ids], params)[0][0]
        if new and new[-1] in self.stop_ids:
            new = new[:-1]
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()


CHAT_HELP = ("commands: /reset clears the conversation (the system prompt stays), /exit or /quit (or Ctrl-D) quits, "
             "/help shows this; start a message with // to send one that begins with /")


def chat_loop(session: ChatSession, read: Callable[[str], str] | None = None,
              write: Callable[[str], None] | None = None) -> None:
    """`fasttune chat`: read a line, answer it. Lines starting with / are commands, answered here and never sent to
    the model (an unknown one is named, with the list); `//text` sends `/text`. Ends at /exit, /quit or EOF."""
    read = read or input  # looked up per call, not bound at import
    write = write or (lambda text: print(text, flush=True))
    write("fasttune chat: type a message; /help lists the commands, /exit (or Ctrl-D) quits.")
    while True:
        try:
            text = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("")
            return
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            command = text.split()[0]
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                session.reset()
                write("(conversation cleared)")
            elif command == "/help":
                write(CHAT_HELP)
            else:
                write(f"unknown command {command}; {CHAT_HELP}")
            continue
        write("assistant> " + session.reply(text[1:] if text.startswith("//") else text))


def stop_token_ids(tokenizer, template) -> list[int]:
    """EOS plus the template's end-of-turn marker when it is a single token (ChatML's <|im_end|>, Llama 3's
    <|eot_id|>, ...), so generation stops at the end of the assistant's turn."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    stop = template.stop_text(tokenizer.eos_token) if template is not None else None
    candidates = [stop] if stop else []
    candidates += ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"]
    vocab = tokenizer.get_vocab()
    for text in candidates:
        text = text.strip() if text else text
        if text and text in vocab and vocab[text] not in ids:
            ids.append(vocab[text])
    return ids


def generate_text(model, tokenizer, prompt: str, *, chat: bool = True, **kwargs) -> str:
    session = ChatSession(model, tokenizer, **kwargs)
    if chat:
        return session.complete([{"role": "user", "content": prompt}])
    ids = tokenizer(prompt)["input_ids"]
    return session._generate(ids)
