"""The `distbp` command: train, plot.

Every training option comes from the configuration schema (distbp.train.config.FIELDS), so `--help`
documents every key a TOML config file may hold, and the two are checked by the same code.
"""

import argparse
import os
import sys
import threading
import time
import traceback

# gRPC's core logs its own copy of errors that distbp reports in one line (GRPC_VERBOSITY=ERROR to see them)
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from .comm import RankFailed
from .data.datasets import DataError
from .ps.client import PSError
from .train.config import (FIELDS, ConfigError, check_not_an_output, check_writable, load_toml, make_config,
                           validate_values)
from .train.errors import USER_ERRORS, error_message


def _option_type(f):
    def parse(text):
        try:
            if f.is_list:
                return [f.type(v) for v in text.split(",") if v.strip()]
            return f.type(text)
        except ValueError:
            kind = {int: "an integer", float: "a number", str: "a string"}[f.type]
            raise argparse.ArgumentTypeError(f"expected {kind}{' list, e.g. 256,128' if f.is_list else ''}, "
                                             f"got {text!r}") from None

    return parse


def _add_config_options(parser):
    parser.add_argument("--config", metavar="FILE", help="TOML file of configuration keys (options override it)")
    for f in FIELDS:
        flag = "--" + f.name.replace("_", "-")
        default = f.default if not isinstance(f.default, tuple) else ",".join(map(str, f.default))
        help_text = f.help
        if f.choices:
            help_text += f"; one of {', '.join(f.choices)}"
        if f.default is not None and "default:" not in f.help:
            help_text += f" (default: {str(default).lower() if f.type is bool else default})"
        if f.type is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=_option_type(f), default=None, metavar=f.name.upper(),
                                choices=f.choices or None, help=help_text)


