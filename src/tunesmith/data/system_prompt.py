"""The one system-prompt insertion (`data.system_prompt`), shared by training and evaluation."""

from __future__ import annotations

from tunesmith.data.formats import Conversation


def add_system_prompt(conversations: list[Conversation], system_prompt: str | None) -> list[Conversation]:
    """Prepend {"role": "system", "content": system_prompt} to every conversation that has no system turn.

    In place (and returned): training and evaluation must render the same prompt, so both call this.
    """
    if not system_prompt:
        return conversations
    for conversation in conversations:
        if conversation.messages[0]["role"] != "system":
            conversation.messages.insert(0, {"role": "system", "content": system_prompt})
    return conversations
