"""The chat screen's widgets."""

from .messages import AssistantMessage, ToolCallView, UserMessage
from .prompt import PromptInput
from .status import StatusBar

__all__ = ["AssistantMessage", "PromptInput", "StatusBar", "ToolCallView", "UserMessage"]
