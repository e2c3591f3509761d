"""`distbp ps serve`: one parameter-server shard built from the same configuration as the workers."""

import ipaddress
import logging
import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

from ..autograd import manual_seed
from ..data import BatchLoader, ShardSampler
from ..data.datasets import fingerprint
from ..ps.client import model_signature
from ..ps.server import Shard, check_token, host_port, serve
from ..ps.wire import assign_shards
from .config import (
    PS_SHARED_KEYS, RESUME_KEYS, ConfigError, check_pem, check_writable, keys_given, ps_settings, same_file,
)
from .trainer import build_data, build_model, build_optimizer, build_schedule


def build_shard(config, shard=0, num_shards=1, workers=1, mode="sync", staleness=2, sync_timeout=60.0,
                checkpoint=None, checkpoint_every=0):
    """The shard's parameters (initialised exactly as the workers' models), optimizer and schedule."""
    if not 0 <= shard < num_shards:
        raise ConfigError(f"ps serve: --shard {shard} is not in [0, {num_shards}) (--num-shards {num_shards})")
    manual_seed(config.seed)
    split = build_data(config)
    model = build_model(config, split)
    named = list(model.named_parameters())
    owner = assign_shards({n: p.data.size for n, p in named}, num_shards)
    mine = {n: p for n, p in named if owner[n] == shard}
    if not mine:
        raise ConfigError(f"ps serve: {num_shards} shards for {len(named)} parameters leaves shard {shard} empty")
    optimizer = build_optimizer(config, list(mine.values()))
    loader = BatchLoader(split.train, config.batch_size, ShardSampler(len(split.train), 0, workers))
    # the schedule spans the steps this shard takes: one per round in sync mode, one per push otherwise
    per_round = 1 if mode == "sync" else workers
    schedule = build_schedule(replace(config, warmup_steps=config.warmup_steps * per_round), optimizer,
                              config.epochs * len(loader) * per_round)
    steps_per_worker = config.epochs * len(loader)
    if config.max_steps:
        steps_per_worker = min(steps_per_worker, config.max_steps)
    return Shard(mine, optimizer, schedule, mode, workers, staleness, sync_timeout, shard, num_shards,
                 model_signature(named), checkpoint, checkpoint_every,
                 settings={**ps_settings(config), "data": fingerprint(split)},
                 setting_keys=PS_SHARED_KEYS + ("data",), steps_per_worker=steps_per_worker, restore_keys=RESUME_KEYS + ("optimizer", "data"))


def check_server_options(config, args):
    """Refuse, before anything starts, options that could not work or would be silently ignored."""
    for name, value, low, high in (("--port", args.port, 0, 65535), ("--workers", args.workers, 1, None),
                                   ("--num-shards", args.num_shards, 1, None), ("--staleness", args.staleness, 0, None),
                                   ("--checkpoint-every-versions", args.checkpoint_every_versions, 0, None)):
        if value < low or (high is not None and value > high):
            raise ConfigError(f"ps serve: {name} must be {f'in [{low}, {high}]' if high is not None else f'>= {low}'}"
                              f", got {value}")
    if args.checkpoint_path is not None and not args.checkpoint_path.strip():
        raise ConfigError("ps serve: --checkpoint-path is empty; leave it out for none")
    if args.token is not None:
        try:
            check_token(args.token, getattr(args, "token_from", "ps serve: --token"))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if not 0 < args.sync_timeout < float("inf"):  # (false for nan too)
        raise ConfigError(f"ps serve: --sync-timeout must be a positive number of seconds, got {args.sync_timeout}")
    training_only = [k for k in ("checkpoint", "init_from") if getattr(config, k)] + (["resume"] if config.resume else [])
    if training_only:
        raise ConfigError(f"ps serve: {', '.join(training_only)}: options of distbp train, not of the server "
                          "(its checkpoint is --checkpoint-path, restored at start)")
    if config.grad_clip:
        raise ConfigError("ps serve: grad_clip is not supported with a parameter server (each shard holds only part "
                          "of the gradient whose norm it needs)")
    if (args.tls_key or args.tls_client_ca) and not args.tls_cert:
        raise ConfigError("ps serve: --tls-key and --tls-client-ca need --tls-cert (without it the server would "
                          "serve plaintext)")
    if args.tls_cert and not args.tls_key:
        raise ConfigError("ps serve: --tls-cert needs --tls-key (the certificate's private key)")
    for option, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                         ("--tls-client-ca", args.tls_client_ca)):
        if path is not None:
            check_pem(f"ps serve: {option}", path)
    if args.checkpoint_path:
        check_writable("ps serve: --checkpoint-path", args.checkpoint_path)
        reads = {"the config file": getattr(args, "config", None), "the text file": config.text_file,
                 "--tls-cert": args.tls_cert, "--tls-key": args.tls_key, "--tls-client-ca": args.tls_client_ca}
        for what, path in reads.items():
            if path and same_file(path, args.checkpoint_path):
                raise ConfigError(f"ps serve: --checkpoint-path is {what} ({path}), which the server reads: writing "
                                  "it would destroy it; give --checkpoint-path another file")
    elif args.checkpoint_every_versions:
        raise ConfigError("ps serve: --checkpoint-every-versions needs --checkpoint-path (where to write)")


