"""``python -m g2rpo.rewards.serve <dotted.path.Reward>``: serve a reward with LitServe (see the package)."""

import argparse
import json
import logging
import os
from collections.abc import Sequence

from g2rpo.rewards.serve import MAX_REQUEST_MB, QUEUE_TIMEOUT_S, READ_TIMEOUT_S, build_server


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m g2rpo.rewards.serve",
        description="Serve a g2rpo reward over HTTP (LitServe) for g2rpo.rewards.remote.RemoteReward.",
    )
    parser.add_argument(
        "reward", help="dotted path of a reward class, e.g. g2rpo.rewards.JpegCompressibility"
    )
    parser.add_argument("--kwargs", default="{}", help="JSON constructor arguments, e.g. '{\"quality\": 95}'")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        choices=["127.0.0.1", "0.0.0.0", "::"],
        help="0.0.0.0 or :: serve other machines: give them a key (default %(default)s, this machine only)",
    )
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument(
        "--devices", default="auto", help="GPUs to use: a count, or auto (all); one worker set per device"
    )
    parser.add_argument(
        "--workers-per-device",
        type=int,
        default=1,
        help="replicas of the reward per device (default %(default)s)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="most requests (from any client) scored in one reward call (default %(default)s)",
    )
    parser.add_argument(
        "--batch-timeout",
        type=float,
        default=0.01,
        help="seconds a worker waits for more requests to fill a batch (default %(default)s)",
    )
    parser.add_argument(
        "--api-key-env",
        metavar="NAME",
        help="environment variable holding the key every request must send as X-API-Key (401 otherwise)",
    )
    parser.add_argument(
        "--max-request-mb",
        type=float,
        default=MAX_REQUEST_MB,
        help="largest request body in MiB (default %(default)s: 32 images of 1024x1024 at PNG's worst case, "
        "twice over); a larger one gets HTTP 413, telling the client to lower its batch_size",
    )
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=READ_TIMEOUT_S,
        help="seconds of silence mid-body before a client is answered 408 and dropped (default %(default)s)",
    )
    parser.add_argument(
        "--queue-timeout",
        type=float,
        default=QUEUE_TIMEOUT_S,
        help="a request queued longer is answered 504 unscored (default %(default)s, the client's timeout_s)",
    )
    parser.add_argument(
        "--api-servers", type=int, help="uvicorn processes decoding requests (default: one per worker)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        kwargs = json.loads(args.kwargs)
    except ValueError as error:
        parser.error(f"--kwargs is not JSON: {error}")
    if not isinstance(kwargs, dict):
        parser.error("--kwargs must be a JSON object")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(
                f"--api-key-env {args.api_key_env}: ${args.api_key_env} is not set (or empty); export the key"
            )
    elif args.host != "127.0.0.1":
        logging.warning(
            "serving %s on %s with no key: anyone who reaches this port is scored; pass --api-key-env",
            args.reward,
            args.host,
        )
    devices = args.devices if args.devices == "auto" else int(args.devices)
    try:
        server = build_server(
            args.reward,
            kwargs,
            api_key=api_key,
            accelerator=args.accelerator,
            devices=devices,
            workers_per_device=args.workers_per_device,
            max_batch_size=args.max_batch_size,
            batch_timeout=args.batch_timeout,
            max_request_mb=args.max_request_mb,
            read_timeout_s=args.read_timeout,
            queue_timeout_s=args.queue_timeout,
        )
    except (ImportError, ValueError) as error:
        parser.error(str(error))
    print(
        f"serving {args.reward} on http://{args.host}:{args.port}/score (GET /health answers ok once ready); "
        "Ctrl-C stops",
        flush=True,
    )
    server.run(
        host=args.host,
        port=args.port,
        num_api_servers=args.api_servers,
        generate_client_file=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
