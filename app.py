"""`python app.py`: the SaShiMi web UI (Gradio), on http://127.0.0.1:7860 by default.

The page lives in sashimi/webui_page.py, its handlers in sashimi/webui.py and the limits a request
is held to in sashimi/webui_requests.py; this file turns flags into those limits and launches the
server with Gradio's defaults set on purpose: no usage analytics, no share link unless --share,
uploads capped at --max-upload-mb, and a queue in which at most --concurrency requests sample at
once (those that arrive together as one batch) while the others wait.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from sashimi.cli import Parser, add_device_argument
from sashimi.generate import resolve_device
from sashimi.webui import Limits, WebUI

EXAMPLES = """examples:
  python app.py
  python app.py --checkpoint runs/piano/best --max-seconds 30 --port 8080
"""


def build_parser() -> argparse.ArgumentParser:
    defaults = Limits()
    parser = Parser(
        prog="python app.py",
        description="Start the SaShiMi web UI: pick a checkpoint, generate or continue audio, "
        "listen while it is sampled, download the WAV files.",
        epilog=EXAMPLES,
    )
    parser.add_argument(
        "--host",
        metavar="ADDR",
        default="127.0.0.1",
        help="address to serve on; 0.0.0.0 opens the page to the network",
    )
    parser.add_argument("--port", metavar="N", type=int, default=7860, help="port to serve on")
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        type=Path,
        action="append",
        default=[],
        help="a checkpoint folder to offer besides those under checkpoints/ "
        "(repeatable; the first one given is selected)",
    )
    parser.add_argument(
        "--share",
        action="store_true",
        help="also open a public link through Gradio's share servers",
    )
    add_device_argument(parser, default="auto")
    parser.add_argument(
        "--max-seconds",
        metavar="S",
        type=float,
        default=defaults.max_seconds,
        help="longest clip one request may generate (and prompt it may keep)",
    )
    parser.add_argument(
        "--max-clips",
        metavar="N",
        type=int,
        default=defaults.max_clips,
        help="most clips one request may sample together",
    )
    parser.add_argument(
        "--max-upload-mb",
        metavar="MB",
        type=float,
        default=defaults.max_upload_mb,
        help="largest prompt file accepted",
    )
    parser.add_argument(
        "--concurrency",
        metavar="N",
        type=int,
        default=defaults.concurrency,
        help="requests sampled at once, those that arrive together as one batch; later ones "
        "wait in the queue",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and serve until interrupted; a bad flag exits 2 with usage and the error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be from 0 to 65535, got {args.port}")
    try:
        limits = Limits(args.max_seconds, args.max_clips, args.max_upload_mb, args.concurrency)
    except ValueError as error:
        parser.error(f"--{str(error).replace('_', '-')}")
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no usage reports, no version check
    # our lines on stderr (one per refused request, warnings); other libraries' warnings only
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("sashimi").setLevel(logging.INFO)
    WebUI(args.checkpoint, limits, device).build().queue().launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=int(limits.max_upload_mb * 2**20),
        ssr_mode=False,  # plain client-side page: no Node.js server beside Python
        show_error=True,  # any failure reaches the caller as its message, not {"error": null}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
