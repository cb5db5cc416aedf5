#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the tests (tests/test_slurm_cluster.py).
#
#   tests/slurm_cluster.sh start [STATE_DIR]   install slurm-wlm + munge if missing (apt-get, as root),
#                                              write STATE_DIR/slurm.conf for this host, start munged,
#                                              slurmctld and slurmd, wait until the node is idle;
#                                              prints SLURM_CONF=STATE_DIR/slurm.conf on success
#   tests/slurm_cluster.sh stop  [STATE_DIR]   stop the daemons this script started (by their PIDs)
#
# STATE_DIR defaults to /tmp/hs3-slurm. Only the daemons listed in STATE_DIR/pids are ever stopped.
set -euo pipefail

action="${1:-}"
STATE="${2:-/tmp/hs3-slurm}"
PIDS="$STATE/pids"

die() { echo "slurm_cluster: $*" >&2; exit 1; }

is_alive() {  # a zombie (state Z) counts as dead: a stopped daemon lingers as one until reaped
  local pid="$1" state
  [ -r "/proc/$pid/stat" ] || return 1
  state="$(sed 's/^.*) //' "/proc/$pid/stat" | cut -d' ' -f1)"
  [ "$state" != Z ]
}

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "slurm-wlm/munge are not installed and installing them needs root"
  command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and there is no apt-get"
  echo "slurm_cluster: installing slurm-wlm and munge" >&2
  apt-get update -qq >&2 || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2 \
    || die "apt-get install slurm-wlm munge failed"
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0  # a munged already runs (not ours: we leave it alone)
  fi
  [ -f /etc/munge/munge.key ] || { mungekey --create >&2 || die "cannot create /etc/munge/munge.key"; }
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged || die "munged did not start"
  local pid
  for _ in $(seq 50); do
    pid="$(cat /run/munge/munged.pid 2>/dev/null || true)"
    [ -n "$pid" ] && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.1
  done
  [ -n "$pid" ] || die "munged wrote no PID file"
  echo "munged $pid" >> "$PIDS"
}

write_conf() {
  local host node_line mem
  host="$(hostname -s)"
  # The node's real layout (else slurmd reports a topology mismatch), without the UpTime line.
  node_line="$(slurmd -C | head -n 1)"
  mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")"
  cat > "$STATE/slurm.conf" <<EOF
# Written by tests/slurm_cluster.sh for the test suite: one node, one partition, no accounting.
ClusterName=hs3test
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=${HS3_SLURMCTLD_PORT:-6817}
SlurmdPort=${HS3_SLURMD_PORT:-6818}
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
MailProg=/bin/true
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs wait cred_expire before they can run again (120 s by default).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=5
# Without a default, each job takes the whole node's memory and jobs run one at a time.
DefMemPerCPU=$(( mem / 4 ))
JobRequeue=1
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
$node_line State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { SLURM_CONF="$STATE/slurm.conf" sinfo -h -N -o %T 2>/dev/null | head -n 1; }

start() {
  install_if_missing
  if [ -f "$PIDS" ]; then "$0" stop "$STATE" >/dev/null 2>&1 || true; fi
  local port
  for port in "${HS3_SLURMCTLD_PORT:-6817}" "${HS3_SLURMD_PORT:-6818}"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      die "port $port is already in use (another SLURM running? set HS3_SLURMCTLD_PORT/HS3_SLURMD_PORT)"
    fi
  done
  rm -rf "$STATE/ctld" "$STATE/d"   # a fresh state dir: job ids restart at 1
  mkdir -p "$STATE/ctld" "$STATE/d"
  : > "$PIDS"
  start_munge
  write_conf
  export SLURM_CONF="$STATE/slurm.conf"
  setsid /usr/sbin/slurmctld -D -i -f "$SLURM_CONF" >"$STATE/slurmctld.out" 2>&1 < /dev/null &
  echo "slurmctld $!" >> "$PIDS"
  setsid /usr/sbin/slurmd -D -f "$SLURM_CONF" >"$STATE/slurmd.out" 2>&1 < /dev/null &
  echo "slurmd $!" >> "$PIDS"
  local state=""
  for _ in $(seq 120); do
    state="$(node_state)"
    [ "$state" = idle ] && break
    while read -r name pid; do
      is_alive "$pid" || die "$name exited: $(tail -n 3 "$STATE/$name.log" "$STATE/$name.out" 2>/dev/null | tr '\n' ' ')"
    done < "$PIDS"
    sleep 0.5
  done
  [ "$state" = idle ] || die "node not idle after 60 s (state: ${state:-unknown}); see $STATE/*.log"
  echo "SLURM_CONF=$SLURM_CONF"
}

stop() {
  [ -f "$PIDS" ] || return 0
  local name pid
  # slurmd and slurmctld first, munged last (the others talk to it while shutting down)
  for wanted in slurmd slurmctld munged; do
    while read -r name pid; do
      [ "$name" = "$wanted" ] || continue
      is_alive "$pid" && kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do is_alive "$pid" || break; sleep 0.2; done
      is_alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
    done < "$PIDS"
  done
  rm -f "$PIDS"
}

case "$action" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop [STATE_DIR]" >&2; exit 2 ;;
esac
