"""The assistant: answers customers in the order chat from the store, hands the rest to the shop."""

from bloomwire.services.assistant.service import NAME, AssistantService, build

__all__ = ["NAME", "AssistantService", "build"]
