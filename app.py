"""dsvl-chat: chat with DeepSeek-VL about images.  `python app.py --help` lists the options."""

from __future__ import annotations

import logging
import signal
import sys

from dsvl_app.engine import Engine
from dsvl_app.model import ModelLoadError, get_model
from dsvl_app.settings import Settings, parse_settings
from dsvl_app.ui import build_demo, launch_kwargs, share_warning


def start_engine(settings: Settings):
    """The engine in this process, or (with --replicas / --ray-address) its replicas on Ray Serve."""
    if not settings.replicas:
        return Engine(get_model(settings), settings)
    from dsvl_app import replicas  # Ray is imported only when asked for

    engine = replicas.start(settings)
    # Ray replaces the SIGTERM handler; ours ends gradio's loop like Ctrl-C, so that Serve and Ray shut down.
    signal.signal(signal.SIGTERM, _interrupt)
    return engine


def _interrupt(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second TERM must not cut the shutdown short
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if warning := share_warning(settings):
        logging.getLogger("dsvl_app").warning(warning)
    try:
        engine = start_engine(settings)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        logging.getLogger("dsvl_app").info("serving: %s; /v1 requests without sampling settings get %s (the "
                                           "checkpoint's generation config)", engine.describe(), engine.sampling_defaults)
        demo = build_demo(settings, engine)
        demo.launch(**launch_kwargs(settings, engine))
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
