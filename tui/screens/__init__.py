"""The app's screens."""

from .chat import ChatScreen
from .conversations import ConversationsScreen
from .error import ErrorScreen
from .help import HelpScreen
from .loading import LoadingScreen
from .models import ModelsScreen
from .settings import SettingsScreen

__all__ = [
    "ChatScreen",
    "ConversationsScreen",
    "ErrorScreen",
    "HelpScreen",
    "LoadingScreen",
    "ModelsScreen",
    "SettingsScreen",
]