# Training options that only a worker reads (its backend, outputs and display)
_WORKER_KEYS = ("backend", "world_size", "bucket_cap_mb", "allow_unused", "compress", "timeout", "trace", "ps",
                "ps_token", "ps_tls_ca", "ps_tls_cert", "ps_tls_key", "ps_worker_id", "ps_retry_seconds",
                "eval_every", "log_every", "checkpoint_every", "metrics", "progress", "sample_length")


TOKEN_VARIABLE = "DISTBP_PS_TOKEN"  # the token, for servers without --token and workers without ps_token


def token_and_source(token, option):
    """(token, what to call it in a message): the one given as `option`, else DISTBP_PS_TOKEN's, kept off the
    command line, where other users of the machine read it in `ps`."""
    if token is None and os.environ.get(TOKEN_VARIABLE):
        return os.environ[TOKEN_VARIABLE], TOKEN_VARIABLE
    return token, option


def _loopback(host):
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def shard_checkpoint_path(path, shard, num_shards):
    """The file a shard checkpoints to: `path` itself for a single shard, `path.shardI` for shard I of several
    (shards given one path, on one machine or on a shared file system, wrote over each other's file)."""
    if not path or not path.strip() or not 0 <= shard < num_shards:
        return path  # (refused or unused: check_server_options says why)
    if num_shards == 1:
        if not Path(path).exists() and Path(f"{path}.shard0").exists():  # launch/ps_cluster.sh's name before
            raise ConfigError(f"ps serve: no checkpoint at {path}, but one at {path}.shard0 (launch/ps_cluster.sh "
                              f"named a single server's file so before): rename it to {path} to go on from it")
        return path
    own = f"{path}.shard{shard}"
    if Path(path).exists() and not Path(own).exists():  # written by shard files of one name (distbp before)
        raise ConfigError(f"ps serve: there is a file at {path}, but shard {shard} of {num_shards} checkpoints to "
                          f"{own} (each shard has a file of its own): if it is this shard's checkpoint, rename it "
                          f"to {own}")
    return own


def run_server(config, args, stream=None):
    """Serve until SIGTERM or SIGINT; on either, stop taking pushes, write the checkpoint (if configured)
    and stop."""
    stream = stream or sys.stdout
    logging.basicConfig(level=logging.INFO, format="distbp ps: %(message)s")
    args.checkpoint_path = shard_checkpoint_path(args.checkpoint_path, args.shard, args.num_shards)
    args.token, args.token_from = token_and_source(args.token, "ps serve: --token")
    check_server_options(config, args)
    ignored = keys_given(config, _WORKER_KEYS)
    if ignored:  # one option list serves servers and workers alike (launch/ps_cluster.sh gives both the same)
        logging.getLogger("distbp.ps").info("options of the workers, not of a server, ignored here: %s",
                                            ", ".join(f"--{k.replace('_', '-')}" for k in ignored))
    shard = build_shard(config, args.shard, args.num_shards, args.workers, args.mode, args.staleness,
                        args.sync_timeout, args.checkpoint_path, args.checkpoint_every_versions)
    tls = dict(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca) if args.tls_cert else None
    if args.mode != "sync" and args.workers >= 3 and config.optimizer == "sgd" and config.momentum >= 0.8:
        # stale gradients add momentum of their own (about 1 - 1/W): with the default 0.9 training can diverge
        logging.getLogger("distbp.ps").warning(
            "%s mode with %d workers and momentum %g: each gradient is about %d steps stale, which acts as extra "
            "momentum; if training diverges, lower --momentum (e.g. 0.5) or --lr", args.mode, args.workers,
            config.momentum, args.workers - 1)
    if not args.token and not tls and not _loopback(args.host):
        logging.getLogger("distbp.ps").warning(
            "listening on %s with neither a token nor TLS: anyone who can reach the port can read and change the "
            "parameters (give --token or %s, and --tls-cert/--tls-key)", args.host, TOKEN_VARIABLE)
    try:
        server, port = serve(shard, args.host, args.port, args.token, tls)
    except BaseException:
        shard.stop()  # (its straggler monitor would go on in a process that does not end here)
        raise
    stream.write(f"distbp ps: shard {args.shard} of {args.num_shards} ({len(shard.params)} parameters, "
                 f"{args.mode}, {args.workers} worker{'s' if args.workers != 1 else ''}) serving on {host_port(args.host, port)}, version {shard.version}\n")
    stream.flush()
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(0.2):
        pass
    shard.stop()  # from here pushes are refused (UNAVAILABLE: workers retry), so the checkpoint is final
    try:
        with shard.cond:
            if args.checkpoint_path:
                shard.save(args.checkpoint_path)
    except BaseException:
        stream.write(f"distbp ps: shard {args.shard} stopped at version {shard.version}, which its checkpoint could "
                     "not keep (below): the file holds the last version written\n")
        stream.flush()
        raise
    finally:  # the workers' calls end as at any stop (UNAVAILABLE: they retry), not cut off with the process
        server.stop(grace=1.0).wait()
    stream.write(f"distbp ps: shard {args.shard} stopped at version {shard.version}\n")
    stream.flush()