def config_from_args(args):
    """Defaults, then the TOML file, then the command-line options; all validated."""
    if args.config is not None and not args.config.strip():  # an unset shell variable: not "no config file"
        raise ConfigError("--config: the config file name is empty")
    values = load_toml(args.config) if args.config else {}
    validate_values(values, f"config file {args.config}")  # name the file in its own errors
    overrides = {f.name: getattr(args, f.name) for f in FIELDS if getattr(args, f.name) is not None}
    for f in FIELDS:  # --checkpoint "" clears a path the file sets (without one, "" is refused as empty)
        if f.nullable and overrides.get(f.name) == "" and values.get(f.name) is not None:
            overrides[f.name] = None
    config = make_config({**values, **overrides}, "options")
    if args.config:
        check_not_an_output(config, args.config, "the config file", ("checkpoint", "metrics", "trace"))
    return config


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command."""

    def error(self, message):
        self.exit(2, f"distbp: error: {message} (see '{self.prog} --help')\n")


def build_parser():
    parser = _Parser(
        prog="distbp",
        allow_abbrev=False,
        description="Data-parallel training on a numpy autograd core.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    train = sub.add_parser("train", allow_abbrev=False, help="train a model (default: an MLP on the digits data set)",
                           description="Train a model. Every option can also be set in a TOML --config file.")
    _add_config_options(train)
    ps = sub.add_parser("ps", help="the parameter server", description="The parameter server.")
    ps_sub = ps.add_subparsers(dest="ps_command", metavar="PS_COMMAND", parser_class=_Parser)
    ps_sub.required = True
    serve = ps_sub.add_parser(
        "serve", allow_abbrev=False, help="serve one shard of the parameters",
        description="Serve one parameter-server shard. The model, optimizer and schedule come from the same "
                    "configuration options as distbp train (give the workers the same ones).")
    server = serve.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1 only)")
    server.add_argument("--port", type=int, default=50051, help="port (0: any free port; default: 50051)")
    server.add_argument("--shard", type=int, default=0, help="this server's shard index (default: 0)")
    server.add_argument("--num-shards", type=int, default=1, help="number of server shards (default: 1)")
    server.add_argument("--workers", type=int, default=1, help="number of workers (default: 1)")
    server.add_argument("--mode", choices=("sync", "async", "bounded"), default="sync",
                        help="sync, async or bounded staleness (default: sync)")
    server.add_argument("--staleness", type=int, default=2,
                        help="bounded mode: versions a worker may run ahead of the slowest (default: 2)")
    server.add_argument("--sync-timeout", type=float, default=60.0,
                        help="sync and bounded modes: seconds a worker may hold the others up before it is "
                             "dropped (sync: from the step); also how long a restored server waits for "
                             "its workers (default: 60)")
    server.add_argument("--token", help="shared token every call must carry")
    server.add_argument("--tls-cert", help="server certificate (PEM) to serve TLS")
    server.add_argument("--tls-key", help="server private key (PEM)")
    server.add_argument("--tls-client-ca", help="CA (PEM) that client certificates must chain to (mutual TLS)")
    server.add_argument("--checkpoint-path", help="checkpoint file: restored at start, written every K versions "
                        "and on SIGTERM (with several shards, shard I's is FILE.shardI)")
    server.add_argument("--checkpoint-every-versions", type=int, default=0, help="K (0: only on SIGTERM)")
    _add_config_options(serve)
    plot = sub.add_parser("plot", help="plot a metrics file's loss and accuracy curves to a PNG",
                          description="Plot the loss and accuracy curves of a metrics JSON-lines file.")
    plot.add_argument("metrics", metavar="METRICS", help="metrics file written by distbp train --metrics")
    plot.add_argument("-o", "--out", metavar="PNG", help="output image (default: METRICS with .png)")
    parser.commands = {("train", None): train, ("ps", "serve"): serve, ("plot", None): plot}
    return parser


def _rank_in_mpi_job(backend):
    """'rank R of N: ' for a rank of an MPI job that fails before MPI starts (MPICH's own abort line names
    the rank only by node), else ''."""
    from .comm.mpi import launched_by_mpi, launcher_rank

    if backend not in (None, "auto", "mpi") or not launched_by_mpi(os.environ):
        return ""
    numbered = launcher_rank(os.environ)
    return "" if numbered is None else "rank {} of {}: ".format(*numbered)


def _end_mpi_job(code, backend=None):
    """Under mpiexec, end every rank of an MPI job. A rank that fails before it starts MPI (a bad option, a
    missing config file) would otherwise leave its peers waiting in MPI's start-up for it, forever.

    backend: the job's, when known; processes of another backend (parameter-server workers started by
    mpiexec, say) never start MPI, and joining MPI's start-up would then wait for them: it is given up
    after a few seconds."""
    from .comm.mpi import launched_by_mpi

    if backend not in (None, "auto", "mpi") or not launched_by_mpi(os.environ):
        return
    sys.stderr.flush()
    time.sleep(0.3)  # as launch._abort: let mpiexec forward the message before the job is torn down
    if "mpi4py.MPI" not in sys.modules:
        started = threading.Event()

        def start():
            try:
                from mpi4py import MPI  # noqa: F401  (importing it starts MPI)
            finally:
                started.set()

        threading.Thread(target=start, daemon=True).start()
        if not started.wait(10):
            os._exit(code)  # the peers are not starting MPI: nothing to end
    try:
        from mpi4py import MPI
    except ImportError:
        return
    from .comm.mpi import abort_world

    abort_world(MPI.COMM_WORLD, code)


def _option_after(flag, argv):
    """The value given to `flag` in argv, if any (argparse could not parse the rest)."""
    for i, word in enumerate(argv):
        if word == flag and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def main(argv=None):
    parser = build_parser()
    backend = None
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # named by the command's own parser, whose --help lists its options
            parser.commands[(args.command, getattr(args, "ps_command", None))].error(
                f"unrecognized arguments: {' '.join(extra)}")
        backend = getattr(args, "backend", None)
    except SystemExit as e:
        if e.code:  # a usage error (--help exits 0 and ends only this rank)
            _end_mpi_job(e.code, _option_after("--backend", sys.argv[1:] if argv is None else argv))
        raise
    try:
        if args.command == "train":
            from .train.launch import chosen_backend, keep_freed_memory, resolve_backend, run, stop_on_sigterm

            config = config_from_args(args)
            backend = chosen_backend(config)  # what _end_mpi_job is told, also when resolve_backend refuses
            resolve_backend(config)
            keep_freed_memory()
            restore_sigterm = stop_on_sigterm()
            try:
                run(config)
            finally:  # a SIGTERM while the error is reported must not escape as a traceback
                restore_sigterm()
        elif args.command == "ps":
            from .train.launch import keep_freed_memory
            from .train.ps_service import run_server

            keep_freed_memory()
            try:
                run_server(config_from_args(args), args)
            except OSError as e:  # the port is taken, a certificate file is missing, ...
                raise PSError(f"ps serve: {e.strerror or e}" + (f": {e.filename}" if e.filename else "")) from None
        elif args.command == "plot":
            from pathlib import Path

            from .train.progress import plot_metrics

            if args.out is not None and not args.out.strip():
                raise DataError("plot: -o is empty; leave it out for the metrics file's name with .png")
            if args.out is None and Path(args.metrics).exists() and not Path(args.metrics).is_file():
                # (a pipe, `<(...)`: its name is /dev/fd/N, beside which no image can be written)
                raise DataError(f"plot: {args.metrics} is not a regular file, so no image can be named after it: "
                                "give -o PNG")
            out = args.out or str(Path(args.metrics).with_suffix(".png"))
            if Path(out).is_dir():
                raise DataError(f"plot: the output {out} is a directory; name the image file to write")
            if not Path(out).suffix:
                out += ".png"  # what matplotlib would write, named as it is
            if Path(out).exists() and os.path.samefile(out, args.metrics):
                raise DataError(f"plot: the output {out} is the metrics file itself; name the image file with -o")
            check_writable("plot: the output", out)
            Path(out).parent.mkdir(parents=True, exist_ok=True)  # as for training's outputs
            try:
                plot_metrics(args.metrics, out)
            except ValueError as e:
                raise DataError(str(e)) from None
            print(f"wrote {out}")
    except BrokenPipeError:  # the reader of our output has gone (| head): stop quietly, as a killed writer would
        return _output_closed()
    except RankFailed as e:  # the threads backend: one rank's error stopped them all
        if isinstance(e.error, BrokenPipeError):
            return _output_closed()
        if not isinstance(e.error, USER_ERRORS):
            traceback.print_exception(e.error)
        print(f"distbp: error: {e.who} failed: {error_message(e.error)}", file=sys.stderr)
        return 2 if isinstance(e.error, USER_ERRORS) else 1  # as on one rank
    except USER_ERRORS as e:
        where = _rank_in_mpi_job(backend) if args.command == "train" else ""
        print(f"distbp: error: {where}{error_message(e)}", file=sys.stderr)
        if args.command == "train":
            _end_mpi_job(2, backend)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        print(f"distbp: {getattr(e, 'what', 'interrupted')}", file=sys.stderr)
        return getattr(e, "code", 130)
    return 0


def _output_closed():
    """Exit status 141 (a writer killed by SIGPIPE), with stdout sent nowhere: Python's flush at exit must not
    fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())
