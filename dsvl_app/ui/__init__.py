"""The Gradio UI: layout, per-session state, event wiring, and errors → gr.Warning / gr.Error.

The only package that imports gradio. The browser's chat and the stateless `/chat` API share one code path
(`chat.ChatFlow.stream`), which submits to the engine the `/v1` routes use too: one line for the model, many
replies decoded together. Per-session state lives in the Chatbot value and `gr.State`s; the only process-wide
state is the model handle. One job per module:

- `views.py`     what is shown: meters, banner, inspector captions, chat thumbnails; CSS and JS (pure functions)
- `chat.py`      the chat flow: parameters, PDFs, submit and stream, refusals, retry/undo/edit, Stop, Clear
- `conversations.py`  saved conversations: switch, new, delete, import, export, feedback
- `layout.py`    `ChatApp`: the render methods and all event wiring in one place
- `files.py`     the image store and the folders a request may name
- `launch.py`    the queued Blocks and demo.launch()'s arguments
"""

from .chat import _on_gpu
from .files import EXAMPLES_DIR, allowed_roots, image_store, image_urls
from .launch import build_demo, launch_kwargs, share_warning
from .layout import ChatApp
from .views import meters_markdown, ordinal, waiting_note

__all__ = ["EXAMPLES_DIR", "ChatApp", "_on_gpu", "allowed_roots", "build_demo", "image_store", "image_urls",
           "launch_kwargs", "meters_markdown", "ordinal", "share_warning", "waiting_note"]
