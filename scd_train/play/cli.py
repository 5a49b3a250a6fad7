"""``scd-play``: steer a trained model live in the browser, or play a scripted action sequence.

    scd-play runs/tiny                                   # prints http://127.0.0.1:8765/ to open
    scd-play runs/tiny --steps 4 --baseline runs/dense   # the dense baseline side by side
    scd-play runs/tiny --script "right*12,down*8,idle*4" --out play.gif
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import socket
import sys
import time
from pathlib import Path

import numpy as np

from scd_train.cli import command
from scd_train.errors import InputError
from scd_train.play.session import PlayOptions, PlaySession

log = logging.getLogger("scd_train.play")

DEFAULT_PORT = 8765


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scd-play", description=__doc__.split("\n\n")[0].replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Keys, the page and the limits: docs/play.md")
    parser.add_argument("source", type=Path, help="a run directory or an exported .safetensors file")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free port")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a --host other machines can reach (the server has no authentication)")
    parser.add_argument("--steps", type=int, help="decoder steps (default: the run's diffusion.sample_steps)")
    parser.add_argument("--cfg", type=float, dest="cfg_scale", help="guidance scale (default: the run's)")
    parser.add_argument("--context", type=int, default=4, help="held-out context frames to start from")
    parser.add_argument("--context-from", metavar="HELD_OUT_CLIP",
                        help="start from this held-out clip (its key, e.g. synthetic-000224/000000, or index)")
    parser.add_argument("--fps", type=float, default=20.0, help="target frames per second (0: as fast as it goes)")
    parser.add_argument("--baseline", type=Path, help="a dense-baseline run played side by side on the same actions")
    parser.add_argument("--checkpoint", help="checkpoint directory (default: the newest complete one)")
    parser.add_argument("--raw", action="store_true", help="play the raw weights instead of the EMA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, help="CPU threads for the model (default: PyTorch's)")
    parser.add_argument("--record-dir", type=Path, help="where the record button writes mp4s (default: RUN/play)")
    parser.add_argument("--log", type=Path, help="append one JSON line per frame and event to this file")
    parser.add_argument("--script", metavar="ACTIONS",
                        help="play these actions without a browser, e.g. 'right*12,down*8,idle*4' (or a file)")
    parser.add_argument("--out", type=Path, help="with --script: the video to write, .mp4 or .gif "
                                                 "(default: RUN/play/script.mp4)")
    return parser


def is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), or an InputError that names what is in the way."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {host} is already in use (another scd-play or server?); pick another "
                             "with --port N, or --port 0 for any free one") from None
        raise InputError(f"cannot serve on --host {host} --port {port}: {exc.strerror or exc}") from None
    return sock


def _options(args: argparse.Namespace) -> PlayOptions:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return PlayOptions(steps=args.steps, cfg_scale=args.cfg_scale, context_frames=args.context,
                       context_from=args.context_from, seed=args.seed, device=device, checkpoint=args.checkpoint,
                       use_ema=not args.raw, baseline=args.baseline)


def _run_home(source: Path) -> Path:
    return (source if source.is_dir() else source.parent) / "play"


def play_script(session: PlaySession, script: str, out: Path, fps: float, journal) -> dict:
    """Play ``script`` through the same tick as the server and write the video; returns a summary."""
    from scd_train.play.actions import parse_script
    from scd_train.play.recording import compose, write_video

    actions = parse_script(script, session.actions)
    frames_needed = session.options.context_frames + len(actions)
    if not session.endless and frames_needed > session.max_frames:
        raise InputError(f"--script plays {len(actions)} frames after {session.options.context_frames} context "
                         f"frames ({frames_needed} in all) but {session.limit_message()}")
    first = session.reset()
    journal.frame(first, session.steps)
    frames, seconds = [compose(first)], []
    for action in actions:
        result = session.tick(action)
        journal.frame(result, session.steps)
        frames.append(compose(result))
        seconds.append(result.seconds)
    path = write_video(np.stack(frames), out, max(1, int(round(fps or 20))))
    return {"path": path, "frames": len(actions), "seconds": sum(seconds),
            "frames_per_second": len(actions) / max(sum(seconds), 1e-9)}


def serve(session: PlaySession, sock: socket.socket, args: argparse.Namespace, journal) -> None:
    import uvicorn

    from scd_train.play.server import PlayServer

    record_dir = args.record_dir or _run_home(args.source)
    server = PlayServer(session, fps=args.fps, record_dir=record_dir, journal=journal)
    config = uvicorn.Config(server.app(), log_level="warning", ws_per_message_deflate=False, lifespan="off",
                            timeout_graceful_shutdown=3)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"scd-play: open http://{shown}:{port}/ in a browser (Ctrl-C stops)", flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        server.executor.shutdown(wait=True, cancel_futures=True)


def run(args: argparse.Namespace) -> int:
    from scd_train.play.journal import Journal

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sock = None
    if args.script is None:
        if not is_local(args.host) and not args.allow_remote:
            raise InputError(f"--host {args.host} lets other machines reach the play server, which has no "
                             "authentication; pass --allow-remote to serve there on purpose")
        if not is_local(args.host):
            print(f"scd-play: serving on {args.host} (--allow-remote): anyone who can reach this machine can play",
                  file=sys.stderr)
        sock = bind_socket(args.host, args.port)  # before loading, so a busy port fails at once
    elif args.out is not None and args.out.suffix.lower() not in (".mp4", ".gif"):
        raise InputError(f"--out {args.out}: the video must end in .mp4 or .gif")
    try:
        started = time.perf_counter()
        session = PlaySession(args.source, _options(args))
        journal = Journal(args.log, session.actions)
        try:
            if args.script is not None:
                out = args.out or _run_home(args.source) / "script.mp4"
                summary = play_script(session, args.script, out, args.fps, journal)
                print(f"scd-play: {summary['frames']} frames at {summary['frames_per_second']:.1f} frames/s "
                      f"({session.steps} decoder steps) -> {summary['path']}")
                return 0
            session.warm_up()
            log.info("model ready in %.1fs: %s, %d decoder steps, %s", time.perf_counter() - started,
                     "+".join(p.label for p in session.panels), session.steps,
                     "endless" if session.endless else f"at most {session.max_frames} frames per context")
            serve(session, sock, args, journal)
            return 0
        finally:
            journal.close()
    finally:
        if sock is not None:
            sock.close()


@command("scd-play")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("scd-play: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
