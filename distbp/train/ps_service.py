"""`distbp ps serve`: one parameter-server shard built from the same configuration as the workers."""

import logging
import signal
import sys
import threading

from ..autograd import manual_seed
from ..data import BatchLoader, ShardSampler
from ..ps.client import model_signature
from ..ps.server import Shard, serve
from ..ps.wire import assign_shards
from .config import ConfigError
from .trainer import build_data, build_model, build_optimizer, build_schedule


def build_shard(config, shard=0, num_shards=1, workers=1, mode="sync", staleness=2, sync_timeout=60.0,
                checkpoint=None, checkpoint_every=0):
    """The shard's parameters (initialised exactly as the workers' models), optimizer and schedule."""
    if not 0 <= shard < num_shards:
        raise ConfigError(f"ps serve: shard {shard} is not in [0, {num_shards})")
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
    schedule = build_schedule(config, optimizer, config.epochs * len(loader))
    return Shard(mine, optimizer, schedule, mode, workers, staleness, sync_timeout, shard, num_shards,
                 model_signature(named), checkpoint, checkpoint_every)


def run_server(config, args, stream=None):
    """Serve until SIGTERM or SIGINT; on either, write the checkpoint (if configured) and stop."""
    stream = stream or sys.stdout
    logging.basicConfig(level=logging.INFO, format="distbp ps: %(message)s")
    shard = build_shard(config, args.shard, args.num_shards, args.workers, args.mode, args.staleness,
                        args.sync_timeout, args.checkpoint_path, args.checkpoint_every_versions)
    tls = dict(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca) if args.tls_cert else None
    server, port = serve(shard, args.host, args.port, args.token, tls)
    stream.write(f"distbp ps: shard {args.shard} of {args.num_shards} ({len(shard.params)} parameters, "
                 f"{args.mode}, {args.workers} workers) serving on {args.host}:{port}, version {shard.version}\n")
    stream.flush()
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(0.2):
        pass
    with shard.cond:
        if args.checkpoint_path:
            shard.save(args.checkpoint_path)
    shard.stop()
    server.stop(grace=1.0).wait()
    stream.write(f"distbp ps: shard {args.shard} stopped at version {shard.version}\n")
    stream.flush()
