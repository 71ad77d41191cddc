"""The app's layout and all its event wiring, in one place (as gradio's `chat_interface.py` does): a few small
render methods, `_setup_events`, and `build`. The event functions live in `chat.py` and `conversations.py`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from .. import saved
from ..engine import Engine
from ..model import get_model
from ..settings import Limits, Settings
from .chat import ChatFlow
from .conversations import TOP_K_MAX, SavedConversations
from .files import EXAMPLES_DIR, allowed_roots, image_store, image_urls
from .views import banner_markdown, meters_markdown

OTHER_EVENTS_AT_ONCE = 4  # queued events other than replies (imports, page loads) served at once
# The generation sliders, in the order of their components (saved with a conversation, set on import).
# New ones go last: /chat takes them positionally, and older clients leave them out.
SCHEMA_EXAMPLE = json.dumps({"type": "object", "properties": {
    "colour": {"type": "string", "enum": ["red", "green", "blue", "yellow", "other"]},
    "shape": {"type": "string", "enum": ["circle", "square", "triangle", "other"]}},
    "required": ["colour", "shape"]}, indent=2)


MESSAGE_SCHEMA = {"type": "object", "required": ["text"], "properties": {
    "text": {"type": "string"},
    "files": {"type": "array", "items": {
        "anyOf": [{"type": "string"}, {"type": "object"}],
        "description": "an image: an http(s) URL or a data: URL (base64), or from gradio_client handle_file(path)"}}}}
HISTORY_SCHEMA = {"type": "array", "items": {"type": "object"},
                  "description": 'chat messages: [{"role": "user" | "assistant", "content": ...}]'}


def _json_input(value: Any, label: str, schema: dict) -> gr.JSON:
    """A gr.JSON input that describes itself with `schema` (an instance override: a subclass of a gradio
    component would make gradio write a .pyi stub next to this module)."""
    component = gr.JSON(value=value, label=label)
    component.api_info = lambda: schema
    return component




class ChatApp(ChatFlow, SavedConversations):
    """Builds the Blocks and owns the event functions; one instance per server."""

    def __init__(self, settings: Settings, engine: Engine | None = None):
        self.settings = settings
        self.limits: Limits = settings.limits
        self.engine = engine or Engine(get_model(settings), settings)
        self.handle = self.engine.handle
        self.store = image_store(settings)
        # Only gradio's upload cache, our examples and the image store may be read (API clients could name any path).
        self.allowed_roots = allowed_roots(self.store)
        self.image_urls = image_urls(settings)
        self.export_dir = Path(tempfile.mkdtemp(prefix="dsvl-exports-"))
        self.prefetcher = self.engine.prefetcher(lambda path: self._load(path, self.limits))

    def _render_chat_column(self) -> None:
        self.chatbot = gr.Chatbot(
            elem_id="chatbot",
            label="Conversation",
            height=560,
            editable="user",
            # One bubble per message: gradio 6.31's edit breaks on a bubble that mixes images and text.
            group_consecutive_messages=False,
            buttons=["copy", "copy_all"],
            latex_delimiters=[
                {"left": "$$", "right": "$$", "display": True},
                {"left": "$", "right": "$", "display": False},
                {"left": "\\(", "right": "\\)", "display": False},
                {"left": "\\[", "right": "\\]", "display": True},
            ],
            sanitize_html=True,
            render_markdown=True,
            placeholder="**Attach one or more images and ask about them.** Images are numbered in the order the "
            "model sees them (Image 1, Image 2, …).",
        )
        self.chat_input = gr.MultimodalTextbox(
            elem_id="chat-input",
            file_count="multiple",
            file_types=["image", ".pdf"],
            sources=["upload"],
            placeholder="Ask about your images… (Enter to send, Shift+Enter for a new line; drop or paste images)",
            show_label=False,
            submit_btn=True,
            max_plain_text_length=20_000,
        )
        with gr.Row():
            self.stop_btn = gr.Button("⏹ Stop", elem_id="stop", variant="stop", size="sm", visible=False)
            self.clear_btn = gr.Button("🗑 Clear", elem_id="clear", size="sm")
        # Questions the bundled tiny checkpoint was trained on (its colour, shape and first/second answers
        # are right; its counts about nine times in ten (three_shapes.png: "three") — as its banner says);
        # real weights answer them all.
        examples = [
            {"text": "What colour is the shape?", "files": [str(EXAMPLES_DIR / "red_circle.png")]},
            {"text": "What shape is it?", "files": [str(EXAMPLES_DIR / "green_triangle.png")]},
            {"text": "How many shapes are there?", "files": [str(EXAMPLES_DIR / "three_shapes.png")]},
            {"text": "What colour is the second image?",
             "files": [str(EXAMPLES_DIR / "blue_square.png"), str(EXAMPLES_DIR / "yellow_circle.png")]},
        ]
        gr.Examples(examples=examples, inputs=[self.chat_input], label="Examples", examples_per_page=6)

    def _render_conversations(self) -> None:
        self.new_btn = gr.Button("+ New chat", elem_id="new-chat", variant="primary", size="sm")
        self.chat_list = gr.Radio(choices=[], label="Saved conversations", elem_id="chat-list",
                                  info="Kept in this browser (the images on the server).")
        with gr.Row():
            self.export_btn = gr.DownloadButton("⬇ Export", elem_id="export-chat", size="sm", interactive=False)
            self.import_btn = gr.UploadButton("⬆ Import", elem_id="import-chat", size="sm", file_types=[".json"],
                                              file_count="single")
        with gr.Row():
            self.delete_btn = gr.Button("Delete", elem_id="delete-chat", size="sm")
            self.delete_all_btn = gr.Button("Delete all", elem_id="delete-all-chats", size="sm", variant="stop")

    def _render_side_panel(self) -> None:
        self.banner = gr.Markdown(banner_markdown(self.handle, self.engine), elem_id="model-banner")
        with gr.Accordion("Generation", open=True):
            cap = self.limits.max_new_tokens
            self.max_new_tokens = gr.Slider(1, cap, value=min(512, cap), step=1, label="Max new tokens",
                                            elem_id="max-new-tokens")
            self.temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)",
                                         elem_id="temperature")
            self.top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p", elem_id="top-p")
            self.repetition_penalty = gr.Slider(0.5, 2.0, value=1.0, step=0.05, label="Repetition penalty",
                                                elem_id="repetition-penalty")
            self.seed = gr.Number(value=0, precision=0, minimum=0, label="Seed (for sampling)", elem_id="seed")
            # What other servers offer too (Open WebUI's Advanced Params); the checkpoint's top-k unless changed.
            top_k = min(self.engine.sampling_defaults["top_k"], TOP_K_MAX)
            self.top_k = gr.Slider(0, TOP_K_MAX, value=top_k, step=1, label="Top-k (0 = off)", elem_id="top-k")
            self.min_p = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Min-p (0 = off)", elem_id="min-p")
            # Structured answers: the reply held to JSON (or a schema) token by token, shown indented.
            self.answer_format = gr.Radio(["Text", "JSON", "JSON schema"], value="Text", label="Answer format",
                                          elem_id="answer-format")
            self.json_schema = gr.Code(language="json", label="JSON schema", elem_id="json-schema", visible=False,
                                       interactive=True, value=SCHEMA_EXAMPLE)
            # An attached PDF: which pages the model sees as images (the others' text is read).
            self.pdf_pages = gr.Textbox(label="PDF pages seen as images", placeholder="e.g. 2-4 (empty: the first "
                                        "that fit)", elem_id="pdf-pages", max_lines=1)
        self.meters = gr.Markdown(meters_markdown(None, None), elem_id="meters")
        with gr.Accordion("Inspector: what the model sees", open=True):
            # Heights follow the views (a fixed height left a large gap under two images).
            self.inspector_low = gr.Gallery(label="Low-res view, 384×384 (SigLIP)", elem_id="inspector-lowres",
                                            columns=2, height="auto", object_fit="contain", show_label=True)
            self.inspector_high = gr.Gallery(label="High-res view, 1024×1024 (SAM)", elem_id="inspector-highres",
                                             columns=2, height="auto", object_fit="contain", show_label=True,
                                             visible=self.handle.has_high_res)

    def _render_api(self) -> None:
        # Hidden components behind the public `/chat` endpoint: history is JSON so that every shape a client
        # sends (plain strings, {"path": ...}, typed parts) reaches our parser instead of a schema error.
        with gr.Group(visible=False):
            self.api_message = _json_input({"text": "", "files": []}, "message", MESSAGE_SCHEMA)
            self.api_history = _json_input([], "history", HISTORY_SCHEMA)
            self.api_answer_format = gr.Textbox(value="text", label="answer_format")
            self.api_json_schema = gr.Textbox(value="", label="json_schema")
            self.api_pdf_pages = gr.Textbox(value="", label="pdf_pages")
            self.api_reply = gr.Textbox(label="reply")
            self.api_button = gr.Button("chat")

    def _setup_events(self, demo: gr.Blocks) -> None:
        controls = [self.max_new_tokens, self.temperature, self.top_p, self.repetition_penalty, self.seed, self.top_k,
                    self.min_p]
        private: dict[str, Any] = {"api_visibility": "private"}
        answer = [self.answer_format, self.json_schema, self.pdf_pages]  # per reply, not saved with the conversation
        respond = {
            "fn": self.respond,
            "inputs": [self.pending, self.history_before, *controls, *answer],
            "outputs": [self.chatbot, self.inspector_low, self.inspector_high, self.meters, self.chat_input,
                        self.last_meters],
            # UI and /chat share one limit, high enough that every reply reaches the engine, whose one line
            # (shared with /v1) decides who is answered: --batch at once, the rest waiting with their place shown.
            "concurrency_id": "generate",
            "concurrency_limit": self.concurrency_limit,
            "show_progress": "minimal",
            **private,
        }
        unlock = {"fn": self.unlock_input, "outputs": [self.chat_input, self.stop_btn], "queue": False, **private}
        # Stop is shown only while a reply runs.
        show_stop = {"fn": lambda: gr.Button(visible=True), "outputs": [self.stop_btn], "queue": False, **private}
        # Every change is saved in the browser as it happens (and the Export file rewritten).
        save = {"fn": self.save, "inputs": [self.chatbot, self.saved, *controls],
                "outputs": [self.saved, self.chat_list, self.export_btn], "queue": False, **private}

        submit = self.chat_input.submit(
            self.add_user_message, [self.chat_input, self.chatbot],
            [self.chatbot, self.chat_input, self.pending, self.history_before], queue=False, **private,
        ).then(**show_stop).then(**respond)
        submit.then(**save).then(**unlock)

        retry = self.chatbot.retry(
            self.retry, [self.chatbot], [self.chatbot, self.pending, self.history_before], queue=False, **private
        ).then(**show_stop).then(**respond)
        retry.then(**save).then(**unlock)

        edit = self.chatbot.edit(
            self.edit, [self.chatbot], [self.chatbot, self.pending, self.history_before], queue=False, **private
        ).then(**show_stop).then(**respond)
        edit.then(**save).then(**unlock)
        replies = [submit, retry, edit]

        # Encode on attach: the handler only queues the images (a background thread does the work when the
        # model is idle), so it answers at once; it also runs on typing, where it finds nothing new.
        self.chat_input.change(self.prefetch, [self.chat_input], None, queue=False, show_progress="hidden",
                               trigger_mode="always_last", **private)

        self.chatbot.undo(self.undo, [self.chatbot], [self.chatbot, self.chat_input], queue=False,
                          **private).then(**save)

        # Cancelling closes the reply generator; its cleanup sets the stop event the generate thread watches.
        self.stop_btn.click(None, None, None, cancels=replies, **private).then(
            self.stopped, [self.last_meters], [self.meters], queue=False, **private
        ).then(**save).then(**unlock)

        clear_outputs = [self.chatbot, self.inspector_low, self.inspector_high, self.meters, self.chat_input,
                         self.last_meters]
        self.clear_btn.click(self.cleared, None, clear_outputs, cancels=replies, queue=False,
                             **private).then(**save).then(**unlock)
        self.chatbot.clear(self.cleared, None, clear_outputs, cancels=replies, queue=False,
                           **private).then(**save).then(**unlock)

        # Saved conversations: switching, a new chat, deleting and importing first stop a running reply.
        opened = [self.chatbot, self.saved, self.chat_list, self.export_btn, self.inspector_low, self.inspector_high,
                  self.meters]
        conversation = {"outputs": opened, "cancels": replies, "queue": False, **private}
        self.chat_list.input(self.switch, [self.chat_list, self.chatbot, self.saved, *controls],
                             **conversation).then(**unlock)
        self.new_btn.click(self.new_chat, [self.chatbot, self.saved, *controls], **conversation).then(**unlock)
        self.delete_btn.click(self.delete_chat, [self.saved], **conversation).then(**unlock)
        self.delete_all_btn.click(
            self.delete_all, [self.saved, self.confirm], **conversation,
            js="(record) => [record, confirm('Delete all saved conversations in this browser?') ? 'yes' : 'no']",
        ).then(**unlock)
        # Queued (its own line, not the model's): only queued events can show the refusal's toast.
        self.import_btn.upload(self.import_chat, [self.import_btn, self.chatbot, self.saved, *controls],
                               **{**conversation, "outputs": opened + controls, "queue": True}).then(**unlock)
        if self.settings.feedback_file:  # like/dislike buttons appear only with a listener
            self.chatbot.like(self.feedback, [self.chatbot], None, queue=False, **private)

        self.answer_format.change(lambda choice: gr.Code(visible=choice == "JSON schema"), [self.answer_format],
                                  [self.json_schema], queue=False, **private)

        # A reload (or a restart) brings back the conversation that was open, with its images.
        demo.load(self.restore, [self.saved], [self.chatbot, self.saved, self.chat_list, self.export_btn], **private)

        self.api_button.click(
            self.chat,
            [self.api_message, self.api_history, *controls, self.api_answer_format, self.api_json_schema,
             self.api_pdf_pages],
            [self.api_reply],
            api_name="chat",  # its docstring describes it on the API page and to MCP clients
            concurrency_id="generate",
            concurrency_limit=self.concurrency_limit,
        )

    @property
    def concurrency_limit(self) -> int:
        return self.engine.batch + self.settings.queue_size

    def build(self) -> gr.Blocks:
        """The whole UI."""
        with gr.Blocks(title="dsvl-chat — chat with DeepSeek-VL about images", fill_height=True) as demo:
            self.pending = gr.State(None)  # the message being answered
            self.history_before = gr.State([])  # the chat before it (for rollback on refusal)
            self.last_meters = gr.State(None)
            # Saved conversations: a fixed key and secret, so that they survive a reload and a server restart.
            self.saved = gr.BrowserState(saved.empty_record(), storage_key="dsvl-chat-conversations",
                                         secret=self.settings.state_secret or self.store.secret())
            self.confirm = gr.Textbox(visible=False)  # "yes" when the browser's confirm() dialog was accepted
            gr.Markdown("## dsvl-chat — chat with DeepSeek-VL about images")
            with gr.Row(equal_height=False):
                with gr.Column(scale=1, min_width=220):
                    self._render_conversations()
                with gr.Column(scale=3):
                    self._render_chat_column()
                with gr.Column(scale=2, min_width=320):
                    self._render_side_panel()
            self._render_api()
            self._setup_events(demo)
        return demo


