#!/usr/bin/env bash
# A parameter-server job on one machine: S server shards and W workers, all on 127.0.0.1.
#
#   launch/ps_cluster.sh 2 4 --mode sync -- --model mlp --epochs 10
#      servers workers [server options --] [training options, given to servers and workers alike]
#
# Server options: --mode sync|async|bounded, --staleness S, --sync-timeout SEC, --token T (servers and workers
# get it in the environment variable DISTBP_PS_TOKEN, kept out of `ps`; to keep it off this script's own
# command line too, run `DISTBP_PS_TOKEN=T launch/ps_cluster.sh ...` instead of giving --token),
# --tls-cert/--tls-key/--tls-client-ca (the workers' --ps-tls-* go among the training options),
# --checkpoint-path FILE --checkpoint-every-versions K (with several shards, each writes FILE.shardN; the
# same command again continues the job from the servers' checkpoints). The training
# options must be the same for servers and workers: the servers build the same model and optimizer.
# Ports come from BASE_PORT (default 50051) upwards. Ctrl-C stops everything: SIGTERM to every process,
# then SIGKILL to any still running STOP_GRACE seconds later (default 30); so does a server or a worker that
# fails, whose status the script exits with. PYTHON (default python3) runs them all (a virtual
# environment's python, say).
set -euo pipefail
# arrays that may be empty expand as ${a[@]+"${a[@]}"}: under set -u, bash before 4.4 (macOS's 3.2) stops at
# an empty "${a[@]}" as an unbound variable
usage="usage: launch/ps_cluster.sh SERVERS WORKERS [server options --] [training options]"
servers=${1:-}
workers=${2:-}
for count in "$servers" "$workers"; do
  if ! [[ $count =~ ^[1-9][0-9]*$ ]]; then
    echo "launch/ps_cluster.sh: SERVERS and WORKERS must be positive integers, not '${count}'" >&2
    echo "$usage" >&2
    exit 2
  fi
  # past bash's integer a count wraps round to another, and comparisons fail with a message, not the script
  if [ ${#count} -gt 6 ]; then
    echo "launch/ps_cluster.sh: SERVERS and WORKERS must be at most 999999, not '${count}'" >&2
    exit 2
  fi
done
shift 2
server_opts=()
# the separator is an argument that is exactly --, not " -- " inside one (a path with spaces, say)
separator=""
for arg in "$@"; do
  if [ "$arg" = "--" ]; then separator=yes; break; fi
done
if [ -n "$separator" ]; then
  while [ "$1" != "--" ]; do server_opts+=("$1"); shift; done
  shift
else
  for arg in "$@"; do
    case "$arg" in
      --mode | --mode=* | --staleness* | --sync-timeout* | --token | --token=* | --tls-* | --checkpoint-path* | \
        --checkpoint-every-versions*)
        echo "launch/ps_cluster.sh: $arg is a server option: end the server options with -- (the workers" \
          "would refuse it)" >&2
        echo "$usage" >&2
        exit 2 ;;
    esac
  done
fi
# the script sets these itself: another value would make the servers wait for workers that never come, or the
# workers dial ports where no server listens
for arg in ${server_opts[@]+"${server_opts[@]}"} "$@"; do
  case "$arg" in
    --workers | --workers=*) set_by="from WORKERS" ;;
    --shard | --shard=* | --num-shards | --num-shards=*) set_by="from SERVERS" ;;
    --port | --port=*) set_by="from BASE_PORT (shard i listens on BASE_PORT+i)" ;;
    --host | --host=*) set_by="as 127.0.0.1 (it runs every process on this machine)" ;;
    --ps | --ps=*) set_by="from SERVERS and BASE_PORT (the addresses of its servers)" ;;
    --ps-worker-id | --ps-worker-id=*) set_by="from WORKERS (worker i asks for id i)" ;;
    --backend | --backend=*) set_by="as ps" ;;
    *) continue ;;
  esac
  echo "launch/ps_cluster.sh: ${arg%%=*} is set by the script ${set_by}: leave it out" >&2
  exit 2
