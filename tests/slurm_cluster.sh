#!/usr/bin/env bash
# A real multi-node SLURM on this one machine, for the tests (tests/conftest.py's `slurm` fixture).
#
#   tests/slurm_cluster.sh start [STATE_DIR]   install slurm-wlm + munge + iproute2 if missing (apt-get,
#                                              as root); make one network namespace per node (n1, n2, ...)
#                                              joined by veth pairs to a bridge; write STATE_DIR/slurm.conf;
#                                              start its own munged (own key and socket), slurmctld (on the
#                                              bridge address: this machine is the "login node") and one
#                                              slurmd per node (in its
#                                              namespace, with its own hostname and /etc/hosts); wait until
#                                              every node is idle; prints SLURM_CONF=STATE_DIR/slurm.conf
#   tests/slurm_cluster.sh stop  [STATE_DIR]   stop the daemons this script started (by their PIDs) and
#                                              remove its network namespaces and bridge
#
# HS3_SLURM_NODES (default 2) nodes. Each node is a network host of its own (IP, hostname n1, n2, ...), so
# MASTER_ADDR, srun -w/--exclude, Ray and torch.distributed cross a real (virtual) network between nodes.
# STATE_DIR defaults to /tmp/hs3-slurm. Only the daemons listed in STATE_DIR/pids are ever stopped.
set -euo pipefail

action="${1:-}"
STATE="${2:-/tmp/hs3-slurm}"
PIDS="$STATE/pids"
NODES="${HS3_SLURM_NODES:-2}"
# Names of this cluster's network objects, unique per STATE_DIR (interface names: 15 characters at most).
TAG="$(printf '%s' "$STATE" | md5sum | cut -c1-6)"
NET="10.$(( 0x${TAG:0:2} % 200 + 20 )).$(( 0x${TAG:2:2} ))"   # NET.1: the bridge (slurmctld); NET.1+i: node i
BRIDGE="hs3b$TAG"

die() { echo "slurm_cluster: $*" >&2; exit 1; }

is_alive() {  # a zombie (state Z) counts as dead: a stopped daemon lingers as one until reaped
  local pid="$1" state
  [ -r "/proc/$pid/stat" ] || return 1
  state="$(sed 's/^.*) //' "/proc/$pid/stat" | cut -d' ' -f1)"
  [ "$state" != Z ]
}

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v ip >/dev/null; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "slurm-wlm/munge/iproute2 are not installed and installing them needs root"
  command -v apt-get >/dev/null || die "slurm-wlm/munge/iproute2 are not installed and there is no apt-get"
  echo "slurm_cluster: installing slurm-wlm, munge and iproute2" >&2
  apt-get update -qq >&2 || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge iproute2 >&2 \
    || die "apt-get install slurm-wlm munge iproute2 failed"
}

MUNGE_DIR="/run/hs3-munge-$TAG"   # the socket's directory must be reachable by all (munged checks)

start_munge() {  # this cluster's own munged (own key and socket): another cluster's stop cannot break it
  mkdir -p -m 755 "$MUNGE_DIR"
  [ -f "$STATE/munge.key" ] || mungekey --create --keyfile "$STATE/munge.key" >&2 || die "cannot create a munge key"
  /usr/sbin/munged --socket="$MUNGE_DIR/munge.socket" --key-file="$STATE/munge.key" --pid-file="$MUNGE_DIR/munged.pid" \
    --log-file="$STATE/munged.log" --seed-file="$STATE/munged.seed" || die "munged did not start: $(tail -n 1 "$STATE/munged.log")"
  local pid=""
  for _ in $(seq 50); do
    pid="$(cat "$MUNGE_DIR/munged.pid" 2>/dev/null || true)"
    [ -n "$pid" ] && munge -n -S "$MUNGE_DIR/munge.socket" </dev/null 2>/dev/null \
      | unmunge -S "$MUNGE_DIR/munge.socket" >/dev/null 2>&1 && break
    sleep 0.1
  done
  [ -n "$pid" ] || die "munged wrote no PID file"
  echo "munged $pid" >> "$PIDS"
}

ns_name() { echo "hs3-$TAG-n$1"; }

make_network() {  # a bridge on this host; per node a namespace with a veth pair onto the bridge
  [ "$(id -u)" = 0 ] || die "making network namespaces for the nodes needs root"
  ip link add "$BRIDGE" type bridge || die "cannot create bridge $BRIDGE (no CAP_NET_ADMIN?)"
  echo "$BRIDGE" > "$STATE/net"
  ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  local i ns hosts
  hosts="127.0.0.1 localhost"$'\n'"$NET.1 $(hostname -s)"
  for i in $(seq "$NODES"); do hosts+=$'\n'"$NET.$((i + 1)) n$i"; done
  for i in $(seq "$NODES"); do
    ns="$(ns_name "$i")"
    ip netns add "$ns" || die "cannot create network namespace $ns"
    echo "netns $ns" >> "$STATE/net"
    ip link add "hs3v$TAG$i" type veth peer name eth0 netns "$ns"
    ip link set "hs3v$TAG$i" master "$BRIDGE" up
    ip -n "$ns" addr add "$NET.$((i + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    # the node's /etc/hosts (bind-mounted over /etc/hosts in its slurmd's mount namespace): every node's
    # name, its own to its own address (as on a real cluster)
    printf '%s\n' "$hosts" > "$STATE/hosts-n$i"
  done
}

