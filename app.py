"""dsvl-chat: chat with DeepSeek-VL about images.  `python app.py --help` lists the options."""

from __future__ import annotations

import logging
import sys

from dsvl_app.engine import Engine
from dsvl_app.model import ModelLoadError, get_model
from dsvl_app.settings import parse_settings
from dsvl_app.ui import build_demo, launch_kwargs, share_warning


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if warning := share_warning(settings):
        logging.getLogger("dsvl_app").warning(warning)
    try:
        engine = Engine(get_model(settings), settings)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    logging.getLogger("dsvl_app").info("serving: %s; /v1 requests without sampling settings get %s (the checkpoint's "
                                       "generation config)", engine.describe(), engine.sampling_defaults)
    demo = build_demo(settings, engine)
    demo.launch(**launch_kwargs(settings, engine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