done
python=${PYTHON:-python3}
# checked here: else every server and worker says it, in a line of bash's
if ! command -v "$python" >/dev/null; then
  echo "launch/ps_cluster.sh: PYTHON '$python' is not a command here (not on PATH, or not an executable file)" >&2
  exit 2
fi
base=${BASE_PORT:-50051}
if ! [[ $base =~ ^[1-9][0-9]{0,4}$ ]] || [ "$base" -gt $((65536 - servers)) ]; then
  echo "launch/ps_cluster.sh: BASE_PORT must be a port number with room for ${servers} server(s) above it" \
    "(1-$((65536 - servers))), not '${base}'" >&2
  exit 2
fi
# given OPTION ARGS...: whether ARGS hold OPTION, alone or as OPTION=VALUE
given() {
  local option=$1 arg
  shift
  for arg in "$@"; do
    case "$arg" in "$option" | "$option"=*) return 0 ;; esac
  done
  return 1
}
token=""
tls=""
client_ca=""
opts=()
for ((i = 0; i < ${#server_opts[@]}; i++)); do
  case "${server_opts[$i]}" in
    # the token leaves the command line: the servers, like the workers, get it in the environment
    --token) i=$((i + 1)); token=${server_opts[$i]:-}; token_given=yes; continue ;;
    --token=*) token=${server_opts[$i]#--token=}; token_given=yes; continue ;;
    --tls-cert | --tls-cert=*) tls=yes ;;
    --tls-client-ca | --tls-client-ca=*) client_ca=yes ;;
  esac
  opts+=("${server_opts[$i]}")
done
server_opts=(${opts[@]+"${opts[@]}"})
if [ -n "${token_given:-}" ] && [ -z "$token" ]; then  # (empty in DISTBP_PS_TOKEN, the servers would check none)
  echo "launch/ps_cluster.sh: --token needs a value (or give none, for servers without a token)" >&2
  exit 2
fi
# the workers would retry servers they cannot talk to for a minute, then fail with a message about sockets
if [ -n "$tls" ] && ! given --ps-tls-ca "$@" && ! given --config "$@"; then
  echo "launch/ps_cluster.sh: the servers serve TLS (--tls-cert): give the workers the CA that signed it among" \
    "the training options (-- ... --ps-tls-ca CA.pem, or ps_tls_ca in a --config file; for mutual TLS also" \
    "--ps-tls-cert and --ps-tls-key)" >&2
  exit 2
fi
if [ -n "$tls" ] && [ -n "$client_ca" ] && ! { given --ps-tls-cert "$@" && given --ps-tls-key "$@"; } &&
  ! given --config "$@"; then
  echo "launch/ps_cluster.sh: the servers require client certificates (--tls-client-ca): give the workers" \
    "theirs among the training options (-- ... --ps-tls-cert CERT.pem --ps-tls-key KEY.pem, or ps_tls_cert and" \
    "ps_tls_key in a --config file)" >&2
  exit 2
fi
pids=()
worker_pids=()
grace=${STOP_GRACE:-30}
if ! [[ $grace =~ ^[0-9]{1,6}$ ]]; then
  echo "launch/ps_cluster.sh: STOP_GRACE must be a whole number of seconds, not '${grace}'" >&2
  exit 2
