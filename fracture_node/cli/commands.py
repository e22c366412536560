"""The ``fracture-node`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from fracture_node import __version__
from fracture_node.errors import FractureNodeError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fracture-node",
        description="A DICOM node that reads bone radiographs for fractures and reports back "
                    "to the PACS as Structured Reports.")
    parser.add_argument("--version", action="version", version=f"fracture-node {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the node (SCP, worker, reports, delivery)")
    serve.add_argument("--config", "-c", help="TOML configuration file (default: embedded defaults)")
    serve.add_argument("--role", choices=["all", "receiver", "worker"],
                       help="override [node] role")
    serve.add_argument("--metrics-port", type=int,
                       help="override [metrics] port (several processes on one host)")

    check = sub.add_parser("check-config", help="validate a configuration file and print it")
    check.add_argument("config", help="TOML configuration file")

    db = sub.add_parser("db", help="database schema")
    db.add_argument("action", choices=["upgrade", "current"])
    db.add_argument("--config", "-c")
    db.add_argument("--url", help="database URL (overrides the configuration)")
    db.add_argument("--revision", default="head", help="target revision for upgrade")

    echo = sub.add_parser("echo", help="C-ECHO a DICOM node (verification)")
    echo.add_argument("host")
    echo.add_argument("port", type=int)
    echo.add_argument("--aet", default="FRACTURE_NODE", help="our (calling) AE title")
    echo.add_argument("--aec", default="ANY-SCP", help="the called AE title")
    echo.add_argument("--timeout", type=float, default=10.0)
    echo.add_argument("--tls", action="store_true",
                      help="use TLS with the [tls] certificates of --config")
    echo.add_argument("--config", "-c", help="configuration with the [tls] section")

    model = sub.add_parser("model", help="model file tools (export the ONNX graph, join an "
                                         "ensemble)")
    model.add_argument("action", choices=["export", "ensemble"],
                       help="export: write the ONNX graph of a model file (<model>.onnx beside "
                            "it), which the openvino and onnxruntime engines run; ensemble: join "
                            "two or more EfficientNet-Lite model files of one input size into "
                            "one model file (the mean of their logits), then fix its TTA, "
                            "calibration and thresholds on the val split of --data")
    model.add_argument("members", nargs="*", metavar="MEMBER",
                       help="ensemble: the members' model files")
    model.add_argument("--model", help="export: model file (default: the bundled model)")
    model.add_argument("--out", help="export: where to write the graph (default: beside the "
                                     "model file); ensemble: the model file to write (required)")
    model.add_argument("--data", help="ensemble: the labelled data set whose val split fixes "
                                      "TTA, calibration and thresholds (required)")
    model.add_argument("--name", default="fracture-model", help="ensemble: the model's name")
    model.add_argument("--version", help="ensemble: the model's version (default: the time, "
                                         "YYYY.MM.DD-HHMM)")
    model.add_argument("--cache-dir", default=".cache",
                       help="ensemble: where the val images are cached")
    model.add_argument("--val-limit", type=int, default=0,
                       help="ensemble: use only N val images, drawn at random (tests)")

    retry = sub.add_parser("retry", help="resend dead-lettered reports")
    retry.add_argument("--config", "-c")
    retry.add_argument("--destination", help="only deliveries to this destination")
    retry.add_argument("--report-id", type=int, action="append", dest="report_ids",
                       help="only this report (repeatable)")

    reprocess = sub.add_parser("reprocess",
                               help="report parked studies again (after their report failed)")
    reprocess.add_argument("--config", "-c")
    reprocess.add_argument("study_uids", nargs="*", metavar="STUDY_UID",
                           help="only these studies (default: every parked study)")
    for name, helptext in (
            ("audit", "answer an audit question (positives, turnaround, models, deliveries, "
                      "objects, sources, unprocessed, reports_failed, actions)"),
            ("status", "queue depth, states, last reports, dead deliveries"),
            ("housekeeping", "run one housekeeping job now"),
            ("user", "add or list users of the web console and API"),
            ("hash-password", "print an argon2 hash of a password")):
        p = sub.add_parser(name, help=helptext, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)

    for name, helptext in (("predict", "score DICOM or PNG/JPEG files, write a CSV"),
                           ("train", "train a model on labelled radiographs"),
                           ("evaluate", "evaluate a model file on a labelled split")):
        p = sub.add_parser(name, help=helptext, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    # predict/train/evaluate own their arguments: hand everything after the name over.
    if argv and argv[0] in ("predict", "train", "evaluate"):
        return _delegate(argv[0], argv[1:])
    if argv and argv[0] in ("user", "hash-password"):
        from fracture_node.cli.users import main as user_main

        return user_main(argv)
    if argv and argv[0] in ("audit", "status", "housekeeping"):
        from fracture_node.cli.operations import main as operator_main

        try:
            return int(operator_main(argv) or 0)
        except FractureNodeError as exc:
            print(f"fracture-node {argv[0]}: {exc}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "check-config":
            return _check_config(args)
        if args.command == "db":
            return _db(args)
        if args.command == "echo":
            return _echo(args)
        if args.command == "retry":
            return _retry(args)
        if args.command == "reprocess":
            return _reprocess(args)
        if args.command == "model":
            return _model(args)
    except FractureNodeError as exc:
        print(f"fracture-node: {exc}", file=sys.stderr)
        return 2
    parser.print_help()
    return 2


_TRAINING_MODULES = frozenset({"torch", "torchvision", "timm", "onnx", "tqdm", "matplotlib"})
"""What the `train` extra adds to a serving install (pyproject.toml)."""


def _delegate(command: str, rest: list[str]) -> int:
    try:
        if command == "predict":
            from fracture_node.cli.predict import main as run
        elif command == "train":
            from fracture_node.cli.train import main as run
        else:
            from fracture_node.cli.evaluate import main as run
        return int(run(rest) or 0)
    except FractureNodeError as exc:
        print(f"fracture-node {command}: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _TRAINING_MODULES:
            raise
        print(f"fracture-node {command}: needs the training install ({exc.name} is not "
              "installed here): scripts/setup.sh --train, or pip install 'fracture-node[train]'",
              file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    from fracture_node import config as cfg
    from fracture_node.daemon import Daemon

    config = cfg.load(args.config)
    if args.role:
        config = cfg.with_role(config, args.role)
    if args.metrics_port is not None:
        config = cfg.with_metrics_port(config, args.metrics_port)
    code = Daemon(config).run()
    # Everything is on disk and in SQL by now. Skip the interpreter's teardown: unloading the
    # CUDA-enabled torch libraries takes seconds and would only delay a service restart.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _check_config(args: argparse.Namespace) -> int:
    from fracture_node import config as cfg

    config = cfg.load(args.config)
    print(json.dumps(config.redacted(), indent=2))
    print(f"{args.config}: OK", file=sys.stderr)
    return 0


def _db(args: argparse.Namespace) -> int:
    from fracture_node import config as cfg
    from fracture_node.db import migrate

    config = cfg.load(args.config)
    url = args.url or config.database_url
    if url.startswith("sqlite:///"):
        config.node.state_dir.mkdir(parents=True, exist_ok=True)
    if args.action == "upgrade":
        before = migrate.current(url)
        after = migrate.upgrade(url, args.revision)
        print(f"schema: {before or 'empty'} -> {after}")
    else:
        print(migrate.current(url) or "empty")
    return 0


def _model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fracture_node import logs
    from fracture_node.errors import ModelError
    from fracture_node.ml.infer import bundled_model_path

    try:
        from fracture_node.ml.onnx_export import export_onnx
    except ImportError as exc:
        raise ModelError(f"model export needs torch and onnx, which are not installed here "
                         f"({exc.name}): scripts/setup.sh --train, or pip install "
                         "'fracture-node[torch]'") from exc
    logs.configure(stream=sys.stderr)
    if args.action == "ensemble":
        return _model_ensemble(args)
    if args.members:
        raise ModelError("model export takes the model file as --model, not as an argument")
    source = Path(args.model) if args.model else bundled_model_path()
    written = export_onnx(source, Path(args.out) if args.out else None)
    print(f"{written}: ONNX graph of {source.name} written (verified against torch)")
    return 0


def _model_ensemble(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fracture_node.errors import ModelError
    from fracture_node.ml.ensemble import build_ensemble

    if len(args.members) < 2 or not args.out or not args.data:
        raise ModelError("model ensemble needs two or more member model files, --out and --data")
    out = Path(args.out)
    sha = build_ensemble([Path(m) for m in args.members], out, Path(args.data), name=args.name,
                         version=args.version, cache_dir=Path(args.cache_dir),
                         val_limit=args.val_limit)
    print(f"{out}: ensemble of {len(args.members)} model files written (sha256 {sha})")
    return 0


def _retry(args: argparse.Namespace) -> int:
    from fracture_node import config as cfg
    from fracture_node.db.store import Store

    config = cfg.load(args.config)
    store = Store(config.database_url)
    try:
        count = store.retry_dead_deliveries(config.delivery.deadline_s, args.destination,
                                            args.report_ids)
    finally:
        store.dispose()
    print(f"{count} dead-lettered deliveries queued again; a running node sends them within "
          "seconds")
    return 0


def _reprocess(args: argparse.Namespace) -> int:
    from fracture_node import config as cfg
    from fracture_node.db.store import Store

    config = cfg.load(args.config)
    store = Store(config.database_url)
    try:
        count = store.reprocess_studies(args.study_uids)
    finally:
        store.dispose()
    print(f"{count} studies due for a report again; a running node reports them within "
          "seconds (fracture-node status shows any that fail again)")
    return 0


def _echo(args: argparse.Namespace) -> int:
    from fracture_node import config as cfg
    from fracture_node.dicom.send import echo

    tls = cfg.load(args.config).tls if args.tls else None
    outcome = echo(args.host, args.port, called_ae_title=args.aec, calling_ae_title=args.aet,
                   timeout_s=args.timeout, tls=tls)
    if outcome.ok:
        print(f"C-ECHO {args.host}:{args.port} ({args.aec}): success in "
              f"{outcome.duration_s * 1000:.0f} ms")
        return 0
    print(f"C-ECHO {args.host}:{args.port} ({args.aec}) failed: {outcome.error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
