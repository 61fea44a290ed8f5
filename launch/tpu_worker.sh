#!/bin/bash
# Runs on every worker of a Cloud TPU slice, from the copy of the repo that launch/tpu_pod.py
# unpacks to ~/yuanjax. The run is detached from any ssh session: `start` returns at once and
# a supervisor (its own session, setsid) runs the trainer, copies its log to LOG_URL every
# UPLOAD_S seconds, and at the end writes LOG_URL/worker-I-of-N.exit-RC. A dropped ssh
# connection or a dead launching machine neither stops nor orphans it.
#
#   bash launch/tpu_worker.sh install PYTHON      venv at ~/yuanjax/.venv (apt if needed)
#   bash launch/tpu_worker.sh start LOG_URL ON_EXIT -- TRAIN_ARGV...
#   bash launch/tpu_worker.sh stop GRACE_S [keep] SIGTERM to the trainer, wait, then SIGKILL
#   bash launch/tpu_worker.sh status              one line: running / exited RC / no run
#
# ON_EXIT (may be empty) is a shell command worker 0 (of slice 0) runs once every worker has
# finished (or after EXIT_WAIT_S), unless `stop ... keep` came first: tpu_pod.py passes the
# deletion of a slice it created, so that the slice goes away even when the launching machine
# is gone. When it fails (e.g. the workers' service account may not delete TPUs), worker 0
# uploads its output as LOG_URL/on_exit-failed. Worker I of N comes from the TPU VM metadata
# (agent-worker-number, worker-network-endpoints: what jax's cloud_tpu_cluster reads), read
# by `start`, which fails when it cannot; YUANJAX_WORKER_ID / YUANJAX_WORKER_COUNT override it
# (the tests do). With MEGASCALE_NUM_SLICES > 1 (multi-slice) the files are named
# slice-S-of-M-worker-I-of-N. Before a start, processes holding the TPU and libtpu's lock file
# are cleared, as MaxText's multihost_runner does.
set -euo pipefail

RUN_DIR=${YUANJAX_RUN_DIR:-$HOME/yuanjax-run}   # outside ~/yuanjax: a reinstall keeps it
UPLOAD_S=${YUANJAX_UPLOAD_S:-60}
EXIT_WAIT_S=${YUANJAX_EXIT_WAIT_S:-300}
LIBTPU_LOCKFILE=${YUANJAX_LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}
SELF=$(readlink -f "$0")
META=http://metadata.google.internal/computeMetadata/v1/instance/attributes

meta() {
  curl -sf --retry 5 --retry-delay 2 -H 'Metadata-Flavor: Google' "$META/$1"
}

boot_id() {
  cat /proc/sys/kernel/random/boot_id
}

worker_id() {
  echo "${YUANJAX_WORKER_ID:-$(meta agent-worker-number)}"
}

worker_count() {
  if [[ -n ${YUANJAX_WORKER_COUNT:-} ]]; then
    echo "$YUANJAX_WORKER_COUNT"
  else
    meta worker-network-endpoints | tr ',' '\n' | grep -c .
  fi
}

alive() {  # is the trainer running? (a pid file from before a reboot is not a run)
  local pid boot
  read -r pid boot <"$RUN_DIR/pid" 2>/dev/null && [[ $boot == "$(boot_id)" ]] &&
    kill -0 "$pid" 2>/dev/null
}

run_name() {  # worker-I-of-N, or slice-S-of-M-worker-I-of-N with several slices
  local id count
  id=$(worker_id) || true
  count=$(worker_count) || true
  if [[ ! $id =~ ^[0-9]+$ || ! $count =~ ^[1-9][0-9]*$ ]]; then
    echo "worker number '$id' of '$count': not numbers" >&2
    return 1
  fi
  if ((${MEGASCALE_NUM_SLICES:-1} > 1)); then
    echo "slice-$MEGASCALE_SLICE_ID-of-$MEGASCALE_NUM_SLICES-worker-$id-of-$count"
  else
    echo "worker-$id-of-$count"
  fi
}