fi
# background jobs of a script ignore Ctrl-C's SIGINT: on it (or SIGTERM), end workers and servers ourselves.
# SIGTERM first (a server writes its checkpoint); whatever still runs STOP_GRACE seconds later is killed,
# so the script never waits for ever on a process that did not stop
# `cleanup check`, at the end of a run whose workers all succeeded, also fails the job when a server failed as
# it stopped (its final checkpoint not written, say); 143 is our SIGTERM arriving before it set its handler
server_status=0
cleanup() {
  local all=(${worker_pids[@]+"${worker_pids[@]}"} ${pids[@]+"${pids[@]}"}) left p code ticks=0
  [ ${#all[@]} -gt 0 ] || return 0
  kill "${all[@]}" 2>/dev/null || true
  while :; do
    left=()
    for p in "${all[@]}"; do kill -0 "$p" 2>/dev/null && left+=("$p"); done
    [ ${#left[@]} -gt 0 ] || break
    if [ $ticks -ge $((grace * 5)) ]; then
      echo "launch/ps_cluster.sh: killing ${left[*]}: still running ${grace} s after SIGTERM (STOP_GRACE)" >&2
      kill -KILL "${left[@]}" 2>/dev/null || true
      break
    fi
    sleep 0.2
    ticks=$((ticks + 1))
  done
  for p in ${worker_pids[@]+"${worker_pids[@]}"}; do wait "$p" 2>/dev/null || true; done
  for p in ${pids[@]+"${pids[@]}"}; do
    code=0
    wait "$p" 2>/dev/null || code=$?
    if [ "${1:-}" = check ] && [ $code != 0 ] && [ $code != 143 ]; then
      echo "launch/ps_cluster.sh: a server (pid $p) exited with status $code as it stopped" >&2
      server_status=$code
    fi
  done
  worker_pids=()
  pids=()
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM
# the token goes in the environment, which other users cannot read, not on command lines, which they can (in ps)
if [ -n "$token" ]; then
  export DISTBP_PS_TOKEN=$token
fi
# a server that has exited ends the job at once: the workers would retry it for a minute
check_servers() {
  local pid code
  for pid in ${pids[@]+"${pids[@]}"}; do
    if ! kill -0 "$pid" 2>/dev/null; then
      code=0
      wait "$pid" || code=$?
      echo "launch/ps_cluster.sh: a server (pid $pid) exited with status $code $1" >&2
      exit $((code ? code : 1))
    fi
  done
}
addresses=""
for ((s = 0; s < servers; s++)); do
  port=$((base + s))
  OMP_NUM_THREADS=1 "$python" -m distbp ps serve --shard "$s" --num-shards "$servers" --workers "$workers" \
    --port "$port" ${server_opts[@]+"${server_opts[@]}"} "$@" &
  pids+=($!)
  addresses+="${addresses:+,}127.0.0.1:$port"
done
# the workers start once every server listens (else each says every shard is unavailable, and retries), for
# up to 30 s: a server restoring a large checkpoint may take longer, and the workers then retry it themselves
ticks=0
s=0
while [ $s -lt "$servers" ] && [ $ticks -lt 150 ]; do
  check_servers "before it listened"
  if (: <"/dev/tcp/127.0.0.1/$((base + s))") 2>/dev/null; then
    s=$((s + 1))
  else
    sleep 0.2
    ticks=$((ticks + 1))
  fi
done
for ((w = 0; w < workers; w++)); do
  # worker w asks for id w: the worker with id 0 reports, and it is the one whose progress is shown (a
  # --progress among the training options is worker 0's: the others' --progress none comes after it)
  if [ "$w" = 0 ]; then
    OMP_NUM_THREADS=1 "$python" -m distbp train --backend ps --ps "$addresses" --ps-worker-id 0 --progress auto "$@" &
  else
    OMP_NUM_THREADS=1 "$python" -m distbp train --backend ps --ps "$addresses" --ps-worker-id "$w" "$@" \
      --progress none &
  fi
  worker_pids+=($!)
done
# wait for the workers; a server that exits meanwhile (a port in use, a bad option) ends the job at once,
# instead of leaving the workers to retry a server that is not coming, and so does a worker that fails (in
# sync mode the servers and the other workers would wait for it for ever)
running=("${worker_pids[@]}")
while [ ${#running[@]} -gt 0 ]; do
  check_servers "while the workers ran"
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
    else
      code=0
      wait "$pid" || code=$?
      if [ $code != 0 ]; then
        for ((w = 0; w < workers; w++)); do [ "${worker_pids[$w]}" = "$pid" ] && break; done
        echo "launch/ps_cluster.sh: worker $w (pid $pid) exited with status $code: stopping the others" >&2
        exit $code
      fi
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  [ ${#running[@]} -gt 0 ] && sleep 0.2
done
cleanup check
exit $server_status
