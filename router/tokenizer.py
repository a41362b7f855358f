"""The model's tokenizer and chat template, loaded from its checkpoint directory."""

import json
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from llmserve.router.chat_template import ChatTemplate


def _token_text(value: object) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    """Encodes prompts, renders chat messages, and makes incremental decoders."""

    def __init__(self, tokenizer: Tokenizer, chat_template: ChatTemplate | None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "TextTokenizer":
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json")
        config_file = model_dir / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: use the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if source is None and (model_dir / "chat_template.jinja").is_file():
            source = (model_dir / "chat_template.jinja").read_text()
        specials = {
            key: _token_text(config.get(key))
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        template = ChatTemplate(source, specials) if source else None
        return cls(Tokenizer.from_file(str(tokenizer_file)), template)

    def encode(self, text: str) -> list[int]:
        """Token ids of a plain prompt, with the tokenizer's own special tokens (e.g. BOS)."""
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if self.chat_template is None:
            raise ValueError("messages: this model has no chat template; send a prompt instead")
        return self.chat_template.render(messages)

    def encode_chat(self, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        """Renders the conversation; the template already holds any special tokens it needs."""
        text = self.render_chat(messages)
        return text, self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode_stream(self) -> DecodeStream:
        return DecodeStream(skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