free_tpu() {  # kill what holds the TPU devices, remove libtpu's lock file
  local pids
  shopt -s nullglob
  local devices=(/dev/accel* /dev/vfio/[0-9]*)
  shopt -u nullglob
  if ((${#devices[@]})); then
    pids=$(sudo -n lsof -t "${devices[@]}" 2>/dev/null | sort -u || true)
    for pid in $pids; do
      echo "$(hostname): killing process $pid, which holds the TPU"
      sudo -n kill -9 "$pid" || true
    done
  fi
  rm -f "$LIBTPU_LOCKFILE" 2>/dev/null || sudo -n rm -f "$LIBTPU_LOCKFILE" || true
}

wait_for_apt() {  # first boot: unattended-upgrades holds the dpkg lock for minutes
  local i
  for ((i = 0; i < 600; i += 5)); do
    sudo fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock \
      >/dev/null 2>&1 || return 0
    echo "waiting for the dpkg lock ($i s)"
    sleep 5
  done
}

install() {
  local py=$1
  if ! "$py" -m venv .venv; then
    wait_for_apt
    # DPkg::Lock::Timeout (apt >= 1.9.11): wait for the lock instead of failing.
    sudo apt-get -o DPkg::Lock::Timeout=600 update -q
    sudo apt-get -o DPkg::Lock::Timeout=600 install -y -q "$py" "$py-venv"
    "$py" -m venv --clear .venv
  fi
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt . 'jax[tpu]'
}

upload() {  # upload FILE URL, never fatal: a failed copy is retried at the next tick
  gcloud storage cp --quiet "$1" "$2" >/dev/null 2>&1 || echo "upload of $1 failed"
}

start() {
  local log_url=$1 on_exit=$2
  shift 2
  [[ ${1:-} == -- ]] && shift
  mkdir -p "$RUN_DIR"
  if alive; then
    echo "$(hostname): a run is already going (pid $(cut -d' ' -f1 "$RUN_DIR/pid"));" \
      "not starting another"
    return 0
  fi
  local name
  if ! name=$(run_name); then
    echo "$(hostname): cannot read this worker's number from the metadata server" >&2
    return 1
  fi
  rm -f "$RUN_DIR/exit" "$RUN_DIR/pid" "$RUN_DIR/keep"
  free_tpu
  setsid nohup bash "$SELF" supervise "$log_url" "$on_exit" "$name" -- "$@" \
    >"$RUN_DIR/supervisor.log" 2>&1 </dev/null &
  for _ in {1..100}; do [[ -f $RUN_DIR/pid ]] && break; sleep 0.1; done
  if [[ ! -f $RUN_DIR/pid ]]; then
    echo "$(hostname): the supervisor did not start the trainer; its log:" >&2
    cat "$RUN_DIR/supervisor.log" >&2
    return 1
  fi
  echo "$(hostname): started $name (pid $(cut -d' ' -f1 "$RUN_DIR/pid"))"
}

supervise() {
  local log_url=$1 on_exit=$2 name=$3 log pid rc=0 tick=0
  shift 4
  log="$RUN_DIR/$name.log"
  "$@" >"$log" 2>&1 </dev/null &
  pid=$!
  echo "$pid $(boot_id)" >"$RUN_DIR/pid"
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if ((++tick % UPLOAD_S == 0)); then upload "$log" "$log_url/$name.log"; fi
  done
  wait "$pid" || rc=$?
  echo "$rc" >"$RUN_DIR/exit"
  upload "$log" "$log_url/$name.log"
  upload "$RUN_DIR/exit" "$log_url/$name.exit-$rc"
  if [[ -n $on_exit && $name =~ ^(slice-0-of-[0-9]+-)?worker-0-of- ]]; then
    wait_for_all "$log_url" $((${MEGASCALE_NUM_SLICES:-1} * ${name##*-of-}))
    if [[ -f $RUN_DIR/keep ]]; then
      echo "stopped with keep: not running $on_exit"
    else
      echo "running: $on_exit"
      bash -c "$on_exit" >"$RUN_DIR/on_exit.log" 2>&1 || {
        echo "exit command failed: $on_exit" | tee -a "$RUN_DIR/on_exit.log"
        upload "$RUN_DIR/on_exit.log" "$log_url/on_exit-failed"
      }
    fi
  fi
}

wait_for_all() {  # wait_for_all LOG_URL N: until N exit files are there, at most EXIT_WAIT_S
  local i n
  for ((i = 0; i < EXIT_WAIT_S; i += 5)); do
    n=$(gcloud storage ls "$1/" 2>/dev/null | grep -c '\.exit-[0-9]*$' || true)
    ((n >= $2)) && return 0
    sleep 5
  done
}

stop() {
  local grace=$1 keep=${2:-} i pid
  if [[ $keep == keep ]]; then touch "$RUN_DIR/keep"; fi  # worker 0 then deletes nothing
  if ! alive; then
    echo "$(hostname): no run going"
    return 0
  fi
  echo "$(hostname): SIGTERM to the trainer; waiting up to $grace s for its checkpoint"
  read -r pid _ <"$RUN_DIR/pid"
  kill -TERM "$pid"
  for ((i = 0; i < grace; i++)); do alive || break; sleep 1; done
  if alive; then
    echo "$(hostname): still running after $grace s: SIGKILL"
    kill -KILL "$pid"
  fi
  for _ in {1..60}; do [[ -f $RUN_DIR/exit ]] && break; sleep 1; done  # the final upload
  echo "$(hostname): stopped"
}

status() {
  if alive; then
    echo "$(hostname): running (pid $(cut -d' ' -f1 "$RUN_DIR/pid"))"
  elif [[ -f $RUN_DIR/exit ]]; then
    echo "$(hostname): exited with status $(cat "$RUN_DIR/exit")"
  else
    echo "$(hostname): no run"
  fi
}

cd "$(dirname "$SELF")/.."
command=${1:?usage: tpu_worker.sh install|start|stop|status ...}
shift
case $command in
  install | start | supervise | stop | status) "$command" "$@" ;;
  *) echo "tpu_worker.sh: unknown command $command" >&2; exit 2 ;;
esac
