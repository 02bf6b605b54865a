"""Web UI over the service layer: `mount_ui(app, service)` serves the Gradio chat page at `/ui`."""

from mini_claude.ui.web import ChatService, build_ui, mount_ui

__all__ = ["ChatService", "build_ui", "mount_ui"]