remove_network() {
  [ -f "$STATE/net" ] || return 0
  local kind name
  while read -r kind name; do
    [ "$kind" = netns ] || continue
    ip netns del "$name" 2>/dev/null || true
  done < <(tail -n +2 "$STATE/net")
  ip link del "$(head -n 1 "$STATE/net")" 2>/dev/null || true
  rm -f "$STATE/net"
}

write_conf() {
  local node_line mem cpus i
  # The machine's real layout (else slurmd reports a topology mismatch), without NodeName and UpTime;
  # the nodes share the machine: each has its CPUs and a share of its memory.
  node_line="$(slurmd -C | head -n 1)"
  mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")"
  mem=$(( mem / NODES ))
  cpus="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")"
  node_line="$(sed -e 's/^NodeName=[^ ]* //' -e "s/RealMemory=[0-9]*/RealMemory=$mem/" <<<"$node_line")"
  cat > "$STATE/slurm.conf" <<EOF
# Written by tests/slurm_cluster.sh for the test suite: $NODES nodes (network namespaces on this
# machine), one partition, no accounting.
ClusterName=hs3test
SlurmctldHost=$(hostname -s)($NET.1)
SlurmUser=root
SlurmctldPort=${HS3_SLURMCTLD_PORT:-6817}
SlurmdPort=${HS3_SLURMD_PORT:-6818}
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
MailProg=/bin/true
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs wait cred_expire before they can run again (120 s by default).
AuthInfo=cred_expire=10,socket=$MUNGE_DIR/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=5
# Without a default, each job takes the whole node's memory and jobs run one at a time.
DefMemPerCPU=$(( mem / (cpus * 2) ))
JobRequeue=1
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
EOF
  for i in $(seq "$NODES"); do
    echo "NodeName=n$i NodeAddr=$NET.$((i + 1)) NodeHostname=n$i $node_line State=UNKNOWN" >> "$STATE/slurm.conf"
  done
  echo "PartitionName=test Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP" >> "$STATE/slurm.conf"
}

node_states() { { SLURM_CONF="$STATE/slurm.conf" sinfo -h -N -o %T 2>/dev/null || true; } | sort -u | paste -sd' '; }

start() {
  install_if_missing
  if [ -f "$PIDS" ] || [ -f "$STATE/net" ]; then "$0" stop "$STATE" >/dev/null 2>&1 || true; fi
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
  make_network
  write_conf
  export SLURM_CONF="$STATE/slurm.conf"
  setsid /usr/sbin/slurmctld -D -i -f "$SLURM_CONF" >"$STATE/slurmctld.out" 2>&1 < /dev/null &
  echo "slurmctld $!" >> "$PIDS"
  local i
  for i in $(seq "$NODES"); do  # each slurmd in its node's network namespace, hostname and /etc/hosts
    mkdir -p "$STATE/d/n$i"
    setsid nsenter --net="/run/netns/$(ns_name "$i")" unshare --uts --mount --propagation private \
      bash -c 'mount --bind "$3" /etc/hosts && hostname "$1" && exec /usr/sbin/slurmd -D -N "$1" -f "$2"' \
      _ "n$i" "$SLURM_CONF" "$STATE/hosts-n$i" \
      >"$STATE/slurmd-n$i.out" 2>&1 < /dev/null &
    echo "slurmd-n$i $!" >> "$PIDS"
  done
  local state=""
  for _ in $(seq 120); do
    state="$(node_states)"
    [ "$state" = idle ] && break
    while read -r name pid; do
      is_alive "$pid" || die "$name exited: $(tail -n 3 "$STATE/$name.log" "$STATE/$name.out" 2>/dev/null | tr '\n' ' ')"
    done < "$PIDS"
    sleep 0.5
  done
  [ "$state" = idle ] || die "nodes not idle after 60 s (states: ${state:-unknown}); see $STATE/*.log"
  echo "SLURM_CONF=$SLURM_CONF"
}

stop() {
  if [ -f "$PIDS" ]; then
    local name pid jobs
    # cancel what still runs (a failed test's job), so that no job step outlives its slurmd
    jobs="$(SLURM_CONF="$STATE/slurm.conf" timeout 10 squeue -h -o %i 2>/dev/null || true)"
    if [ -n "$jobs" ]; then
      SLURM_CONF="$STATE/slurm.conf" timeout 10 scancel $jobs 2>/dev/null || true
      for _ in $(seq 30); do
        [ -z "$(SLURM_CONF="$STATE/slurm.conf" timeout 10 squeue -h -o %i 2>/dev/null || true)" ] && break
        sleep 0.5
      done
    fi
    # slurmd and slurmctld first, munged last (the others talk to it while shutting down)
    for wanted in slurmd slurmctld munged; do
      while read -r name pid; do
        [ "${name%%-*}" = "$wanted" ] || continue
        is_alive "$pid" && kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do is_alive "$pid" || break; sleep 0.2; done
        is_alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
      done < "$PIDS"
    done
    rm -f "$PIDS"
  fi
  rm -rf "$MUNGE_DIR"
  remove_network
}

case "$action" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop [STATE_DIR]" >&2; exit 2 ;;
esac
