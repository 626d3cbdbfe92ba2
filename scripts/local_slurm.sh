#!/usr/bin/env bash
# A real single-node SLURM for the tests: Debian's slurm-wlm (22.05) and munge, one node with two
# GPU gres entries backed by /dev/null and /dev/zero (without File= the node goes INVAL),
# accounting off (so job status comes from squeue), one partition named "gpu" as in
# profiles/slurm. Everything it writes lives under DIR; export SLURM_CONF=DIR/slurm.conf to use it.
#
#   scripts/local_slurm.sh install      # apt-get install slurm-wlm munge (root)
#   scripts/local_slurm.sh start DIR    # configure and start munged, slurmctld, slurmd
#   scripts/local_slurm.sh stop DIR     # stop the daemons started by `start`
set -euo pipefail

command=${1:?usage: local_slurm.sh install | start DIR | stop DIR}

case "$command" in
install)
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    fi
    ;;
start)
    dir=$(realpath -m "${2:?start needs a directory}")
    mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
    chmod 755 "$dir"  # munge, running as its own user, must reach its folder
    host=$(hostname -s)
    memory=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 2000 ))

    # munge: a key of its own, a daemon of its own on a socket of its own.
    chown munge:munge "$dir/munge"
    chmod 700 "$dir/munge"
    head -c 1024 /dev/urandom > "$dir/munge/munge.key"
    chown munge:munge "$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
    runuser -u munge -- munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/seed" --force

    cat > "$dir/slurm.conf" <<EOF
ClusterName=fatest
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SchedulerParameters=sched_interval=1
MessageTimeout=30
KillWait=5
GresTypes=gpu
NodeName=$host CPUs=$(nproc) RealMemory=$memory Gres=gpu:fake:2 State=UNKNOWN
PartitionName=gpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    cat > "$dir/gres.conf" <<EOF
NodeName=$host Name=gpu Type=fake File=/dev/null
NodeName=$host Name=gpu Type=fake File=/dev/zero
EOF
    # Job steps find the configuration only at the default place (the executor plugin clears
    # SLURM_* variables, SLURM_CONF included): link it there, unless a real SLURM lives there.
    mkdir -p /etc/slurm
    for name in slurm.conf gres.conf; do
        if [ -e "/etc/slurm/$name" ] && [ ! -L "/etc/slurm/$name" ]; then
            echo "local_slurm.sh: /etc/slurm/$name exists and is not ours: a real SLURM? not touching it" >&2
            exit 3
        fi
        ln -sfn "$dir/$name" "/etc/slurm/$name"
    done
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    for _ in $(seq 60); do
        if scontrol ping 2>/dev/null | grep -q UP && sinfo -h -o %T 2>/dev/null | grep -qv -e unknown -e '^$'; then
            break
        fi
        sleep 0.5
    done
    scontrol update nodename="$host" state=resume 2>/dev/null || true
    sinfo -h -o '%P %T %G'
    ;;
stop)
    dir=$(realpath -m "${2:?stop needs a directory}")
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        if [ -f "$pidfile" ]; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
        fi
    done
    for name in slurm.conf gres.conf; do
        if [ "$(readlink "/etc/slurm/$name" 2>/dev/null)" = "$dir/$name" ]; then
            rm "/etc/slurm/$name"
        fi
    done
    ;;
*)
    echo "usage: local_slurm.sh install | start DIR | stop DIR" >&2
    exit 2
    ;;
esac
